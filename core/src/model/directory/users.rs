//! Users: aliases of an account with their own name, password and API keys; enabled, disabled
//! or locked (by an operator, or by too many failed logins).
//!
//! Invariants: user names are unique cloud-wide; a user who changes its own password gives its
//! current one (an Admin role type never needs to); a password change ends the user's
//! other login sessions; `failed_logins` counts consecutive failures and a success resets it; at
//! `incorrect.login.attempts.allowed` failures the user is disabled (CloudStack's behaviour; its
//! account stays enabled) and only an `enableUser` brings it back; users of Admin-type accounts
//! are never disabled by failed logins (CloudStack's internal accounts: it would lock the
//! operators out), their failures are only logged.

use sqlx::Row as _;

use super::accounts::{self, AccountRef};
use super::{NewUserRow, insert_user, unique_or};
use super::{check_name, hash_password_blocking, verify_password};
use crate::model::{DomainError, DomainResult};
use crate::roles::Role;
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs, random_token};

/// A new user of an existing account.
#[derive(Debug)]
pub struct NewUser<'a> {
    /// User name.
    pub username: &'a str,
    /// Clear password.
    pub password: &'a str,
    /// Email.
    pub email: &'a str,
    /// First name.
    pub firstname: &'a str,
    /// Last name.
    pub lastname: &'a str,
    /// Time zone.
    pub timezone: Option<&'a str>,
    /// A chosen id (CloudStack's `userid`).
    pub id: Option<&'a str>,
}

/// Adds a user to account `a`; returns its id.
pub async fn create(state: &State, a: &AccountRef, u: &NewUser<'_>) -> DomainResult<String> {
    check_name("User name", u.username)?;
    if u.password.is_empty() {
        return Err(DomainError::Invalid("A password is required".into()));
    }
    let hash = hash_password_blocking(u.password).await?;
    let id = match u.id {
        Some(i) => i.to_owned(),
        None => new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?,
    };
    let mut tx = state.db.pool.begin().await?;
    let r = insert_user(
        &mut tx,
        &NewUserRow {
            id: &id,
            account_id: &a.id,
            username: u.username,
            hash: &hash,
            email: u.email,
            firstname: u.firstname,
            lastname: u.lastname,
            timezone: u.timezone,
            is_default: false,
            created: &now_cs(),
        },
    )
    .await;
    if let Err(e) = r {
        return Err(unique_or(e, || {
            DomainError::Invalid(format!("The user {} already exists", u.username))
        }));
    }
    tx.commit().await?;
    tracing::info!(user = u.username, account = %a.name, "Created a user");
    Ok(id)
}

/// What the directory knows of a user, for checks.
#[derive(Debug, Clone)]
pub struct UserRef {
    /// Id.
    pub id: String,
    /// Name.
    pub username: String,
    /// Its account.
    pub account: AccountRef,
    /// `enabled`, `disabled` or `locked`.
    pub state: String,
    /// Argon2 hash.
    pub password_hash: String,
    /// The account's default user (the root admin's first user).
    pub is_default: bool,
}

/// The user `id` if `caller` may act on it.
pub async fn get_in_scope(state: &State, caller: &Caller, id: &str) -> DomainResult<UserRef> {
    let row = sqlx::query(
        "SELECT id, username, account_id, state, password_hash, is_default FROM users WHERE id = $1",
    )
    .bind(id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?;
    let not_found = || DomainError::NotFound(format!("Unable to find user by id {id}"));
    let row = row.ok_or_else(not_found)?;
    let account_id: String = row.try_get("account_id")?;
    let account = accounts::get_in_scope(state, caller, &account_id)
        .await
        .map_err(|e| match e {
            DomainError::NotFound(_) => not_found(),
            other => other,
        })?;
    Ok(UserRef {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        account,
        state: row.try_get("state")?,
        password_hash: row.try_get("password_hash")?,
        is_default: row.try_get::<i64, _>("is_default")? != 0,
    })
}

/// Changes to a user (`updateUser`); `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct UserUpdate<'a> {
    /// New name.
    pub username: Option<&'a str>,
    /// New password.
    pub password: Option<&'a str>,
    /// The current password (required when a user changes its own).
    pub current_password: Option<&'a str>,
    /// Email.
    pub email: Option<&'a str>,
    /// First name.
    pub firstname: Option<&'a str>,
    /// Last name.
    pub lastname: Option<&'a str>,
    /// Time zone.
    pub timezone: Option<&'a str>,
}

/// Applies `up` to user `u`.
pub async fn update(state: &State, caller: &Caller, u: &UserRef, up: &UserUpdate<'_>) -> DomainResult<()> {
    let hash = match up.password {
        Some(p) => {
            if p.is_empty() {
                return Err(DomainError::Invalid("The new password may not be empty".into()));
            }
            // CloudStack: a user changing its own password proves it knows the current one;
            // an Admin (any user's, its own too) or a Domain Admin changing another user's
            // does not need to.
            if u.id == caller.user_id && !caller.role.is_admin() {
                let current = up.current_password.unwrap_or_default();
                let hash = u.password_hash.clone();
                let current = current.to_owned();
                let ok = tokio::task::spawn_blocking(move || verify_password(&current, &hash))
                    .await
                    .unwrap_or(false);
                if !ok {
                    return Err(DomainError::Invalid(
                        "Current password is incorrect: give the current password in currentpassword to change it".into(),
                    ));
                }
            }
            Some(hash_password_blocking(p).await?)
        }
        None => None,
    };
    let mut tx = state.db.pool.begin().await?;
    if let Some(name) = up.username.filter(|n| *n != u.username) {
        check_name("User name", name)?;
        let r = sqlx::query("UPDATE users SET username = $1 WHERE id = $2")
            .bind(name.to_owned())
            .bind(u.id.clone())
            .execute(&mut *tx)
            .await;
        if let Err(e) = r {
            return Err(unique_or(e, || {
                DomainError::Invalid(format!("The user {name} already exists"))
            }));
        }
    }
    for (col, v) in [
        ("email", up.email),
        ("firstname", up.firstname),
        ("lastname", up.lastname),
        ("timezone", up.timezone),
    ] {
        if let Some(v) = v {
            // The column name is one of the literals above, never caller input.
            sqlx::query(&format!("UPDATE users SET {col} = $1 WHERE id = $2"))
                .bind(v.to_owned())
                .bind(u.id.clone())
                .execute(&mut *tx)
                .await?;
        }
    }
    if let Some(h) = hash {
        sqlx::query("UPDATE users SET password_hash = $1, failed_logins = 0 WHERE id = $2")
            .bind(h)
            .bind(u.id.clone())
            .execute(&mut *tx)
            .await?;
        // Other sessions of the user end; the caller's own request carries on.
        sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
            .bind(u.id.clone())
            .execute(&mut *tx)
            .await?;
        tracing::info!(user = %u.username, "Password changed");
    }
    tx.commit().await?;
    Ok(())
}

/// Sets a user's state (`enabled`, `disabled`, `locked`); anything but enabled ends its
/// sessions. Enabling also clears the failed-login count.
pub async fn set_state(
    state: &State,
    caller: &Caller,
    u: &UserRef,
    to: accounts::AccountState,
) -> DomainResult<()> {
    if to != accounts::AccountState::Enabled {
        if u.account.is_system && u.is_default {
            return Err(DomainError::Denied(format!(
                "The root admin user cannot be {}",
                to.as_str()
            )));
        }
        if u.id == caller.user_id {
            return Err(DomainError::Denied(format!(
                "A user cannot be {} by itself",
                to.as_str()
            )));
        }
    }
    sqlx::query("UPDATE users SET state = $1, failed_logins = 0 WHERE id = $2")
        .bind(to.as_str())
        .bind(u.id.clone())
        .execute(&state.db.pool)
        .await?;
    if to == accounts::AccountState::Enabled {
        // CloudStack: enabling a user enables its account too.
        sqlx::query("UPDATE accounts SET state = 'enabled' WHERE id = $1")
            .bind(u.account.id.clone())
            .execute(&state.db.pool)
            .await?;
    } else {
        sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
            .bind(u.id.clone())
            .execute(&state.db.pool)
            .await?;
    }
    tracing::info!(user = %u.username, state = to.as_str(), "User state changed");
    Ok(())
}

/// Deletes user `u` (not the root admin's, not the caller itself).
pub async fn delete(state: &State, caller: &Caller, u: &UserRef) -> DomainResult<()> {
    if u.account.is_system && u.is_default {
        return Err(DomainError::Denied(
            "The root admin user cannot be deleted".into(),
        ));
    }
    if u.id == caller.user_id {
        return Err(DomainError::Denied("A user cannot delete itself".into()));
    }
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(u.id.clone())
        .execute(&state.db.pool)
        .await?;
    sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
        .bind(u.id.clone())
        .execute(&state.db.pool)
        .await?;
    tracing::info!(user = %u.username, "Deleted a user");
    Ok(())
}

/// Gives user `user_id` a fresh key pair; returns (apikey, secretkey).
pub async fn new_keys(state: &State, user_id: &str) -> DomainResult<(String, String)> {
    let api_key = random_token::<64>().map_err(|e| DomainError::Internal(e.to_string()))?;
    let secret = random_token::<64>().map_err(|e| DomainError::Internal(e.to_string()))?;
    sqlx::query("UPDATE users SET api_key = $1, secret_key = $2 WHERE id = $3")
        .bind(api_key.clone())
        .bind(secret.clone())
        .bind(user_id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok((api_key, secret))
}

/// Sets a user's password without checks (the bootstrap root admin's on first start).
pub async fn set_password(state: &State, user_id: &str, password: &str) -> DomainResult<()> {
    let hash = hash_password_blocking(password).await?;
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(hash)
        .bind(user_id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// What a failed login did to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedLogin {
    /// Counted; `left` more failures disable the user.
    Counted {
        /// Failures left before the user is disabled.
        left: i64,
    },
    /// This failure disabled the user.
    Disabled,
    /// Not counted: a user of an Admin-type account, or counting is off.
    Exempt,
}

/// Counts a failed login of the enabled user `user_id`; at `allowed` consecutive failures the
/// user is disabled (see the module doc for who is exempt).
pub async fn failed_login(state: &State, user_id: &str, allowed: i64) -> Result<FailedLogin, sqlx::Error> {
    let role: Option<String> = sqlx::query_scalar(
        "SELECT a.role_id FROM users u JOIN accounts a ON a.id = u.account_id WHERE u.id = $1",
    )
    .bind(user_id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?;
    let admin = role.and_then(|r| Role::by_id(&r)).is_none_or(Role::is_admin);
    if admin || allowed <= 0 {
        if admin {
            tracing::warn!(user_id, "Failed login of an admin user (never disabled for it)");
        }
        return Ok(FailedLogin::Exempt);
    }
    sqlx::query("UPDATE users SET failed_logins = failed_logins + 1 WHERE id = $1")
        .bind(user_id.to_owned())
        .execute(&state.db.pool)
        .await?;
    let n: i64 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE id = $1")
        .bind(user_id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if n >= allowed {
        sqlx::query("UPDATE users SET state = 'disabled' WHERE id = $1 AND state = 'enabled'")
            .bind(user_id.to_owned())
            .execute(&state.db.pool)
            .await?;
        sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
            .bind(user_id.to_owned())
            .execute(&state.db.pool)
            .await?;
        tracing::warn!(
            user_id,
            failures = n,
            "User disabled after too many failed logins"
        );
        return Ok(FailedLogin::Disabled);
    }
    Ok(FailedLogin::Counted { left: allowed - n })
}

/// A successful login resets the failure count.
pub async fn login_succeeded(state: &State, user_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET failed_logins = 0 WHERE id = $1 AND failed_logins <> 0")
        .bind(user_id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// What `login` answers of a user beyond its caller identity.
#[derive(Debug, Clone)]
pub struct Profile {
    /// First name.
    pub firstname: Option<String>,
    /// Last name.
    pub lastname: Option<String>,
    /// Time zone, if set.
    pub timezone: Option<String>,
}

/// The profile of user `user_id`.
pub async fn profile(state: &State, user_id: &str) -> DomainResult<Profile> {
    let row = sqlx::query("SELECT firstname, lastname, timezone FROM users WHERE id = $1")
        .bind(user_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find user by id {user_id}")))?;
    Ok(Profile {
        firstname: row.try_get("firstname")?,
        lastname: row.try_get("lastname")?,
        timezone: row
            .try_get::<Option<String>, _>("timezone")?
            .filter(|t| !t.is_empty()),
    })
}
