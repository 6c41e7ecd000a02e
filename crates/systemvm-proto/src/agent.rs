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

/// The protocol version this build speaks. Version 2 added the proxy's `endpoint` in [`Hello`],
/// the store URL in [`StorageLoad`], typed command bodies ([`AgentCommand`]), the job state in
/// [`JobProgress`] and the session claim ([`ClaimSession`] / [`ClaimAnswer`]).
pub const CURRENT_PROTOCOL_VERSION: u32 = 2;
/// The first version whose core answers [`ClaimSession`].
pub const CLAIM_PROTOCOL_VERSION: u32 = 2;
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
    /// A console proxy asks core to claim a console session id fleet-wide (version 2).
    ClaimSession(ClaimSession),
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
    /// New transfer keys (storage VMs: upload tickets and download links); agents of older
    /// builds skip it.
    TransferKeysUpdate(TransferKeysUpdate),
    /// A new TLS certificate for the agent's browser-facing server (`uploadCustomCertificate`);
    /// agents of older builds skip it.
    CertificateUpdate(CertificateUpdate),
    /// Core's answer to a [`ClaimSession`] (version 2).
    ClaimAnswer(ClaimAnswer),
    /// Changed settings for the agent (a dynamic setting was updated); same keys as
    /// [`Welcome::config`]. Agents of older builds skip it.
    ConfigUpdate(ConfigUpdate),
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
    /// The base URL browsers reach the agent at: console proxies' (`https://proxy.example:8443`),
    /// from which core builds console links (version 2), and storage VMs' transfer server, from
    /// which core builds upload and download URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
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
    /// Settings for the agent, by core's setting name (see [`config_keys`]); an agent applies the
    /// keys it knows and ignores the others.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// The transfer keys (storage VMs only): they open upload tickets and download links
    /// ([`crate::transfer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_keys: Option<ConsoleKeys>,
    /// The operator's certificate for the agent's browser-facing server, when one was uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<ServerCertificate>,
    /// The storage VM's identity toward other storage VMs (storage VMs only): a certificate from
    /// core's CA for [`peer_name`] of its id, good for client and server authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<PeerIdentity>,
}

/// A storage VM's certificate for the channel between storage VMs (cross-zone copies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The certificate, PEM (issued by core's CA, the one agents verify core with).
    pub chain_pem: String,
    /// Its private key, PEM (never logged: [`Secret`]).
    pub key_pem: Secret,
}

/// The name in a storage VM's peer certificate: `<vm id>.peer.systemvm.invalid` (lower case; the
/// `.invalid` top-level domain never resolves, so the name is only ever a TLS identity).
pub fn peer_name(vm_id: &str) -> String {
    format!("{}.peer.systemvm.invalid", vm_id.to_ascii_lowercase())
}

/// Where a download's bytes come from when they come from another storage VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSource {
    /// The source storage VM's transfer server, `host:port`.
    pub address: String,
    /// The source storage VM's id: its certificate must carry [`peer_name`] of it.
    pub vm_id: String,
}

/// A TLS certificate for the browser-facing servers of console proxies and storage VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCertificate {
    /// The server certificate, then its chain, PEM.
    pub chain_pem: String,
    /// Its private key, PEM (never logged: [`Secret`]).
    pub key_pem: Secret,
    /// The domain the certificate is for (`example.org` of `*.example.org`).
    pub domain_suffix: String,
    /// Grows with every upload; an agent keeps the highest it saw.
    pub serial: u64,
}

/// A new certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateUpdate {
    /// The certificate.
    pub certificate: ServerCertificate,
}

/// The setting names core sends in [`Welcome::config`] and [`ConfigUpdate::config`].
pub mod config_keys {
    /// Storage VMs: comma-separated CIDRs downloads may reach although internal.
    pub const ALLOWED_INTERNAL_SITES: &str = "secstorage.allowed.internal.sites";
    /// Storage VMs: largest template or ISO, in GiB.
    pub const MAX_TEMPLATE_SIZE_GB: &str = "max.template.iso.size";
    /// Console proxies: a session without browser input for this many milliseconds is closed.
    pub const SESSION_IDLE_TIMEOUT_MS: &str = "consoleproxy.session.timeout";
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
    /// The store the agent serves (`nfs://…`, `file:///…`); core dispatches a store's jobs to an
    /// agent reporting it (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_url: Option<String>,
}

/// Work for an agent. `body` is an [`AgentCommand`] as JSON; it stays a JSON value in the
/// envelope so an agent can answer a command it does not know (`ok: false`) instead of failing
/// the whole message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Chosen by core; unique per connection.
    pub id: String,
    /// What to do.
    #[serde(default)]
    pub body: serde_json::Value,
}

impl Command {
    /// A command carrying `body`.
    pub fn new(id: impl Into<String>, body: &AgentCommand) -> Self {
        Self {
            id: id.into(),
            body: serde_json::to_value(body).unwrap_or_default(),
        }
    }

    /// The typed body; `None` for a command this build does not know.
    pub fn typed(&self) -> Option<AgentCommand> {
        serde_json::from_value(self.body.clone()).ok()
    }
}

/// The commands core sends (version 2), tagged by `"command"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AgentCommand {
    /// Storage VMs: download a template or ISO into the store (idempotent by `job_id`: sending it
    /// again reports the existing job). Answered at once with a [`JobProgress`] snapshot as the
    /// body; progress follows as `JobProgress` messages until the job ends.
    Download(DownloadCommand),
    /// Storage VMs: cancel a download job.
    CancelJob {
        /// The job.
        job_id: String,
    },
    /// Storage VMs: remove an installed template or ISO (its directory in the store). Answered
    /// with `{"removed": [file names]}`; a directory that does not exist is not an error.
    DeleteInstall {
        /// The store the install lives on.
        store_url: String,
        /// Install directory (`template/tmpl/ACCOUNT/ID`).
        path: String,
        /// The install's fencing epoch, higher than any download of it was sent with: a download
        /// still running somewhere must stop and never write the install again (version 2).
        #[serde(default)]
        epoch: u64,
    },
    /// Storage VMs: back a disk up from an NBD export into the store (a snapshot). Answered when
    /// the image is complete with a [`SnapshotBackedUp`] body, or with the reason it failed (no
    /// file is left then).
    SnapshotBackup(SnapshotCommand),
    /// Storage VMs: write an image (a snapshot with its backing chain) to a file, flattened: a
    /// volume on primary storage (`createVolume`, `revertSnapshot`) or a template. Answered when
    /// the file is complete with a [`SnapshotBackedUp`] body (the written file), or with the
    /// reason it failed (an existing file at `to` is replaced only when the new one is complete).
    SnapshotRestore(RestoreCommand),
    /// Storage VMs: remove a snapshot's image (`snapshots/…` only), and its volume's directory
    /// once empty. Answered with `{"removed": bool}`; a file that does not exist is not an error.
    DeleteSnapshot {
        /// The store the image lives on.
        store_url: String,
        /// The image's path.
        path: String,
    },
    /// Storage VMs: copy a file of this agent's store (`template/`, `snapshots/` or `volumes/`) to
    /// an object in an object store (a replica). Answered when the object is complete and
    /// verified, with a [`Replicated`] body; an interrupted replica continues from its journal
    /// when the same command comes again.
    Replicate(ReplicateCommand),
    /// Storage VMs: remove a replica's object (and the multipart uploads still open under its
    /// key). Answered with `{"removed": true}`; an object that does not exist is not an error.
    DeleteObject {
        /// The object store.
        target: ObjectTarget,
        /// The object's key.
        key: String,
    },
    /// Storage VMs: check that the object store answers and the bucket is there with these
    /// credentials. Answered with `{}`, or with the reason it is unusable.
    ProbeObjectStore {
        /// The object store.
        target: ObjectTarget,
    },
    /// Storage VMs: a link that lets anyone holding it GET the object until it expires: a
    /// presigned S3 URL or a Swift temp URL (an extract link served by the object store).
    /// Answered with `{"url": …}`.
    PresignObject {
        /// The object store.
        target: ObjectTarget,
        /// The object's key.
        key: String,
        /// Seconds the link is valid.
        expires_secs: u64,
    },
    /// Storage VMs: bring a replica back into this agent's store (a rebuild after the store was
    /// lost). Answered when the file is in place and hashes to `sha256`, with a [`Fetched`] body;
    /// until then only `<path>.part` exists.
    FetchObject(FetchObjectCommand),
}

/// A replica to bring back: which object, what it must hash to, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchObjectCommand {
    /// The store the file goes to (this agent's).
    pub store_url: String,
    /// The file's path in the store.
    pub path: String,
    /// The object's key.
    pub key: String,
    /// The file's SHA-256 (hex), from its record.
    pub sha256: String,
    /// The object store.
    pub target: ObjectTarget,
}

/// A replica brought back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fetched {
    /// The file's path in the store.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: String,
    /// Files restored beside it (a template's `template.properties`).
    #[serde(default)]
    pub companions: Vec<String>,
}

/// A replica: which file, what it must hash to, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicateCommand {
    /// The store the file lives on (this agent's).
    pub store_url: String,
    /// The file's path in the store.
    pub path: String,
    /// The file's SHA-256 (hex), from its record: a file that hashes otherwise is not replicated.
    pub sha256: String,
    /// The object's key.
    pub key: String,
    /// The object store.
    pub target: ObjectTarget,
}

/// An object store a replica goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case")]
pub enum ObjectTarget {
    /// An S3 (or S3-compatible) bucket.
    S3(S3Target),
    /// An OpenStack Swift container.
    Swift(SwiftTarget),
}

/// How a storage VM authenticates to Swift.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "version", rename_all = "snake_case")]
pub enum SwiftAuth {
    /// Auth v1 (tempauth, swauth): `X-Auth-User` / `X-Auth-Key` on a GET of the auth URL.
    V1 {
        /// `account:user`.
        user: String,
        /// The key.
        key: Secret,
    },
    /// Keystone v3: a password token scoped to a project; the object-store endpoint from the
    /// token's catalog.
    V3 {
        /// User name.
        user: String,
        /// Password.
        password: Secret,
        /// Project name.
        project: String,
        /// Domain name of the user and the project.
        domain: String,
    },
}

/// A Swift container and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwiftTarget {
    /// Auth v1: the auth URL (`http(s)://host:8080/auth/v1.0`); Keystone v3: the identity URL
    /// (`http(s)://host:5000/v3`).
    pub auth_url: String,
    /// Credentials.
    pub auth: SwiftAuth,
    /// The container (it must exist); segments of large objects go to `<container>_segments`.
    pub container: String,
    /// Files up to this size go in one PUT; larger ones as a static large object of segments of
    /// at least this size.
    pub segment_size: u64,
    /// Extra trust anchors (PEM) for endpoints with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The account's temp URL key (core's, per store): set on the account before a temp URL is
    /// signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_url_key: Option<Secret>,
}

/// An S3 endpoint, bucket and credentials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct S3Target {
    /// `http(s)://host[:port]`; TLS is verified against the system's roots and `ca_pem`.
    pub endpoint: String,
    /// Signing region.
    pub region: String,
    /// The bucket (it must exist).
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key (never logged: [`Secret`]).
    pub secret_key: Secret,
    /// Path-style addressing (`endpoint/bucket/key`), as S3-compatible servers mostly need.
    pub path_style: bool,
    /// Extra trust anchors (PEM) for an endpoint with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// A finished replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replicated {
    /// The object's key.
    pub key: String,
    /// Its size (the file's).
    pub size: u64,
    /// The file's SHA-256, as stored in the object's metadata.
    pub sha256: String,
    /// Parts of the upload (1 for a single PUT).
    pub parts: u32,
    /// Parts an earlier attempt had sent, not sent again.
    pub resumed_parts: u32,
    /// Bytes sent by this attempt.
    pub bytes_sent: u64,
    /// Keys of the files replicated beside it (a template's `template.properties`).
    #[serde(default)]
    pub companions: Vec<String>,
}

/// An image file on a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// The store: this storage VM's image store, or an NFS export (primary storage).
    pub store_url: String,
    /// Path relative to the store's root.
    pub path: String,
    /// `QCOW2` or `RAW`.
    pub format: String,
}

/// A restore: which image to read and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreCommand {
    /// The image read, with its backing chain (beside it on the same store).
    pub from: ImageRef,
    /// The file written, in its `format`.
    pub to: ImageRef,
    /// The file written is a template's image (`createTemplate`): `to` is on this storage VM's
    /// own store, in `template/tmpl/<account>/<template id>/`, and `template.properties` is
    /// written beside it once the image is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateInstall>,
}

/// The template a restore installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInstall {
    /// The template's id (`id`, and the directory's name).
    pub id: String,
    /// Its display text (`description`).
    pub description: String,
    /// Public (`public`).
    #[serde(default)]
    pub public: bool,
}

/// A snapshot backup: which export to read and where the image goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCommand {
    /// The store to write into; the agent refuses a store it does not serve.
    pub store_url: String,
    /// The NBD server, `host:port` (libvirt's pull-mode backup of the disk); unused with `file`.
    #[serde(default)]
    pub nbd: String,
    /// The export name (the disk's target, e.g. `vda`); unused with `file`.
    #[serde(default)]
    pub export: String,
    /// Back up this image file instead of an export (a volume on primary storage that no
    /// running guest has attached): its data clusters through its backing chain; full only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<ImageRef>,
    /// Directory in the store: `snapshots/<account>/<volume>`.
    pub dir: String,
    /// The image's file name (`<snapshot>.qcow2`).
    pub name: String,
    /// An incremental backup: the dirty-bitmap context and the previous image's file name (in
    /// `dir`) it is backed by; `None`: a full backup of the allocated extents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<IncrementalFrom>,
    /// At most this many bytes per second are read from the source (`snapshot.backup.rate`,
    /// so a backup leaves primary storage to its guests); `None`: as fast as it goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
}

/// What an incremental backup builds on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncrementalFrom {
    /// The metadata context of the dirty extents (`qemu:dirty-bitmap:backup-vda`).
    pub context: String,
    /// The previous snapshot's file name.
    pub backing: String,
}

/// A finished snapshot backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBackedUp {
    /// The image's path in the store.
    pub file: String,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// The image's size.
    pub physical_size: u64,
    /// Bytes read from the source by this attempt.
    pub bytes_read: u64,
    /// Bytes of the image kept from an interrupted attempt of the same command (its journal
    /// matched): not read again.
    #[serde(default)]
    pub resumed: u64,
    /// SHA-256 of the image (hex).
    pub sha256: String,
}

/// A download into the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadCommand {
    /// Job id chosen by core (the template's id).
    pub job_id: String,
    /// The store to install into; the agent refuses a store it does not serve.
    pub store_url: String,
    /// Source URL (http or https).
    pub url: String,
    /// Install directory (`template/tmpl/ACCOUNT/ID`).
    pub path: String,
    /// Declared format (QCOW2, RAW, VHD, ISO, OVA).
    pub format: String,
    /// Expected checksum, `{ALGO}hex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Description for `template.properties`.
    #[serde(default)]
    pub description: String,
    /// Fencing epoch of the install (version 2): core raises it each time it sends the download
    /// to a connection, and when it deletes the install. An agent that learns of a higher epoch
    /// for the install (a newer `Download`, a `DeleteInstall`, or the epoch recorded beside the
    /// install) stops writing and reporting it; 0 from cores that do not fence.
    #[serde(default)]
    pub epoch: u64,
    /// The bytes come from another storage VM (a cross-zone copy): `url` names the source by its
    /// [`peer_name`], the connection goes to `peer.address` over TLS verified against core's CA
    /// in both directions; else `url` is fetched as any download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerSource>,
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// The command's (job's) id.
    pub id: String,
    /// Percent done, 0–100.
    #[serde(default)]
    pub percent: u8,
    /// A word or two on the current step.
    #[serde(default)]
    pub status: String,
    /// Where the job is (version 2); `None` from version-1 agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobPhase>,
    /// Bytes transferred so far (version 2).
    #[serde(default)]
    pub bytes: u64,
    /// Bytes expected, when known (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Why the job failed (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What a completed download installed (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<InstalledImage>,
    /// The fencing epoch the job runs under (its `DownloadCommand::epoch`); core drops reports
    /// of an older epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// A job's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Accepted, waiting for a slot.
    Queued,
    /// Running.
    Running,
    /// Done.
    Completed,
    /// Ended with an error.
    Failed,
    /// Cancelled.
    Cancelled,
    /// A phase this build does not know.
    #[serde(other)]
    Unknown,
}

impl JobPhase {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// An installed template or ISO.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledImage {
    /// Path of the image file in the store.
    pub file: String,
    /// Detected format (CloudStack name).
    #[serde(default)]
    pub format: String,
    /// Bytes on the store.
    #[serde(default)]
    pub physical_size: u64,
    /// Virtual disk size (the file size for ISOs and raw images).
    #[serde(default)]
    pub virtual_size: u64,
    /// SHA-256 of the installed file, hex.
    #[serde(default)]
    pub sha256: String,
}

/// A console proxy claims a session id before it opens the console: a token opens one session
/// across every proxy of the fleet, not one per proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimSession {
    /// Request id, echoed in the answer.
    pub id: String,
    /// The token's session id.
    pub session_id: String,
    /// The VM whose console it is.
    #[serde(default)]
    pub vm_id: String,
    /// The token's expiry (Unix seconds): core may forget the claim after it.
    pub expires: u64,
}

/// Core's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// The claim's request id.
    pub id: String,
    /// `true`: first use, go ahead; `false`: refuse the session.
    pub granted: bool,
    /// Why not, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Settings changed while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// The agent's settings, all of them (replaces what `Welcome` or an earlier update gave).
    pub config: BTreeMap<String, String>,
}

/// New transfer keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferKeysUpdate {
    /// The full live key set (replaces the agent's).
    pub transfer_keys: ConsoleKeys,
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
            endpoint: Some("https://proxy.example:8443".into()),
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
                    store_url: Some("nfs://10.0.0.5/export".into()),
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
            ..Default::default()
        }));
        round_trip_agent(AgentMessage::JobProgress(JobProgress {
            id: "j".into(),
            percent: 100,
            status: "Download Complete".into(),
            state: Some(JobPhase::Completed),
            bytes: 10,
            total: Some(10),
            error: None,
            installed: Some(InstalledImage {
                file: "template/tmpl/a/t/x.qcow2".into(),
                format: "QCOW2".into(),
                physical_size: 10,
                virtual_size: 20,
                sha256: "ab".into(),
            }),
            epoch: Some(3),
        }));
        round_trip_agent(AgentMessage::ClaimSession(ClaimSession {
            id: "1".into(),
            session_id: "s".into(),
            vm_id: "vm".into(),
            expires: 9,
        }));
        round_trip_core(CoreMessage::ClaimAnswer(ClaimAnswer {
            id: "1".into(),
            granted: false,
            reason: Some("used".into()),
        }));
        round_trip_core(CoreMessage::ConfigUpdate(ConfigUpdate {
            config: [(config_keys::MAX_TEMPLATE_SIZE_GB.to_owned(), "5".to_owned())].into(),
        }));
        round_trip_core(CoreMessage::Welcome(Welcome {
            version: 1,
            heartbeat_interval_secs: 5,
            console_keys: Some(keys()),
            config: BTreeMap::from([("a".into(), "b".into())]),
            transfer_keys: Some(keys()),
            certificate: None,
            peer_identity: None,
        }));
        round_trip_core(CoreMessage::CertificateUpdate(CertificateUpdate {
            certificate: ServerCertificate {
                chain_pem: "-----BEGIN CERTIFICATE-----".into(),
                key_pem: Secret::from("k"),
                domain_suffix: "example.org".into(),
                serial: 2,
            },
        }));
        round_trip_core(CoreMessage::Refused(Refused { reason: "bad".into() }));
        round_trip_core(CoreMessage::Command(Command {
            id: "c".into(),
            body: serde_json::json!({"x": 1}),
        }));
        round_trip_core(CoreMessage::KeysUpdate(KeysUpdate { console_keys: keys() }));
        round_trip_core(CoreMessage::TransferKeysUpdate(TransferKeysUpdate {
            transfer_keys: keys(),
        }));
    }

    #[test]
    fn typed_commands() {
        let cmds = [
            AgentCommand::Download(DownloadCommand {
                job_id: "t1".into(),
                store_url: "nfs://h/e".into(),
                url: "http://x/y.qcow2".into(),
                path: "template/tmpl/a/t1".into(),
                format: "QCOW2".into(),
                checksum: None,
                description: "d".into(),
                epoch: 2,
                peer: Some(PeerSource {
                    address: "10.0.0.2:8090".into(),
                    vm_id: "b".into(),
                }),
            }),
            AgentCommand::CancelJob { job_id: "t1".into() },
            AgentCommand::SnapshotBackup(SnapshotCommand {
                store_url: "nfs://h/e".into(),
                nbd: "10.0.0.9:10809".into(),
                export: "vda".into(),
                dir: "snapshots/a/v".into(),
                name: "s2.qcow2".into(),
                incremental: Some(IncrementalFrom {
                    context: "qemu:dirty-bitmap:backup-vda".into(),
                    backing: "s1.qcow2".into(),
                }),
                file: None,
                max_rate: Some(4 << 20),
            }),
            AgentCommand::SnapshotBackup(SnapshotCommand {
                store_url: "nfs://h/e".into(),
                nbd: String::new(),
                export: String::new(),
                dir: "snapshots/a/v".into(),
                name: "s3.qcow2".into(),
                incremental: None,
                file: Some(ImageRef {
                    store_url: "nfs://p/primary".into(),
                    path: "vm/root.qcow2".into(),
                    format: "QCOW2".into(),
                }),
                max_rate: None,
            }),
            AgentCommand::SnapshotRestore(RestoreCommand {
                from: ImageRef {
                    store_url: "nfs://h/e".into(),
                    path: "snapshots/a/v/s2.qcow2".into(),
                    format: "QCOW2".into(),
                },
                to: ImageRef {
                    store_url: "nfs://p/primary".into(),
                    path: "restored/v2.qcow2".into(),
                    format: "RAW".into(),
                },
                template: None,
            }),
            AgentCommand::SnapshotRestore(RestoreCommand {
                from: ImageRef {
                    store_url: "nfs://h/e".into(),
                    path: "snapshots/a/v/s2.qcow2".into(),
                    format: "QCOW2".into(),
                },
                to: ImageRef {
                    store_url: "nfs://h/e".into(),
                    path: "template/tmpl/a/t9/t9.qcow2".into(),
                    format: "QCOW2".into(),
                },
                template: Some(TemplateInstall {
                    id: "t9".into(),
                    description: "from s2".into(),
                    public: true,
                }),
            }),
            AgentCommand::DeleteInstall {
                store_url: "nfs://h/e".into(),
                path: "template/tmpl/a/t1".into(),
                epoch: 3,
            },
            AgentCommand::DeleteSnapshot {
                store_url: "nfs://h/e".into(),
                path: "snapshots/a/v/s1.qcow2".into(),
            },
            AgentCommand::Replicate(ReplicateCommand {
                store_url: "nfs://h/e".into(),
                path: "template/tmpl/a/t1/t1.qcow2".into(),
                sha256: "ab".repeat(32),
                key: "template/t1/t1.qcow2".into(),
                target: ObjectTarget::S3(S3Target {
                    endpoint: "https://s3.example".into(),
                    region: "us-east-1".into(),
                    bucket: "b".into(),
                    access_key: "AK".into(),
                    secret_key: "SK".into(),
                    path_style: true,
                    ca_pem: None,
                }),
            }),
        ];
        for c in cmds {
            let m = CoreMessage::Command(Command::new("c1", &c));
            let text = serde_json::to_string(&m).unwrap();
            let CoreMessage::Command(back) = serde_json::from_str(&text).unwrap() else {
                panic!("not a command: {text}")
            };
            assert_eq!(back.typed(), Some(c), "{text}");
        }
        // A command of a later version reads as an envelope whose body is not typed.
        let m: CoreMessage =
            serde_json::from_str(r#"{"type":"Command","id":"c","body":{"command":"snapshot_copy","x":1}}"#)
                .unwrap();
        let CoreMessage::Command(c) = m else {
            panic!("not a command")
        };
        assert_eq!(c.typed(), None);
    }

    /// A version-1 agent's messages read in this version and the other way round.
    #[test]
    fn version_one_and_two_read_each_other() {
        // v1 JobProgress (no state) and v1 Hello (no endpoint) read here.
        let p: AgentMessage =
            serde_json::from_str(r#"{"type":"JobProgress","id":"j","percent":5,"status":"x"}"#).unwrap();
        let AgentMessage::JobProgress(p) = p else {
            panic!("not progress")
        };
        assert_eq!((p.state, p.bytes, p.installed), (None, 0, None));
        // What this version sends still has every field a v1 reader requires.
        let v2 = serde_json::to_value(AgentMessage::JobProgress(JobProgress {
            id: "j".into(),
            percent: 7,
            status: "s".into(),
            state: Some(JobPhase::Running),
            ..Default::default()
        }))
        .unwrap();
        for field in ["type", "id", "percent", "status"] {
            assert!(v2.get(field).is_some(), "{field} missing in {v2}");
        }
        // A phase added later reads as Unknown rather than failing the message.
        let p: JobProgress = serde_json::from_str(r#"{"id":"j","state":"verifying"}"#).unwrap();
        assert_eq!(p.state, Some(JobPhase::Unknown));
        // A v1 core skips the claim (unknown type), which is why proxies only claim from v2 cores.
        #[derive(Deserialize, Debug)]
        #[serde(tag = "type")]
        enum V1Agent {
            Hello,
            Heartbeat,
            Answer,
            JobProgress,
            #[serde(other)]
            Unknown,
        }
        let claim = serde_json::to_string(&AgentMessage::ClaimSession(ClaimSession {
            id: "1".into(),
            session_id: "s".into(),
            vm_id: String::new(),
            expires: 1,
        }))
        .unwrap();
        assert!(matches!(
            serde_json::from_str::<V1Agent>(&claim).unwrap(),
            V1Agent::Unknown
        ));
        let _ = (
            V1Agent::Hello,
            V1Agent::Heartbeat,
            V1Agent::Answer,
            V1Agent::JobProgress,
        );
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
