//! Floods against core's listeners, on loopback, bounded and self-ending: thousands of slow or
//! idle connections from one client address (127.0.0.2) must not keep another client (127.0.0.1)
//! out, and bodies that never arrive are cut at their deadline. Agent messages are bound to the
//! sender entitled to them: an agent cannot report a download it was not given.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use systemvm_agent_client::{AgentClient, ClientConfig, Hooks};
use systemvm_proto::Secret;
use systemvm_proto::agent::{
    AgentMessage, AgentRole, InstalledImage, JobPhase, JobProgress, Load, StorageLoad,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::core_api::{Backend, Core};

/// How many flood connections each test opens.
const FLOOD: usize = 2000;

/// `n` connections to `to` from 127.0.0.2, each sending `first` and then nothing more.
async fn flood(to: SocketAddr, n: usize, first: &'static [u8]) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        let mut s = socket.connect(to).await.expect("connect");
        if !first.is_empty() {
            let _ = s.write_all(first).await;
        }
        conns.push(s);
    }
    conns
}

/// How many of `conns` the server still keeps open (a refused one reads end-of-file at once).
async fn still_open(conns: &mut [TcpStream]) -> usize {
    let mut open = 0;
    for c in conns.iter_mut() {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), c.read(&mut b)).await {
            Err(_) => open += 1,
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) => {}
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_do_not_keep_other_clients_out_and_are_cut_at_their_deadline() {
    let core = Core::start_with(Backend::Sqlite, |c| {
        c.api_limits.body_timeout = Duration::from_secs(2);
    })
    .await;
    let addr = core.running().addr;
    let started = Instant::now();
    let mut slow = flood(
        addr,
        FLOOD,
        b"POST /client/api HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ncommand=",
    )
    .await;
    eprintln!("{FLOOD} slow-body connections opened in {:?}", started.elapsed());
    let t = Instant::now();
    let (status, zones) = core.signed_get(&[("command", "listZones")]).await;
    let answered = t.elapsed();
    assert_eq!(status, 200, "{zones}");
    assert_eq!(zones["listzonesresponse"]["count"], 1, "{zones}");
    assert!(
        answered < Duration::from_secs(1),
        "listZones took {answered:?} under the flood"
    );
    let open = still_open(&mut slow).await;
    assert!(
        open <= systemvm_core::server::ApiLimits::default().max_connections_per_client,
        "{open} connections of one client kept"
    );
    eprintln!("listZones answered in {answered:?} under {FLOOD} slow bodies; {open} of them kept");
    // The bodies never come: each kept connection is answered 408 and closed at the deadline.
    let mut waited = 0;
    for c in slow.iter_mut().take(open.max(1)) {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf)).await;
        if r.is_ok() && !buf.is_empty() {
            let text = String::from_utf8_lossy(&buf);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            waited += 1;
        }
    }
    assert!(waited > 0, "no slow body was cut at its deadline");
}

fn storage_hooks(store_url: Option<String>) -> Hooks {
    Hooks {
        load: std::sync::Arc::new(move || Load {
            console: None,
            storage: Some(StorageLoad {
                store_health: "ok".into(),
                store_url: store_url.clone(),
                ..Default::default()
            }),
        }),
        ..Hooks::default()
    }
}

fn agent(core: &Core, role: AgentRole, id: &str, secret: &str, hooks: Hooks) -> AgentClient {
    let mut config = ClientConfig::new(
        &[core.agent_url()],
        &core.running().ca_path,
        role,
        id,
        Secret::from(secret),
    )
    .expect("client config");
    config.software_version = "flood-test".into();
    AgentClient::spawn(config, hooks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_do_not_keep_agents_out() {
    let core = crate::agents::start_core(false).await;
    let agent_addr = core.running().agent_addr.expect("agent endpoint");
    let started = Instant::now();
    let mut idle = flood(agent_addr, FLOOD, b"").await;
    eprintln!("{FLOOD} idle TLS connections opened in {:?}", started.elapsed());
    let (id, secret) = core.register("secondarystoragevm", "s-flood-VM").await;
    let t = Instant::now();
    let client = agent(&core, AgentRole::SecStorage, &id, &secret, storage_hooks(None));
    let (vm, _) = core.wait_agent_state(&id, "Up", Duration::from_secs(15)).await;
    let connected = t.elapsed();
    assert_eq!(vm["agentstate"], "Up", "{vm}");
    // Heartbeats keep it Up past the heartbeat timeout (3 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (vm, _) = core.wait_agent_state(&id, "Up", Duration::from_secs(1)).await;
    assert_eq!(vm["agentstate"], "Up", "{vm}");
    let open = still_open(&mut idle).await;
    assert!(
        open <= systemvm_core::agent::MAX_HANDSHAKES_PER_CLIENT,
        "{open} idle handshakes of one client kept"
    );
    eprintln!("agent Up in {connected:?} under {FLOOD} idle TLS connections; {open} of them kept");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_report_a_download_it_was_not_given() {
    let core = crate::agents::start_core(false).await;
    let store = std::env::temp_dir().join(format!("systemvm-e2e-bound-{}", std::process::id()));
    std::fs::create_dir_all(&store).expect("store");
    let store_url = format!("file://{}", store.display());
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=bound",
        &format!("url={store_url}"),
    ])
    .await;
    let t = core
        .ok(&[
            "registerTemplate",
            "name=bound",
            "format=QCOW2",
            "hypervisor=KVM",
            "url=http://203.0.113.1/never.qcow2",
        ])
        .await;
    let tid = t["template"][0]["id"].as_str().expect("id").to_owned();
    // A console proxy, and a storage VM serving another store: neither was given the download.
    let (pid, psecret) = core.register("consoleproxy", "v-bound-VM").await;
    let (sid, ssecret) = core.register("secondarystoragevm", "s-bound-VM").await;
    let proxy = agent(&core, AgentRole::ConsoleProxy, &pid, &psecret, Hooks::default());
    let storage = agent(
        &core,
        AgentRole::SecStorage,
        &sid,
        &ssecret,
        storage_hooks(Some("file:///somewhere/else".into())),
    );
    core.wait_agent_state(&pid, "Up", Duration::from_secs(15)).await;
    core.wait_agent_state(&sid, "Up", Duration::from_secs(15)).await;
    let forged = AgentMessage::JobProgress(JobProgress {
        id: tid.clone(),
        percent: 100,
        state: Some(JobPhase::Completed),
        installed: Some(InstalledImage {
            file: "forged.qcow2".into(),
            format: "QCOW2".into(),
            physical_size: 1,
            virtual_size: 1 << 40,
            sha256: "00".repeat(32),
        }),
        ..Default::default()
    });
    assert!(proxy.outbox().send(forged.clone()));
    assert!(storage.outbox().send(forged));
    // Give core time to read both (heartbeats every second prove the channel moved on).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
        .await;
    let t: &Value = &listed["template"][0];
    assert_eq!(
        t["isready"], false,
        "a forged report made the template ready: {t}"
    );
    assert!(t.get("size").is_none(), "a forged report set the size: {t}");
    proxy.shutdown().await;
    storage.shutdown().await;
    let _ = std::fs::remove_dir_all(&store);
}
