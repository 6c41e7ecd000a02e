//! Users: `createUser`, `listUsers`, `getUser`, `updateUser`, `deleteUser`, `disableUser`
//! (async), `enableUser`, `lockUser`, `registerUserKeys`, `getUserKeys`.
//!
//! Invariants: a caller sees and acts on the users of its scope only (others are "not found");
//! a user of the User role type may read and change itself only (its own keys, its own
//! password with the current one); secret keys are answered only by `registerUserKeys` and
//! `getUserKeys`, never by a list.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{Access, Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::handler;
use crate::model::directory::Scope;
use crate::model::directory::accounts::{self, AccountState};
use crate::model::directory::domains::display_path;
use crate::model::directory::users::{self, NewUser, UserRef, UserUpdate};
use crate::paging::Page;
use crate::params::Params;
use crate::roles::Role;
use crate::state::{Caller, State};

const CREATE_USER: &[ParamSpec] = &[
    req("username", Ty::String, "Unique username"),
    req("password", Ty::String, "Clear text password"),
    req("email", Ty::String, "Email"),
    req("firstname", Ty::String, "First name"),
    req("lastname", Ty::String, "Last name"),
    req("account", Ty::String, "The account the user belongs to"),
    opt("domainid", Ty::Uuid, "Domain of the account"),
    opt("timezone", Ty::String, "Time zone"),
    opt("userid", Ty::Uuid, "Id of the new user (default: chosen by core)"),
];
const LIST_USERS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "User id"),
    opt("username", Ty::String, "User name"),
    opt("account", Ty::String, "Users of this account"),
    opt("accountid", Ty::Uuid, "Users of this account"),
    opt("accounttype", Ty::Integer, "Users of accounts of this type"),
    opt("domainid", Ty::Uuid, "Users of accounts in this domain"),
    opt("state", Ty::String, "enabled, disabled or locked"),
    opt("keyword", Ty::String, "Substring of the user name"),
    opt("listall", Ty::Boolean, "Every user the caller may see"),
    opt("isrecursive", Ty::Boolean, "Accepted for compatibility"),
    opt("showicon", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const GET_USER: &[ParamSpec] = &[req("userapikey", Ty::String, "API key of the user")];
const UPDATE_USER: &[ParamSpec] = &[
    req("id", Ty::Uuid, "User id"),
    opt("username", Ty::String, "New user name"),
    opt("password", Ty::String, "New password"),
    opt(
        "currentpassword",
        Ty::String,
        "The current password: required when users change their own password",
    ),
    opt("email", Ty::String, "Email"),
    opt("firstname", Ty::String, "First name"),
    opt("lastname", Ty::String, "Last name"),
    opt("timezone", Ty::String, "Time zone"),
    opt(
        "mandate2fa",
        Ty::Boolean,
        "Accepted for compatibility (no two-factor login yet)",
    ),
];
const BY_ID: &[ParamSpec] = &[req("id", Ty::Uuid, "User id")];

/// The user commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "createUser",
        "Creates a user in an existing account",
        Access::ADMINS,
        CREATE_USER,
        handler!(create_user),
    )
    .returns(crate::api::fields::USER),
    Command::new(
        "listUsers",
        "Lists the users the caller may see",
        Access::ALL,
        LIST_USERS,
        handler!(list_users),
    )
    .returns(crate::api::fields::USER),
    Command::new(
        "getUser",
        "Finds a user by its API key",
        Access::ADMIN,
        GET_USER,
        handler!(get_user),
    )
    .returns(crate::api::fields::USER),
    Command::new(
        "updateUser",
        "Updates a user: names, email, time zone, password",
        Access::ALL,
        UPDATE_USER,
        handler!(update_user),
    )
    .returns(crate::api::fields::USER),
    Command::new(
        "deleteUser",
        "Deletes a user",
        Access::ADMINS,
        BY_ID,
        handler!(delete_user),
    )
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "disableUser",
        "Disables a user",
        Access::ADMINS,
        BY_ID,
        handler!(disable_user),
    )
    .asynchronous()
    .returns(crate::api::fields::USER),
    Command::new(
        "enableUser",
        "Enables a disabled or locked user",
        Access::ADMINS,
        BY_ID,
        handler!(enable_user),
    )
    .returns(crate::api::fields::USER),
    Command::new(
        "lockUser",
        "Locks a user",
        Access::ADMINS,
        BY_ID,
        handler!(lock_user),
    )
    .returns(crate::api::fields::USER),
    Command::new(
        "registerUserKeys",
        "Generates a new API key and secret key for a user",
        Access::ALL,
        BY_ID,
        handler!(register_user_keys),
    )
    .returns(crate::api::fields::USER_KEYS),
    Command::new(
        "getUserKeys",
        "The API key and secret key of a user",
        Access::ALL,
        BY_ID,
        handler!(get_user_keys),
    )
    .returns(crate::api::fields::USER_KEYS),
];

/// The columns [`user_json`] reads.
pub const USER_SELECT: &str = "SELECT u.id, u.username, u.firstname, u.lastname, u.email, u.created, u.state, u.api_key, u.timezone, u.is_default, a.name AS account_name, a.id AS account_id, a.role_id, a.domain_id, d.name AS domain_name, d.path AS domain_path FROM users u JOIN accounts a ON a.id = u.account_id JOIN domains d ON d.id = a.domain_id";
/// The tables of [`USER_SELECT`], for counts.
pub const USER_FROM: &str =
    "users u JOIN accounts a ON a.id = u.account_id JOIN domains d ON d.id = a.domain_id";

/// A user as CloudStack's `UserResponse` (no secret key).
pub fn user_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let role = Role::by_id(&row.try_get::<String, _>("role_id")?).unwrap_or(Role::ReadOnlyUser);
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
        "roleid": role.id(),
        "roletype": role.role_type().as_str(),
        "rolename": role.name(),
        "domain": row.try_get::<String, _>("domain_name")?,
        "domainid": row.try_get::<String, _>("domain_id")?,
        "domainpath": display_path(&row.try_get::<String, _>("domain_path")?),
        "timezone": row.try_get::<Option<String>, _>("timezone")?,
        "iscallerchilddomain": false,
        "isdefault": row.try_get::<i64, _>("is_default")? != 0,
        "usersource": "native",
        "is2faenabled": false,
    });
    if let Some(k) = api_key {
        v["apikey"] = json!(k);
    }
    Ok(v)
}

async fn user_by_id(state: &State, id: &str) -> Result<Value, ApiError> {
    let mut f = Filter::default();
    f.eq("u.id", id);
    let rows = f.rows(&state.db.pool, USER_SELECT, "").await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::param(format!("Unable to find user by id {id}")))?;
    Ok(user_json(row)?)
}

/// A user of the User role type acts on itself only; admins on their scope.
async fn user_for(state: &State, caller: &Caller, id: &str) -> Result<UserRef, ApiError> {
    if !caller.role.sees_other_accounts() && id != caller.user_id {
        return Err(ApiError::param(format!("Unable to find user by id {id}")));
    }
    Ok(users::get_in_scope(state, caller, id).await?)
}

/// `createUser`.
async fn create_user(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let account = p.non_empty("account").unwrap_or_default();
    let a = accounts::by_name_in_scope(&state, &caller, account, p.non_empty("domainid")).await?;
    let id = users::create(
        &state,
        &a,
        &NewUser {
            username: p.non_empty("username").unwrap_or_default(),
            password: p.non_empty("password").unwrap_or_default(),
            email: p.non_empty("email").unwrap_or_default(),
            firstname: p.non_empty("firstname").unwrap_or_default(),
            lastname: p.non_empty("lastname").unwrap_or_default(),
            timezone: p.non_empty("timezone"),
            id: p.non_empty("userid"),
        },
    )
    .await?;
    Ok(json!({ "user": user_by_id(&state, &id).await? }))
}

/// `listUsers`.
async fn list_users(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "a.id", "d.path");
    if let Some(id) = p.non_empty("id") {
        f.eq("u.id", id);
    }
    if let Some(name) = p.non_empty("username") {
        f.eq("u.username", name);
    }
    if let Some(a) = p.non_empty("accountid") {
        f.eq("u.account_id", a);
    }
    if let Some(a) = p.non_empty("account") {
        f.eq("a.name", a);
    }
    if let Some(d) = p.non_empty("domainid") {
        f.eq("a.domain_id", d);
    }
    if let Some(t) = p.non_empty("accounttype") {
        f.any_of("a.role_id", &Role::ids_with_account_type(t));
    }
    if let Some(s) = p.non_empty("state") {
        f.eq("LOWER(u.state)", &s.to_ascii_lowercase());
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["u.username", "u.firstname", "u.lastname", "u.email"], k);
    }
    let total = f.count(&state.db.pool, USER_FROM).await?;
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

/// `getUser` (root admins): the user owning an API key.
async fn get_user(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let key = p.non_empty("userapikey").unwrap_or_default();
    let mut f = Filter::default();
    f.eq("u.api_key", key);
    let rows = f.rows(&state.db.pool, USER_SELECT, "").await?;
    match rows.first() {
        Some(row) => Ok(json!({ "user": user_json(row)? })),
        None => Err(ApiError::param("Unable to find user by the given API key")),
    }
}

/// `updateUser`.
async fn update_user(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let u = user_for(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    let up = UserUpdate {
        username: p.non_empty("username"),
        password: p.get("password"),
        current_password: p.get("currentpassword"),
        email: p.get("email"),
        firstname: p.get("firstname"),
        lastname: p.get("lastname"),
        timezone: p.get("timezone"),
    };
    users::update(&state, &caller, &u, &up).await?;
    Ok(json!({ "user": user_by_id(&state, &u.id).await? }))
}

/// `deleteUser`.
async fn delete_user(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let u = user_for(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    users::delete(&state, &caller, &u).await?;
    Ok(success())
}

async fn set_state(state: State, caller: Caller, p: Params, to: AccountState) -> Result<Value, ApiError> {
    let u = user_for(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    users::set_state(&state, &caller, &u, to).await?;
    Ok(json!({ "user": user_by_id(&state, &u.id).await? }))
}

/// `disableUser` (async).
async fn disable_user(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    set_state(state, caller, p, AccountState::Disabled).await
}

/// `enableUser`.
async fn enable_user(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    set_state(state, caller, p, AccountState::Enabled).await
}

/// `lockUser`.
async fn lock_user(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    set_state(state, caller, p, AccountState::Locked).await
}

/// `registerUserKeys`: a new key pair for a user of the caller's scope (users: themselves).
async fn register_user_keys(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let u = user_for(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    let (apikey, secretkey) = users::new_keys(&state, &u.id).await?;
    Ok(json!({ "userkeys": { "apikey": apikey, "secretkey": secretkey } }))
}

/// `getUserKeys`: the current key pair of a user of the caller's scope (users: themselves).
async fn get_user_keys(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let u = user_for(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    let row = sqlx::query("SELECT api_key, secret_key FROM users WHERE id = $1")
        .bind(u.id.clone())
        .fetch_one(&state.db.pool)
        .await?;
    let apikey: Option<String> = row.try_get("api_key")?;
    let secretkey: Option<String> = row.try_get("secret_key")?;
    Ok(json!({ "userkeys": { "apikey": apikey, "secretkey": secretkey } }))
}
