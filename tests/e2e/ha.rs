//! Two cores on one PostgreSQL database: one holds the leader lease and runs the fleet (a console
//! proxy started by the `process` driver, given both cores' agent endpoints); the standby serves
//! the API and refuses agents. When the active core dies (aborted like a crash, so its lease is
//! not released), the standby takes over within seconds: the proxy's agent moves to it, the same
//! VM keeps running (no restart), and a console link from the new active core opens.

use std::net::SocketAddr;
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
    let configure = |addr: SocketAddr| {
        let url = url.clone();
        let urls = urls.clone();
        move |c: &mut systemvm_core::CoreConfig| {
            c.database_url = Some(url);
            c.agent_listen = Some(addr);
            c.agent_urls = urls;
            c.driver = Some(DriverKind::Process);
        }
    };
    let a = Core::start_with(Backend::Sqlite, configure(a_addr)).await;
    let mut b = Core::start_with(Backend::Sqlite, configure(b_addr)).await;
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
