//! Who is calling: the user behind an API key, a login session, a user name in a domain, or the
//! integration port (the root admin), as a [`Caller`] with its secret material.
//!
//! Invariants: only an enabled user of an enabled account is a caller (a locked or disabled
//! one is found for the failed-login count only, by [`by_name_any_state`]); the secret key and
//! password hash stay in [`AuthUser`], never in a `Caller`.

use sqlx::Row as _;

use crate::roles::Role;
use crate::state::{Caller, State};

const SELECT: &str = "SELECT u.id AS user_id, u.username, u.password_hash, u.secret_key, u.state AS user_state, a.state AS account_state, a.id AS account_id, a.name AS account_name, a.role_id, a.domain_id, d.path AS domain_path FROM users u JOIN accounts a ON a.id = u.account_id JOIN domains d ON d.id = a.domain_id";
const ENABLED: &str = "u.state = 'enabled' AND a.state = 'enabled'";

/// A user found for authentication, with its secret material.
#[derive(Debug)]
pub struct AuthUser {
    /// Who it is.
    pub caller: Caller,
    /// Argon2 PHC password hash.
    pub password_hash: String,
    /// HMAC secret, if keys were registered.
    pub secret_key: Option<String>,
    /// Whether both the user and its account are enabled.
    pub enabled: bool,
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<AuthUser, sqlx::Error> {
    let role: String = row.try_get("role_id")?;
    let user_state: String = row.try_get("user_state")?;
    let account_state: String = row.try_get("account_state")?;
    Ok(AuthUser {
        caller: Caller {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            account_id: row.try_get("account_id")?,
            account_name: row.try_get("account_name")?,
            // An unknown role id (a database edited by hand) gets the least privileges.
            role: Role::by_id(&role).unwrap_or(Role::ReadOnlyUser),
            domain_id: row.try_get("domain_id")?,
            domain_path: row.try_get("domain_path")?,
        },
        password_hash: row.try_get("password_hash")?,
        secret_key: row.try_get("secret_key")?,
        enabled: user_state == "enabled" && account_state == "enabled",
    })
}

async fn one(state: &State, where_: &str, bind: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    let sql = format!("{SELECT} WHERE {where_}");
    let row = sqlx::query(&sql)
        .bind(bind.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The enabled user owning `api_key`.
pub async fn by_api_key(state: &State, api_key: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    one(state, &format!("u.api_key = $1 AND {ENABLED}"), api_key).await
}

/// The enabled user with id `user_id` (a login session's or a queued job's caller).
pub async fn by_id(state: &State, user_id: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    one(state, &format!("u.id = $1 AND {ENABLED}"), user_id).await
}

/// The user named `username`, whatever its state (login counts failures of locked users too).
pub async fn by_name_any_state(state: &State, username: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    one(state, "u.username = $1", username).await
}

/// The bootstrap root admin's first user (the integration port's caller).
pub async fn root_admin(state: &State) -> Result<Option<AuthUser>, sqlx::Error> {
    let sql = format!("{SELECT} WHERE a.is_system = 1 ORDER BY u.is_default DESC, u.created LIMIT 1");
    let row = sqlx::query(&sql).fetch_optional(&state.db.pool).await?;
    row.as_ref().map(from_row).transpose()
}
