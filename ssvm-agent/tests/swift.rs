//! Replication to OpenStack Swift against a real single-node Swift (Debian's packages, tempauth,
//! SLO, container quotas), read back with the `swift` CLI: a static large object of MD5-checked
//! segments and a single PUT, identical in size and bytes, with the `sha256` metadata; a second
//! attempt resumes by segment (nothing sent again); a staging copy that does not hash to its record
//! leaves no object and no segments; bad credentials, a missing container and a full container
//! quota give clear errors (never the secret); removal takes the segments along; restore into an
//! empty store; a temp URL that GETs the object and a forged one refused. Keystone v3 through a stand-in identity service written to its documented API
//! (Keystone cannot run here) that hands out a real Swift token and storage URL.

use sha2::{Digest, Sha256};
use ssvm_agent::replica::{ReplicaError, swift};
use ssvm_agent::store::{Store, StoreOptions};
use systemvm_proto::Secret;
use systemvm_proto::agent::{SwiftAuth, SwiftTarget};
use systemvm_tests::images::noise;
use systemvm_tests::objects::{SWIFT_KEY, SWIFT_USER, Swift};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const MIB: usize = 1 << 20;

fn iso_key() -> &'static str {
    "iso/202.iso"
}

fn target(server: &Swift, container: &str) -> SwiftTarget {
    SwiftTarget {
        auth_url: server.auth_url.clone(),
        auth: SwiftAuth::V1 {
            user: SWIFT_USER.into(),
            key: Secret(SWIFT_KEY.into()),
        },
        container: container.into(),
        segment_size: 5 * MIB as u64,
        ca_pem: None,
        temp_url_key: Some(Secret("temp-url-key-for-tests".into())),
    }
}

/// Size and SHA-256 of what the `swift` CLI downloads.
fn read(server: &Swift, container: &str, key: &str) -> Option<(u64, String)> {
    server
        .read(container, key)
        .map(|d| (d.len() as u64, hex::encode(Sha256::digest(&d))))
}

async fn staging(root: &std::path::Path, files: &[(&str, &[u8])]) -> (Store, Vec<String>) {
    let mut sums = Vec::new();
    for (path, data) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
        std::fs::write(&p, data).expect("file");
        sums.push(hex::encode(Sha256::digest(data)));
    }
    std::fs::create_dir_all(root).expect("root");
    let url = format!("file://{}", root.display()).parse().expect("url");
    (
        Store::open(&url, StoreOptions::default()).await.expect("store"),
        sums,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_swift_read_back_resume_and_clean_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Swift::start(&dir.path().join("swift"));
    server.cli(&["post", "templates"]);
    let big = noise(22 * MIB, 11);
    let small = noise(MIB + 77, 12);
    let props = b"filename=big.qcow2\n".as_slice();
    let (store, sums) = staging(
        &dir.path().join("staging"),
        &[
            ("template/tmpl/2/201/big.qcow2", &big),
            ("template/tmpl/2/202/small.iso", &small),
            ("template/tmpl/2/201/template.properties", props),
        ],
    )
    .await;
    let t = target(&server, "templates");
    let key = "template/tmpl/2/201/big.qcow2";

    // A static large object of 5 segments, its properties beside it.
    let r = swift::replicate(&store, key, &sums[0], &t, key)
        .await
        .expect("SLO replica");
    assert_eq!(
        (r.parts, r.resumed_parts, r.bytes_sent),
        (5, 0, big.len() as u64),
        "{r:?}"
    );
    assert_eq!(
        r.companions,
        vec!["template/tmpl/2/201/template.properties".to_owned()]
    );
    assert_eq!(
        read(&server, "templates", key),
        Some((big.len() as u64, sums[0].clone()))
    );
    let stat = server.cli(&["stat", "templates", key]);
    assert!(stat.contains(&format!("Meta Sha256: {}", sums[0])), "{stat}");
    assert!(
        stat.contains("Manifest:") || stat.contains("X-Static-Large-Object: True"),
        "{stat}"
    );
    // Sent again: every segment is there with its MD5, none goes again.
    let again = swift::replicate(&store, key, &sums[0], &t, key)
        .await
        .expect("again");
    assert_eq!((again.resumed_parts, again.bytes_sent), (5, 0), "{again:?}");
    // One PUT below the segment size.
    let iso = "template/tmpl/2/202/small.iso";
    let r = swift::replicate(&store, iso, &sums[1], &t, "iso/202.iso")
        .await
        .expect("single PUT");
    assert_eq!(r.parts, 1);
    assert_eq!(
        read(&server, "templates", "iso/202.iso"),
        Some((small.len() as u64, sums[1].clone()))
    );

    // A staging copy that does not hash to its record: no object, no segments left.
    let wrong = "0".repeat(64);
    let e = swift::replicate(&store, key, &wrong, &t, "bad/big")
        .await
        .expect_err("damaged");
    assert!(matches!(e, ReplicaError::Checksum { .. }), "{e}");
    assert_eq!(read(&server, "templates", "bad/big"), None);
    assert!(!server.cli(&["list", "templates_segments"]).contains("bad/big"));

    // Restored into an empty store, verified, with its properties.
    let (fresh, _) = staging(&dir.path().join("fresh"), &[]).await;
    let f = swift::fetch(&fresh, key, key, &sums[0], &t).await.expect("fetch");
    assert_eq!((f.size, f.companions.len()), (big.len() as u64, 1));
    let back = dir.path().join("fresh/template/tmpl/2/201");
    assert_eq!(std::fs::read(back.join("big.qcow2")).expect("restored"), big);
    assert_eq!(
        std::fs::read(back.join("template.properties")).expect("properties"),
        props
    );
    let e = swift::fetch(&fresh, iso, "iso/202.iso", &wrong, &t)
        .await
        .expect_err("record disagrees");
    assert!(matches!(e, ReplicaError::Verify(_)), "{e}");

    // A temp URL: anyone holding it GETs the object until it expires; a forged one is refused.
    let link = swift::temp_url(&t, iso_key(), std::time::Duration::from_secs(600))
        .await
        .expect("temp URL");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let got = http.get(&link).send().await.expect("GET temp URL");
    assert_eq!(got.status(), 200, "{link}");
    assert_eq!(got.bytes().await.expect("body").as_ref(), small.as_slice());
    let (head, sig) = link.split_once("temp_url_sig=").expect("signed link");
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    let forged = format!("{head}temp_url_sig={flipped}{}", &sig[1..]);
    assert_eq!(http.get(&forged).send().await.expect("GET").status(), 401);

    // Clear errors, never the secret.
    let mut bad = t.clone();
    bad.auth = SwiftAuth::V1 {
        user: SWIFT_USER.into(),
        key: Secret("not-the-key".into()),
    };
    let e = swift::probe(&bad).await.expect_err("bad key");
    assert!(
        e.to_string().contains("401") && !e.to_string().contains("not-the-key"),
        "{e}"
    );
    let e = swift::probe(&target(&server, "absent"))
        .await
        .expect_err("no container");
    assert!(e.to_string().contains("NoSuchContainer"), "{e}");
    swift::probe(&t).await.expect("probe");
    server.cli(&["post", "tiny", "-H", "X-Container-Meta-Quota-Bytes: 1000"]);
    let e = swift::replicate(&store, iso, &sums[1], &target(&server, "tiny"), "iso/202.iso")
        .await
        .expect_err("over quota");
    assert!(
        e.to_string().contains("413") && e.to_string().contains("quota"),
        "{e}"
    );

    // Removal takes the manifest's segments and the properties along.
    swift::delete(&t, key).await.expect("delete");
    assert_eq!(read(&server, "templates", key), None);
    assert_eq!(
        read(&server, "templates", "template/tmpl/2/201/template.properties"),
        None
    );
    assert!(
        !server.cli(&["list", "templates_segments"]).contains(key),
        "segments left"
    );
    swift::delete(&t, key).await.expect("delete again");
}

/// A stand-in for Keystone v3's `POST /v3/auth/tokens` (its documented request and answer):
/// the right password gets `token` and a catalog with `storage_url` as the public object-store
/// endpoint; anything else a 401.
async fn keystone(token: String, storage_url: String) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (token, storage_url) = (token.clone(), storage_url.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            assert!(head.starts_with("POST /v3/auth/tokens "), "{head}");
                            break body.to_owned();
                        }
                    }
                };
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let p = &v["auth"]["identity"]["password"]["user"];
                let ok = p["name"] == "tester"
                    && p["password"] == "keystone-pass"
                    && p["domain"]["name"] == "Default"
                    && v["auth"]["scope"]["project"]["name"] == "test";
                let answer = if ok {
                    let body =
                        serde_json::json!({"token": {"catalog": [{"type": "object-store", "endpoints": [
                        {"interface": "public", "url": storage_url}]}]}})
                        .to_string();
                    format!(
                        "HTTP/1.1 201 Created\r\nX-Subject-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/v3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keystone_v3_tokens_reach_swift() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Swift::start(&dir.path().join("swift"));
    server.cli(&["post", "templates"]);
    // A real token and storage URL from Swift, for the identity stand-in to hand out.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::Client::new()
        .get(&server.auth_url)
        .header("X-Auth-User", SWIFT_USER)
        .header("X-Auth-Key", SWIFT_KEY)
        .send()
        .await
        .expect("tempauth");
    let h = |n: &str| r.headers()[n].to_str().expect("header").to_owned();
    let identity = keystone(h("x-auth-token"), h("x-storage-url")).await;
    let data = noise(3 * MIB, 13);
    let (store, sums) = staging(
        &dir.path().join("staging"),
        &[("template/tmpl/2/203/k.raw", &data)],
    )
    .await;
    let mut t = target(&server, "templates");
    t.auth_url = identity;
    t.auth = SwiftAuth::V3 {
        user: "tester".into(),
        password: Secret("keystone-pass".into()),
        project: "test".into(),
        domain: "Default".into(),
    };
    let key = "template/tmpl/2/203/k.raw";
    swift::replicate(&store, key, &sums[0], &t, key)
        .await
        .expect("replica via Keystone");
    assert_eq!(
        read(&server, "templates", key),
        Some((data.len() as u64, sums[0].clone()))
    );
    t.auth = SwiftAuth::V3 {
        user: "tester".into(),
        password: Secret("wrong".into()),
        project: "test".into(),
        domain: "Default".into(),
    };
    let e = swift::probe(&t).await.expect_err("wrong password");
    assert!(e.to_string().contains("Keystone auth: HTTP 401"), "{e}");
}
