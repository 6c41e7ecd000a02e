//! A connection flood against the real binary on loopback: slowloris requests (headers trickled a
//! byte at a time, never finished) and half-open WebSocket upgrades (a complete upgrade request,
//! then silence: with a bad token, and replaying one valid link), each kind many times the
//! proxy's connection limit. A real console session (QEMU's VNC server through the proxy: the RFB
//! handshake and a whole-screen update) must still open within a few seconds, and every slowloris
//! connection must be closed by the proxy within its header timeout. The flood is bounded and stops
//! by itself.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Rfb, claims, ws_url};
use systemvm_proto::console::KeySet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Connections of each kind (slowloris, half-open upgrades).
const FLOOD: usize = 2000;
/// The proxy's session limit; its connection limit is 2 × this + 64 = 164, far below the flood.
const MAX_SESSIONS: usize = 50;
/// The proxy's deadline for a request's headers (`server::REQUEST_TIMEOUT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the real session may take to open and show the screen.
const OPEN_WITHIN: Duration = Duration::from_secs(5);
/// Connects in flight at once (the listen backlog is 1024).
const CONNECTING: usize = 128;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The soft limit on open files of this process (`/proc/self/limits`).
fn open_files_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace()
        .nth(3)
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Paces the flood's connects and counts them.
struct Gate {
    in_flight: Semaphore,
    connected: AtomicUsize,
}

impl Gate {
    async fn connect(&self, addr: SocketAddr) -> TcpStream {
        let _permit = self.in_flight.acquire().await.unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        self.connected.fetch_add(1, Ordering::Relaxed);
        tcp
    }
}

/// Keeps a request's headers coming a byte every 500 ms, never finishing them, until the proxy
/// closes the connection or `stop`; returns how long after connecting the proxy closed it.
async fn slowloris(addr: SocketAddr, gate: Arc<Gate>, stop: Instant) -> Option<Duration> {
    let mut tcp = gate.connect(addr).await;
    let connected = Instant::now();
    let head = format!("GET /console?token=x HTTP/1.1\r\nHost: {addr}\r\nX-Padding: ");
    let mut bytes = head.bytes().chain(std::iter::repeat(b'a'));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(n) if n > 0 => {}
                _ => return Some(connected.elapsed()),
            },
            _ = tick.tick() => {
                if Instant::now() >= stop {
                    return None;
                }
                let byte = [bytes.next().unwrap()];
                if tcp.write_all(&byte).await.is_err() {
                    return Some(connected.elapsed());
                }
            }
        }
    }
}

/// Sends a complete WebSocket upgrade request and then neither reads nor writes; the socket is
/// held until `stop`.
async fn half_open(addr: SocketAddr, token: String, gate: Arc<Gate>, stop: Instant) {
    let mut tcp = gate.connect(addr).await;
    let request = format!(
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let _ = tcp.write_all(request.as_bytes()).await;
    tokio::time::sleep_until(stop.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_opens_during_a_slowloris_and_half_open_upgrade_flood() {
    let test_started = Instant::now();
    // Client sockets of both kinds, plus QEMU, the proxy's pipes and some slack.
    let budget = open_files_limit();
    assert!(
        budget >= 2 * FLOOD + 256,
        "the flood needs {} open files, the soft limit is {budget}: raise it (ulimit -n)",
        2 * FLOOD + 256
    );
    let vm = common::vm();
    let dir = std::env::temp_dir().join(format!("console-proxy-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keys = KeySet::generate().unwrap();
    let key_file = dir.join("keys.json");
    std::fs::write(&key_file, keys.to_json().unwrap()).unwrap();
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.join("proxy.log");
    let _proxy = Kill(
        Command::new(env!("CARGO_BIN_EXE_console-proxy"))
            .args(["serve", "--listen", &addr.to_string(), "--keys"])
            .arg(&key_file)
            .args(["--max-sessions", &MAX_SESSIONS.to_string()])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    common::wait_until(Duration::from_secs(20), "the proxy did not listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    let _ = vm.vnc;

    // The flood: both kinds interleaved, every connection held until `stop` unless the proxy
    // closes it first.
    let flood_started = Instant::now();
    let stop = flood_started + Duration::from_secs(25);
    let gate = Arc::new(Gate {
        in_flight: Semaphore::new(CONNECTING),
        connected: AtomicUsize::new(0),
    });
    let replayed = keys.seal(&claims()).unwrap();
    let mut slow = Vec::with_capacity(FLOOD);
    let mut open = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        slow.push(tokio::spawn(slowloris(addr, gate.clone(), stop)));
        let token = if i % 2 == 0 {
            replayed.clone()
        } else {
            format!("garbage{i}")
        };
        open.push(tokio::spawn(half_open(addr, token, gate.clone(), stop)));
    }
    common::wait_until(Duration::from_secs(20), "the flood did not connect", || {
        gate.connected.load(Ordering::Relaxed) == 2 * FLOOD
    })
    .await;
    let flooded = flood_started.elapsed();

    // A real console now: upgrade, RFB handshake, a whole-screen update.
    let opening = Instant::now();
    let url = ws_url(addr, &keys, &claims());
    let shown = tokio::time::timeout(OPEN_WITHIN, async {
        let mut rfb = Rfb::open(&url).await.expect("the console opens during the flood");
        rfb.frame()
            .await
            .expect("the console shows the screen during the flood")
    })
    .await;
    let took = opening.elapsed();
    let pixels = shown.unwrap_or_else(|_| {
        panic!(
            "no console within {OPEN_WITHIN:?} during the flood; proxy log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(pixels > 0);

    // Every slowloris connection was closed by the proxy (made room for others, or out of time
    // for its headers) within the header timeout.
    let mut closed_after = Vec::with_capacity(FLOOD);
    for task in slow {
        closed_after.push(task.await.unwrap());
    }
    let still_open = closed_after.iter().filter(|c| c.is_none()).count();
    assert_eq!(still_open, 0, "slowloris connections the proxy never closed");
    let longest = closed_after.iter().flatten().max().copied().unwrap_or_default();
    assert!(
        longest <= HEADER_TIMEOUT + Duration::from_secs(3),
        "a slowloris connection lasted {longest:?}"
    );
    for task in open {
        task.abort();
    }
    println!(
        "flood of {FLOOD} slowloris + {FLOOD} half-open upgrades connected in {flooded:?}; \
         console opened with a {pixels}-byte screen in {took:?}; longest slowloris {longest:?}; \
         test took {:?}",
        test_started.elapsed()
    );
    assert!(test_started.elapsed() < Duration::from_secs(45));
    let _ = std::fs::remove_dir_all(&dir);
}
