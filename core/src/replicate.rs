//! The replicator (a background part, on the lease holder): keeps each zone's object stores in
//! step with its staging stores. It records a replica for every installed artefact
//! ([`replicas::reconcile`]), hands due ones to the storage VM serving the artefact's staging
//! store (`replicate`), removes the objects of artefacts that went (`deleteObject`), probes
//! each object store's health, and every `storage.cache.replacement.interval` evicts the staging
//! copies unused for the LRU interval ([`staging::evict_due`]).
//!
//! Invariants: at most `objectstore.replication.concurrency` replicas and removals are in flight,
//! each row at most once (the in-flight set is this task's, so a row `Replicating` that no task
//! here owns, after a restart or a change of lease holder, is sent again: the storage VM resumes
//! from its journal); the outcome written is the storage VM's answer, never a guess; the object
//! store's credentials go only into the command, never into a log line or a stored error.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use systemvm_proto::agent::{AgentCommand, ReplicateCommand, Replicated};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::model::replicas::{self, Replica};
use crate::model::{object_stores, settings, staging, stores};
use crate::state::State;

/// How often the replicator looks for work.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How often each object store is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a probe or a removal may take.
const SHORT_TIMEOUT: Duration = Duration::from_secs(60);
/// How soon a replica waiting for a storage VM is looked at again.
const WAIT_RETRY: Duration = Duration::from_secs(5);

type InFlight = Arc<Mutex<HashSet<[String; 3]>>>;

fn key(r: &Replica) -> [String; 3] {
    [r.store_id.clone(), r.kind.clone(), r.artefact_id.clone()]
}

fn flight(set: &InFlight) -> std::sync::MutexGuard<'_, HashSet<[String; 3]>> {
    set.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Replicates, removes and probes every [`INTERVAL`] until `stop`; the copies in flight end
/// with it (their storage VMs keep the journals).
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight: InFlight = Arc::default();
    let mut tasks = JoinSet::new();
    let mut probed: HashMap<String, Instant> = HashMap::new();
    let mut evicted_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = stop.changed() => return,
        }
        if !state.is_leader() {
            continue;
        }
        if let Err(error) = step(&state, &in_flight, &mut tasks, &mut probed).await {
            tracing::warn!(%error, "Replicator failed to read the database");
        }
        let every = Duration::from_secs(settings::uint(&state, &settings::CACHE_REPLACEMENT_INTERVAL).await);
        if evicted_at.is_none_or(|t| t.elapsed() >= every) {
            evicted_at = Some(Instant::now());
            match staging::evict_due(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(evicted = n, "Staging copies evicted"),
                Err(error) => tracing::warn!(%error, "Staging eviction failed to read the database"),
            }
        }
    }
}

async fn step(
    state: &State,
    in_flight: &InFlight,
    tasks: &mut JoinSet<()>,
    probed: &mut HashMap<String, Instant>,
) -> Result<(), sqlx::Error> {
    let added = replicas::reconcile(state).await?;
    if added > 0 {
        tracing::info!(added, "New artefacts to replicate to object stores");
    }
    for store in object_stores::list(state).await? {
        if probed
            .get(&store.id)
            .is_some_and(|t| t.elapsed() < PROBE_INTERVAL)
        {
            continue;
        }
        let Some(agent) = any_storage_vm(state, &store.zone_id).await? else {
            continue;
        };
        probed.insert(store.id.clone(), Instant::now());
        let st = state.clone();
        tasks.spawn(async move { probe(&st, &store.id, &agent).await });
    }
    let limit = i64::try_from(settings::uint(state, &settings::REPLICA_CONCURRENCY).await).unwrap_or(2);
    let busy = i64::try_from(flight(in_flight).len()).unwrap_or(i64::MAX);
    if busy >= limit {
        return Ok(());
    }
    // Read more than the free slots: some due rows are in flight here already.
    for r in replicas::due(state, limit + busy + 16).await? {
        if i64::try_from(flight(in_flight).len()).unwrap_or(i64::MAX) >= limit {
            break;
        }
        if !flight(in_flight).insert(key(&r)) {
            continue;
        }
        let st = state.clone();
        let set = in_flight.clone();
        tasks.spawn(async move {
            let k = key(&r);
            if let Err(error) = work(&st, &r).await {
                tracing::warn!(%error, key = %r.key, "Replica bookkeeping failed");
            }
            flight(&set).remove(&k);
        });
    }
    Ok(())
}

/// A storage VM of `zone` connected to this core.
async fn any_storage_vm(state: &State, zone: &str) -> Result<Option<String>, sqlx::Error> {
    Ok(stores::storage_agents(state)
        .await?
        .into_iter()
        .filter(|a| a.zone_id == zone)
        .find(|a| state.agents.connection(&a.id).is_some())
        .map(|a| a.id))
}

async fn probe(state: &State, store_id: &str, agent: &str) {
    let target = match object_stores::target(state, store_id).await {
        Ok(t) => t,
        Err(error) => {
            tracing::warn!(store = store_id, %error, "Object store not probed");
            return;
        }
    };
    let cmd = AgentCommand::ProbeObjectStore { target };
    let outcome = match state.agents.call(agent, &cmd, SHORT_TIMEOUT).await {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(a.error.unwrap_or_else(|| "refused by the storage VM".into())),
        // Not the store's fault: no verdict.
        Err(error) => {
            tracing::debug!(store = store_id, %error, "Probe not delivered");
            return;
        }
    };
    if let Err(why) = &outcome {
        tracing::warn!(store = store_id, reason = %why, "Object store is down");
    }
    if let Err(error) = object_stores::set_health(
        state,
        store_id,
        outcome.as_ref().map(|_| ()).map_err(String::as_str),
    )
    .await
    {
        tracing::warn!(%error, "Object store health not recorded");
    }
}

async fn work(state: &State, r: &Replica) -> Result<(), sqlx::Error> {
    if r.state == replicas::state::DELETING {
        return remove(state, r).await;
    }
    let Some(agent) = stores::connected_storage_vm(state, &r.zone_id, &r.source_url).await? else {
        let why = format!("Waiting for a storage VM serving {}", r.source_url);
        return replicas::waiting(state, r, &why, WAIT_RETRY).await;
    };
    let target = match object_stores::target(state, &r.store_id).await {
        Ok(t) => t,
        Err(crate::model::DomainError::Db(e)) => return Err(e),
        Err(error) => {
            tracing::warn!(store = %r.store_id, %error, "Object store unusable");
            return replicas::waiting(
                state,
                r,
                "The object store's credentials cannot be opened",
                SHORT_TIMEOUT,
            )
            .await;
        }
    };
    if !replicas::sending(state, r).await? {
        return Ok(());
    }
    let cmd = AgentCommand::Replicate(ReplicateCommand {
        store_url: r.source_url.clone(),
        path: r.path.clone(),
        sha256: r.sha256.clone(),
        key: r.key.clone(),
        target,
    });
    let timeout = Duration::from_secs(settings::uint(state, &settings::REPLICA_WAIT).await);
    tracing::info!(key = %r.key, store = %r.store_id, agent = %agent, "Replicating to an object store");
    let outcome = match state.agents.call(&agent, &cmd, timeout).await {
        Ok(a) if a.ok => serde_json::from_value::<Replicated>(a.body)
            .map_err(|e| format!("the storage VM's answer is unreadable: {e}")),
        Ok(a) => Err(a.error.unwrap_or_else(|| "refused by the storage VM".into())),
        Err(e) => Err(format!("storage VM {agent}: {e}")),
    };
    match outcome {
        Ok(done) => {
            tracing::info!(key = %done.key, parts = done.parts, resumed = done.resumed_parts, "Replica complete");
            replicas::replicated(state, r, done.size, done.parts).await?;
            object_stores::set_health(state, &r.store_id, Ok(())).await?;
        }
        Err(why) => {
            tracing::warn!(key = %r.key, reason = %why, attempt = r.attempts + 1, "Replica failed; will retry");
            replicas::failed(state, r, &why).await?;
        }
    }
    Ok(())
}

async fn remove(state: &State, r: &Replica) -> Result<(), sqlx::Error> {
    let Some(agent) = any_storage_vm(state, &r.zone_id).await? else {
        return replicas::waiting(
            state,
            r,
            "Waiting for a storage VM to remove the object",
            WAIT_RETRY,
        )
        .await;
    };
    let target = match object_stores::target(state, &r.store_id).await {
        Ok(t) => t,
        Err(crate::model::DomainError::Db(e)) => return Err(e),
        Err(error) => {
            tracing::warn!(store = %r.store_id, %error, "Object store unusable");
            return replicas::delete_failed(state, r, "The object store's credentials cannot be opened")
                .await;
        }
    };
    let cmd = AgentCommand::DeleteObject {
        target,
        key: r.key.clone(),
    };
    match state.agents.call(&agent, &cmd, SHORT_TIMEOUT).await {
        Ok(a) if a.ok => {
            tracing::info!(key = %r.key, store = %r.store_id, "Replica removed");
            replicas::removed(state, r).await
        }
        Ok(a) => {
            let why = a.error.unwrap_or_else(|| "refused by the storage VM".into());
            replicas::delete_failed(state, r, &why).await
        }
        Err(e) => replicas::delete_failed(state, r, &format!("storage VM {agent}: {e}")).await,
    }
}
