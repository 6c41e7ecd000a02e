//! Resource tags: key/value pairs on templates, ISOs, VMs (console targets) and zones.
//!
//! Invariants: a resource has at most one value per key (a second `createTags` of a key is
//! refused, as CloudStack's unique index does); tags are set only by who may change the
//! resource (`directory::may_manage`; zones: Admin role types); resource types are CloudStack's
//! names, matched ignoring case and answered as CloudStack spells them; a delete that matches
//! nothing is refused with CloudStack's message; a resource's tags go with it.

use sqlx::Row as _;

use crate::model::{DomainError, DomainResult};
use crate::state::{Caller, State};
use crate::util::now_cs;

/// A resource type that takes tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagType {
    /// A template.
    Template,
    /// An ISO.
    Iso,
    /// A VM (a console target).
    UserVm,
    /// A zone.
    Zone,
}

impl TagType {
    /// CloudStack's name (`ResourceObjectType`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Template => "Template",
            Self::Iso => "ISO",
            Self::UserVm => "UserVm",
            Self::Zone => "Zone",
        }
    }

    /// Parses a resource type, ignoring case.
    pub fn parse(s: &str) -> DomainResult<Self> {
        [Self::Template, Self::Iso, Self::UserVm, Self::Zone]
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                DomainError::Invalid(format!(
                    "Resource type {s} is not taggable here: use Template, ISO, UserVm or Zone"
                ))
            })
    }
}

/// The owner of resource `id` of type `t`, checking that `caller` may tag it.
async fn check_owner(state: &State, caller: &Caller, t: TagType, id: &str) -> DomainResult<String> {
    let owner: Option<String> = match t {
        TagType::Template | TagType::Iso => {
            sqlx::query_scalar(
                "SELECT account_id FROM templates WHERE id = $1 AND is_iso = $2 AND removed IS NULL",
            )
            .bind(id.to_owned())
            .bind(i64::from(t == TagType::Iso))
            .fetch_optional(&state.db.pool)
            .await?
        }
        TagType::UserVm => {
            sqlx::query_scalar("SELECT account_id FROM console_targets WHERE id = $1")
                .bind(id.to_owned())
                .fetch_optional(&state.db.pool)
                .await?
        }
        TagType::Zone => {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM zones WHERE id = $1")
                .bind(id.to_owned())
                .fetch_one(&state.db.pool)
                .await?;
            (n > 0).then(|| caller.account_id.clone())
        }
    };
    let owner = owner.ok_or_else(|| {
        DomainError::NotFound(format!(
            "Unable to find resource by id {id} and type {}",
            t.as_str()
        ))
    })?;
    let allowed = match t {
        TagType::Zone => caller.role.is_admin(),
        _ => crate::model::directory::may_manage(state, caller, &owner).await?,
    };
    if !allowed {
        return Err(DomainError::Denied(format!(
            "Account {} may not tag {} {id}",
            caller.account_name,
            t.as_str()
        )));
    }
    Ok(owner)
}

/// Adds `tags` to every resource in `ids`.
pub async fn create(
    state: &State,
    caller: &Caller,
    t: TagType,
    ids: &[&str],
    tags: &[(&str, &str)],
    customer: Option<&str>,
) -> DomainResult<()> {
    if tags.is_empty() {
        return Err(DomainError::Invalid(
            "No tags given: pass tags[0].key and tags[0].value".into(),
        ));
    }
    for (k, v) in tags {
        if v.is_empty() {
            return Err(DomainError::Invalid(format!(
                "Value for the key {k} is either null or empty"
            )));
        }
        if k.len() > 255 || v.len() > 255 {
            return Err(DomainError::Invalid(
                "A tag key or value is longer than 255 characters".into(),
            ));
        }
    }
    let mut owners = Vec::with_capacity(ids.len());
    for id in ids {
        owners.push(check_owner(state, caller, t, id).await?);
    }
    let mut tx = state.db.pool.begin().await?;
    for (id, owner) in ids.iter().zip(owners) {
        for (k, v) in tags {
            let r = sqlx::query(
                "INSERT INTO resource_tags (resource_type, resource_id, tag_key, tag_value, account_id, customer, created) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(t.as_str())
            .bind((*id).to_owned())
            .bind((*k).to_owned())
            .bind((*v).to_owned())
            .bind(owner.clone())
            .bind(customer.map(str::to_owned))
            .bind(now_cs())
            .execute(&mut *tx)
            .await;
            match r {
                Ok(_) => {}
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    return Err(DomainError::Invalid(format!(
                        "A tag with key {k} already exists on {} {id}",
                        t.as_str()
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Deletes from the resources in `ids` the tags matching `tags` (a key with an empty value: that
/// key whatever its value; none given: every tag), comparing ignoring case as CloudStack does.
pub async fn delete(
    state: &State,
    caller: &Caller,
    t: TagType,
    ids: &[&str],
    tags: &[(&str, &str)],
) -> DomainResult<()> {
    for id in ids {
        check_owner(state, caller, t, id).await?;
    }
    let mut removed = 0u64;
    let mut tx = state.db.pool.begin().await?;
    for id in ids {
        let rows = sqlx::query(
            "SELECT tag_key, tag_value FROM resource_tags WHERE resource_type = $1 AND resource_id = $2",
        )
        .bind(t.as_str())
        .bind((*id).to_owned())
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let (k, v): (String, String) = (row.try_get("tag_key")?, row.try_get("tag_value")?);
            let hit = tags.is_empty()
                || tags.iter().any(|(wk, wv)| {
                    wk.eq_ignore_ascii_case(&k) && (wv.is_empty() || wv.eq_ignore_ascii_case(&v))
                });
            if hit {
                sqlx::query("DELETE FROM resource_tags WHERE resource_type = $1 AND resource_id = $2 AND tag_key = $3")
                    .bind(t.as_str())
                    .bind((*id).to_owned())
                    .bind(k)
                    .execute(&mut *tx)
                    .await?;
                removed += 1;
            }
        }
    }
    if removed == 0 {
        return Err(DomainError::Invalid(
            "Unable to find any tags which conform to specified delete parameters.".into(),
        ));
    }
    tx.commit().await?;
    Ok(())
}

/// Removes every tag of a resource (it is gone).
pub async fn forget(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM resource_tags WHERE resource_id = $1")
        .bind(id.to_owned())
        .execute(pool)
        .await?;
    Ok(())
}
