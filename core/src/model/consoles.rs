//! Consoles: core's console-token keys (shared by every core through the database), fleet-wide
//! one-time session claims, and the choice of a console proxy for a link.
//!
//! Invariants:
//! * the key set in `core_keys` (row `console`) is the truth: a rotation reads it, changes it and
//!   writes it back only if nobody changed it meanwhile (compare-and-set on the stored text), so
//!   rotations on two cores never lose a key; links are sealed with the stored set, so a link
//!   issued by either core opens on any proxy that has received that set;
//! * the stored set is encrypted with core's secrets key ([`crate::secrets`]), never in clear; a
//!   set stored in clear (a database from before) is re-stored encrypted when first read;
//! * rotation keeps the previous key live, so links issued just before still open;
//! * the lease holder pushes every new set to the connected proxies and records which primary
//!   key it pushed (row `console_pushed`), so a rotation on the standby can wait for it;
//! * a session id is granted once across every proxy (the `console_sessions` primary key decides)
//!   and remembered until its token expires.

use std::time::Duration;

use systemvm_proto::agent::{AgentRole, ClaimAnswer, ClaimSession, ConsoleKeys, CoreMessage, KeysUpdate};
use systemvm_proto::console::KeySet;

use crate::model::systemvms::ProxyCandidate;
use crate::model::{DomainError, DomainResult};
use crate::secrets::{Opened, SecretsError, SecretsKey};
use crate::state::State;
use crate::util::{now_cs, now_ms};

/// How long a rotation on the standby waits for the lease holder to push the new keys.
pub const PUSH_WAIT: Duration = Duration::from_secs(5);

/// The `core_keys` row of the key set.
const ROW: &str = "console";

/// Loading or creating the console-token keys failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleKeysError {
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

async fn stored_text(pool: &sqlx::AnyPool) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM core_keys WHERE name = 'console'")
        .fetch_optional(pool)
        .await
}

fn parse(text: &str) -> Result<KeySet, ConsoleKeysError> {
    KeySet::from_json(text).map_err(|e| ConsoleKeysError::Keys(e.to_string()))
}

/// The stored key set and its stored (encrypted) text, the value a rotation compares with; a set
/// stored in clear is re-stored encrypted first (compare-and-set: a concurrent change wins and
/// is read again).
async fn read_stored(
    pool: &sqlx::AnyPool,
    secrets: &SecretsKey,
) -> Result<Option<(String, KeySet)>, ConsoleKeysError> {
    loop {
        let Some(text) = stored_text(pool).await? else {
            return Ok(None);
        };
        let json = match secrets.open(ROW, &text)? {
            Opened::Sealed(json) => return Ok(Some((text, parse(&json)?))),
            Opened::Plain(json) => json,
        };
        let set = parse(&json)?;
        let sealed = secrets.seal(ROW, &json)?;
        let done = sqlx::query("UPDATE core_keys SET value = $1 WHERE name = 'console' AND value = $2")
            .bind(sealed.clone())
            .bind(text)
            .execute(pool)
            .await?;
        if done.rows_affected() == 1 {
            tracing::info!("Encrypted the console-token keys stored in clear with the secrets key");
            return Ok(Some((sealed, set)));
        }
    }
}

/// Core's console-token keys; created on first start (two cores starting at once: the first
/// insert wins and both use the stored set).
pub async fn load_keys(pool: &sqlx::AnyPool, secrets: &SecretsKey) -> Result<KeySet, ConsoleKeysError> {
    if let Some((_, set)) = read_stored(pool, secrets).await? {
        return Ok(set);
    }
    let set = KeySet::generate().map_err(|e| ConsoleKeysError::Keys(e.to_string()))?;
    let json = set.to_json().map_err(|e| ConsoleKeysError::Keys(e.to_string()))?;
    sqlx::query(
        "INSERT INTO core_keys (name, value, created) VALUES ('console', $1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(secrets.seal(ROW, &json)?)
    .bind(now_cs())
    .execute(pool)
    .await?;
    read_stored(pool, secrets)
        .await?
        .map(|(_, set)| set)
        .ok_or_else(|| ConsoleKeysError::Keys("key set vanished after insert".into()))
}

/// The stored keys, also refreshing this core's cache.
pub async fn current_keys(state: &State) -> DomainResult<KeySet> {
    let set = current_keys_quiet(state).await?;
    state.set_console_keys(set.clone());
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
/// lease holder pushes it to every connected console proxy (this core at once when it holds the
/// lease, else the holder within a second, waited for up to [`PUSH_WAIT`]).
pub async fn rotate(state: &State) -> DomainResult<Rotated> {
    let internal = |e: &dyn std::fmt::Display| DomainError::Internal(e.to_string());
    let (set, new_id) = loop {
        let (old_text, mut set) = read_stored(&state.db.pool, &state.secrets)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| DomainError::Internal("no console keys stored".into()))?;
        let previous = set.ids();
        let new_id = set.rotate().map_err(|e| internal(&e))?;
        let keep_from = previous.iter().copied().max().unwrap_or(new_id);
        for id in previous {
            if id < keep_from {
                set.retire(id);
            }
        }
        let json = set.to_json().map_err(|e| internal(&e))?;
        let text = state.secrets.seal(ROW, &json).map_err(|e| internal(&e))?;
        let done = sqlx::query(
            "UPDATE core_keys SET value = $1, created = $2 WHERE name = 'console' AND value = $3",
        )
        .bind(text)
        .bind(now_cs())
        .bind(old_text)
        .execute(&state.db.pool)
        .await?;
        if done.rows_affected() == 1 {
            break (set, new_id);
        }
        // Another core rotated meanwhile: rotate its set.
    };
    state.set_console_keys(set.clone());
    let keys = set.ids();
    let pushed = if state.is_leader() {
        Some(push_keys(state, &set).await?)
    } else {
        wait_pushed(state, new_id).await?
    };
    tracing::info!(primary = new_id, ?keys, proxies = ?pushed, "Rotated the console-token keys");
    Ok(Rotated {
        primary: new_id,
        keys,
        pushed,
    })
}

/// The lease holder: pushes `set` to every connected console proxy and records it; returns how
/// many proxies got it.
pub async fn push_keys(state: &State, set: &KeySet) -> DomainResult<usize> {
    let keys = ConsoleKeys::from_key_set(set).map_err(|e| DomainError::Internal(e.to_string()))?;
    let n = state.agents.broadcast(
        AgentRole::ConsoleProxy,
        &CoreMessage::KeysUpdate(KeysUpdate { console_keys: keys }),
    );
    let value = format!("{}:{n}", set.primary_id().unwrap_or(0));
    sqlx::query(
        "INSERT INTO core_keys (name, value, created) VALUES ('console_pushed', $1, $2) ON CONFLICT (name) DO UPDATE SET value = $1, created = $2",
    )
    .bind(value)
    .bind(now_cs())
    .execute(&state.db.pool)
    .await?;
    Ok(n)
}

async fn wait_pushed(state: &State, primary: u32) -> DomainResult<Option<usize>> {
    let deadline = tokio::time::Instant::now() + PUSH_WAIT;
    loop {
        let v: Option<String> =
            sqlx::query_scalar("SELECT value FROM core_keys WHERE name = 'console_pushed'")
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
                "The active core did not confirm pushing the new console keys in time"
            );
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every core, every second: follows the stored key set (another core may have rotated it);
/// the lease holder pushes a changed set to its proxies. Returns whether it changed.
pub async fn follow_keys(state: &State) -> DomainResult<bool> {
    let stored = current_keys_quiet(state).await?;
    let known = state.console_keys();
    if stored.ids() == known.ids() && stored.primary_id() == known.primary_id() {
        return Ok(false);
    }
    state.set_console_keys(stored.clone());
    if state.is_leader() {
        let n = push_keys(state, &stored).await?;
        tracing::info!(primary = ?stored.primary_id(), proxies = n, "Pushed console keys rotated on another core");
    }
    Ok(true)
}

async fn current_keys_quiet(state: &State) -> DomainResult<KeySet> {
    load_keys(&state.db.pool, &state.secrets)
        .await
        .map_err(|e| DomainError::Internal(e.to_string()))
}

/// Claims console session id `c.session_id` for proxy `proxy_id`: granted once per id across
/// every proxy, remembered until the token expires.
pub async fn claim(state: &State, proxy_id: &str, c: &ClaimSession) -> ClaimAnswer {
    let refuse = |reason: &str| ClaimAnswer {
        id: c.id.clone(),
        granted: false,
        reason: Some(reason.to_owned()),
    };
    if c.session_id.is_empty() || c.session_id.len() > 128 {
        return refuse("invalid session id");
    }
    let expires_ms = i64::try_from(c.expires.saturating_mul(1000)).unwrap_or(i64::MAX);
    let r = sqlx::query(
        "INSERT INTO console_sessions (session_id, vm_id, proxy_id, claimed, claimed_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_id) DO NOTHING",
    )
    .bind(c.session_id.clone())
    .bind(c.vm_id.clone())
    .bind(proxy_id.to_owned())
    .bind(now_cs())
    .bind(now_ms())
    .bind(expires_ms)
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(done) if done.rows_affected() == 1 => ClaimAnswer {
            id: c.id.clone(),
            granted: true,
            reason: None,
        },
        Ok(_) => {
            tracing::warn!(session_id = %c.session_id, vm_id = %c.vm_id, "Console session replayed: refused fleet-wide");
            refuse("this console link was already used")
        }
        Err(error) => {
            tracing::error!(%error, "Failed to record a console session claim");
            refuse("core could not record the session")
        }
    }
}

/// Forgets claims whose tokens have expired (a token can't be used after its expiry).
pub async fn prune_claims(pool: &sqlx::AnyPool) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM console_sessions WHERE expires_ms < $1")
        .bind(now_ms().saturating_sub(60_000))
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

/// The proxies that served a VM's latest sessions, newest first.
pub async fn affinity(pool: &sqlx::AnyPool, vm_id: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT proxy_id FROM console_sessions WHERE vm_id = $1 ORDER BY claimed_ms DESC LIMIT 3",
    )
    .bind(vm_id.to_owned())
    .fetch_all(pool)
    .await
}

/// The latest claim on a proxy (ms), for draining.
pub async fn last_claim_ms(pool: &sqlx::AnyPool, proxy_id: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT MAX(claimed_ms) FROM console_sessions WHERE proxy_id = $1")
        .bind(proxy_id.to_owned())
        .fetch_one(pool)
        .await
}

/// Picks a proxy: the one that served the VM's latest session when it still has room, else the
/// least loaded by fill ratio (ties: fewer sessions, then the order given).
pub fn pick_proxy<'a>(candidates: &'a [ProxyCandidate], affinity: &[String]) -> Option<&'a ProxyCandidate> {
    let has_room = |c: &&ProxyCandidate| c.max == 0 || c.active < c.max;
    for preferred in affinity {
        if let Some(c) = candidates.iter().filter(has_room).find(|c| &c.id == preferred) {
            return Some(c);
        }
    }
    candidates.iter().filter(has_room).min_by(|a, b| {
        let ratio = |c: &ProxyCandidate| {
            if c.max == 0 {
                0.0
            } else {
                c.active as f64 / c.max as f64
            }
        };
        ratio(a).total_cmp(&ratio(b)).then(a.active.cmp(&b.active))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, active: u64, max: u64) -> ProxyCandidate {
        ProxyCandidate {
            id: id.into(),
            endpoint: format!("http://{id}"),
            active,
            max,
        }
    }

    fn raw_keys(set: &KeySet) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&set.to_json().unwrap()).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn keys_are_stored_encrypted_and_clear_ones_are_encrypted_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, dir.path()).await.unwrap();
        let secrets = SecretsKey::from_bytes(dir.path().join("secrets.key"), [3; 32]);
        let set = load_keys(&db.pool, &secrets).await.unwrap();
        let stored = stored_text(&db.pool).await.unwrap().unwrap();
        assert!(stored.starts_with(crate::secrets::SEALED_PREFIX), "{stored}");
        for key in raw_keys(&set) {
            assert!(!stored.contains(&key), "key material in clear: {stored}");
        }
        assert_eq!(load_keys(&db.pool, &secrets).await.unwrap().ids(), set.ids());

        // A database from before: the set in clear is read, then stored encrypted.
        let clear = set.to_json().unwrap();
        sqlx::query("UPDATE core_keys SET value = $1 WHERE name = 'console'")
            .bind(clear.clone())
            .execute(&db.pool)
            .await
            .unwrap();
        let migrated = load_keys(&db.pool, &secrets).await.unwrap();
        assert_eq!(migrated.ids(), set.ids());
        assert_eq!(raw_keys(&migrated), raw_keys(&set));
        let stored = stored_text(&db.pool).await.unwrap().unwrap();
        assert!(stored.starts_with(crate::secrets::SEALED_PREFIX) && stored != clear);

        // Another secrets key: refused, saying what to do.
        let other = SecretsKey::from_bytes(dir.path().join("other.key"), [4; 32]);
        let e = load_keys(&db.pool, &other).await.unwrap_err();
        assert!(
            matches!(e, ConsoleKeysError::Secrets(SecretsError::WrongKey { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("secrets.key"), "{e}");
    }

    #[test]
    fn picks_affinity_then_least_loaded() {
        let cs = [c("a", 5, 10), c("b", 1, 10), c("c", 10, 10)];
        assert_eq!(pick_proxy(&cs, &[]).unwrap().id, "b");
        assert_eq!(pick_proxy(&cs, &["a".into()]).unwrap().id, "a");
        // A full proxy loses its affinity.
        assert_eq!(pick_proxy(&cs, &["c".into(), "a".into()]).unwrap().id, "a");
        assert_eq!(pick_proxy(&cs, &["gone".into()]).unwrap().id, "b");
        assert!(pick_proxy(&[c("x", 3, 3)], &[]).is_none());
        assert!(pick_proxy(&[], &[]).is_none());
        // Fill ratio, not raw count.
        assert_eq!(pick_proxy(&[c("a", 4, 100), c("b", 2, 4)], &[]).unwrap().id, "a");
    }
}
