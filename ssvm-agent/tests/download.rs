//! Registering templates from URLs, end to end: a real HTTP server (scripted), real images made with
//! `qemu-img`/`genisoimage`, real compressors, a local directory store, and the real binary for the
//! kill-and-resume case.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use ssvm_agent::download::{DownloadSettings, Downloader, LiveProgress};
use ssvm_agent::fetch::{self, FetchConfig};
use ssvm_agent::job::{DownloadSpec, JobRecord, JobState, Journal};
use ssvm_agent::store::{Store, StoreOptions, StoreUrl};
use systemvm_tests::http::{Faults, HttpFixture, Route};
use tokio_util::sync::CancellationToken;

/// Test images, made once per test binary.
struct Images {
    dir: PathBuf,
}

impl Images {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e} (run scripts/deps.sh test)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        // One directory under the target dir, replaced by every run (a static is never dropped,
        // so a per-process directory in /tmp would stay behind after each run).
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ssvm-images");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A 24 MiB qcow2 of noise: big enough to interrupt.
        systemvm_tests::images::qcow2_of_noise(&dir, "big.qcow2", 24, 0x2545_f491_4f6c_dd1d).unwrap();
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(dir.join("small.qcow2"))
            .arg("64M"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(dir.join("small.qcow2"))
            .arg(dir.join("child.qcow2")));
        std::fs::create_dir_all(dir.join("iso-root")).unwrap();
        std::fs::write(dir.join("iso-root/README.TXT"), b"install media\n").unwrap();
        run(Command::new("genisoimage")
            .args(["-quiet", "-R", "-J", "-V", "TESTISO", "-o"])
            .arg(dir.join("test.iso"))
            .arg(dir.join("iso-root")));
        for (tool, args, ext) in [
            ("gzip", vec!["-k", "-1"], "gz"),
            ("bzip2", vec!["-k", "-1"], "bz2"),
            ("xz", vec!["-k", "-0", "-T1"], "xz"),
            ("zstd", vec!["-q", "-k", "-1"], "zst"),
        ] {
            run(Command::new(tool).args(&args).arg(dir.join("big.qcow2")));
            assert!(dir.join(format!("big.qcow2.{ext}")).is_file());
        }
        run(Command::new("zip")
            .current_dir(&dir)
            .args(["-q", "-1", "big.qcow2.zip", "big.qcow2"]));
        Images { dir }
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct Env {
    http: HttpFixture,
    store_dir: PathBuf,
    downloader: Downloader,
}

async fn env(name: &str, settings: DownloadSettings, allow_loopback: bool) -> Env {
    let root = std::env::temp_dir().join(format!("ssvm-dl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let store_dir = root.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let store = Store::open(&StoreUrl::Local(store_dir.clone()), StoreOptions::default())
        .await
        .unwrap();
    let allow: Vec<ipnet::IpNet> = if allow_loopback {
        vec!["127.0.0.0/8".parse().unwrap()]
    } else {
        vec![]
    };
    let http = fetch::client(&FetchConfig {
        allow_internal: allow.clone(),
        ..FetchConfig::default()
    })
    .unwrap();
    let downloader = Downloader {
        http,
        store,
        journal: Journal::open(&root.join("state")).unwrap(),
        settings,
        allow_internal: Arc::new(allow),
        peers: ssvm_agent::peer::Peers::none(),
    };
    Env {
        http: HttpFixture::start().unwrap(),
        store_dir,
        downloader,
    }
}

fn quick() -> DownloadSettings {
    DownloadSettings {
        stall_timeout: Duration::from_secs(2),
        retries: 2,
        backoff: Duration::from_millis(100),
        ..DownloadSettings::default()
    }
}

fn spec(url: String, format: &str, checksum: Option<String>) -> DownloadSpec {
    DownloadSpec {
        url,
        path: "template/tmpl/2/201".into(),
        format: format.into(),
        checksum,
        description: String::new(),
        upload: false,
        resumable: false,
        expires: 0,
        peer: None,
    }
}

async fn register(env: &Env, id: &str, spec: DownloadSpec) -> JobRecord {
    let mut record = JobRecord::new(id, spec, "file:///store");
    env.downloader
        .run(&mut record, &LiveProgress::default(), &CancellationToken::new())
        .await;
    record
}

/// Files left in the install directory.
fn installed_files(env: &Env) -> Vec<String> {
    let dir = env.store_dir.join("template/tmpl/2/201");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn properties(env: &Env) -> String {
    std::fs::read_to_string(env.store_dir.join("template/tmpl/2/201/template.properties")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_with_good_checksum_installs_with_properties() {
    let img = images();
    let env = env("good", quick(), true).await;
    let data = img.bytes("big.qcow2");
    env.http.file("/big.qcow2", data.clone());
    let sum = format!("{{SHA-256}}{}", sha256_hex(&data));
    let record = register(
        &env,
        "good",
        spec(env.http.url("/big.qcow2"), "QCOW2", Some(sum.clone())),
    )
    .await;
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    let installed = record.installed.unwrap();
    assert_eq!(installed.format, "QCOW2");
    assert_eq!(installed.virtual_size, 24 << 20);
    assert_eq!(installed.download_checksum, sum);
    assert_eq!(installed.installed_sha256, sha256_hex(&data));
    let on_disk = std::fs::read(env.store_dir.join(&installed.file)).unwrap();
    assert_eq!(sha256_hex(&on_disk), sha256_hex(&data));
    let props = properties(&env);
    for key in [
        "filename=",
        "qcow2=true",
        "virtualsize=25165824",
        "uniquename=",
        "checksum=",
        "id=201",
        "hvm=true",
    ] {
        assert!(props.contains(key), "{key} missing in\n{props}");
    }
    assert_eq!(installed_files(&env).len(), 2, "{:?}", installed_files(&env));

    // An MD5 checksum (no prefix) works too, and the inventory reads the install back.
    let env2 = self::env("md5", quick(), true).await;
    env2.http.file("/small.qcow2", img.bytes("small.qcow2"));
    let md5 = hex::encode(md5::Md5::digest(img.bytes("small.qcow2")));
    let r = register(
        &env2,
        "md5",
        spec(env2.http.url("/small.qcow2"), "qcow2", Some(md5)),
    )
    .await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let inventory = ssvm_agent::inventory::scan(&env2.downloader.store).await.unwrap();
    assert_eq!(inventory.len(), 1);
    assert!(inventory[0].complete, "{inventory:?}");
    assert_eq!(
        inventory[0].properties.get("virtualsize").map(String::as_str),
        Some("67108864")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_nothing_that_looks_installed() {
    let img = images();
    let env = env("refuse", quick(), true).await;
    env.http.file("/big.qcow2", img.bytes("big.qcow2"));
    env.http.file("/child.qcow2", img.bytes("child.qcow2"));

    let wrong = format!("{{SHA-256}}{}", "0".repeat(64));
    let r = register(
        &env,
        "wrong-sum",
        spec(env.http.url("/big.qcow2"), "QCOW2", Some(wrong)),
    )
    .await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("checksum mismatch"),
        "{:?}",
        r.error
    );
    assert!(installed_files(&env).is_empty(), "{:?}", installed_files(&env));

    let r = register(
        &env,
        "wrong-format",
        spec(env.http.url("/big.qcow2"), "ISO", None),
    )
    .await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap().to_lowercase().contains("declared"),
        "{:?}",
        r.error
    );
    assert!(installed_files(&env).is_empty(), "{:?}", installed_files(&env));

    let r = register(&env, "backing", spec(env.http.url("/child.qcow2"), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(r.error.as_deref().unwrap().contains("backing"), "{:?}", r.error);
    assert!(installed_files(&env).is_empty(), "{:?}", installed_files(&env));

    let r = register(&env, "missing", spec(env.http.url("/nope.qcow2"), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(r.error.as_deref().unwrap().contains("404"), "{:?}", r.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_without_an_allow_list() {
    let img = images();
    let env = env("ssrf", quick(), false).await;
    env.http.file("/small.qcow2", img.bytes("small.qcow2"));
    let r = register(
        &env,
        "loopback",
        spec(env.http.url("/small.qcow2"), "QCOW2", None),
    )
    .await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("internal address 127.0.0.1"),
        "{:?}",
        r.error
    );
    let by_name = env.http.url("/small.qcow2").replace("127.0.0.1", "localhost");
    let r = register(&env, "by-name", spec(by_name, "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("internal address"),
        "{:?}",
        r.error
    );
    let r = register(
        &env,
        "metadata",
        spec("http://169.254.169.254/latest/x.qcow2".into(), "QCOW2", None),
    )
    .await;
    assert!(
        r.error.as_deref().unwrap().contains("169.254.169.254"),
        "{:?}",
        r.error
    );
    assert!(
        env.http.requests("/small.qcow2").is_empty(),
        "a request reached the server"
    );

    // With the allow-list, a redirect to an internal address is still checked hop by hop.
    let allowed = self::env("ssrf-redirect", quick(), true).await;
    allowed
        .http
        .route("/jump", Route::Redirect("http://169.254.169.254/x.qcow2".into()));
    let r = register(
        &allowed,
        "redirect",
        spec(allowed.http.url("/jump"), "QCOW2", None),
    )
    .await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("169.254.169.254"),
        "{:?}",
        r.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_compression_and_iso() {
    let img = images();
    let env = env("variants", quick(), true).await;
    let original = img.bytes("big.qcow2");
    env.http.file("/real.qcow2", original.clone());
    env.http.route("/a", Route::Redirect("/b".into()));
    env.http.route("/b", Route::Redirect(env.http.url("/real.qcow2")));
    let r = register(&env, "redirect", spec(env.http.url("/a"), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);

    for ext in ["gz", "bz2", "xz", "zst", "zip"] {
        let env = self::env(&format!("z-{ext}"), quick(), true).await;
        let compressed = img.bytes(&format!("big.qcow2.{ext}"));
        let path = format!("/big.qcow2.{ext}");
        env.http.file(&path, compressed.clone());
        let sum = format!("{{SHA-256}}{}", sha256_hex(&compressed));
        let r = register(&env, ext, spec(env.http.url(&path), "QCOW2", Some(sum.clone()))).await;
        assert_eq!(r.state, JobState::Completed, "{ext}: {:?}", r.error);
        let installed = r.installed.unwrap();
        assert_eq!(
            installed.download_checksum, sum,
            "{ext}: checksum is over the downloaded bytes"
        );
        assert_eq!(
            installed.installed_sha256,
            sha256_hex(&original),
            "{ext}: installed file is the image"
        );
        assert_eq!(installed.physical_size, original.len() as u64);
    }

    let env = self::env("iso", quick(), true).await;
    let iso = img.bytes("test.iso");
    env.http.file("/test.iso", iso.clone());
    let r = register(&env, "iso", spec(env.http.url("/test.iso"), "ISO", None)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let installed = r.installed.unwrap();
    assert_eq!(
        (installed.format.as_str(), installed.virtual_size),
        ("ISO", iso.len() as u64)
    );
    assert!(properties(&env).contains("iso=true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_stalled_connections_resume_with_range() {
    let img = images();
    let data = img.bytes("big.qcow2");
    let settings = DownloadSettings {
        checkpoint_every: 1 << 20,
        ..quick()
    };
    let env = env("drop", settings.clone(), true).await;
    env.http.route(
        "/big.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: None,
            faults: Faults {
                drop_after: Some(10 << 20),
                times: 1,
                ..Faults::default()
            },
            ranges: true,
        },
    );
    let r = register(&env, "drop", spec(env.http.url("/big.qcow2"), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    assert_eq!(r.installed.unwrap().installed_sha256, sha256_hex(&data));
    let reqs = env.http.requests("/big.qcow2");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let range = reqs[1].range.as_deref().unwrap();
    let offset: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(offset > 0 && offset <= 10 << 20, "resumed at {offset}");

    let env = self::env("stall", settings, true).await;
    env.http.route(
        "/big.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: None,
            faults: Faults {
                stall_after: Some(6 << 20),
                times: 1,
                ..Faults::default()
            },
            ranges: true,
        },
    );
    let started = Instant::now();
    let r = register(&env, "stall", spec(env.http.url("/big.qcow2"), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        env.http.requests("/big.qcow2")[1].range.is_some(),
        "second request resumes"
    );

    // A server that always stalls: the job fails and says why.
    let env = self::env(
        "stall-forever",
        DownloadSettings {
            retries: 1,
            ..quick()
        },
        true,
    )
    .await;
    env.http.route(
        "/big.qcow2",
        Route::File {
            data: data.into(),
            pace: None,
            faults: Faults {
                stall_after: Some(1 << 20),
                times: usize::MAX,
                ..Faults::default()
            },
            ranges: true,
        },
    );
    let r = register(
        &env,
        "stall-forever",
        spec(env.http.url("/big.qcow2"), "QCOW2", None),
    )
    .await;
    assert_eq!(r.state, JobState::Failed);
    assert!(r.error.as_deref().unwrap().contains("stalled"), "{:?}", r.error);
    assert!(installed_files(&env).is_empty(), "{:?}", installed_files(&env));
}

fn agent_download(store: &Path, state: &Path, url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ssvm-agent"));
    cmd.args(["download", "--store"])
        .arg(format!("file://{}", store.display()))
        .args(["--url", url, "--path", "template/tmpl/2/201", "--format", "QCOW2"])
        .args([
            "--allow-internal",
            "127.0.0.1/32",
            "--checkpoint-secs",
            "1",
            "--state-dir",
        ])
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn killed_agent_resumes_the_same_job() {
    let img = images();
    let data = img.bytes("big.qcow2");
    let root = std::env::temp_dir().join(format!("ssvm-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (store, state) = (root.join("store"), root.join("state"));
    std::fs::create_dir_all(&store).unwrap();
    let http = HttpFixture::start().unwrap();
    // About 9.6 s for the whole file: long enough to kill the agent after a checkpoint, also on a
    // loaded machine.
    http.route(
        "/big.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: Some(Duration::from_millis(100)),
            faults: Faults::default(),
            ranges: true,
        },
    );
    let url = http.url("/big.qcow2");
    let mut child = agent_download(&store, &state, &url).spawn().unwrap();
    // Wait for a checkpoint in the journal, then kill -9.
    let started = Instant::now();
    let offset = loop {
        let journal = std::fs::read_dir(state.join("jobs"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok());
        let durable = journal
            .and_then(|e| std::fs::read(e.path()).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["durable_offset"].as_u64())
            .unwrap_or(0);
        if durable > 0 {
            break durable;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no checkpoint was written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "agent finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        child.try_wait().unwrap().is_none(),
        "agent finished before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(offset < data.len() as u64);

    // Run the same command again: the same job resumes from its checkpoint and completes.
    let out = agent_download(&store, &state, &url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["state"], "completed");
    assert_eq!(record["resumes"], 1);
    assert_eq!(record["installed"]["installed_sha256"], sha256_hex(&data));
    let reqs = http.requests("/big.qcow2");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert!(
        reqs[1].range.as_deref().unwrap().starts_with("bytes="),
        "{reqs:?}"
    );

    // And once more: already complete, nothing is downloaded again.
    let out = agent_download(&store, &state, &url).output().unwrap();
    assert!(out.status.success());
    assert_eq!(http.requests("/big.qcow2").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_configured_ca_bundle_and_verified_by_default() {
    let img = images();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let https = HttpFixture::start_tls(&cert.cert.pem(), &cert.signing_key.serialize_pem()).unwrap();
    https.file("/small.qcow2", img.bytes("small.qcow2"));
    let url = https.https_url("localhost", "/small.qcow2");

    // The system CA bundle does not trust this server: the download fails on the certificate.
    let untrusted = env(
        "tls-untrusted",
        DownloadSettings {
            retries: 0,
            ..quick()
        },
        true,
    )
    .await;
    let r = register(&untrusted, "untrusted", spec(url.clone(), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap().to_lowercase().contains("certificate"),
        "{:?}",
        r.error
    );

    // With its CA in the configured bundle (and SNI "localhost"), it installs.
    let mut trusted = env("tls-trusted", quick(), true).await;
    let bundle = trusted.store_dir.parent().unwrap().join("ca.pem");
    std::fs::write(&bundle, cert.cert.pem()).unwrap();
    trusted.downloader.http = fetch::client(&FetchConfig {
        ca_bundle: bundle,
        allow_internal: vec!["127.0.0.0/8".parse().unwrap()],
        ..FetchConfig::default()
    })
    .unwrap();
    let r = register(&trusted, "trusted", spec(url, "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_reports_incomplete_installs_and_keeps_them() {
    let img = images();
    let env = env("inventory", quick(), true).await;
    env.http.file("/small.qcow2", img.bytes("small.qcow2"));
    let r = register(&env, "inv", spec(env.http.url("/small.qcow2"), "QCOW2", None)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    // A directory an interrupted install left behind, and one whose properties lack uniquename.
    let partial = env.store_dir.join("template/tmpl/2/202");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("x.qcow2.part"), b"half").unwrap();
    let broken = env.store_dir.join("template/tmpl/3/301");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("template.properties"),
        "filename=a.qcow2\nqcow2=true\nsize=4\n",
    )
    .unwrap();

    let entries = ssvm_agent::inventory::scan(&env.downloader.store).await.unwrap();
    let by_path = |p: &str| {
        entries
            .iter()
            .find(|e| e.path == p)
            .unwrap_or_else(|| panic!("{p} not listed: {entries:?}"))
    };
    assert!(by_path("template/tmpl/2/201").complete);
    let e = by_path("template/tmpl/2/202");
    assert!(
        !e.complete && e.problem.as_deref().unwrap().contains("no template.properties"),
        "{e:?}"
    );
    let e = by_path("template/tmpl/3/301");
    assert!(!e.complete && e.problem.is_some(), "{e:?}");
    assert!(partial.join("x.qcow2.part").exists(), "inventory never deletes");

    // The CLI prints the same as JSON lines.
    let out = Command::new(env!("CARGO_BIN_EXE_ssvm-agent"))
        .args(["inventory", "--store"])
        .arg(format!("file://{}", env.store_dir.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines.iter().filter(|l| l["complete"] == true).count(), 1);
}
