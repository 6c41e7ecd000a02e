//! Smoke test of `ssvm-agent serve --core … --vm-id … --secret … --ca …` (the real binary) against
//! a minimal stand-in for core's agent endpoint: the agent verifies the endpoint against the given
//! CA, says Hello as a storage VM and reports its jobs and store health in heartbeats, and applies
//! core's settings at runtime. The real core is exercised in `tests/e2e/agents.rs`.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use systemvm_proto::agent::{
    AgentCommand, AgentMessage, AgentRole, Command as AgentCmd, ConfigUpdate, CoreMessage, DownloadCommand,
    ImageRef, IncrementalFrom, JobPhase, JobProgress, RestoreCommand, SnapshotBackedUp, SnapshotCommand,
    Welcome, config_keys,
};
use systemvm_tests::http::HttpFixture;
use systemvm_tests::standin_core::{AgentConn, StandinCore};

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary in `serve --core` mode against the stand-in at `core_url`, with no
/// `--allow-internal`.
fn serve(dir: &std::path::Path, store: &std::path::Path, core_url: &str, ca: &std::path::Path) -> Kill {
    Kill(
        Command::new(env!("CARGO_BIN_EXE_ssvm-agent"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("file://{}", store.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args([
                "--core", core_url, "--vm-id", "ssvm-1", "--secret", "s3cret", "--ca",
            ])
            .arg(ca)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Core's `Welcome` of protocol `version` with agent settings `config` (heartbeats every second).
fn welcome(version: u32, config: std::collections::BTreeMap<String, String>) -> CoreMessage {
    CoreMessage::Welcome(Welcome {
        version,
        heartbeat_interval_secs: 1,
        console_keys: None,
        config,
        transfer_keys: None,
        certificate: None,
        peer_identity: None,
    })
}

/// Sends a download command and waits for the job's final progress (heartbeats skipped).
async fn download(ws: &mut AgentConn, store: &std::path::Path, job_id: &str, url: &str) -> JobProgress {
    let command = AgentCmd::new(
        format!("cmd-{job_id}"),
        &AgentCommand::Download(DownloadCommand {
            job_id: job_id.into(),
            store_url: format!("file://{}", store.display()),
            url: url.into(),
            path: format!("template/tmpl/2/{job_id}"),
            format: "RAW".into(),
            checksum: None,
            description: String::new(),
            epoch: 1,
            peer: None,
        }),
    );
    ws.send(&CoreMessage::Command(command)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "job {job_id} never ended");
        match ws.recv(Duration::from_secs(10)).await.unwrap() {
            AgentMessage::Answer(a) => {
                assert!(a.ok, "download refused: {a:?}");
                let p: JobProgress = serde_json::from_value(a.body).unwrap();
                if p.state
                    .is_some_and(|s| !matches!(s, JobPhase::Queued | JobPhase::Running))
                {
                    return p;
                }
            }
            AgentMessage::JobProgress(p)
                if p.id == job_id
                    && p.state
                        .is_some_and(|s| !matches!(s, JobPhase::Queued | JobPhase::Running)) =>
            {
                return p;
            }
            _ => {}
        }
    }
}

fn refused(p: &JobProgress) -> bool {
    p.state == Some(JobPhase::Failed) && p.error.as_deref().is_some_and(|e| e.contains("internal address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_update_from_core_changes_the_internal_sites_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let http = HttpFixture::start().unwrap();
    http.file("/disk.img", systemvm_tests::images::noise(1 << 20, 7));
    let by_ip = http.url("/disk.img");
    let by_name = format!("http://localhost:{}/disk.img", http.addr.port());

    let core = StandinCore::start(dir.path()).await.unwrap();
    let _agent = serve(dir.path(), &store, &core.url("localhost"), &core.ca_pem);
    let (mut ws, _) = core
        .accept(Duration::from_secs(20))
        .await
        .expect("the agent did not dial in");
    ws.send(&welcome(
        2,
        [(config_keys::MAX_TEMPLATE_SIZE_GB.to_owned(), "1".to_owned())].into(),
    ))
    .await
    .unwrap();

    // Loopback is internal: refused, by address (literal-IP check) and by name (resolver).
    let p = download(&mut ws, &store, "t1", &by_ip).await;
    assert!(refused(&p), "{p:?}");
    let p = download(&mut ws, &store, "t2", &by_name).await;
    assert!(refused(&p), "{p:?}");
    assert!(
        http.requests("/disk.img").is_empty(),
        "a refused download reached the server"
    );

    // Core allows loopback: the same agent process now downloads from it, both ways.
    let allow = [(
        config_keys::ALLOWED_INTERNAL_SITES.to_owned(),
        "127.0.0.0/8, not-a-cidr".to_owned(),
    )];
    ws.send(&CoreMessage::ConfigUpdate(ConfigUpdate { config: allow.into() }))
        .await
        .unwrap();
    for (job, url) in [("t3", &by_ip), ("t4", &by_name)] {
        let p = download(&mut ws, &store, job, url).await;
        assert_eq!(p.state, Some(JobPhase::Completed), "{p:?}");
        let installed = p.installed.expect("installed image");
        assert_eq!(installed.physical_size, 1 << 20);
        assert!(
            installed.file.starts_with(&format!("template/tmpl/2/{job}/")),
            "{installed:?}"
        );
        assert!(store.join(&installed.file).is_file(), "{installed:?}");
    }
    let served = http.requests("/disk.img").len();
    assert!(served >= 2, "{served}");

    // The next update lacks the key: the command line (no internal site) is back.
    ws.send(&CoreMessage::ConfigUpdate(ConfigUpdate {
        config: Default::default(),
    }))
    .await
    .unwrap();
    let p = download(&mut ws, &store, "t5", &by_ip).await;
    assert!(refused(&p), "{p:?}");
    assert_eq!(http.requests("/disk.img").len(), served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_core_reports_storage_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();

    let core = StandinCore::start(dir.path()).await.unwrap();

    let _agent = Kill(
        Command::new(env!("CARGO_BIN_EXE_ssvm-agent"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("file://{}", store.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args([
                "--core",
                // An unreachable first core, then the stand-in: the agent tries each in turn.
                "wss://localhost:1/agent",
                "--core",
                &core.url("localhost"),
                "--vm-id",
                "ssvm-1",
                "--secret",
                "s3cret",
                "--ca",
            ])
            .arg(&core.ca_pem)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let (mut ws, hello) = core
        .accept(Duration::from_secs(20))
        .await
        .expect("the agent did not dial in");
    assert_eq!(hello.role, AgentRole::SecStorage);
    assert_eq!(hello.vm_id, "ssvm-1");
    assert_eq!(hello.secret.expose(), "s3cret");
    ws.send(&welcome(1, Default::default())).await.unwrap();
    let mut last = None;
    for _ in 0..6 {
        let AgentMessage::Heartbeat(hb) = ws.recv(Duration::from_secs(5)).await.unwrap() else {
            panic!("expected a heartbeat")
        };
        let storage = hb.load.storage.expect("storage load");
        if storage.store_health == "ok" {
            assert_eq!(storage.jobs_running, 0);
            assert!(storage.capacity_total.is_some_and(|t| t > 0), "{storage:?}");
            last = None;
            break;
        }
        last = Some(storage);
    }
    assert!(last.is_none(), "store never reported healthy: {last:?}");

    // The stand-in stops reading (so it answers no ping) but keeps the socket open, as a hung
    // host would: the agent gives up on it and dials again.
    let started = std::time::Instant::now();
    let again = core.accept(Duration::from_secs(30)).await;
    assert!(again.is_ok(), "the agent kept talking to a silent core");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "reconnected too early: {:?}",
        started.elapsed()
    );
    drop(ws);
}

/// Sends a command and returns its answer (heartbeats and progress skipped).
async fn answer_of(ws: &mut AgentConn, id: &str, command: &AgentCommand) -> systemvm_proto::agent::Answer {
    ws.send(&CoreMessage::Command(AgentCmd::new(id.to_owned(), command)))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "no answer to {id}");
        if let AgentMessage::Answer(a) = ws.recv(Duration::from_secs(30)).await.unwrap()
            && a.id == id
        {
            return a;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_backups_run_as_core_commands() {
    use systemvm_tests::nbd::{QemuNbd, run};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("256M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 4M 3M"])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x6b 100M 1M"])
        .arg(&img));
    let nbd = QemuNbd::serve(&img);

    let core = StandinCore::start(dir.path()).await.unwrap();
    let _agent = serve(dir.path(), &store, &core.url("localhost"), &core.ca_pem);
    let (mut ws, _) = core
        .accept(Duration::from_secs(20))
        .await
        .expect("the agent did not dial in");
    ws.send(&welcome(2, Default::default())).await.unwrap();
    let store_url = format!("file://{}", store.display());
    let command = |name: &str, dir: &str, incremental: Option<IncrementalFrom>| {
        AgentCommand::SnapshotBackup(SnapshotCommand {
            store_url: store_url.clone(),
            nbd: nbd.addr.clone(),
            export: "vda".into(),
            dir: dir.into(),
            name: name.into(),
            incremental,
            file: None,
            max_rate: None,
        })
    };
    let inc = || IncrementalFrom {
        context: "qemu:dirty-bitmap:b0".into(),
        backing: "s1.qcow2".into(),
    };

    // An incremental before its predecessor exists: refused with the reason, nothing written.
    let a = answer_of(&mut ws, "c0", &command("s2.qcow2", "snapshots/2/v1", Some(inc()))).await;
    assert!(
        !a.ok
            && a.error
                .as_deref()
                .unwrap_or_default()
                .contains("previous snapshot"),
        "{a:?}"
    );
    let full = answer_of(&mut ws, "c1", &command("s1.qcow2", "snapshots/2/v1", None)).await;
    assert!(full.ok, "{full:?}");
    let full: SnapshotBackedUp = serde_json::from_value(full.body).unwrap();
    assert_eq!(full.bytes_read, 4 << 20, "{full:?}");
    assert_eq!(full.file, "snapshots/2/v1/s1.qcow2");
    let incr = answer_of(&mut ws, "c2", &command("s2.qcow2", "snapshots/2/v1", Some(inc()))).await;
    assert!(incr.ok, "{incr:?}");
    let incr: SnapshotBackedUp = serde_json::from_value(incr.body).unwrap();
    assert_eq!(incr.bytes_read, 1 << 20, "{incr:?}");
    run(Command::new("qemu-img")
        .arg("compare")
        .arg(store.join(&incr.file))
        .arg(&img));

    // Restores: the chain flattened into a raw file and a self-contained qcow2, both the disk.
    let image = |path: &str, format: &str| ImageRef {
        store_url: store_url.clone(),
        path: path.into(),
        format: format.into(),
    };
    let restore = |from: ImageRef, to: ImageRef| {
        AgentCommand::SnapshotRestore(RestoreCommand {
            from,
            to,
            template: None,
        })
    };
    for (id, to) in [
        ("r1", image("restored/v.raw", "RAW")),
        ("r2", image("restored/v.qcow2", "QCOW2")),
    ] {
        let a = answer_of(&mut ws, id, &restore(image(&incr.file, "QCOW2"), to.clone())).await;
        assert!(a.ok, "{id}: {a:?}");
        let done: SnapshotBackedUp = serde_json::from_value(a.body).unwrap();
        assert_eq!(done.virtual_size, 256 << 20);
        assert!(done.bytes_read <= full.bytes_read + incr.bytes_read && done.bytes_read >= incr.bytes_read);
        let written = store.join(&to.path);
        assert_eq!(
            done.sha256,
            sha256_of(&written),
            "{id}: the answered hash is the file's"
        );
        run(Command::new("qemu-img")
            .args(["compare", "-f", &to.format.to_lowercase(), "-F", "qcow2"])
            .arg(&written)
            .arg(&img));
        assert!(!store.join(format!("{}.part", to.path)).exists());
    }
    run(Command::new("qemu-img")
        .arg("check")
        .arg(store.join("restored/v.qcow2")));
    // A template from the snapshot (createTemplate): the image, then its template.properties,
    // which the store's inventory reads as a complete install.
    let tmpl = |path: &str, id: &str| {
        AgentCommand::SnapshotRestore(RestoreCommand {
            from: image(&incr.file, "QCOW2"),
            to: image(path, "QCOW2"),
            template: Some(systemvm_proto::agent::TemplateInstall {
                id: id.into(),
                description: "from a snapshot".into(),
                public: false,
            }),
        })
    };
    let a = answer_of(&mut ws, "t1", &tmpl("template/tmpl/2/t-1/t-1.qcow2", "t-1")).await;
    assert!(a.ok, "{a:?}");
    let t1: SnapshotBackedUp = serde_json::from_value(a.body).unwrap();
    let props = std::fs::read_to_string(store.join("template/tmpl/2/t-1/template.properties")).unwrap();
    let props = ssvm_agent::properties::TemplateProperties::from_java_properties(&props).unwrap();
    assert_eq!(
        (
            props.id.as_str(),
            props.filename.as_str(),
            props.size,
            props.virtual_size
        ),
        ("t-1", "t-1.qcow2", t1.physical_size, 256 << 20)
    );
    assert_eq!(props.checksum.map(|c| c.hex), Some(t1.sha256.clone()));
    run(Command::new("qemu-img")
        .args(["compare", "-F", "qcow2"])
        .arg(store.join("template/tmpl/2/t-1/t-1.qcow2"))
        .arg(&img));
    // Anywhere else, or under another template's id: refused before anything is written.
    for (id, path) in [
        ("t2", "restored/t-2.qcow2"),
        ("t3", "template/tmpl/2/t-9/t-3.qcow2"),
    ] {
        let a = answer_of(&mut ws, id, &tmpl(path, "t-3")).await;
        assert!(
            !a.ok && a.error.as_deref().unwrap_or("").contains("template/tmpl"),
            "{a:?}"
        );
        assert!(!store.join(path).exists());
    }
    // A qcow2 file backed up as a volume no guest runs: its data clusters only.
    let mut from_file = command("f1.qcow2", "snapshots/2/v2", None);
    if let AgentCommand::SnapshotBackup(c) = &mut from_file {
        c.file = Some(image("restored/v.qcow2", "QCOW2"));
    }
    let a = answer_of(&mut ws, "f1", &from_file).await;
    assert!(a.ok, "{a:?}");
    let f1: SnapshotBackedUp = serde_json::from_value(a.body).unwrap();
    assert!(f1.bytes_read <= 5 << 20, "{f1:?}");
    run(Command::new("qemu-img")
        .arg("compare")
        .arg(store.join(&f1.file))
        .arg(&img));

    // Chains qemu-img made: a raw base under a 2 MiB-cluster qcow2 under a 64 KiB one, restored.
    let vols = store.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(vols.join("base.raw"))
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 8M"])
        .arg(vols.join("base.raw")));
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "-F",
            "raw",
            "-b",
            "base.raw",
        ])
        .arg(vols.join("mid.qcow2")));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x22 1M 3M", "-c", "write -z 6M 1M"])
        .arg(vols.join("mid.qcow2")));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(vols.join("mid.qcow2"))
        .arg(vols.join("top.qcow2")));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 2M 64k",
            "-c",
            "write -P 0x44 40M 1M",
        ])
        .arg(vols.join("top.qcow2")));
    let a = answer_of(
        &mut ws,
        "r3",
        &restore(image("vols/top.qcow2", "QCOW2"), image("restored/top.raw", "RAW")),
    )
    .await;
    assert!(a.ok, "{a:?}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(store.join("restored/top.raw"))
        .arg(vols.join("top.qcow2")));
    // A chain that leaves its directory, and a missing image: refused, nothing written.
    let a = answer_of(
        &mut ws,
        "r4",
        &restore(image("vols/../x", "QCOW2"), image("restored/x.raw", "RAW")),
    )
    .await;
    assert!(!a.ok);
    let a = answer_of(
        &mut ws,
        "r5",
        &restore(image("vols/none.qcow2", "QCOW2"), image("restored/y.raw", "RAW")),
    )
    .await;
    assert!(!a.ok && !store.join("restored/y.raw").exists(), "{a:?}");

    // Deleting an image: removed once, then nothing to remove.
    let del = AgentCommand::DeleteSnapshot {
        store_url: store_url.clone(),
        path: f1.file.clone(),
    };
    let a = answer_of(&mut ws, "d1", &del).await;
    assert_eq!(a.body["removed"], true, "{a:?}");
    assert!(
        !store.join("snapshots/2/v2").exists(),
        "the emptied volume directory stays"
    );
    assert_eq!(answer_of(&mut ws, "d2", &del).await.body["removed"], false);
    let outside = AgentCommand::DeleteSnapshot {
        store_url: store_url.clone(),
        path: "restored/v.raw".into(),
    };
    assert!(!answer_of(&mut ws, "d3", &outside).await.ok);

    // Paths outside snapshots/ and another store are refused.
    for (id, c) in [
        ("c3", command("x.qcow2", "template/tmpl/2", None)),
        ("c4", command("x.qcow2", "snapshots/../etc", None)),
        ("c5", command("../x.qcow2", "snapshots/2/v1", None)),
    ] {
        let a = answer_of(&mut ws, id, &c).await;
        assert!(!a.ok, "{id}: {a:?}");
    }
    let mut other = command("y.qcow2", "snapshots/2/v1", None);
    if let AgentCommand::SnapshotBackup(c) = &mut other {
        c.store_url = "nfs://elsewhere/export".into();
    }
    assert!(!answer_of(&mut ws, "c6", &other).await.ok);
    assert!(!store.join("snapshots/2/v1/y.qcow2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_as_core_commands() {
    use systemvm_proto::agent::{ObjectTarget, ReplicateCommand, Replicated, S3Target};
    use systemvm_tests::objects::{ACCESS_KEY, S3sFs, SECRET_KEY, boto3_read};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tmpl = store.join("template/tmpl/2/201");
    std::fs::create_dir_all(&tmpl).unwrap();
    let data = systemvm_tests::images::noise(70 << 20, 5);
    std::fs::write(tmpl.join("t.qcow2"), &data).unwrap();
    let sum = sha256_of(&tmpl.join("t.qcow2"));
    let s3 = S3sFs::start(&dir.path().join("s3"));
    s3.bucket("replicas");

    let core = StandinCore::start(dir.path()).await.unwrap();
    let _agent = serve(dir.path(), &store, &core.url("localhost"), &core.ca_pem);
    let (mut ws, _) = core
        .accept(Duration::from_secs(20))
        .await
        .expect("the agent did not dial in");
    ws.send(&welcome(2, Default::default())).await.unwrap();
    let command = |path: &str, sha256: &str| {
        AgentCommand::Replicate(ReplicateCommand {
            store_url: format!("file://{}", store.display()),
            path: path.into(),
            sha256: sha256.into(),
            key: "template/201/t.qcow2".into(),
            target: ObjectTarget::S3(S3Target {
                endpoint: s3.endpoint.clone(),
                region: "us-east-1".into(),
                bucket: "replicas".into(),
                access_key: ACCESS_KEY.into(),
                secret_key: SECRET_KEY.into(),
                path_style: true,
                ca_pem: None,
            }),
        })
    };
    // 70 MiB is above the 64 MiB cutoff: five 16 MiB parts.
    let a = answer_of(&mut ws, "r1", &command("template/tmpl/2/201/t.qcow2", &sum)).await;
    assert!(a.ok, "{a:?}");
    let r: Replicated = serde_json::from_value(a.body.clone()).unwrap();
    assert_eq!(
        (r.size, r.parts, r.bytes_sent),
        (data.len() as u64, 5, data.len() as u64),
        "{r:?}"
    );
    assert_eq!(
        boto3_read(&s3.endpoint, "replicas", "template/201/t.qcow2"),
        Some((data.len() as u64, sum.clone(), Some(sum.clone())))
    );
    // Not an artefact, no checksum, a wrong checksum: refused, with the reason.
    for (id, path, sha) in [
        ("r2", ".ssvm-journal/x", sum.as_str()),
        ("r3", "template/../../etc/passwd", sum.as_str()),
        ("r4", "template/tmpl/2/201/t.qcow2", ""),
    ] {
        let a = answer_of(&mut ws, id, &command(path, sha)).await;
        assert!(!a.ok, "{id}: {a:?}");
    }
    let a = answer_of(
        &mut ws,
        "r5",
        &command("template/tmpl/2/201/t.qcow2", &"0".repeat(64)),
    )
    .await;
    assert!(!a.ok && format!("{a:?}").contains("SHA-256"), "{a:?}");
    assert!(!format!("{a:?}").contains(SECRET_KEY));
}

/// SHA-256 of a file (hex).
fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read the written file"),
    ))
}
