//! Two cores on one PostgreSQL database: one holds the leader lease and runs the fleet (a console
//! proxy started by the `process` driver, given both cores' agent endpoints); the standby serves
//! the API and refuses agents. When the active core dies (aborted like a crash, so its lease is
//! not released), the standby takes over within seconds: the proxy's agent moves to it, the same
//! VM keeps running (no restart), and a console link from the new active core opens.
//!
//! Every command answers correctly whichever core receives it: lifecycle commands sent to the
//! standby are carried out by the active core (one instance of the VM, never two); a job running
//! on one core survives the other's start; console keys rotated on either core reach the proxy,
//! so links issued by either core open; a UI login session survives a failover.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use systemvm_core::DriverKind;

use crate::core_api::{Backend, Core, postgres_database};
use crate::support::{VNC_PASSWORD, qemu};

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn proxies(core: &Core) -> Vec<serde_json::Value> {
    let v = core.ok(&["listSystemVms", "systemvmtype=consoleproxy"]).await;
    v["systemvm"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_core_takes_over_when_the_active_one_dies() {
    let url = tokio::task::spawn_blocking(postgres_database)
        .await
        .expect("database");
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let urls = vec![format!("wss://{a_addr}/agent"), format!("wss://{b_addr}/agent")];
    // The second core reads the keys stored encrypted by the first with the first one's key file.
    let configure = |addr: SocketAddr, secrets_key: Option<PathBuf>| {
        let url = url.clone();
        let urls = urls.clone();
        move |c: &mut systemvm_core::CoreConfig| {
            c.database_url = Some(url);
            c.agent_listen = Some(addr);
            c.agent_urls = urls;
            c.driver = Some(DriverKind::Process);
            c.secrets_key = secrets_key;
        }
    };
    let a = Core::start_with(Backend::Sqlite, configure(a_addr, None)).await;
    let a_key = a.running().secrets_key_path.clone();
    let mut b = Core::start_with(Backend::Sqlite, configure(b_addr, Some(a_key))).await;
    b.key = a.key.clone();
    b.secret = a.secret.clone();
    let _guards = (
        crate::deploy::KillOnDrop(a.dir().display().to_string()),
        crate::deploy::KillOnDrop(b.dir().display().to_string()),
    );
    assert!(a.running().is_leader(), "the first core takes the lease");
    assert!(!b.running().is_leader(), "the second stands by");

    // The active core starts a console proxy; both cores' APIs show it Up.
    let start = Instant::now();
    let proxy_id = loop {
        let list = proxies(&a).await;
        if let Some(p) = list
            .iter()
            .find(|p| p["state"] == "Running" && p["agentstate"] == "Up")
        {
            break p["id"].as_str().expect("id").to_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no proxy Up: {list:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        proxies(&b).await[0]["agentstate"],
        "Up",
        "the standby serves the API from the same database"
    );
    let vm = qemu();
    let target = b
        .ok(&[
            "addConsoleTarget",
            "name=e2e-vm",
            "host=127.0.0.1",
            &format!("port={}", vm.vnc.port()),
            &format!("password={VNC_PASSWORD}"),
        ])
        .await["consoletarget"]["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // The active core dies.
    let mut a = a;
    let died = Instant::now();
    a.crash().await;
    let start = Instant::now();
    while !b.running().is_leader() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the standby did not take the lease over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = died.elapsed();
    // The proxy's agent reaches the new active core; the same VM, not a restarted one.
    let start = Instant::now();
    loop {
        let list = proxies(&b).await;
        let up = list
            .iter()
            .any(|p| p["id"] == proxy_id.as_str() && p["agentstate"] == "Up");
        if up && b.running().agent_connected(&proxy_id) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the agent did not move to the new active core: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let moved = died.elapsed();
    let restarts = b.ok(&["listEvents", "type=PROXY.RESTART"]).await;
    assert!(
        restarts.get("event").is_none(),
        "the proxy was restarted: {restarts}"
    );
    eprintln!("lease takeover {takeover:?}, agent on the new core {moved:?}");

    // The API and a console through the new active core work.
    crate::fleet::console_works(&b, &target).await;
    b.shutdown_with_system_vms().await;
}

/// The processes whose command line names `vm_id` (the process driver passes `--vm-id ID`).
fn processes_of(vm_id: &str) -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--vm-id" && w[1] == vm_id.as_bytes())
        })
        .count()
}

async fn wait_proxy(
    core: &Core,
    pred: impl Fn(&serde_json::Value) -> bool,
    within: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let list = proxies(core).await;
        if let Some(p) = list.iter().find(|p| pred(p)) {
            return p.clone();
        }
        assert!(start.elapsed() < within, "no matching proxy: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_answers_right_on_either_core() {
    let url = tokio::task::spawn_blocking(postgres_database)
        .await
        .expect("database");
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let urls = vec![format!("wss://{a_addr}/agent"), format!("wss://{b_addr}/agent")];
    // The second core reads the keys stored encrypted by the first with the first one's key file.
    let configure = |addr: SocketAddr, secrets_key: Option<PathBuf>| {
        let url = url.clone();
        let urls = urls.clone();
        move |c: &mut systemvm_core::CoreConfig| {
            c.database_url = Some(url);
            c.agent_listen = Some(addr);
            c.agent_urls = urls;
            c.driver = Some(DriverKind::Process);
            c.secrets_key = secrets_key;
        }
    };
    let mut a = Core::start_with(Backend::Sqlite, configure(a_addr, None)).await;
    assert!(a.running().is_leader());
    let _guard_a = crate::deploy::KillOnDrop(a.dir().display().to_string());
    let up = |p: &serde_json::Value| p["state"] == "Running" && p["agentstate"] == "Up";
    let proxy_id = wait_proxy(&a, up, Duration::from_secs(30)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // A job submitted to A survives B's start: B fails only jobs whose core is gone.
    let reboot = format!("id={proxy_id}");
    let (submitted, job) = a.cs_raw(&["--async", "rebootSystemVm", &reboot]).await;
    assert!(submitted, "{job}");
    let job_id = job["jobid"].as_str().expect("jobid").to_owned();
    let a_key = a.running().secrets_key_path.clone();
    let mut b = Core::start_with(Backend::Sqlite, configure(b_addr, Some(a_key))).await;
    b.key = a.key.clone();
    b.secret = a.secret.clone();
    let _guard_b = crate::deploy::KillOnDrop(b.dir().display().to_string());
    assert!(!b.running().is_leader(), "the second core stands by");
    let start = Instant::now();
    let rebooted = loop {
        let r = b.ok(&["queryAsyncJobResult", &format!("jobid={job_id}")]).await;
        if r["jobstatus"] != 0 {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the reboot did not end: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        rebooted["jobstatus"], 1,
        "the reboot on A failed when B started: {rebooted}"
    );
    assert_eq!(
        rebooted["jobresult"]["systemvm"]["state"], "Running",
        "{rebooted}"
    );

    // Lifecycle commands sent to the standby are carried out by the active core: one instance.
    let stopped = b.ok(&["stopSystemVm", &reboot]).await;
    assert_eq!(stopped["systemvm"]["state"], "Stopped", "{stopped}");
    assert_eq!(
        processes_of(&proxy_id),
        0,
        "the proxy still runs after stopSystemVm"
    );
    let started = b.ok(&["startSystemVm", &reboot]).await;
    assert_eq!(started["systemvm"]["state"], "Running", "{started}");
    assert_eq!(
        processes_of(&proxy_id),
        1,
        "startSystemVm through the standby: one instance"
    );
    let seen_on_a = a.ok(&["listSystemVms", &format!("id={proxy_id}")]).await;
    assert_eq!(seen_on_a["systemvm"][0]["state"], "Running", "{seen_on_a}");
    wait_proxy(&b, up, Duration::from_secs(20)).await;

    // Key rotations on either core reach the proxy (connected to A); links from both open.
    let vm = qemu();
    let target = b
        .ok(&[
            "addConsoleTarget",
            "name=e2e-vm",
            "host=127.0.0.1",
            &format!("port={}", vm.vnc.port()),
            &format!("password={VNC_PASSWORD}"),
        ])
        .await["consoletarget"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for (round, rotate_on) in ["b", "b", "a", "b"].into_iter().enumerate() {
        let on = if rotate_on == "a" { &a } else { &b };
        let rot = on.ok(&["rotateConsoleKeys"]).await;
        // While the proxy was stopped the zone got a second one (a zone keeps one proxy Up).
        let up = proxies(&a)
            .await
            .iter()
            .filter(|p| p["agentstate"] == "Up")
            .count();
        assert!(
            rot["consolekeys"]["proxiesupdated"].as_u64() >= Some(1)
                && rot["consolekeys"]["proxiesupdated"].as_u64() <= Some(up as u64),
            "round {round}: the active core pushed the keys rotated on {rotate_on} to its proxies ({up} Up): {rot}"
        );
        crate::fleet::console_works(&a, &target).await;
        crate::fleet::console_works(&b, &target).await;
    }

    // A UI session opened on A survives A's death: the standby takes over and knows it.
    b.ok(&[
        "createAccount",
        "username=ui-user",
        "password=Pa ss~word1",
        "email=ui@example.org",
        "firstname=Ui",
        "lastname=User",
        "roletype=User",
    ])
    .await;
    let (cookie, key) = a.login("ui-user", "Pa ss~word1").await;
    let (status, zones) = a.with_session(&cookie, &key, "listZones").await;
    assert_eq!(status, 200, "{zones}");
    a.crash().await;
    let start = Instant::now();
    while !b.running().is_leader() {
        assert!(start.elapsed() < Duration::from_secs(15), "no takeover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, zones) = b.with_session(&cookie, &key, "listZones").await;
    assert_eq!(
        status, 200,
        "the UI session did not survive the failover: {zones}"
    );
    assert_eq!(zones["listzonesresponse"]["count"], 1, "{zones}");
    b.shutdown_with_system_vms().await;
}

/// A core that cannot bind its API port fails before it takes the lease, so the next core to
/// start on the database is the leader at once (no lease to wait out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_cannot_bind_leaves_no_lease() {
    let url = tokio::task::spawn_blocking(postgres_database)
        .await
        .expect("database");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-nobind-{}", std::process::id()));
    let mut config = systemvm_core::CoreConfig::new(&dir);
    config.listen = busy;
    config.database_url = Some(url.clone());
    let err = systemvm_core::start(config)
        .await
        .expect_err("the API port is taken");
    assert!(
        format!("{err:#}").contains("failed to bind the API listener"),
        "{err:#}"
    );
    // The keys it stored are encrypted with its key file: the next core shares that file.
    let key = dir.join("secrets.key");
    let core = Core::start_with(Backend::Sqlite, |c| {
        c.database_url = Some(url);
        c.secrets_key = Some(key);
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        core.running().is_leader(),
        "the lease was left behind by the core that failed"
    );
}
