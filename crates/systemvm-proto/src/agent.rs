//! The agent channel: JSON messages between systemvm-core and the system-VM agents that dial in to it
//! (`wss://CORE:8250/agent`), see `docs/agent-protocol.md`.
//!
//! Every WebSocket text frame carries one message, a JSON object tagged by its `"type"` field. Agents
//! send [`AgentMessage`]s, core sends [`CoreMessage`]s. The first agent message is [`Hello`], answered
//! by [`Welcome`] or [`Refused`]; both carry the sender's protocol `version`.
//!
//! Invariants (what lets neighbouring versions interoperate during a rolling upgrade):
//! * readers ignore unknown fields (no `deny_unknown_fields` here) and every field added after
//!   version 1 carries `#[serde(default)]`, so an older sender's message still reads;
//! * a message of an unknown `type` reads as the `Unknown` variant, which readers skip (log and go
//!   on) instead of failing the connection;
//! * a field is never removed or given a new meaning: a change of meaning is a new field, and raising
//!   [`MINIMUM_PROTOCOL_VERSION`] is the only way to stop talking to old peers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Secret;

/// The protocol version this build speaks.
pub const CURRENT_PROTOCOL_VERSION: u32 = 1;
/// The oldest peer version this build still talks to.
pub const MINIMUM_PROTOCOL_VERSION: u32 = 1;
/// Largest message accepted on the agent channel, in bytes (both directions).
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// A peer's protocol version is outside what this build supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolVersionError {
    /// Older than [`MINIMUM_PROTOCOL_VERSION`].
    #[error("protocol version {found} is too old (minimum {minimum})")]
    TooOld {
        /// The peer's version.
        found: u32,
        /// The oldest version supported.
        minimum: u32,
    },
    /// Version 0 is never valid (an absent or zero field).
    #[error("protocol version 0 is not valid")]
    Zero,
}

/// Checks a peer's protocol version. Newer peers are accepted: they promise to read what this
/// version sends (unknown fields and types are ignored on both sides).
pub fn validate_protocol_version(found: u32) -> Result<(), ProtocolVersionError> {
    if found == 0 {
        return Err(ProtocolVersionError::Zero);
    }
    if found < MINIMUM_PROTOCOL_VERSION {
        return Err(ProtocolVersionError::TooOld {
            found,
            minimum: MINIMUM_PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// What a system VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentRole {
    /// A console proxy (`console-proxy`).
    #[serde(alias = "consoleproxy")]
    ConsoleProxy,
    /// A secondary-storage VM (`ssvm-agent`); CloudStack's `secondarystoragevm`.
    #[serde(alias = "secondarystoragevm")]
    SecStorage,
}

impl AgentRole {
    /// The wire and database name (`consoleproxy` | `secstorage`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsoleProxy => "consoleproxy",
            Self::SecStorage => "secstorage",
        }
    }

    /// CloudStack's `systemvmtype` (`consoleproxy` | `secondarystoragevm`).
    pub fn cloudstack_type(self) -> &'static str {
        match self {
            Self::ConsoleProxy => "consoleproxy",
            Self::SecStorage => "secondarystoragevm",
        }
    }

    /// Parses either name, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "consoleproxy" => Some(Self::ConsoleProxy),
            "secstorage" | "secondarystoragevm" => Some(Self::SecStorage),
            _ => None,
        }
    }
}

/// A message from an agent to core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AgentMessage {
    /// The first message on a connection.
    Hello(Hello),
    /// Periodic liveness and load report.
    Heartbeat(Heartbeat),
    /// The result of a [`Command`].
    Answer(Answer),
    /// Progress of a long command (a storage job).
    JobProgress(JobProgress),
    /// A message type this build does not know; readers skip it.
    #[serde(other)]
    Unknown,
}

/// A message from core to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CoreMessage {
    /// The agent is accepted.
    Welcome(Welcome),
    /// The agent is not accepted; core closes the connection after this.
    Refused(Refused),
    /// Work for the agent; answered by an [`Answer`] with the same id.
    Command(Command),
    /// New console-token keys (rotation).
    KeysUpdate(KeysUpdate),
    /// A message type this build does not know; readers skip it.
    #[serde(other)]
    Unknown,
}

/// An agent introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's protocol version.
    pub version: u32,
    /// What the agent is; must match its registration.
    pub role: AgentRole,
    /// The id core issued when the VM was registered.
    pub vm_id: String,
    /// The secret core issued with the id.
    pub secret: Secret,
    /// Optional features the agent supports (free-form names).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The agent's software version (for display).
    #[serde(default)]
    pub software_version: String,
}

/// Core accepts an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Core's protocol version.
    pub version: u32,
    /// How often the agent sends a [`Heartbeat`], in seconds.
    pub heartbeat_interval_secs: u64,
    /// The console-token keys (console proxies only).
    #[serde(default)]
    pub console_keys: Option<ConsoleKeys>,
    /// Settings for the agent (free-form).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// Core refuses an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Why, in words (never says which of id or secret was wrong).
    pub reason: String,
}

/// Console-token keys in the key-file shape (`{"primary": ID, "keys": [{"id", "key"}]}`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleKeys {
    /// The id of the key that seals.
    pub primary: u32,
    /// All live keys.
    pub keys: Vec<ConsoleKey>,
}

impl std::fmt::Debug for ConsoleKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleKeys")
            .field("primary", &self.primary)
            .field("ids", &self.keys.iter().map(|k| k.id).collect::<Vec<_>>())
            .finish()
    }
}

/// One console-token key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleKey {
    /// Key id.
    pub id: u32,
    /// 32 raw bytes, base64url.
    pub key: Secret,
}

#[cfg(feature = "token")]
impl ConsoleKeys {
    /// The keys of a key set.
    pub fn from_key_set(set: &crate::console::KeySet) -> Result<Self, crate::console::TokenSealError> {
        let json = set.to_json()?;
        serde_json::from_str(&json).map_err(|_| crate::console::TokenSealError::BadClaims)
    }

    /// Checks the keys and builds a key set.
    pub fn to_key_set(&self) -> Result<crate::console::KeySet, crate::console::KeyFileError> {
        let json = serde_json::json!({
            "primary": self.primary,
            "keys": self.keys.iter().map(|k| serde_json::json!({"id": k.id, "key": k.key.expose()})).collect::<Vec<_>>(),
        });
        crate::console::KeySet::from_json(&json.to_string())
    }
}

/// Liveness and load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's current load.
    #[serde(default)]
    pub load: Load,
}

/// An agent's load; each role fills its own part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Console sessions (console proxies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleLoad>,
    /// Storage jobs and stores (storage VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageLoad>,
}

/// A console proxy's sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLoad {
    /// Open sessions.
    #[serde(default)]
    pub active_sessions: u64,
    /// Most sessions the proxy accepts.
    #[serde(default)]
    pub max_sessions: u64,
}

/// A storage VM's jobs and store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageLoad {
    /// Jobs running.
    #[serde(default)]
    pub jobs_running: u64,
    /// Jobs waiting.
    #[serde(default)]
    pub jobs_queued: u64,
    /// Store health in words (`ok`, or what is wrong).
    #[serde(default)]
    pub store_health: String,
    /// Store capacity in bytes, when known.
    #[serde(default)]
    pub capacity_total: Option<u64>,
    /// Bytes used, when known.
    #[serde(default)]
    pub capacity_used: Option<u64>,
}

/// Work for an agent. The body's shape depends on the command; no command is defined yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Chosen by core; unique per connection.
    pub id: String,
    /// What to do.
    #[serde(default)]
    pub body: serde_json::Value,
}

/// The result of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The command's id.
    pub id: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default)]
    pub body: serde_json::Value,
    /// What went wrong, when not `ok`.
    #[serde(default)]
    pub error: Option<String>,
}

/// Progress of a long command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// The command's (job's) id.
    pub id: String,
    /// Percent done, 0–100.
    #[serde(default)]
    pub percent: u8,
    /// A word or two on the current step.
    #[serde(default)]
    pub status: String,
}

/// New console-token keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeysUpdate {
    /// The full live key set (replaces the agent's).
    pub console_keys: ConsoleKeys,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_agent(m: AgentMessage) {
        let text = serde_json::to_string(&m).unwrap();
        let back: AgentMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m, "{text}");
    }

    fn round_trip_core(m: CoreMessage) {
        let text = serde_json::to_string(&m).unwrap();
        let back: CoreMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m, "{text}");
    }

    fn keys() -> ConsoleKeys {
        ConsoleKeys {
            primary: 2,
            keys: vec![ConsoleKey {
                id: 2,
                key: Secret::from("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            }],
        }
    }

    #[test]
    fn round_trips() {
        round_trip_agent(AgentMessage::Hello(Hello {
            version: CURRENT_PROTOCOL_VERSION,
            role: AgentRole::ConsoleProxy,
            vm_id: "v1".into(),
            secret: Secret::from("s"),
            capabilities: vec!["console".into()],
            software_version: "0.1.0".into(),
        }));
        round_trip_agent(AgentMessage::Heartbeat(Heartbeat {
            load: Load {
                console: Some(ConsoleLoad {
                    active_sessions: 1,
                    max_sessions: 10,
                }),
                storage: Some(StorageLoad {
                    jobs_running: 1,
                    jobs_queued: 2,
                    store_health: "ok".into(),
                    capacity_total: Some(10),
                    capacity_used: None,
                }),
            },
        }));
        round_trip_agent(AgentMessage::Answer(Answer {
            id: "c1".into(),
            ok: false,
            body: serde_json::Value::Null,
            error: Some("no".into()),
        }));
        round_trip_agent(AgentMessage::JobProgress(JobProgress {
            id: "j".into(),
            percent: 50,
            status: "copying".into(),
        }));
        round_trip_core(CoreMessage::Welcome(Welcome {
            version: 1,
            heartbeat_interval_secs: 5,
            console_keys: Some(keys()),
            config: BTreeMap::from([("a".into(), "b".into())]),
        }));
        round_trip_core(CoreMessage::Refused(Refused { reason: "bad".into() }));
        round_trip_core(CoreMessage::Command(Command {
            id: "c".into(),
            body: serde_json::json!({"x": 1}),
        }));
        round_trip_core(CoreMessage::KeysUpdate(KeysUpdate { console_keys: keys() }));
    }

    /// A version-1 peer that does not send the optional fields.
    #[test]
    fn old_messages_read() {
        let hello: AgentMessage = serde_json::from_str(
            r#"{"type":"Hello","version":1,"role":"consoleproxy","vm_id":"v","secret":"s"}"#,
        )
        .unwrap();
        let AgentMessage::Hello(h) = hello else {
            panic!("not a hello: {hello:?}")
        };
        assert!(h.capabilities.is_empty());
        assert_eq!(h.software_version, "");
        let hb: AgentMessage = serde_json::from_str(r#"{"type":"Heartbeat"}"#).unwrap();
        assert_eq!(hb, AgentMessage::Heartbeat(Heartbeat::default()));
        let w: CoreMessage =
            serde_json::from_str(r#"{"type":"Welcome","version":1,"heartbeat_interval_secs":5}"#).unwrap();
        let CoreMessage::Welcome(w) = w else {
            panic!("not a welcome")
        };
        assert!(w.console_keys.is_none() && w.config.is_empty());
    }

    /// A newer peer that sends fields and message types this build does not know.
    #[test]
    fn new_messages_read() {
        let hello: AgentMessage = serde_json::from_str(
            r#"{"type":"Hello","version":7,"role":"secstorage","vm_id":"v","secret":"s",
                "capabilities":["x"],"software_version":"9","zone_hint":"z","extra":{"a":[1]}}"#,
        )
        .unwrap();
        let AgentMessage::Hello(h) = hello else {
            panic!("not a hello")
        };
        assert_eq!(h.version, 7);
        assert_eq!(h.role, AgentRole::SecStorage);
        assert!(validate_protocol_version(h.version).is_ok());
        let hb: AgentMessage = serde_json::from_str(
            r#"{"type":"Heartbeat","load":{"console":{"active_sessions":3,"max_sessions":9,"gpu":1},"network":{}}}"#,
        )
        .unwrap();
        let AgentMessage::Heartbeat(hb) = hb else {
            panic!("not a heartbeat")
        };
        assert_eq!(hb.load.console.map(|c| c.active_sessions), Some(3));
        let unknown: CoreMessage = serde_json::from_str(r#"{"type":"Reboot","when":"now"}"#).unwrap();
        assert_eq!(unknown, CoreMessage::Unknown);
        let unknown: AgentMessage = serde_json::from_str(r#"{"type":"Metrics","x":1}"#).unwrap();
        assert_eq!(unknown, AgentMessage::Unknown);
    }

    #[test]
    fn version_validation() {
        assert!(validate_protocol_version(CURRENT_PROTOCOL_VERSION).is_ok());
        assert!(validate_protocol_version(MINIMUM_PROTOCOL_VERSION).is_ok());
        assert!(validate_protocol_version(CURRENT_PROTOCOL_VERSION + 1).is_ok());
        assert_eq!(validate_protocol_version(0), Err(ProtocolVersionError::Zero));
    }

    #[test]
    fn roles_parse_both_names() {
        assert_eq!(
            AgentRole::parse("secondarystoragevm"),
            Some(AgentRole::SecStorage)
        );
        assert_eq!(AgentRole::parse("ConsoleProxy"), Some(AgentRole::ConsoleProxy));
        assert_eq!(AgentRole::parse("router"), None);
        let r: AgentRole = serde_json::from_str(r#""secondarystoragevm""#).unwrap();
        assert_eq!(r, AgentRole::SecStorage);
    }

    #[cfg(feature = "token")]
    #[test]
    fn console_keys_convert() {
        let set = crate::console::KeySet::generate().unwrap();
        let keys = ConsoleKeys::from_key_set(&set).unwrap();
        let back = keys.to_key_set().unwrap();
        assert_eq!(back.ids(), set.ids());
        assert!(!format!("{keys:?}").contains(keys.keys[0].key.expose()));
    }
}
