//! Smoke test of `ssvm-agent serve --core … --vm-id … --secret … --ca …` (the real binary) against
//! a minimal stand-in for core's agent endpoint: the agent verifies the endpoint against the given
//! CA, says Hello as a storage VM and reports its jobs and store health in heartbeats. The real
//! core is exercised in `tests/e2e/agents.rs`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use systemvm_proto::agent::{AgentMessage, AgentRole, CoreMessage, Welcome};
use tokio_tungstenite::tungstenite::Message;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_core_reports_storage_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core = listener.local_addr().unwrap();

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
                &format!("wss://localhost:{}/agent", core.port()),
                "--vm-id",
                "ssvm-1",
                "--secret",
                "s3cret",
                "--ca",
            ])
            .arg(&ca_pem)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("the agent did not dial in")
        .unwrap();
    let tls = acceptor.accept(tcp).await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    let AgentMessage::Hello(hello) = serde_json::from_str(hello.to_text().unwrap()).unwrap() else {
        panic!("first message is not Hello")
    };
    assert_eq!(hello.role, AgentRole::SecStorage);
    assert_eq!(hello.vm_id, "ssvm-1");
    assert_eq!(hello.secret.expose(), "s3cret");
    let welcome = CoreMessage::Welcome(Welcome {
        version: 1,
        heartbeat_interval_secs: 1,
        console_keys: None,
        config: Default::default(),
    });
    ws.send(Message::text(serde_json::to_string(&welcome).unwrap()))
        .await
        .unwrap();
    let mut last = None;
    for _ in 0..6 {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let AgentMessage::Heartbeat(hb) = serde_json::from_str(m.to_text().unwrap()).unwrap() else {
            panic!("expected a heartbeat: {m:?}")
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
    let again = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await;
    assert!(again.is_ok(), "the agent kept talking to a silent core");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "reconnected too early: {:?}",
        started.elapsed()
    );
    drop(ws);
}
