//! Console proxy: bridges a hypervisor's VNC server to stock noVNC in the browser over WebSocket.
//!
//! Code map:
//! - [`config`]: validated settings ([`ProxyConfig`]).
//! - [`server`]: listener, TLS, HTTP routing, WebSocket upgrade; [`server::start`] runs a proxy.
//! - [`session`]: one console session: token checks, VNC connect, the two RFB handshakes, relay.
//! - [`transport`]: WebSocket framing over the raw upgraded socket (server frames written in front of
//!   the relay buffer, client frames unmasked in place).
//! - [`replay`]: the one-time store of spent session ids and pending attempts.
//! - [`web`]: the console page, its assets and noVNC, from the web root.
//!
//! Architecture invariants:
//! - The browser never receives a hypervisor credential: the proxy authenticates to the VNC server and
//!   offers the browser RFB security type None only.
//! - Bad input from either side ends that session with a close reason; it never panics the process.
//! - The relay copies each byte once in user space (socket → relay buffer → socket) and waits for the
//!   slower side (backpressure); it never polls. Each write toward the browser has a deadline.
//! - A console link is spent only when its session is accepted ([`session`]), never by a refusal
//!   for the session limit or an abandoned upgrade.
#![forbid(unsafe_code)]

pub mod config;
pub mod core_link;
pub mod replay;
pub mod server;
pub mod session;
pub mod transport;
pub mod web;

pub use config::ProxyConfig;
pub use server::{RunningProxy, start};

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
