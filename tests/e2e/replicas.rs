//! Object stores through core: `addImageStore provider=S3` (CloudStack's `details` keys, and
//! `addImageStoreS3`) beside the zone's NFS staging store on nfs-ganesha
//! (`createSecondaryStagingStore`), with s3s-fs as S3 and a single-node Swift (tempauth; read
//! back by the `swift` CLI). A template (multipart), an ISO
//! (one PUT) and a snapshot of a volume on a ganesha primary pool are replicated by the storage
//! VM (process driver) as core's replicator asks, read back by boto3 with their SHA-256; the
//! per-store state in `listTemplates` and `listSnapshots showunique=false`; health from probes
//! (bad credentials: Down with the reason) and no secret in any answer;
//! the disaster-recovery drill (the staging store's artefacts deleted, `systemvm-core
//! rebuild-store`, every file back as it was, the template served again); the staging cache (a
//! replicated template evicted, brought back by its next extract); extract links presigned by the
//! object store (`extract.url.objectstore`); `deleteImageStore`
//! refused while objects live there; deleting an artefact removes its object.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use systemvm_tests::http::HttpFixture;
use systemvm_tests::objects::{ACCESS_KEY, S3sFs, SECRET_KEY, SWIFT_KEY, Swift, boto3_read};

use crate::core_api::{Backend, Core};
use crate::deploy::{start_on, wait_fleet};
use crate::nfs::RestartableGanesha;
use crate::support::errorcode;

/// The bucket, with a short name: s3s-fs keeps an object's metadata in a file named after the base64 of
/// bucket and key, and a file name has at most 255 bytes; the keys here are the staging store's
/// paths (a template's is 129 bytes).
const BUCKET: &str = "rep";

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn s3_store_args<'a>(name: &'a str, endpoint: &'a str, bucket: &'a str, secret: &'a str) -> Vec<String> {
    vec![
        "addImageStore".into(),
        "provider=S3".into(),
        format!("name={name}"),
        "details[0].key=accesskey".into(),
        format!("details[0].value={ACCESS_KEY}"),
        "details[1].key=secretkey".into(),
        format!("details[1].value={secret}"),
        "details[2].key=bucket".into(),
        format!("details[2].value={bucket}"),
        "details[3].key=endpoint".into(),
        format!("details[3].value={}", endpoint.trim_start_matches("http://")),
        "details[4].key=usehttps".into(),
        "details[4].value=false".into(),
    ]
}

async fn ok_args(core: &Core, args: &[String]) -> Value {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    core.ok(&refs).await
}

/// Polls `f` until it gives `Some`, failing with `what` after `within`.
async fn eventually<T>(within: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn replicas(core: &Core, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["listReplicas"];
    all.extend_from_slice(args);
    core.ok(&all).await["replica"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `resource`'s replica in `store` is in state `want`.
async fn replica_in(core: &Core, store: &str, resource: &str, want: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let all = replicas(core, &[&format!("resourceid={resource}")]).await;
        if let Some(r) = all
            .iter()
            .find(|r| r["imagestoreid"] == store && r["state"] == want)
        {
            return r.clone();
        }
        assert!(
            start.elapsed() < within,
            "replica of {resource} in {store} not {want}: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sets a global setting.
async fn set(core: &Core, name: &str, value: &str) {
    core.ok(&[
        "updateConfiguration",
        &format!("name={name}"),
        &format!("value={value}"),
    ])
    .await;
}

/// The download link `extractTemplate` (or `extractIso`) gives for `id`.
async fn extract_link(core: &Core, id: &str, iso: bool) -> String {
    let (command, object) = if iso {
        ("extractIso", "iso")
    } else {
        ("extractTemplate", "template")
    };
    core.ok(&[command, &format!("id={id}"), "mode=HTTP_DOWNLOAD"])
        .await[object]["url"]
        .as_str()
        .expect("extract url")
        .to_owned()
}

fn store_id(v: &Value) -> String {
    v["imagestore"]["id"].as_str().expect("store id").to_owned()
}

/// `systemvm-core ARGS LAST` against `core`; its standard output (it must succeed).
async fn cli(core: &Core, args: &[&str], last: &Path) -> String {
    let out = tokio::process::Command::new(crate::deploy::workspace_bin("systemvm-core"))
        .args(args)
        .arg(last)
        .arg("--data-dir")
        .arg(core.dir())
        .args(["--api-url", &core.running().api_url()])
        .output()
        .await
        .expect("systemvm-core");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// Files under the store's `template/` and `snapshots/` with their SHA-256: the artefacts, not
/// the agent's bookkeeping (journals, the `.ssvm-epoch.N` fencing marks).
fn artefact_files(root: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("template"), root.join("snapshots")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().ends_with(".journal")
                && !e.file_name().to_string_lossy().starts_with('.')
            {
                let rel = p.strip_prefix(root).expect("under root").display().to_string();
                out.push((rel, sha_hex(&std::fs::read(&p).expect("read"))));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_artefacts_replicate_to_s3_and_objects_follow_their_artefacts() {
    // On PostgreSQL (the replicator's and the cache's queries; the other storage tests run on
    // SQLite).
    let (core, _guard) = start_on(
        Backend::Postgres,
        &[
            ("secstorage.allowed.internal.sites", "127.0.0.0/8"),
            // Evictions come at the end, once the drill is done.
            ("storage.cache.replacement.enabled", "false"),
        ],
    )
    .await;
    let sec = RestartableGanesha::start("rep-sec");
    let pri = RestartableGanesha::start("rep-pri");
    let s3 = S3sFs::start(&core.dir().join("s3"));
    s3.bucket(BUCKET);
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .expect("zone")
        .to_owned();
    // The NFS store as CloudStack's staging store (role ImageCache).
    let added = core
        .ok(&[
            "createSecondaryStagingStore",
            "name=rep-staging",
            &format!("url={}", sec.url),
            &format!("zoneid={zone}"),
        ])
        .await;
    let staging = added["secondarystorage"]["id"]
        .as_str()
        .expect("staging store")
        .to_owned();
    let cache = core.ok(&["listSecondaryStagingStores"]).await;
    assert_eq!(cache["count"], 1, "{cache}");
    assert_eq!(
        cache["secondarystagingstore"][0]["providername"], "NFS",
        "{cache}"
    );
    // The good store through the CLI, its keys from a file (never on a command line).
    let params = core.dir().join("s3.params");
    let args = s3_store_args("s3-main", &s3.endpoint, BUCKET, SECRET_KEY);
    std::fs::write(
        &params,
        format!("# keys\n{}\n\n{}\n", args[3..7].join("\n"), args[7..].join("\n")),
    )
    .expect("params");
    let out = cli(
        &core,
        &[
            "api",
            "addImageStore",
            "provider=S3",
            "name=s3-main",
            "--params-from",
        ],
        &params,
    )
    .await;
    let good = store_id(&serde_json::from_str::<Value>(&out).expect("addImageStore's answer"));
    let forged = "not-the-secret-at-all";
    let bad = store_id(&ok_args(&core, &s3_store_args("s3-badkey", &s3.endpoint, BUCKET, forged)).await);
    // Swift beside them: CloudStack's details (account, username, key) and ours (container,
    // segment size).
    let swift = Swift::start(&core.dir().join("swift"));
    swift.cli(&["post", "templates"]);
    let sw = store_id(
        &core
            .ok(&[
                "addImageStore",
                "provider=Swift",
                "name=swift-main",
                &format!("url={}", swift.auth_url),
                "details[0].key=account",
                "details[0].value=test",
                "details[1].key=username",
                "details[1].value=tester",
                "details[2].key=key",
                &format!("details[2].value={SWIFT_KEY}"),
                "details[3].key=container",
                "details[3].value=templates",
                "details[4].key=segmentsize",
                "details[4].value=16777216",
            ])
            .await,
    );

    // CloudStack's older command: the same store with the keys as parameters.
    let legacy = core
        .ok(&[
            "addImageStoreS3",
            "name=s3-legacy",
            &format!("accesskey={ACCESS_KEY}"),
            &format!("secretkey={SECRET_KEY}"),
            &format!("bucket={BUCKET}"),
            &format!("endpoint={}", s3.endpoint),
        ])
        .await;
    assert_eq!(legacy["imagestore"]["providername"], "S3", "{legacy}");
    assert!(!legacy.to_string().contains(SECRET_KEY), "{legacy}");
    core.ok(&["deleteImageStore", &format!("id={}", store_id(&legacy))])
        .await;

    // Refusals at add time, with the key named and nothing recorded.
    for (args, says) in [
        (
            vec![
                "provider=S3",
                "name=x",
                "details[0].key=bucket",
                "details[0].value=b",
            ],
            "accesskey",
        ),
        (
            vec![
                "provider=Swift",
                "name=y",
                "url=http://127.0.0.1:1/auth/v1.0",
                "details[0].key=account",
                "details[0].value=a",
            ],
            "username",
        ),
    ] {
        let mut all = vec!["addImageStore"];
        all.extend(args);
        let o = core.cs(&all).await;
        assert_eq!(errorcode(&o.json), Some(431), "{all:?}: {}", o.json);
        assert!(o.json.to_string().contains(says), "{}", o.json);
    }
    wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(60)).await;

    // Health from the probes: the good store Up, the others Down with the reason, no secret.
    let listed = eventually(Duration::from_secs(60), "stores not probed", async || {
        let l = core.ok(&["listImageStores"]).await;
        let all = l["imagestore"].as_array().cloned().unwrap_or_default();
        let probed = all
            .iter()
            .filter(|s| s["providername"] == "S3" || s["providername"] == "Swift")
            .all(|s| s["health"] != "Unknown");
        probed.then_some(l)
    })
    .await;
    assert_eq!(
        listed["count"], 3,
        "the staging store is not an image store: {listed}"
    );
    let text = listed.to_string();
    assert!(
        !text.contains(SECRET_KEY) && !text.contains(forged) && !text.contains(SWIFT_KEY),
        "a secret in {text}"
    );
    let by = |id: &str| {
        listed["imagestore"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == id).cloned())
            .expect("listed store")
    };
    let g = by(&good);
    assert_eq!(
        (g["health"].as_str(), g["protocol"].as_str()),
        (Some("Up"), Some("http")),
        "{g}"
    );
    assert_eq!(g["url"], format!("{}/{BUCKET}", s3.endpoint));
    let w = by(&sw);
    assert_eq!(
        (w["health"].as_str(), w["providername"].as_str()),
        (Some("Up"), Some("Swift")),
        "{w}"
    );
    assert_eq!(w["url"], swift.auth_url.as_str());
    let b = by(&bad);
    assert_eq!(b["health"], "Down", "{b}");
    assert!(
        b["healthdetail"]
            .as_str()
            .is_some_and(|d| d.contains("403") || d.contains("Signature")),
        "{b}"
    );

    // A template above the single-PUT cutoff (multipart) and an ISO (one PUT).
    let img =
        systemvm_tests::images::qcow2_of_noise(&core.dir().join("img"), "rep.qcow2", 80, 41).expect("qcow2");
    let qcow2 = std::fs::read(&img).expect("read");
    let mut iso = systemvm_tests::images::noise(6 << 20, 42);
    iso[0x8000..0x8006].copy_from_slice(b"\x01CD001");
    let (qcow2_sha, iso_sha) = (sha_hex(&qcow2), sha_hex(&iso));
    let http = HttpFixture::start().expect("http fixture");
    http.file("/rep.qcow2", qcow2.clone());
    http.file("/rep.iso", iso.clone());
    let t = core
        .ok(&[
            "registerTemplate",
            "name=replicated",
            "format=QCOW2",
            "hypervisor=KVM",
            &format!("url={}", http.url("/rep.qcow2")),
            &format!("zoneid={zone}"),
        ])
        .await["template"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let i = core
        .ok(&[
            "registerIso",
            "name=replicated-iso",
            &format!("url={}", http.url("/rep.iso")),
            &format!("zoneid={zone}"),
        ])
        .await["iso"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let rt = replica_in(&core, &good, &t, "Replicated", Duration::from_secs(180)).await;
    let ri = replica_in(&core, &good, &i, "Replicated", Duration::from_secs(120)).await;
    assert!(rt["parts"].as_i64().is_some_and(|p| p >= 3), "{rt}");
    assert_eq!(ri["parts"], 1, "{ri}");
    for (r, sha, len) in [(&rt, &qcow2_sha, qcow2.len()), (&ri, &iso_sha, iso.len())] {
        let key = r["key"].as_str().expect("key");
        assert!(key.starts_with("template/tmpl/"), "{r}");
        let (size, read_sha, meta) = boto3_read(&s3.endpoint, BUCKET, key).expect("object");
        assert_eq!((size, &read_sha), (len as u64, sha), "{key}");
        assert_eq!(meta.as_deref(), Some(sha.as_str()), "{key}");
    }
    // In Swift too: a static large object of 16 MiB segments, read back by the swift CLI.
    let wt = replica_in(&core, &sw, &t, "Replicated", Duration::from_secs(180)).await;
    assert!(wt["parts"].as_i64().is_some_and(|p| p >= 5), "{wt}");
    let back = swift
        .read("templates", wt["key"].as_str().expect("key"))
        .expect("Swift object");
    assert_eq!(sha_hex(&back), qcow2_sha);
    // Per store in listTemplates: the staging store first, then each object store.
    let listed = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={t}")])
        .await;
    let details = listed["template"][0]["downloaddetails"]
        .as_array()
        .cloned()
        .expect("details");
    assert_eq!(details.len(), 4, "{details:?}");
    assert_eq!(details[0]["datastore"], "rep-staging");
    let s3_main = details
        .iter()
        .find(|d| d["datastore"] == "s3-main")
        .expect("s3-main");
    assert_eq!(s3_main["downloadState"], "DOWNLOADED", "{details:?}");
    // The store with bad credentials: failed with the reason, never the secret.
    let failed = replica_in(&core, &bad, &t, "Failed", Duration::from_secs(60)).await;
    assert!(
        failed["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failed}"
    );
    let all = core.ok(&["listReplicas"]).await.to_string();
    assert!(
        !all.contains(SECRET_KEY) && !all.contains(forged),
        "a secret in {all}"
    );

    // A snapshot of a volume on a ganesha primary pool: backed up to staging, replicated.
    let vol_dir = pri.dir.join("vm-rep");
    std::fs::create_dir_all(&vol_dir).expect("volume dir");
    let disk = systemvm_tests::images::qcow2_of_noise(&vol_dir, "root.qcow2", 12, 43).expect("disk");
    let pool = core
        .ok(&[
            "createStoragePool",
            "name=rep-primary",
            &format!("url={}", pri.url),
            &format!("zoneid={zone}"),
        ])
        .await["storagepool"]["id"]
        .as_str()
        .expect("pool")
        .to_owned();
    let size = 12u64 << 20;
    let vol = core
        .ok(&[
            "importVolume",
            "path=vm-rep/root.qcow2",
            &format!("storageid={pool}"),
            &format!("size={size}"),
        ])
        .await["volume"]["id"]
        .as_str()
        .expect("volume")
        .to_owned();
    let snap = core
        .ok(&["createSnapshot", &format!("volumeid={vol}"), "name=rep-snap"])
        .await["snapshot"]["id"]
        .as_str()
        .expect("snapshot")
        .to_owned();
    let rs = replica_in(&core, &good, &snap, "Replicated", Duration::from_secs(120)).await;
    let key = rs["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("snapshots/"), "{rs}");
    let staged = std::fs::read(sec.dir.join(&key)).expect("staging copy");
    let (n, sha, meta) = boto3_read(&s3.endpoint, BUCKET, &key).expect("snapshot object");
    assert_eq!(
        (n, sha.as_str()),
        (staged.len() as u64, sha_hex(&staged).as_str())
    );
    assert_eq!(meta, Some(sha));
    let per_store = core
        .ok(&["listSnapshots", &format!("id={snap}"), "showunique=false"])
        .await;
    let entries = per_store["snapshot"].as_array().cloned().expect("entries");
    assert_eq!(entries.len(), 4, "{per_store}");
    let on_s3 = entries
        .iter()
        .find(|e| e["datastoreid"] == good.as_str())
        .expect("s3 entry");
    assert_eq!(on_s3["datastorestate"], "Ready", "{on_s3}");
    assert_eq!(on_s3["downloaddetails"]["downloadState"], "DOWNLOADED");
    assert_eq!(
        core.ok(&["listSnapshots", &format!("id={snap}")]).await["count"],
        1,
        "showunique is true by default"
    );

    // The drill: the staging store's artefacts lost, then rebuilt from S3 with the CLI: every
    // file (images and template.properties) as it was, and the template served again.
    let before = artefact_files(&sec.dir);
    assert_eq!(
        before
            .iter()
            .filter(|(p, _)| p.ends_with("template.properties"))
            .count(),
        2,
        "{before:?}"
    );
    for d in ["template", "snapshots"] {
        std::fs::remove_dir_all(sec.dir.join(d)).expect("wipe the staging store");
    }
    // The export served afresh (ganesha would otherwise answer from its cache of what was
    // deleted behind its back), as an empty replacement export would be.
    sec.restart();
    let said = cli(
        &core,
        &["rebuild-store", &staging, "--object-store"],
        Path::new(&good),
    )
    .await;
    assert!(said.contains("Restored 3 artefact(s)"), "{said}");
    assert_eq!(artefact_files(&sec.dir), before);
    let link = extract_link(&core, &t, false).await;
    let got = crate::uploads::request(&link, "GET", &[], b"", None).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        sha_hex(&got.body),
        qcow2_sha,
        "the rebuilt template serves its bytes"
    );
    let restored = core
        .ok(&["createVolume", &format!("snapshotid={snap}"), "name=from-rebuilt"])
        .await;
    let path = pri
        .dir
        .join(restored["volume"]["path"].as_str().expect("volume path"));
    let cmp = std::process::Command::new("qemu-img")
        .arg("compare")
        .arg(&disk)
        .arg(&path)
        .output()
        .expect("qemu-img compare");
    assert!(
        cmp.status.success(),
        "the rebuilt snapshot restores identical: {cmp:?}"
    );

    // The staging cache: with a zero LRU interval the replicated template's staging copy is
    // evicted, and the next extract brings it back from S3 first.
    for (name, value) in [
        ("storage.cache.replacement.lru.interval", "0"),
        ("storage.cache.replacement.interval", "1"),
        ("storage.cache.replacement.enabled", "true"),
    ] {
        set(&core, name, value).await;
    }
    let image = sec.dir.join(rt["key"].as_str().expect("key"));
    eventually(
        Duration::from_secs(30),
        "the staging copy was not evicted",
        async || (!image.exists()).then_some(()),
    )
    .await;
    set(&core, "storage.cache.replacement.enabled", "false").await;
    let link = extract_link(&core, &t, false).await;
    assert!(image.exists(), "the extract brought the staging copy back");
    let got = crate::uploads::request(&link, "GET", &[], b"", None).await;
    assert_eq!(
        sha_hex(&got.body),
        qcow2_sha,
        "the copy brought back serves its bytes"
    );

    // Extract links from the object store: a presigned S3 URL of the first store that is Up.
    set(&core, "extract.url.objectstore", "true").await;
    let link = extract_link(&core, &i, true).await;
    assert!(
        link.starts_with(&format!("{}/{BUCKET}/", s3.endpoint)) && link.contains("X-Amz-Signature="),
        "{link}"
    );
    let got = crate::uploads::request(&link, "GET", &[], b"", None).await;
    assert_eq!((got.status, sha_hex(&got.body)), (200, iso_sha.clone()), "{link}");
    set(&core, "extract.url.objectstore", "false").await;

    // Objects live in the good store: it cannot go. The broken one holds none: it can.
    let o = core.cs(&["deleteImageStore", &format!("id={good}")]).await;
    assert_eq!(errorcode(&o.json), Some(536), "{}", o.json);
    assert!(o.json.to_string().contains("replica"), "{}", o.json);
    core.ok(&["deleteImageStore", &format!("id={bad}")]).await;

    // Deleting the artefacts removes their objects, then the store can go.
    core.ok(&["deleteTemplate", &format!("id={t}")]).await;
    core.ok(&["deleteIso", &format!("id={i}")]).await;
    core.ok(&["deleteSnapshot", &format!("id={snap}")]).await;
    for store in [&good, &sw] {
        eventually(Duration::from_secs(60), "replicas not removed", async || {
            replicas(&core, &[&format!("imagestoreid={store}")])
                .await
                .is_empty()
                .then_some(())
        })
        .await;
    }
    assert!(
        swift
            .read("templates", wt["key"].as_str().expect("key"))
            .is_none()
    );
    core.ok(&["deleteImageStore", &format!("id={sw}")]).await;
    for r in [&rt, &ri, &rs] {
        let key = r["key"].as_str().expect("key");
        assert!(
            boto3_read(&s3.endpoint, BUCKET, key).is_none(),
            "{key} still there"
        );
    }
    core.ok(&["deleteImageStore", &format!("id={good}")]).await;
    assert!(core.ok(&["listImageStores"]).await.get("imagestore").is_none());
}
