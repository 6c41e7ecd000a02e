//! Smoke test of `console-proxy serve --core … --vm-id … --secret … --ca …` (the real binary)
//! against a minimal stand-in for core's agent endpoint: the proxy verifies the endpoint against
//! the given CA, says Hello with its id and secret, installs the console keys from Welcome (so a
//! token sealed with them is not refused for its key) and reports its session limit in heartbeats.
//! The real core is exercised in `tests/e2e/agents.rs`. With a core that answers session claims,
//! the proxy claims a link only once its session is accepted (against QEMU's VNC server).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rfb;
use systemvm_proto::agent::{
    AgentMessage, AgentRole, CLAIM_PROTOCOL_VERSION, ClaimAnswer, ConsoleKeys, CoreMessage, Welcome,
};
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, KeySet, ViewerMode, VmRef};
use systemvm_proto::ws::close_code;
use systemvm_tests::standin_core::StandinCore;
use tokio::io::AsyncWriteExt as _;

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

/// Opens `url` as a browser does (the RFB handshake) and returns the reason the proxy closed it.
async fn close_reason(url: &str) -> String {
    match Rfb::open(url).await {
        Ok(_) => panic!("the session was not refused"),
        Err(closed) => closed.reason,
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
        transfer_keys: None,
        certificate: None,
        peer_identity: None,
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

/// A stand-in core's side of session claims: every claim is recorded; a session id is granted
/// once, refused after, refused from the start when listed in `refuse`, and left unanswered once
/// when listed in `ignore_once`.
#[derive(Default)]
struct Claims {
    seen: Mutex<Vec<String>>,
    refuse: Mutex<HashSet<String>>,
    ignore_once: Mutex<HashSet<String>>,
    heartbeats: AtomicU64,
}

impl Claims {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Opens `url` once the proxy's only session slot is free (a refusal for the limit leaves the
/// link usable, so the same link is tried again).
async fn open_when_free(url: &str) -> Result<Rfb, common::Closed> {
    let started = Instant::now();
    loop {
        match Rfb::open(url).await {
            Err(busy) if busy.code == close_code::BUSY && started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opened => return opened,
        }
    }
}

/// Upgrades `url` once the slot is free and reads the proxy's RFB version.
async fn greeted_when_free(url: &str) -> Rfb {
    let started = Instant::now();
    loop {
        let mut rfb = Rfb::connect(url).await;
        match rfb.read(12).await {
            Ok(version) => {
                assert_eq!(version, b"RFB 003.008\n");
                return rfb;
            }
            Err(busy) if busy.code == close_code::BUSY && started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(closed) => panic!("refused: {closed:?}"),
        }
    }
}

/// Sends the upgrade request for `url`'s token and leaves without reading the answer.
async fn upgrade_and_leave(listen: &str, url: &str) {
    let path = &url[url.find("/websockify").unwrap()..];
    let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {listen}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_are_claimed_from_core_only_once_their_session_is_accepted() {
    let vm = common::vm();
    let dir = std::env::temp_dir().join(format!("console-proxy-claims-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let core = StandinCore::start(&dir).await.unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let _proxy = Kill(
        Command::new(BIN)
            .args(["serve", "--listen", &listen, "--max-sessions", "1"])
            .args(["--core", &core.url("127.0.0.1"), "--vm-id", "vm-1", "--ca"])
            .arg(&core.ca_pem)
            .env("SYSTEMVM_AGENT_SECRET", "s3cret")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (mut conn, _) = core.accept(Duration::from_secs(20)).await.unwrap();
    let keys = KeySet::generate().unwrap();
    conn.send(&CoreMessage::Welcome(Welcome {
        version: CLAIM_PROTOCOL_VERSION,
        heartbeat_interval_secs: 1,
        console_keys: Some(ConsoleKeys::from_key_set(&keys).unwrap()),
        config: Default::default(),
        transfer_keys: None,
        certificate: None,
        peer_identity: None,
    }))
    .await
    .unwrap();
    let claims = Arc::new(Claims::default());
    let answering = claims.clone();
    let link = tokio::spawn(async move {
        let mut granted = HashSet::new();
        while let Ok(msg) = conn.recv(Duration::from_secs(120)).await {
            match msg {
                AgentMessage::ClaimSession(claim) => {
                    answering.seen.lock().unwrap().push(claim.session_id.clone());
                    if answering.ignore_once.lock().unwrap().remove(&claim.session_id) {
                        continue;
                    }
                    let refused = answering.refuse.lock().unwrap().contains(&claim.session_id)
                        || !granted.insert(claim.session_id.clone());
                    let answer = ClaimAnswer {
                        id: claim.id,
                        granted: !refused,
                        reason: refused.then(|| "it was opened on another console proxy".to_owned()),
                    };
                    conn.send(&CoreMessage::ClaimAnswer(answer)).await.unwrap();
                }
                AgentMessage::Heartbeat(_) => {
                    answering.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    });
    // The first heartbeat comes once the proxy applied Welcome (its keys).
    let started = Instant::now();
    while claims.heartbeats.load(Ordering::Relaxed) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "no heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let link_for = || {
        let c = common::claims_for(vm.vnc);
        let url = format!("ws://{listen}/websockify?token={}", keys.seal(&c).unwrap());
        (c.session_id, url)
    };

    // A session opens: its link is claimed.
    let (a, a_url) = link_for();
    let mut first = Rfb::open(&a_url).await.expect("a session opens");
    first.frame().await.unwrap();
    assert_eq!(claims.seen(), vec![a.clone()]);

    // At the session limit: refused as busy, and core is not asked.
    let (b, b_url) = link_for();
    let busy = Rfb::open(&b_url).await.err().expect("busy");
    assert_eq!(busy.code, close_code::BUSY, "{busy:?}");
    first.close().await;

    // Left during the upgrade, and half-way through the RFB handshake: core is not asked.
    let (c, c_url) = link_for();
    upgrade_and_leave(&listen, &c_url).await;
    let mut partway = greeted_when_free(&c_url).await;
    partway.send(b"RFB 003.008\n").await;
    partway.read(2).await.unwrap();
    drop(partway);

    // Both links still open a session (once the abandoned attempts gave the slot up), claimed then.
    for url in [&b_url, &c_url] {
        let mut rfb = open_when_free(url).await.expect("the unspent link opens");
        rfb.frame().await.unwrap();
        rfb.close().await;
    }
    assert_eq!(
        claims.seen(),
        vec![a.clone(), b.clone(), c.clone()],
        "core was asked for links no session used"
    );

    // Reuse on this proxy: refused here, without asking core again.
    let reused = Rfb::open(&a_url).await.err().expect("reuse refused");
    assert_eq!(reused.code, close_code::TOKEN_REFUSED, "{reused:?}");

    // Used on another proxy (core refuses): refused with core's reason, and spent here too.
    let (d, d_url) = link_for();
    claims.refuse.lock().unwrap().insert(d.clone());
    let refused = open_when_free(&d_url).await.err().expect("refused by core");
    assert_eq!(refused.code, close_code::TOKEN_REFUSED, "{refused:?}");
    assert!(
        refused.reason.contains("opened on another console proxy"),
        "{refused:?}"
    );
    let again = Rfb::open(&d_url).await.err().expect("refused here now");
    assert!(again.reason.contains("already used"), "{again:?}");

    // Core does not answer: the session fails, and the link is not spent.
    let (e, e_url) = link_for();
    claims.ignore_once.lock().unwrap().insert(e.clone());
    let unconfirmed = open_when_free(&e_url).await.err().expect("no answer from core");
    assert_eq!(unconfirmed.code, close_code::INTERNAL, "{unconfirmed:?}");
    let mut rfb = open_when_free(&e_url)
        .await
        .expect("the unconfirmed link opens on a retry");
    rfb.frame().await.unwrap();
    assert_eq!(claims.seen(), vec![a, b, c, d, e.clone(), e]);
    rfb.close().await;
    link.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
