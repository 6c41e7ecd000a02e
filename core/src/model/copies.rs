//! Cross-zone copies of templates and ISOs (`copyTemplate`, `copyIso`): a template's install in
//! another zone, fetched by that zone's storage VM straight from a storage VM that holds it.
//!
//! Invariants:
//! * a copy is a row of `template_copies` (one per template and zone), written before anything
//!   is sent; its id is the destination storage VM's job id, and it is fenced and reported like
//!   any download ([`crate::model::templates::Record::Copy`]);
//! * the bytes move between the two storage VMs only: the destination fetches a download link
//!   sealed for it alone ([`ExtractLink::peer`]) over TLS where each side proves itself with the
//!   peer certificate core's CA issued it at connection ([`systemvm_proto::agent::peer_name`]);
//!   the link is issued afresh at every dispatch and lives [`COPY_LINK_SECS`];
//! * the destination verifies the bytes against the SHA-256 the source reported at install, and
//!   resumes an interrupted fetch from its part file (`If-Range` on that SHA-256), so either
//!   side may restart;
//! * a template's own zone stays in `templates`: deleting it there while a ready copy exists
//!   makes that copy the template's own install; deleting the template everywhere removes every
//!   copy's files first.

use std::time::Duration;

use sqlx::Row as _;
use systemvm_proto::agent::{AgentCommand, PeerSource, peer_name};
use systemvm_proto::transfer::ExtractLink;

use crate::model::keyrings::{self, Ring};
use crate::model::templates::{self, COMMAND_TIMEOUT, Deleted, PendingDownload, download_state};
use crate::model::{DomainError, DomainResult, stores};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// How long the download link of one dispatch of a copy is valid.
pub const COPY_LINK_SECS: u64 = 3600;

/// How often [`wait`] looks at the copies.
const WAIT_POLL: Duration = Duration::from_secs(1);

/// A ready install of a template: where a copy can come from.
#[derive(Debug, Clone)]
struct Install {
    zone_id: String,
    store_url: String,
    store_name: String,
    file: String,
    sha256: Option<String>,
}

/// The ready installs of template `id`, its own zone first.
async fn ready_installs(state: &State, id: &str) -> Result<Vec<Install>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT x.zone_id, x.installed_file, x.installed_sha256, st.url AS store_url, st.name AS store_name, x.own FROM \
         (SELECT zone_id, store_id, installed_file, installed_sha256, 0 AS own, created FROM templates WHERE id = $1 AND removed IS NULL AND download_state = $2 AND staging = 'Present' \
          UNION ALL SELECT zone_id, store_id, installed_file, installed_sha256, 1 AS own, created FROM template_copies WHERE template_id = $3 AND download_state = $4) x \
         JOIN image_stores st ON st.id = x.store_id ORDER BY x.own, x.created",
    )
    .bind(id.to_owned())
    .bind(download_state::DOWNLOADED)
    .bind(id.to_owned())
    .bind(download_state::DOWNLOADED)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let Some(file) = row.try_get::<Option<String>, _>("installed_file")? else {
            continue;
        };
        out.push(Install {
            zone_id: row.try_get("zone_id")?,
            store_url: row.try_get("store_url")?,
            store_name: row.try_get("store_name")?,
            file,
            sha256: row.try_get("installed_sha256")?,
        });
    }
    Ok(out)
}

/// Records copies of template (or ISO) `id` into `dest_zones`, from `source_zone` (default: the
/// first zone where it is ready); the dispatcher sends them. A zone that already holds it (or is
/// fetching it) is left as it is; a failed copy is tried again.
pub async fn request(
    state: &State,
    caller: &Caller,
    id: &str,
    iso: bool,
    source_zone: Option<&str>,
    dest_zones: &[String],
) -> DomainResult<()> {
    let what = if iso { "ISO" } else { "template" };
    let row = crate::model::templates::managed_row(state, caller, id, iso, "SELECT account_id, zone_id, store_id FROM templates WHERE id = $1 AND is_iso = $2 AND removed IS NULL").await?;
    if dest_zones.is_empty() {
        return Err(DomainError::Invalid(
            "Either destzoneid or destzoneids parameters have to be specified.".into(),
        ));
    }
    // A staging copy evicted to its object store comes back first: it is the copies' source.
    crate::model::staging::ensure_staged(state, id).await?;
    let installs = ready_installs(state, id).await?;
    let source = match source_zone {
        Some(z) => installs.iter().find(|i| i.zone_id == z).ok_or_else(|| {
            DomainError::Invalid(format!(
                "The {what} {id} is not ready in zone {z}: copy it from a zone where it is installed"
            ))
        })?,
        None => installs.first().ok_or_else(|| {
            DomainError::Invalid(format!(
                "The {what} {id} is not ready in any zone yet: copy it once it is installed"
            ))
        })?,
    };
    let own_zone: String = row.try_get("zone_id")?;
    for dest in dest_zones {
        if *dest == source.zone_id {
            return Err(DomainError::Invalid(
                "Please specify different source and destination zones.".into(),
            ));
        }
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM zones WHERE id = $1")
            .bind(dest.clone())
            .fetch_optional(&state.db.pool)
            .await?;
        if exists.is_none() {
            return Err(DomainError::NotFound(format!("Unable to find zone by id {dest}")));
        }
        let store: Option<String> = sqlx::query_scalar(
            "SELECT id FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1",
        )
        .bind(dest.clone())
        .fetch_optional(&state.db.pool)
        .await?;
        if store.is_none() {
            return Err(DomainError::Invalid(format!(
                "Zone {dest} has no image store: add one with addImageStore first"
            )));
        }
    }
    for dest in dest_zones {
        if *dest == own_zone {
            continue;
        }
        let store: String = sqlx::query_scalar(
            "SELECT id FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1",
        )
        .bind(dest.clone())
        .fetch_one(&state.db.pool)
        .await?;
        let existing: Option<(String, String)> = sqlx::query(
            "SELECT id, download_state FROM template_copies WHERE template_id = $1 AND zone_id = $2",
        )
        .bind(id.to_owned())
        .bind(dest.clone())
        .fetch_optional(&state.db.pool)
        .await?
        .map(|r| Ok::<_, sqlx::Error>((r.try_get("id")?, r.try_get("download_state")?)))
        .transpose()?;
        match existing {
            Some((copy, s)) if s == download_state::ERROR || s == download_state::ABANDONED => {
                sqlx::query(
                    "UPDATE template_copies SET download_state = $1, download_percent = 0, status = $2, source_zone_id = $3 WHERE id = $4",
                )
                .bind(download_state::NOT_DOWNLOADED)
                .bind("Waiting for a storage VM")
                .bind(source.zone_id.clone())
                .bind(copy.clone())
                .execute(&state.db.pool)
                .await?;
                tracing::info!(template = %id, zone = %dest, %copy, "Copy to a zone queued again");
            }
            Some(_) => {}
            None => {
                let copy = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
                // A concurrent request for the same zone loses on the unique key and is a no-op.
                sqlx::query(
                    "INSERT INTO template_copies (id, template_id, zone_id, store_id, source_zone_id, download_state, status, created) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (template_id, zone_id) DO NOTHING",
                )
                .bind(copy.clone())
                .bind(id.to_owned())
                .bind(dest.clone())
                .bind(store)
                .bind(source.zone_id.clone())
                .bind(download_state::NOT_DOWNLOADED)
                .bind("Waiting for a storage VM")
                .bind(now_cs())
                .execute(&state.db.pool)
                .await?;
                tracing::info!(template = %id, from = %source.zone_id, zone = %dest, %copy, "Copy to a zone queued");
            }
        }
    }
    state.dispatch_wakeup.notify_one();
    Ok(())
}

/// Waits until the copies of `id` into `zones` are installed; the first that failed ends the
/// wait with its reason.
pub async fn wait(state: &State, id: &str, zones: &[String]) -> DomainResult<()> {
    loop {
        let mut busy = false;
        for zone in zones {
            let row = sqlx::query(
                "SELECT download_state, status FROM template_copies WHERE template_id = $1 AND zone_id = $2",
            )
            .bind(id.to_owned())
            .bind(zone.clone())
            .fetch_optional(&state.db.pool)
            .await?;
            let Some(row) = row else {
                // The template's own zone, or a copy deleted meanwhile.
                continue;
            };
            let s: String = row.try_get("download_state")?;
            match s.as_str() {
                download_state::DOWNLOADED => {}
                download_state::ERROR | download_state::ABANDONED => {
                    let status: String = row.try_get("status")?;
                    return Err(DomainError::Unavailable(format!(
                        "Failed to copy to zone {zone}: {status}"
                    )));
                }
                _ => busy = true,
            }
        }
        if !busy {
            return Ok(());
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Copies not installed yet, oldest first (their sources are chosen at dispatch).
pub async fn pending(state: &State) -> Result<Vec<PendingDownload>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.id, c.template_id, c.zone_id, c.status, t.display_text, t.format, t.install_path, st.url AS store_url, st.name AS store_name \
         FROM template_copies c JOIN templates t ON t.id = c.template_id JOIN image_stores st ON st.id = c.store_id \
         WHERE t.removed IS NULL AND c.download_state IN ($1, $2) ORDER BY c.created",
    )
    .bind(download_state::NOT_DOWNLOADED)
    .bind(download_state::IN_PROGRESS)
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PendingDownload {
                command: systemvm_proto::agent::DownloadCommand {
                    job_id: row.try_get("id")?,
                    store_url: row.try_get("store_url")?,
                    url: String::new(),
                    path: row.try_get("install_path")?,
                    format: row.try_get("format")?,
                    checksum: None,
                    description: row.try_get("display_text")?,
                    epoch: 0,
                    peer: None,
                },
                zone_id: row.try_get("zone_id")?,
                store_name: row.try_get("store_name")?,
                status: row.try_get("status")?,
                copy_of: Some(row.try_get("template_id")?),
            })
        })
        .collect()
}

/// Fills in where copy `pending` fetches from, for destination storage VM `dest_vm`: a link
/// sealed for `dest_vm` on a connected storage VM that holds the template, the expected
/// SHA-256 and the peer to dial. `Ok(Err(text))`: nothing can serve it now (the waiting text).
pub async fn source_for(
    state: &State,
    pending: &mut PendingDownload,
    dest_vm: &str,
) -> DomainResult<Result<(), String>> {
    let Some(template) = pending.copy_of.clone() else {
        return Ok(Ok(()));
    };
    let preferred: Option<String> =
        sqlx::query_scalar("SELECT source_zone_id FROM template_copies WHERE id = $1")
            .bind(pending.command.job_id.clone())
            .fetch_optional(&state.db.pool)
            .await?;
    let mut installs = ready_installs(state, &template).await?;
    installs.retain(|i| i.zone_id != pending.zone_id);
    // The zone asked for first, then any other that holds it.
    installs.sort_by_key(|i| Some(&i.zone_id) != preferred.as_ref());
    let Some(first) = installs.first() else {
        return Ok(Err("Waiting for a zone where the template is installed".into()));
    };
    let mut waiting = format!(
        "Waiting for a storage VM serving image store {} to copy from",
        first.store_name
    );
    for install in &installs {
        let Some(vm) = stores::connected_storage_vm(state, &install.zone_id, &install.store_url).await?
        else {
            continue;
        };
        let endpoint: Option<String> = sqlx::query_scalar("SELECT endpoint FROM system_vms WHERE id = $1")
            .bind(vm.clone())
            .fetch_optional(&state.db.pool)
            .await?
            .flatten();
        let Some(address) = endpoint.as_deref().and_then(host_port) else {
            waiting = format!(
                "Waiting for storage VM {vm} (image store {}) to run its transfer server",
                install.store_name
            );
            continue;
        };
        let name = install.file.rsplit('/').next().unwrap_or("image").to_owned();
        let link = ExtractLink {
            id: template.clone(),
            store_url: install.store_url.clone(),
            file: install.file.clone(),
            name: name.clone(),
            expires: crate::util::now_ms().max(0).unsigned_abs() / 1000 + COPY_LINK_SECS,
            peer: Some(dest_vm.to_owned()),
            sha256: install.sha256.clone(),
        };
        let keys = keyrings::current(state, Ring::Transfer).await?;
        let token = link
            .seal(&keys)
            .map_err(|e| DomainError::Internal(e.to_string()))?;
        let port = address.rsplit_once(':').map_or("443", |(_, p)| p);
        pending.command.url = format!("https://{}:{port}/download/{token}/{name}", peer_name(&vm));
        pending.command.peer = Some(PeerSource { address, vm_id: vm });
        pending.command.checksum = install.sha256.as_ref().map(|s| format!("{{SHA-256}}{s}"));
        return Ok(Ok(()));
    }
    Ok(Err(waiting))
}

/// `host:port` of an endpoint URL (the scheme's port when it names none).
fn host_port(endpoint: &str) -> Option<String> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let host = uri.host().filter(|h| !h.is_empty())?;
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    });
    Some(format!("{host}:{port}"))
}

/// The zones holding a copy of `id` (any state).
pub async fn zones_of(state: &State, id: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT zone_id FROM template_copies WHERE template_id = $1 ORDER BY created")
        .bind(id.to_owned())
        .fetch_all(&state.db.pool)
        .await
}

/// Deletes the copy of `id` in `zone`: its download, its files (through that zone's storage VM),
/// its row. `forced`: without a storage VM, only the row goes.
pub async fn delete(state: &State, id: &str, zone: &str, forced: bool) -> DomainResult<Deleted> {
    let row = sqlx::query(
        "SELECT c.id, c.download_state, t.install_path, st.url AS store_url, st.name AS store_name \
         FROM template_copies c JOIN templates t ON t.id = c.template_id JOIN image_stores st ON st.id = c.store_id \
         WHERE c.template_id = $1 AND c.zone_id = $2",
    )
    .bind(id.to_owned())
    .bind(zone.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| DomainError::NotFound(format!("Template {id} has no copy in zone {zone}")))?;
    let copy: String = row.try_get("id")?;
    let path: String = row.try_get("install_path")?;
    let store_url: String = row.try_get("store_url")?;
    let store_name: String = row.try_get("store_name")?;
    let dl_state: String = row.try_get("download_state")?;
    let Some(agent) = stores::connected_storage_vm(state, zone, &store_url).await? else {
        if !forced {
            return Err(DomainError::Unavailable(format!(
                "No storage VM serving image store {store_name} is connected, so the copy's files can't be deleted; retry when one is Up, or pass forced=true to remove the record and leave the files"
            )));
        }
        remove_row(state, &copy).await?;
        return Ok(Deleted::RecordOnly(format!("{store_name} at {path}")));
    };
    if dl_state != download_state::DOWNLOADED {
        sqlx::query("UPDATE template_copies SET download_state = $1, status = $2 WHERE id = $3")
            .bind(download_state::ABANDONED)
            .bind("Copy cancelled: deleting")
            .bind(copy.clone())
            .execute(&state.db.pool)
            .await?;
        state.dispatched_forget(&copy);
        let _ = state
            .agents
            .call(
                &agent,
                &AgentCommand::CancelJob { job_id: copy.clone() },
                COMMAND_TIMEOUT,
            )
            .await;
    }
    let epoch = templates::next_epoch(state, &copy).await?;
    let answer = state
        .agents
        .call(
            &agent,
            &AgentCommand::DeleteInstall {
                store_url,
                path: path.clone(),
                epoch,
            },
            COMMAND_TIMEOUT,
        )
        .await
        .map_err(|e| DomainError::Unavailable(format!("Failed to delete the copy's files: {e}")))?;
    if !answer.ok {
        return Err(DomainError::Unavailable(format!(
            "Failed to delete the copy's files: {}",
            answer.error.unwrap_or_else(|| "no reason given".into())
        )));
    }
    remove_row(state, &copy).await?;
    tracing::info!(template = %id, %zone, %path, "Deleted a copy and its files");
    Ok(Deleted::Everything)
}

async fn remove_row(state: &State, copy: &str) -> Result<(), sqlx::Error> {
    state.dispatched_forget(copy);
    sqlx::query("DELETE FROM template_copies WHERE id = $1")
        .bind(copy.to_owned())
        .execute(&state.db.pool)
        .await
        .map(|_| ())
}

/// After the template's own install was deleted: its first ready copy becomes its own install
/// (zone, store, state, file and epoch move into `templates`). `false` when it has none.
pub async fn promote(state: &State, id: &str) -> Result<bool, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT id, zone_id, store_id, download_percent, status, size, physical_size, installed_file, installed_sha256, agent_id, dispatch_epoch \
         FROM template_copies WHERE template_id = $1 AND download_state = $2 ORDER BY created LIMIT 1",
    )
    .bind(id.to_owned())
    .bind(download_state::DOWNLOADED)
    .fetch_optional(&state.db.pool)
    .await?
    else {
        return Ok(false);
    };
    let copy: String = row.try_get("id")?;
    sqlx::query(
        "UPDATE templates SET zone_id = $1, store_id = $2, download_state = $3, download_percent = $4, status = $5, size = $6, physical_size = $7, \
         installed_file = $8, installed_sha256 = $9, agent_id = $10, dispatch_epoch = CASE WHEN dispatch_epoch > $11 THEN dispatch_epoch ELSE $12 END WHERE id = $13",
    )
    .bind(row.try_get::<String, _>("zone_id")?)
    .bind(row.try_get::<String, _>("store_id")?)
    .bind(download_state::DOWNLOADED)
    .bind(row.try_get::<i64, _>("download_percent")?)
    .bind(row.try_get::<String, _>("status")?)
    .bind(row.try_get::<Option<i64>, _>("size")?)
    .bind(row.try_get::<Option<i64>, _>("physical_size")?)
    .bind(row.try_get::<Option<String>, _>("installed_file")?)
    .bind(row.try_get::<Option<String>, _>("installed_sha256")?)
    .bind(row.try_get::<Option<String>, _>("agent_id")?)
    .bind(row.try_get::<i64, _>("dispatch_epoch")?)
    .bind(row.try_get::<i64, _>("dispatch_epoch")?)
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await?;
    remove_row(state, &copy).await?;
    tracing::info!(template = %id, %copy, "A copy became the template's own install");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_give_host_and_port() {
        assert_eq!(
            host_port("http://10.0.0.5:8090").as_deref(),
            Some("10.0.0.5:8090")
        );
        assert_eq!(
            host_port("https://a-b-c-d.example.org").as_deref(),
            Some("a-b-c-d.example.org:443")
        );
        assert_eq!(host_port("http://h").as_deref(), Some("h:80"));
        assert_eq!(host_port(""), None);
        assert_eq!(host_port("nonsense url"), None);
    }
}
