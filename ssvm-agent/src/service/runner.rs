//! The job runner: [`Agent`] runs download jobs as tasks, at most `concurrent` at once (slots),
//! journals them, cancels them, and reports their progress and the store's load.
//!
//! Invariants:
//! * a job id names one job: a submission with a known id and the same spec answers the existing
//!   job (idempotent), with another spec it is refused; a new job is journalled before it runs;
//! * a job waits for a slot; cancelling it while it waits ends it as cancelled without a
//!   download; every job leaves the running set when its task ends;
//! * jobs of another store are never resumed: they are failed with the reason;
//! * core's settings ([`Agent::apply_core_config`]) apply to jobs that start afterwards: a job takes
//!   the size cap and the allow-list of its literal-IP check when it gets a slot, and the client's
//!   resolver and redirect checks read the same list (so at a job's start both checks agree; later
//!   connections of a running job resolve names against the newest list).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::download::{Downloader, LiveProgress};
use crate::fetch::AllowList;
use crate::job::{DownloadSpec, JobRecord, JobState, derived_job_id, valid_job_id};
use crate::settings::{self, DownloadPolicy};

/// A job submission: the job id (optional) and the download's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submit {
    /// Job id chosen by the caller (core); derived from the spec when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Source URL (http or https).
    pub url: String,
    /// Install directory, e.g. `template/tmpl/2/201`.
    pub path: String,
    /// Declared format (QCOW2, RAW, VHD, ISO, OVA).
    pub format: String,
    /// Expected checksum, `{ALGO}hex`.
    #[serde(default)]
    pub checksum: Option<String>,
    /// Description for `template.properties`.
    #[serde(default)]
    pub description: String,
    /// Fencing epoch (core's `DownloadCommand::epoch`); 0 = not fenced.
    #[serde(default)]
    pub epoch: u64,
    /// A copy from another storage VM (core's `DownloadCommand::peer`; never from the local API).
    #[serde(skip)]
    pub peer: Option<systemvm_proto::agent::PeerSource>,
}

impl Submit {
    fn into_parts(self) -> (Option<String>, DownloadSpec, u64) {
        let Submit {
            id,
            url,
            path,
            format,
            checksum,
            description,
            epoch,
            peer,
        } = self;
        (
            id,
            DownloadSpec {
                url,
                path,
                format,
                checksum,
                description,
                upload: false,
                resumable: false,
                expires: 0,
                peer,
            },
            epoch,
        )
    }
}

struct Running {
    live: Arc<LiveProgress>,
    cancel: CancellationToken,
    /// The install directory (trimmed), to fence the job when its install is deleted.
    dir: String,
}

/// The agent service: the downloader and the jobs it runs.
pub struct Agent {
    /// The downloader as configured on the command line (its size cap and allow-list are the base
    /// core's settings apply over).
    downloader: Downloader,
    /// The allow-list the downloader's client reads, when it reads one.
    allow: Option<AllowList>,
    /// The size cap and allow-list jobs start with now.
    policy: Mutex<DownloadPolicy>,
    running: Mutex<HashMap<String, Running>>,
    /// Held while a submission looks a job up and starts it, and while a job leaves the running
    /// set: one job per id however many submissions race.
    submit_lock: tokio::sync::Mutex<()>,
    slots: Arc<Semaphore>,
    concurrent: usize,
    /// Jobs that began outside a submission (uploads), for core's progress watcher.
    started: tokio::sync::broadcast::Sender<JobRecord>,
    /// One-shot uploads a restart ended (failed at start), for core to hear of.
    interrupted: Mutex<Vec<JobRecord>>,
}

/// Store state as the API reports it.
#[derive(Serialize)]
pub(super) struct CapacityReport {
    store: String,
    health: crate::store::Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity: Option<crate::store::Capacity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    jobs_running: usize,
    jobs_queued: usize,
}

impl Agent {
    /// An agent running at most `concurrent` jobs at once, whose client has a fixed allow-list:
    /// core's allow-list setting cannot apply (it is ignored with a warning), its size cap can.
    pub fn new(downloader: Downloader, concurrent: usize) -> Arc<Self> {
        Self::build(downloader, None, concurrent)
    }

    /// An agent whose downloader's client reads `allow` ([`crate::fetch::client_with_allow_list`]),
    /// so core's allow-list setting applies to it. `allow` starts as `downloader.allow_internal`.
    pub fn with_allow_list(downloader: Downloader, allow: AllowList, concurrent: usize) -> Arc<Self> {
        allow.set(downloader.allow_internal.to_vec());
        Self::build(downloader, Some(allow), concurrent)
    }

    fn build(downloader: Downloader, allow: Option<AllowList>, concurrent: usize) -> Arc<Self> {
        let policy = DownloadPolicy {
            allow_internal: downloader.allow_internal.to_vec(),
            max_size: downloader.settings.max_size,
        };
        Arc::new(Agent {
            downloader,
            allow,
            policy: Mutex::new(policy),
            running: Mutex::new(HashMap::new()),
            submit_lock: tokio::sync::Mutex::new(()),
            slots: Arc::new(Semaphore::new(concurrent.max(1))),
            concurrent: concurrent.max(1),
            started: tokio::sync::broadcast::channel(64).0,
            interrupted: Mutex::new(Vec::new()),
        })
    }

    /// Applies core's settings for this agent (the full map from `Welcome` or `ConfigUpdate`, see
    /// [`crate::settings`]) to the jobs that start afterwards; keys absent from `config` go back to
    /// the command-line values. Settings that cannot be used are logged and skipped.
    pub fn apply_core_config(&self, config: &BTreeMap<String, String>) {
        let base = DownloadPolicy {
            allow_internal: self.downloader.allow_internal.to_vec(),
            max_size: self.downloader.settings.max_size,
        };
        let (mut policy, errors) = settings::resolve(&base, config);
        for error in &errors {
            warn!(%error, "Setting from core not applied");
        }
        let mut current = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        match &self.allow {
            Some(list) => list.set(policy.allow_internal.clone()),
            None if policy.allow_internal != base.allow_internal => {
                warn!(
                    "This agent's HTTP client has a fixed allow-list: the internal sites from core are ignored"
                );
                policy.allow_internal = base.allow_internal;
            }
            None => {}
        }
        if *current != policy {
            info!(
                allow_internal = ?policy.allow_internal,
                max_size = policy.max_size,
                "Download settings changed"
            );
            *current = policy;
        }
    }

    /// The size cap and allow-list a job starting now gets.
    pub fn download_policy(&self) -> DownloadPolicy {
        self.policy.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The downloader for a job starting now: the command-line one with the current policy.
    fn job_downloader(&self) -> Downloader {
        let policy = self.download_policy();
        let mut downloader = self.downloader.clone();
        downloader.allow_internal = Arc::new(policy.allow_internal);
        downloader.settings.max_size = policy.max_size;
        downloader
    }

    /// Removes orphaned partial downloads, then resumes every job the journal has as queued or
    /// running (the agent was stopped mid-job).
    pub async fn resume_all(self: &Arc<Self>) -> anyhow::Result<usize> {
        let mut n = 0;
        let store = self.downloader.store.url().to_string();
        let records = self.downloader.journal.load_all().await?;
        match self.sweep_orphans(&records).await {
            Ok(removed) if !removed.is_empty() => {
                info!(files = ?removed, "Removed partial downloads of abandoned jobs");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "Sweep of abandoned partial downloads failed"),
        }
        for mut record in records.into_values() {
            if !record.state.is_final() && record.store != store {
                warn!(job.id = %record.id, job.store = %record.store, "Job belongs to another store, not resuming");
                record.state = JobState::Failed;
                record.error = Some(format!("agent restarted on another store ({store})"));
                self.downloader.journal.save(&record).await?;
                continue;
            }
            if !record.state.is_final() && record.spec.upload && !record.spec.resumable {
                // A one-shot upload cannot resume: it failed with the restart.
                warn!(job.id = %record.id, "One-shot upload interrupted by a restart; failing it");
                record.state = JobState::Failed;
                record.error = Some(
                    "the storage VM restarted during the upload; upload again with new parameters (or resumably, with tus)".into(),
                );
                self.downloader.discard_part(&mut record).await;
                self.downloader.journal.save(&record).await?;
                self.interrupted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(record);
                continue;
            }
            if !record.state.is_final() && record.spec.upload {
                // An upload resumes when its client comes back (`crate::upload`).
                info!(job.id = %record.id, offset = record.durable_offset, "Upload waits for its client to resume");
                continue;
            }
            if !record.state.is_final() {
                info!(job.id = %record.id, "Resuming job from the journal");
                self.spawn(record);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes the `.part` files of abandoned jobs from the install directories: those no queued
    /// or running job has (in this agent's journal, or in any agent's journal kept on the store).
    /// Only `.part` files go: never an installed image, `template.properties` or a directory.
    /// Returns the paths removed.
    pub async fn sweep_orphans(&self, own: &BTreeMap<String, JobRecord>) -> anyhow::Result<Vec<String>> {
        let store = &self.downloader.store;
        let mut live: HashSet<String> = HashSet::new();
        let mut add = |r: &JobRecord| {
            if !r.state.is_final() && !r.file_name.is_empty() {
                live.insert(format!("{}/{}.part", r.spec.path.trim_matches('/'), r.file_name));
            }
        };
        own.values().for_each(&mut add);
        for r in crate::job::records_on_store(store).await? {
            add(&r);
        }
        // Jobs running in this process right now keep their files too.
        let running: Vec<String> = self.running().values().map(|r| r.dir.clone()).collect();
        let root = crate::inventory::TEMPLATE_ROOT;
        let accounts = match store.list_dir(root).await {
            Ok(a) => a,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut removed = Vec::new();
        for account in accounts.into_iter().filter(|e| e.is_dir) {
            let account_dir = format!("{root}/{}", account.name);
            for install in store
                .list_dir(&account_dir)
                .await?
                .into_iter()
                .filter(|e| e.is_dir)
            {
                let dir = format!("{account_dir}/{}", install.name);
                if running.contains(&dir) {
                    continue;
                }
                let entries = match store.list_dir(&dir).await {
                    Ok(e) => e,
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e.into()),
                };
                for entry in entries {
                    let path = format!("{dir}/{}", entry.name);
                    // INVARIANT: only partial downloads; a completed install has none.
                    if entry.is_dir || !entry.name.ends_with(".part") || live.contains(&path) {
                        continue;
                    }
                    match store.remove_file(&path).await {
                        Ok(()) => removed.push(path),
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(removed)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a job in the running set: its live progress and its cancellation.
    fn enter_running(&self, record: &JobRecord) -> (Arc<LiveProgress>, CancellationToken) {
        let live = Arc::new(LiveProgress::default());
        live.epoch
            .store(record.epoch, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.running().insert(
            record.id.clone(),
            Running {
                live: live.clone(),
                cancel: cancel.clone(),
                dir: record.spec.path.trim_matches('/').to_owned(),
            },
        );
        (live, cancel)
    }

    fn spawn(self: &Arc<Self>, mut record: JobRecord) {
        let (live, cancel) = self.enter_running(&record);
        let agent = self.clone();
        tokio::spawn(async move {
            let permit = tokio::select! {
                p = agent.slots.clone().acquire_owned() => p.ok(),
                _ = cancel.cancelled() => None,
            };
            if permit.is_some() {
                agent.job_downloader().run(&mut record, &live, &cancel).await;
            } else {
                record.state = JobState::Cancelled;
                record.error = Some("cancelled before it started".into());
                if live.fenced.load(std::sync::atomic::Ordering::Relaxed) {
                    record.state = JobState::Failed;
                    record.error = Some(crate::fence::FENCED.into());
                }
                let _ = agent.downloader.journal.save(&record).await;
            }
            drop(permit);
            let _serial = agent.submit_lock.lock().await;
            agent.running().remove(&record.id);
            // A submission may have raised the epoch after the job's last save.
            let epoch = live.epoch.load(std::sync::atomic::Ordering::Relaxed);
            if epoch > record.epoch {
                record.epoch = epoch;
                let _ = agent.downloader.journal.save(&record).await;
            }
        });
    }

    /// The downloader's store, journal and pipeline with the current size cap.
    pub(crate) fn downloader_now(&self) -> Downloader {
        self.job_downloader()
    }

    /// Serialises looking a job id up and starting its job (see [`Agent::submit`]).
    pub(crate) async fn serial(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.submit_lock.lock().await
    }

    /// Registers a job driven from outside the runner (an upload request) as running: deletes of
    /// its install fence it, and its live progress is reported. Tells core's progress watcher.
    pub(crate) fn track(&self, record: &JobRecord) -> (Arc<LiveProgress>, CancellationToken) {
        let entered = self.enter_running(record);
        let _ = self.started.send(record.clone());
        entered
    }

    /// Whether a request is driving the job now.
    pub(crate) fn is_tracked(&self, id: &str) -> bool {
        self.running().contains_key(id)
    }

    /// Tells core's progress watcher about a job that changed outside a submission (an upload
    /// that ended without a request, e.g. expired).
    pub(crate) fn announce(&self, record: &JobRecord) {
        let _ = self.started.send(record.clone());
    }

    /// The job is no longer driven (the request ended).
    pub(crate) fn untrack(&self, id: &str) {
        self.running().remove(id);
    }

    /// One-shot uploads the last restart ended, once (core's link reports them).
    pub fn take_interrupted(&self) -> Vec<JobRecord> {
        std::mem::take(&mut *self.interrupted.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Jobs that begin outside a submission (uploads), as they begin.
    pub fn subscribe_started(&self) -> tokio::sync::broadcast::Receiver<JobRecord> {
        self.started.subscribe()
    }

    /// Submits a job (idempotent by id). A known job submitted with a higher epoch adopts it.
    pub async fn submit(
        self: &Arc<Self>,
        submit: Submit,
    ) -> Result<(StatusCode, JobRecord), (StatusCode, String)> {
        let (id, spec, epoch) = submit.into_parts();
        spec.validate()
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e:#}")))?;
        let store = self.downloader.store.url().to_string();
        let id = id.unwrap_or_else(|| derived_job_id(&store, &spec));
        if !valid_job_id(&id) {
            return Err((StatusCode::BAD_REQUEST, format!("invalid job id {id:?}")));
        }
        let internal = |e: anyhow::Error| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        // INVARIANT: looking the id up and starting its job happen under one lock.
        let _serial = self.submit_lock.lock().await;
        match self.downloader.journal.load(&id).await {
            Ok(Some(mut existing)) if existing.spec.same_job(&spec) => {
                if existing.spec != spec {
                    self.adopt_source(&mut existing, spec).await.map_err(internal)?;
                }
                self.adopt_epoch(&mut existing, epoch).await.map_err(internal)?;
                return Ok((StatusCode::OK, self.with_live(existing)));
            }
            Ok(Some(_)) => {
                return Err((
                    StatusCode::CONFLICT,
                    format!("job {id} exists with another specification"),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(internal(e)),
        }
        let mut record = JobRecord::new(&id, spec, &store);
        record.epoch = epoch;
        self.downloader.journal.save(&record).await.map_err(internal)?;
        info!(job.id = %id, url = %record.spec.url, epoch, "Job submitted");
        self.spawn(record.clone());
        Ok((StatusCode::CREATED, record))
    }

    /// A known copy was submitted again with a fresh source (link): a running job takes it at
    /// its next attempt, one that is not running has it journalled.
    async fn adopt_source(&self, existing: &mut JobRecord, spec: DownloadSpec) -> anyhow::Result<()> {
        let Some(peer) = spec.peer.clone() else {
            return Ok(());
        };
        let live = self.running().get(&existing.id).map(|r| r.live.clone());
        match live {
            Some(live) => {
                *live.source.lock().unwrap_or_else(PoisonError::into_inner) = Some((spec.url, peer));
            }
            None if !existing.state.is_final() => {
                existing.spec = spec;
                self.downloader.journal.save(existing).await?;
            }
            None => {}
        }
        Ok(())
    }

    /// A known job was submitted again with `epoch`: a higher one becomes the job's (the running
    /// job records it beside the install at once, so older runs elsewhere are fenced).
    async fn adopt_epoch(&self, existing: &mut JobRecord, epoch: u64) -> anyhow::Result<()> {
        let live = self.running().get(&existing.id).map(|r| r.live.clone());
        match live {
            Some(live) => {
                let before = live.epoch.fetch_max(epoch, std::sync::atomic::Ordering::Relaxed);
                if epoch > before && existing.epoch_recorded {
                    let dir = existing.spec.path.trim_matches('/');
                    if let Err(error) = crate::fence::record(&self.downloader.store, dir, epoch).await {
                        warn!(job.id = %existing.id, %error, "Failed to record the adopted epoch; the job records it at its next checkpoint");
                    }
                }
                if epoch > before {
                    info!(job.id = %existing.id, epoch, "Running job adopts a newer epoch");
                }
            }
            None if epoch > existing.epoch => {
                existing.epoch = epoch;
                self.downloader.journal.save(existing).await?;
            }
            None => {}
        }
        Ok(())
    }

    /// A record with the live byte count and epoch of a running job.
    fn with_live(&self, mut record: JobRecord) -> JobRecord {
        if let Some(r) = self.running().get(&record.id) {
            let bytes = r.live.bytes.load(std::sync::atomic::Ordering::Relaxed);
            let total = r.live.total.load(std::sync::atomic::Ordering::Relaxed);
            record.epoch = record
                .epoch
                .max(r.live.epoch.load(std::sync::atomic::Ordering::Relaxed));
            record.progress.bytes = bytes.max(record.progress.bytes);
            record.progress.rate = r.live.rate.load(std::sync::atomic::Ordering::Relaxed);
            if total > 0 {
                record.progress.total = Some(total);
                record.progress.percent =
                    Some((record.progress.bytes as f64 * 100.0 / total as f64).min(100.0));
            }
        }
        record
    }

    /// One job.
    pub async fn status(&self, id: &str) -> anyhow::Result<Option<JobRecord>> {
        Ok(self.downloader.journal.load(id).await?.map(|r| self.with_live(r)))
    }

    /// Every job.
    pub async fn list(&self) -> anyhow::Result<Vec<JobRecord>> {
        Ok(self
            .downloader
            .journal
            .load_all()
            .await?
            .into_values()
            .map(|r| self.with_live(r))
            .collect())
    }

    /// Cancels a job; `false` when it is not running.
    pub fn cancel(&self, id: &str) -> bool {
        self.running().get(id).map(|r| r.cancel.cancel()).is_some()
    }

    /// Jobs and store state as the agent channel reports them to core (`Heartbeat.load.storage`).
    pub async fn storage_load(&self) -> systemvm_proto::agent::StorageLoad {
        let r = self.capacity().await;
        let store_health = match (&r.health, &r.error) {
            (crate::store::Health::Healthy, None) => "ok".to_owned(),
            (crate::store::Health::Healthy, Some(e)) => e.clone(),
            (crate::store::Health::Unhealthy { error, .. }, _) => error.clone(),
        };
        systemvm_proto::agent::StorageLoad {
            jobs_running: r.jobs_running as u64,
            jobs_queued: r.jobs_queued as u64,
            store_health,
            capacity_total: r.capacity.as_ref().map(|c| c.total),
            capacity_used: r.capacity.as_ref().map(|c| c.used),
            store_url: Some(r.store),
        }
    }

    /// The store this agent serves.
    pub fn store_url(&self) -> &crate::store::StoreUrl {
        self.downloader.store.url()
    }

    /// Removes an installed template or ISO: the files of its install directory, then the
    /// directory. Returns the names removed; a missing directory removes nothing.
    ///
    /// With an `epoch` (core's, higher than any download of the install was sent with), the
    /// downloads of this agent into the directory under a lower epoch are stopped (fenced), and the
    /// epoch is recorded in the directory before anything is removed, so a run elsewhere stops at
    /// its next check instead of bringing the files back; epoch 0 fences nothing.
    pub async fn delete_install(&self, path: &str, epoch: u64) -> anyhow::Result<Vec<String>> {
        crate::job::install_ids(path)?;
        let dir = path.trim_matches('/');
        let store = &self.downloader.store;
        if epoch > 0 {
            let fenced: Vec<String> = self
                .running()
                .iter()
                .filter(|(_, r)| {
                    r.dir == dir && r.live.epoch.load(std::sync::atomic::Ordering::Relaxed) < epoch
                })
                .map(|(id, r)| {
                    r.live.fenced.store(true, std::sync::atomic::Ordering::Relaxed);
                    r.cancel.cancel();
                    id.clone()
                })
                .collect();
            match crate::fence::record(store, dir, epoch).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => return Ok(Vec::new()),
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("failed to record epoch {epoch} in {dir}"))
                    );
                }
            }
            // Let the fenced jobs of this agent stop (they remove their own partial files).
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while fenced.iter().any(|id| self.running().contains_key(id))
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if !fenced.is_empty() {
                info!(path = dir, jobs = ?fenced, epoch, "Downloads into a deleted install fenced");
            }
        }
        let mut removed = Vec::new();
        // A run elsewhere may still add a file before it sees the epoch: a few rounds.
        for round in 0..3 {
            let entries = match store.list_dir(dir).await {
                Ok(e) => e,
                Err(e) if e.is_not_found() => return Ok(removed),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("failed to list {dir}"))),
            };
            for e in entries {
                anyhow::ensure!(
                    !e.is_dir,
                    "{dir}/{} is a directory: not an install this agent made",
                    e.name
                );
                match store.remove_file(&format!("{dir}/{}", e.name)).await {
                    Ok(()) => {
                        if !crate::fence::is_fence_file(&e.name) {
                            removed.push(e.name);
                        }
                    }
                    Err(err) if err.is_not_found() => {}
                    Err(err) => {
                        return Err(
                            anyhow::Error::new(err).context(format!("failed to remove {dir}/{}", e.name))
                        );
                    }
                }
            }
            match store.remove_dir(dir).await {
                Ok(()) => {
                    info!(path = dir, files = removed.len(), "Install removed");
                    return Ok(removed);
                }
                Err(e) if e.is_not_found() => return Ok(removed),
                Err(e) if round < 2 => {
                    warn!(path = dir, error = %e, "Install directory not empty yet; removing again");
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("failed to remove {dir}"))),
            }
        }
        Ok(removed)
    }

    /// The store's health.
    pub fn store_health(&self) -> crate::store::Health {
        self.downloader.store.health()
    }

    /// The store's capacity and health, and the job load (`GET /capacity`).
    pub(super) async fn capacity(&self) -> CapacityReport {
        let (capacity, error) = match self.downloader.store.capacity().await {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        };
        // Jobs that hold a slot are running; the other active ones wait for a slot.
        let active = self.running().len();
        let in_slots = self.concurrent - self.slots.available_permits();
        CapacityReport {
            store: self.downloader.store.url().to_string(),
            health: self.downloader.store.health(),
            capacity,
            error,
            jobs_running: in_slots,
            jobs_queued: active.saturating_sub(in_slots),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::DownloadSettings;
    use crate::job::Journal;
    use crate::store::{Store, StoreOptions};
    use systemvm_proto::agent::config_keys;

    async fn downloader(dir: &std::path::Path, allow: Vec<ipnet::IpNet>) -> Downloader {
        let store_dir = dir.join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        let url = format!("file://{}", store_dir.display()).parse().unwrap();
        Downloader {
            http: crate::fetch::client(&crate::fetch::FetchConfig::default()).unwrap(),
            store: Store::open(&url, StoreOptions::default()).await.unwrap(),
            journal: Journal::open(&dir.join("state")).unwrap(),
            settings: DownloadSettings {
                max_size: 7 << 30,
                ..DownloadSettings::default()
            },
            allow_internal: Arc::new(allow),
            peers: crate::peer::Peers::none(),
        }
    }

    fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn core_settings_apply_to_new_jobs_and_fall_back_to_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let cli: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let allow = AllowList::default();
        let agent = Agent::with_allow_list(downloader(dir.path(), cli.clone()).await, allow.clone(), 1);
        assert_eq!(
            *allow.get(),
            cli,
            "the client's list starts as the command line's"
        );

        agent.apply_core_config(&config(&[
            (config_keys::ALLOWED_INTERNAL_SITES, "127.0.0.0/8, nonsense"),
            (config_keys::MAX_TEMPLATE_SIZE_GB, "2"),
        ]));
        let loopback: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(*allow.get(), loopback, "the resolver sees the new list");
        let job = agent.job_downloader();
        assert_eq!(
            *job.allow_internal, loopback,
            "the literal-IP check sees the new list"
        );
        assert_eq!(job.settings.max_size, 2 << 30);

        // The next map lacks both keys: the command line is back.
        agent.apply_core_config(&config(&[]));
        assert_eq!(*allow.get(), cli);
        let job = agent.job_downloader();
        assert_eq!(*job.allow_internal, cli);
        assert_eq!(job.settings.max_size, 7 << 30);
    }

    #[tokio::test]
    async fn a_fixed_client_list_is_not_changed_behind_the_resolver() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::new(downloader(dir.path(), Vec::new()).await, 1);
        agent.apply_core_config(&config(&[
            (config_keys::ALLOWED_INTERNAL_SITES, "127.0.0.0/8"),
            (config_keys::MAX_TEMPLATE_SIZE_GB, "3"),
        ]));
        let policy = agent.download_policy();
        assert!(policy.allow_internal.is_empty(), "{policy:?}");
        assert_eq!(policy.max_size, 3 << 30);
    }

    // === fencing, submissions and orphans ===

    use crate::download::DownloadSettings as Settings;
    use std::time::Duration;
    use systemvm_tests::http::{Faults, HttpFixture, Route};

    const DIR: &str = "template/tmpl/2/301";

    /// An agent on the local store `root/store`, with its journal `journal` on the store or in
    /// `root/<journal>` when `local_journal`.
    async fn agent_on(root: &std::path::Path, journal: &str, local_journal: bool) -> Arc<Agent> {
        let store_dir = root.join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        let url = format!("file://{}", store_dir.display()).parse().unwrap();
        let store = Store::open(&url, StoreOptions::default()).await.unwrap();
        let allow: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let journal = if local_journal {
            Journal::open(&root.join(journal)).unwrap()
        } else {
            Journal::on_store(&store, journal).await.unwrap()
        };
        let downloader = Downloader {
            http: crate::fetch::client(&crate::fetch::FetchConfig {
                allow_internal: allow.clone(),
                ..crate::fetch::FetchConfig::default()
            })
            .unwrap(),
            store,
            journal,
            settings: Settings {
                retries: 2,
                backoff: Duration::from_millis(50),
                checkpoint_interval: Duration::from_millis(100),
                stall_timeout: Duration::from_secs(5),
                ..Settings::default()
            },
            allow_internal: Arc::new(allow),
            peers: crate::peer::Peers::none(),
        };
        Agent::new(downloader, 4)
    }

    fn image() -> Vec<u8> {
        // Raw noise whose first bytes are no compression magic.
        let mut data = systemvm_tests::images::noise(6 << 20, 0x5eed);
        data[..4].copy_from_slice(b"RAW!");
        data
    }

    /// Serves the image paced (about 2.4 s) at `/slow.img` and at full speed at `/fast.img`.
    fn http(data: &[u8]) -> HttpFixture {
        let http = HttpFixture::start().unwrap();
        http.route(
            "/slow.img",
            Route::File {
                data: data.to_vec().into(),
                pace: Some(Duration::from_millis(100)),
                faults: Faults::default(),
                ranges: true,
            },
        );
        http.file("/fast.img", data.to_vec());
        http
    }

    fn submit(url: String, epoch: u64) -> Submit {
        Submit {
            id: Some("t301".into()),
            url,
            path: DIR.into(),
            format: "RAW".into(),
            checksum: None,
            description: String::new(),
            epoch,
            peer: None,
        }
    }

    async fn wait_final(agent: &Agent, id: &str) -> JobRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = agent.status(id).await.unwrap().unwrap();
            if r.state.is_final() && !agent.running().contains_key(id) {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} did not end: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_bytes(agent: &Agent, id: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while agent.status(id).await.unwrap().unwrap().progress.bytes < 512 << 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} made no progress"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submits_of_one_id_start_exactly_one_job() {
        let tmp = tempfile::tempdir().unwrap();
        let agent = agent_on(tmp.path(), "s-1", false).await;
        let data = image();
        let http = http(&data);
        let url = http.url("/fast.img");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..48 {
            let (agent, url) = (agent.clone(), url.clone());
            tasks.spawn(async move { agent.submit(submit(url, 0)).await });
        }
        let mut created = 0;
        while let Some(answer) = tasks.join_next().await {
            let (status, record) = answer.unwrap().unwrap();
            assert_eq!(record.id, "t301");
            if status == StatusCode::CREATED {
                created += 1;
            }
        }
        assert_eq!(created, 1, "one submission starts the job, the others see it");
        let r = wait_final(&agent, "t301").await;
        assert_eq!(r.state, JobState::Completed, "{r:?}");
        assert_eq!(http.requests("/fast.img").len(), 1, "downloaded once");
        let files: Vec<String> = names(&tmp.path().join("store").join(DIR))
            .into_iter()
            .filter(|n| !crate::fence::is_fence_file(n))
            .collect();
        assert_eq!(files.len(), 2, "one image and its properties: {files:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_older_epoch_stops_and_the_newer_install_stays() {
        let tmp = tempfile::tempdir().unwrap();
        // Two agents on one store, each with its own journal.
        let old = agent_on(tmp.path(), "s-old", false).await;
        let new = agent_on(tmp.path(), "s-new", true).await;
        let data = image();
        let http = http(&data);
        old.submit(submit(http.url("/slow.img"), 1)).await.unwrap();
        wait_bytes(&old, "t301").await;
        // Core sent the download again (epoch 2) to the other agent.
        new.submit(submit(http.url("/fast.img"), 2)).await.unwrap();
        let newer = wait_final(&new, "t301").await;
        assert_eq!(newer.state, JobState::Completed, "{newer:?}");
        let older = wait_final(&old, "t301").await;
        assert_eq!(older.state, JobState::Failed, "{older:?}");
        assert_eq!(older.error.as_deref(), Some(crate::fence::FENCED));
        assert_eq!(crate::core_link::progress_of(&older).epoch, Some(1));
        assert_eq!(crate::core_link::progress_of(&newer).epoch, Some(2));
        // The newer install is intact: its image, its properties, the marker; no partial file.
        let installed = newer.installed.unwrap();
        let dir = tmp.path().join("store").join(DIR);
        assert_eq!(names(&dir), {
            let mut want = vec![
                ".ssvm-epoch.2".to_owned(),
                installed.file.rsplit('/').next().unwrap().to_owned(),
                "template.properties".to_owned(),
            ];
            want.sort();
            want
        });
        let on_disk = std::fs::read(tmp.path().join("store").join(&installed.file)).unwrap();
        assert!(on_disk == data, "installed bytes differ");
        let props = std::fs::read_to_string(dir.join("template.properties")).unwrap();
        assert!(
            props.contains(&format!(
                "filename={}",
                installed.file.rsplit('/').next().unwrap()
            )),
            "{props}"
        );
        let inventory = crate::inventory::scan(&new.downloader.store).await.unwrap();
        assert!(inventory.iter().all(|e| e.complete), "{inventory:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_during_a_download_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let data = image();
        let http = http(&data);
        let dir = tmp.path().join("store").join(DIR);
        // On the agent that runs the download.
        let agent = agent_on(tmp.path(), "s-1", false).await;
        agent.submit(submit(http.url("/slow.img"), 1)).await.unwrap();
        wait_bytes(&agent, "t301").await;
        let removed = agent.delete_install(DIR, 2).await.unwrap();
        let r = wait_final(&agent, "t301").await;
        assert_eq!(
            (r.state, r.error.as_deref()),
            (JobState::Failed, Some(crate::fence::FENCED)),
            "{removed:?}"
        );
        assert!(!dir.exists(), "{:?}", names(&dir));

        // On another agent, while this one downloads: the run stops at its next check and never
        // brings the directory back.
        let other = agent_on(tmp.path(), "s-2", true).await;
        let mut again = submit(http.url("/slow.img"), 3);
        again.id = Some("t301b".into());
        agent.submit(again).await.unwrap();
        wait_bytes(&agent, "t301b").await;
        other.delete_install(DIR, 4).await.unwrap();
        let r = wait_final(&agent, "t301b").await;
        assert_eq!(
            (r.state, r.error.as_deref()),
            (JobState::Failed, Some(crate::fence::FENCED))
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!dir.exists(), "{:?}", names(&dir));
        assert!(
            crate::inventory::scan(&agent.downloader.store)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resent_download_with_a_higher_epoch_is_adopted() {
        let tmp = tempfile::tempdir().unwrap();
        let agent = agent_on(tmp.path(), "s-1", false).await;
        let data = image();
        let http = http(&data);
        let (status, first) = agent.submit(submit(http.url("/slow.img"), 1)).await.unwrap();
        assert_eq!((status, first.epoch), (StatusCode::CREATED, 1));
        wait_bytes(&agent, "t301").await;
        let (status, again) = agent.submit(submit(http.url("/slow.img"), 3)).await.unwrap();
        assert_eq!((status, again.epoch), (StatusCode::OK, 3));
        assert_eq!(crate::core_link::progress_of(&again).epoch, Some(3));
        // Recorded beside the install at once.
        assert!(tmp.path().join("store").join(DIR).join(".ssvm-epoch.3").is_file());
        let done = wait_final(&agent, "t301").await;
        assert_eq!((done.state, done.epoch), (JobState::Completed, 3), "{done:?}");
        // A lower epoch sent late changes nothing.
        let (_, late) = agent.submit(submit(http.url("/slow.img"), 2)).await.unwrap();
        assert_eq!(late.epoch, 3);
        assert_eq!(http.requests("/slow.img").len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fenced_download_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let agent = agent_on(tmp.path(), "s-1", false).await;
        let http = http(&image());
        let mut bad = submit(http.url("/fast.img"), 1);
        bad.checksum = Some(format!("{{SHA-256}}{}", "0".repeat(64)));
        agent.submit(bad).await.unwrap();
        let r = wait_final(&agent, "t301").await;
        assert_eq!(r.state, JobState::Failed, "{r:?}");
        assert!(r.error.as_deref().unwrap().contains("checksum"), "{r:?}");
        assert!(names(&tmp.path().join("store").join(DIR)).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphaned_partial_files_are_removed_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let install = |id: &str, files: &[&str]| {
            let dir = store.join(format!("template/tmpl/2/{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in files {
                std::fs::write(dir.join(f), b"x").unwrap();
            }
        };
        install("401", &["a.raw.part"]); // no record anywhere
        install("402", &["b.raw.part"]); // a failed job of this agent
        install("403", &["c.raw.part"]); // a cancelled job of this agent
        install("404", &["d.raw.part"]); // running on another agent (journal on the store)
        install("405", &["e.raw", "template.properties"]); // a completed install
        let agent = agent_on(tmp.path(), "s-1", true).await;
        let spec = |id: &str| DownloadSpec {
            url: "http://127.0.0.1:9/x.img".into(),
            path: format!("template/tmpl/2/{id}"),
            format: "RAW".into(),
            checksum: None,
            description: String::new(),
            upload: false,
            resumable: false,
            expires: 0,
            peer: None,
        };
        let record = |id: &str, file: &str, state| {
            let mut r = JobRecord::new(&format!("j{id}"), spec(id), &agent.store_url().to_string());
            r.file_name = file.into();
            r.state = state;
            r
        };
        let journal = &agent.downloader.journal;
        journal
            .save(&record("402", "b.raw", JobState::Failed))
            .await
            .unwrap();
        journal
            .save(&record("403", "c.raw", JobState::Cancelled))
            .await
            .unwrap();
        journal
            .save(&record("405", "e.raw", JobState::Completed))
            .await
            .unwrap();
        let other = Journal::on_store(&agent.downloader.store, "s-2").await.unwrap();
        other
            .save(&record("404", "d.raw", JobState::Running))
            .await
            .unwrap();

        assert_eq!(agent.resume_all().await.unwrap(), 0);
        let left = |id: &str| names(&store.join(format!("template/tmpl/2/{id}")));
        assert!(left("401").is_empty() && left("402").is_empty() && left("403").is_empty());
        assert_eq!(
            left("404"),
            ["d.raw.part"],
            "another agent's running job keeps its file"
        );
        assert_eq!(
            left("405"),
            ["e.raw", "template.properties"],
            "never a completed install"
        );
        assert!(store.join("template/tmpl/2/401").is_dir(), "directories stay");
    }
}
