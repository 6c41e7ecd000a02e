//! `login`'s decision: a password checked against the stored hash, or a request signed with the
//! single sign-on key of an operator's authentication proxy; failed-login counting.
//!
//! Invariants:
//! * an unknown user, a user of another domain, a wrong password and a bad signature fail alike
//!   (one message, and the same Argon2 work, so timing does not tell them apart);
//! * at most [`MAX_PASSWORD_CHECKS`] Argon2 checks run at once (each costs ~19 MiB and real
//!   CPU), so unauthenticated logins cannot exhaust memory or the blocking pool;
//! * a single sign-on login is accepted only when `security.singlesignon.key` is set, its
//!   `timestamp` is within `security.singlesignon.tolerance.millis` of core's clock and its
//!   signature verifies (constant time); each signature is accepted once (a replay within the
//!   window is refused; the table of seen signatures keeps the window only);
//! * only a wrong password counts toward the lockout (never a signature, never a disabled user).

use std::sync::OnceLock;

use tokio::sync::Semaphore;

use super::auth::{self, AuthUser};
use super::domains;
use super::users::{self, FailedLogin};
use super::{hash_password, verify_password};
use crate::model::settings;
use crate::state::State;
use crate::util::now_ms;

/// Most password checks running at once; more wait their turn.
pub const MAX_PASSWORD_CHECKS: usize = 4;

/// How a login proves who it is.
#[derive(Debug)]
pub enum Proof<'a> {
    /// The user's password.
    Password(&'a str),
    /// Signed with the single sign-on key: every parameter of the request, the signature among
    /// them (`signature`), and `timestamp` in milliseconds.
    SingleSignOn(&'a [(String, String)]),
}

/// A login request.
#[derive(Debug)]
pub struct Login<'a> {
    /// User name.
    pub username: &'a str,
    /// `domainid` if given.
    pub domain_id: Option<&'a str>,
    /// `domain` (a path: `/`, `ROOT`, `ROOT/A`, `/A/`) if given; ROOT when neither is.
    pub domain_path: Option<&'a str>,
    /// The proof.
    pub proof: Proof<'a>,
}

/// Why a login failed (the text is for the client; details go to the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Wrong user, domain, password or signature.
    #[error("Failed to authenticate user {user} in domain {domain}; please provide valid credentials")]
    Failed {
        /// User name as given.
        user: String,
        /// Domain as given.
        domain: String,
    },
    /// The right password, but the user or its account is disabled or locked.
    #[error(
        "User {user} (or their account) in domain {domain} is disabled/locked. Please contact the administrator."
    )]
    NotEnabled {
        /// User name.
        user: String,
        /// Domain.
        domain: String,
    },
    /// The database failed (never shown).
    #[error("database error")]
    Db(String),
}

impl From<sqlx::Error> for LoginError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.to_string())
    }
}

/// Checks a login; on success the user, whose failed-login count is reset.
pub async fn check(state: &State, l: &Login<'_>) -> Result<AuthUser, LoginError> {
    let domain_text = l.domain_id.or(l.domain_path).unwrap_or("/").to_owned();
    let failed = || LoginError::Failed {
        user: l.username.to_owned(),
        domain: domain_text.clone(),
    };
    let domain = match (l.domain_id, l.domain_path) {
        (Some(id), _) => domains::get(state, id).await?,
        (None, Some(path)) => domains::by_path(state, path).await?,
        (None, None) => domains::get(state, super::ROOT_DOMAIN_ID).await?,
    };
    let user = auth::by_name_any_state(state, l.username)
        .await?
        .filter(|u| domain.as_ref().is_some_and(|d| d.id == u.caller.domain_id));
    let proven = match &l.proof {
        Proof::Password(p) => password_matches(user.as_ref(), p).await,
        Proof::SingleSignOn(params) => sso_verifies(state, params).await?,
    };
    let Some(user) = user else {
        return Err(failed());
    };
    if !proven {
        if user.enabled && matches!(l.proof, Proof::Password(_)) {
            let allowed = settings::int(state, &settings::LOGIN_ATTEMPTS).await;
            if users::failed_login(state, &user.caller.user_id, allowed).await? == FailedLogin::Disabled {
                tracing::warn!(user = %user.caller.username, "User has been disabled due to multiple failed login attempts");
            }
        }
        tracing::info!(user = %user.caller.username, "Failed login");
        return Err(failed());
    }
    if !user.enabled {
        return Err(LoginError::NotEnabled {
            user: user.caller.username.clone(),
            domain: domain_text,
        });
    }
    users::login_succeeded(state, &user.caller.user_id).await?;
    Ok(user)
}

/// Whether `password` matches the user's hash; an unknown user costs the same check.
async fn password_matches(user: Option<&AuthUser>, password: &str) -> bool {
    static DUMMY_HASH: OnceLock<String> = OnceLock::new();
    let hash = match user {
        Some(u) => u.password_hash.clone(),
        None => DUMMY_HASH
            .get_or_init(|| hash_password("not a password").unwrap_or_default())
            .clone(),
    };
    static PASSWORD_CHECKS: Semaphore = Semaphore::const_new(MAX_PASSWORD_CHECKS);
    let Ok(_slot) = PASSWORD_CHECKS.acquire().await else {
        return false;
    };
    let password = password.to_owned();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    ok && user.is_some()
}

/// Whether `params` carry a fresh, valid, unseen single sign-on signature.
async fn sso_verifies(state: &State, params: &[(String, String)]) -> Result<bool, sqlx::Error> {
    let Some(key) = settings::secret(state, &settings::SSO_KEY).await else {
        tracing::info!("Single sign-on login refused: security.singlesignon.key is not set");
        return Ok(false);
    };
    let get = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let (Some(signature), Some(timestamp)) = (get("signature"), get("timestamp")) else {
        return Ok(false);
    };
    let Ok(ts) = timestamp.parse::<i64>() else {
        return Ok(false);
    };
    let tolerance = settings::int(state, &settings::SSO_TOLERANCE).await;
    let now = now_ms();
    if now.abs_diff(ts) > tolerance.unsigned_abs() {
        tracing::info!("Single sign-on login refused: timestamp outside the tolerance");
        return Ok(false);
    }
    if !crate::signing::verify(params, &key, signature) {
        tracing::info!("Single sign-on login refused: bad signature");
        return Ok(false);
    }
    // Once only: the first insert of a signature wins; entries older than the window go.
    sqlx::query("DELETE FROM sso_logins WHERE seen_ms < $1")
        .bind(now - 2 * tolerance)
        .execute(&state.db.pool)
        .await?;
    let inserted = sqlx::query("INSERT INTO sso_logins (signature, seen_ms) VALUES ($1, $2)")
        .bind(crate::util::hash_secret(signature))
        .bind(now)
        .execute(&state.db.pool)
        .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            tracing::warn!("Single sign-on login refused: the signature was used before (replay)");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
