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
        peers: ssvm_agent::peer::Peers::none(),
    }
}

fn spec(url: String, path: &str, checksum: Option<String>) -> DownloadSpec {
    DownloadSpec {
        url,
        path: path.into(),
        format: "QCOW2".into(),
        checksum,
        description: "e2e".into(),
        upload: false,
        resumable: false,
        expires: 0,
        peer: None,
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

/// Polls `f` until it returns `Some`, for at most `within`.
async fn eventually<T>(within: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ganesha_restart_mid_download_is_detected_and_the_install_verified() {
    let _serial = NFS_LOCK.lock().await;
    let nfs = crate::nfs::RestartableGanesha::start("restart-job");
    let tmp = temp("restart-job");
    let data = qcow2(&tmp.join("img"), 16);
    let http = HttpFixture::start().expect("http fixture");
    // About 6 s in all: the server restarts while the job writes.
    http.route(
        "/paced.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: Some(Duration::from_millis(100)),
            faults: Faults::default(),
            ranges: true,
        },
    );
    let opts = StoreOptions {
        op_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    let store = nfs.open(opts).await;
    let settings = DownloadSettings {
        retries: 8,
        backoff: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        checkpoint_interval: Duration::from_millis(300),
        ..DownloadSettings::default()
    };
    let dl = downloader(store.clone(), &tmp.join("state"), settings);
    let live = Arc::new(LiveProgress::default());
    let job_live = live.clone();
    let sum = format!("{{SHA-256}}{}", hex::encode(Sha256::digest(&data)));
    let url = http.url("/paced.qcow2");
    let nfs_url = nfs.url.clone();
    let job = tokio::spawn(async move {
        let mut record = JobRecord::new(
            "nfs-restart",
            spec(url, "template/tmpl/3/311", Some(sum)),
            &nfs_url,
        );
        let state = dl.run(&mut record, &job_live, &CancellationToken::new()).await;
        (state, record)
    });
    let started = Instant::now();
    while live.bytes.load(Ordering::Relaxed) < 5 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "job made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = live.bytes.load(Ordering::Relaxed);
    nfs.restart();
    let (state, record) = tokio::time::timeout(Duration::from_secs(120), job)
        .await
        .expect("job ended")
        .expect("join");
    match state {
        JobState::Completed => {
            // Detected: the job had to go back to its last good checkpoint (or start over).
            assert!(
                record.resumes >= 1 || http.requests("/paced.qcow2").len() > 1,
                "the restart at {at} bytes went unnoticed: {record:?}"
            );
            let installed = record.installed.expect("installed");
            // Read the installed file back through NFS and from the export: the bytes served.
            let (file, size) = store.open_file(&installed.file).await.expect("installed file");
            assert_eq!(size, data.len() as u64);
            let back = store.read_at(&file, 0, data.len()).await.expect("read back");
            assert_eq!(
                hex::encode(Sha256::digest(&back)),
                hex::encode(Sha256::digest(&data))
            );
            assert_eq!(installed.installed_sha256, hex::encode(Sha256::digest(&data)));
            let on_disk = std::fs::read(nfs.dir.join(&installed.file)).expect("on the export");
            assert!(on_disk == data, "installed file differs from the download");
        }
        JobState::Failed => {
            // Failing is acceptable only cleanly: with the reason, and nothing that looks installed.
            let error = record.error.expect("a reason");
            assert!(error.contains("secondary storage"), "{error}");
            assert!(!nfs.dir.join("template/tmpl/3/311/template.properties").exists());
        }
        other => panic!("job ended {other:?}: {:?}", record.error),
    }
}

/// An agent (the job runner) on `store`, its journal on the store under `id`.
async fn agent_on(store: &Store, id: &str, settings: DownloadSettings) -> Arc<ssvm_agent::service::Agent> {
    let allow: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().expect("cidr")];
    let downloader = Downloader {
        http: fetch::client(&FetchConfig {
            allow_internal: allow.clone(),
            ..FetchConfig::default()
        })
        .expect("client"),
        store: store.clone(),
        journal: Journal::on_store(store, id).await.expect("journal on the store"),
        settings,
        allow_internal: Arc::new(allow),
        peers: ssvm_agent::peer::Peers::none(),
    };
    ssvm_agent::service::Agent::new(downloader, 2)
}

fn fenced_submit(id: &str, url: String, path: &str, epoch: u64) -> ssvm_agent::service::Submit {
    ssvm_agent::service::Submit {
        id: Some(id.into()),
        url,
        path: path.into(),
        format: "QCOW2".into(),
        checksum: None,
        description: "fenced".into(),
        epoch,
        peer: None,
    }
}

async fn wait_final(agent: &ssvm_agent::service::Agent, id: &str) -> JobRecord {
    eventually(Duration::from_secs(60), "job ended", async || {
        agent
            .status(id)
            .await
            .expect("status")
            .filter(|r| r.state.is_final())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_ganesha_the_older_epoch_stops_and_a_delete_stays_deleted() {
    let _serial = NFS_LOCK.lock().await;
    let nfs = ganesha();
    let tmp = temp("fencing");
    let data = qcow2(&tmp.join("img"), 8);
    let http = HttpFixture::start().expect("http fixture");
    http.route(
        "/slow.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: Some(Duration::from_millis(100)),
            faults: Faults::default(),
            ranges: true,
        },
    );
    http.file("/fast.qcow2", data.clone());
    let _ = std::fs::remove_dir_all(nfs.dir.join("template/tmpl/4"));
    let settings = DownloadSettings {
        retries: 2,
        backoff: Duration::from_millis(100),
        checkpoint_interval: Duration::from_millis(200),
        ..DownloadSettings::default()
    };
    let store = nfs.open(StoreOptions::default()).await;
    let old = agent_on(&store, "e2e-fence-old", settings.clone()).await;
    let new = agent_on(
        &nfs.open(StoreOptions::default()).await,
        "e2e-fence-new",
        settings,
    )
    .await;

    // Epoch 1 runs on one agent; core sends the download again (epoch 2) to the other.
    let path = "template/tmpl/4/401";
    old.submit(fenced_submit("t401", http.url("/slow.qcow2"), path, 1))
        .await
        .expect("submit");
    eventually(Duration::from_secs(20), "old run writing", async || {
        let r = old.status("t401").await.expect("status")?;
        (r.progress.bytes > 1 << 20).then_some(())
    })
    .await;
    new.submit(fenced_submit("t401", http.url("/fast.qcow2"), path, 2))
        .await
        .expect("submit");
    let newer = wait_final(&new, "t401").await;
    let older = wait_final(&old, "t401").await;
    assert_eq!(newer.state, JobState::Completed, "{newer:?}");
    assert_eq!(older.state, JobState::Failed, "{older:?}");
    assert_eq!(older.error.as_deref(), Some(ssvm_agent::fence::FENCED));
    let installed = newer.installed.expect("installed");
    let dir = nfs.dir.join(path);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("install dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    let image = installed.file.rsplit('/').next().expect("name").to_owned();
    assert_eq!(
        names,
        [
            ".ssvm-epoch.2".to_owned(),
            image,
            "template.properties".to_owned()
        ]
    );
    let on_disk = std::fs::read(nfs.dir.join(&installed.file)).expect("installed file");
    assert!(on_disk == data, "the newer install is intact");
    let inventory = ssvm_agent::inventory::scan(&store).await.expect("inventory");
    let entry = inventory.iter().find(|e| e.path == path).expect("listed");
    assert!(entry.complete, "{entry:?}");

    // A delete (epoch 4, through the other agent) while a download of epoch 3 runs: the run stops
    // at its next check and nothing comes back.
    let path = "template/tmpl/4/402";
    old.submit(fenced_submit("t402", http.url("/slow.qcow2"), path, 3))
        .await
        .expect("submit");
    eventually(Duration::from_secs(20), "run writing", async || {
        let r = old.status("t402").await.expect("status")?;
        (r.progress.bytes > 1 << 20).then_some(())
    })
    .await;
    new.delete_install(path, 4).await.expect("delete");
    let stopped = wait_final(&old, "t402").await;
    assert_eq!(stopped.state, JobState::Failed, "{stopped:?}");
    assert_eq!(stopped.error.as_deref(), Some(ssvm_agent::fence::FENCED));
    // Past the run's retries and checkpoints: still nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!nfs.dir.join(path).exists(), "the deleted install came back");
    assert!(
        ssvm_agent::inventory::scan(&store)
            .await
            .expect("inventory")
            .iter()
            .all(|e| e.path != path)
    );
}

/// A binary of the workspace, built beside this test executable (`target/debug`).
fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{} missing: cargo build --workspace --bins",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_space_fails_the_job_cleanly_and_the_agent_goes_on() {
    let tmp = temp("no-space");
    let store_dir = tmp.join("store");
    std::fs::create_dir_all(&store_dir).expect("store dir");
    // A 12 MiB image into a store where no file may pass 4 MiB (RLIMIT_FSIZE on the agent: the
    // write that passes it fails with EFBIG, as a full file system fails with ENOSPC).
    let big: Vec<u8> = systemvm_tests::images::noise(12 << 20, 77);
    let small: Vec<u8> = systemvm_tests::images::noise(1 << 20, 78);
    let http = HttpFixture::start().expect("http fixture");
    http.file("/big.img", big);
    http.file("/small.img", small.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(
        std::process::Command::new("prlimit")
            .arg(format!("--fsize={}", 4 << 20))
            .arg("--")
            .arg(workspace_bin("ssvm-agent"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store"])
            .arg(format!("file://{}", store_dir.display()))
            .args(["--allow-internal", "127.0.0.0/8", "--agent-id", "e2e-no-space"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("prlimit (util-linux) and the agent"),
    );
    let api = format!("http://127.0.0.1:{port}");
    let c = fetch::client(&FetchConfig {
        allow_internal: vec!["127.0.0.0/8".parse().expect("cidr")],
        ..FetchConfig::default()
    })
    .expect("client");
    crate::support::wait_port(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        Duration::from_secs(20),
        "the agent's API",
    );
    let job = |id: &str, url: String, path: &str| serde_json::json!({ "id": id, "url": url, "path": path, "format": "RAW" });
    let status = async |id: &str| -> serde_json::Value {
        c.get(format!("{api}/jobs/{id}"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json")
    };
    let r = c
        .post(format!("{api}/jobs"))
        .json(&job("big", http.url("/big.img"), "template/tmpl/5/501"))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 201);
    let failed = eventually(Duration::from_secs(60), "the big job ended", async || {
        let s = status("big").await;
        (s["state"] != "queued" && s["state"] != "running").then_some(s)
    })
    .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().expect("error").to_owned();
    assert!(error.contains("no space"), "{error}");
    assert!(!error.contains("retries"), "not retried: {error}");
    // Nothing looks installed: no properties, no image, no partial file.
    let dir = store_dir.join("template/tmpl/5/501");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .filter(|n| !ssvm_agent::fence::is_fence_file(n))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // The agent is alive and healthy, and the next job installs.
    assert!(child.0.try_wait().expect("try_wait").is_none(), "the agent died");
    let r = c
        .post(format!("{api}/jobs"))
        .json(&job("small", http.url("/small.img"), "template/tmpl/5/502"))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 201);
    let done = eventually(Duration::from_secs(60), "the small job ended", async || {
        let s = status("small").await;
        (s["state"] != "queued" && s["state"] != "running").then_some(s)
    })
    .await;
    assert_eq!(done["state"], "completed", "{done}");
    let installed =
        std::fs::read(store_dir.join(done["installed"]["file"].as_str().expect("file"))).expect("installed");
    assert!(installed == small);
    let health: serde_json::Value = c
        .get(format!("{api}/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["state"], "healthy", "{health}");
    // The journal is on the store by default (no --state-dir).
    assert!(
        store_dir
            .join(".ssvm-journal/e2e-no-space/jobs/small.json")
            .is_file()
    );
    assert!(child.0.try_wait().expect("try_wait").is_none(), "the agent died");
}
