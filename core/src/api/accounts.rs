//! Accounts and users: `createAccount`, `listAccounts`, `deleteAccount` (async), `listUsers`,
//! `registerUserKeys`, plus the bootstrap root admin and password checks for `login`.
//!
//! Invariants: one user per account is created by `createAccount` (more users per account come
//! later); passwords are stored as Argon2id PHC strings, never in clear; secret keys are stored
//! (the server needs them to verify HMAC signatures) but never logged or listed; the bootstrap root
//! admin account (`is_system`) cannot be deleted; a non-admin caller only sees its own account.

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, Role, State};
use crate::util::{new_uuid, now_cs, random_token};

/// The domain every account lives in (domains are not modelled yet).
pub const ROOT_DOMAIN_ID: &str = "00000000-0000-4000-8000-000000000001";

/// `createAccount` parameters.
pub const CREATE_ACCOUNT: &[ParamSpec] = &[
    req("username", Ty::String, "Unique username"),
    req("password", Ty::String, "Clear text password"),
    req("email", Ty::String, "Email"),
    req("firstname", Ty::String, "First name"),
    req("lastname", Ty::String, "Last name"),
    opt("account", Ty::String, "Account name (default: the username)"),
    opt(
        "accounttype",
        Ty::Short,
        "0 user, 1 root admin (when roletype is not given)",
    ),
    opt("roletype", Ty::String, "Admin, User or ReadOnly"),
];
/// `listAccounts` parameters.
pub const LIST_ACCOUNTS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Account id"),
    opt("name", Ty::String, "Account name"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `deleteAccount` parameters.
pub const DELETE_ACCOUNT: &[ParamSpec] = &[req("id", Ty::Uuid, "Account id")];
/// `listUsers` parameters.
pub const LIST_USERS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "User id"),
    opt("username", Ty::String, "User name"),
    opt("accountid", Ty::Uuid, "Account id"),
    opt("keyword", Ty::String, "Substring of the user name"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `registerUserKeys` parameters.
pub const REGISTER_USER_KEYS: &[ParamSpec] = &[req("id", Ty::Uuid, "User id")];

/// Creating an account failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateAccountError {
    /// Database failure.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// Random generator failure.
    #[error("random generator failed")]
    Random(#[from] crate::util::RandomError),
    /// Password hashing failure.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Argon2id PHC string of `password` with a random salt.
pub fn hash_password(password: &str) -> Result<String, CreateAccountError> {
    let salt_bytes = {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| CreateAccountError::Hash(e.to_string()))?;
        b
    };
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| CreateAccountError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CreateAccountError::Hash(e.to_string()))
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

/// A new account with its user.
#[derive(Debug)]
pub struct NewAccount<'a> {
    /// Account name.
    pub account: &'a str,
    /// User name.
    pub username: &'a str,
    /// Clear password (hashed here).
    pub password: &'a str,
    /// Email, first and last name.
    pub email: &'a str,
    /// First name.
    pub firstname: &'a str,
    /// Last name.
    pub lastname: &'a str,
    /// Role.
    pub role: Role,
    /// The bootstrap root admin.
    pub is_system: bool,
}

/// Inserts an account and its user in one transaction; returns (account id, user id).
pub async fn insert_account(
    state: &State,
    a: &NewAccount<'_>,
) -> Result<(String, String), CreateAccountError> {
    let password = a.password.to_owned();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| CreateAccountError::Hash(e.to_string()))??;
    let (account_id, user_id, now) = (new_uuid()?, new_uuid()?, now_cs());
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO accounts (id, name, account_type, role_type, state, is_system, created) VALUES ($1, $2, $3, $4, 'enabled', $5, $6)",
    )
    .bind(account_id.clone())
    .bind(a.account.to_owned())
    .bind(a.role.account_type())
    .bind(a.role.as_str())
    .bind(i64::from(a.is_system))
    .bind(now.clone())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO users (id, account_id, username, password_hash, email, firstname, lastname, state, created) VALUES ($1, $2, $3, $4, $5, $6, $7, 'enabled', $8)",
    )
    .bind(user_id.clone())
    .bind(account_id.clone())
    .bind(a.username.to_owned())
    .bind(hash)
    .bind(a.email.to_owned())
    .bind(a.firstname.to_owned())
    .bind(a.lastname.to_owned())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((account_id, user_id))
}

/// Gives `user_id` a fresh key pair; returns (apikey, secretkey).
pub async fn new_keys(state: &State, user_id: &str) -> Result<(String, String), ApiError> {
    let api_key = random_token::<64>().map_err(|e| ApiError::internal(&e))?;
    let secret = random_token::<64>().map_err(|e| ApiError::internal(&e))?;
    sqlx::query("UPDATE users SET api_key = $1, secret_key = $2 WHERE id = $3")
        .bind(api_key.clone())
        .bind(secret.clone())
        .bind(user_id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok((api_key, secret))
}

const CALLER_SELECT: &str = "SELECT u.id AS user_id, u.username, u.password_hash, u.secret_key, a.id AS account_id, a.name AS account_name, a.role_type FROM users u JOIN accounts a ON a.id = u.account_id";

/// A user found for authentication, with its secret material.
#[derive(Debug)]
pub struct AuthUser {
    /// Who it is.
    pub caller: Caller,
    /// Argon2 PHC password hash.
    pub password_hash: String,
    /// HMAC secret, if keys were registered.
    pub secret_key: Option<String>,
}

fn auth_user(row: &sqlx::any::AnyRow) -> Result<AuthUser, sqlx::Error> {
    let role: String = row.try_get("role_type")?;
    Ok(AuthUser {
        caller: Caller {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            account_id: row.try_get("account_id")?,
            account_name: row.try_get("account_name")?,
            role: Role::parse(&role).unwrap_or(Role::ReadOnly),
        },
        password_hash: row.try_get("password_hash")?,
        secret_key: row.try_get("secret_key")?,
    })
}

/// The enabled user owning `api_key`.
pub async fn user_by_api_key(state: &State, api_key: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    let sql = format!("{CALLER_SELECT} WHERE u.api_key = $1 AND u.state = 'enabled' AND a.state = 'enabled'");
    let row = sqlx::query(&sql)
        .bind(api_key.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(auth_user).transpose()
}

/// The enabled user with id `user_id` (a login session's or a queued job's caller).
pub async fn user_by_id(state: &State, user_id: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    let sql = format!("{CALLER_SELECT} WHERE u.id = $1 AND u.state = 'enabled' AND a.state = 'enabled'");
    let row = sqlx::query(&sql)
        .bind(user_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(auth_user).transpose()
}

/// The enabled user named `username`.
pub async fn user_by_name(state: &State, username: &str) -> Result<Option<AuthUser>, sqlx::Error> {
    let sql =
        format!("{CALLER_SELECT} WHERE u.username = $1 AND u.state = 'enabled' AND a.state = 'enabled'");
    let row = sqlx::query(&sql)
        .bind(username.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(auth_user).transpose()
}

/// Whether any account exists (first start creates the root admin when none does).
pub async fn any_account(state: &State) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
        .fetch_one(&state.db.pool)
        .await?;
    Ok(n > 0)
}

fn user_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let role: String = row.try_get("role_type")?;
    let role = Role::parse(&role).unwrap_or(Role::ReadOnly);
    let api_key: Option<String> = row.try_get("api_key")?;
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "username": row.try_get::<String, _>("username")?,
        "firstname": row.try_get::<Option<String>, _>("firstname")?,
        "lastname": row.try_get::<Option<String>, _>("lastname")?,
        "email": row.try_get::<Option<String>, _>("email")?,
        "created": row.try_get::<String, _>("created")?,
        "state": row.try_get::<String, _>("state")?,
        "account": row.try_get::<String, _>("account_name")?,
        "accountid": row.try_get::<String, _>("account_id")?,
        "accounttype": role.account_type(),
        "roletype": role.as_str(),
        "rolename": role.role_name(),
        "domain": "ROOT",
        "domainid": ROOT_DOMAIN_ID,
        "iscallerchilddomain": false,
        "isdefault": false,
    });
    if let Some(k) = api_key {
        v["apikey"] = json!(k);
    }
    Ok(v)
}

const USER_SELECT: &str = "SELECT u.id, u.username, u.firstname, u.lastname, u.email, u.created, u.state, u.api_key, a.name AS account_name, a.id AS account_id, a.role_type FROM users u JOIN accounts a ON a.id = u.account_id";

async fn users_of(state: &State, account_id: &str) -> Result<Vec<Value>, sqlx::Error> {
    let mut f = Filter::default();
    f.eq("u.account_id", account_id);
    let rows = f
        .rows(&state.db.pool, USER_SELECT, " ORDER BY u.created, u.id")
        .await?;
    rows.iter().map(user_json).collect()
}

async fn account_json(state: &State, row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let role: String = row.try_get("role_type")?;
    let role = Role::parse(&role).unwrap_or(Role::ReadOnly);
    Ok(json!({
        "id": id,
        "name": row.try_get::<String, _>("name")?,
        "accounttype": role.account_type(),
        "roletype": role.as_str(),
        "rolename": role.role_name(),
        "state": row.try_get::<String, _>("state")?,
        "created": row.try_get::<String, _>("created")?,
        "domain": "ROOT",
        "domainid": ROOT_DOMAIN_ID,
        "isdefault": row.try_get::<i64, _>("is_system")? != 0,
        "user": users_of(state, &id).await?,
    }))
}

const ACCOUNT_SELECT: &str = "SELECT id, name, role_type, state, created, is_system FROM accounts";

async fn account_by_id(state: &State, id: &str) -> Result<Option<Value>, sqlx::Error> {
    let mut f = Filter::default();
    f.eq("id", id);
    match f.rows(&state.db.pool, ACCOUNT_SELECT, "").await?.first() {
        Some(row) => Ok(Some(account_json(state, row).await?)),
        None => Ok(None),
    }
}

/// `createAccount`.
pub async fn create_account(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let username = p.non_empty("username").unwrap_or_default();
    let account = p.non_empty("account").unwrap_or(username);
    let role = match (p.non_empty("roletype"), p.non_empty("accounttype")) {
        (Some(r), _) => Role::parse(r)
            .ok_or_else(|| ApiError::param(format!("Invalid roletype {r:?}: use Admin, User or ReadOnly")))?,
        (None, Some("1")) => Role::Admin,
        (None, Some("0") | None) => Role::User,
        (None, Some(t)) => return Err(ApiError::param(format!("Invalid accounttype {t:?}: use 0 or 1"))),
    };
    let taken: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM accounts WHERE name = $1) + (SELECT COUNT(*) FROM users WHERE username = $2)",
    )
    .bind(account.to_owned())
    .bind(username.to_owned())
    .fetch_one(&state.db.pool)
    .await?;
    if taken > 0 {
        return Err(ApiError::param(format!(
            "The user {username} or account {account} already exists"
        )));
    }
    let new = NewAccount {
        account,
        username,
        password: p.non_empty("password").unwrap_or_default(),
        email: p.non_empty("email").unwrap_or_default(),
        firstname: p.non_empty("firstname").unwrap_or_default(),
        lastname: p.non_empty("lastname").unwrap_or_default(),
        role,
        is_system: false,
    };
    let (account_id, _) = insert_account(&state, &new).await.map_err(|e| match e {
        // A concurrent create of the same name loses on the unique index.
        CreateAccountError::Db(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            ApiError::param(format!("The user {username} or account {account} already exists"))
        }
        other => ApiError::internal(&other),
    })?;
    let v = account_by_id(&state, &account_id)
        .await?
        .ok_or_else(|| ApiError::internal(&"account vanished after insert"))?;
    Ok(json!({ "account": v }))
}

/// `listAccounts`.
pub async fn list_accounts(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    if caller.role != Role::Admin {
        f.eq("id", &caller.account_id);
    }
    if let Some(id) = p.non_empty("id") {
        f.eq("id", id);
    }
    if let Some(name) = p.non_empty("name") {
        f.eq("name", name);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["name"], k);
    }
    let total = f.count(&state.db.pool, "accounts").await?;
    let rows = f
        .rows(
            &state.db.pool,
            ACCOUNT_SELECT,
            &format!(" ORDER BY created, id{}", page.sql()),
        )
        .await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(account_json(&state, row).await?);
    }
    Ok(list_response("account", total, items))
}

/// `deleteAccount` (runs as an async job).
pub async fn delete_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let row = sqlx::query("SELECT is_system FROM accounts WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    let Some(row) = row else {
        return Err(ApiError::param(format!("Unable to find account by id {id}")));
    };
    if row.try_get::<i64, _>("is_system")? != 0 {
        return Err(ApiError::denied("The root admin account cannot be deleted"));
    }
    if id == caller.account_id {
        return Err(ApiError::denied("An account cannot delete itself"));
    }
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM users WHERE account_id = $1")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM accounts WHERE id = $1")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Its users' login sessions end with them.
    crate::model::sessions::sweep(&state.db.pool).await?;
    Ok(success())
}

/// `listUsers`.
pub async fn list_users(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    if caller.role != Role::Admin {
        f.eq("u.account_id", &caller.account_id);
    }
    if let Some(id) = p.non_empty("id") {
        f.eq("u.id", id);
    }
    if let Some(name) = p.non_empty("username") {
        f.eq("u.username", name);
    }
    if let Some(a) = p.non_empty("accountid") {
        f.eq("u.account_id", a);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["u.username"], k);
    }
    let total = f
        .count(&state.db.pool, "users u JOIN accounts a ON a.id = u.account_id")
        .await?;
    let rows = f
        .rows(
            &state.db.pool,
            USER_SELECT,
            &format!(" ORDER BY u.created, u.id{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(user_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("user", total, items))
}

/// `registerUserKeys`: a non-admin may only renew its own keys.
pub async fn register_user_keys(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    if caller.role != Role::Admin && id != caller.user_id {
        return Err(ApiError::denied(format!(
            "Account {} is not allowed to register keys for user {id}",
            caller.account_name
        )));
    }
    let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = $1")
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if exists == 0 {
        return Err(ApiError::param(format!("Unable to find user by id {id}")));
    }
    let (apikey, secretkey) = new_keys(&state, id).await?;
    Ok(json!({ "userkeys": { "apikey": apikey, "secretkey": secretkey } }))
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
}
