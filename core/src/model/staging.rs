//! The staging cache (CloudStack's `storage.cache.replacement.*`): a template's or ISO's copy on
//! a staging store (role `ImageCache`) that went unused for `storage.cache.replacement.lru.interval`
//! days is evicted once a verified replica of it is in an object store, and brought back from the
//! object store by the next use (an extract link). With `extract.url.objectstore` an extract
//! link is a presigned S3 URL or a Swift temp URL of a complete replica instead ([`object_link`]).
//!
//! States of `templates.staging`: `Present` → `Evicting` → `Evicted` → `Fetching` → `Present`.
//!
//! Invariants:
//! * only a template with a `Replicated` replica is evicted, only from an `ImageCache` store (an
//!   `addImageStore` NFS store is never a cache), only its own install (not a copy's), and not
//!   while a cross-zone copy of it is under way (its install is the copy's source); an evicted
//!   install is no copy source, and `copyTemplate` brings it back first;
//! * each move is a compare-and-set on the state, so one eviction or one fetch runs at a time and a
//!   use waits for a move in progress rather than racing it;
//! * a failed eviction leaves the copy `Present`, a failed fetch leaves it `Evicted` and says why.

use std::time::{Duration, Instant};

use sqlx::Row as _;
use systemvm_proto::agent::{AgentCommand, FetchObjectCommand};

use crate::model::{DomainError, DomainResult, object_stores, settings, stores, templates};
use crate::state::State;
use crate::util::now_ms;

/// `templates.staging` values.
pub mod state {
    /// The staging copy is there.
    pub const PRESENT: &str = "Present";
    /// It is being removed.
    pub const EVICTING: &str = "Evicting";
    /// It was removed; the object store holds the replica.
    pub const EVICTED: &str = "Evicted";
    /// It is being brought back.
    pub const FETCHING: &str = "Fetching";
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

async fn move_state(state: &State, id: &str, from: &str, to: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE templates SET staging = $1 WHERE id = $2 AND staging = $3")
        .bind(to)
        .bind(id.to_owned())
        .bind(from)
        .execute(&state.db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// Evicts the staging copies unused for the LRU interval (when the setting allows); returns
/// how many went.
pub async fn evict_due(state: &State) -> Result<u64, sqlx::Error> {
    if !settings::text(state, &settings::CACHE_REPLACEMENT)
        .await
        .eq_ignore_ascii_case("true")
    {
        return Ok(0);
    }
    let now = now_ms();
    // First seen installed: its time starts now.
    sqlx::query(
        "UPDATE templates SET last_used_ms = $1 WHERE last_used_ms = 0 AND download_state = 'DOWNLOADED'",
    )
    .bind(now)
    .execute(&state.db.pool)
    .await?;
    let days = i64::try_from(settings::uint(state, &settings::CACHE_REPLACEMENT_LRU).await).unwrap_or(30);
    let cutoff = now.saturating_sub(days.saturating_mul(86_400_000));
    let rows = sqlx::query(
        "SELECT t.id, t.zone_id, t.install_path, st.url AS store_url FROM templates t JOIN image_stores st ON st.id = t.store_id \
         WHERE st.role = 'ImageCache' AND t.removed IS NULL AND t.download_state = 'DOWNLOADED' AND t.staging = $1 AND t.last_used_ms <= $2 \
         AND EXISTS (SELECT 1 FROM replicas r WHERE r.kind = 'template' AND r.artefact_id = t.id AND r.state = 'Replicated') \
         AND NOT EXISTS (SELECT 1 FROM template_copies c WHERE c.template_id = t.id AND c.removed IS NULL AND c.download_state <> 'DOWNLOADED') \
         ORDER BY t.last_used_ms",
    )
    .bind(state::PRESENT)
    .bind(cutoff)
    .fetch_all(&state.db.pool)
    .await?;
    let mut evicted = 0;
    for r in &rows {
        let id: String = r.try_get("id")?;
        let zone: String = r.try_get("zone_id")?;
        let store_url: String = r.try_get("store_url")?;
        let path: String = r.try_get("install_path")?;
        let Some(agent) = stores::connected_storage_vm(state, &zone, &store_url).await? else {
            continue;
        };
        if !move_state(state, &id, state::PRESENT, state::EVICTING).await? {
            continue;
        }
        let epoch = templates::next_epoch(state, &id).await?;
        let cmd = AgentCommand::DeleteInstall {
            store_url,
            path,
            epoch,
        };
        match state.agents.call(&agent, &cmd, COMMAND_TIMEOUT).await {
            Ok(a) if a.ok => {
                move_state(state, &id, state::EVICTING, state::EVICTED).await?;
                tracing::info!(template = %id, "Staging copy evicted (its replica stays)");
                evicted += 1;
            }
            outcome => {
                let why = match outcome {
                    Ok(a) => a.error.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(template = %id, reason = %why, "Staging copy not evicted");
                move_state(state, &id, state::EVICTING, state::PRESENT).await?;
            }
        }
    }
    Ok(evicted)
}

/// Makes sure template `id`'s own staging copy is there before it is used, bringing it back from
/// an object store when it was evicted, and records the use.
pub async fn ensure_staged(state: &State, id: &str) -> DomainResult<()> {
    let wait = Duration::from_secs(settings::uint(state, &settings::REPLICA_WAIT).await);
    let started = Instant::now();
    loop {
        let staging: Option<String> = sqlx::query_scalar("SELECT staging FROM templates WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(&state.db.pool)
            .await?;
        match staging.as_deref() {
            None => return Ok(()),
            Some(state::PRESENT) => {
                sqlx::query("UPDATE templates SET last_used_ms = $1 WHERE id = $2")
                    .bind(now_ms())
                    .bind(id.to_owned())
                    .execute(&state.db.pool)
                    .await?;
                return Ok(());
            }
            Some(state::EVICTED) => {
                if move_state(state, id, state::EVICTED, state::FETCHING).await? {
                    let fetched = fetch_back(state, id, wait).await;
                    let to = if fetched.is_ok() {
                        state::PRESENT
                    } else {
                        state::EVICTED
                    };
                    move_state(state, id, state::FETCHING, to).await?;
                    fetched?;
                    continue;
                }
            }
            Some(_) => {}
        }
        if started.elapsed() > wait {
            return Err(DomainError::Unavailable(format!(
                "The staging copy of template {id} is still being moved; try again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fetch_back(state: &State, id: &str, wait: Duration) -> DomainResult<()> {
    let row = sqlx::query(
        "SELECT r.store_id, r.object_key, r.path, r.sha256, r.zone_id, st.url AS store_url FROM replicas r \
         JOIN templates t ON t.id = r.artefact_id JOIN image_stores st ON st.id = t.store_id \
         WHERE r.kind = 'template' AND r.artefact_id = $1 AND r.state = 'Replicated' ORDER BY r.updated_ms LIMIT 1",
    )
    .bind(id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| DomainError::Unavailable(format!("Template {id} was evicted and no replica of it is complete")))?;
    let zone: String = row.try_get("zone_id")?;
    let store_url: String = row.try_get("store_url")?;
    let Some(agent) = stores::connected_storage_vm(state, &zone, &store_url).await? else {
        return Err(DomainError::Unavailable(format!(
            "No storage VM serving {store_url} is connected to bring template {id} back"
        )));
    };
    let object_store: String = row.try_get("store_id")?;
    let cmd = AgentCommand::FetchObject(FetchObjectCommand {
        store_url,
        path: row.try_get("path")?,
        key: row.try_get("object_key")?,
        sha256: row.try_get("sha256")?,
        target: object_stores::target(state, &object_store).await?,
    });
    match state.agents.call(&agent, &cmd, wait).await {
        Ok(a) if a.ok => {
            tracing::info!(template = %id, "Staging copy brought back from the object store");
            Ok(())
        }
        Ok(a) => Err(DomainError::Unavailable(format!(
            "Template {id} could not be brought back from its object store: {}",
            a.error.unwrap_or_default()
        ))),
        Err(e) => Err(DomainError::Unavailable(format!(
            "Template {id} could not be brought back from its object store: {e}"
        ))),
    }
}

/// After a rebuild brought template `id`'s files back: its copy is present again.
pub async fn restored(state: &State, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE templates SET staging = $1, last_used_ms = $2 WHERE id = $3")
        .bind(state::PRESENT)
        .bind(now_ms())
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// With `extract.url.objectstore` true in the zone: a link that GETs the install's complete
/// replica straight from an object store that is Up (a presigned S3 URL or a Swift temp URL, valid
/// `extract.url.expiration.interval` seconds), made by a storage VM of the zone. `None` when the
/// setting is off or no such replica or storage VM is there (the staging store serves it then).
pub async fn object_link(
    state: &State,
    is_copy: bool,
    install: &str,
    zone: &str,
) -> DomainResult<Option<String>> {
    if !settings::zone_text(state, zone, &settings::EXTRACT_FROM_OBJECT_STORE)
        .await
        .eq_ignore_ascii_case("true")
    {
        return Ok(None);
    }
    let kind = if is_copy { "copy" } else { "template" };
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT r.store_id, r.object_key FROM replicas r JOIN object_stores o ON o.id = r.store_id \
         WHERE r.kind = $1 AND r.artefact_id = $2 AND r.state = 'Replicated' AND o.health = 'Up' ORDER BY o.created, o.name LIMIT 1",
    )
    .bind(kind)
    .bind(install.to_owned())
    .fetch_optional(&state.db.pool)
    .await?;
    let Some((store_id, key)) = row else {
        return Ok(None);
    };
    let agents = stores::storage_agents(state).await?;
    let Some(agent) = agents
        .iter()
        .filter(|a| a.zone_id == zone)
        .find(|a| state.agents.connection(&a.id).is_some())
    else {
        return Ok(None);
    };
    let cmd = AgentCommand::PresignObject {
        target: object_stores::target(state, &store_id).await?,
        key,
        expires_secs: settings::uint(state, &settings::EXTRACT_URL_EXPIRATION).await,
    };
    match state.agents.call(&agent.id, &cmd, COMMAND_TIMEOUT).await {
        Ok(a) if a.ok => Ok(a.body["url"].as_str().map(str::to_owned)),
        Ok(a) => {
            tracing::warn!(store = %store_id, reason = %a.error.unwrap_or_default(), "No object-store link; the staging store serves it");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(store = %store_id, error = %e, "No object-store link; the staging store serves it");
            Ok(None)
        }
    }
}
