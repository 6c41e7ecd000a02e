//! The user directory: domains (a tree under ROOT), accounts in domains, users of accounts (a
//! user is an alias of its account with its own credentials), and what a caller may see of it.
//!
//! One module per kind: `domains` (the tree, paths, deletion), `accounts` (create, rename,
//! role, enable/disable/lock, delete), `users` (create, update, password, keys, enable/disable,
//! failed-login lockout), `auth` (the caller behind a key, a session, a name), `login` (the
//! proof of a login). This module holds what several of them share: password hashing, the
//! caller's [`Scope`], name checks, the user row insert and the unique-violation mapping.
//!
//! Invariants:
//! * ROOT always exists and cannot be renamed or deleted; a domain's `path` is its parent's path
//!   plus `name/` (ROOT's is `/`), so a subtree is the paths that start with its path;
//! * the bootstrap root admin account (`is_system`) cannot be deleted, disabled or locked;
//! * passwords are stored as Argon2id PHC strings only; secret keys never leave this layer in a
//!   log or an error;
//! * a caller acts inside its [`Scope`]: Admin role types on everything, a Domain or Resource
//!   Admin inside its domain's subtree, the others on their own account.

pub mod accounts;
pub mod auth;
pub mod domains;
pub mod login;
pub mod users;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};

use crate::model::{DomainError, DomainResult, Filter};
use crate::roles::RoleType;
use crate::state::Caller;

/// The ROOT domain's id (fixed; created by the schema).
pub const ROOT_DOMAIN_ID: &str = "00000000-0000-4000-8000-000000000001";

/// Argon2id PHC string of `password` with a random salt (memory-hard: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> DomainResult<String> {
    let mut salt_bytes = [0u8; 16];
    getrandom::fill(&mut salt_bytes).map_err(|e| DomainError::Internal(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| DomainError::Internal(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DomainError::Internal(format!("password hashing failed: {e}")))
}

/// Whether `password` matches the stored PHC `hash` (false on any malformed hash).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Hashes on the blocking pool (Argon2 costs real CPU and memory).
pub async fn hash_password_blocking(password: &str) -> DomainResult<String> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| DomainError::Internal(e.to_string()))?
}

/// What part of the directory a caller acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything (Admin role types).
    All,
    /// The subtree of the domain with this path (Domain and Resource Admins).
    Subtree(String),
    /// Its own account (users).
    Account(String),
}

impl Scope {
    /// The scope of `caller`.
    pub fn of(caller: &Caller) -> Self {
        match caller.role.role_type() {
            RoleType::Admin => Self::All,
            RoleType::DomainAdmin | RoleType::ResourceAdmin => Self::Subtree(caller.domain_path.clone()),
            RoleType::User => Self::Account(caller.account_id.clone()),
        }
    }

    /// Limits `f` to rows this scope sees: `account_col` names the row's account id and
    /// `path_col` the path of the row's domain (joined by the query).
    pub fn restrict(&self, f: &mut Filter, account_col: &str, path_col: &str) {
        match self {
            Self::All => {}
            Self::Subtree(path) => f.prefix(path_col, path),
            Self::Account(id) => f.eq(account_col, id),
        }
    }

    /// Whether a domain with `path` is inside this scope (an account scope sees no domain but
    /// its own, which the caller checks by id).
    pub fn covers_domain(&self, path: &str) -> bool {
        match self {
            Self::All => true,
            Self::Subtree(p) => path.starts_with(p.as_str()),
            Self::Account(_) => false,
        }
    }

    /// Whether the account `account_id` in the domain with `path` is inside this scope.
    pub fn covers_account(&self, account_id: &str, path: &str) -> bool {
        match self {
            Self::Account(id) => id == account_id,
            other => other.covers_domain(path),
        }
    }
}

/// Whether `caller` may manage a resource owned by account `owner` (a template, a console
/// target): its owner, an Admin role type, or a Domain or Resource Admin whose subtree holds the
/// owner's domain.
pub async fn may_manage(
    state: &crate::state::State,
    caller: &Caller,
    owner: &str,
) -> Result<bool, sqlx::Error> {
    match Scope::of(caller) {
        Scope::All => Ok(true),
        Scope::Account(id) => Ok(id == owner),
        Scope::Subtree(path) => {
            if owner == caller.account_id {
                return Ok(true);
            }
            let owner_path: Option<String> = sqlx::query_scalar(
                "SELECT d.path FROM accounts a JOIN domains d ON d.id = a.domain_id WHERE a.id = $1",
            )
            .bind(owner.to_owned())
            .fetch_optional(&state.db.pool)
            .await?;
            Ok(owner_path.is_some_and(|p| p.starts_with(path.as_str())))
        }
    }
}

/// A name for a domain, account or user: 1–255 characters, no `/`, no control characters.
pub fn check_name(what: &str, name: &str) -> DomainResult<()> {
    if name.is_empty() || name.chars().count() > 255 {
        return Err(DomainError::Invalid(format!(
            "{what} must be 1 to 255 characters"
        )));
    }
    if name.contains('/') || name.chars().any(char::is_control) {
        return Err(DomainError::Invalid(format!(
            "{what} {name:?} may not contain '/' or control characters"
        )));
    }
    Ok(())
}

/// A user row to insert (the password already hashed).
#[derive(Debug)]
pub(crate) struct NewUserRow<'a> {
    pub(crate) id: &'a str,
    pub(crate) account_id: &'a str,
    pub(crate) username: &'a str,
    pub(crate) hash: &'a str,
    pub(crate) email: &'a str,
    pub(crate) firstname: &'a str,
    pub(crate) lastname: &'a str,
    pub(crate) timezone: Option<&'a str>,
    pub(crate) is_default: bool,
    pub(crate) created: &'a str,
}

pub(crate) async fn insert_user(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    u: &NewUserRow<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (id, account_id, username, password_hash, email, firstname, lastname, timezone, is_default, state, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'enabled', $10)",
    )
    .bind(u.id.to_owned())
    .bind(u.account_id.to_owned())
    .bind(u.username.to_owned())
    .bind(u.hash.to_owned())
    .bind(u.email.to_owned())
    .bind(u.firstname.to_owned())
    .bind(u.lastname.to_owned())
    .bind(u.timezone.map(str::to_owned))
    .bind(i64::from(u.is_default))
    .bind(u.created.to_owned())
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

/// A unique-index violation as `exists()`, anything else as a database error.
pub(crate) fn unique_or(e: sqlx::Error, exists: impl FnOnce() -> DomainError) -> DomainError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => exists(),
        other => DomainError::Db(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trip() {
        let h = hash_password("s3cret pass").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret pass", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("s3cret pass", "not a hash"));
    }

    #[test]
    fn scopes() {
        let sub = Scope::Subtree("/Sales/".into());
        assert!(sub.covers_domain("/Sales/") && sub.covers_domain("/Sales/EU/"));
        assert!(!sub.covers_domain("/") && !sub.covers_domain("/SalesX/"));
        assert!(Scope::All.covers_domain("/"));
        let own = Scope::Account("a".into());
        assert!(own.covers_account("a", "/") && !own.covers_account("b", "/"));
        assert!(check_name("name", "ok").is_ok());
        assert!(check_name("name", "a/b").is_err() && check_name("name", "").is_err());
    }
}
