//! Rebuilding a staging store from an object store (disaster recovery): after a zone's NFS store
//! was lost or replaced by an empty export, every artefact replicated from it (templates and ISOs
//! with their `template.properties`, copies, snapshot images) is brought back by a storage VM
//! serving the store, each verified against its recorded SHA-256 before it takes its place.
//!
//! Invariants: only `Replicated` replicas are read (their objects were verified when written);
//! records are not changed (a template stays what it was, now with its files back); one failed
//! artefact does not stop the others, and the answer names each failure with its reason.

use std::time::Duration;

use systemvm_proto::agent::{AgentCommand, FetchObjectCommand, Fetched};

use crate::model::{DomainError, DomainResult, object_stores, replicas, settings, stores};
use crate::state::State;

/// What a rebuild did.
#[derive(Debug, Clone, Default)]
pub struct Rebuilt {
    /// The staging store.
    pub store_id: String,
    /// The object store it was rebuilt from.
    pub object_store_id: String,
    /// Artefacts restored.
    pub restored: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files restored beside them (`template.properties`).
    pub companions: u64,
    /// `(key, reason)` of each artefact not restored.
    pub failed: Vec<(String, String)>,
}

/// Rebuilds staging store `store_id` from `object_store_id` (default: the object store of the
/// store's zone that holds most of its artefacts).
pub async fn rebuild(state: &State, store_id: &str, object_store_id: Option<&str>) -> DomainResult<Rebuilt> {
    let row: Option<(String, String)> = sqlx::query_as("SELECT url, zone_id FROM image_stores WHERE id = $1")
        .bind(store_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?;
    let (url, zone) =
        row.ok_or_else(|| DomainError::NotFound(format!("Unable to find image store by id {store_id}")))?;
    let objects = object_stores::list(state).await?;
    let source = match object_store_id {
        Some(id) => objects
            .into_iter()
            .find(|o| o.id == id)
            .ok_or_else(|| DomainError::NotFound(format!("Unable to find object store by id {id}")))?,
        // The zone's object store holding most of this store's artefacts.
        None => {
            let mut best: Option<(usize, object_stores::ObjectStore)> = None;
            for o in objects.into_iter().filter(|o| o.zone_id == zone) {
                let n = replicas::replicated_in(state, &o.id)
                    .await?
                    .iter()
                    .filter(|r| stores::same_store(&r.source_url, &url))
                    .count();
                if best.as_ref().is_none_or(|(m, _)| n > *m) {
                    best = Some((n, o));
                }
            }
            best.map(|(_, o)| o).ok_or_else(|| {
                DomainError::Invalid(format!("The zone of image store {store_id} has no object store"))
            })?
        }
    };
    if source.zone_id != zone {
        return Err(DomainError::Invalid(format!(
            "Object store {} is in another zone than image store {store_id}",
            source.id
        )));
    }
    let Some(agent) = stores::connected_storage_vm(state, &zone, &url).await? else {
        return Err(DomainError::Unavailable(format!(
            "No storage VM serving image store {store_id} is connected"
        )));
    };
    let target = object_stores::target(state, &source.id).await?;
    let timeout = Duration::from_secs(settings::uint(state, &settings::REPLICA_WAIT).await);
    let mut done = Rebuilt {
        store_id: store_id.to_owned(),
        object_store_id: source.id.clone(),
        ..Rebuilt::default()
    };
    let wanted: Vec<replicas::Replica> = replicas::replicated_in(state, &source.id)
        .await?
        .into_iter()
        .filter(|r| stores::same_store(&r.source_url, &url))
        .collect();
    tracing::info!(store = store_id, object_store = %source.id, artefacts = wanted.len(), "Rebuilding a staging store");
    for r in wanted {
        let cmd = AgentCommand::FetchObject(FetchObjectCommand {
            store_url: url.clone(),
            path: r.path.clone(),
            key: r.key.clone(),
            sha256: r.sha256.clone(),
            target: target.clone(),
        });
        let outcome = match state.agents.call(&agent, &cmd, timeout).await {
            Ok(a) if a.ok => serde_json::from_value::<Fetched>(a.body)
                .map_err(|e| format!("the storage VM's answer is unreadable: {e}")),
            Ok(a) => Err(a.error.unwrap_or_else(|| "refused by the storage VM".into())),
            Err(e) => Err(format!("storage VM {agent}: {e}")),
        };
        match outcome {
            Ok(f) => {
                if r.kind == replicas::kind::TEMPLATE {
                    crate::model::staging::restored(state, &r.artefact_id).await?;
                }
                done.restored += 1;
                done.bytes += f.size;
                done.companions += f.companions.len() as u64;
            }
            Err(why) => {
                tracing::warn!(key = %r.key, reason = %why, "Artefact not restored");
                done.failed.push((r.key.clone(), why));
            }
        }
    }
    tracing::info!(
        store = store_id,
        restored = done.restored,
        failed = done.failed.len(),
        "Staging store rebuilt"
    );
    Ok(done)
}
