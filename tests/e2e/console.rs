//! The console proxy against QEMU's VNC server and stock noVNC in Chromium.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use systemvm_proto::console::{KeySet, ViewerMode};
use systemvm_proto::ws::close_code;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{self, Proxy, VNC_PASSWORD, claims, qemu};

/// An RFB client over the proxy's WebSocket, reading binary messages as one byte stream.
pub(crate) struct RfbOverWs<S> {
    pub(crate) ws: WebSocketStream<S>,
    pub(crate) buf: Vec<u8>,
}

/// How a WebSocket ended.
#[derive(Debug)]
pub(crate) struct Closed {
    pub(crate) code: u16,
    pub(crate) reason: String,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> RfbOverWs<S> {
    /// Reads exactly `n` bytes, or returns how the socket closed.
    async fn read(&mut self, n: usize) -> Result<Vec<u8>, Closed> {
        while self.buf.len() < n {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("timed out waiting for the proxy");
            match msg {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) =
                        frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string()));
                    return Err(Closed { code, reason });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("WebSocket error: {e}"),
                None => {
                    return Err(Closed {
                        code: 1006,
                        reason: String::new(),
                    });
                }
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await
            .expect("send to proxy");
    }

    /// The browser's half of the handshake, as noVNC does it; returns (width, height, name).
    pub(crate) async fn handshake(&mut self) -> Result<(u16, u16, String), Closed> {
        assert_eq!(self.read(12).await?, b"RFB 003.008\n");
        self.send(b"RFB 003.008\n").await;
        assert_eq!(
            self.read(2).await?,
            vec![1, 1],
            "only security type None is offered"
        );
        self.send(&[1]).await;
        assert_eq!(self.read(4).await?, vec![0, 0, 0, 0], "SecurityResult OK");
        self.send(&[1]).await;
        let init = self.read(24).await?;
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        let name = String::from_utf8(self.read(name_len).await?).expect("utf-8 name");
        Ok((
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
            name,
        ))
    }

    /// Types `text` as a browser's keyboard would: a KeyEvent press and release per character
    /// (X keysyms; shifted characters between Shift_L press and release, `\n` as Return).
    pub(crate) async fn type_text(&mut self, text: &str) {
        const SHIFT_L: u32 = 0xffe1;
        for c in text.chars() {
            let (sym, shifted) = match c {
                '\n' => (0xff0d, false),
                c if c.is_ascii_uppercase() || "~!@#$%^&*()_+{}|:\"<>?".contains(c) => (u32::from(c), true),
                c => (u32::from(c), false),
            };
            let key = |down: u8, sym: u32| {
                let mut m = vec![4u8, down, 0, 0];
                m.extend_from_slice(&sym.to_be_bytes());
                m
            };
            if shifted {
                self.send(&key(1, SHIFT_L)).await;
            }
            self.send(&key(1, sym)).await;
            self.send(&key(0, sym)).await;
            if shifted {
                self.send(&key(0, SHIFT_L)).await;
            }
        }
    }

    /// Asks for a full Raw update and returns the pixels (32 bpp) of the one update that answers it.
    /// A DesktopSize pseudo-rectangle (the guest switched video mode) updates `w`×`h`.
    pub(crate) async fn full_frame(&mut self, w: &mut u16, h: &mut u16) -> Vec<u8> {
        // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 255 max, shifts 16/8/0.
        self.send(&[
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ])
        .await;
        // SetEncodings [Raw, DesktopSize].
        self.send(&[2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21]).await;
        let mut req = vec![3u8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&w.to_be_bytes());
        req.extend_from_slice(&h.to_be_bytes());
        self.send(&req).await;
        let head = self.read(4).await.expect("FramebufferUpdate");
        assert_eq!(head[0], 0, "expected a FramebufferUpdate");
        let mut pixels = Vec::new();
        for _ in 0..u16::from_be_bytes([head[2], head[3]]) {
            let r = self.read(12).await.expect("rectangle header");
            let (rw, rh) = (u16::from_be_bytes([r[4], r[5]]), u16::from_be_bytes([r[6], r[7]]));
            match i32::from_be_bytes([r[8], r[9], r[10], r[11]]) {
                0 => pixels.extend(
                    self.read(usize::from(rw) * usize::from(rh) * 4)
                        .await
                        .expect("raw pixels"),
                ),
                -223 => (*w, *h) = (rw, rh),
                other => panic!("unexpected encoding {other}"),
            }
        }
        pixels
    }
}

pub(crate) async fn open(url: &str, origin: Option<&str>) -> RfbOverWs<MaybeTlsStream<TcpStream>> {
    let mut req = url.into_client_request().expect("request");
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().expect("origin"));
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("WebSocket upgrade");
    RfbOverWs { ws, buf: Vec::new() }
}

pub(crate) fn distinct_pixels(pixels: &[u8]) -> usize {
    let mut seen = std::collections::HashSet::new();
    for px in pixels.chunks_exact(4).step_by(7) {
        seen.insert([px[0], px[1], px[2]]);
        if seen.len() > 8 {
            break;
        }
    }
    seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_screen_through_proxy_with_vnc_auth() {
    let vm = qemu();
    let proxy = Proxy::start().await;
    let token = proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap();
    let mut rfb = open(&proxy.ws_url(&token), None).await;
    let (mut w, mut h, name) = rfb.handshake().await.expect("handshake through the proxy");
    assert_eq!(name, "e2e-vm", "desktop name is the VM's display name");
    assert!(w >= 640 && h >= 400, "{w}x{h}");
    // SeaBIOS draws text within half a second of boot; retry a few frames until it shows.
    let mut colours = 0;
    for _ in 0..40 {
        colours = distinct_pixels(&rfb.full_frame(&mut w, &mut h).await);
        if colours >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(colours >= 2, "the VM's screen stayed uniform");
    assert_eq!(proxy.running.active_sessions(), 1);
    proxy.running.shutdown().await;
}

async fn refusal(url: &str, origin: Option<&str>) -> Closed {
    let mut rfb = open(url, origin).await;
    match rfb.handshake().await {
        Ok(_) => panic!("session was not refused"),
        Err(closed) => closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_close_with_reasons() {
    let vm = qemu();
    let proxy = Proxy::start().await;

    // Wrong VNC password: the proxy's own authentication fails, the browser is told why.
    let c = refusal(
        &proxy.ws_url(&proxy.keys.seal(&claims(vm.vnc, Some("wrong"))).unwrap()),
        None,
    )
    .await;
    assert_eq!(c.code, close_code::TARGET_AUTH, "{c:?}");
    assert!(c.reason.contains("authentication failed"), "{c:?}");

    // No password for a server that wants one.
    let c = refusal(
        &proxy.ws_url(&proxy.keys.seal(&claims(vm.vnc, None)).unwrap()),
        None,
    )
    .await;
    assert_eq!(c.code, close_code::TARGET_AUTH, "{c:?}");
    assert!(c.reason.contains("requires a password"), "{c:?}");

    // Nothing listens there.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = refusal(
        &proxy.ws_url(&proxy.keys.seal(&claims(closed_port, None)).unwrap()),
        None,
    )
    .await;
    assert_eq!(c.code, close_code::TARGET_UNREACHABLE, "{c:?}");
    assert!(c.reason.contains("cannot reach"), "{c:?}");

    // Replay: the second use of one token is refused, the first worked.
    let token = proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap();
    let mut first = open(&proxy.ws_url(&token), None).await;
    first.handshake().await.expect("first use works");
    let c = refusal(&proxy.ws_url(&token), None).await;
    assert_eq!(
        (c.code, c.reason.contains("already used")),
        (close_code::TOKEN_REFUSED, true),
        "{c:?}"
    );

    // Expired, not yet valid, forged, from another key set, empty.
    let mut expired = claims(vm.vnc, Some(VNC_PASSWORD));
    expired.not_before -= 600;
    expired.expires -= 600;
    let c = refusal(&proxy.ws_url(&proxy.keys.seal(&expired).unwrap()), None).await;
    assert_eq!(
        (c.code, c.reason.as_str()),
        (close_code::TOKEN_REFUSED, "console token expired")
    );
    let mut early = claims(vm.vnc, Some(VNC_PASSWORD));
    early.not_before += 3600;
    early.expires += 3600;
    let c = refusal(&proxy.ws_url(&proxy.keys.seal(&early).unwrap()), None).await;
    assert!(c.reason.contains("not valid yet"), "{c:?}");
    let mut forged = proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let c = refusal(&proxy.ws_url(&forged), None).await;
    assert_eq!(
        (c.code, c.reason.as_str()),
        (close_code::TOKEN_REFUSED, "console token is not valid")
    );
    let mut other = KeySet::generate().unwrap();
    other.rotate().unwrap();
    let c = refusal(&proxy.ws_url(&other.seal(&claims(vm.vnc, None)).unwrap()), None).await;
    assert!(c.reason.contains("key this proxy does not hold"), "{c:?}");
    let c = refusal(&proxy.ws_url(""), None).await;
    assert_eq!(c.reason, "console link has no token");

    // Origin: another site may not open the console; the proxy's own origin may.
    let c = refusal(
        &proxy.ws_url(&proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap()),
        Some("https://evil.example"),
    )
    .await;
    assert_eq!(c.code, close_code::FORBIDDEN, "{c:?}");
    let own = format!("http://{}", proxy.running.addr);
    let mut ok = open(
        &proxy.ws_url(&proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap()),
        Some(&own),
    )
    .await;
    ok.handshake().await.expect("same-origin browser is allowed");
    // A token naming its origins overrides the same-origin rule.
    let mut pinned = claims(vm.vnc, Some(VNC_PASSWORD));
    pinned.allowed_origins = vec!["https://ui.example".into()];
    let c = refusal(&proxy.ws_url(&proxy.keys.seal(&pinned).unwrap()), Some(&own)).await;
    assert_eq!(c.code, close_code::FORBIDDEN, "{c:?}");

    // Client address pinning.
    let mut pinned_ip = claims(vm.vnc, Some(VNC_PASSWORD));
    pinned_ip.client_ip = Some("192.0.2.9".parse().unwrap());
    let c = refusal(&proxy.ws_url(&proxy.keys.seal(&pinned_ip).unwrap()), None).await;
    assert!(c.reason.contains("another client address"), "{c:?}");

    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_and_shutdown_close_cleanly() {
    let vm = qemu();
    let proxy = Proxy::start_with(|c| c.max_sessions = 1).await;
    let mut first = open(
        &proxy.ws_url(&proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap()),
        None,
    )
    .await;
    first.handshake().await.expect("first session");
    let c = refusal(
        &proxy.ws_url(&proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap()),
        None,
    )
    .await;
    assert_eq!(c.code, close_code::BUSY, "{c:?}");

    let stopping = tokio::spawn(proxy.running.shutdown());
    let closed = first
        .read(usize::MAX)
        .await
        .expect_err("session ends at shutdown");
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (close_code::GOING_AWAY, "console proxy is shutting down")
    );
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_only_session_still_shows_the_screen() {
    let vm = qemu();
    let proxy = Proxy::start().await;
    let mut c = claims(vm.vnc, Some(VNC_PASSWORD));
    c.viewer = ViewerMode::ViewOnly;
    let mut rfb = open(&proxy.ws_url(&proxy.keys.seal(&c).unwrap()), None).await;
    let (mut w, mut h, _) = rfb.handshake().await.expect("handshake");
    // Key and pointer events are dropped by the proxy; the frame request behind them still works.
    rfb.send(&[4, 1, 0, 0, 0, 0, 0xff, 0x0d]).await;
    rfb.send(&[5, 1, 0, 10, 0, 10]).await;
    assert!(!rfb.full_frame(&mut w, &mut h).await.is_empty());
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_verified_certificate() {
    let vm = qemu();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let tls = console_proxy::config::load_tls(&cert_pem, &key_pem).unwrap();
    let proxy = Proxy::start_with(|c| c.tls = Some(tls)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(proxy.running.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    let token = proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap();
    let url = format!(
        "wss://localhost:{}/websockify?token={token}",
        proxy.running.addr.port()
    );
    let (ws, _) = tokio_tungstenite::client_async(url, tls_stream)
        .await
        .expect("wss upgrade");
    let mut rfb = RfbOverWs { ws, buf: Vec::new() };
    let (w, h, _) = rfb.handshake().await.expect("handshake over wss");
    assert!(w > 0 && h > 0);
    rfb.ws
        .close(Some(CloseFrame {
            code: 1000.into(),
            reason: "".into(),
        }))
        .await
        .unwrap();
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_novnc_shows_the_vm_screen_and_errors() {
    let vm = qemu();
    let proxy = Proxy::start().await;
    let shots = support::artifacts();

    let token = proxy.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap();
    let url = proxy.page_url(&token);
    let shot = shots.join("console-qemu.png");
    let check = tokio::task::spawn_blocking(move || support::check_page(&url, &shot, "connected"))
        .await
        .unwrap();
    assert!(check.matched, "console did not show the VM: {}", check.report);
    assert_eq!(check.report["name"], "e2e-vm");
    assert!(check.report["distinctColours"].as_u64().unwrap() >= 2);

    // The same link again: a replay, refused, and the page says so in words.
    let url = proxy.page_url(&token);
    let shot = shots.join("console-replayed.png");
    let check = tokio::task::spawn_blocking(move || support::check_page(&url, &shot, "failed"))
        .await
        .unwrap();
    assert!(check.matched, "{}", check.report);
    assert_eq!(check.report["code"], close_code::TOKEN_REFUSED);
    assert!(
        check.report["status"].as_str().unwrap().contains("already used"),
        "{}",
        check.report
    );

    let mut expired = claims(vm.vnc, Some(VNC_PASSWORD));
    expired.not_before -= 600;
    expired.expires -= 600;
    let url = proxy.page_url(&proxy.keys.seal(&expired).unwrap());
    let shot = shots.join("console-expired.png");
    let check = tokio::task::spawn_blocking(move || support::check_page(&url, &shot, "failed"))
        .await
        .unwrap();
    assert!(check.matched, "{}", check.report);
    assert!(
        check.report["status"].as_str().unwrap().contains("expired"),
        "{}",
        check.report
    );

    // A session that ends (here: the proxy shuts down) says so, and that a new link is needed.
    let ending = Proxy::start().await;
    let url = ending.page_url(&ending.keys.seal(&claims(vm.vnc, Some(VNC_PASSWORD))).unwrap());
    let shot = shots.join("console-ended.png");
    let page = tokio::task::spawn_blocking(move || support::check_page(&url, &shot, "ended"));
    let waited = std::time::Instant::now();
    while ending.running.active_sessions() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the page never opened a session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give noVNC time to draw the screen before the session ends.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ending.running.shutdown().await;
    let check = page.await.unwrap();
    assert!(check.matched, "{}", check.report);
    assert_eq!(check.report["code"], close_code::GOING_AWAY);
    let status = check.report["status"].as_str().unwrap();
    assert!(
        status.contains("Session ended") && status.contains("shutting down"),
        "{status}"
    );

    let forged = KeySet::generate()
        .unwrap()
        .seal(&claims(vm.vnc, Some(VNC_PASSWORD)))
        .unwrap();
    let url = proxy.page_url(&forged);
    let shot = shots.join("console-forged.png");
    let check = tokio::task::spawn_blocking(move || support::check_page(&url, &shot, "failed"))
        .await
        .unwrap();
    assert!(check.matched, "{}", check.report);
    assert!(
        check.report["status"].as_str().unwrap().contains("not valid"),
        "{}",
        check.report
    );

    proxy.running.shutdown().await;
}
