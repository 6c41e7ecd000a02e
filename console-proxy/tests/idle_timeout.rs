//! The idle timeout against QEMU's real VNC server: a session whose browser sends only
//! FramebufferUpdateRequests (what noVNC sends while nobody touches it) is closed with code 4008
//! and its reason; one with pointer events stays open. Standalone (`idle_timeout` in the
//! configuration, the proxy in process) and linked to core (the real binary, the timeout from
//! `consoleproxy.session.timeout` in `Welcome` and `ConfigUpdate`, applied to running sessions).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use systemvm_proto::Secret;
use systemvm_proto::agent::{AgentMessage, ConfigUpdate, ConsoleKeys, CoreMessage, Welcome, config_keys};
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, KeySet, ViewerMode, VmRef};
use systemvm_proto::ws::close_code;
use systemvm_tests::qemu::{VNC_PASSWORD, VncVm};
use systemvm_tests::standin_core::StandinCore;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// One VM for the tests of this binary (they run in parallel).
fn vm() -> &'static VncVm {
    static VM: OnceLock<VncVm> = OnceLock::new();
    VM.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("console-proxy-idle-{}", std::process::id()));
        VncVm::start(&dir).expect("QEMU with a VNC server")
    })
}

fn claims(viewer: ViewerMode) -> ConsoleTokenClaims {
    let vnc = vm().vnc;
    let now = console_proxy::unix_now();
    ConsoleTokenClaims {
        target: ConsoleTarget::Vnc {
            host: vnc.ip().to_string(),
            port: vnc.port(),
            password: Some(Secret(VNC_PASSWORD.to_owned())),
        },
        vm: VmRef {
            id: "vm-idle".into(),
            display_name: "idle-vm".into(),
        },
        session_id: systemvm_proto::console::new_session_id().unwrap(),
        not_before: now,
        expires: now + 300,
        client_ip: None,
        allowed_origins: vec![],
        viewer,
        keyboard_locale: None,
    }
}

/// How the proxy closed a session.
#[derive(Debug)]
struct Closed {
    code: u16,
    reason: String,
}

/// A browser's side of a console session, as noVNC speaks it.
struct Viewer {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    buf: Vec<u8>,
    width: u16,
    height: u16,
    /// When the last input event was sent.
    last_input: Option<Instant>,
}

impl Viewer {
    /// Opens `url` and completes the browser-side RFB handshake.
    async fn open(url: &str) -> Viewer {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut v = Viewer {
            ws,
            buf: Vec::new(),
            width: 0,
            height: 0,
            last_input: None,
        };
        assert_eq!(v.read(12).await.unwrap(), b"RFB 003.008\n");
        v.send(b"RFB 003.008\n").await;
        assert_eq!(v.read(2).await.unwrap(), [1, 1]);
        v.send(&[1]).await;
        assert_eq!(v.read(4).await.unwrap(), [0, 0, 0, 0]);
        v.send(&[1]).await;
        let init = v.read(24).await.unwrap();
        v.width = u16::from_be_bytes([init[0], init[1]]);
        v.height = u16::from_be_bytes([init[2], init[3]]);
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        v.read(name_len).await.unwrap();
        // What noVNC sends next: encodings (Raw only keeps this simple).
        v.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await;
        v
    }

    async fn read(&mut self, n: usize) -> Result<Vec<u8>, Closed> {
        while self.buf.len() < n {
            match self.next().await? {
                Some(b) => self.buf.extend_from_slice(&b),
                None => continue,
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next binary message (`None` for other frames), or how the socket closed.
    async fn next(&mut self) -> Result<Option<Bytes>, Closed> {
        let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
            .await
            .expect("the proxy sent nothing for 20 s");
        match msg {
            Some(Ok(Message::Binary(b))) => Ok(Some(b)),
            Some(Ok(Message::Close(frame))) => Err(frame.map_or(
                Closed {
                    code: 1005,
                    reason: String::new(),
                },
                |f| Closed {
                    code: f.code.into(),
                    reason: f.reason.to_string(),
                },
            )),
            Some(Ok(_)) => Ok(None),
            Some(Err(e)) => Err(Closed {
                code: 1006,
                reason: e.to_string(),
            }),
            None => Err(Closed {
                code: 1006,
                reason: String::new(),
            }),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.ws.send(Message::Binary(Bytes::copy_from_slice(bytes))).await;
    }

    fn update_request(&self) -> [u8; 10] {
        let [w0, w1] = self.width.to_be_bytes();
        let [h0, h1] = self.height.to_be_bytes();
        [3, 1, 0, 0, 0, 0, w0, w1, h0, h1]
    }

    /// For `span`, sends an incremental FramebufferUpdateRequest every 100 ms (as noVNC does) and,
    /// when `pointer` is set, a PointerEvent every 500 ms, reading whatever the VM sends. Returns
    /// the close, with the time it came, if the proxy closed the session.
    async fn drive(&mut self, span: Duration, pointer: bool) -> Option<(Closed, Instant)> {
        let end = tokio::time::Instant::now() + span;
        let mut fbur = tokio::time::interval(Duration::from_millis(100));
        let mut moves = tokio::time::interval(Duration::from_millis(500));
        let mut x = 0u16;
        enum Step {
            Done,
            Update,
            Move,
            Read(Result<Option<Bytes>, Closed>),
        }
        loop {
            // Reading is cancel-safe: a tick drops the read future before it took anything.
            let step = tokio::select! {
                () = tokio::time::sleep_until(end) => Step::Done,
                _ = fbur.tick() => Step::Update,
                _ = moves.tick(), if pointer => Step::Move,
                r = self.next() => Step::Read(r),
            };
            match step {
                Step::Done => return None,
                Step::Update => {
                    let req = self.update_request();
                    self.send(&req).await;
                }
                Step::Move => {
                    x = (x + 7) % self.width.max(1);
                    let [x0, x1] = x.to_be_bytes();
                    self.send(&[5, 0, x0, x1, 0, 40]).await;
                    self.last_input = Some(Instant::now());
                }
                Step::Read(Ok(_)) => {}
                Step::Read(Err(closed)) => return Some((closed, Instant::now())),
            }
        }
    }
}

fn assert_idle_close(closed: &Closed, reason: &str) {
    assert_eq!(closed.code, close_code::IDLE, "{closed:?}");
    assert_eq!(closed.reason, reason, "{closed:?}");
}

/// Asserts the close came `limit` after `since`, give or take the scheduling of a busy machine.
fn assert_after(at: Instant, since: Instant, limit: Duration) {
    let took = at - since;
    assert!(
        took + Duration::from_millis(300) >= limit && took <= limit + Duration::from_millis(1500),
        "closed {took:?} after the last input; the timeout is {limit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_idle_timeout_counts_input_not_update_requests() {
    let keys = KeySet::generate().unwrap();
    let mut config = console_proxy::ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        keys.clone(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/web").into(),
    );
    config.idle_timeout = Duration::from_secs(2);
    let proxy = console_proxy::start(config).await.unwrap();
    let url = |viewer| {
        format!(
            "ws://{}/websockify?token={}",
            proxy.addr,
            keys.seal(&claims(viewer)).unwrap()
        )
    };

    let limit = Duration::from_secs(2);
    let idle = async {
        let mut v = Viewer::open(&url(ViewerMode::Interactive)).await;
        let opened = Instant::now();
        let (closed, at) = v
            .drive(Duration::from_secs(10), false)
            .await
            .expect("a session with update requests only was never closed");
        assert_idle_close(&closed, "no keyboard or mouse input for 2 s");
        assert_after(at, opened, limit);
    };
    let busy = async {
        let mut v = Viewer::open(&url(ViewerMode::Interactive)).await;
        let closed = v.drive(Duration::from_millis(3500), true).await;
        assert!(
            closed.is_none(),
            "a session with pointer input was closed: {closed:?}"
        );
        // Input stops: the session is idle from its last pointer event on.
        let last_input = v.last_input.expect("pointer events were sent");
        let (closed, at) = v
            .drive(Duration::from_secs(10), false)
            .await
            .expect("the session was never closed after its input stopped");
        assert_idle_close(&closed, "no keyboard or mouse input for 2 s");
        assert_after(at, last_input, limit);
    };
    // View-only: the input is dropped, but it still shows someone is there.
    let watching = async {
        let mut v = Viewer::open(&url(ViewerMode::ViewOnly)).await;
        let closed = v.drive(Duration::from_millis(3500), true).await;
        assert!(
            closed.is_none(),
            "a watched view-only session was closed: {closed:?}"
        );
    };
    tokio::join!(idle, busy, watching);
    proxy.shutdown().await;
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_from_core_applies_to_new_and_running_sessions() {
    let dir = std::env::temp_dir().join(format!("console-proxy-idle-core-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let core = StandinCore::start(&dir).await.unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _proxy = Kill(
        Command::new(env!("CARGO_BIN_EXE_console-proxy"))
            .args(["serve", "--listen", &listen.to_string()])
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
    let timeout = |ms: &str| [(config_keys::SESSION_IDLE_TIMEOUT_MS.to_owned(), ms.to_owned())].into();
    conn.send(&CoreMessage::Welcome(Welcome {
        version: 1,
        heartbeat_interval_secs: 1,
        console_keys: Some(ConsoleKeys::from_key_set(&keys).unwrap()),
        config: timeout("1500"),
        transfer_keys: None,
        certificate: None,
        peer_identity: None,
    }))
    .await
    .unwrap();
    // The first heartbeat comes after the proxy applied Welcome (keys, settings).
    let first = conn.recv(Duration::from_secs(10)).await.unwrap();
    assert!(matches!(first, AgentMessage::Heartbeat(_)), "{first:?}");
    // Keep reading the proxy's heartbeats (and answering pings) while the test sends updates.
    let (updates, mut to_send) = tokio::sync::mpsc::channel::<CoreMessage>(4);
    let link = tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = to_send.recv() => match msg {
                    Some(m) => conn.send(&m).await.unwrap(),
                    None => break,
                },
                r = conn.recv(Duration::from_secs(30)) => if r.is_err() { break },
            }
        }
    });
    let url = || {
        format!(
            "ws://{listen}/websockify?token={}",
            keys.seal(&claims(ViewerMode::Interactive)).unwrap()
        )
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the proxy did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Welcome's timeout closes an idle session.
    let mut v = Viewer::open(&url()).await;
    let opened = Instant::now();
    let (closed, at) = v
        .drive(Duration::from_secs(10), false)
        .await
        .expect("core's idle timeout did not apply");
    assert_idle_close(&closed, "no keyboard or mouse input for 1500 ms");
    assert_after(at, opened, Duration::from_millis(1500));

    // An update without the key: the command line's value (off) is back.
    updates
        .send(CoreMessage::ConfigUpdate(ConfigUpdate {
            config: Default::default(),
        }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut v = Viewer::open(&url()).await;
    let closed = v.drive(Duration::from_millis(3000), false).await;
    assert!(closed.is_none(), "the idle timeout stayed on: {closed:?}");

    // A new timeout reaches the running session: it has been idle for 3 s already.
    let sent = Instant::now();
    updates
        .send(CoreMessage::ConfigUpdate(ConfigUpdate {
            config: timeout("1000"),
        }))
        .await
        .unwrap();
    let (closed, at) = v
        .drive(Duration::from_secs(10), false)
        .await
        .expect("the running session ignored the new idle timeout");
    assert_idle_close(&closed, "no keyboard or mouse input for 1 s");
    assert!(
        at - sent <= session_recheck() + Duration::from_millis(1500),
        "closed {:?} after the update",
        at - sent
    );
    drop(updates);
    let _ = link.await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn session_recheck() -> Duration {
    console_proxy::session::IDLE_RECHECK
}
