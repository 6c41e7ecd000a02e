//! Console tokens: what a console proxy needs to open one console session, sealed by whoever issues it.
//!
//! A token is `base64url(version ‖ key_id ‖ nonce ‖ AEAD(claims JSON))`, see `docs/console-token.md`.
//! The version byte and key id are clear text and bound to the ciphertext as associated data, so a proxy
//! picks the right key without trying them all, and keys rotate with several live at once.
//!
//! Invariant: claims carry hypervisor credentials, so a token is encrypted, never only signed, and the
//! browser that holds it cannot read them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Secret;

#[cfg(feature = "token")]
mod seal;
#[cfg(feature = "token")]
pub use seal::{KeyFileError, KeySet, TOKEN_VERSION, TokenKey, TokenSealError, new_session_id};

/// Longest token accepted, in characters; a longer one is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 4096;

/// What one console token grants: one session to one VM's console, in a time window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleTokenClaims {
    /// Where the console lives and how to reach it.
    pub target: ConsoleTarget,
    /// The VM whose console this is.
    pub vm: VmRef,
    /// One-time session id: a proxy accepts it once and refuses it afterwards.
    pub session_id: String,
    /// Not usable before this time (Unix seconds).
    pub not_before: u64,
    /// Not usable from this time on (Unix seconds).
    pub expires: u64,
    /// When set, only a browser connecting from this address may use the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// When non-empty, the WebSocket's `Origin` must be one of these (e.g. `https://cloud.example.com`).
    /// When empty, the proxy applies its own origin policy (same origin as the proxy, or its allow-list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// Whether the viewer may send input.
    #[serde(default)]
    pub viewer: ViewerMode,
    /// Keyboard layout of the guest (CloudStack's VM `keyboard` detail, e.g. `en-us`, `ja`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_locale: Option<String>,
}

/// The hypervisor endpoint of a console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ConsoleTarget {
    /// A VNC server reached over TCP (QEMU/KVM, libvirt).
    Vnc {
        /// Host name or address of the VNC server.
        host: String,
        /// TCP port of the VNC server.
        port: u16,
        /// VNC password, when the server asks for VNC Authentication.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<Secret>,
    },
    /// A XenServer/XCP-ng console reached through an HTTP CONNECT tunnel.
    XenTunnel {
        /// Host name or address of the XenServer host.
        host: String,
        /// TLS port of the host (443).
        port: u16,
        /// Console path with its `ref` query, as XAPI returns it.
        tunnel_url: String,
        /// XAPI session reference sent as the `session_id` cookie.
        tunnel_session: Secret,
        /// VNC password, when one is set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<Secret>,
    },
    /// A VMware WebMKS console reached over WebSocket.
    VmwareWs {
        /// `wss://` URL of the ESXi host's ticket endpoint.
        url: String,
        /// WebMKS ticket.
        ticket: Secret,
    },
}

impl ConsoleTarget {
    /// A short name of the target kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ConsoleTarget::Vnc { .. } => "vnc",
            ConsoleTarget::XenTunnel { .. } => "xen-tunnel",
            ConsoleTarget::VmwareWs { .. } => "vmware-ws",
        }
    }
}

/// Identity of the VM behind a console.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    /// The VM's id (CloudStack uuid).
    pub id: String,
    /// Name shown to the user (window title, desktop name).
    #[serde(default)]
    pub display_name: String,
}

/// Whether a viewer may send keyboard and mouse input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViewerMode {
    /// Full control.
    #[default]
    Interactive,
    /// Screen only; the proxy drops input events.
    ViewOnly,
}

/// Why a token's claims may not be used now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// The token's window has not started.
    #[error("token not valid yet (valid from {not_before}, now {now})")]
    NotYetValid {
        /// Start of the window.
        not_before: u64,
        /// Current time.
        now: u64,
    },
    /// The token's window has ended.
    #[error("token expired")]
    Expired {
        /// End of the window.
        expires: u64,
        /// Current time.
        now: u64,
    },
    /// The window is empty or absurdly long.
    #[error("token has an invalid validity window")]
    BadWindow,
}

/// Longest validity window a proxy accepts (a day): tokens are meant to live minutes.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// Clock skew tolerated between the issuer and the proxy on `not_before`.
pub const CLOCK_SKEW_SECS: u64 = 30;

impl ConsoleTokenClaims {
    /// Checks the validity window against `now` (Unix seconds).
    pub fn check_time(&self, now: u64) -> Result<(), ClaimsError> {
        if self.expires <= self.not_before || self.expires - self.not_before > MAX_TOKEN_LIFETIME_SECS {
            return Err(ClaimsError::BadWindow);
        }
        if now.saturating_add(CLOCK_SKEW_SECS) < self.not_before {
            return Err(ClaimsError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        if now >= self.expires {
            return Err(ClaimsError::Expired {
                expires: self.expires,
                now,
            });
        }
        Ok(())
    }

    /// Whether a WebSocket `Origin` header value is allowed by the token's own list.
    /// `None` means the token leaves the decision to the proxy's policy.
    pub fn origin_allowed(&self, origin: &str) -> Option<bool> {
        if self.allowed_origins.is_empty() {
            return None;
        }
        Some(
            self.allowed_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ConsoleTokenClaims {
        ConsoleTokenClaims {
            target: ConsoleTarget::Vnc {
                host: "10.0.0.5".into(),
                port: 5901,
                password: Some("secret12".into()),
            },
            vm: VmRef {
                id: "6c1e".into(),
                display_name: "web-01".into(),
            },
            session_id: "abc".into(),
            not_before: 1000,
            expires: 1300,
            client_ip: None,
            allowed_origins: vec![],
            viewer: ViewerMode::Interactive,
            keyboard_locale: None,
        }
    }

    #[test]
    fn time_window() {
        let c = sample();
        assert_eq!(c.check_time(1000), Ok(()));
        assert_eq!(c.check_time(980), Ok(()), "skew tolerated");
        assert!(matches!(c.check_time(900), Err(ClaimsError::NotYetValid { .. })));
        assert!(matches!(c.check_time(1300), Err(ClaimsError::Expired { .. })));
        let mut long = sample();
        long.expires = long.not_before + MAX_TOKEN_LIFETIME_SECS + 1;
        assert_eq!(long.check_time(1000), Err(ClaimsError::BadWindow));
        let mut empty = sample();
        empty.expires = empty.not_before;
        assert_eq!(empty.check_time(1000), Err(ClaimsError::BadWindow));
    }

    #[test]
    fn origins() {
        let mut c = sample();
        assert_eq!(c.origin_allowed("https://a.example"), None);
        c.allowed_origins = vec!["https://a.example".into()];
        assert_eq!(c.origin_allowed("https://A.example"), Some(true));
        assert_eq!(c.origin_allowed("https://b.example"), Some(false));
    }

    #[test]
    fn debug_hides_password() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("secret12"), "{text}");
    }

    #[test]
    fn json_shape() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["target"]["kind"], "vnc");
        assert_eq!(json["target"]["password"], "secret12");
        assert_eq!(json["viewer"], "interactive");
        assert!(json.get("client_ip").is_none());
        // Readers tolerate fields they do not know (newer issuers).
        let mut v = json.clone();
        v["future_field"] = serde_json::json!(1);
        let back: ConsoleTokenClaims = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }
}
