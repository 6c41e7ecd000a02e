//! Domains: the tree under ROOT.
//!
//! Invariants: sibling names are unique ignoring ASCII case (so a path prefix selects one
//! subtree on SQLite, whose `LIKE` ignores case, and on PostgreSQL alike); a rename rewrites the
//! paths of the whole subtree in one transaction; a domain is deleted only without accounts and
//! subdomains, unless `cleanup` removes them (its accounts, their users, then the domains,
//! deepest first).

use sqlx::Row as _;

use super::{ROOT_DOMAIN_ID, Scope, check_name};
use crate::model::{DomainError, DomainResult, escape_like};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// A domain as stored.
#[derive(Debug, Clone)]
pub struct Domain {
    /// Id.
    pub id: String,
    /// Name (`ROOT` for the root).
    pub name: String,
    /// Parent id (`None` for ROOT).
    pub parent_id: Option<String>,
    /// `/` for ROOT, else the parent's path plus `name/`.
    pub path: String,
    /// Depth (ROOT is 0).
    pub level: i64,
    /// Network domain.
    pub network_domain: Option<String>,
    /// `Active`.
    pub state: String,
    /// Created, CloudStack's date format.
    pub created: String,
}

impl Domain {
    /// CloudStack's `path` field: `ROOT` then the path without its trailing `/`.
    pub fn display_path(&self) -> String {
        display_path(&self.path)
    }
}

/// CloudStack's `path` of a stored domain path (`/A/` → `ROOT/A`, `/` → `ROOT`).
pub fn display_path(path: &str) -> String {
    format!("ROOT{}", path.trim_end_matches('/'))
}

/// Columns of [`Domain`] for a query over `domains d`.
pub const COLUMNS: &str = "d.id, d.name, d.parent_id, d.path, d.level, d.network_domain, d.state, d.created";

/// Reads a [`Domain`] from a row selected with [`COLUMNS`].
pub fn from_row(row: &sqlx::any::AnyRow) -> Result<Domain, sqlx::Error> {
    Ok(Domain {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        parent_id: row.try_get("parent_id")?,
        path: row.try_get("path")?,
        level: row.try_get("level")?,
        network_domain: row.try_get("network_domain")?,
        state: row.try_get("state")?,
        created: row.try_get("created")?,
    })
}

/// The domain `id`, if it exists.
pub async fn get(state: &State, id: &str) -> Result<Option<Domain>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM domains d WHERE d.id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The domain `id` if it exists and `caller` may act on it.
pub async fn get_in_scope(state: &State, caller: &Caller, id: &str) -> DomainResult<Domain> {
    let d = get(state, id).await?;
    match d {
        Some(d) if Scope::of(caller).covers_domain(&d.path) || d.id == caller.domain_id => Ok(d),
        _ => Err(DomainError::NotFound(format!("Unable to find domain by id {id}"))),
    }
}

/// The domain with CloudStack path `ROOT/A/B` (or `/A/B/`, or a bare name under ROOT).
pub async fn by_path(state: &State, path: &str) -> Result<Option<Domain>, sqlx::Error> {
    let trimmed = path.trim().trim_matches('/');
    let rest = if trimmed.eq_ignore_ascii_case("ROOT") {
        ""
    } else {
        trimmed
            .strip_prefix("ROOT/")
            .or_else(|| trimmed.strip_prefix("root/"))
            .unwrap_or(trimmed)
    };
    let stored = if rest.is_empty() {
        "/".to_owned()
    } else {
        format!("/{rest}/")
    };
    let sql = format!("SELECT {COLUMNS} FROM domains d WHERE LOWER(d.path) = LOWER($1)");
    let row = sqlx::query(&sql)
        .bind(stored)
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// Whether `parent` has a child named `name` (ignoring ASCII case), other than `except`.
async fn sibling_exists(
    state: &State,
    parent: &str,
    name: &str,
    except: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM domains WHERE parent_id = $1 AND LOWER(name) = LOWER($2) AND id <> $3",
    )
    .bind(parent.to_owned())
    .bind(name.to_owned())
    .bind(except.unwrap_or("").to_owned())
    .fetch_one(&state.db.pool)
    .await?;
    Ok(n > 0)
}

/// Creates a domain under `parent_id` (default: the caller's own domain).
pub async fn create(
    state: &State,
    caller: &Caller,
    name: &str,
    parent_id: Option<&str>,
    network_domain: Option<&str>,
    id: Option<&str>,
) -> DomainResult<Domain> {
    check_name("Domain name", name)?;
    let parent_id = parent_id.unwrap_or(&caller.domain_id);
    let parent = get_in_scope(state, caller, parent_id).await?;
    if sibling_exists(state, &parent.id, name, None).await? {
        return Err(DomainError::Invalid(format!(
            "Domain with name {name} already exists for the parent id={}",
            parent.id
        )));
    }
    let id = match id {
        Some(i) => i.to_owned(),
        None => new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?,
    };
    let path = format!("{}{name}/", parent.path);
    let inserted = sqlx::query(
        "INSERT INTO domains (id, name, parent_id, path, level, network_domain, state, created) VALUES ($1, $2, $3, $4, $5, $6, 'Active', $7)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(parent.id.clone())
    .bind(path)
    .bind(parent.level + 1)
    .bind(network_domain.map(str::to_owned))
    .bind(now_cs())
    .execute(&state.db.pool)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(DomainError::Invalid(format!(
                "Domain with name {name} or id {id} already exists"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%id, name, parent = %parent.id, "Created a domain");
    get(state, &id)
        .await?
        .ok_or_else(|| DomainError::Internal("domain vanished after insert".into()))
}

/// Renames a domain (its subtree's paths follow) and/or sets its network domain.
pub async fn update(
    state: &State,
    caller: &Caller,
    id: &str,
    name: Option<&str>,
    network_domain: Option<&str>,
) -> DomainResult<Domain> {
    let d = get_in_scope(state, caller, id).await?;
    let mut tx = state.db.pool.begin().await?;
    if let Some(name) = name.filter(|n| *n != d.name) {
        if d.id == ROOT_DOMAIN_ID {
            return Err(DomainError::Invalid("The ROOT domain cannot be renamed".into()));
        }
        if d.id == caller.domain_id && !caller.role.is_admin() {
            return Err(DomainError::Denied(
                "A domain admin cannot rename its own domain".into(),
            ));
        }
        check_name("Domain name", name)?;
        let parent = d.parent_id.clone().unwrap_or_default();
        if sibling_exists(state, &parent, name, Some(&d.id)).await? {
            return Err(DomainError::Invalid(format!(
                "Domain with name {name} already exists for the parent id={parent}"
            )));
        }
        let parent_path = d.path[..d.path.len() - d.name.len() - 1].to_owned();
        let new_path = format!("{parent_path}{name}/");
        // Every path in the subtree starts with the old path: replace that prefix.
        let rows = sqlx::query("SELECT id, path FROM domains WHERE path LIKE $1 ESCAPE '\\'")
            .bind(format!("{}%", escape_like(&d.path)))
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            let (sub_id, sub_path): (String, String) = (row.try_get("id")?, row.try_get("path")?);
            let Some(rest) = sub_path.strip_prefix(d.path.as_str()) else {
                continue;
            };
            sqlx::query("UPDATE domains SET path = $1 WHERE id = $2")
                .bind(format!("{new_path}{rest}"))
                .bind(sub_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE domains SET name = $1 WHERE id = $2")
            .bind(name.to_owned())
            .bind(d.id.clone())
            .execute(&mut *tx)
            .await?;
    }
    if let Some(nd) = network_domain {
        sqlx::query("UPDATE domains SET network_domain = $1 WHERE id = $2")
            .bind(Some(nd.to_owned()).filter(|s| !s.is_empty()))
            .bind(d.id.clone())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    get(state, &d.id)
        .await?
        .ok_or_else(|| DomainError::Internal("domain vanished during update".into()))
}

/// Deletes a domain; with `cleanup`, its subdomains, accounts and users too.
pub async fn delete(state: &State, caller: &Caller, id: &str, cleanup: bool) -> DomainResult<()> {
    let d = get_in_scope(state, caller, id).await?;
    if d.id == ROOT_DOMAIN_ID {
        return Err(DomainError::Denied("Can't delete ROOT domain".into()));
    }
    if d.id == caller.domain_id {
        return Err(DomainError::Denied(
            "A caller cannot delete its own domain".into(),
        ));
    }
    let subtree = format!("{}%", escape_like(&d.path));
    let accounts: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM accounts a JOIN domains d ON d.id = a.domain_id WHERE d.path LIKE $1 ESCAPE '\\'",
    )
    .bind(subtree.clone())
    .fetch_one(&state.db.pool)
    .await?;
    let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM domains WHERE parent_id = $1")
        .bind(d.id.clone())
        .fetch_one(&state.db.pool)
        .await?;
    if !cleanup && (accounts > 0 || children > 0) {
        return Err(DomainError::InUse(format!(
            "Delete failed on domain {} (id: {}); Please make sure all users and sub domains have been removed from the domain before deleting ({accounts} account(s), {children} subdomain(s); cleanup=true removes them)",
            d.name, d.id
        )));
    }
    let system: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM accounts a JOIN domains d ON d.id = a.domain_id WHERE d.path LIKE $1 ESCAPE '\\' AND a.is_system = 1",
    )
    .bind(subtree.clone())
    .fetch_one(&state.db.pool)
    .await?;
    if system > 0 {
        return Err(DomainError::Denied(
            "The domain holds the root admin account, which cannot be deleted".into(),
        ));
    }
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "DELETE FROM users WHERE account_id IN (SELECT a.id FROM accounts a JOIN domains d ON d.id = a.domain_id WHERE d.path LIKE $1 ESCAPE '\\')",
    )
    .bind(subtree.clone())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM accounts WHERE domain_id IN (SELECT id FROM domains WHERE path LIKE $1 ESCAPE '\\')",
    )
    .bind(subtree.clone())
    .execute(&mut *tx)
    .await?;
    // Deepest first, so no row is removed before its children.
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM domains WHERE path LIKE $1 ESCAPE '\\' ORDER BY level DESC")
            .bind(subtree)
            .fetch_all(&mut *tx)
            .await?;
    for sub in ids {
        sqlx::query("DELETE FROM domains WHERE id = $1")
            .bind(sub)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    crate::model::sessions::sweep(&state.db.pool).await?;
    tracing::info!(%id, path = %d.path, cleanup, "Deleted a domain");
    Ok(())
}
