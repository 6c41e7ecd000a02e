//! Wire types shared by systemvm-core and the system-VM agents.
//!
//! Architecture invariant: this crate does no I/O and depends on no runtime (no tokio, hyper, database
//! driver or cloud SDK). Every decoder here takes untrusted bytes and returns an error instead of
//! panicking; the decoders are property-tested and fuzzed (`fuzz/`).
//!
//! - [`agent`]: the agent channel's versioned JSON messages (system VMs ↔ core).
//! - [`console`]: console-token claims and, behind the `token` feature, their AEAD sealing.
//! - [`rfb`]: the RFB (VNC) handshake as sans-I/O state machines, for the console proxy's security proxy.
//! - [`seed`]: a system VM's boot configuration from its NoCloud config drive (core → the image).
//! - [`transfer`]: upload tickets and download links a storage VM honours, signed by core.
//! - [`ws`]: RFC 6455 WebSocket frame headers, for the console proxy's zero-copy relay.
#![forbid(unsafe_code)]

pub mod agent;
pub mod console;
pub mod rfb;
pub mod seed;
pub mod transfer;
pub mod ws;

/// A string that holds a secret: serialised as is, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret's text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}
