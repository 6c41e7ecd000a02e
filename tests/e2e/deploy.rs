//! Core deploying and watching its system VMs with the `process` driver (real `console-proxy` and
//! `ssvm-agent` processes): from nothing to both VMs Up, kill -9 of each detected and restarted
//! (a console works afterwards; a download resumes), load-driven scale-out and idle scale-in
//! without cutting a live session or flapping, and the lifecycle API.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use systemvm_core::DriverKind;
use systemvm_tests::http::{Faults, HttpFixture, Route};

use crate::console::open;
use crate::core_api::{Backend, Core};
use crate::fleet::console_works;
use crate::support::{VNC_PASSWORD, qemu, workspace};

/// Kills (SIGKILL) every process whose command line mentions `needle` (the core's data dir, which
/// every VM it starts is given as `--ca DIR/ca.pem`): nothing outlives a failed test.
pub(crate) struct KillOnDrop(pub(crate) String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in pids_with(&self.0) {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Pids of processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let text = String::from_utf8_lossy(&c).replace('\0', " ");
                    text.contains(needle) && !text.contains("kill")
                })
                .unwrap_or(false)
        })
        .collect()
}

pub(crate) async fn start(adjust: &[(&str, &str)]) -> (Core, KillOnDrop) {
    start_on(Backend::Sqlite, adjust).await
}

/// [`start`] on `backend`.
pub(crate) async fn start_on(backend: Backend, adjust: &[(&str, &str)]) -> (Core, KillOnDrop) {
    let core = Core::start_with(backend, |c| {
        c.agent_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.driver = Some(DriverKind::Process);
    })
    .await;
    let guard = KillOnDrop(core.dir().display().to_string());
    for (name, value) in adjust {
        core.ok(&[
            "updateConfiguration",
            &format!("name={name}"),
            &format!("value={value}"),
        ])
        .await;
    }
    (core, guard)
}

/// The system VMs, by type.
pub(crate) async fn vms(core: &Core, kind: &str) -> Vec<Value> {
    let v = core.ok(&["listSystemVms", &format!("systemvmtype={kind}")]).await;
    v["systemvm"].as_array().cloned().unwrap_or_default()
}

/// Waits until `kind` has exactly `n` VMs, all Running with the agent Up.
pub(crate) async fn wait_fleet(core: &Core, kind: &str, n: usize, within: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let list = vms(core, kind).await;
        if list.len() == n
            && list
                .iter()
                .all(|v| v["state"] == "Running" && v["agentstate"] == "Up")
        {
            return list;
        }
        assert!(
            start.elapsed() < within,
            "{kind}: not {n} VMs Running and Up within {within:?}: {list:?}\nevents: {}",
            core.ok(&["listEvents"]).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn events(core: &Core, kind: &str) -> Vec<Value> {
    let v = core.ok(&["listEvents", &format!("type={kind}")]).await;
    v["event"].as_array().cloned().unwrap_or_default()
}

pub(crate) fn kill9(vm_id: &str) -> u32 {
    let pids = pids_with(vm_id);
    assert_eq!(pids.len(), 1, "one process for {vm_id}: {pids:?}");
    let st = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pids[0].to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    pids[0]
}

pub(crate) async fn add_qemu_target(core: &Core) -> String {
    let vm = qemu();
    let t = core
        .ok(&[
            "addConsoleTarget",
            "name=e2e-vm",
            "host=127.0.0.1",
            &format!("port={}", vm.vnc.port()),
            &format!("password={VNC_PASSWORD}"),
        ])
        .await;
    t["consoletarget"]["id"].as_str().expect("id").to_owned()
}

pub(crate) fn local_store(core: &Core) -> String {
    let dir = core.dir().join("secondary");
    std::fs::create_dir_all(&dir).expect("store dir");
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_both_system_vms_and_restarts_killed_ones() {
    let (mut core, _guard) = start(&[("secstorage.allowed.internal.sites", "127.0.0.0/8")]).await;
    // A console proxy comes at once; the storage VM once the zone has an image store.
    wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(30)).await;
    assert!(vms(&core, "secondarystoragevm").await.is_empty());
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=local",
        &format!("url={}", local_store(&core)),
    ])
    .await;
    let ssvm = wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(30)).await;
    let proxy = vms(&core, "consoleproxy").await;
    assert_eq!(proxy[0]["managed"], true);
    assert_eq!(proxy[0]["hypervisor"], "process");
    assert!(!events(&core, "PROXY.CREATE").await.is_empty());
    assert!(!events(&core, "SSVM.CREATE").await.is_empty());

    // kill -9 of the console proxy: detected and restarted; a console works afterwards.
    let target = add_qemu_target(&core).await;
    console_works(&core, &target).await;
    let proxy_id = proxy[0]["id"].as_str().expect("id").to_owned();
    let killed = Instant::now();
    kill9(&proxy_id);
    let start = Instant::now();
    loop {
        if !events(&core, "PROXY.RESTART").await.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "kill -9 not detected within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let detected = killed.elapsed();
    let after = wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(30)).await;
    assert_eq!(
        after[0]["id"],
        proxy_id.as_str(),
        "the same VM restarted, not a new one"
    );
    console_works(&core, &target).await;
    eprintln!("proxy kill -9 detected in {detected:?}");

    // kill -9 of the storage agent mid-download: restarted, and the job resumes (Range request).
    let img =
        systemvm_tests::images::qcow2_of_noise(&core.dir().join("img"), "slow.qcow2", 16, 3).expect("qcow2");
    let data = std::fs::read(&img).expect("read");
    let http = HttpFixture::start().expect("http");
    http.route(
        "/slow.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: Some(Duration::from_millis(150)),
            faults: Faults::default(),
            ranges: true,
        },
    );
    // Registered with the CLI, which waits with its progress display through the restart.
    let mut cli = tokio::process::Command::new(workspace_bin("systemvm-core"))
        .arg("register-template")
        .arg("--data-dir")
        .arg(core.dir())
        .arg("--api-url")
        .arg(core.running().api_url())
        .args(["--name", "slow", "--format", "QCOW2", "--url"])
        .arg(http.url("/slow.qcow2"))
        .arg("--checksum")
        .arg(format!("{{SHA-256}}{}", hex::encode(Sha256::digest(&data))))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("systemvm-core register-template");
    let mut cli_out = tokio::io::BufReader::new(cli.stdout.take().expect("stdout"));
    let mut cli_text = String::new();
    let tid = loop {
        let mut line = String::new();
        let n = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncBufReadExt::read_line(&mut cli_out, &mut line),
        )
        .await
        .expect("the CLI printed no template")
        .expect("read");
        assert!(n > 0, "the CLI ended early: {cli_text}");
        cli_text.push_str(&line);
        if let Some(id) = line
            .split_whitespace()
            .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        {
            break id.to_owned();
        }
    };
    // Past the first checkpoint (5 s) and some way in.
    let start = Instant::now();
    loop {
        let t = core
            .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
            .await;
        let pct: u64 = t["template"][0]["downloaddetails"][0]["downloadPercent"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pct >= 50 && start.elapsed() > Duration::from_secs(6) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "download did not progress: {t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ssvm_id = ssvm[0]["id"].as_str().expect("id").to_owned();
    kill9(&ssvm_id);
    let start = Instant::now();
    loop {
        let t = core
            .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
            .await;
        if t["template"][0]["isready"] == true {
            break;
        }
        let state = &t["template"][0]["downloaddetails"][0]["downloadState"];
        assert_ne!(state, "DOWNLOAD_ERROR", "{t}");
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not Ready after the restart: {t}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!events(&core, "SSVM.RESTART").await.is_empty());
    let cli_done = tokio::time::timeout(Duration::from_secs(30), cli.wait_with_output())
        .await
        .expect("the CLI did not finish")
        .expect("CLI output");
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut cli_out, &mut rest)
        .await
        .expect("CLI stdout");
    let progress = String::from_utf8_lossy(&cli_done.stderr);
    assert!(cli_done.status.success(), "{cli_text}{rest}\n{progress}");
    assert!(rest.contains("Ready"), "{rest}");
    assert!(
        progress.lines().filter(|l| l.contains('%')).count() >= 2,
        "no progress shown: {progress}"
    );
    let resumed = http
        .requests("/slow.qcow2")
        .iter()
        .any(|r| r.range.as_deref().is_some_and(|r| !r.starts_with("bytes=0-")));
    assert!(
        resumed,
        "the restarted agent did not resume with a Range request: {:?}",
        http.requests("/slow.qcow2")
    );
    let account = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
        .await["template"][0]["accountid"]
        .as_str()
        .expect("account")
        .to_owned();
    let installed = std::fs::read_dir(
        core.dir()
            .join(format!("secondary/template/tmpl/{account}/{tid}")),
    )
    .expect("install dir")
    .filter_map(Result::ok)
    .find(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
    .expect("image installed");
    assert_eq!(
        Sha256::digest(std::fs::read(installed.path()).expect("read"))[..],
        Sha256::digest(&data)[..]
    );

    // A zone whose system VMs are started by hand: core deploys nothing there, even with a store.
    let manual = core
        .ok(&[
            "createZone",
            "name=manual",
            "networktype=Advanced",
            "dns1=8.8.8.8",
            "internaldns1=8.8.8.8",
            "systemvmdriver=none",
        ])
        .await;
    assert_eq!(manual["zone"]["systemvmdriver"], "none", "{manual}");
    let manual_id = manual["zone"]["id"].as_str().expect("zone id").to_owned();
    let manual_dir = core.dir().join("secondary-manual");
    std::fs::create_dir_all(&manual_dir).expect("dir");
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=manual-store",
        &format!("url=file://{}", manual_dir.display()),
        &format!("zoneid={manual_id}"),
    ])
    .await;
    for (spec, why) in [
        ("libvirt:qemu:///system", "image"),
        ("kvm", "Invalid systemvmdriver"),
    ] {
        let (ok, e) = core
            .cs_raw(&[
                "createZone",
                "name=z-bad",
                "networktype=Advanced",
                "dns1=8.8.8.8",
                "internaldns1=8.8.8.8",
                &format!("systemvmdriver={spec}"),
            ])
            .await;
        assert!(!ok && e.to_string().contains(why), "{spec}: {e}");
    }

    // Lifecycle API: stop keeps it stopped; start brings it back; destroy removes it and the
    // policy replaces it.
    let stopped = core.ok(&["stopSystemVm", &format!("id={proxy_id}")]).await;
    assert_eq!(stopped["systemvm"]["state"], "Stopped", "{stopped}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(pids_with(&proxy_id).is_empty(), "stopped VM's process still runs");
    assert_eq!(vms(&core, "consoleproxy").await[0]["state"], "Stopped");
    let started = core.ok(&["startSystemVm", &format!("id={proxy_id}")]).await;
    assert_eq!(started["systemvm"]["state"], "Running", "{started}");
    assert_eq!(started["systemvm"]["agentstate"], "Up", "{started}");
    let rebooted = core.ok(&["rebootSystemVm", &format!("id={proxy_id}")]).await;
    assert_eq!(rebooted["systemvm"]["state"], "Running", "{rebooted}");
    let destroyed = core.ok(&["destroySystemVm", &format!("id={proxy_id}")]).await;
    assert_eq!(destroyed["systemvm"]["state"], "Destroyed", "{destroyed}");
    let replaced = wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(30)).await;
    assert_ne!(replaced[0]["id"], proxy_id.as_str());
    assert!(!Path::new(&core.dir().join("systemvms").join(&proxy_id)).exists());
    let in_manual = core.ok(&["listSystemVms", &format!("zoneid={manual_id}")]).await;
    assert!(
        in_manual.get("systemvm").is_none(),
        "core deployed into a `none` zone: {in_manual}"
    );

    core.shutdown_with_system_vms().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_proxies_scale_out_with_load_and_back_in_when_idle() {
    let (mut core, _guard) = start(&[]).await;
    // The zone's own values of the fleet settings (the global ones stay at their defaults).
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .expect("zone")
        .to_owned();
    for (name, value) in [
        ("consoleproxy.session.max", "1"),
        ("consoleproxy.capacity.standby", "0"),
        ("consoleproxy.launch.max", "2"),
        ("consoleproxy.scalein.idle", "2"),
        ("consoleproxy.scale.cooldown", "0"),
        ("consoleproxy.capacityscan.interval", "1000"),
    ] {
        let c = core
            .ok(&[
                "updateConfiguration",
                &format!("name={name}"),
                &format!("value={value}"),
                &format!("zoneid={zone}"),
            ])
            .await;
        assert_eq!(c["configuration"]["scope"], "zone", "{c}");
    }
    let zoned = core
        .ok(&[
            "listConfigurations",
            "name=consoleproxy.session.max",
            &format!("zoneid={zone}"),
        ])
        .await;
    assert_eq!(zoned["configuration"][0]["value"], "1", "{zoned}");
    let global = core
        .ok(&["listConfigurations", "name=consoleproxy.session.max"])
        .await;
    assert_eq!(global["configuration"][0]["value"], "50", "{global}");
    let (ok, e) = core
        .cs_raw(&[
            "updateConfiguration",
            "name=default.page.size",
            "value=5",
            &format!("zoneid={zone}"),
        ])
        .await;
    assert!(!ok && e.to_string().contains("no zone scope"), "{e}");
    wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(30)).await;
    let target = add_qemu_target(&core).await;

    // One open session fills the only proxy (1 × 1 − 1 = 0 ≤ 0): a second proxy starts.
    let e = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={target}")])
        .await;
    let ws = &e["consoleendpoint"]["websocket"];
    let url = format!(
        "ws://{}:{}/websockify?token={}",
        ws["host"].as_str().expect("host"),
        ws["port"].as_str().expect("port"),
        ws["token"].as_str().expect("token")
    );
    let mut live = open(&url, None).await;
    let (mut w, mut h, _) = live.handshake().await.expect("live session");
    let two = wait_fleet(&core, "consoleproxy", 2, Duration::from_secs(40)).await;
    assert_eq!(
        events(&core, "PROXY.SCALEOUT").await.len(),
        2,
        "the first proxy, then one for load"
    );

    // While the session lives nothing scales in (without its proxy: 1 × 1 − 1 = 0, not > 0),
    // even the idle new one, and the session keeps working.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(vms(&core, "consoleproxy").await.len(), 2);
    assert!(events(&core, "PROXY.SCALEIN").await.is_empty());
    let frame = live.full_frame(&mut w, &mut h).await;
    assert!(!frame.is_empty(), "the live session was cut");
    drop(live);

    // Idle again: one proxy is drained and destroyed; then the fleet stays at one.
    let one = wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(40)).await;
    assert!(two.iter().any(|v| v["id"] == one[0]["id"]));
    assert!(!events(&core, "PROXY.SCALEIN").await.is_empty());
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(vms(&core, "consoleproxy").await.len(), 1, "flapped");
    assert_eq!(
        events(&core, "PROXY.SCALEOUT").await.len(),
        2,
        "flapped: {:?}",
        events(&core, "PROXY.SCALEOUT").await
    );
    // And the remaining proxy serves consoles.
    console_works(&core, &target).await;
    core.shutdown_with_system_vms().await;
}

/// A binary of the workspace, built beside this test executable (`target/debug`).
pub(crate) fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} missing: cargo build --workspace --bins",
        bin.display()
    );
    bin
}

/// A free loopback port (free now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `systemvm-core up` with `args`, its stdout piped and its stderr in `stderr_file`, killed on
/// drop; the environment `adjust` leaves it.
fn spawn_up(
    args: &[&str],
    stderr_file: &Path,
    adjust: impl FnOnce(&mut tokio::process::Command),
) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(workspace_bin("systemvm-core"));
    cmd.arg("up")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(stderr_file).expect("stderr file"))
        .kill_on_drop(true);
    adjust(&mut cmd);
    cmd.spawn().expect("systemvm-core up")
}

/// Reads `up`'s stdout until it printed its next steps; fails with its stderr when it exits
/// first (a component did not start) or takes longer than 120 s.
async fn read_next_steps(child: &mut tokio::process::Child, stderr_file: &Path) -> String {
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut text = String::new();
    let started = Instant::now();
    while !text.contains("Press Ctrl-C") {
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
        )
        .await;
        let stderr = || std::fs::read_to_string(stderr_file).unwrap_or_default();
        let n = match read {
            Ok(r) => r.expect("read"),
            Err(_) => panic!("up did not finish starting within 120 s: {text}\n{}", stderr()),
        };
        assert!(n > 0, "up exited early: {text}\nstderr:\n{}", stderr());
        text.push_str(&line);
    }
    eprintln!("up ready in {:?}", started.elapsed());
    // Keep reading (and dropping) stdout, so `up` never blocks on a full pipe.
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut out, &mut tokio::io::sink()).await;
    });
    text
}

/// Ctrl-C (SIGINT) to `up`: it exits 0 within 30 s.
async fn ctrl_c(mut child: tokio::process::Child) {
    let st = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().expect("pid").to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("up did not stop within 30 s")
        .expect("wait");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_suite_and_ctrl_c_stops_it() {
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("data dir");
    let _guard = KillOnDrop(dir.display().to_string());
    let port = free_port();
    let stderr_file = std::env::temp_dir().join(format!("systemvm-e2e-up-{}.stderr", std::process::id()));
    let mut child = spawn_up(
        &[
            "--data-dir",
            &dir.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &stderr_file,
        |_| {},
    );
    let text = read_next_steps(&mut child, &stderr_file).await;
    assert!(
        text.contains(&format!("http://127.0.0.1:{port}/client/api")),
        "{text}"
    );
    assert!(
        text.contains(&dir.join("credentials.json").display().to_string()),
        "{text}"
    );
    for step in ["register-template", "console", "system-vms"] {
        assert!(
            text.contains(&format!("systemvm-core {step}")),
            "{step} missing: {text}"
        );
    }
    // The printed steps work: the system VMs are listed Up, and the demo VM's console link is made.
    let api = format!("http://127.0.0.1:{port}/client/api");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(workspace_bin("systemvm-core"))
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .arg("--api-url")
            .arg(&api)
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = cli(&["system-vms"]);
    assert_eq!(table.matches("Running").count(), 2, "{table}");
    let demo = text
        .lines()
        .find(|l| l.contains("systemvm-core console"))
        .and_then(|l| l.split_whitespace().last())
        .expect("console step")
        .to_owned();
    let link = cli(&["console", &demo]);
    assert!(
        link.trim().starts_with("http://127.0.0.1:") && link.contains("/console?token="),
        "{link}"
    );
    // Ctrl-C stops every process it started.
    assert!(!pids_with(&dir.display().to_string()).is_empty());
    ctrl_c(child).await;
    let left = pids_with(&dir.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:?}");

    // Started again, `up` starts its system VMs as starts, not as crash restarts.
    let mut child = spawn_up(
        &[
            "--data-dir",
            &dir.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--no-demo",
        ],
        &stderr_file,
        |_| {},
    );
    read_next_steps(&mut child, &stderr_file).await;
    for kind in ["PROXY.RESTART", "SSVM.RESTART"] {
        let restarts = cli(&["api", "listEvents", &format!("type={kind}")]);
        assert!(
            !restarts.contains("restarting"),
            "the second up logged a crash: {restarts}"
        );
    }
    // kill -9 of `up`: its agents notice they lost their parent and end.
    let agents = pids_with(&dir.display().to_string());
    assert!(agents.len() >= 2, "the system VMs run: {agents:?}");
    let up_pid = child.id().expect("pid");
    let st = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(up_pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    let _ = child.wait().await;
    let killed = Instant::now();
    loop {
        let left = pids_with(&dir.display().to_string());
        if left.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "agents outlived a kill -9 of up: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("agents ended {:?} after kill -9 of up", killed.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&stderr_file);
}

/// The commands `up` printed (the lines under "Next steps:" indented by seven spaces).
fn printed_commands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Next steps:"))
        .filter(|l| l.starts_with("       ") && !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Runs `command` through `bash -c` as a new login shell of the user would: an empty environment
/// but `HOME` and a plain `PATH` (no target/ directory on it), from `/`.
async fn in_new_shell(home: &Path, command: &str) -> std::process::Output {
    let run = tokio::process::Command::new("/bin/bash")
        .arg("-c")
        .arg(command)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("{command}: still running after 120 s"))
        .expect("bash")
}

/// `up` as a newcomer meets it: the default data dir (a fresh HOME), and every printed next step
/// pasted as it is into a new shell: the template registered from `up`'s own demo image ends
/// Ready (its checksum verified), the demo VM's console link is made, the lists show the
/// template and both system VMs. Ctrl-C stops it; a restart on the same data dir keeps one demo
/// console target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_next_steps_work_pasted_into_a_new_shell() {
    let home = std::env::temp_dir().join(format!("systemvm-e2e-up-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).expect("home");
    let data = home.join(".local/share/systemvm-core");
    let _guard = KillOnDrop(home.display().to_string());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let stderr_file = home.join("up.stderr");
    let fresh_home = |cmd: &mut tokio::process::Command| {
        for var in [
            "SYSTEMVM_CORE_DATA_DIR",
            "XDG_DATA_HOME",
            "SYSTEMVM_CORE_API_URL",
            "SYSTEMVM_CORE_API_KEY",
            "SYSTEMVM_CORE_SECRET_KEY",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", &home);
    };
    // The demo guest scripts/test.sh builds (as scripts/run.sh does): a shell on its console.
    let demo = workspace().join("target/systemvm-image");
    let (kernel, initrd) = (demo.join("demo-vmlinuz"), demo.join("demo-initrd.img"));
    assert!(
        kernel.is_file() && initrd.is_file(),
        "no demo guest: run `cargo run -p systemvm-image -- demo`"
    );
    let (kernel, initrd) = (kernel.display().to_string(), initrd.display().to_string());
    let mut child = spawn_up(
        &[
            "--listen",
            &listen,
            "--demo-kernel",
            &kernel,
            "--demo-initrd",
            &initrd,
        ],
        &stderr_file,
        fresh_home,
    );
    let text = read_next_steps(&mut child, &stderr_file).await;
    assert!(
        text.contains(&format!(
            "Credentials: {}",
            data.join("credentials.json").display()
        )),
        "{text}"
    );
    assert!(
        !text.contains("--data-dir"),
        "the default data dir needs no flag: {text}"
    );
    // The upload page link it prints opens (the page and its tus client).
    let page = format!("http://{listen}/client/upload");
    assert!(text.contains(&format!("Upload page: {page} ")), "{text}");
    for path in ["", "/upload.js", "/tus.min.js"] {
        let a = crate::uploads::request(&format!("{page}{path}"), "GET", &[], b"", None).await;
        assert_eq!(a.status, 200, "{page}{path}");
        assert!(!a.body.is_empty(), "{page}{path}");
    }
    assert!(
        text.contains("Open the console of the demo VM"),
        "no demo VM (QEMU did not start?): {text}\n{}",
        std::fs::read_to_string(&stderr_file).unwrap_or_default()
    );
    let commands = printed_commands(&text);
    assert_eq!(commands.len(), 4, "{text}");
    let find = |sub: &str| {
        commands
            .iter()
            .find(|c| c.contains(&format!("systemvm-core {sub}")))
            .unwrap_or_else(|| panic!("no {sub} step: {text}"))
            .clone()
    };
    let register = find("register-template");
    assert!(
        register.contains("--url http://127.0.0.1:") && register.contains("--checksum '{SHA-256}"),
        "{register}"
    );
    for command in &commands {
        assert!(
            command.starts_with('/'),
            "not an absolute program path: {command}"
        );
        let out = in_new_shell(&home, command).await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "{command}: {}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
        eprintln!("$ {command}\n{stdout}");
        if command.contains("register-template") {
            assert_eq!(stdout.lines().last(), Some("Ready"), "{stdout}");
        } else if command.contains(" console ") {
            assert!(stdout.trim().contains("/console?token="), "{stdout}");
        } else if command.contains(" templates") {
            assert!(
                stdout.contains("tiny") && stdout.contains("Download Complete"),
                "{stdout}"
            );
        } else {
            assert_eq!(stdout.matches("Running").count(), 2, "{stdout}");
        }
    }
    // The template step ended Ready, the image verified: the printed `templates` command says so.
    let listed = in_new_shell(&home, &format!("{} --json", find("templates"))).await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("templates --json");
    let tiny = listed["template"]
        .as_array()
        .and_then(|l| l.iter().find(|t| t["name"] == "tiny"))
        .unwrap_or_else(|| panic!("no template tiny: {listed}"));
    assert_eq!(tiny["isready"], true, "{tiny}");
    assert_eq!(tiny["status"], "Download Complete", "{tiny}");
    // The CLI found up's credentials without --data-dir; and the setting is exactly loopback.
    let program = register.split_whitespace().next().expect("program").to_owned();
    let api = format!("--api-url http://{listen}/client/api");
    let configs = in_new_shell(
        &home,
        &format!("{program} configs {api} --name secstorage.allowed.internal.sites --json"),
    )
    .await;
    let configs: Value = serde_json::from_slice(&configs.stdout).expect("configs --json");
    assert_eq!(configs["configuration"][0]["value"], "127.0.0.1/32", "{configs}");

    assert!(!pids_with(&home.display().to_string()).is_empty());
    ctrl_c(child).await;
    let left = pids_with(&home.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:?}");

    // Again on the same data dir: still one demo console target, the one the console step names.
    let mut child = spawn_up(&["--listen", &listen], &stderr_file, fresh_home);
    let text = read_next_steps(&mut child, &stderr_file).await;
    let targets = in_new_shell(
        &home,
        &format!("{program} api {api} listConsoleTargets name=demo-vm"),
    )
    .await;
    let targets: Value = serde_json::from_slice(&targets.stdout).expect("listConsoleTargets");
    assert_eq!(targets["count"], 1, "{targets}");
    let id = targets["consoletarget"][0]["id"].as_str().expect("id");
    let console = printed_commands(&text)
        .into_iter()
        .find(|c| c.contains("systemvm-core console"))
        .expect("console step");
    assert!(console.ends_with(&format!(" {id}")), "{console} vs {targets}");
    let out = in_new_shell(&home, &console).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ctrl_c(child).await;
    let left = pids_with(&home.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:?}");
    let _ = std::fs::remove_dir_all(&home);
}

/// `secstorage.allowed.internal.sites` is dynamic: changed while the storage VM runs, it reaches
/// the VM over the agent channel, and the next download from an internal address goes through,
/// with no reboot of the storage VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_allowed_internal_site_applies_without_a_reboot() {
    let (mut core, _guard) = start(&[]).await;
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=local",
        &format!("url={}", local_store(&core)),
    ])
    .await;
    let ssvm = wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(30)).await;
    let ssvm_id = ssvm[0]["id"].as_str().expect("id").to_owned();
    let img =
        systemvm_tests::images::qcow2_of_noise(&core.dir().join("img"), "small.qcow2", 1, 7).expect("qcow2");
    let data = std::fs::read(&img).expect("read");
    let http = HttpFixture::start().expect("http");
    http.route(
        "/small.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: None,
            faults: Faults::default(),
            ranges: true,
        },
    );
    let checksum = format!("checksum={{SHA-256}}{}", hex::encode(Sha256::digest(&data)));
    let register = |name: &'static str| {
        let url = format!("url={}", http.url("/small.qcow2"));
        let checksum = checksum.clone();
        let core = &core;
        async move {
            let t = core
                .ok(&[
                    "registerTemplate",
                    &format!("name={name}"),
                    "format=QCOW2",
                    "hypervisor=KVM",
                    &url,
                    &checksum,
                ])
                .await;
            t["template"][0]["id"].as_str().expect("id").to_owned()
        }
    };
    let wait_final = |id: String| {
        let core = &core;
        async move {
            let start = Instant::now();
            loop {
                let t = core
                    .ok(&["listTemplates", "templatefilter=all", &format!("id={id}")])
                    .await;
                let state = t["template"][0]["downloaddetails"][0]["downloadState"].clone();
                if state == "DOWNLOADED" || state == "DOWNLOAD_ERROR" {
                    return t["template"][0].clone();
                }
                assert!(start.elapsed() < Duration::from_secs(60), "no final state: {t}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Loopback is internal: refused, saying how to allow it.
    let refused = wait_final(register("refused").await).await;
    assert_eq!(refused["isready"], false, "{refused}");
    let status = refused["status"].as_str().unwrap_or_default();
    assert!(status.contains("internal"), "{refused}");
    assert!(
        status.contains("secstorage.allowed.internal.sites"),
        "the refusal names the setting: {refused}"
    );

    // Allowed while the storage VM runs: the next download goes through, same VM, no reboot.
    let set = core
        .ok(&[
            "updateConfiguration",
            "name=secstorage.allowed.internal.sites",
            "value=127.0.0.0/8",
        ])
        .await;
    assert_eq!(set["configuration"]["isdynamic"], true, "{set}");
    let start = Instant::now();
    let allowed = loop {
        let t = wait_final(register("allowed").await).await;
        if t["isready"] == true {
            break t;
        }
        // The update reaches the agent within a second; a download sent before it may still fail.
        assert!(start.elapsed() < Duration::from_secs(10), "still refused: {t}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(allowed["status"], "Download Complete", "{allowed}");
    let now = vms(&core, "secondarystoragevm").await;
    assert_eq!(now[0]["id"], ssvm_id.as_str(), "the same storage VM");
    assert!(events(&core, "SSVM.RESTART").await.is_empty(), "no restart");
    assert!(events(&core, "SSVM.REBOOT").await.is_empty(), "no reboot");
    core.shutdown_with_system_vms().await;
}

/// Every image store of a zone is served: a second store gets its own storage VM, a template
/// registered into it installs there, and deleting the store drains and destroys its VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_store_of_a_zone_gets_a_storage_vm() {
    let (mut core, _guard) = start(&[("secstorage.allowed.internal.sites", "127.0.0.0/8")]).await;
    let dir_a = core.dir().join("store-a");
    let dir_b = core.dir().join("store-b");
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).expect("store dir");
    }
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=a",
        &format!("url=file://{}", dir_a.display()),
    ])
    .await;
    wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(30)).await;
    let b = core
        .ok(&[
            "addImageStore",
            "provider=NFS",
            "name=b",
            &format!("url=file://{}", dir_b.display()),
        ])
        .await;
    let store_b = b["imagestore"]["id"].as_str().expect("id").to_owned();
    let ssvms = wait_fleet(&core, "secondarystoragevm", 2, Duration::from_secs(30)).await;
    assert_eq!(ssvms.len(), 2, "{ssvms:?}");

    let img =
        systemvm_tests::images::qcow2_of_noise(&core.dir().join("img"), "b.qcow2", 1, 5).expect("qcow2");
    let data = std::fs::read(&img).expect("read");
    let http = HttpFixture::start().expect("http");
    http.route(
        "/b.qcow2",
        Route::File {
            data: data.clone().into(),
            pace: None,
            faults: Faults::default(),
            ranges: true,
        },
    );
    let t = core
        .ok(&[
            "registerTemplate",
            "name=on-b",
            "format=QCOW2",
            "hypervisor=KVM",
            &format!("url={}", http.url("/b.qcow2")),
            &format!("imagestoreuuid={store_b}"),
            &format!("checksum={{SHA-256}}{}", hex::encode(Sha256::digest(&data))),
        ])
        .await;
    let tid = t["template"][0]["id"].as_str().expect("id").to_owned();
    let start = Instant::now();
    loop {
        let t = core
            .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
            .await;
        if t["template"][0]["isready"] == true {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not installed on store b: {t}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let installed = std::fs::read_dir(dir_b.join("template/tmpl"))
        .expect("store b has the template")
        .count();
    assert_eq!(installed, 1);
    assert!(
        !dir_a.join("template/tmpl").exists(),
        "store a got store b's template"
    );

    // Store b emptied and deleted: its storage VM is drained and destroyed; a's stays.
    core.ok(&["deleteTemplate", &format!("id={tid}")]).await;
    core.ok(&["deleteImageStore", &format!("id={store_b}")]).await;
    wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(30)).await;
    assert!(!events(&core, "SSVM.DESTROY").await.is_empty());
    core.shutdown_with_system_vms().await;
}
