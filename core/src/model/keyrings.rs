//! Core's key rings, shared by every core through the database: the console-token keys (pushed
//! to console proxies) and the transfer keys (pushed to storage VMs: they open upload tickets and
//! download links).
//!
//! Invariants:
//! * a ring's key set in `core_keys` (row `console`, `transfer`) is the truth: a rotation reads
//!   it, changes it and writes it back only if nobody changed it meanwhile (compare-and-set on the
//!   stored text), so rotations on two cores never lose a key; what core seals is sealed with the
//!   stored set, so a link or ticket issued by either core opens on any agent that has the set;
//! * a stored set is encrypted with core's secrets key ([`crate::secrets`]), never in clear; a
//!   set stored in clear (a database from before) is re-stored encrypted when first read;
//! * rotation keeps the previous key live, so what was sealed just before still opens;
//! * the lease holder pushes every new set to the connected agents of the ring's role and
//!   records which primary key it pushed (row `<ring>_pushed`), so a rotation on the standby can
//!   wait for it; each ring goes only to its role (storage VMs never hold console keys).

use std::time::Duration;

use systemvm_proto::agent::{AgentRole, ConsoleKeys, CoreMessage, KeysUpdate, TransferKeysUpdate};
use systemvm_proto::console::KeySet;

use crate::model::{DomainError, DomainResult};
use crate::secrets::{Opened, SecretsError, SecretsKey};
use crate::state::State;
use crate::util::now_cs;

/// A key ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Console-token keys (console proxies).
    Console,
    /// Transfer keys: upload tickets and download links (storage VMs).
    Transfer,
}

impl Ring {
    /// Its `core_keys` row (also the secrets-key context of its sealed text).
    pub fn row(self) -> &'static str {
        match self {
            Ring::Console => "console",
            Ring::Transfer => "transfer",
        }
    }

    fn pushed_row(self) -> &'static str {
        match self {
            Ring::Console => "console_pushed",
            Ring::Transfer => "transfer_pushed",
        }
    }

    /// The role its keys go to.
    pub fn role(self) -> AgentRole {
        match self {
            Ring::Console => AgentRole::ConsoleProxy,
            Ring::Transfer => AgentRole::SecStorage,
        }
    }

    fn message(self, keys: ConsoleKeys) -> CoreMessage {
        match self {
            Ring::Console => CoreMessage::KeysUpdate(KeysUpdate { console_keys: keys }),
            Ring::Transfer => CoreMessage::TransferKeysUpdate(TransferKeysUpdate { transfer_keys: keys }),
        }
    }

    /// This core's cached copy.
    pub fn cached(self, state: &State) -> KeySet {
        match self {
            Ring::Console => state.console_keys(),
            Ring::Transfer => state.transfer_keys(),
        }
    }

    fn cache(self, state: &State, set: KeySet) {
        match self {
            Ring::Console => state.set_console_keys(set),
            Ring::Transfer => state.set_transfer_keys(set),
        }
    }
}

/// How long a rotation on the standby waits for the lease holder to push the new keys.
pub const PUSH_WAIT: Duration = Duration::from_secs(5);

/// Loading or creating the console-token keys failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// The stored key set does not parse, or a key could not be generated.
    #[error("invalid console keys: {0}")]
    Keys(String),
    /// The stored key set does not decrypt with this core's secrets key.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

pub(crate) async fn stored_text(pool: &sqlx::AnyPool, ring: Ring) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM core_keys WHERE name = $1")
        .bind(ring.row())
        .fetch_optional(pool)
        .await
}

fn parse(text: &str) -> Result<KeySet, KeysError> {
    KeySet::from_json(text).map_err(|e| KeysError::Keys(e.to_string()))
}

/// The stored key set and its stored (encrypted) text, the value a rotation compares with; a set
/// stored in clear is re-stored encrypted first (compare-and-set: a concurrent change wins and
/// is read again).
async fn read_stored(
    pool: &sqlx::AnyPool,
    secrets: &SecretsKey,
    ring: Ring,
) -> Result<Option<(String, KeySet)>, KeysError> {
    loop {
        let Some(text) = stored_text(pool, ring).await? else {
            return Ok(None);
        };
        let json = match secrets.open(ring.row(), &text)? {
            Opened::Sealed(json) => return Ok(Some((text, parse(&json)?))),
            Opened::Plain(json) => json,
        };
        let set = parse(&json)?;
        let sealed = secrets.seal(ring.row(), &json)?;
        let done = sqlx::query("UPDATE core_keys SET value = $1 WHERE name = $3 AND value = $2")
            .bind(sealed.clone())
            .bind(text)
            .bind(ring.row())
            .execute(pool)
            .await?;
        if done.rows_affected() == 1 {
            tracing::info!(
                ring = ring.row(),
                "Encrypted keys stored in clear with the secrets key"
            );
            return Ok(Some((sealed, set)));
        }
    }
}

/// Core's keys of `ring`; created on first start (two cores starting at once: the first
/// insert wins and both use the stored set).
pub async fn load(pool: &sqlx::AnyPool, secrets: &SecretsKey, ring: Ring) -> Result<KeySet, KeysError> {
    if let Some((_, set)) = read_stored(pool, secrets, ring).await? {
        return Ok(set);
    }
    let set = KeySet::generate().map_err(|e| KeysError::Keys(e.to_string()))?;
    let json = set.to_json().map_err(|e| KeysError::Keys(e.to_string()))?;
    sqlx::query(
        "INSERT INTO core_keys (name, value, created) VALUES ($3, $1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(secrets.seal(ring.row(), &json)?)
    .bind(now_cs())
    .bind(ring.row())
    .execute(pool)
    .await?;
    read_stored(pool, secrets, ring)
        .await?
        .map(|(_, set)| set)
        .ok_or_else(|| KeysError::Keys("key set vanished after insert".into()))
}

/// The stored keys, also refreshing this core's cache.
pub async fn current(state: &State, ring: Ring) -> DomainResult<KeySet> {
    let set = current_quiet(state, ring).await?;
    ring.cache(state, set.clone());
    Ok(set)
}

/// A finished rotation.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new primary key id.
    pub primary: u32,
    /// The live key ids.
    pub keys: Vec<u32>,
    /// Proxies the new set was pushed to (by the lease holder); `None`: not confirmed in time.
    pub pushed: Option<usize>,
}

/// Adds a new primary key, keeps the previous one, retires older ones; stores the set; the
/// lease holder pushes it to every connected agent of the ring's role (this core at once when it
/// holds the lease, else the holder within a second, waited for up to [`PUSH_WAIT`]).
pub async fn rotate(state: &State, ring: Ring) -> DomainResult<Rotated> {
    let internal = |e: &dyn std::fmt::Display| DomainError::Internal(e.to_string());
    let (set, new_id) = loop {
        let (old_text, mut set) = read_stored(&state.db.pool, &state.secrets, ring)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| DomainError::Internal("no keys stored".into()))?;
        let previous = set.ids();
        let new_id = set.rotate().map_err(|e| internal(&e))?;
        let keep_from = previous.iter().copied().max().unwrap_or(new_id);
        for id in previous {
            if id < keep_from {
                set.retire(id);
            }
        }
        let json = set.to_json().map_err(|e| internal(&e))?;
        let text = state.secrets.seal(ring.row(), &json).map_err(|e| internal(&e))?;
        let done =
            sqlx::query("UPDATE core_keys SET value = $1, created = $2 WHERE name = $4 AND value = $3")
                .bind(text)
                .bind(now_cs())
                .bind(old_text)
                .bind(ring.row())
                .execute(&state.db.pool)
                .await?;
        if done.rows_affected() == 1 {
            break (set, new_id);
        }
        // Another core rotated meanwhile: rotate its set.
    };
    ring.cache(state, set.clone());
    let keys = set.ids();
    let pushed = if state.is_leader() {
        Some(push(state, ring, &set).await?)
    } else {
        wait_pushed(state, ring, new_id).await?
    };
    tracing::info!(ring = ring.row(), primary = new_id, ?keys, agents = ?pushed, "Rotated keys");
    Ok(Rotated {
        primary: new_id,
        keys,
        pushed,
    })
}

/// The lease holder: pushes `set` to every connected agent of the ring's role and records it;
/// returns how many agents got it.
pub async fn push(state: &State, ring: Ring, set: &KeySet) -> DomainResult<usize> {
    let keys = ConsoleKeys::from_key_set(set).map_err(|e| DomainError::Internal(e.to_string()))?;
    let n = state.agents.broadcast(ring.role(), &ring.message(keys));
    let value = format!("{}:{n}", set.primary_id().unwrap_or(0));
    sqlx::query(
        "INSERT INTO core_keys (name, value, created) VALUES ($3, $1, $2) ON CONFLICT (name) DO UPDATE SET value = $1, created = $2",
    )
    .bind(value)
    .bind(now_cs())
    .bind(ring.pushed_row())
    .execute(&state.db.pool)
    .await?;
    Ok(n)
}

async fn wait_pushed(state: &State, ring: Ring, primary: u32) -> DomainResult<Option<usize>> {
    let deadline = tokio::time::Instant::now() + PUSH_WAIT;
    loop {
        let v: Option<String> = sqlx::query_scalar("SELECT value FROM core_keys WHERE name = $1")
            .bind(ring.pushed_row())
            .fetch_optional(&state.db.pool)
            .await?;
        if let Some((p, n)) = v.as_deref().and_then(|v| v.split_once(':'))
            && p.parse::<u32>().is_ok_and(|p| p >= primary)
        {
            return Ok(n.parse().ok());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                primary,
                ring = ring.row(),
                "The active core did not confirm pushing the new keys in time"
            );
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every core, every second: follows the stored key set (another core may have rotated it);
/// the lease holder pushes a changed set to its agents. Returns whether it changed.
pub async fn follow(state: &State, ring: Ring) -> DomainResult<bool> {
    let stored = current_quiet(state, ring).await?;
    let known = ring.cached(state);
    if stored.ids() == known.ids() && stored.primary_id() == known.primary_id() {
        return Ok(false);
    }
    ring.cache(state, stored.clone());
    if state.is_leader() {
        let n = push(state, ring, &stored).await?;
        tracing::info!(ring = ring.row(), primary = ?stored.primary_id(), agents = n, "Pushed keys rotated on another core");
    }
    Ok(true)
}

async fn current_quiet(state: &State, ring: Ring) -> DomainResult<KeySet> {
    load(&state.db.pool, &state.secrets, ring)
        .await
        .map_err(|e| DomainError::Internal(e.to_string()))
}
