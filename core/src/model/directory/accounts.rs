//! Accounts: created with their first user in a domain, with one of the predefined roles;
//! renamed, re-roled, enabled, disabled, locked and deleted.
//!
//! Invariants: account names are unique cloud-wide (a documented difference from CloudStack,
//! which scopes them to a domain); a caller creates accounts only inside its scope and never
//! with a role of a higher role type than its own (a Domain Admin makes users and domain admins
//! only); the bootstrap root admin account cannot be deleted, disabled, locked or re-roled;
//! disabling or locking an account ends its users' login sessions.

use sqlx::Row as _;

use super::{Scope, check_name, domains, hash_password_blocking, unique_or};
use crate::model::{DomainError, DomainResult};
use crate::roles::{Role, RoleType};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// An account's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountState {
    /// Its users may log in and call the API.
    Enabled,
    /// Nobody of it may; its resources stay.
    Disabled,
    /// Its users may not log in; CloudStack keeps its resources running.
    Locked,
}

impl AccountState {
    /// Stored and answered name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::Locked => "locked",
        }
    }
}

/// A new account and its first user.
#[derive(Debug)]
pub struct NewAccount<'a> {
    /// Account name.
    pub account: &'a str,
    /// Domain (default: the caller's).
    pub domain_id: Option<&'a str>,
    /// First user's name.
    pub username: &'a str,
    /// Clear password (hashed here).
    pub password: &'a str,
    /// Email.
    pub email: &'a str,
    /// First name.
    pub firstname: &'a str,
    /// Last name.
    pub lastname: &'a str,
    /// Time zone of the user.
    pub timezone: Option<&'a str>,
    /// Network domain of the account.
    pub network_domain: Option<&'a str>,
    /// Role.
    pub role: Role,
    /// The bootstrap root admin.
    pub is_system: bool,
}

/// Whether `caller` may give an account `role`: Admins any; Domain Admins user and domain-admin
/// roles; Resource Admins user roles; users none.
fn may_grant(caller: &Caller, role: Role) -> bool {
    match caller.role.role_type() {
        RoleType::Admin => true,
        RoleType::DomainAdmin => matches!(role.role_type(), RoleType::User | RoleType::DomainAdmin),
        RoleType::ResourceAdmin => role.role_type() == RoleType::User,
        RoleType::User => false,
    }
}

/// Creates the account and its first user in one transaction; returns (account id, user id).
/// `caller` is `None` for the bootstrap root admin.
pub async fn create(
    state: &State,
    caller: Option<&Caller>,
    a: &NewAccount<'_>,
) -> DomainResult<(String, String)> {
    check_name("Account name", a.account)?;
    check_name("User name", a.username)?;
    if a.password.is_empty() {
        return Err(DomainError::Invalid("A password is required".into()));
    }
    let domain_id = match (caller, a.domain_id) {
        (Some(c), d) => {
            if !may_grant(c, a.role) {
                return Err(DomainError::Denied(format!(
                    "Account {} may not create an account with role {}",
                    c.account_name,
                    a.role.name()
                )));
            }
            domains::get_in_scope(state, c, d.unwrap_or(&c.domain_id))
                .await?
                .id
        }
        (None, d) => d.unwrap_or(super::ROOT_DOMAIN_ID).to_owned(),
    };
    let taken: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM accounts WHERE name = $1) + (SELECT COUNT(*) FROM users WHERE username = $2)",
    )
    .bind(a.account.to_owned())
    .bind(a.username.to_owned())
    .fetch_one(&state.db.pool)
    .await?;
    let exists = || {
        DomainError::Invalid(format!(
            "The user {} or account {} already exists",
            a.username, a.account
        ))
    };
    if taken > 0 {
        return Err(exists());
    }
    let hash = hash_password_blocking(a.password).await?;
    let new_id = || new_uuid().map_err(|e| DomainError::Internal(e.to_string()));
    let (account_id, user_id, now) = (new_id()?, new_id()?, now_cs());
    let mut tx = state.db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO accounts (id, name, account_type, role_type, role_id, domain_id, network_domain, state, is_system, created) VALUES ($1, $2, $3, $4, $5, $6, $7, 'enabled', $8, $9)",
    )
    .bind(account_id.clone())
    .bind(a.account.to_owned())
    .bind(a.role.account_type())
    .bind(a.role.role_type().as_str())
    .bind(a.role.id())
    .bind(domain_id)
    .bind(a.network_domain.map(str::to_owned))
    .bind(i64::from(a.is_system))
    .bind(now.clone())
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        return Err(unique_or(e, exists));
    }
    let inserted = super::insert_user(
        &mut tx,
        &super::NewUserRow {
            id: &user_id,
            account_id: &account_id,
            username: a.username,
            hash: &hash,
            email: a.email,
            firstname: a.firstname,
            lastname: a.lastname,
            timezone: a.timezone,
            is_default: a.is_system,
            created: &now,
        },
    )
    .await;
    if let Err(e) = inserted {
        return Err(unique_or(e, exists));
    }
    tx.commit().await?;
    tracing::info!(account = a.account, role = a.role.name(), "Created an account");
    Ok((account_id, user_id))
}

/// What the directory knows of an account, for checks.
#[derive(Debug, Clone)]
pub struct AccountRef {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Its domain's id and path.
    pub domain_id: String,
    /// Its domain's path.
    pub domain_path: String,
    /// Role.
    pub role: Role,
    /// The bootstrap root admin.
    pub is_system: bool,
    /// `enabled`, `disabled` or `locked`.
    pub state: String,
}

/// The account `id` if `caller` may act on it.
pub async fn get_in_scope(state: &State, caller: &Caller, id: &str) -> DomainResult<AccountRef> {
    let row = sqlx::query(
        "SELECT a.id, a.name, a.domain_id, d.path, a.role_id, a.is_system, a.state FROM accounts a JOIN domains d ON d.id = a.domain_id WHERE a.id = $1",
    )
    .bind(id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?;
    let not_found = || DomainError::NotFound(format!("Unable to find account by id {id}"));
    let row = row.ok_or_else(not_found)?;
    let a = AccountRef {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        domain_id: row.try_get("domain_id")?,
        domain_path: row.try_get("path")?,
        role: Role::by_id(&row.try_get::<String, _>("role_id")?).unwrap_or(Role::ReadOnlyUser),
        is_system: row.try_get::<i64, _>("is_system")? != 0,
        state: row.try_get("state")?,
    };
    if !Scope::of(caller).covers_account(&a.id, &a.domain_path) {
        return Err(not_found());
    }
    // A Domain or Resource Admin whose domain is ROOT sees the Admin accounts but may not act on
    // them (CloudStack's `checkAccess`: no action on an account of a higher role type).
    if a.role.is_admin() && !caller.role.is_admin() {
        return Err(DomainError::Denied(format!(
            "Account {} may not act on account {}, which has the admin role {}",
            caller.account_name,
            a.name,
            a.role.name()
        )));
    }
    Ok(a)
}

/// The account named `name` in domain `domain_id` (default: ROOT... or any domain when the
/// name is unique cloud-wide, which it is), if `caller` may act on it.
pub async fn by_name_in_scope(
    state: &State,
    caller: &Caller,
    name: &str,
    domain_id: Option<&str>,
) -> DomainResult<AccountRef> {
    let id: Option<String> = sqlx::query_scalar("SELECT id FROM accounts WHERE name = $1")
        .bind(name.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    let not_found = || DomainError::NotFound(format!("Unable to find account {name}"));
    let a = get_in_scope(state, caller, &id.ok_or_else(not_found)?).await?;
    match domain_id {
        Some(d) if d != a.domain_id => Err(DomainError::NotFound(format!(
            "Unable to find account {name} in domain {d}"
        ))),
        _ => Ok(a),
    }
}

/// The one a caller may not change: its own account (for state changes) or the root admin.
fn check_changeable(caller: &Caller, a: &AccountRef, what: &str) -> DomainResult<()> {
    if a.is_system {
        return Err(DomainError::Denied(format!(
            "The root admin account cannot be {what}"
        )));
    }
    if a.id == caller.account_id {
        return Err(DomainError::Denied(format!(
            "An account cannot be {what} by itself"
        )));
    }
    Ok(())
}

/// Sets the state of account `a`; disabling or locking ends its users' sessions.
pub async fn set_state(state: &State, caller: &Caller, a: &AccountRef, to: AccountState) -> DomainResult<()> {
    if to != AccountState::Enabled {
        check_changeable(caller, a, to.as_str())?;
    }
    sqlx::query("UPDATE accounts SET state = $1 WHERE id = $2")
        .bind(to.as_str())
        .bind(a.id.clone())
        .execute(&state.db.pool)
        .await?;
    if to != AccountState::Enabled {
        end_sessions_of_account(state, &a.id).await?;
    }
    tracing::info!(account = %a.name, state = to.as_str(), "Account state changed");
    Ok(())
}

/// Ends the login sessions of every user of `account_id`.
pub async fn end_sessions_of_account(state: &State, account_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM login_sessions WHERE user_id IN (SELECT id FROM users WHERE account_id = $1)")
        .bind(account_id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// Renames account `a`, sets its network domain, or gives it another role.
pub async fn update(
    state: &State,
    caller: &Caller,
    a: &AccountRef,
    new_name: Option<&str>,
    network_domain: Option<&str>,
    role: Option<Role>,
) -> DomainResult<()> {
    let mut tx = state.db.pool.begin().await?;
    if let Some(name) = new_name.filter(|n| *n != a.name) {
        check_name("Account name", name)?;
        let r = sqlx::query("UPDATE accounts SET name = $1 WHERE id = $2")
            .bind(name.to_owned())
            .bind(a.id.clone())
            .execute(&mut *tx)
            .await;
        if let Err(e) = r {
            return Err(unique_or(e, || {
                DomainError::Invalid(format!("The account {name} already exists"))
            }));
        }
    }
    if let Some(nd) = network_domain {
        sqlx::query("UPDATE accounts SET network_domain = $1 WHERE id = $2")
            .bind(Some(nd.to_owned()).filter(|s| !s.is_empty()))
            .bind(a.id.clone())
            .execute(&mut *tx)
            .await?;
    }
    if let Some(role) = role.filter(|r| *r != a.role) {
        check_changeable(caller, a, "given another role")?;
        if !may_grant(caller, role) {
            return Err(DomainError::Denied(format!(
                "Account {} may not give role {}",
                caller.account_name,
                role.name()
            )));
        }
        if role.role_type() != a.role.role_type() {
            // CloudStack: "Role type cannot be changed" — the account type follows the role type.
            return Err(DomainError::Invalid(format!(
                "The new role {} is of type {}, the account's is {}: a role of the same type is required",
                role.name(),
                role.role_type().as_str(),
                a.role.role_type().as_str()
            )));
        }
        sqlx::query("UPDATE accounts SET role_id = $1 WHERE id = $2")
            .bind(role.id())
            .bind(a.id.clone())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Deletes account `a` and its users.
pub async fn delete(state: &State, caller: &Caller, a: &AccountRef) -> DomainResult<()> {
    check_changeable(caller, a, "deleted")?;
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM users WHERE account_id = $1")
        .bind(a.id.clone())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM accounts WHERE id = $1")
        .bind(a.id.clone())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Its users' login sessions end with them.
    crate::model::sessions::sweep(&state.db.pool).await?;
    tracing::info!(account = %a.name, "Deleted an account");
    Ok(())
}

/// Whether any account exists (first start creates the root admin when none does).
pub async fn any(state: &State) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
        .fetch_one(&state.db.pool)
        .await?;
    Ok(n > 0)
}
