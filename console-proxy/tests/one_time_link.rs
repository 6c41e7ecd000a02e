//! A console link is spent when its session is accepted, not before: a refusal at the session limit
//! or a browser that leaves during the WebSocket upgrade (or before it finished its RFB handshake)
//! leaves the link usable; a link that opened a session is refused on reuse. Against QEMU's VNC
//! server, with the proxy in process.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Rfb, claims, start_proxy, wait_until, ws_url};
use systemvm_proto::ws::close_code;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn assert_already_used(closed: &common::Closed) {
    assert_eq!(closed.code, close_code::TOKEN_REFUSED, "{closed:?}");
    assert!(closed.reason.contains("already used"), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_refusal_leaves_the_link_usable() {
    let (proxy, keys) = start_proxy(|c| c.max_sessions = 1).await;
    let first_url = ws_url(proxy.addr, &keys, &claims());
    let mut first = Rfb::open(&first_url).await.expect("the first session opens");
    first.frame().await.expect("the first session shows the screen");

    let second_url = ws_url(proxy.addr, &keys, &claims());
    let busy = Rfb::open(&second_url)
        .await
        .err()
        .expect("a second session at the limit is refused");
    assert_eq!(busy.code, close_code::BUSY, "{busy:?}");
    // Still busy: the link is refused for the limit again, not as used.
    let busy = Rfb::open(&second_url).await.err().expect("still at the limit");
    assert_eq!(busy.code, close_code::BUSY, "{busy:?}");

    first.close().await;
    wait_until(Duration::from_secs(5), "the first session did not end", || {
        proxy.active_sessions() == 0
    })
    .await;
    let mut second = Rfb::open(&second_url)
        .await
        .expect("the link refused as busy opens a session once there is room");
    second.frame().await.expect("the second session shows the screen");

    // Both links opened sessions: both are spent.
    for url in [&first_url, &second_url] {
        assert_already_used(&Rfb::open(url).await.err().expect("reuse is refused"));
    }
    second.close().await;
    assert_already_used(&Rfb::open(&second_url).await.err().expect("reuse is refused"));
    proxy.shutdown().await;
}

/// Sends the upgrade request for `token` on a raw socket; reads the answer when `read_answer`;
/// then leaves (closes the socket).
async fn upgrade_and_leave(addr: SocketAddr, token: &str, read_answer: bool) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    if read_answer {
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
                .await
                .expect("the proxy answered the upgrade")
                .unwrap();
            assert_eq!(n, 1, "the proxy closed during the upgrade");
            answer.push(byte[0]);
        }
        assert!(
            answer.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_leaves_before_its_session_starts_can_retry_the_link() {
    let (proxy, keys) = start_proxy(|_| {}).await;
    let claims = claims();
    let token = keys.seal(&claims).unwrap();
    let url = format!("ws://{}/websockify?token={token}", proxy.addr);

    // Gone before reading the upgrade's answer.
    upgrade_and_leave(proxy.addr, &token, false).await;
    // Gone right after the upgrade, before a word of RFB.
    upgrade_and_leave(proxy.addr, &token, true).await;
    // Gone in the middle of the RFB handshake (after its ProtocolVersion).
    let mut partway = Rfb::connect(&url).await;
    assert_eq!(partway.read(12).await.unwrap(), b"RFB 003.008\n");
    partway.send(b"RFB 003.008\n").await;
    assert_eq!(partway.read(2).await.unwrap(), [1, 1]);
    drop(partway);
    wait_until(
        Duration::from_secs(5),
        "the abandoned attempts did not end",
        || proxy.active_sessions() == 0,
    )
    .await;

    let mut rfb = Rfb::open(&url).await.expect("the retried link opens the console");
    rfb.frame().await.expect("the session shows the screen");
    assert_already_used(&Rfb::open(&url).await.err().expect("reuse is refused"));
    rfb.close().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_attempt_with_the_same_link_replaces_a_pending_one() {
    let (proxy, keys) = start_proxy(|_| {}).await;
    let url = ws_url(proxy.addr, &keys, &claims());
    // Upgraded, greeted, silent (a tab that hangs, or a connection that died without a FIN).
    let mut pending = Rfb::connect(&url).await;
    assert_eq!(pending.read(12).await.unwrap(), b"RFB 003.008\n");

    let mut newer = Rfb::open(&url)
        .await
        .expect("the newer attempt opens the console");
    let closed = pending.closed().await;
    assert_eq!(closed.code, close_code::TOKEN_REFUSED, "{closed:?}");
    assert!(closed.reason.contains("opened again"), "{closed:?}");
    newer.frame().await.expect("the session shows the screen");
    assert_already_used(&Rfb::open(&url).await.err().expect("reuse is refused"));
    assert_eq!(proxy.active_sessions(), 1);
    newer.close().await;
    proxy.shutdown().await;
}
