//! Accounts: `createAccount`, `listAccounts`, `updateAccount`, `deleteAccount` (async),
//! `disableAccount` (async), `enableAccount`, `lockAccount`.
//!
//! Invariants: an account is addressed by `id`, or by `account` with `domainid` (CloudStack's
//! two ways); a caller lists and acts on the accounts of its scope only (`model::directory::Scope`),
//! and one outside it is "not found", never "denied", so ids of other domains are not confirmed.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::users::{USER_SELECT, user_json};
use crate::api::{Filter, list_response, success};
use crate::command::{Access, Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::handler;
use crate::model::directory::Scope;
use crate::model::directory::accounts::{self, AccountRef, AccountState, NewAccount};
use crate::model::directory::domains::{self, display_path};
use crate::paging::Page;
use crate::params::Params;
use crate::roles::{Role, RoleType};
use crate::state::{Caller, State};

const CREATE_ACCOUNT: &[ParamSpec] = &[
    req("username", Ty::String, "Unique username"),
    req("password", Ty::String, "Clear text password"),
    req("email", Ty::String, "Email"),
    req("firstname", Ty::String, "First name"),
    req("lastname", Ty::String, "Last name"),
    opt("account", Ty::String, "Account name (default: the username)"),
    opt(
        "accounttype",
        Ty::Short,
        "0 user, 1 root admin, 2 domain admin, 3 resource admin (when roleid is not given)",
    ),
    opt("roleid", Ty::Uuid, "Creates the account under this role"),
    opt(
        "roletype",
        Ty::String,
        "Role type: Admin, ResourceAdmin, DomainAdmin or User",
    ),
    opt(
        "domainid",
        Ty::Uuid,
        "Creates the account in this domain (default: the caller's)",
    ),
    opt("networkdomain", Ty::String, "Network domain of the account"),
    opt("timezone", Ty::String, "Time zone of the user"),
    opt(
        "accountid",
        Ty::String,
        "Accepted for compatibility (ids are chosen by core)",
    ),
    opt(
        "userid",
        Ty::String,
        "Accepted for compatibility (ids are chosen by core)",
    ),
];
const LIST_ACCOUNTS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Account id"),
    opt("name", Ty::String, "Account name"),
    opt("accounttype", Ty::Integer, "Accounts of this type"),
    opt("roleid", Ty::Uuid, "Accounts with this role"),
    opt(
        "domainid",
        Ty::Uuid,
        "Accounts of this domain (and below with isrecursive)",
    ),
    opt(
        "isrecursive",
        Ty::Boolean,
        "With domainid: also the domains below",
    ),
    opt("state", Ty::String, "enabled, disabled or locked"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Every account the caller may see"),
    opt("details", Ty::String, "Accepted for compatibility"),
    opt("showicon", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const BY_ID_OR_NAME: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Account id"),
    opt("account", Ty::String, "Account name (with domainid)"),
    opt("domainid", Ty::Uuid, "Domain of the named account"),
];
const DISABLE_ACCOUNT: &[ParamSpec] = &[
    req(
        "lock",
        Ty::Boolean,
        "true: lock (users may not log in), false: disable",
    ),
    opt("id", Ty::Uuid, "Account id"),
    opt("account", Ty::String, "Account name (with domainid)"),
    opt("domainid", Ty::Uuid, "Domain of the named account"),
];
const LOCK_ACCOUNT: &[ParamSpec] = &[
    req("account", Ty::String, "Account name"),
    req("domainid", Ty::Uuid, "Domain of the account"),
];
const UPDATE_ACCOUNT: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Account id"),
    opt("account", Ty::String, "Account name (with domainid)"),
    opt("domainid", Ty::Uuid, "Domain of the named account"),
    opt("newname", Ty::String, "New account name"),
    opt("networkdomain", Ty::String, "Network domain"),
    opt("roleid", Ty::Uuid, "Another role of the same role type"),
    opt("accountdetails", Ty::String, "Accepted for compatibility"),
];
const DELETE_ACCOUNT: &[ParamSpec] = &[req("id", Ty::Uuid, "Account id")];

/// The account commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "createAccount",
        "Creates an account with its first user",
        Access::ADMINS,
        CREATE_ACCOUNT,
        handler!(create_account),
    )
    .returns(crate::api::fields::ACCOUNT),
    Command::new(
        "listAccounts",
        "Lists the accounts the caller may see",
        Access::ALL,
        LIST_ACCOUNTS,
        handler!(list_accounts),
    )
    .returns(crate::api::fields::ACCOUNT),
    Command::new(
        "updateAccount",
        "Renames an account, sets its network domain or role",
        Access::ADMINS,
        UPDATE_ACCOUNT,
        handler!(update_account),
    )
    .returns(crate::api::fields::ACCOUNT),
    Command::new(
        "deleteAccount",
        "Deletes an account and its users",
        Access::ADMINS,
        DELETE_ACCOUNT,
        handler!(delete_account),
    )
    .asynchronous()
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "disableAccount",
        "Disables or locks an account",
        Access::ADMINS,
        DISABLE_ACCOUNT,
        handler!(disable_account),
    )
    .asynchronous()
    .returns(crate::api::fields::ACCOUNT),
    Command::new(
        "enableAccount",
        "Enables a disabled or locked account",
        Access::ADMINS,
        BY_ID_OR_NAME,
        handler!(enable_account),
    )
    .returns(crate::api::fields::ACCOUNT),
    Command::new(
        "lockAccount",
        "Locks an account: its users may not log in",
        Access::ADMINS,
        LOCK_ACCOUNT,
        handler!(lock_account),
    )
    .returns(crate::api::fields::ACCOUNT),
];

/// The columns [`account_json`] reads, over `accounts a JOIN domains d`.
const ACCOUNT_SELECT: &str = "SELECT a.id, a.name, a.role_id, a.state, a.created, a.is_system, a.network_domain, a.domain_id, d.name AS domain_name, d.path AS domain_path FROM accounts a JOIN domains d ON d.id = a.domain_id";
const ACCOUNT_FROM: &str = "accounts a JOIN domains d ON d.id = a.domain_id";

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
    let role = Role::by_id(&row.try_get::<String, _>("role_id")?).unwrap_or(Role::ReadOnlyUser);
    let unlimited = "Unlimited";
    let (used, limit) = crate::model::transfers::account_storage(state, &id).await?;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let (storage_limit, storage_available) = match limit {
        Some(l) => (
            format!("{}", l >> 30),
            format!("{:.2}", gib(l.saturating_sub(used))),
        ),
        None => (unlimited.to_owned(), unlimited.to_owned()),
    };
    Ok(json!({
        "id": id,
        "name": row.try_get::<String, _>("name")?,
        "accounttype": role.account_type(),
        "roleid": role.id(),
        "roletype": role.role_type().as_str(),
        "rolename": role.name(),
        "state": row.try_get::<String, _>("state")?,
        "created": row.try_get::<String, _>("created")?,
        "domainid": row.try_get::<String, _>("domain_id")?,
        "domain": row.try_get::<String, _>("domain_name")?,
        "domainpath": display_path(&row.try_get::<String, _>("domain_path")?),
        "networkdomain": row.try_get::<Option<String>, _>("network_domain")?,
        "isdefault": row.try_get::<i64, _>("is_system")? != 0,
        "iscleanuprequired": false,
        "vmlimit": unlimited, "vmtotal": 0, "vmavailable": unlimited,
        "templatelimit": unlimited, "templateavailable": unlimited,
        "secondarystoragelimit": storage_limit, "secondarystorageavailable": storage_available,
        "secondarystoragetotal": (gib(used) * 100.0).round() / 100.0,
        "user": users_of(state, &id).await?,
    }))
}

async fn account_by_id(state: &State, id: &str) -> Result<Value, ApiError> {
    let mut f = Filter::default();
    f.eq("a.id", id);
    let rows = f.rows(&state.db.pool, ACCOUNT_SELECT, "").await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::param(format!("Unable to find account by id {id}")))?;
    Ok(account_json(state, row).await?)
}

/// The account a command names by `id`, or by `account` (+ `domainid`).
async fn named_account(state: &State, caller: &Caller, p: &Params) -> Result<AccountRef, ApiError> {
    if let Some(id) = p.non_empty("id") {
        return Ok(accounts::get_in_scope(state, caller, id).await?);
    }
    match p.non_empty("account") {
        Some(name) => Ok(accounts::by_name_in_scope(state, caller, name, p.non_empty("domainid")).await?),
        None => Err(ApiError::param(
            "Either id or account (with domainid) must be given",
        )),
    }
}

/// The role `createAccount` asks for: `roleid`, else `roletype`, else `accounttype` (default 0).
fn requested_role(p: &Params) -> Result<Role, ApiError> {
    if let Some(id) = p.non_empty("roleid") {
        return Role::by_id(id).ok_or_else(|| ApiError::param(format!("Unable to find role by id {id}")));
    }
    if let Some(t) = p.non_empty("roletype") {
        // `ReadOnly` was this API's name for the read-only user role before roles existed.
        if t.eq_ignore_ascii_case("readonly") {
            return Ok(Role::ReadOnlyUser);
        }
        let t = RoleType::parse(t).ok_or_else(|| {
            ApiError::param(format!(
                "Invalid roletype {t:?}: use Admin, ResourceAdmin, DomainAdmin or User"
            ))
        })?;
        return Ok(Role::default_of(t));
    }
    let t = p.non_empty("accounttype").unwrap_or("0");
    t.parse::<i64>()
        .ok()
        .and_then(RoleType::from_account_type)
        .map(Role::default_of)
        .ok_or_else(|| ApiError::param(format!("Invalid accounttype {t:?}: use 0, 1, 2 or 3")))
}

/// `createAccount`.
async fn create_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let username = p.non_empty("username").unwrap_or_default();
    let new = NewAccount {
        account: p.non_empty("account").unwrap_or(username),
        domain_id: p.non_empty("domainid"),
        username,
        password: p.non_empty("password").unwrap_or_default(),
        email: p.non_empty("email").unwrap_or_default(),
        firstname: p.non_empty("firstname").unwrap_or_default(),
        lastname: p.non_empty("lastname").unwrap_or_default(),
        timezone: p.non_empty("timezone"),
        network_domain: p.non_empty("networkdomain"),
        role: requested_role(&p)?,
        is_system: false,
    };
    let (account_id, _) = accounts::create(&state, Some(&caller), &new).await?;
    Ok(json!({ "account": account_by_id(&state, &account_id).await? }))
}

/// `listAccounts`.
async fn list_accounts(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "a.id", "d.path");
    if let Some(id) = p.non_empty("id") {
        f.eq("a.id", id);
    }
    if let Some(name) = p.non_empty("name") {
        f.eq("a.name", name);
    }
    if let Some(d) = p.non_empty("domainid") {
        let dom = domains::get_in_scope(&state, &caller, d).await?;
        if p.non_empty("isrecursive") == Some("true") {
            f.prefix("d.path", &dom.path);
        } else {
            f.eq("a.domain_id", d);
        }
    }
    if let Some(r) = p.non_empty("roleid") {
        f.eq("a.role_id", r);
    }
    if let Some(t) = p.non_empty("accounttype") {
        f.any_of("a.role_id", &Role::ids_with_account_type(t));
    }
    if let Some(s) = p.non_empty("state") {
        f.eq("LOWER(a.state)", &s.to_ascii_lowercase());
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["a.name"], k);
    }
    let total = f.count(&state.db.pool, ACCOUNT_FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            ACCOUNT_SELECT,
            &format!(" ORDER BY a.created, a.id{}", page.sql()),
        )
        .await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(account_json(&state, row).await?);
    }
    Ok(list_response("account", total, items))
}

/// `updateAccount`.
async fn update_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let a = named_account(&state, &caller, &p).await?;
    let role = match p.non_empty("roleid") {
        Some(id) => {
            Some(Role::by_id(id).ok_or_else(|| ApiError::param(format!("Unable to find role by id {id}")))?)
        }
        None => None,
    };
    accounts::update(
        &state,
        &caller,
        &a,
        p.non_empty("newname"),
        p.get("networkdomain"),
        role,
    )
    .await?;
    Ok(json!({ "account": account_by_id(&state, &a.id).await? }))
}

/// `deleteAccount` (async).
async fn delete_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let a = accounts::get_in_scope(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    accounts::delete(&state, &caller, &a).await?;
    Ok(success())
}

async fn set_state(
    state: &State,
    caller: &Caller,
    a: &AccountRef,
    to: AccountState,
) -> Result<Value, ApiError> {
    accounts::set_state(state, caller, a, to).await?;
    Ok(json!({ "account": account_by_id(state, &a.id).await? }))
}

/// `disableAccount` (async): `lock=true` locks, `lock=false` disables.
async fn disable_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let a = named_account(&state, &caller, &p).await?;
    let to = if p.non_empty("lock") == Some("true") {
        AccountState::Locked
    } else {
        AccountState::Disabled
    };
    set_state(&state, &caller, &a, to).await
}

/// `enableAccount`.
async fn enable_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let a = named_account(&state, &caller, &p).await?;
    set_state(&state, &caller, &a, AccountState::Enabled).await
}

/// `lockAccount`.
async fn lock_account(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let a = named_account(&state, &caller, &p).await?;
    set_state(&state, &caller, &a, AccountState::Locked).await
}
