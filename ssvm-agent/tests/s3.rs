//! Replication to S3 against real servers: s3s-fs (signatures and checksums checked, data kept
//! across restarts) and moto (multipart bookkeeping). Replicas are read back by boto3, an
//! independent client: size, bytes (SHA-256) and the `sha256` metadata. Faults: the server
//! frozen and killed mid-multipart then restarted (the next attempt sends only the missing parts
//! and nothing shows under the key before completion), a staging copy that does not hash to its
//! record, bad credentials and a missing bucket (clear errors), an orphaned multipart upload
//! (aborted), nothing listening (unreachable); probes and removals (moto). A missing server fails the test (scripts/deps.sh installs them).

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use ssvm_agent::replica::s3::{self, S3Options, S3Target};
use ssvm_agent::replica::{ReplicaError, restore};
use ssvm_agent::store::{Store, StoreOptions};
use systemvm_tests::images::noise;
use systemvm_tests::objects::{ACCESS_KEY, Moto, S3sFs, SECRET_KEY, boto3_read};

const MIB: usize = 1 << 20;

fn target(endpoint: &str, bucket: &str) -> S3Target {
    S3Target {
        endpoint: endpoint.to_owned(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        path_style: true,
        ca_pem: None,
    }
}

/// Small parts so a few MiB make several; short attempts so a dead server fails fast.
fn opts() -> S3Options {
    S3Options {
        cutoff: 4 << 20,
        min_part: 5 << 20,
        concurrency: 2,
        attempt_timeout: Duration::from_secs(5),
        attempts: 2,
    }
}

/// A staging store on a local directory with `files` written (path, bytes); their SHA-256s.
async fn staging(dir: &std::path::Path, files: &[(&str, &[u8])]) -> (Store, Vec<String>) {
    let root = dir.join("staging");
    let mut sums = Vec::new();
    for (path, data) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
        std::fs::write(&p, data).expect("file");
        sums.push(hex::encode(Sha256::digest(data)));
    }
    let url = format!("file://{}", root.display()).parse().expect("url");
    (
        Store::open(&url, StoreOptions::default()).await.expect("store"),
        sums,
    )
}

/// The companions of the big template's replica (sent again: its object is there already).
async fn r_big_companions(store: &Store, t: &S3Target, sum: &str) -> Vec<String> {
    let key = "template/tmpl/2/201/big.qcow2";
    s3::replicate(store, key, sum, t, key, &opts())
        .await
        .expect("replica with properties")
        .companions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_s3s_fs_read_back_identical_and_faults_are_clear() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3sFs::start(&dir.path().join("s3"));
    server.bucket("templates");
    let big = noise(22 * MIB, 7);
    let small = noise(MIB + 123, 8);
    let (store, sums) = staging(
        dir.path(),
        &[
            ("template/tmpl/2/201/big.qcow2", &big),
            ("template/tmpl/2/202/small.iso", &small),
            ("template/tmpl/2/201/template.properties", b"filename=big.qcow2\n"),
        ],
    )
    .await;
    let t = target(&server.endpoint, "templates");

    // Multipart: 22 MiB in 5 MiB parts is 5 parts.
    let r = s3::replicate(
        &store,
        "template/tmpl/2/201/big.qcow2",
        &sums[0],
        &t,
        "template/tmpl/2/201/big.qcow2",
        &opts(),
    )
    .await
    .expect("multipart replica");
    assert_eq!(
        (r.parts, r.resumed_parts, r.bytes_sent),
        (5, 0, big.len() as u64),
        "{r:?}"
    );
    assert_eq!(
        boto3_read(&server.endpoint, "templates", "template/tmpl/2/201/big.qcow2"),
        Some((big.len() as u64, sums[0].clone(), Some(sums[0].clone())))
    );
    assert!(
        !dir.path()
            .join("staging/template/tmpl/2/201/big.qcow2.s3.journal")
            .exists(),
        "the journal goes once the object is complete"
    );
    // One PUT below the cutoff.
    let r = s3::replicate(
        &store,
        "template/tmpl/2/202/small.iso",
        &sums[1],
        &t,
        "iso/202.iso",
        &opts(),
    )
    .await
    .expect("single replica");
    assert_eq!(r.parts, 1);
    assert_eq!(
        boto3_read(&server.endpoint, "templates", "iso/202.iso"),
        Some((small.len() as u64, sums[1].clone(), Some(sums[1].clone())))
    );

    // A presigned GET: the object's bytes for whoever holds the link; a forged one is refused.
    let link = s3::presign(&t, "iso/202.iso", Duration::from_secs(600), &opts())
        .await
        .expect("presign");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let got = http.get(&link).send().await.expect("GET presigned");
    assert_eq!(got.status(), 200, "{link}");
    assert_eq!(got.bytes().await.expect("body").as_ref(), small.as_slice());
    let (head, sig) = link.split_once("X-Amz-Signature=").expect("signed link");
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    let forged = format!("{head}X-Amz-Signature={flipped}{}", &sig[1..]);
    assert_eq!(http.get(&forged).send().await.expect("GET").status(), 403);

    // A template's properties go beside its image.
    assert_eq!(
        r_big_companions(&store, &t, &sums[0]).await,
        vec!["template/tmpl/2/201/template.properties".to_owned()]
    );
    assert_eq!(
        boto3_read(
            &server.endpoint,
            "templates",
            "template/tmpl/2/201/template.properties"
        ),
        Some((19, sums[2].clone(), Some(sums[2].clone())))
    );

    // Brought back into an empty store: verified, in place, with its properties.
    let fresh_dir = dir.path().join("fresh");
    let (fresh, _) = staging(&fresh_dir, &[]).await;
    let key = "template/tmpl/2/201/big.qcow2";
    let f = restore::fetch(&fresh, key, key, &sums[0], &t, &opts())
        .await
        .expect("fetch");
    assert_eq!((f.size, f.sha256.as_str()), (big.len() as u64, sums[0].as_str()));
    assert_eq!(
        f.companions,
        vec!["template/tmpl/2/201/template.properties".to_owned()]
    );
    let back = fresh_dir.join("staging/template/tmpl/2/201");
    assert_eq!(std::fs::read(back.join("big.qcow2")).expect("restored"), big);
    assert_eq!(
        std::fs::read(back.join("template.properties")).expect("properties"),
        b"filename=big.qcow2\n"
    );
    // A record that disagrees with the object: refused before a byte is written.
    let wrong = "0".repeat(64);
    let iso = "template/tmpl/2/202/small.iso";
    let e = restore::fetch(&fresh, iso, "iso/202.iso", &wrong, &t, &opts())
        .await
        .expect_err("record and object disagree");
    assert!(matches!(e, ReplicaError::Verify(_)), "{e}");
    // An object whose bytes were damaged in the bucket: refused after the copy, nothing left.
    let stored = dir.path().join("s3/templates/iso/202.iso");
    let mut damaged = std::fs::read(&stored).expect("object file");
    damaged[100] ^= 0xff;
    std::fs::write(&stored, damaged).expect("damage");
    let e = restore::fetch(&fresh, iso, "iso/202.iso", &sums[1], &t, &opts())
        .await
        .expect_err("damaged object");
    // The SDK's CRC32C check or our SHA-256, whichever sees it first.
    assert!(
        matches!(e, ReplicaError::Checksum { .. } | ReplicaError::Verify(_)),
        "{e}"
    );
    let iso_dir = fresh_dir.join("staging/template/tmpl/2/202");
    assert!(!iso_dir.join("small.iso").exists() && !iso_dir.join("small.iso.part").exists());

    // A staging copy that does not hash to its record: refused, nothing under the key.
    for (path, key) in [
        ("template/tmpl/2/201/big.qcow2", "bad/big"),
        ("template/tmpl/2/202/small.iso", "bad/small"),
    ] {
        let e = s3::replicate(&store, path, &wrong, &t, key, &opts())
            .await
            .expect_err("a damaged staging copy");
        assert!(matches!(e, ReplicaError::Checksum { .. }), "{e}");
        assert_eq!(boto3_read(&server.endpoint, "templates", key), None, "{key}");
    }

    // Bad credentials: the server's own words, without the secret.
    let mut bad = t.clone();
    bad.secret_key = "not-the-secret".into();
    let e = s3::replicate(
        &store,
        "template/tmpl/2/202/small.iso",
        &sums[1],
        &bad,
        "x",
        &opts(),
    )
    .await
    .expect_err("bad credentials");
    assert!(e.to_string().contains("SignatureDoesNotMatch"), "{e}");
    assert!(!e.to_string().contains("not-the-secret"), "{e}");
    let e = s3::probe(&bad, &opts())
        .await
        .expect_err("probe with bad credentials");
    assert!(e.to_string().contains("AccessDenied (HTTP 403)"), "{e}");
    assert!(!e.to_string().contains("not-the-secret"), "{e}");
    let e = s3::replicate(
        &store,
        "template/tmpl/2/202/small.iso",
        &sums[1],
        &target("http://127.0.0.1:1", "templates"),
        "x",
        &opts(),
    )
    .await
    .expect_err("nothing listening");
    assert!(matches!(e, ReplicaError::Unreachable(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_a_server_crash_resumes_with_the_missing_parts_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = S3sFs::start(&dir.path().join("s3"));
    server.bucket("snapshots");
    let data = noise(48 * MIB, 11);
    let path = "snapshots/2/vol-9/snap-1.qcow2";
    let (store, sums) = staging(dir.path(), &[(path, &data)]).await;
    let t = target(&server.endpoint, "snapshots");
    let mut o = opts();
    o.concurrency = 1;
    let journal = dir.path().join(format!("staging/{path}.s3.journal"));
    let parts_in_journal = |j: &std::path::Path| -> usize {
        std::fs::read(j)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["parts"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    let upload = {
        let (store, sum, t, o) = (store.clone(), sums[0].clone(), t.clone(), o.clone());
        tokio::spawn(async move { s3::replicate(&store, path, &sum, &t, path, &o).await })
    };
    // Two parts acknowledged, then the server freezes mid-part and dies.
    let until = Instant::now() + Duration::from_secs(60);
    while parts_in_journal(&journal) < 2 {
        assert!(
            Instant::now() < until && !upload.is_finished(),
            "no parts journaled"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.freeze();
    server.kill();
    let e = upload.await.expect("task").expect_err("the server died");
    assert!(matches!(e, ReplicaError::Unreachable(_)), "{e}");
    let kept = parts_in_journal(&journal);
    assert!((2..10).contains(&kept), "{kept} parts journaled");
    server.restart();
    assert_eq!(
        boto3_read(&server.endpoint, "snapshots", path),
        None,
        "no object before completion"
    );
    let r = s3::replicate(&store, path, &sums[0], &t, path, &o)
        .await
        .expect("the resumed replica");
    assert_eq!(r.parts, 10, "{r:?}");
    assert_eq!(r.resumed_parts as usize, kept, "{r:?}");
    assert_eq!(r.bytes_sent, data.len() as u64 - kept as u64 * (5 << 20), "{r:?}");
    assert_eq!(
        boto3_read(&server.endpoint, "snapshots", path),
        Some((data.len() as u64, sums[0].clone(), Some(sums[0].clone())))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_multipart_uploads_are_aborted_on_moto() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Moto::start();
    let t = target(&server.endpoint, "replicas");
    let client = s3::client(&t, &opts()).expect("client");
    client
        .create_bucket()
        .bucket("replicas")
        .send()
        .await
        .expect("bucket");
    let key = "template/tmpl/2/301/t.qcow2";
    let orphan = client
        .create_multipart_upload()
        .bucket("replicas")
        .key(key)
        .send()
        .await
        .expect("an orphan");
    let orphan = orphan.upload_id().expect("id").to_owned();
    let data = noise(12 * MIB, 3);
    let (store, sums) = staging(dir.path(), &[("template/tmpl/2/301/t.qcow2", &data)]).await;
    let r = s3::replicate(&store, "template/tmpl/2/301/t.qcow2", &sums[0], &t, key, &opts())
        .await
        .expect("replica");
    assert_eq!(r.parts, 3, "{r:?}");
    let left = client
        .list_multipart_uploads()
        .bucket("replicas")
        .send()
        .await
        .expect("uploads");
    assert!(
        left.uploads()
            .iter()
            .all(|u| u.upload_id() != Some(orphan.as_str())),
        "the orphan is gone: {left:?}"
    );
    assert!(left.uploads().is_empty(), "{left:?}");
    assert_eq!(
        boto3_read(&server.endpoint, "replicas", key),
        Some((data.len() as u64, sums[0].clone(), Some(sums[0].clone())))
    );

    // A missing bucket (s3s-fs makes one on the fly; moto answers as S3 does).
    let e = s3::replicate(
        &store,
        "template/tmpl/2/301/t.qcow2",
        &sums[0],
        &target(&server.endpoint, "no-such-bucket"),
        key,
        &opts(),
    )
    .await
    .expect_err("missing bucket");
    assert!(e.to_string().contains("NoSuchBucket"), "{e}");

    // Probes: the bucket there, or a clear reason.
    s3::probe(&t, &opts()).await.expect("probe");
    let e = s3::probe(&target(&server.endpoint, "no-such-bucket"), &opts())
        .await
        .expect_err("missing bucket");
    assert!(e.to_string().contains("NoSuchBucket"), "{e}");

    // Removing a replica: the object and any upload still open under its key go; removing
    // it again is no error.
    let open = client
        .create_multipart_upload()
        .bucket("replicas")
        .key(key)
        .send()
        .await
        .expect("an open upload");
    s3::delete(&t, key, &opts()).await.expect("delete");
    assert_eq!(boto3_read(&server.endpoint, "replicas", key), None);
    let left = client
        .list_multipart_uploads()
        .bucket("replicas")
        .send()
        .await
        .expect("uploads");
    assert!(
        left.uploads().iter().all(|u| u.upload_id() != open.upload_id()),
        "{left:?}"
    );
    s3::delete(&t, key, &opts()).await.expect("delete again");
}
