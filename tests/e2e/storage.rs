//! Template registration into nfs-ganesha: the whole pipeline on the real NFS server, and a server
//! that stops answering in the middle of a job.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use ssvm_agent::download::{DownloadSettings, Downloader, LiveProgress};
use ssvm_agent::fetch::{self, FetchConfig};
use ssvm_agent::job::{DownloadSpec, JobRecord, JobState, Journal};
use ssvm_agent::store::{Store, StoreOptions, StoreUrl};
use systemvm_tests::http::{Faults, HttpFixture, Route};
use tokio_util::sync::CancellationToken;

use crate::nfs::{NFS_LOCK, ganesha};

/// A qcow2 with `mib` MiB of data, made with qemu-img from deterministic noise.
fn qcow2(dir: &Path, mib: usize) -> Vec<u8> {
    let img = systemvm_tests::images::qcow2_of_noise(dir, "image.qcow2", mib, 0x9e37_79b9_7f4a_7c15)
        .expect("qcow2 image");
    std::fs::read(img).expect("read qcow2")
}

fn downloader(store: Store, state: &Path, settings: DownloadSettings) -> Downloader {
    let allow: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().expect("cidr")];
    Downloader {
        http: fetch::client(&FetchConfig {
            allow_internal: allow.clone(),
            ..FetchConfig::default()
        })
        .expect("client"),
        store,
        journal: Journal::open(state).expect("journal"),
        settings,
        allow_internal: Arc::new(allow),
    }
}

fn spec(url: String, path: &str, checksum: Option<String>) -> DownloadSpec {
    DownloadSpec {
        url,
        path: path.into(),
        format: "QCOW2".into(),
        checksum,
        description: "e2e".into(),
    }
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_qcow2_into_ganesha() {
    let _serial = NFS_LOCK.lock().await;
    let nfs = ganesha();
    let tmp = temp("register");
    let data = qcow2(&tmp.join("img"), 16);
    let http = HttpFixture::start().expect("http fixture");
    http.file("/centos.qcow2", data.clone());
    let store = nfs.open(StoreOptions::default()).await;
    let dl = downloader(store.clone(), &tmp.join("state"), DownloadSettings::default());
    let sum = format!("{{SHA-256}}{}", hex::encode(Sha256::digest(&data)));
    let mut record = JobRecord::new(
        "nfs-register",
        spec(
            http.url("/centos.qcow2"),
            "template/tmpl/3/301",
            Some(sum.clone()),
        ),
        &nfs.url,
    );
    let state = dl
        .run(&mut record, &LiveProgress::default(), &CancellationToken::new())
        .await;
    assert_eq!(state, JobState::Completed, "{:?}", record.error);
    let installed = record.installed.expect("installed");
    assert_eq!(installed.download_checksum, sum);
    // The bytes are on ganesha's export, under CloudStack's layout, with the properties beside them.
    let on_disk = std::fs::read(nfs.dir.join(&installed.file)).expect("installed file on the export");
    assert_eq!(Sha256::digest(&on_disk)[..], Sha256::digest(&data)[..]);
    let props =
        std::fs::read_to_string(nfs.dir.join("template/tmpl/3/301/template.properties")).expect("properties");
    assert!(props.contains("qcow2.virtualsize=16777216"), "{props}");
    let inventory = ssvm_agent::inventory::scan(&store).await.expect("inventory");
    let entry = inventory
        .iter()
        .find(|e| e.path == "template/tmpl/3/301")
        .expect("listed");
    assert!(entry.complete, "{entry:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_nfs_server_fails_the_job_not_the_agent() {
    let _serial = NFS_LOCK.lock().await;
    let nfs = ganesha();
    let tmp = temp("hung");
    let data = qcow2(&tmp.join("img"), 16);
    let http = HttpFixture::start().expect("http fixture");
    // Paced, so the job is still running when the server stops answering.
    http.route(
        "/slow.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: Some(Duration::from_millis(100)),
            faults: Faults::default(),
            ranges: true,
        },
    );
    http.file("/local.qcow2", data.clone());
    let opts = StoreOptions {
        op_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    let store = nfs.open(opts).await;
    let settings = DownloadSettings {
        retries: 1,
        backoff: Duration::from_millis(100),
        ..DownloadSettings::default()
    };
    let dl = downloader(store.clone(), &tmp.join("state"), settings.clone());

    let live = Arc::new(LiveProgress::default());
    let job_live = live.clone();
    let url = http.url("/slow.qcow2");
    let job = tokio::spawn(async move {
        let mut record = JobRecord::new("nfs-hung", spec(url, "template/tmpl/3/302", None), "nfs");
        let state = dl.run(&mut record, &job_live, &CancellationToken::new()).await;
        (state, record)
    });
    let started = Instant::now();
    while live.bytes.load(Ordering::Relaxed) < 2 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "job made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let paused = nfs.paused();
    let stopped_at = Instant::now();
    // Meanwhile the agent keeps working: a job on another (local) store completes.
    let local_root = tmp.join("local-store");
    std::fs::create_dir_all(&local_root).expect("local store dir");
    let local = Store::open(&StoreUrl::Local(local_root), StoreOptions::default())
        .await
        .expect("local store");
    let other = downloader(local, &tmp.join("state-local"), settings);
    let mut record = JobRecord::new(
        "local",
        spec(http.url("/local.qcow2"), "template/tmpl/3/303", None),
        "file",
    );
    assert_eq!(
        other
            .run(&mut record, &LiveProgress::default(), &CancellationToken::new())
            .await,
        JobState::Completed
    );

    let (state, record) = tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .expect("job ended")
        .expect("join");
    assert_eq!(state, JobState::Failed);
    let error = record.error.expect("a reason");
    assert!(
        error.contains("secondary storage") && error.contains("timed out"),
        "{error}"
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(25),
        "took {:?}",
        stopped_at.elapsed()
    );
    assert!(!store.health().is_healthy(), "{:?}", store.health());

    drop(paused);
    // Back: the next call succeeds and the store is healthy again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if store.capacity().await.is_ok() && store.health().is_healthy() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "store did not recover: {:?}",
            store.health()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
