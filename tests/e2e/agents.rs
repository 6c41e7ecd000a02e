//! The agent channel end to end: core (in process, SQLite) with its agent endpoint and CA; system
//! VMs registered through the API with the real `cs` client (SQLite, and PostgreSQL for the
//! scenarios that touch the agent columns most); a console proxy (in process, linked
//! to core by `console_proxy::core_link`) and a storage agent (the agent client in process) dial
//! in; `listSystemVms` shows their agent state; a token sealed with core's keys opens a console on
//! the proxy; silence, disconnects, wrong secrets and a foreign CA behave as documented.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use systemvm_agent_client::{AgentClient, ClientConfig, Hooks, Status};

use systemvm_proto::Secret;
use systemvm_proto::agent::{AgentRole, Load, StorageLoad};
use systemvm_proto::console::KeySet;
use tokio_tungstenite::tungstenite::Message;

use crate::core_api::{Backend, Core, cs_bin};
use crate::support::{VNC_PASSWORD, claims, qemu, workspace};

/// A core with its agent endpoint on loopback and heartbeats of 1 s (timeout 3 s).
pub(crate) async fn start_core(postgres: bool) -> Core {
    let backend = if postgres {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    let core = Core::start_with(backend, |c| c.agent_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    core.ok(&["updateConfiguration", "name=agent.heartbeat.interval", "value=1"])
        .await;
    core.ok(&["updateConfiguration", "name=agent.heartbeat.timeout", "value=3"])
        .await;
    core
}

impl Core {
    pub(crate) fn agent_url(&self) -> String {
        self.running().agent_url().unwrap()
    }

    /// Registers a system VM; returns (id, secret).
    pub(crate) async fn register(&self, role: &str, name: &str) -> (String, String) {
        let v = self
            .ok(&[
                "registerSystemVm",
                &format!("role={role}"),
                &format!("name={name}"),
            ])
            .await;
        let vm = &v["systemvm"];
        assert_eq!(vm["name"], name, "{v}");
        (
            vm["id"].as_str().unwrap().to_owned(),
            vm["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn system_vm(&self, id: &str) -> Value {
        let v = self.ok(&["listSystemVms", &format!("id={id}")]).await;
        assert_eq!(v["count"], 1, "{v}");
        v["systemvm"][0].clone()
    }

    /// Waits until the system VM's `agentstate` is `want`; returns the VM and the time it took.
    pub(crate) async fn wait_agent_state(&self, id: &str, want: &str, within: Duration) -> (Value, Duration) {
        let start = Instant::now();
        loop {
            let vm = self.system_vm(id).await;
            if vm["agentstate"] == want {
                return (vm, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "agentstate of {id} not {want} within {within:?}: {vm}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn client(core: &Core, ca: &Path, role: AgentRole, id: &str, secret: &str, hooks: Hooks) -> AgentClient {
    let config = ClientConfig::new(&[core.agent_url()], ca, role, id, Secret::from(secret)).unwrap();
    AgentClient::spawn(config, hooks)
}

fn storage_hooks() -> Hooks {
    Hooks {
        load: Arc::new(|| Load {
            console: None,
            storage: Some(StorageLoad {
                jobs_running: 1,
                jobs_queued: 2,
                store_health: "ok".into(),
                capacity_total: Some(1000),
                capacity_used: Some(10),
                store_url: None,
            }),
        }),
        ..Hooks::default()
    }
}

/// Waits for a status matching `pred`; returns it.
async fn wait_status(c: &AgentClient, pred: impl Fn(&Status) -> bool, within: Duration) -> Status {
    let mut rx = c.status();
    tokio::time::timeout(within, async {
        loop {
            let s = rx.borrow_and_update().clone();
            if pred(&s) {
                return s;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("status not reached within {within:?}: {:?}", c.status().borrow()))
}

/// Opens a console WebSocket and returns the first binary message, or the close reason.
async fn first_console_message(url: &str) -> Result<Vec<u8>, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Close(c))) => return Err(c.map(|c| c.reason.to_string()).unwrap_or_default()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed".into()),
        }
    }
}

/// Runs the scenario `$name(postgres: bool)` as `$name::sqlite` and `$name::postgres`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(false).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(true).await;
            }
        }
    )*};
}

both_backends!(
    agents_dial_in_report_load_and_get_console_keys,
    silent_agent_is_marked_disconnected_after_the_heartbeat_timeout,
);

async fn agents_dial_in_report_load_and_get_console_keys(postgres: bool) {
    let core = start_core(postgres).await;
    let ca = core.running().ca_path.clone();
    let (cp_id, cp_secret) = core.register("consoleproxy", "v-e2e-VM").await;
    let (ss_id, ss_secret) = core.register("secondarystoragevm", "s-e2e-VM").await;
    let cp = core.system_vm(&cp_id).await;
    assert_eq!(cp["systemvmtype"], "consoleproxy");
    assert_eq!(cp["agentstate"], "Disconnected");
    assert_eq!(cp["state"], "Starting");
    assert_eq!(cp["zonename"], "default-zone");
    let apis = core.ok(&["listApis", "name=listSystemVms"]).await;
    assert_eq!(apis["count"], 1, "{apis}");

    // The console proxy, in process, starts without keys: every token is refused until core's arrive.
    let mut config = console_proxy::ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        KeySet::default(),
        workspace().join("console-proxy/web"),
    );
    config.max_sessions = 7;
    let proxy = Arc::new(console_proxy::start(config).await.unwrap());
    let link = console_proxy::core_link::CoreLink {
        urls: vec![core.agent_url()],
        vm_id: cp_id.clone(),
        secret: Secret(cp_secret.clone()),
        ca: ca.clone(),
    };
    let endpoint = format!("http://{}", proxy.addr);
    let cp_client = console_proxy::core_link::connect(proxy.clone(), 7, &link, Some(endpoint)).unwrap();
    let ss_client = client(
        &core,
        &ca,
        AgentRole::SecStorage,
        &ss_id,
        &ss_secret,
        storage_hooks(),
    );

    let (cp, _) = core.wait_agent_state(&cp_id, "Up", Duration::from_secs(10)).await;
    assert_eq!(cp["activeviewersessions"], 0, "{cp}");
    assert_eq!(cp["version"], env!("CARGO_PKG_VERSION"));
    let (ss, _) = core.wait_agent_state(&ss_id, "Up", Duration::from_secs(10)).await;
    assert!(ss.get("activeviewersessions").is_none(), "{ss}");
    // The first heartbeat carries the storage load.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ss = core.system_vm(&ss_id).await;
    assert_eq!(ss["storagehealth"], "ok", "{ss}");
    assert_eq!(ss["storagejobsqueued"], 2, "{ss}");
    let listed = core
        .ok(&["listSystemVms", "systemvmtype=secondarystoragevm"])
        .await;
    assert_eq!(listed["count"], 1, "{listed}");

    // A token sealed with core's keys opens a console on the proxy; one sealed otherwise does not.
    let vm = qemu();
    let token = core
        .running()
        .console_keys()
        .seal(&claims(vm.vnc, Some(VNC_PASSWORD)))
        .unwrap();
    let url = format!("ws://{}/websockify?token={token}", proxy.addr);
    let first = first_console_message(&url)
        .await
        .expect("console session with core's token");
    assert!(first.starts_with(b"RFB 003.008"), "{first:?}");
    // An open session shows in the next heartbeat as an active viewer session.
    let fresh = core
        .running()
        .console_keys()
        .seal(&claims(vm.vnc, Some(VNC_PASSWORD)))
        .unwrap();
    let (held, _) = tokio_tungstenite::connect_async(format!("ws://{}/websockify?token={fresh}", proxy.addr))
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let cp = core.system_vm(&cp_id).await;
        if cp["activeviewersessions"] == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "session not reported: {cp}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(held);
    let foreign = KeySet::generate()
        .unwrap()
        .seal(&claims(vm.vnc, Some(VNC_PASSWORD)))
        .unwrap();
    let refused = first_console_message(&format!("ws://{}/websockify?token={foreign}", proxy.addr))
        .await
        .expect_err("a token from other keys must be refused");
    assert!(!refused.is_empty());

    // The storage agent stops: Disconnected at once (socket closed); back: Up again.
    ss_client.shutdown().await;
    let (ss, took) = core
        .wait_agent_state(&ss_id, "Disconnected", Duration::from_secs(4))
        .await;
    assert!(ss.get("disconnected").is_some(), "{ss}");
    assert!(took < Duration::from_secs(4));
    let ss_client = client(
        &core,
        &ca,
        AgentRole::SecStorage,
        &ss_id,
        &ss_secret,
        storage_hooks(),
    );
    core.wait_agent_state(&ss_id, "Up", Duration::from_secs(10)).await;

    // A new connection for the same id replaces the old one; the VM stays Up.
    let second = client(
        &core,
        &ca,
        AgentRole::SecStorage,
        &ss_id,
        &ss_secret,
        storage_hooks(),
    );
    wait_status(&second, |s| matches!(s, Status::Up(_)), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(core.system_vm(&ss_id).await["agentstate"], "Up");
    second.shutdown().await;
    ss_client.shutdown().await;

    cp_client.shutdown().await;
    core.wait_agent_state(&cp_id, "Disconnected", Duration::from_secs(4))
        .await;
    if let Ok(p) = Arc::try_unwrap(proxy) {
        p.shutdown().await;
    }
}

async fn silent_agent_is_marked_disconnected_after_the_heartbeat_timeout(postgres: bool) {
    let core = start_core(postgres).await;
    let (id, secret) = core.register("secondarystoragevm", "s-silent-VM").await;
    // A hand-made agent: Hello, then silence (no heartbeats).
    let pem = std::fs::read(&core.running().ca_path).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = core.running().agent_addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/agent", addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tls).await.unwrap();
    let hello = serde_json::json!({"type": "Hello", "version": 1, "role": "secstorage", "vm_id": id, "secret": secret, "future_field": true});
    let start = Instant::now();
    ws.send(Message::text(hello.to_string())).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    let welcome: Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    assert_eq!(welcome["type"], "Welcome", "{welcome}");
    assert_eq!(welcome["heartbeat_interval_secs"], 1);
    assert!(
        welcome["console_keys"].is_null(),
        "storage VMs get no console keys"
    );
    core.wait_agent_state(&id, "Up", Duration::from_secs(3)).await;
    core.wait_agent_state(&id, "Disconnected", Duration::from_secs(8))
        .await;
    // The timeout is 3 s from the Hello, the last word of this agent.
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(3), "marked down too early: {took:?}");
    // Core also drops the silent connection.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "core kept the silent connection open");
}

/// An agent of another version than core's is reported by `listAlerts`; one of the same is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_version_is_reported() {
    let core = start_core(false).await;
    let ca = core.running().ca_path.clone();
    let mut clients = Vec::new();
    for (name, version) in [
        ("v-old-VM", "0.0.1-old"),
        ("v-same-VM", env!("CARGO_PKG_VERSION")),
    ] {
        let (id, secret) = core.register("consoleproxy", name).await;
        let mut config = ClientConfig::new(
            &[core.agent_url()],
            &ca,
            AgentRole::ConsoleProxy,
            id.as_str(),
            Secret::from(secret.as_str()),
        )
        .unwrap();
        config.software_version = version.into();
        clients.push(AgentClient::spawn(config, Hooks::default()));
        let (vm, _) = core.wait_agent_state(&id, "Up", Duration::from_secs(20)).await;
        assert_eq!(vm["version"], version, "{vm}");
    }
    let alerts = core.ok(&["listAlerts"]).await;
    let texts: Vec<&str> = alerts["alert"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["description"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("v-old-VM runs agent version 0.0.1-old")),
        "{alerts}"
    );
    assert!(!texts.iter().any(|t| t.contains("v-same-VM")), "{alerts}");
    assert_eq!(alerts["alert"][0]["type"], 9, "{alerts}");
    for c in clients {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_and_foreign_ca_are_refused() {
    let core = start_core(false).await;
    let ca = core.running().ca_path.clone();
    let (id, secret) = core.register("consoleproxy", "v-refused-VM").await;

    let wrong = client(
        &core,
        &ca,
        AgentRole::ConsoleProxy,
        &id,
        "not-the-secret",
        Hooks::default(),
    );
    let s = wait_status(
        &wrong,
        |s| matches!(s, Status::Failed(_)),
        Duration::from_secs(10),
    )
    .await;
    let Status::Failed(text) = s else { unreachable!() };
    assert!(
        text.contains("refused") && text.contains("wrong secret"),
        "{text}"
    );
    // The right secret with the wrong role is refused too.
    let role = client(&core, &ca, AgentRole::SecStorage, &id, &secret, Hooks::default());
    let s = wait_status(&role, |s| matches!(s, Status::Failed(_)), Duration::from_secs(10)).await;
    assert!(matches!(&s, Status::Failed(t) if t.contains("role")), "{s:?}");

    // An agent given another CA does not trust core's certificate.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = core.dir().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let foreign = client(
        &core,
        &other_ca,
        AgentRole::ConsoleProxy,
        &id,
        &secret,
        Hooks::default(),
    );
    let s = wait_status(
        &foreign,
        |s| matches!(s, Status::Failed(_)),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(&s, Status::Failed(t) if t.contains("TLS")), "{s:?}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(core.system_vm(&id).await["agentstate"], "Disconnected");
    wrong.shutdown().await;
    role.shutdown().await;
    foreign.shutdown().await;

    // The registration itself is for root admins only and checks the role.
    let bad = tokio::process::Command::new(cs_bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("CLOUDSTACK_ENDPOINT", core.running().api_url())
        .env("CLOUDSTACK_KEY", &core.key)
        .env("CLOUDSTACK_SECRET", &core.secret)
        .args(["registerSystemVm", "role=router"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("Invalid role")
            || String::from_utf8_lossy(&bad.stderr).contains("Invalid role")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_after_a_core_restart_with_the_same_ca_and_keys() {
    let mut core = start_core(false).await;
    let ca = core.running().ca_path.clone();
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let (id, secret) = core.register("consoleproxy", "v-restart-VM").await;
    let received: Arc<std::sync::Mutex<Vec<KeySet>>> = Arc::default();
    let sink = received.clone();
    let hooks = Hooks {
        load: Arc::new(Load::default),
        keys: Arc::new(move |k| sink.lock().unwrap().push(k.to_key_set().unwrap())),
        ..Hooks::default()
    };
    let agent = client(&core, &ca, AgentRole::ConsoleProxy, &id, &secret, hooks);
    core.wait_agent_state(&id, "Up", Duration::from_secs(10)).await;
    let token = core
        .running()
        .console_keys()
        .seal(&claims("127.0.0.1:5900".parse().unwrap(), None))
        .unwrap();

    core.restart().await;
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        ca_pem,
        "the CA was replaced"
    );
    // The agent backs off (1 s, 2 s, …) and comes back without help.
    wait_status(&agent, |s| matches!(s, Status::Failed(_)), Duration::from_secs(5)).await;
    wait_status(&agent, |s| matches!(s, Status::Up(_)), Duration::from_secs(20)).await;
    core.wait_agent_state(&id, "Up", Duration::from_secs(5)).await;
    // Keys persist across the restart: a token issued before still opens with the keys after.
    let keys = received.lock().unwrap().clone();
    assert_eq!(keys.len(), 2, "keys delivered on each Welcome");
    assert!(keys[1].open(&token).is_ok());
    assert!(core.running().console_keys().open(&token).is_ok());
    agent.shutdown().await;
}
