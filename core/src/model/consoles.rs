//! Consoles: fleet-wide one-time session claims, the choice of a console proxy for a link, and
//! the console-token keys' entry points.
//!
//! The keys themselves live in [`crate::model::keyrings`] (ring [`Ring::Console`]).
//!
//! Invariants:
//! * a session id is granted once across every proxy (the `console_sessions` primary key decides)
//!   and remembered until its token expires.

use systemvm_proto::agent::{ClaimAnswer, ClaimSession};
use systemvm_proto::console::KeySet;

use crate::model::DomainResult;
use crate::model::keyrings::{self, Ring};
use crate::model::systemvms::ProxyCandidate;
use crate::secrets::SecretsKey;
use crate::state::State;
use crate::util::{now_cs, now_ms};

/// The key ring's types, as the console side names them.
pub use crate::model::keyrings::{KeysError as ConsoleKeysError, PUSH_WAIT, Rotated};

/// Core's console-token keys (see [`keyrings::load`]).
pub async fn load_keys(pool: &sqlx::AnyPool, secrets: &SecretsKey) -> Result<KeySet, ConsoleKeysError> {
    keyrings::load(pool, secrets, Ring::Console).await
}

/// The stored console keys, also refreshing this core's cache.
pub async fn current_keys(state: &State) -> DomainResult<KeySet> {
    keyrings::current(state, Ring::Console).await
}

/// Rotates the console keys (see [`keyrings::rotate`]).
pub async fn rotate(state: &State) -> DomainResult<Rotated> {
    keyrings::rotate(state, Ring::Console).await
}

/// Follows the stored console keys (see [`keyrings::follow`]).
pub async fn follow_keys(state: &State) -> DomainResult<bool> {
    keyrings::follow(state, Ring::Console).await
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
        let stored = keyrings::stored_text(&db.pool, Ring::Console)
            .await
            .unwrap()
            .unwrap();
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
        let stored = keyrings::stored_text(&db.pool, Ring::Console)
            .await
            .unwrap()
            .unwrap();
        assert!(stored.starts_with(crate::secrets::SEALED_PREFIX) && stored != clear);

        // Another secrets key: refused, saying what to do.
        let other = SecretsKey::from_bytes(dir.path().join("other.key"), [4; 32]);
        let e = load_keys(&db.pool, &other).await.unwrap_err();
        assert!(
            matches!(
                e,
                ConsoleKeysError::Secrets(crate::secrets::SecretsError::WrongKey { .. })
            ),
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
