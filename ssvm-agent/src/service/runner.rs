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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
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
}

impl Submit {
    fn into_parts(self) -> (Option<String>, DownloadSpec) {
        let Submit {
            id,
            url,
            path,
            format,
            checksum,
            description,
        } = self;
        (
            id,
            DownloadSpec {
                url,
                path,
                format,
                checksum,
                description,
            },
        )
    }
}

struct Running {
    live: Arc<LiveProgress>,
    cancel: CancellationToken,
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
    slots: Arc<Semaphore>,
    concurrent: usize,
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
            slots: Arc::new(Semaphore::new(concurrent.max(1))),
            concurrent: concurrent.max(1),
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

    /// Resumes every job the journal has as queued or running (the agent was stopped mid-job).
    pub fn resume_all(self: &Arc<Self>) -> anyhow::Result<usize> {
        let mut n = 0;
        let store = self.downloader.store.url().to_string();
        for mut record in self.downloader.journal.load_all()?.into_values() {
            if !record.state.is_final() && record.store != store {
                warn!(job.id = %record.id, job.store = %record.store, "Job belongs to another store, not resuming");
                record.state = JobState::Failed;
                record.error = Some(format!("agent restarted on another store ({store})"));
                self.downloader.journal.save(&record)?;
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

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn(self: &Arc<Self>, mut record: JobRecord) {
        let live = Arc::new(LiveProgress::default());
        let cancel = CancellationToken::new();
        self.running().insert(
            record.id.clone(),
            Running {
                live: live.clone(),
                cancel: cancel.clone(),
            },
        );
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
                let _ = agent.downloader.journal.save(&record);
            }
            agent.running().remove(&record.id);
        });
    }

    /// Submits a job (idempotent by id).
    pub fn submit(self: &Arc<Self>, submit: Submit) -> Result<(StatusCode, JobRecord), (StatusCode, String)> {
        let (id, spec) = submit.into_parts();
        spec.validate()
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e:#}")))?;
        let store = self.downloader.store.url().to_string();
        let id = id.unwrap_or_else(|| derived_job_id(&store, &spec));
        if !valid_job_id(&id) {
            return Err((StatusCode::BAD_REQUEST, format!("invalid job id {id:?}")));
        }
        match self.downloader.journal.load(&id) {
            Ok(Some(existing)) if existing.spec == spec => {
                return Ok((StatusCode::OK, self.with_live(existing)));
            }
            Ok(Some(_)) => {
                return Err((
                    StatusCode::CONFLICT,
                    format!("job {id} exists with another specification"),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))),
        }
        let record = JobRecord::new(&id, spec, &store);
        self.downloader
            .journal
            .save(&record)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        info!(job.id = %id, url = %record.spec.url, "Job submitted");
        self.spawn(record.clone());
        Ok((StatusCode::CREATED, record))
    }

    /// A record with the live byte count of a running job.
    fn with_live(&self, mut record: JobRecord) -> JobRecord {
        if let Some(r) = self.running().get(&record.id) {
            let bytes = r.live.bytes.load(std::sync::atomic::Ordering::Relaxed);
            let total = r.live.total.load(std::sync::atomic::Ordering::Relaxed);
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
    pub fn status(&self, id: &str) -> anyhow::Result<Option<JobRecord>> {
        Ok(self.downloader.journal.load(id)?.map(|r| self.with_live(r)))
    }

    /// Every job.
    pub fn list(&self) -> anyhow::Result<Vec<JobRecord>> {
        Ok(self
            .downloader
            .journal
            .load_all()?
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
    pub async fn delete_install(&self, path: &str) -> anyhow::Result<Vec<String>> {
        crate::job::install_ids(path)?;
        let dir = path.trim_matches('/');
        let store = &self.downloader.store;
        let entries = match store.list_dir(dir).await {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("failed to list {dir}"))),
        };
        let mut removed = Vec::new();
        for e in entries {
            anyhow::ensure!(
                !e.is_dir,
                "{dir}/{} is a directory: not an install this agent made",
                e.name
            );
            store
                .remove_file(&format!("{dir}/{}", e.name))
                .await
                .with_context(|| format!("failed to remove {dir}/{}", e.name))?;
            removed.push(e.name);
        }
        store
            .remove_dir(dir)
            .await
            .with_context(|| format!("failed to remove {dir}"))?;
        info!(path = dir, files = removed.len(), "Install removed");
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
}
