//! Templates and ISOs: registration (checks and the record), download progress, what the
//! dispatcher hands out, and deletion through a storage VM.
//!
//! Invariants:
//! * a template row is written before its download is dispatched; its id is the agent's job id,
//!   so a download sent twice is the same job;
//! * installs are fenced: each dispatch to a connection and each delete raises the template's
//!   epoch, progress of an older epoch is dropped, and agents stop writing an install whose epoch
//!   passed theirs (so a re-sent download or a delete cannot be undone by a stale run);
//! * progress only moves a template that is not removed and not finished; `isready` is true only
//!   after the agent reported the install complete (the file verified and `template.properties`
//!   written);
//! * a delete stops a running download first (state `ABANDONED` keeps the dispatcher and late
//!   progress away), then removes the files through a storage VM, then the record; `forced`
//!   removes only the record and says where the files stay.

use std::time::Duration;

use sqlx::Row as _;
use systemvm_proto::agent::{AgentCommand, DownloadCommand, JobPhase, JobProgress};

use crate::model::stores::{self, MAX_URL_LEN};
use crate::model::{DomainError, DomainResult};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// Time a storage VM has to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Download states (CloudStack's `VMTemplateStorageResourceAssoc.Status`).
pub mod download_state {
    /// Not started (no storage VM has taken it yet).
    pub const NOT_DOWNLOADED: &str = "NOT_DOWNLOADED";
    /// A storage VM is downloading it.
    pub const IN_PROGRESS: &str = "DOWNLOAD_IN_PROGRESS";
    /// Installed.
    pub const DOWNLOADED: &str = "DOWNLOADED";
    /// Failed; `status` says why.
    pub const ERROR: &str = "DOWNLOAD_ERROR";
    /// Cancelled.
    pub const ABANDONED: &str = "ABANDONED";
    /// Waiting for its browser upload.
    pub const NOT_UPLOADED: &str = "NOT_UPLOADED";
    /// A browser upload is arriving.
    pub const UPLOAD_IN_PROGRESS: &str = "UPLOAD_IN_PROGRESS";
    /// The upload failed; `status` says why.
    pub const UPLOAD_ERROR: &str = "UPLOAD_ERROR";
    /// Being written from a volume or a snapshot (`createTemplate`).
    pub const CREATING: &str = "CREATING";
}

/// Which row holds an install's state: the template's own (its first zone) or a cross-zone copy
/// ([`crate::model::copies`]). Both share the download columns, so progress, epochs and waiting
/// texts are written the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `templates`: the install in the template's own zone (the id is the template's).
    Template,
    /// `template_copies`: a copy in another zone (the id is the copy's).
    Copy,
}

impl Record {
    /// The table.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Record::Template => "templates",
            Record::Copy => "template_copies",
        }
    }

    /// The row an install id names (a copy's id, else a template's).
    pub async fn of(pool: &sqlx::AnyPool, id: &str) -> Result<Record, sqlx::Error> {
        let copy: Option<String> = sqlx::query_scalar("SELECT id FROM template_copies WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(pool)
            .await?;
        Ok(if copy.is_some() {
            Record::Copy
        } else {
            Record::Template
        })
    }
}

/// Formats accepted by `registerTemplate` (what the storage agent installs).
pub const TEMPLATE_FORMATS: &[&str] = &["QCOW2", "RAW", "VHD", "OVA"];

/// Checks a checksum: `{ALGO}hex` or bare hex (MD5), with the digest length of the algorithm.
pub fn check_checksum(c: &str) -> DomainResult<()> {
    let (algo, hex) = match c.strip_prefix('{').and_then(|r| r.split_once('}')) {
        Some((a, h)) => (a.to_ascii_lowercase(), h),
        None => ("md5".to_owned(), c),
    };
    let len = match algo.as_str() {
        "md5" => 32,
        "sha1" | "sha-1" => 40,
        "sha224" | "sha-224" => 56,
        "sha256" | "sha-256" => 64,
        "sha384" | "sha-384" => 96,
        "sha512" | "sha-512" => 128,
        _ => {
            return Err(DomainError::Invalid(format!(
                "Unsupported checksum algorithm {algo:?}"
            )));
        }
    };
    if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DomainError::Invalid(format!(
            "Invalid checksum {c:?}: expected {len} hex digits for {algo}"
        )));
    }
    Ok(())
}

/// Checks a download source: an http(s) URL with a host.
pub fn check_source_url(url: &str) -> DomainResult<()> {
    let bad = |why: &str| DomainError::Invalid(format!("Invalid url {url:?}: {why}"));
    if url.len() > MAX_URL_LEN || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("too long or contains spaces or control characters"));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !lower.starts_with("http://") && !lower.starts_with("https://") {
        return Err(bad("only http:// and https:// URLs are supported"));
    }
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    Ok(())
}

/// A template or ISO to register.
#[derive(Debug, Clone)]
pub struct NewTemplate<'a> {
    /// Name.
    pub name: &'a str,
    /// Description.
    pub display_text: &'a str,
    /// An ISO (else a template).
    pub iso: bool,
    /// `QCOW2`, `RAW`, `VHD`, `OVA` (templates) or `ISO`.
    pub format: &'a str,
    /// Hypervisor (`None` for ISOs).
    pub hypervisor: &'a str,
    /// Source URL.
    pub url: &'a str,
    /// `{ALGO}hex` checksum.
    pub checksum: Option<&'a str>,
    /// Zone (`None`: the oldest; `-1` too).
    pub zone_id: Option<&'a str>,
    /// Store (`None`: the zone's first).
    pub store_id: Option<&'a str>,
    /// Visible to every account.
    pub public: bool,
    /// Featured.
    pub featured: bool,
    /// May be extracted.
    pub extractable: bool,
    /// Bootable.
    pub bootable: bool,
    /// OS type id (one of `model::guest_os`).
    pub os_type_id: Option<&'a str>,
    /// Recorded properties (password and SSH key reset, live scaling, HVM).
    pub flags: crate::model::template_properties::Flags,
    /// The bytes come from a browser upload (`url` is empty), not from a download.
    pub upload: bool,
}

/// Checks and records a template; the dispatcher sends its download. Returns its id.
pub async fn register(state: &State, caller: &Caller, t: &NewTemplate<'_>) -> DomainResult<String> {
    if !t.upload {
        check_source_url(t.url)?;
    }
    let (dl_state, status) = if t.upload {
        (download_state::NOT_UPLOADED, "Waiting for the upload")
    } else {
        (download_state::NOT_DOWNLOADED, "Waiting for a storage VM")
    };
    let (id, _) = insert(state, caller, t, (dl_state, status)).await?;
    if t.upload {
        tracing::info!(%id, name = t.name, iso = t.iso, "Registered a template; waiting for its upload");
    } else {
        tracing::info!(%id, name = t.name, url = t.url, iso = t.iso, "Registered a template; download queued");
        state.dispatch_wakeup.notify_one();
    }
    Ok(id)
}

/// Where a template being created goes: its id, the image's path and the store's URL.
#[derive(Debug, Clone)]
pub struct Creating {
    /// The template's id.
    pub id: String,
    /// `template/tmpl/<account>/<id>/<id>.qcow2`.
    pub file: String,
    /// The image store's URL.
    pub store_url: String,
    /// The zone.
    pub zone_id: String,
}

/// What a created template's image came to.
#[derive(Debug, Clone)]
pub struct Created<'a> {
    /// Its virtual size.
    pub virtual_size: u64,
    /// The file's size.
    pub physical_size: u64,
    /// SHA-256 of the file (hex).
    pub sha256: &'a str,
}

/// Checks and records a template to be written from a volume or a snapshot (`createTemplate`):
/// `CREATING`, which no dispatcher sends anywhere, until [`created`] or [`creation_failed`].
pub async fn begin_created(state: &State, caller: &Caller, t: &NewTemplate<'_>) -> DomainResult<Creating> {
    let (id, store_id) = insert(state, caller, t, (download_state::CREATING, "Creating")).await?;
    let (store_url, zone_id): (String, String) =
        sqlx::query_as("SELECT url, zone_id FROM image_stores WHERE id = $1")
            .bind(store_id)
            .fetch_one(&state.db.pool)
            .await?;
    Ok(Creating {
        file: format!("template/tmpl/{}/{id}/{id}.qcow2", caller.account_id),
        id,
        store_url,
        zone_id,
    })
}

/// The template's image is written: it is ready.
pub async fn created(state: &State, c: &Creating, written: &Created<'_>) -> DomainResult<()> {
    sqlx::query(
        "UPDATE templates SET download_state = $1, status = $2, download_percent = 100, size = $3, physical_size = $4, installed_file = $5, installed_sha256 = $6 WHERE id = $7 AND download_state = $8",
    )
    .bind(download_state::DOWNLOADED)
    .bind("Download Complete")
    .bind(i64::try_from(written.virtual_size).unwrap_or(i64::MAX))
    .bind(i64::try_from(written.physical_size).unwrap_or(i64::MAX))
    .bind(c.file.clone())
    .bind(written.sha256.to_owned())
    .bind(c.id.clone())
    .bind(download_state::CREATING)
    .execute(&state.db.pool)
    .await?;
    tracing::info!(id = %c.id, file = %c.file, "Template created");
    Ok(())
}

/// Writing the template's image failed: the template goes (CloudStack removes it too).
pub async fn creation_failed(state: &State, c: &Creating) -> DomainResult<()> {
    sqlx::query("DELETE FROM templates WHERE id = $1 AND download_state = $2")
        .bind(c.id.clone())
        .bind(download_state::CREATING)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// Checks a new template and inserts its row in `initial` (download state, status); returns its
/// id and store.
async fn insert(
    state: &State,
    caller: &Caller,
    t: &NewTemplate<'_>,
    (dl_state, status): (&str, &str),
) -> DomainResult<(String, String)> {
    if t.name.len() > 255 {
        return Err(DomainError::Invalid("name is longer than 255 characters".into()));
    }
    if !t.iso && !TEMPLATE_FORMATS.contains(&t.format) {
        return Err(DomainError::Invalid(format!(
            "Format {:?} is not supported: use one of {}",
            t.format,
            TEMPLATE_FORMATS.join(", ")
        )));
    }
    if let Some(c) = t.checksum {
        check_checksum(c)?;
    }
    if let Some(os) = t.os_type_id
        && crate::model::guest_os::by_id(os).is_none()
    {
        return Err(DomainError::Invalid(format!(
            "Unable to find guest OS by id {os}: see listOsTypes"
        )));
    }
    if t.featured && !caller.role.is_admin() {
        return Err(DomainError::Denied(
            "Only root admins may register featured templates".into(),
        ));
    }
    let zone_id = crate::model::resolve_zone(&state.db.pool, t.zone_id).await?;
    let store_id: String = match t.store_id {
        Some(s) => sqlx::query_scalar("SELECT id FROM image_stores WHERE id = $1 AND zone_id = $2")
            .bind(s.to_owned())
            .bind(zone_id.clone())
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| {
                DomainError::NotFound(format!("Unable to find image store {s} in zone {zone_id}"))
            })?,
        None => sqlx::query_scalar(
            "SELECT id FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1",
        )
        .bind(zone_id.clone())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| {
            DomainError::Invalid(format!(
                "Zone {zone_id} has no image store: add one with addImageStore first"
            ))
        })?,
    };
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let install_path = format!("template/tmpl/{}/{id}", caller.account_id);
    sqlx::query(
        "INSERT INTO templates (id, name, display_text, is_iso, format, hypervisor, url, checksum, zone_id, store_id, account_id, is_public, is_featured, is_extractable, bootable, os_type_id, install_path, download_state, download_percent, status, created, password_enabled, sshkey_enabled, dynamically_scalable, requires_hvm) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, 0, $19, $20, $21, $22, $23, $24)",
    )
    .bind(id.clone())
    .bind(t.name.to_owned())
    .bind(t.display_text.to_owned())
    .bind(i64::from(t.iso))
    .bind(t.format.to_owned())
    .bind(t.hypervisor.to_owned())
    .bind(t.url.to_owned())
    .bind(t.checksum.map(str::to_owned))
    .bind(zone_id)
    .bind(store_id.clone())
    .bind(caller.account_id.clone())
    .bind(i64::from(t.public))
    .bind(i64::from(t.featured))
    .bind(i64::from(t.extractable))
    .bind(i64::from(t.bootable))
    .bind(t.os_type_id.map(str::to_owned))
    .bind(install_path)
    .bind(dl_state.to_owned())
    .bind(status.to_owned())
    .bind(now_cs())
    .bind(i64::from(t.flags.password_enabled))
    .bind(i64::from(t.flags.sshkey_enabled))
    .bind(i64::from(t.flags.dynamically_scalable))
    .bind(i64::from(t.flags.requires_hvm))
    .execute(&state.db.pool)
    .await?;
    Ok((id, store_id))
}

/// Applies a storage VM's progress report to its template.
pub async fn apply_progress(state: &State, vm_id: &str, p: &JobProgress) -> Result<(), sqlx::Error> {
    let table = Record::of(&state.db.pool, &p.id).await?.table();
    if let Some(epoch) = p.epoch {
        let current: Option<i64> =
            sqlx::query_scalar(&format!("SELECT dispatch_epoch FROM {table} WHERE id = $1"))
                .bind(p.id.clone())
                .fetch_optional(&state.db.pool)
                .await?;
        if current.is_some_and(|c| i64::try_from(epoch).unwrap_or(i64::MAX) < c) {
            tracing::warn!(template = %p.id, epoch, "Progress of a fenced (older) run of a download, skipped");
            return Ok(());
        }
    }
    let phase = p.state.unwrap_or(JobPhase::Running);
    let upload: bool =
        sqlx::query_scalar::<_, String>(&format!("SELECT download_state FROM {table} WHERE id = $1"))
            .bind(p.id.clone())
            .fetch_optional(&state.db.pool)
            .await?
            .is_some_and(|s| s == download_state::NOT_UPLOADED || s == download_state::UPLOAD_IN_PROGRESS);
    let (done_text, verb, error_state, busy_state) = if upload {
        (
            "Upload Complete",
            "Uploaded",
            download_state::UPLOAD_ERROR,
            download_state::UPLOAD_IN_PROGRESS,
        )
    } else {
        (
            "Download Complete",
            "Downloaded",
            download_state::ERROR,
            download_state::IN_PROGRESS,
        )
    };
    let (dl_state, status, percent) = match phase {
        JobPhase::Completed => (download_state::DOWNLOADED, done_text.to_owned(), 100),
        JobPhase::Failed => (
            error_state,
            p.error
                .clone()
                .unwrap_or_else(|| format!("{} failed", if upload { "upload" } else { "download" })),
            i64::from(p.percent),
        ),
        JobPhase::Cancelled => (
            download_state::ABANDONED,
            "Download cancelled".to_owned(),
            i64::from(p.percent),
        ),
        JobPhase::Queued => (busy_state, "Waiting for a download slot".to_owned(), 0),
        JobPhase::Running | JobPhase::Unknown => (
            busy_state,
            format!("{}% {verb}", p.percent.min(100)),
            i64::from(p.percent.min(100)),
        ),
    };
    let installed = p.installed.as_ref().filter(|_| phase == JobPhase::Completed);
    let done = sqlx::query(&format!(
        "UPDATE {table} SET download_state = $1, status = $2, download_percent = $3, agent_id = $4, \
         size = COALESCE($5, size), physical_size = COALESCE($6, physical_size), installed_file = COALESCE($7, installed_file), installed_sha256 = COALESCE($8, installed_sha256) \
         WHERE id = $9 AND removed IS NULL AND download_state IN ($10, $11, $12, $13)",
    ))
    .bind(dl_state)
    .bind(status.clone())
    .bind(percent)
    .bind(vm_id.to_owned())
    .bind(installed.map(|i| i64::try_from(i.virtual_size).unwrap_or(i64::MAX)))
    .bind(installed.map(|i| i64::try_from(i.physical_size).unwrap_or(i64::MAX)))
    .bind(installed.map(|i| i.file.clone()))
    .bind(installed.map(|i| i.sha256.clone()))
    .bind(p.id.clone())
    .bind(download_state::NOT_DOWNLOADED)
    .bind(download_state::IN_PROGRESS)
    .bind(download_state::NOT_UPLOADED)
    .bind(download_state::UPLOAD_IN_PROGRESS)
    .execute(&state.db.pool)
    .await?;
    if phase.is_final() {
        state.dispatched_forget(&p.id);
        if done.rows_affected() > 0 {
            tracing::info!(template = %p.id, state = dl_state, %status, "Template download ended");
        }
    }
    Ok(())
}

/// A download waiting to be handed to a storage VM.
#[derive(Debug, Clone)]
pub struct PendingDownload {
    /// The command to send (`job_id` = the template id).
    pub command: DownloadCommand,
    /// The zone.
    pub zone_id: String,
    /// The store's name (for the status text).
    pub store_name: String,
    /// Its current status text.
    pub status: String,
    /// A cross-zone copy of this template: the command's source (URL, peer) is filled in at
    /// dispatch ([`crate::model::copies::source_for`]).
    pub copy_of: Option<String>,
}

/// Templates not installed yet, oldest first.
pub async fn pending_downloads(state: &State) -> Result<Vec<PendingDownload>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT t.id, t.display_text, t.url, t.format, t.checksum, t.install_path, t.zone_id, t.status, st.url AS store_url, st.name AS store_name \
         FROM templates t JOIN image_stores st ON st.id = t.store_id WHERE t.removed IS NULL AND t.download_state IN ($1, $2) ORDER BY t.created",
    )
    .bind(download_state::NOT_DOWNLOADED)
    .bind(download_state::IN_PROGRESS)
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PendingDownload {
                command: DownloadCommand {
                    job_id: row.try_get("id")?,
                    store_url: row.try_get("store_url")?,
                    url: row.try_get("url")?,
                    path: row.try_get("install_path")?,
                    format: row.try_get("format")?,
                    checksum: row.try_get("checksum")?,
                    description: row.try_get("display_text")?,
                    epoch: 0,
                    peer: None,
                },
                zone_id: row.try_get("zone_id")?,
                store_name: row.try_get("store_name")?,
                status: row.try_get("status")?,
                copy_of: None,
            })
        })
        .collect()
}

/// Raises the install's fencing epoch and returns the new value: every dispatch to a connection
/// and every delete gets a higher epoch than anything sent before, so a storage VM still running
/// an older one is fenced off.
pub async fn next_epoch(state: &State, id: &str) -> Result<u64, sqlx::Error> {
    let table = Record::of(&state.db.pool, id).await?.table();
    sqlx::query(&format!(
        "UPDATE {table} SET dispatch_epoch = dispatch_epoch + 1 WHERE id = $1"
    ))
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await?;
    let e: i64 = sqlx::query_scalar(&format!("SELECT dispatch_epoch FROM {table} WHERE id = $1"))
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    Ok(u64::try_from(e).unwrap_or(0))
}

/// Sets the status text of a template still waiting for its download.
pub async fn set_waiting_status(state: &State, id: &str, status: &str) -> Result<(), sqlx::Error> {
    let table = Record::of(&state.db.pool, id).await?.table();
    sqlx::query(&format!(
        "UPDATE {table} SET status = $1 WHERE id = $2 AND download_state IN ($3, $4)"
    ))
    .bind(status.to_owned())
    .bind(id.to_owned())
    .bind(download_state::NOT_DOWNLOADED)
    .bind(download_state::IN_PROGRESS)
    .execute(&state.db.pool)
    .await
    .map(|_| ())
}

async fn mark_removed(state: &State, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE templates SET removed = $1, download_state = CASE WHEN download_state = $2 THEN download_state ELSE $3 END WHERE id = $4",
    )
    .bind(now_cs())
    .bind(download_state::DOWNLOADED)
    .bind(download_state::ABANDONED)
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await?;
    crate::model::tags::forget(&state.db.pool, id).await
}

/// How a delete ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// The files and the record are gone.
    Everything,
    /// Only the record (forced, no storage VM): the files stay at this place.
    RecordOnly(String),
}

/// The row `query` reads (`$1` = id, `$2` = is_iso; it selects `account_id`) of a live template
/// or ISO the caller may manage: `NotFound` without one, `Denied` when it is another's.
pub(crate) async fn managed_row(
    state: &State,
    caller: &Caller,
    id: &str,
    iso: bool,
    query: &str,
) -> DomainResult<sqlx::any::AnyRow> {
    let what = if iso { "ISO" } else { "template" };
    let row = sqlx::query(query)
        .bind(id.to_owned())
        .bind(i64::from(iso))
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find {what} by id {id}")))?;
    let owner: String = row.try_get("account_id")?;
    ensure_manages(state, caller, &owner, what, id).await?;
    Ok(row)
}

/// Refuses a caller that may not manage `owner`'s template or ISO `id` (`what`: "template" or "ISO").
pub(crate) async fn ensure_manages(
    state: &State,
    caller: &Caller,
    owner: &str,
    what: &str,
    id: &str,
) -> DomainResult<()> {
    if crate::model::directory::may_manage(state, caller, owner).await? {
        Ok(())
    } else {
        Err(DomainError::Denied(format!(
            "Account {} does not own {what} {id}",
            caller.account_name
        )))
    }
}

/// Deletes a template or ISO: its download, its files (through a storage VM), its record. Runs
/// on the lease holder (it needs the storage VM's connection).
pub async fn delete(
    state: &State,
    caller: &Caller,
    id: &str,
    iso: bool,
    zone: Option<&str>,
    forced: bool,
) -> DomainResult<Deleted> {
    let what = if iso { "ISO" } else { "template" };
    let row = crate::model::templates::managed_row(state, caller, id, iso, "SELECT t.account_id, t.zone_id, t.install_path, t.download_state, st.url AS store_url, st.name AS store_name FROM templates t JOIN image_stores st ON st.id = t.store_id WHERE t.id = $1 AND t.is_iso = $2 AND t.removed IS NULL").await?;
    let zone_id: String = row.try_get("zone_id")?;
    let copies = crate::model::copies::zones_of(state, id).await?;
    match zone {
        // A copy in another zone: only that copy goes.
        Some(z) if z != zone_id => {
            if !copies.iter().any(|c| c == z) {
                return Err(DomainError::NotFound(format!(
                    "The {what} {id} is not in zone {z}"
                )));
            }
            return crate::model::copies::delete(state, id, z, forced).await;
        }
        // Its own zone while copies exist: a ready copy takes over, so one must be ready.
        Some(_) if !copies.is_empty() => {
            let ready: Option<String> = sqlx::query_scalar(
                "SELECT id FROM template_copies WHERE template_id = $1 AND download_state = $2 LIMIT 1",
            )
            .bind(id.to_owned())
            .bind(download_state::DOWNLOADED)
            .fetch_optional(&state.db.pool)
            .await?;
            if ready.is_none() {
                return Err(DomainError::InUse(format!(
                    "The {what} {id} is being copied to other zones: wait for the copies, or delete them first"
                )));
            }
        }
        Some(_) => {}
        // Everywhere: the copies first.
        None => {
            for z in &copies {
                crate::model::copies::delete(state, id, z, forced).await?;
            }
        }
    }
    let path: String = row.try_get("install_path")?;
    let store_url: String = row.try_get("store_url")?;
    let store_name: String = row.try_get("store_name")?;
    let dl_state: String = row.try_get("download_state")?;
    let Some(agent) = stores::connected_storage_vm(state, &zone_id, &store_url).await? else {
        if !forced {
            return Err(DomainError::Unavailable(format!(
                "No storage VM serving image store {store_name} is connected, so the {what}'s files can't be deleted; retry when one is Up, or pass forced=true to remove the record and leave the files"
            )));
        }
        if zone.is_none() || !crate::model::copies::promote(state, id).await? {
            mark_removed(state, id).await?;
        }
        tracing::warn!(%id, %path, "Removed a template record; its files stay on the store (forced, no storage VM)");
        return Ok(Deleted::RecordOnly(format!("{store_name} at {path}")));
    };
    if [
        download_state::IN_PROGRESS,
        download_state::NOT_DOWNLOADED,
        download_state::NOT_UPLOADED,
        download_state::UPLOAD_IN_PROGRESS,
    ]
    .contains(&dl_state.as_str())
    {
        sqlx::query(
            "UPDATE templates SET download_state = $1, status = $2 WHERE id = $3 AND download_state <> $4",
        )
        .bind(download_state::ABANDONED)
        .bind("Download cancelled: deleting")
        .bind(id.to_owned())
        .bind(download_state::DOWNLOADED)
        .execute(&state.db.pool)
        .await?;
        state.dispatched_forget(id);
        let _ = state
            .agents
            .call(
                &agent,
                &AgentCommand::CancelJob {
                    job_id: id.to_owned(),
                },
                COMMAND_TIMEOUT,
            )
            .await;
    }
    // A higher epoch fences off any run of the download still going somewhere.
    let epoch = next_epoch(state, id).await?;
    let answer = state
        .agents
        .call(
            &agent,
            &AgentCommand::DeleteInstall {
                store_url: store_url.clone(),
                path: path.clone(),
                epoch,
            },
            COMMAND_TIMEOUT,
        )
        .await
        .map_err(|e| DomainError::Unavailable(format!("Failed to delete the {what}'s files: {e}")))?;
    if !answer.ok {
        return Err(DomainError::Unavailable(format!(
            "Failed to delete the {what}'s files: {}",
            answer.error.unwrap_or_else(|| "no reason given".into())
        )));
    }
    if zone.is_some() && crate::model::copies::promote(state, id).await? {
        tracing::info!(%id, %path, zone = %zone_id, "Deleted a template's files in its own zone; a copy took over");
        return Ok(Deleted::Everything);
    }
    mark_removed(state, id).await?;
    tracing::info!(%id, %path, "Deleted a template and its files");
    Ok(Deleted::Everything)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums() {
        assert!(check_checksum("d41d8cd98f00b204e9800998ecf8427e").is_ok());
        assert!(
            check_checksum("{SHA-256}e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .is_ok()
        );
        assert!(check_checksum("{sha1}da39a3ee5e6b4b0d3255bfef95601890afd80709").is_ok());
        for bad in [
            "abc",
            "{sha256}abc",
            "{crc32}00000000",
            "zz1d8cd98f00b204e9800998ecf8427e",
        ] {
            assert!(check_checksum(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn source_urls() {
        assert!(check_source_url("https://example.com/a.qcow2").is_ok());
        assert!(check_source_url("http://10.0.0.1:8000/x.iso").is_ok());
        for bad in [
            "ftp://x/y",
            "file:///etc/passwd",
            "http://",
            "nonsense",
            "http://x/a b",
        ] {
            assert!(check_source_url(bad).is_err(), "{bad}");
        }
        assert!(check_source_url(&format!("http://x/{}", "a".repeat(3000))).is_err());
    }
}
