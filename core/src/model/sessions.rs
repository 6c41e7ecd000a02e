//! Login sessions (`command=login`): kept in the database, so a restart of core or a failover to
//! the other core keeps UI users logged in.
//!
//! Invariants: neither the session id (`JSESSIONID`) nor the session key is stored, only their
//! SHA-256 digests; the key is compared in constant time; a session unused for
//! [`SESSION_TIMEOUT`] is refused and swept; a session dies with its user.

use std::time::Duration;

use subtle::ConstantTimeEq as _;

use crate::util::{hash_secret, now_ms};

/// Idle time after which a login session expires.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(1800);
/// A session's last use is written at most this often (each request would be a write).
const TOUCH_EVERY_MS: i64 = 30_000;

fn timeout_ms() -> i64 {
    i64::try_from(SESSION_TIMEOUT.as_millis()).unwrap_or(1_800_000)
}

/// Records a new session of `user_id`.
pub async fn create(
    pool: &sqlx::AnyPool,
    jsession: &str,
    key: &str,
    user_id: &str,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO login_sessions (id_hash, key_hash, user_id, created_ms, last_used_ms) VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(hash_secret(jsession))
    .bind(hash_secret(key))
    .bind(user_id.to_owned())
    .bind(now)
    .execute(pool)
    .await
    .map(|_| ())
}

/// The user of session `jsession` when both given keys match its key and it has not expired;
/// refreshes its last use.
pub async fn check(
    pool: &sqlx::AnyPool,
    jsession: &str,
    cookie_key: &str,
    param_key: &str,
) -> Result<Option<String>, sqlx::Error> {
    let id_hash = hash_secret(jsession);
    let row: Option<(String, String, i64)> =
        sqlx::query_as("SELECT key_hash, user_id, last_used_ms FROM login_sessions WHERE id_hash = $1")
            .bind(id_hash.clone())
            .fetch_optional(pool)
            .await?;
    let Some((key_hash, user_id, last_used)) = row else {
        return Ok(None);
    };
    let now = now_ms();
    if now - last_used > timeout_ms() {
        end(pool, jsession).await?;
        return Ok(None);
    }
    let ok = key_hash.as_bytes().ct_eq(hash_secret(cookie_key).as_bytes())
        & key_hash.as_bytes().ct_eq(hash_secret(param_key).as_bytes());
    if !bool::from(ok) {
        return Ok(None);
    }
    if now - last_used > TOUCH_EVERY_MS {
        sqlx::query("UPDATE login_sessions SET last_used_ms = $1 WHERE id_hash = $2")
            .bind(now)
            .bind(id_hash)
            .execute(pool)
            .await?;
    }
    Ok(Some(user_id))
}

/// Ends a session (`logout`).
pub async fn end(pool: &sqlx::AnyPool, jsession: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM login_sessions WHERE id_hash = $1")
        .bind(hash_secret(jsession))
        .execute(pool)
        .await
        .map(|_| ())
}

/// Deletes expired sessions and those of deleted users; returns how many.
pub async fn sweep(pool: &sqlx::AnyPool) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM login_sessions WHERE last_used_ms < $1 OR user_id NOT IN (SELECT id FROM users)")
        .bind(now_ms() - timeout_ms())
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_survive_a_new_pool_and_check_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, dir.path()).await.unwrap();
        create(&db.pool, "jid", "key", "u1").await.unwrap();
        drop(db);
        let db = crate::db::Db::open(None, dir.path()).await.unwrap();
        assert_eq!(
            check(&db.pool, "jid", "key", "key").await.unwrap().as_deref(),
            Some("u1")
        );
        assert_eq!(check(&db.pool, "jid", "key", "other").await.unwrap(), None);
        assert_eq!(check(&db.pool, "nope", "key", "key").await.unwrap(), None);
        let stored: String = sqlx::query_scalar("SELECT id_hash FROM login_sessions")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_ne!(stored, "jid", "the session id is not stored");
        end(&db.pool, "jid").await.unwrap();
        assert_eq!(check(&db.pool, "jid", "key", "key").await.unwrap(), None);
    }
}
