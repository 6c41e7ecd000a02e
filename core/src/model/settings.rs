//! Settings: every setting core knows (name, type, default, scope, whether it applies at once),
//! typed accessors, zone overrides, updates, and what system VMs are told of them.
//!
//! Invariants:
//! * each setting is declared once, here, with its default; nothing else writes a default;
//! * a stored value always passed its definition's type and range check, so a typed accessor
//!   never falls back (the defaults pass their own checks: a unit test);
//! * the cache (`Shared::settings`) is written only after the database write succeeded, and
//!   every core re-reads the tables every [`FOLLOW_INTERVAL`] (the other core may have changed
//!   them);
//! * a dynamic setting that system VMs use ([`Setting::agent`]) reaches the connected agents
//!   without a restart: in `Welcome` at every connection and in `ConfigUpdate` when it changes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use systemvm_proto::agent::{AgentRole, config_keys};

use crate::model::{DomainError, DomainResult};
use crate::state::State;
use crate::util::now_cs;

/// How often every core re-reads the settings tables.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// A setting's value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Integer within an inclusive range.
    Integer(i64, i64),
    /// Free text.
    String,
    /// A secret: stored sealed with the secrets key, never listed (read it with [`secret`]).
    Secret,
}

/// One setting this service knows.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Name.
    pub name: &'static str,
    /// Category (`listConfigurations category=`).
    pub category: &'static str,
    /// Default value.
    pub default: &'static str,
    /// Type and range.
    pub kind: Kind,
    /// Whether a change applies without a restart.
    pub dynamic: bool,
    /// Whether a zone may have its own value (`updateConfiguration zoneid=`).
    pub zone: bool,
    /// The system VMs of this role use it (sent in `Welcome` and `ConfigUpdate`).
    pub agent: Option<AgentRole>,
    /// Description.
    pub description: &'static str,
}

impl Setting {
    /// The default as an integer (integer settings; 0 otherwise).
    pub fn default_int(&self) -> i64 {
        self.default.parse().unwrap_or(0)
    }
}

/// `consoleproxy.session.max`.
pub const PROXY_SESSION_MAX: Setting = Setting {
    name: "consoleproxy.session.max",
    category: "Console Proxy",
    default: "50",
    kind: Kind::Integer(1, 100_000),
    dynamic: true,
    zone: true,
    agent: None,
    description: "The max number of viewer sessions console proxy is configured to serve for",
};
/// `consoleproxy.capacity.standby`.
pub const PROXY_STANDBY: Setting = Setting {
    name: "consoleproxy.capacity.standby",
    category: "Console Proxy",
    default: "10",
    kind: Kind::Integer(0, 100_000),
    dynamic: true,
    zone: true,
    agent: None,
    description: "The minimal number of console proxy viewer sessions that system is able to serve immediately(standby capacity)",
};
/// `consoleproxy.capacityscan.interval`.
pub const PROXY_CAPACITY_SCAN: Setting = Setting {
    name: "consoleproxy.capacityscan.interval",
    category: "Console Proxy",
    default: "30000",
    kind: Kind::Integer(1000, 86_400_000),
    dynamic: true,
    zone: true,
    agent: None,
    description: "The time interval(in millisecond) to scan whether or not system needs more console proxy to ensure minimal standby capacity",
};
/// `consoleproxy.launch.max`.
pub const PROXY_LAUNCH_MAX: Setting = Setting {
    name: "consoleproxy.launch.max",
    category: "Console Proxy",
    default: "10",
    kind: Kind::Integer(1, 1000),
    dynamic: true,
    zone: true,
    agent: None,
    description: "maximum number of console proxy instances per zone can be launched",
};
/// `consoleproxy.session.timeout`.
pub const PROXY_SESSION_TIMEOUT: Setting = Setting {
    name: config_keys::SESSION_IDLE_TIMEOUT_MS,
    category: "Console Proxy",
    default: "300000",
    kind: Kind::Integer(1000, 86_400_000),
    dynamic: true,
    zone: true,
    agent: Some(AgentRole::ConsoleProxy),
    description: "Timeout(in milliseconds) that console proxy tries to maintain a viewer session before it times out the session for no activity",
};
/// `consoleproxy.scalein.idle`.
pub const PROXY_SCALEIN_IDLE: Setting = Setting {
    name: "consoleproxy.scalein.idle",
    category: "Console Proxy",
    default: "300",
    kind: Kind::Integer(1, 86_400),
    dynamic: true,
    zone: true,
    agent: None,
    description: "Seconds a console proxy must be without sessions before it is drained and destroyed, when the others still leave more than the standby capacity",
};
/// `consoleproxy.scale.cooldown`.
pub const PROXY_SCALE_COOLDOWN: Setting = Setting {
    name: "consoleproxy.scale.cooldown",
    category: "Console Proxy",
    default: "30",
    kind: Kind::Integer(0, 86_400),
    dynamic: true,
    zone: true,
    agent: None,
    description: "Seconds between two console proxy scale decisions in a zone",
};
/// `consoleproxy.url.validity`.
pub const PROXY_URL_VALIDITY: Setting = Setting {
    name: "consoleproxy.url.validity",
    category: "Console Proxy",
    default: "300",
    kind: Kind::Integer(10, 86_400),
    dynamic: true,
    zone: true,
    agent: None,
    description: "Seconds a console link from createConsoleEndpoint stays usable (it opens one session)",
};
/// `secstorage.allowed.internal.sites`.
pub const ALLOWED_INTERNAL_SITES: Setting = Setting {
    name: config_keys::ALLOWED_INTERNAL_SITES,
    category: "Advanced",
    default: "",
    kind: Kind::String,
    dynamic: true,
    zone: true,
    agent: Some(AgentRole::SecStorage),
    description: "Comma separated list of cidrs internal to the datacenter that can host template download servers, please note 0.0.0.0 is not a valid site",
};
/// `max.template.iso.size`.
pub const MAX_TEMPLATE_SIZE: Setting = Setting {
    name: config_keys::MAX_TEMPLATE_SIZE_GB,
    category: "Storage",
    default: "50",
    kind: Kind::Integer(1, 1_000_000),
    dynamic: true,
    zone: false,
    agent: Some(AgentRole::SecStorage),
    description: "The maximum size for a downloaded template or ISO (in GB).",
};
/// `default.page.size`.
pub const PAGE_SIZE: Setting = Setting {
    name: "default.page.size",
    category: "Advanced",
    default: "500",
    kind: Kind::Integer(1, 100_000),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Default page size for API list* commands",
};
/// `integration.api.port`.
pub const INTEGRATION_PORT: Setting = Setting {
    name: "integration.api.port",
    category: "Advanced",
    default: "0",
    kind: Kind::Integer(0, 65_535),
    dynamic: false,
    zone: false,
    agent: None,
    description: "Integration (unauthenticated) API port on 127.0.0.1, 0 to disable. Takes effect on restart",
};
/// `agent.heartbeat.interval`.
pub const HEARTBEAT_INTERVAL: Setting = Setting {
    name: "agent.heartbeat.interval",
    category: "Advanced",
    default: "3",
    kind: Kind::Integer(1, 3600),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Seconds between two heartbeats of a system-VM agent (sent in Welcome; applies at the next connection)",
};
/// `agent.heartbeat.timeout`.
pub const HEARTBEAT_TIMEOUT: Setting = Setting {
    name: "agent.heartbeat.timeout",
    category: "Advanced",
    default: "9",
    kind: Kind::Integer(1, 86_400),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Seconds of silence after which core marks a system-VM agent Disconnected and drops its connection",
};
/// `incorrect.login.attempts.allowed`.
pub const LOGIN_ATTEMPTS: Setting = Setting {
    name: "incorrect.login.attempts.allowed",
    category: "Advanced",
    default: "5",
    kind: Kind::Integer(0, 1000),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Incorrect login attempts allowed before the user is locked (0: never lock); the root admin is never locked",
};
/// `security.singlesignon.key`.
pub const SSO_KEY: Setting = Setting {
    name: "security.singlesignon.key",
    category: "Secure",
    default: "",
    kind: Kind::Secret,
    dynamic: true,
    zone: false,
    agent: None,
    description: "A shared key with an authentication proxy: login requests signed with it (HMAC-SHA1, timestamp within security.singlesignon.tolerance.millis) need no password; empty disables it",
};
/// `security.singlesignon.tolerance.millis`.
pub const SSO_TOLERANCE: Setting = Setting {
    name: "security.singlesignon.tolerance.millis",
    category: "Secure",
    default: "300000",
    kind: Kind::Integer(1000, 86_400_000),
    dynamic: true,
    zone: false,
    agent: None,
    description: "How far (in milliseconds) the timestamp of a single sign-on login may be from core's clock",
};
/// `upload.operation.timeout`.
pub const UPLOAD_TIMEOUT: Setting = Setting {
    name: "upload.operation.timeout",
    category: "Storage",
    default: "60",
    kind: Kind::Integer(1, 10_080),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Minutes the upload parameters core hands out stay valid: the upload must be made, or resumed, before then",
};
/// `max.account.secondary.storage`.
pub const ACCOUNT_SECONDARY_LIMIT: Setting = Setting {
    name: "max.account.secondary.storage",
    category: "Account Defaults",
    default: "400",
    kind: Kind::Integer(-1, 1_000_000_000),
    dynamic: true,
    zone: false,
    agent: None,
    description: "The default maximum secondary storage space (in GiB) an account's templates and ISOs may use; -1 is unlimited",
};
/// `extract.url.expiration.interval`.
pub const EXTRACT_URL_EXPIRATION: Setting = Setting {
    name: "extract.url.expiration.interval",
    category: "Advanced",
    default: "14400",
    kind: Kind::Integer(60, 31_536_000),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Seconds a download link made by extractTemplate or extractIso stays valid (the storage VM refuses it afterwards)",
};
/// `consoleproxy.url.domain`.
pub const PROXY_URL_DOMAIN: Setting = Setting {
    name: "consoleproxy.url.domain",
    category: "Console Proxy",
    default: "",
    kind: Kind::String,
    dynamic: true,
    zone: false,
    agent: None,
    description: "The domain of console links with a custom certificate (https://a-b-c-d.DOMAIN:port); empty: the certificate's domain suffix",
};
/// `secstorage.ssl.cert.domain`.
pub const SSVM_CERT_DOMAIN: Setting = Setting {
    name: "secstorage.ssl.cert.domain",
    category: "Secondary Storage",
    default: "",
    kind: Kind::String,
    dynamic: true,
    zone: false,
    agent: None,
    description: "The domain of upload and download URLs with a custom certificate (https://a-b-c-d.DOMAIN:port); empty: the certificate's domain suffix",
};
/// `use.https.to.upload`.
pub const USE_HTTPS_TO_UPLOAD: Setting = Setting {
    name: "use.https.to.upload",
    category: "Secondary Storage",
    default: "true",
    kind: Kind::String,
    dynamic: true,
    zone: false,
    agent: None,
    description: "With a custom certificate, upload and download URLs use https (false: plain http, for labs); without one they are plain http",
};
/// `snapshot.backup.to.secondary`.
pub const SNAPSHOT_TO_SECONDARY: Setting = Setting {
    name: "snapshot.backup.to.secondary",
    category: "Snapshots",
    default: "true",
    kind: Kind::String,
    dynamic: true,
    zone: true,
    agent: None,
    description: "Volume snapshots are backed up to secondary storage by the storage VM; false refuses new snapshots (this suite keeps no snapshot on primary storage alone)",
};
/// `kvm.snapshot.enabled`.
pub const KVM_SNAPSHOT_ENABLED: Setting = Setting {
    name: "kvm.snapshot.enabled",
    category: "Snapshots",
    default: "true",
    kind: Kind::String,
    dynamic: true,
    zone: true,
    agent: None,
    description: "Whether volumes of running KVM guests may be snapshotted (a libvirt pull-mode backup: point in time, the guest keeps running); false refuses them",
};
/// `kvm.incremental.snapshot`.
pub const KVM_INCREMENTAL_SNAPSHOT: Setting = Setting {
    name: "kvm.incremental.snapshot",
    category: "Snapshots",
    default: "true",
    kind: Kind::String,
    dynamic: true,
    zone: true,
    agent: None,
    description: "Snapshots of a running KVM guest's volume copy only what changed since the previous one (a libvirt checkpoint); false makes every snapshot a full copy",
};
/// `snapshot.delta.max`.
pub const SNAPSHOT_DELTA_MAX: Setting = Setting {
    name: "snapshot.delta.max",
    category: "Snapshots",
    default: "16",
    kind: Kind::Integer(0, 1024),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Most incremental snapshots after a full one; the next snapshot is full again",
};
/// `backup.snapshot.wait`.
pub const SNAPSHOT_WAIT: Setting = Setting {
    name: "backup.snapshot.wait",
    category: "Storage",
    default: "21600",
    kind: Kind::Integer(60, 604_800),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Seconds a snapshot backup, restore or copy may take before it fails",
};

/// Bytes a second one snapshot backup reads from its volume (ours).
pub const SNAPSHOT_RATE: Setting = Setting {
    name: "snapshot.backup.rate",
    category: "Snapshots",
    default: "0",
    kind: Kind::Integer(0, 1 << 40),
    dynamic: true,
    zone: true,
    agent: None,
    description: "Bytes per second one snapshot backup may read from its volume, so backups leave primary storage to the guests (0: no limit)",
};

/// Replicas to object stores sent at once, fleet-wide (ours).
pub const REPLICA_CONCURRENCY: Setting = Setting {
    name: "objectstore.replication.concurrency",
    category: "Storage",
    default: "2",
    kind: Kind::Integer(1, 64),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Replicas of templates, ISOs and snapshots to object stores copied at once",
};

/// Seconds one replica may take (ours).
pub const REPLICA_WAIT: Setting = Setting {
    name: "objectstore.replication.wait",
    category: "Storage",
    default: "21600",
    kind: Kind::Integer(60, 604_800),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Seconds a storage VM may take to copy one file to an object store before the attempt fails (it resumes at the next)",
};

/// `storage.cache.replacement.enabled`.
pub const CACHE_REPLACEMENT: Setting = Setting {
    name: "storage.cache.replacement.enabled",
    category: "Storage",
    default: "true",
    kind: Kind::String,
    dynamic: true,
    zone: false,
    agent: None,
    description: "Whether templates and ISOs on staging (ImageCache) stores not used for storage.cache.replacement.lru.interval days are evicted once replicated to an object store (fetched back on use)",
};

/// `storage.cache.replacement.interval`.
pub const CACHE_REPLACEMENT_INTERVAL: Setting = Setting {
    name: "storage.cache.replacement.interval",
    category: "Storage",
    default: "86400",
    kind: Kind::Integer(1, 31_536_000),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Seconds between two looks for staging copies to evict",
};

/// `storage.cache.replacement.lru.interval`.
pub const CACHE_REPLACEMENT_LRU: Setting = Setting {
    name: "storage.cache.replacement.lru.interval",
    category: "Storage",
    default: "30",
    kind: Kind::Integer(0, 36_500),
    dynamic: true,
    zone: false,
    agent: None,
    description: "Days a staging copy must go unused before it may be evicted",
};

/// Whether extract links are served by object stores (ours).
pub const EXTRACT_FROM_OBJECT_STORE: Setting = Setting {
    name: "extract.url.objectstore",
    category: "Storage",
    default: "false",
    kind: Kind::String,
    dynamic: true,
    zone: true,
    agent: None,
    description: "true: extractTemplate/extractIso links of replicated artefacts are presigned S3 URLs or Swift temp URLs of the object store (valid extract.url.expiration.interval), so browsers download from it rather than from a storage VM",
};

/// Every setting, in `listConfigurations` order.
pub const SETTINGS: &[&Setting] = &[
    &PROXY_SESSION_MAX,
    &PROXY_STANDBY,
    &PROXY_CAPACITY_SCAN,
    &PROXY_LAUNCH_MAX,
    &PROXY_SESSION_TIMEOUT,
    &PROXY_SCALEIN_IDLE,
    &PROXY_SCALE_COOLDOWN,
    &PROXY_URL_VALIDITY,
    &ALLOWED_INTERNAL_SITES,
    &MAX_TEMPLATE_SIZE,
    &PAGE_SIZE,
    &INTEGRATION_PORT,
    &HEARTBEAT_INTERVAL,
    &HEARTBEAT_TIMEOUT,
    &LOGIN_ATTEMPTS,
    &SSO_KEY,
    &SSO_TOLERANCE,
    &UPLOAD_TIMEOUT,
    &ACCOUNT_SECONDARY_LIMIT,
    &EXTRACT_URL_EXPIRATION,
    &PROXY_URL_DOMAIN,
    &SSVM_CERT_DOMAIN,
    &USE_HTTPS_TO_UPLOAD,
    &SNAPSHOT_TO_SECONDARY,
    &KVM_SNAPSHOT_ENABLED,
    &KVM_INCREMENTAL_SNAPSHOT,
    &SNAPSHOT_DELTA_MAX,
    &SNAPSHOT_WAIT,
    &SNAPSHOT_RATE,
    &REPLICA_CONCURRENCY,
    &REPLICA_WAIT,
    &CACHE_REPLACEMENT,
    &CACHE_REPLACEMENT_INTERVAL,
    &CACHE_REPLACEMENT_LRU,
    &EXTRACT_FROM_OBJECT_STORE,
];

/// Finds a setting definition.
pub fn find(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().copied().find(|s| s.name == name)
}

/// Checks `value` against `s`'s type and range.
pub fn check(s: &Setting, value: &str) -> DomainResult<()> {
    match s.kind {
        Kind::String | Kind::Secret => Ok(()),
        Kind::Integer(lo, hi) => match value.parse::<i64>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(()),
            _ => Err(DomainError::Invalid(format!(
                "Value {value:?} of configuration {} must be an integer from {lo} to {hi}",
                s.name
            ))),
        },
    }
}

/// Loads every global value: defaults overridden by stored values (invalid stored values are
/// ignored).
pub async fn load(db: &sqlx::AnyPool) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut map: HashMap<String, String> = SETTINGS
        .iter()
        .map(|s| (s.name.to_owned(), s.default.to_owned()))
        .collect();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, value FROM configurations")
        .fetch_all(db)
        .await?;
    for (name, value) in rows {
        match find(&name) {
            Some(s) if check(s, &value).is_ok() => {
                map.insert(name, value);
            }
            _ => tracing::warn!(%name, "Ignoring an unknown or invalid stored setting"),
        }
    }
    Ok(map)
}

/// The global value of `s` (from the cache).
pub async fn text(state: &State, s: &Setting) -> String {
    state
        .settings
        .read()
        .await
        .get(s.name)
        .cloned()
        .unwrap_or_else(|| s.default.to_owned())
}

/// The global value of an integer setting.
pub async fn int(state: &State, s: &Setting) -> i64 {
    text(state, s).await.parse().unwrap_or_else(|_| s.default_int())
}

/// The global value of a non-negative integer setting.
pub async fn uint(state: &State, s: &Setting) -> u64 {
    u64::try_from(int(state, s).await).unwrap_or(0)
}

/// The value of a [`Kind::Secret`] setting, opened; `None` when unset (or unreadable, which is
/// logged: a secrets key that does not match the database).
pub async fn secret(state: &State, s: &Setting) -> Option<String> {
    let stored = text(state, s).await;
    if stored.is_empty() {
        return None;
    }
    match state.secrets.open(s.name, &stored) {
        Ok(crate::secrets::Opened::Sealed(v) | crate::secrets::Opened::Plain(v)) => Some(v),
        Err(error) => {
            tracing::error!(%error, name = s.name, "A secret setting cannot be opened with this core's secrets key; it is ignored");
            None
        }
    }
}

/// `default.page.size`: the default and maximum page size of list commands.
pub async fn page_size(state: &State) -> i64 {
    int(state, &PAGE_SIZE).await
}

/// The value of `s` in `zone`: the zone's own value, else the global one.
pub async fn zone_text(state: &State, zone: &str, s: &Setting) -> String {
    if s.zone {
        let v: Result<Option<String>, _> =
            sqlx::query_scalar("SELECT value FROM zone_configurations WHERE zone_id = $1 AND name = $2")
                .bind(zone.to_owned())
                .bind(s.name.to_owned())
                .fetch_optional(&state.db.pool)
                .await;
        match v {
            Ok(Some(v)) if check(s, &v).is_ok() => return v,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, name = s.name, "Zone setting unreadable; using the global value")
            }
        }
    }
    text(state, s).await
}

/// The value of a non-negative integer setting in `zone`.
pub async fn zone_uint(state: &State, zone: &str, s: &Setting) -> u64 {
    zone_text(state, zone, s)
        .await
        .parse::<u64>()
        .unwrap_or_else(|_| u64::try_from(s.default_int()).unwrap_or(0))
}

/// The zone's own values (not the global ones it inherits).
pub async fn zone_values(state: &State, zone: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT name, value FROM zone_configurations WHERE zone_id = $1")
        .bind(zone.to_owned())
        .fetch_all(&state.db.pool)
        .await
}

/// Sets the global value of `s` (`None`: back to the default); returns the value now in force.
pub async fn set_global(state: &State, s: &Setting, value: Option<&str>) -> DomainResult<String> {
    let value = value.unwrap_or(s.default);
    check(s, value)?;
    let sealed;
    let value = if s.kind == Kind::Secret && !value.is_empty() {
        sealed = state
            .secrets
            .seal(s.name, value)
            .map_err(|e| DomainError::Internal(e.to_string()))?;
        sealed.as_str()
    } else {
        value
    };
    // Portable upsert: delete then insert, in one transaction.
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM configurations WHERE name = $1")
        .bind(s.name.to_owned())
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO configurations (name, value, updated) VALUES ($1, $2, $3)")
        .bind(s.name.to_owned())
        .bind(value.to_owned())
        .bind(now_cs())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    state
        .settings
        .write()
        .await
        .insert(s.name.to_owned(), value.to_owned());
    state.settings_changed.notify_one();
    tracing::info!(name = s.name, "Setting updated");
    Ok(value.to_owned())
}

/// Sets `zone`'s own value of `s` (`None`: the zone inherits the global value again); returns
/// the value now in force in the zone.
pub async fn set_zone(state: &State, zone: &str, s: &Setting, value: Option<&str>) -> DomainResult<String> {
    if !s.zone {
        return Err(DomainError::Invalid(format!(
            "Configuration {} has no zone scope",
            s.name
        )));
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM zones WHERE id = $1")
        .bind(zone.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if n == 0 {
        return Err(DomainError::NotFound(format!("Unable to find zone by id {zone}")));
    }
    if let Some(v) = value {
        check(s, v)?;
    }
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM zone_configurations WHERE zone_id = $1 AND name = $2")
        .bind(zone.to_owned())
        .bind(s.name.to_owned())
        .execute(&mut *tx)
        .await?;
    if let Some(v) = value {
        sqlx::query(
            "INSERT INTO zone_configurations (zone_id, name, value, updated) VALUES ($1, $2, $3, $4)",
        )
        .bind(zone.to_owned())
        .bind(s.name.to_owned())
        .bind(v.to_owned())
        .bind(now_cs())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    state.settings_changed.notify_one();
    tracing::info!(name = s.name, zone, "Zone setting updated");
    Ok(zone_text(state, zone, s).await)
}

/// What a system VM of `role` in `zone` is told (`Welcome.config`, `ConfigUpdate`).
pub async fn agent_config(state: &State, zone: &str, role: AgentRole) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for s in SETTINGS.iter().filter(|s| s.agent == Some(role)) {
        m.insert(s.name.to_owned(), zone_text(state, zone, s).await);
    }
    m
}

/// Every stored value, global and per zone, as one comparable snapshot.
pub async fn snapshot(db: &sqlx::AnyPool) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let mut rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT '' AS zone_id, name, value FROM configurations")
            .fetch_all(db)
            .await?;
    rows.extend(
        sqlx::query_as::<_, (String, String, String)>("SELECT zone_id, name, value FROM zone_configurations")
            .fetch_all(db)
            .await?,
    );
    rows.sort();
    Ok(rows)
}

/// Reloads the global cache from the database.
pub async fn reload(state: &State) -> Result<(), sqlx::Error> {
    let fresh = load(&state.db.pool).await?;
    *state.settings.write().await = fresh;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_their_own_checks() {
        for s in SETTINGS {
            check(s, s.default).unwrap();
        }
    }

    #[test]
    fn names_are_unique_and_agent_settings_are_dynamic() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        for s in SETTINGS.iter().filter(|s| s.agent.is_some()) {
            assert!(
                s.dynamic,
                "{} is sent to agents, so it must apply at once",
                s.name
            );
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(check(&INTEGRATION_PORT, "70000").is_err());
        assert!(check(&INTEGRATION_PORT, "abc").is_err());
        check(&INTEGRATION_PORT, "8096").unwrap();
    }
}
