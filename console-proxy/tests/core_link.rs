//! Smoke test of `console-proxy serve --core … --vm-id … --secret … --ca …` (the real binary)
//! against a minimal stand-in for core's agent endpoint: the proxy verifies the endpoint against
//! the given CA, says Hello with its id and secret, installs the console keys from Welcome (so a
//! token sealed with them is not refused for its key) and reports its session limit in heartbeats.
//! The real core is exercised in `tests/e2e/agents.rs`.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use systemvm_proto::agent::{AgentMessage, AgentRole, ConsoleKeys, CoreMessage, Welcome};
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, KeySet, ViewerMode, VmRef};
use systemvm_tests::standin_core::StandinCore;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_console-proxy");

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn claims(vnc_port: u16) -> ConsoleTokenClaims {
    let now = console_proxy::unix_now();
    ConsoleTokenClaims {
        target: ConsoleTarget::Vnc {
            host: "127.0.0.1".into(),
            port: vnc_port,
            password: None,
        },
        vm: VmRef {
            id: "vm".into(),
            display_name: "vm".into(),
        },
        session_id: systemvm_proto::console::new_session_id().unwrap(),
        not_before: now,
        expires: now + 300,
        client_ip: None,
        allowed_origins: vec![],
        viewer: ViewerMode::Interactive,
        keyboard_locale: None,
    }
}

async fn close_reason(url: &str) -> String {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(c))) => return c.map(|c| c.reason.to_string()).unwrap_or_default(),
            Some(Ok(_)) => {}
            Some(Err(e)) => return e.to_string(),
            None => return "closed".into(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_core_gets_keys_from_welcome() {
    let dir = std::env::temp_dir().join(format!("console-proxy-core-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let core = StandinCore::start(&dir).await.unwrap();

    let listen = format!("127.0.0.1:{}", free_port());
    let _proxy = Kill(
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &listen,
                "--max-sessions",
                "9",
                "--core",
                &core.url("127.0.0.1"),
                "--vm-id",
                "vm-1",
                "--ca",
                core.ca_pem.to_str().unwrap(),
            ])
            .env("SYSTEMVM_AGENT_SECRET", "s3cret")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let (mut ws, hello) = core
        .accept(Duration::from_secs(20))
        .await
        .expect("the proxy did not dial in");
    assert_eq!(hello.role, AgentRole::ConsoleProxy);
    assert_eq!(hello.vm_id, "vm-1");
    assert_eq!(hello.secret.expose(), "s3cret");

    let keys = KeySet::generate().unwrap();
    let welcome = CoreMessage::Welcome(Welcome {
        version: 1,
        heartbeat_interval_secs: 1,
        console_keys: Some(ConsoleKeys::from_key_set(&keys).unwrap()),
        config: Default::default(),
    });
    ws.send(&welcome).await.unwrap();
    let AgentMessage::Heartbeat(hb) = ws.recv(Duration::from_secs(10)).await.unwrap() else {
        panic!("expected a heartbeat")
    };
    assert_eq!(hb.load.console.unwrap().max_sessions, 9);

    // Core's keys are installed: a token sealed with them gets past the key check (it then fails
    // to reach the closed VNC port); a token from other keys is refused as such.
    let closed = free_port();
    let ours = close_reason(&format!(
        "ws://{listen}/websockify?token={}",
        keys.seal(&claims(closed)).unwrap()
    ))
    .await;
    let theirs = close_reason(&format!(
        "ws://{listen}/websockify?token={}",
        KeySet::generate().unwrap().seal(&claims(closed)).unwrap()
    ))
    .await;
    assert!(
        ours.contains("cannot reach"),
        "core's keys were not installed: {ours}"
    );
    assert!(theirs.contains("token is not valid"), "{theirs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn core_flags_go_together() {
    let out = Command::new(BIN)
        .args(["serve", "--core", "wss://127.0.0.1:1/agent", "--vm-id", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("go together"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
