//! The boot configuration a system VM reads from its NoCloud config drive: `user-data`
//! (`#cloud-config` followed by one JSON object, as core's `fleet::seed` writes it) and the
//! kernel command line (docs/systemvm-boot.md). Pure parsing, no I/O: the image's init
//! (`systemvm-image`) feeds it the bytes it read.
//!
//! Invariants: parsing never panics on any input (property-tested, fuzzed); a seed without a
//! role, VM id, core URL, secret or CA is refused with the missing field's name; the secret is
//! never part of an error message or a `Debug` rendering.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::agent::AgentRole;

/// Largest `user-data` accepted (core's are a few KiB: the CA dominates).
pub const MAX_USER_DATA: usize = 256 * 1024;

/// A static IPv4 configuration (`network` in the seed); DHCP when the seed has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNet {
    /// Address and prefix length.
    pub address: Ipv4Addr,
    /// Prefix length, 0–32.
    pub prefix: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
}

/// Everything the init needs to start the role's agent.
#[derive(Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// The role.
    pub role: AgentRole,
    /// Core's id of this VM.
    pub vm_id: String,
    /// The VM's name (also its host name).
    pub name: String,
    /// Core's agent endpoints (`wss://…/agent`), in order of preference.
    pub core: Vec<String>,
    /// The agent's one-start secret.
    pub secret: String,
    /// Core's CA (PEM).
    pub ca_pem: String,
    /// The storage VM's staging store URL.
    pub store_url: Option<String>,
    /// The URL core knows that store by, when the VM reaches it at another address.
    pub store_as: Option<String>,
    /// Internal ranges a storage VM may download from.
    pub allow_internal: Vec<String>,
    /// A console proxy's session limit.
    pub max_sessions: u32,
    /// The URL browsers reach a console proxy at.
    pub public_url: Option<String>,
    /// The storage VM's transfer URL as browsers reach it.
    pub transfer_url: Option<String>,
    /// Static networking; `None` = DHCP.
    pub network: Option<StaticNet>,
}

impl fmt::Debug for BootConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootConfig")
            .field("role", &self.role)
            .field("vm_id", &self.vm_id)
            .field("name", &self.name)
            .field("core", &self.core)
            .field("secret", &"<redacted>")
            .field("store_url", &self.store_url)
            .field("store_as", &self.store_as)
            .field("allow_internal", &self.allow_internal)
            .field("max_sessions", &self.max_sessions)
            .field("public_url", &self.public_url)
            .field("transfer_url", &self.transfer_url)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

/// Why a seed was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// Larger than [`MAX_USER_DATA`].
    #[error("user-data is {0} bytes, more than the {MAX_USER_DATA} accepted")]
    TooLarge(usize),
    /// Not `#cloud-config` followed by a JSON object with a `systemvm` map.
    #[error("user-data is not #cloud-config with a JSON systemvm map: {0}")]
    Syntax(String),
    /// A required field is missing or empty.
    #[error("user-data lacks systemvm.{0}")]
    Missing(&'static str),
    /// A field has a value the init cannot use.
    #[error("user-data has a bad systemvm.{field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it (never the secret).
        why: String,
    },
}

#[derive(Deserialize)]
struct Doc {
    systemvm: Raw,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Raw {
    role: String,
    vm_id: String,
    name: String,
    core: Vec<String>,
    secret: String,
    ca: String,
    store_url: Option<String>,
    store_as: Option<String>,
    allow_internal: Vec<String>,
    max_sessions: Option<u32>,
    public_url: Option<String>,
    transfer_url: Option<String>,
    network: Option<RawNet>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNet {
    address: String,
    gateway: Option<String>,
    dns: Vec<String>,
}

/// Parses `user-data`. `cmdline` (the kernel's) may override the role with `systemvm.role=`.
pub fn parse(user_data: &[u8], cmdline: &str) -> Result<BootConfig, SeedError> {
    if user_data.len() > MAX_USER_DATA {
        return Err(SeedError::TooLarge(user_data.len()));
    }
    let text = std::str::from_utf8(user_data).map_err(|e| SeedError::Syntax(e.to_string()))?;
    let body = text
        .strip_prefix("#cloud-config")
        .ok_or_else(|| SeedError::Syntax("no #cloud-config header".into()))?;
    // serde_json's messages quote no input beyond a position, so the secret cannot leak here.
    let doc: Doc = serde_json::from_str(body.trim()).map_err(|e| SeedError::Syntax(e.to_string()))?;
    let raw = doc.systemvm;
    let role_name = cmdline_value(cmdline, "systemvm.role").unwrap_or(&raw.role);
    let role = match role_name {
        "consoleproxy" => AgentRole::ConsoleProxy,
        "secstorage" => AgentRole::SecStorage,
        "" => return Err(SeedError::Missing("role")),
        other => {
            return Err(SeedError::Invalid {
                field: "role",
                why: format!("{other:?} is neither consoleproxy nor secstorage"),
            });
        }
    };
    let required = |v: String, field: &'static str| {
        if v.trim().is_empty() {
            Err(SeedError::Missing(field))
        } else {
            Ok(v)
        }
    };
    let vm_id = required(raw.vm_id, "vm_id")?;
    if !vm_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(SeedError::Invalid {
            field: "vm_id",
            why: "only letters, digits and '-' are allowed".into(),
        });
    }
    let name = if raw.name.is_empty() {
        vm_id.clone()
    } else {
        raw.name
    };
    if !is_host_name(&name) {
        return Err(SeedError::Invalid {
            field: "name",
            why: "not a host name (letters, digits, '-', at most 63)".into(),
        });
    }
    let core: Vec<String> = raw.core.into_iter().filter(|u| !u.trim().is_empty()).collect();
    if core.is_empty() {
        return Err(SeedError::Missing("core"));
    }
    if let Some(bad) = core.iter().find(|u| !u.starts_with("wss://")) {
        return Err(SeedError::Invalid {
            field: "core",
            why: format!("{bad:?} is not a wss:// URL"),
        });
    }
    let secret = required(raw.secret, "secret")?;
    let ca_pem = required(raw.ca, "ca")?;
    if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(SeedError::Invalid {
            field: "ca",
            why: "no PEM certificate".into(),
        });
    }
    let store_url = raw.store_url.filter(|s| !s.is_empty());
    if role == AgentRole::SecStorage && store_url.is_none() {
        return Err(SeedError::Missing("store_url"));
    }
    let network = raw.network.map(parse_net).transpose()?;
    Ok(BootConfig {
        role,
        vm_id,
        name,
        core,
        secret,
        ca_pem,
        store_url,
        store_as: raw.store_as.filter(|s| !s.is_empty()),
        allow_internal: raw.allow_internal,
        max_sessions: raw.max_sessions.unwrap_or(50).max(1),
        public_url: raw.public_url.filter(|s| !s.is_empty()),
        transfer_url: raw.transfer_url.filter(|s| !s.is_empty()),
        network,
    })
}

fn parse_net(raw: RawNet) -> Result<StaticNet, SeedError> {
    let bad = |why: String| SeedError::Invalid {
        field: "network",
        why,
    };
    let (addr, prefix) = raw
        .address
        .split_once('/')
        .ok_or_else(|| bad(format!("address {:?} is not ADDRESS/PREFIX", raw.address)))?;
    let address: Ipv4Addr = addr
        .parse()
        .map_err(|_| bad(format!("{addr:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| bad(format!("prefix {prefix:?} is not 0-32")))?;
    let ip = |s: &str| {
        s.parse::<Ipv4Addr>()
            .map_err(|_| bad(format!("{s:?} is not an IPv4 address")))
    };
    let gateway = raw
        .gateway
        .as_deref()
        .filter(|g| !g.is_empty())
        .map(ip)
        .transpose()?;
    let dns = raw.dns.iter().map(|d| ip(d)).collect::<Result<_, _>>()?;
    Ok(StaticNet {
        address,
        prefix,
        gateway,
        dns,
    })
}

/// The value of `key=value` on a kernel command line (the last one wins, as the kernel's).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

    fn seed(extra: serde_json::Value) -> Vec<u8> {
        let mut m = serde_json::json!({
            "role": "secstorage", "vm_id": "0b1e4c4c-3a5e", "name": "s-0b1e4c4c-VM",
            "zone_id": "z", "core": ["wss://10.0.2.2:8250/agent"], "secret": "s3cr\"et",
            "ca": CA, "store_url": "nfs://10.0.2.2/export", "allow_internal": ["10.0.2.2/32"],
            "max_sessions": 5,
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            m[k] = v.clone();
        }
        format!("#cloud-config\n{}\n", serde_json::json!({ "systemvm": m })).into_bytes()
    }

    #[test]
    fn reads_what_core_writes() {
        let c = parse(&seed(serde_json::json!({})), "console=ttyS0 systemvm.seed=cidata").unwrap();
        assert_eq!(c.role, AgentRole::SecStorage);
        assert_eq!(c.secret, "s3cr\"et");
        assert_eq!(c.store_url.as_deref(), Some("nfs://10.0.2.2/export"));
        assert_eq!(c.allow_internal, ["10.0.2.2/32"]);
        assert_eq!(c.network, None);
        assert!(!format!("{c:?}").contains("s3cr"), "secret in Debug");
    }

    #[test]
    fn static_network_and_role_override() {
        let c = parse(
            &seed(serde_json::json!({"network": {"address": "192.0.2.10/24", "gateway": "192.0.2.1", "dns": ["192.0.2.53"]}})),
            "systemvm.role=consoleproxy",
        )
        .unwrap();
        assert_eq!(c.role, AgentRole::ConsoleProxy);
        let n = c.network.unwrap();
        assert_eq!((n.address, n.prefix), ("192.0.2.10".parse().unwrap(), 24));
        assert_eq!(n.gateway, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(n.dns, vec!["192.0.2.53".parse::<Ipv4Addr>().unwrap()]);
    }

    #[test]
    fn refusals_name_the_field_and_never_the_secret() {
        let cases = [
            (serde_json::json!({"secret": ""}), SeedError::Missing("secret")),
            (serde_json::json!({"core": []}), SeedError::Missing("core")),
            (
                serde_json::json!({"store_url": null}),
                SeedError::Missing("store_url"),
            ),
            (serde_json::json!({"role": ""}), SeedError::Missing("role")),
        ];
        for (extra, want) in cases {
            assert_eq!(parse(&seed(extra), "").unwrap_err(), want);
        }
        for extra in [
            serde_json::json!({"core": ["http://x/agent"]}),
            serde_json::json!({"ca": "nope"}),
            serde_json::json!({"role": "router"}),
            serde_json::json!({"name": "a b"}),
            serde_json::json!({"vm_id": "../x"}),
            serde_json::json!({"network": {"address": "10.0.0.1"}}),
            serde_json::json!({"network": {"address": "10.0.0.1/33"}}),
        ] {
            let e = parse(&seed(extra), "").unwrap_err().to_string();
            assert!(!e.contains("s3cr"), "{e}");
        }
        assert!(matches!(parse(b"{}", ""), Err(SeedError::Syntax(_))));
        assert!(matches!(
            parse(&vec![b' '; MAX_USER_DATA + 1], ""),
            Err(SeedError::TooLarge(_))
        ));
    }

    #[test]
    fn cmdline_last_value_wins() {
        assert_eq!(cmdline_value("a=1 b=2 a=3", "a"), Some("3"));
        assert_eq!(cmdline_value("quiet", "quiet"), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), cmd in ".{0,64}") {
            let _ = parse(&bytes, &cmd);
            let mut framed = b"#cloud-config\n".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = parse(&framed, &cmd);
        }
    }
}
