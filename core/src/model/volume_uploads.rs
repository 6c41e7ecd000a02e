//! Volumes uploaded from browsers (`getUploadParamsForVolume`): recorded `NotUploaded` on the
//! zone's image store (`volumes/<account>/<id>/`) before the parameters are handed out; moved by
//! the receiving storage VM's reports only (`UploadInProgress`, then `Uploaded` with the file
//! and its size, or `UploadError` with the reason); `UploadAbandoned` when the upload never
//! started before its parameters expired. An uploaded volume is read from the image store by
//! the commands that read volumes (snapshots, `createTemplate`, `extractVolume`).
//!
//! Invariants: a volume looks uploaded only once the storage VM reported the complete,
//! inspected file (the same pipeline as template uploads); reports of any other storage VM, or
//! about a volume no longer waiting for its upload, change nothing.

use systemvm_proto::agent::{JobPhase, JobProgress};

use crate::model::transfers::{IssuedUpload, TicketFor};
use crate::model::{DomainError, DomainResult};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs, now_ms};

/// CloudStack's volume states an upload goes through (every other volume is `Ready`).
pub mod state {
    /// Waiting for the browser.
    pub const NOT_UPLOADED: &str = "NotUploaded";
    /// The bytes are arriving.
    pub const IN_PROGRESS: &str = "UploadInProgress";
    /// On the image store, complete.
    pub const UPLOADED: &str = "Uploaded";
    /// Failed; `status` says why.
    pub const ERROR: &str = "UploadError";
    /// Never started before the parameters expired.
    pub const ABANDONED: &str = "UploadAbandoned";
    /// Any other volume.
    pub const READY: &str = "Ready";
}

/// A volume to upload.
#[derive(Debug, Clone)]
pub struct NewUpload<'a> {
    /// Name.
    pub name: &'a str,
    /// Zone.
    pub zone_id: &'a str,
    /// `QCOW2` or `RAW`.
    pub format: &'a str,
    /// `{ALGO}hex` of the uploaded bytes.
    pub checksum: Option<&'a str>,
    /// Image store (`None`: the zone's first).
    pub store_id: Option<&'a str>,
}

/// Records a volume a browser will upload and seals its upload parameters.
pub async fn begin(state: &State, caller: &Caller, u: &NewUpload<'_>) -> DomainResult<IssuedUpload> {
    if u.name.is_empty() || u.name.len() > 255 {
        return Err(DomainError::Invalid("name must be 1 to 255 characters".into()));
    }
    let format = u.format.to_ascii_uppercase();
    if !crate::model::volumes::VOLUME_FORMATS.contains(&format.as_str()) {
        return Err(DomainError::Invalid(format!(
            "Format {:?} is not supported for KVM volumes: use one of {}",
            u.format,
            crate::model::volumes::VOLUME_FORMATS.join(", ")
        )));
    }
    if let Some(c) = u.checksum {
        crate::model::templates::check_checksum(c)?;
    }
    let zone = crate::model::resolve_zone(&state.db.pool, Some(u.zone_id)).await?;
    let store: Option<(String, String, String)> =
        match u.store_id {
            Some(s) => {
                sqlx::query_as("SELECT id, url, name FROM image_stores WHERE id = $1 AND zone_id = $2")
                    .bind(s.to_owned())
                    .bind(zone.clone())
                    .fetch_optional(&state.db.pool)
                    .await?
            }
            None => sqlx::query_as(
                "SELECT id, url, name FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1",
            )
            .bind(zone.clone())
            .fetch_optional(&state.db.pool)
            .await?,
        };
    let Some((store_id, store_url, store_name)) = store else {
        return Err(DomainError::Invalid(format!(
            "Zone {zone} has no image store to upload to: add one with addImageStore first"
        )));
    };
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let dir = format!("volumes/{}/{id}", caller.account_id);
    sqlx::query(
        "INSERT INTO volumes (id, name, zone_id, account_id, path, format, size, created, state, store_id, checksum, status, dispatch_epoch) \
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10, $11, 1)",
    )
    .bind(id.clone())
    .bind(u.name.to_owned())
    .bind(zone.clone())
    .bind(caller.account_id.clone())
    .bind(dir.clone())
    .bind(format.clone())
    .bind(now_cs())
    .bind(state::NOT_UPLOADED)
    .bind(store_id)
    .bind(u.checksum.map(str::to_owned))
    .bind("Waiting for the upload")
    .execute(&state.db.pool)
    .await?;
    let sealed = crate::model::transfers::seal_ticket(
        state,
        caller,
        &TicketFor {
            id: &id,
            zone,
            store: (store_url, store_name),
            path: dir,
            format,
            checksum: u.checksum.map(str::to_owned),
            description: u.name.to_owned(),
            epoch: 1,
        },
    )
    .await;
    let (issued, vm, expires) = match sealed {
        Ok(s) => s,
        Err(e) => {
            // Nothing can reach it: the record goes.
            sqlx::query("DELETE FROM volumes WHERE id = $1")
                .bind(id.clone())
                .execute(&state.db.pool)
                .await?;
            return Err(e);
        }
    };
    sqlx::query("UPDATE volumes SET agent_id = $1, upload_expires_ms = $2 WHERE id = $3")
        .bind(vm.clone())
        .bind(i64::try_from(expires.saturating_mul(1000)).unwrap_or(i64::MAX))
        .bind(id.clone())
        .execute(&state.db.pool)
        .await?;
    tracing::info!(volume = %id, storage_vm = %vm, "Volume upload parameters issued");
    Ok(issued)
}

/// Whether `vm_id` is the storage VM the upload of volume `id` goes to, and it still waits.
pub async fn is_upload_to(state: &State, id: &str, vm_id: &str) -> Result<bool, sqlx::Error> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT state, agent_id FROM volumes WHERE id = $1 AND store_id IS NOT NULL")
            .bind(id.to_owned())
            .fetch_optional(&state.db.pool)
            .await?;
    Ok(row.is_some_and(|(s, agent)| {
        (s == state::NOT_UPLOADED || s == state::IN_PROGRESS) && agent.as_deref() == Some(vm_id)
    }))
}

/// Whether `id` is an uploaded (or uploading) volume: its reports go to [`apply_progress`].
pub async fn is_volume_upload(state: &State, id: &str) -> Result<bool, sqlx::Error> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT id FROM volumes WHERE id = $1 AND store_id IS NOT NULL")
            .bind(id.to_owned())
            .fetch_optional(&state.db.pool)
            .await?;
    Ok(found.is_some())
}

/// Applies the receiving storage VM's report on a volume upload.
pub async fn apply_progress(state: &State, p: &JobProgress) -> Result<(), sqlx::Error> {
    let phase = p.state.unwrap_or(JobPhase::Running);
    let (st, status) = match phase {
        JobPhase::Completed => (state::UPLOADED, "Upload Complete".to_owned()),
        JobPhase::Failed | JobPhase::Cancelled => (
            state::ERROR,
            p.error.clone().unwrap_or_else(|| "upload failed".into()),
        ),
        JobPhase::Queued | JobPhase::Running | JobPhase::Unknown => {
            (state::IN_PROGRESS, format!("{}% Uploaded", p.percent.min(100)))
        }
    };
    let installed = p.installed.as_ref().filter(|_| phase == JobPhase::Completed);
    if phase == JobPhase::Completed && installed.is_none() {
        return Ok(());
    }
    let done = sqlx::query(
        "UPDATE volumes SET state = $1, status = $2, path = COALESCE($3, path), size = COALESCE($4, size), sha256 = COALESCE($5, sha256), format = COALESCE($6, format) \
         WHERE id = $7 AND state IN ($8, $9)",
    )
    .bind(st)
    .bind(status.clone())
    .bind(installed.map(|i| i.file.clone()))
    .bind(installed.map(|i| i64::try_from(i.virtual_size).unwrap_or(i64::MAX)))
    .bind(installed.map(|i| i.sha256.clone()))
    .bind(installed.map(|i| i.format.to_ascii_uppercase()).filter(|f| !f.is_empty()))
    .bind(p.id.clone())
    .bind(state::NOT_UPLOADED)
    .bind(state::IN_PROGRESS)
    .execute(&state.db.pool)
    .await?;
    if phase.is_final() && done.rows_affected() > 0 {
        tracing::info!(volume = %p.id, state = st, %status, "Volume upload ended");
    }
    Ok(())
}

/// Volumes whose upload never started before their parameters expired are abandoned.
pub async fn abandon_expired(pool: &sqlx::AnyPool) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "UPDATE volumes SET state = $1, status = $2 WHERE state = $3 AND upload_expires_ms IS NOT NULL AND upload_expires_ms < $4",
    )
    .bind(state::ABANDONED)
    .bind("Upload abandoned: it did not start before its parameters expired (upload.operation.timeout)")
    .bind(state::NOT_UPLOADED)
    .bind(now_ms())
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}
