//! What may change on a registered template or ISO: its properties (`updateTemplate`,
//! `updateIso`) and who may use it (`updateTemplatePermissions`, `updateIsoPermissions`).
//!
//! Invariants: only its owner, an Admin role type, or a Domain or Resource Admin of the owner's
//! domain tree changes a template; `isfeatured` is set by
//! Admin role types only and `isextractable` too once it is public (CloudStack's rules); an OS
//! type is one of `model::guest_os`; a template is shared only with accounts that exist, and a
//! share dies with the template or the account (`ON DELETE CASCADE`); the install (files,
//! format on disk) is never touched: a changed `format` of a template is refused.

use sqlx::Row as _;

use crate::model::{DomainError, DomainResult};
use crate::state::{Caller, State};

/// Properties recorded with a template and answered as CloudStack's fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// `passwordenabled`.
    pub password_enabled: bool,
    /// `sshkeyenabled`.
    pub sshkey_enabled: bool,
    /// `isdynamicallyscalable`.
    pub dynamically_scalable: bool,
    /// `requireshvm`.
    pub requires_hvm: bool,
}

/// Changes to a template or ISO; `None` leaves a property as it is.
#[derive(Debug, Default)]
pub struct PropertyUpdate<'a> {
    /// Name.
    pub name: Option<&'a str>,
    /// Display text.
    pub display_text: Option<&'a str>,
    /// Format: must equal the registered one (the files are not converted).
    pub format: Option<&'a str>,
    /// OS type.
    pub os_type_id: Option<&'a str>,
    /// Bootable (ISOs).
    pub bootable: Option<bool>,
    /// `passwordenabled`.
    pub password_enabled: Option<bool>,
    /// `sshkeyenabled`.
    pub sshkey_enabled: Option<bool>,
    /// `isdynamicallyscalable`.
    pub dynamically_scalable: Option<bool>,
    /// `requireshvm`.
    pub requires_hvm: Option<bool>,
}

/// The owner and format of a live template or ISO the caller may change.
async fn owned(state: &State, caller: &Caller, id: &str, iso: bool) -> DomainResult<(String, String, bool)> {
    let row = crate::model::templates::managed_row(state, caller, id, iso, "SELECT account_id, format, is_public FROM templates WHERE id = $1 AND is_iso = $2 AND removed IS NULL").await?;
    Ok((
        row.try_get("account_id")?,
        row.try_get("format")?,
        row.try_get::<i64, _>("is_public")? != 0,
    ))
}

/// Applies `up` to template (or ISO) `id`.
pub async fn update(
    state: &State,
    caller: &Caller,
    id: &str,
    iso: bool,
    up: &PropertyUpdate<'_>,
) -> DomainResult<()> {
    let (_, format, _) = owned(state, caller, id, iso).await?;
    if let Some(f) = up.format
        && !f.eq_ignore_ascii_case(&format)
    {
        return Err(DomainError::Invalid(format!(
            "The format of a registered template cannot change ({format} → {f}): register it again"
        )));
    }
    if let Some(name) = up.name
        && (name.is_empty() || name.len() > 255)
    {
        return Err(DomainError::Invalid("A name must be 1 to 255 characters".into()));
    }
    if let Some(os) = up.os_type_id
        && crate::model::guest_os::by_id(os).is_none()
    {
        return Err(DomainError::Invalid(format!(
            "Unable to find guest OS by id {os}: see listOsTypes"
        )));
    }
    let mut tx = state.db.pool.begin().await?;
    let texts = [
        ("name", up.name),
        ("display_text", up.display_text),
        ("os_type_id", up.os_type_id),
    ];
    for (col, v) in texts {
        if let Some(v) = v {
            // `col` is one of the literals above, never caller input.
            sqlx::query(&format!("UPDATE templates SET {col} = $1 WHERE id = $2"))
                .bind(v.to_owned())
                .bind(id.to_owned())
                .execute(&mut *tx)
                .await?;
        }
    }
    let flags = [
        ("bootable", up.bootable.filter(|_| iso)),
        ("password_enabled", up.password_enabled),
        ("sshkey_enabled", up.sshkey_enabled),
        ("dynamically_scalable", up.dynamically_scalable),
        ("requires_hvm", up.requires_hvm.filter(|_| !iso)),
    ];
    for (col, v) in flags {
        if let Some(v) = v {
            sqlx::query(&format!("UPDATE templates SET {col} = $1 WHERE id = $2"))
                .bind(i64::from(v))
                .bind(id.to_owned())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    tracing::info!(%id, iso, "Template properties updated");
    Ok(())
}

/// How `accounts` changes the sharing list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareOp {
    /// Share with these accounts too.
    Add,
    /// Stop sharing with these.
    Remove,
    /// Share with nobody.
    Reset,
}

/// Changes to who may use a template.
#[derive(Debug, Default)]
pub struct Permissions<'a> {
    /// Visible to every account.
    pub public: Option<bool>,
    /// Featured.
    pub featured: Option<bool>,
    /// May be extracted.
    pub extractable: Option<bool>,
    /// The sharing change and the account names it names.
    pub share: Option<(ShareOp, Vec<&'a str>)>,
}

/// Applies `perm` to template (or ISO) `id`.
pub async fn set_permissions(
    state: &State,
    caller: &Caller,
    id: &str,
    iso: bool,
    perm: &Permissions<'_>,
) -> DomainResult<()> {
    let (owner, _, public) = owned(state, caller, id, iso).await?;
    let admin = caller.role.is_admin();
    if perm.featured.is_some() && !admin {
        return Err(DomainError::Denied("Only admins may feature a template".into()));
    }
    if perm.extractable.is_some() && !admin && perm.public.unwrap_or(public) {
        return Err(DomainError::Denied(
            "Only admins may change whether a public template is extractable".into(),
        ));
    }
    let mut accounts = Vec::new();
    if let Some((_, names)) = &perm.share {
        for name in names {
            let a: Option<String> = sqlx::query_scalar("SELECT id FROM accounts WHERE name = $1")
                .bind((*name).to_owned())
                .fetch_optional(&state.db.pool)
                .await?;
            let a = a.ok_or_else(|| DomainError::NotFound(format!("Unable to find account {name}")))?;
            if a != owner {
                accounts.push(a);
            }
        }
    }
    let mut tx = state.db.pool.begin().await?;
    for (col, v) in [
        ("is_public", perm.public),
        ("is_featured", perm.featured),
        ("is_extractable", perm.extractable),
    ] {
        if let Some(v) = v {
            sqlx::query(&format!("UPDATE templates SET {col} = $1 WHERE id = $2"))
                .bind(i64::from(v))
                .bind(id.to_owned())
                .execute(&mut *tx)
                .await?;
        }
    }
    if let Some((op, _)) = &perm.share {
        if *op == ShareOp::Reset {
            sqlx::query("DELETE FROM template_shares WHERE template_id = $1")
                .bind(id.to_owned())
                .execute(&mut *tx)
                .await?;
        }
        for a in &accounts {
            sqlx::query("DELETE FROM template_shares WHERE template_id = $1 AND account_id = $2")
                .bind(id.to_owned())
                .bind(a.clone())
                .execute(&mut *tx)
                .await?;
            if *op == ShareOp::Add {
                sqlx::query("INSERT INTO template_shares (template_id, account_id) VALUES ($1, $2)")
                    .bind(id.to_owned())
                    .bind(a.clone())
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await?;
    tracing::info!(%id, iso, "Template permissions updated");
    Ok(())
}

/// Who a template is shared with (account names), for `listTemplatePermissions`.
pub async fn shared_with(state: &State, id: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT a.name FROM template_shares s JOIN accounts a ON a.id = s.account_id WHERE s.template_id = $1 ORDER BY a.name",
    )
    .bind(id.to_owned())
    .fetch_all(&state.db.pool)
    .await
}
