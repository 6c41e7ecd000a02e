//! Transfers straight between browsers and storage VMs: upload parameters
//! (`getUploadParamsForTemplate`, `getUploadParamsForIso`) and download links (`extractTemplate`,
//! `extractIso`), sealed with the transfer keys ([`crate::model::keyrings`], ring `Transfer`).
//!
//! Invariants:
//! * an upload is recorded (state `NOT_UPLOADED`) before its parameters are handed out, with the
//!   storage VM that will receive it; only that VM's reports move it (on any of its connections,
//!   since the upload outlives a reconnect);
//! * a ticket carries the install's fencing epoch and its size limit: the lower of
//!   `max.template.iso.size` and what `max.account.secondary.storage` leaves the account;
//! * tickets and links are sealed with the stored transfer keys (not this core's cache), so
//!   either core's work opens on a storage VM that has the set; they expire
//!   (`upload.operation.timeout`, `extract.url.expiration.interval`); an upload that never
//!   started before its parameters expired is abandoned by the lease holder.

use sqlx::Row as _;
use systemvm_proto::transfer::{ExtractLink, UploadTicket};

use crate::model::keyrings::{self, Ring};
use crate::model::templates::{self, NewTemplate, download_state};
use crate::model::{DomainError, DomainResult, settings, stores};
use crate::state::{Caller, State};

/// What `getUploadParamsFor*` answers.
#[derive(Debug, Clone)]
pub struct IssuedUpload {
    /// The template's id.
    pub id: String,
    /// Where the browser posts.
    pub post_url: String,
    /// `X-metadata`.
    pub metadata: String,
    /// `X-expires`.
    pub expires: String,
    /// `X-signature`.
    pub signature: String,
}

/// CloudStack's `expires` text: `yyyy-MM-dd'T'HH:mm:ss+0000` in UTC (`2026-12-02T10:00:00+0000`).
pub fn expires_text(unix: u64) -> String {
    crate::util::format_cs(
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(i64::MAX))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A connected storage VM serving `store_url` in `zone` with a transfer server: (id, base URL).
async fn transfer_vm(
    state: &State,
    zone: &str,
    store_url: &str,
    store_name: &str,
) -> DomainResult<(String, String)> {
    let Some(vm) = stores::connected_storage_vm(state, zone, store_url).await? else {
        return Err(DomainError::Unavailable(format!(
            "No storage VM serving image store {store_name} is connected; retry when one is Up"
        )));
    };
    let endpoint: Option<String> = sqlx::query_scalar("SELECT endpoint FROM system_vms WHERE id = $1")
        .bind(vm.clone())
        .fetch_optional(&state.db.pool)
        .await?
        .flatten();
    match endpoint.filter(|e| !e.is_empty()) {
        Some(e) => {
            let public = crate::model::certificates::public_url(
                state,
                systemvm_proto::agent::AgentRole::SecStorage,
                e.trim_end_matches('/'),
            )
            .await;
            Ok((vm, public))
        }
        None => Err(DomainError::Unavailable(format!(
            "Storage VM {vm} has no transfer server (ssvm-agent serve --public-listen)"
        ))),
    }
}

/// An account's secondary storage: bytes its templates and ISOs use, and its limit in bytes
/// (`max.account.secondary.storage`; `None` when unlimited).
pub async fn account_storage(state: &State, account_id: &str) -> Result<(u64, Option<u64>), sqlx::Error> {
    let limit_gib = settings::int(state, &settings::ACCOUNT_SECONDARY_LIMIT).await;
    // PostgreSQL sums BIGINTs as NUMERIC: cast back so both databases answer a BIGINT.
    let used: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(COALESCE(x.physical_size, x.size, 0)), 0) AS BIGINT) FROM templates t JOIN \
         (SELECT id AS template_id, physical_size, size FROM templates UNION ALL SELECT template_id, physical_size, size FROM template_copies) x \
         ON x.template_id = t.id WHERE t.account_id = $1 AND t.removed IS NULL",
    )
    .bind(account_id.to_owned())
    .fetch_one(&state.db.pool)
    .await?;
    let used = u64::try_from(used).unwrap_or(0);
    let limit = u64::try_from(limit_gib).ok().map(|g| g.saturating_mul(1 << 30));
    Ok((used, limit))
}

/// Bytes the account may still add to secondary storage, `None` when unlimited.
async fn account_room(state: &State, account_id: &str) -> DomainResult<Option<u64>> {
    let (used, limit) = account_storage(state, account_id).await?;
    Ok(limit.map(|l| l.saturating_sub(used)))
}

/// Records a template or ISO that a browser will upload and seals its upload parameters.
pub async fn begin_upload(state: &State, caller: &Caller, t: &NewTemplate<'_>) -> DomainResult<IssuedUpload> {
    let id = templates::register(state, caller, t).await?;
    match ticket(state, caller, &id).await {
        Ok(p) => Ok(p),
        Err(e) => {
            // Nothing can reach it: the record goes.
            sqlx::query("UPDATE templates SET removed = $1, download_state = $2, status = $3 WHERE id = $4")
                .bind(crate::util::now_cs())
                .bind(download_state::UPLOAD_ERROR)
                .bind(e.to_string())
                .bind(id)
                .execute(&state.db.pool)
                .await?;
            Err(e)
        }
    }
}

async fn ticket(state: &State, caller: &Caller, id: &str) -> DomainResult<IssuedUpload> {
    let row = sqlx::query(
        "SELECT t.zone_id, t.install_path, t.format, t.checksum, t.display_text, st.url AS store_url, st.name AS store_name FROM templates t JOIN image_stores st ON st.id = t.store_id WHERE t.id = $1",
    )
    .bind(id.to_owned())
    .fetch_one(&state.db.pool)
    .await?;
    let epoch = templates::next_epoch(state, id).await?;
    let (issued, vm, expires) = seal_ticket(
        state,
        caller,
        &TicketFor {
            id,
            zone: row.try_get("zone_id")?,
            store: (row.try_get("store_url")?, row.try_get("store_name")?),
            path: row.try_get("install_path")?,
            format: row.try_get("format")?,
            checksum: row.try_get("checksum")?,
            description: row.try_get("display_text")?,
            epoch,
        },
    )
    .await?;
    sqlx::query("UPDATE templates SET agent_id = $1, upload_expires_ms = $2 WHERE id = $3")
        .bind(vm.clone())
        .bind(i64::try_from(expires.saturating_mul(1000)).unwrap_or(i64::MAX))
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await?;
    tracing::info!(template = %id, storage_vm = %vm, "Upload parameters issued");
    Ok(issued)
}

/// What one browser upload goes into.
#[derive(Debug, Clone)]
pub struct TicketFor<'a> {
    /// The template's or volume's id (the upload's job id).
    pub id: &'a str,
    /// The store's zone.
    pub zone: String,
    /// The store's URL and name.
    pub store: (String, String),
    /// The install directory in the store.
    pub path: String,
    /// The declared format.
    pub format: String,
    /// The expected checksum, `{ALGO}hex`.
    pub checksum: Option<String>,
    /// The description `template.properties` gets.
    pub description: String,
    /// The install's fencing epoch.
    pub epoch: u64,
}

/// Seals the upload parameters of `t` for a storage VM serving its store, with the size limit
/// (`max.template.iso.size`, or what the account's limit leaves) and the expiry
/// (`upload.operation.timeout`); returns them with that VM and the expiry (Unix seconds).
pub async fn seal_ticket(
    state: &State,
    caller: &Caller,
    t: &TicketFor<'_>,
) -> DomainResult<(IssuedUpload, String, u64)> {
    let (vm, endpoint) = transfer_vm(state, &t.zone, &t.store.0, &t.store.1).await?;
    let max_template = settings::uint(state, &settings::MAX_TEMPLATE_SIZE)
        .await
        .saturating_mul(1 << 30);
    let (max_bytes, limit_reason) = match account_room(state, &caller.account_id).await? {
        Some(room) if room < max_template => (
            room,
            "the account's secondary storage limit (max.account.secondary.storage)".to_owned(),
        ),
        _ => (max_template, "max.template.iso.size".to_owned()),
    };
    if max_bytes == 0 {
        return Err(DomainError::Invalid(
            "The account has no secondary storage left (max.account.secondary.storage)".into(),
        ));
    }
    let minutes = settings::uint(state, &settings::UPLOAD_TIMEOUT).await;
    let expires = now() + minutes.saturating_mul(60);
    let ticket = UploadTicket {
        id: t.id.to_owned(),
        post_url: format!("{endpoint}/upload/{}", t.id),
        store_url: t.store.0.clone(),
        path: t.path.clone(),
        format: t.format.clone(),
        checksum: t.checksum.clone(),
        description: t.description.clone(),
        max_bytes,
        limit_reason,
        expires,
        expires_text: expires_text(expires),
        epoch: t.epoch,
        vm_id: vm.clone(),
    };
    let keys = keyrings::current(state, Ring::Transfer).await?;
    let (metadata, signature) = ticket
        .seal(&keys)
        .map_err(|e| DomainError::Internal(e.to_string()))?;
    Ok((
        IssuedUpload {
            id: t.id.to_owned(),
            post_url: ticket.post_url,
            metadata,
            expires: ticket.expires_text,
            signature,
        },
        vm,
        expires,
    ))
}

/// The lease holder, every few seconds: templates (and volumes) whose upload never started before their
/// parameters expired are abandoned (CloudStack's "Upload operation timed out"). Returns how many.
pub async fn abandon_expired(pool: &sqlx::AnyPool) -> Result<u64, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE templates SET download_state = $1, status = $2 WHERE download_state = $3 AND removed IS NULL AND upload_expires_ms IS NOT NULL AND upload_expires_ms < $4",
    )
    .bind(download_state::ABANDONED)
    .bind("Upload abandoned: it did not start before its parameters expired (upload.operation.timeout)")
    .bind(download_state::NOT_UPLOADED)
    .bind(crate::util::now_ms())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n + crate::model::volume_uploads::abandon_expired(pool).await?)
}

/// Whether `vm_id` is the storage VM an upload of `template_id` goes to (its reports count on
/// any of its connections).
pub async fn is_upload_to(state: &State, template_id: &str, vm_id: &str) -> Result<bool, sqlx::Error> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT download_state, agent_id FROM templates WHERE id = $1 AND removed IS NULL")
            .bind(template_id.to_owned())
            .fetch_optional(&state.db.pool)
            .await?;
    if row.is_some_and(|(s, agent)| {
        (s == download_state::NOT_UPLOADED || s == download_state::UPLOAD_IN_PROGRESS)
            && agent.as_deref() == Some(vm_id)
    }) {
        return Ok(true);
    }
    crate::model::volume_uploads::is_upload_to(state, template_id, vm_id).await
}

/// A download link.
#[derive(Debug, Clone)]
pub struct Extracted {
    /// The link.
    pub url: String,
    /// The template's name.
    pub name: String,
    /// Zone id and name.
    pub zone: (String, String),
    /// The owner's account id.
    pub account_id: String,
}

/// Makes a download link of an installed template or ISO (`extractTemplate`, `extractIso`).
pub async fn extract(
    state: &State,
    caller: &Caller,
    id: &str,
    iso: bool,
    zone: Option<&str>,
) -> DomainResult<Extracted> {
    let what = if iso { "ISO" } else { "template" };
    // The install in `zone` (its own row or a copy's), else the template's own.
    let row = sqlx::query(
        "SELECT t.name, t.account_id, t.is_public, t.is_extractable, x.download_state, x.installed_file, x.installed_sha256, x.is_copy, x.install_id, t.format, x.zone_id, z.name AS zone_name, st.url AS store_url, st.name AS store_name \
         FROM templates t JOIN (SELECT id AS template_id, id AS install_id, zone_id, store_id, download_state, installed_file, installed_sha256, 0 AS is_copy FROM templates \
           UNION ALL SELECT template_id, id AS install_id, zone_id, store_id, download_state, installed_file, installed_sha256, 1 AS is_copy FROM template_copies) x ON x.template_id = t.id \
         JOIN zones z ON z.id = x.zone_id JOIN image_stores st ON st.id = x.store_id \
         WHERE t.id = $1 AND t.is_iso = $2 AND t.removed IS NULL AND (x.zone_id = $3 OR ($4 = '' AND x.is_copy = 0))",
    )
    .bind(id.to_owned())
    .bind(i64::from(iso))
    .bind(zone.unwrap_or_default().to_owned())
    .bind(zone.unwrap_or_default().to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| match zone {
        Some(z) => DomainError::NotFound(format!("Unable to find {what} {id} in zone {z}")),
        None => DomainError::NotFound(format!("Unable to find {what} by id {id}")),
    })?;
    let owner: String = row.try_get("account_id")?;
    let mine = crate::model::directory::may_manage(state, caller, &owner).await?;
    let public = row.try_get::<i64, _>("is_public")? != 0;
    if !mine && !public {
        return Err(DomainError::Denied(format!(
            "Account {} may not extract {what} {id}",
            caller.account_name
        )));
    }
    if row.try_get::<i64, _>("is_extractable")? == 0 && !caller.role.is_admin() {
        return Err(DomainError::Invalid(format!(
            "The {what} {id} is not extractable (isextractable=false)"
        )));
    }
    let file: Option<String> = row.try_get("installed_file")?;
    let file = match (row.try_get::<String, _>("download_state")?.as_str(), file) {
        (download_state::DOWNLOADED, Some(f)) => f,
        _ => {
            return Err(DomainError::Invalid(format!(
                "The {what} {id} is not ready yet: it can be extracted once it is installed"
            )));
        }
    };
    let zone: String = row.try_get("zone_id")?;
    let is_copy = row.try_get::<i64, _>("is_copy")? != 0;
    // Served by an object store when the setting says so and a replica is complete there.
    let install: String = row.try_get("install_id")?;
    if let Some(url) = crate::model::staging::object_link(state, is_copy, &install, &zone).await? {
        tracing::info!(template = %id, "Download link issued by an object store");
        return Ok(Extracted {
            url,
            name: row.try_get("name")?,
            zone: (zone, row.try_get("zone_name")?),
            account_id: owner,
        });
    }
    // An evicted staging copy comes back from the object store first.
    if !is_copy {
        crate::model::staging::ensure_staged(state, id).await?;
    }
    let store_url: String = row.try_get("store_url")?;
    let store_name: String = row.try_get("store_name")?;
    let format: String = row.try_get("format")?;
    let url = seal_link(
        state,
        &LinkTo {
            id,
            zone: &zone,
            store: (&store_url, &store_name),
            file: &file,
            format: &format,
            sha256: row.try_get("installed_sha256")?,
        },
    )
    .await?;
    tracing::info!(template = %id, "Download link issued");
    Ok(Extracted {
        url,
        name: row.try_get("name")?,
        zone: (zone, row.try_get("zone_name")?),
        account_id: owner,
    })
}

/// A file on an image store to make a download link of.
#[derive(Debug, Clone)]
pub struct LinkTo<'a> {
    /// What the link is of (a template's or a volume's id).
    pub id: &'a str,
    /// The store's zone.
    pub zone: &'a str,
    /// The store's URL and name.
    pub store: (&'a str, &'a str),
    /// The file's path in the store.
    pub file: &'a str,
    /// Its format (the file name's extension when it has none).
    pub format: &'a str,
    /// The file's SHA-256 (hex), when known: the link's strong ETag.
    pub sha256: Option<String>,
}

/// Seals a download link of a file on an image store, served by a storage VM of that store for
/// `extract.url.expiration.interval` seconds; returns its URL.
pub async fn seal_link(state: &State, to: &LinkTo<'_>) -> DomainResult<String> {
    let (_, endpoint) = transfer_vm(state, to.zone, to.store.0, to.store.1).await?;
    let file_name = to.file.rsplit('/').next().unwrap_or("image").to_owned();
    let file_name = if file_name.contains('.') {
        file_name
    } else {
        format!("{file_name}.{}", to.format.to_ascii_lowercase())
    };
    let seconds = settings::uint(state, &settings::EXTRACT_URL_EXPIRATION).await;
    let link = ExtractLink {
        id: to.id.to_owned(),
        store_url: to.store.0.to_owned(),
        file: to.file.to_owned(),
        name: file_name.clone(),
        expires: now() + seconds,
        peer: None,
        sha256: to.sha256.clone(),
    };
    let keys = keyrings::current(state, Ring::Transfer).await?;
    let token = link
        .seal(&keys)
        .map_err(|e| DomainError::Internal(e.to_string()))?;
    Ok(format!("{endpoint}/download/{token}/{file_name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_text_is_cloudstacks() {
        assert_eq!(expires_text(0), "1970-01-01T00:00:00+0000");
        assert_eq!(expires_text(1_796_000_000), "2026-11-30T00:53:20+0000");
    }
}
