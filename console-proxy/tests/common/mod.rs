//! Helpers shared by the console proxy's integration tests that need a real VNC server: one QEMU
//! VM per test binary, tokens for it, a proxy in process, and a browser's side of a session (RFB
//! over tokio-tungstenite, as noVNC speaks it).
#![allow(dead_code, reason = "each test binary uses its own part of these helpers")]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use systemvm_proto::Secret;
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, KeySet, ViewerMode, VmRef};
use systemvm_tests::qemu::{VNC_PASSWORD, VncVm};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest wait for any one message from the proxy.
pub(crate) const READ_WAIT: Duration = Duration::from_secs(20);

/// The VM of this test binary (its tests run in parallel and share it).
pub(crate) fn vm() -> &'static VncVm {
    static VM: OnceLock<VncVm> = OnceLock::new();
    VM.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let name = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
        let dir = std::env::temp_dir().join(format!("console-proxy-{name}-{}", std::process::id()));
        VncVm::start(&dir).expect("QEMU with a VNC server")
    })
}

/// Claims for the VM's console, valid for five minutes, with a fresh session id.
pub(crate) fn claims() -> ConsoleTokenClaims {
    claims_for(vm().vnc)
}

/// Claims for a VNC console at `vnc` (the VM's password), valid for five minutes.
pub(crate) fn claims_for(vnc: SocketAddr) -> ConsoleTokenClaims {
    let now = console_proxy::unix_now();
    ConsoleTokenClaims {
        target: ConsoleTarget::Vnc {
            host: vnc.ip().to_string(),
            port: vnc.port(),
            password: Some(Secret(VNC_PASSWORD.to_owned())),
        },
        vm: VmRef {
            id: "vm-test".into(),
            display_name: "test-vm".into(),
        },
        session_id: systemvm_proto::console::new_session_id().expect("session id"),
        not_before: now,
        expires: now + 300,
        client_ip: None,
        allowed_origins: vec![],
        viewer: ViewerMode::Interactive,
        keyboard_locale: None,
    }
}

/// A proxy in process on a free loopback port, after `adjust` changed its settings.
pub(crate) async fn start_proxy(
    adjust: impl FnOnce(&mut console_proxy::ProxyConfig),
) -> (console_proxy::RunningProxy, KeySet) {
    let keys = KeySet::generate().expect("keys");
    let mut config = console_proxy::ProxyConfig::new(
        "127.0.0.1:0".parse().expect("address"),
        keys.clone(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/web").into(),
    );
    adjust(&mut config);
    let proxy = console_proxy::start(config).await.expect("proxy starts");
    (proxy, keys)
}

/// `ws://ADDR/websockify?token=…` for `claims` sealed with `keys`.
pub(crate) fn ws_url(addr: SocketAddr, keys: &KeySet, claims: &ConsoleTokenClaims) -> String {
    format!(
        "ws://{addr}/websockify?token={}",
        keys.seal(claims).expect("seal")
    )
}

/// How the proxy ended a session, as the browser saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closed {
    pub(crate) code: u16,
    pub(crate) reason: String,
}

/// The browser's side of a console session.
pub(crate) struct Rfb {
    pub(crate) ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    buf: Vec<u8>,
    /// Pings the proxy sent (tungstenite answers them).
    pub(crate) pings: usize,
    pub(crate) width: u16,
    pub(crate) height: u16,
}

impl Rfb {
    /// Opens the WebSocket (the upgrade only).
    pub(crate) async fn connect(url: &str) -> Rfb {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket upgrade");
        Rfb {
            ws,
            buf: Vec::new(),
            pings: 0,
            width: 0,
            height: 0,
        }
    }

    /// Opens the WebSocket and completes the RFB handshake.
    pub(crate) async fn open(url: &str) -> Result<Rfb, Closed> {
        let mut rfb = Rfb::connect(url).await;
        rfb.handshake().await?;
        Ok(rfb)
    }

    /// The browser's half of the handshake (RFB 3.8, security None, shared).
    pub(crate) async fn handshake(&mut self) -> Result<(), Closed> {
        assert_eq!(self.read(12).await?, b"RFB 003.008\n");
        self.send(b"RFB 003.008\n").await;
        assert_eq!(self.read(2).await?, [1, 1], "security type None only");
        self.send(&[1]).await;
        assert_eq!(self.read(4).await?, [0, 0, 0, 0], "SecurityResult OK");
        self.send(&[1]).await;
        let init = self.read(24).await?;
        self.width = u16::from_be_bytes([init[0], init[1]]);
        self.height = u16::from_be_bytes([init[2], init[3]]);
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        self.read(name_len).await?;
        // 32 bpp true colour, Raw only.
        self.send(&[
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ])
        .await;
        self.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await;
        Ok(())
    }

    /// A non-incremental FramebufferUpdateRequest for the whole screen.
    pub(crate) fn full_request(&self) -> [u8; 10] {
        let [w0, w1] = self.width.to_be_bytes();
        let [h0, h1] = self.height.to_be_bytes();
        [3, 0, 0, 0, 0, 0, w0, w1, h0, h1]
    }

    /// Asks for the whole screen and reads the one FramebufferUpdate that answers; returns its
    /// pixel bytes (Raw, 32 bpp).
    pub(crate) async fn frame(&mut self) -> Result<usize, Closed> {
        let req = self.full_request();
        self.send(&req).await;
        let head = self.read(4).await?;
        assert_eq!(head[0], 0, "a FramebufferUpdate");
        let mut pixels = 0;
        for _ in 0..u16::from_be_bytes([head[2], head[3]]) {
            let r = self.read(12).await?;
            let (w, h) = (u16::from_be_bytes([r[4], r[5]]), u16::from_be_bytes([r[6], r[7]]));
            match i32::from_be_bytes([r[8], r[9], r[10], r[11]]) {
                0 => {
                    let n = usize::from(w) * usize::from(h) * 4;
                    self.read(n).await?;
                    pixels += n;
                }
                other => panic!("unexpected encoding {other}"),
            }
        }
        Ok(pixels)
    }

    /// Reads exactly `n` payload bytes, or how the session closed.
    pub(crate) async fn read(&mut self, n: usize) -> Result<Vec<u8>, Closed> {
        while self.buf.len() < n {
            match self.next().await? {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => continue,
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads until the session closes.
    pub(crate) async fn closed(&mut self) -> Closed {
        loop {
            match self.next().await {
                Ok(_) => {}
                Err(closed) => return closed,
            }
        }
    }

    /// The next binary message (`None` for other frames), or how the socket closed.
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>, Closed> {
        let msg = tokio::time::timeout(READ_WAIT, self.ws.next())
            .await
            .expect("the proxy sent nothing for 20 s");
        match msg {
            Some(Ok(Message::Binary(b))) => Ok(Some(b)),
            Some(Ok(Message::Ping(_))) => {
                self.pings += 1;
                Ok(None)
            }
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

    /// Sends one binary message (errors are left to the next read).
    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        let _ = self.ws.send(Message::Binary(Bytes::copy_from_slice(bytes))).await;
    }

    /// Closes the WebSocket as a browser does when the tab closes.
    pub(crate) async fn close(mut self) {
        let _ = self.ws.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await {}
    }
}

/// Waits until `cond` holds, checking every 20 ms; panics with `what` after `within`.
pub(crate) async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what} (waited {within:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
