//! Download jobs: their specification, state, progress, and the journal that outlives the process.
//!
//! Invariants:
//! - A job id names one job for good: submitting the same id with the same specification returns the
//!   existing job (idempotent); with another specification it is refused.
//! - Each journal record is written to a temporary file, synced and renamed, so a crash leaves the old
//!   record or the new one, never a torn one. Records carry a format version.
//! - `durable_offset` only counts bytes already flushed to the store, so a resumed job never trusts
//!   bytes that may not have reached the disk.
//! - The journal lives on the image store (`.ssvm-journal/<agent id>/jobs/`, [`Journal::on_store`])
//!   unless a local state directory is given ([`Journal::open`]): a system VM rebuilt with the same
//!   id finds its jobs again.
//! - A record carries the job's fencing epoch (see [`crate::fence`]); records from before fencing
//!   read as epoch 0.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::checksum::Checksum;
use crate::inspect::ImageFormat;
use crate::store::{Store, StoreError};

/// Version of the journal record format.
pub const JOURNAL_VERSION: u32 = 1;

/// What to download and where to install it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadSpec {
    /// Source URL (http or https).
    pub url: String,
    /// Install directory in the store, e.g. `template/tmpl/2/201`.
    pub path: String,
    /// Declared image format (CloudStack name: QCOW2, RAW, VHD, ISO, OVA).
    pub format: String,
    /// Expected checksum of the downloaded bytes, `{ALGO}hex` (no prefix = MD5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Description written to `template.properties`.
    #[serde(default)]
    pub description: String,
    /// The bytes come from a browser upload to this agent (`url` is then the URL posted to),
    /// not from a download.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upload: bool,
    /// An upload that can resume (tus); a one-shot multipart upload cannot, so a restart of the
    /// agent ends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumable: bool,
    /// Uploads: Unix seconds after which the upload can no longer be continued (its ticket's
    /// expiry); an unfinished upload is failed then. 0 = no expiry.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires: u64,
    /// The bytes come from another storage VM (a cross-zone copy, [`crate::peer`]): `url` names
    /// it by its peer name, the connection goes to this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<systemvm_proto::agent::PeerSource>,
}

impl DownloadSpec {
    /// Whether `other` is the same job: the same spec, or for copies the same but for where the
    /// bytes come from (core issues a fresh link, maybe on another source, at each dispatch).
    pub fn same_job(&self, other: &DownloadSpec) -> bool {
        if self == other {
            return true;
        }
        if self.peer.is_none() || other.peer.is_none() {
            return false;
        }
        let strip = |s: &DownloadSpec| DownloadSpec {
            url: String::new(),
            peer: None,
            ..s.clone()
        };
        strip(self) == strip(other)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DownloadSpec {
    /// Checks the fields and returns the parsed format and checksum.
    pub fn validate(&self) -> anyhow::Result<(ImageFormat, Option<Checksum>)> {
        let format: ImageFormat = self.format.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let checksum = match self.checksum.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => Some(
                c.parse::<Checksum>()
                    .map_err(|e| anyhow::anyhow!("invalid checksum {c:?}: {e}"))?,
            ),
            None => None,
        };
        let url: reqwest::Url = self
            .url
            .parse()
            .with_context(|| format!("invalid URL {:?}", self.url))?;
        anyhow::ensure!(
            self.upload || matches!(url.scheme(), "http" | "https"),
            "unsupported URL scheme {:?}",
            url.scheme()
        );
        install_ids(&self.path)?;
        Ok((format, checksum))
    }
}

/// The account and template ids of an install path `template/tmpl/<account>/<id>` (any prefix is
/// accepted as long as the last two components are the account and the id).
pub fn install_ids(path: &str) -> anyhow::Result<(String, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    anyhow::ensure!(
        parts.len() >= 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.starts_with('.')),
        "install path {path:?} must look like template/tmpl/ACCOUNT/ID"
    );
    Ok((
        parts[parts.len() - 2].to_owned(),
        parts[parts.len() - 1].to_owned(),
    ))
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, not started.
    Queued,
    /// Downloading and installing.
    Running,
    /// Installed and verified.
    Completed,
    /// Ended with an error (see `error`).
    Failed,
    /// Cancelled on request.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }
}

/// Progress of a running job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes downloaded so far (before decompression).
    pub bytes: u64,
    /// Total bytes to download, when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Percent done, when the total is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Recent download rate in bytes per second.
    pub rate: u64,
}

/// What a completed job installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Path of the installed file in the store.
    pub file: String,
    /// Detected format.
    pub format: String,
    /// Bytes of the installed file.
    pub physical_size: u64,
    /// Virtual disk size (file size for ISO and raw).
    pub virtual_size: u64,
    /// Checksum of the downloaded bytes, `{ALGO}hex` (the requested algorithm, else SHA-256).
    pub download_checksum: String,
    /// SHA-256 of the installed file.
    pub installed_sha256: String,
}

/// A journal record: everything needed to report a job or resume it after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Record format version.
    pub version: u32,
    /// Job id.
    pub id: String,
    /// What to do.
    pub spec: DownloadSpec,
    /// Store URL the job installs into.
    pub store: String,
    /// Current state.
    pub state: JobState,
    /// Progress.
    #[serde(default)]
    pub progress: Progress,
    /// Name of the file being installed (fixed at the first start so a resume finds it).
    #[serde(default)]
    pub file_name: String,
    /// Bytes of the download already flushed to the store's temporary file.
    #[serde(default)]
    pub durable_offset: u64,
    /// HTTP validator of the partial download (`ETag`, else `Last-Modified`), for a Range resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<String>,
    /// Whether the download is compressed (then it restarts from zero instead of resuming).
    #[serde(default)]
    pub compressed: bool,
    /// How many times the job was resumed after an interruption.
    #[serde(default)]
    pub resumes: u32,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<Installed>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix seconds of the last update.
    #[serde(default)]
    pub updated: u64,
    /// The fencing epoch the job runs under (core's `DownloadCommand::epoch`; a re-sent download
    /// with a higher one raises it); 0 = not fenced.
    #[serde(default)]
    pub epoch: u64,
    /// Whether the job recorded its epoch beside the install (then a missing record means the
    /// install was deleted, and the job is fenced).
    #[serde(default)]
    pub epoch_recorded: bool,
}

impl JobRecord {
    /// A new queued job.
    pub fn new(id: &str, spec: DownloadSpec, store: &str) -> Self {
        JobRecord {
            version: JOURNAL_VERSION,
            id: id.to_owned(),
            spec,
            store: store.to_owned(),
            state: JobState::Queued,
            progress: Progress::default(),
            file_name: String::new(),
            durable_offset: 0,
            validator: None,
            compressed: false,
            resumes: 0,
            installed: None,
            error: None,
            updated: now(),
            epoch: 0,
            epoch_recorded: false,
        }
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a job id is acceptable (it names a file in the journal).
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A deterministic job id for a download, so the same command run again resumes the same job.
pub fn derived_job_id(store: &str, spec: &DownloadSpec) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{store}\n{}\n{}", spec.path, spec.url).as_bytes());
    format!("dl-{}", &hex::encode(digest)[..16])
}

/// Directory of the journals kept on the image store: `<store>/.ssvm-journal/<agent id>/`.
pub const STORE_JOURNAL_DIR: &str = ".ssvm-journal";

/// The job journal: one JSON file per job in `<state-dir>/jobs/`, in a local directory
/// ([`Journal::open`]) or on the image store itself ([`Journal::on_store`]).
#[derive(Clone, Debug)]
pub struct Journal {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    /// `<state-dir>/jobs` on the local file system.
    Local(PathBuf),
    /// `.ssvm-journal/<agent id>/jobs` in the store.
    Store { store: Store, dir: String },
}

/// A name usable as the agent's journal directory: `[A-Za-z0-9._-]`, other bytes become `_`.
pub fn journal_name(agent_id: &str) -> String {
    let name: String = agent_id
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match name.trim_start_matches('.') {
        "" => "agent".to_owned(),
        n => n.to_owned(),
    }
}

impl Journal {
    /// Opens (creating) the journal under a local state directory.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(Journal {
            backend: Backend::Local(dir),
        })
    }

    /// Opens (creating) the journal of agent `agent_id` on the image store:
    /// `<store>/.ssvm-journal/<agent id>/jobs/`. It lives as long as the store, so a system VM
    /// that is restarted or rebuilt with the same id finds its jobs again.
    pub async fn on_store(store: &Store, agent_id: &str) -> anyhow::Result<Self> {
        let dir = format!("{STORE_JOURNAL_DIR}/{}/jobs", journal_name(agent_id));
        store
            .create_dir_all(&dir)
            .await
            .with_context(|| format!("failed to create the journal {dir} on {}", store.url()))?;
        Ok(Journal {
            backend: Backend::Store {
                store: store.clone(),
                dir,
            },
        })
    }

    /// Where the journal is, for logs.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local(dir) => dir.display().to_string(),
            Backend::Store { store, dir } => format!("{}/{dir}", store.url()),
        }
    }

    /// The store the journal lives on, if it is on one.
    pub fn store(&self) -> Option<&Store> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Store { store, .. } => Some(store),
        }
    }

    fn parse(bytes: &[u8], shown: &str) -> anyhow::Result<JobRecord> {
        let record: JobRecord =
            serde_json::from_slice(bytes).with_context(|| format!("journal record {shown} is unreadable"))?;
        anyhow::ensure!(
            record.version <= JOURNAL_VERSION,
            "journal record {shown} has a newer format ({})",
            record.version
        );
        Ok(record)
    }

    /// Reads one job's record.
    pub async fn load(&self, id: &str) -> anyhow::Result<Option<JobRecord>> {
        match &self.backend {
            Backend::Local(dir) => {
                let path = dir.join(format!("{id}.json"));
                match std::fs::read(&path) {
                    Ok(bytes) => Self::parse(&bytes, &path.display().to_string()).map(Some),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
                }
            }
            Backend::Store { store, dir } => {
                let path = format!("{dir}/{id}.json");
                match store.read_file(&path, MAX_RECORD).await {
                    Ok(bytes) => Self::parse(&bytes, &path).map(Some),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(anyhow::Error::new(e).context(format!("failed to read {path}"))),
                }
            }
        }
    }

    /// The ids of every record.
    async fn ids(&self) -> anyhow::Result<Vec<String>> {
        let names: Vec<String> = match &self.backend {
            Backend::Local(dir) => {
                let mut names = Vec::new();
                for entry in
                    std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?
                {
                    if let Some(name) = entry?.file_name().to_str() {
                        names.push(name.to_owned());
                    }
                }
                names
            }
            Backend::Store { store, dir } => store
                .list_dir(dir)
                .await
                .with_context(|| format!("failed to list {dir}"))?
                .into_iter()
                .filter(|e| !e.is_dir)
                .map(|e| e.name)
                .collect(),
        };
        Ok(names
            .iter()
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| n.strip_suffix(".json"))
            .map(str::to_owned)
            .collect())
    }

    /// Reads every record (unreadable ones are reported, not dropped silently).
    pub async fn load_all(&self) -> anyhow::Result<BTreeMap<String, JobRecord>> {
        let mut out = BTreeMap::new();
        for id in self.ids().await? {
            if let Some(record) = self.load(&id).await? {
                out.insert(id, record);
            }
        }
        Ok(out)
    }

    /// Writes a record atomically (temporary file, fsync or COMMIT, rename).
    pub async fn save(&self, record: &JobRecord) -> anyhow::Result<()> {
        let mut record = record.clone();
        record.updated = now();
        let bytes = serde_json::to_vec_pretty(&record)?;
        match &self.backend {
            Backend::Local(dir) => {
                let path = dir.join(format!("{}.json", record.id));
                let tmp = dir.join(format!(".{}.tmp", record.id));
                let mut file = std::fs::File::create(&tmp)
                    .with_context(|| format!("failed to write {}", tmp.display()))?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("failed to write {}", path.display()))?;
            }
            Backend::Store { store, dir } => {
                let path = format!("{dir}/{}.json", record.id);
                store
                    .write_file_atomic(&path, &bytes)
                    .await
                    .with_context(|| format!("failed to write {path}"))?;
            }
        }
        Ok(())
    }
}

/// Largest journal record read back.
const MAX_RECORD: usize = 1 << 20;

/// Every record of every agent's journal on the store (`.ssvm-journal/*/jobs/`); records that
/// cannot be read are skipped with a warning (they belong to other agents).
pub async fn records_on_store(store: &Store) -> anyhow::Result<Vec<JobRecord>> {
    let agents = match store.list_dir(STORE_JOURNAL_DIR).await {
        Ok(entries) => entries,
        Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("failed to list {STORE_JOURNAL_DIR}"))),
    };
    let mut out = Vec::new();
    for agent in agents.into_iter().filter(|e| e.is_dir) {
        let journal = Journal {
            backend: Backend::Store {
                store: store.clone(),
                dir: format!("{STORE_JOURNAL_DIR}/{}/jobs", agent.name),
            },
        };
        let ids = match journal.ids().await {
            Ok(ids) => ids,
            Err(e)
                if e.downcast_ref::<StoreError>()
                    .is_some_and(StoreError::is_not_found) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        for id in ids {
            match journal.load(&id).await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(agent = %agent.name, job.id = %id, error = %format!("{e:#}"), "Journal record on the store unreadable")
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DownloadSpec {
        DownloadSpec {
            url: "http://mirror.example/centos.qcow2".into(),
            path: "template/tmpl/2/201".into(),
            format: "QCOW2".into(),
            checksum: Some(
                "{SHA-256}9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            ),
            description: String::new(),
            upload: false,
            resumable: false,
            expires: 0,
            peer: None,
        }
    }

    #[test]
    fn a_copy_resent_with_a_new_source_is_the_same_job() {
        let peer = |vm: &str| systemvm_proto::agent::PeerSource {
            address: "10.0.0.2:8090".into(),
            vm_id: vm.into(),
        };
        let a = DownloadSpec {
            peer: Some(peer("a")),
            ..spec()
        };
        let b = DownloadSpec {
            url: "https://other/link".into(),
            peer: Some(peer("b")),
            ..spec()
        };
        assert!(a.same_job(&b));
        assert!(!a.same_job(&DownloadSpec {
            path: "template/tmpl/2/999".into(),
            ..b.clone()
        }));
        // A download (no peer) is the same job only with the same spec.
        assert!(spec().same_job(&spec()));
        assert!(!spec().same_job(&DownloadSpec {
            url: "http://elsewhere/x.qcow2".into(),
            ..spec()
        }));
        assert!(!spec().same_job(&a));
    }

    #[test]
    fn specs_validate() {
        assert!(spec().validate().is_ok());
        let mut bad = spec();
        bad.format = "QCOW3".into();
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.checksum = Some("{SHA-256}abc".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("invalid checksum")
        );
        let mut bad = spec();
        bad.url = "file:///etc/passwd".into();
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.path = "template/../etc".into();
        assert!(bad.validate().is_err());
        assert_eq!(
            install_ids("template/tmpl/2/201").unwrap(),
            ("2".into(), "201".into())
        );
    }

    #[tokio::test]
    async fn journal_roundtrip_and_ids() {
        let dir = std::env::temp_dir().join(format!("ssvm-journal-{}", std::process::id()));
        let journal = Journal::open(&dir).unwrap();
        let mut record = JobRecord::new("job-1", spec(), "file:///srv");
        record.state = JobState::Running;
        record.durable_offset = 42;
        record.epoch = 7;
        journal.save(&record).await.unwrap();
        let back = journal.load("job-1").await.unwrap().unwrap();
        assert_eq!(
            (back.state, back.durable_offset, back.epoch),
            (JobState::Running, 42, 7)
        );
        assert_eq!(journal.load_all().await.unwrap().len(), 1);
        assert!(journal.load("nope").await.unwrap().is_none());
        assert!(valid_job_id("dl-0123abcd") && !valid_job_id("../x") && !valid_job_id(""));
        let id = derived_job_id("file:///srv", &spec());
        assert_eq!(id, derived_job_id("file:///srv", &spec()));
        assert!(valid_job_id(&id));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn journal_on_the_store_survives_the_agent_and_is_found_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let url: crate::store::StoreUrl = format!("file://{}/store", dir.path().display()).parse().unwrap();
        let store = Store::open(&url, crate::store::StoreOptions::default())
            .await
            .unwrap();
        let journal = Journal::on_store(&store, "s-1-VM/../x").await.unwrap();
        assert!(
            journal.location().ends_with(".ssvm-journal/s-1-VM_.._x/jobs"),
            "{}",
            journal.location()
        );
        let mut record = JobRecord::new("job-1", spec(), "file:///srv");
        record.durable_offset = 9;
        journal.save(&record).await.unwrap();
        // A new agent process (the same id) reads it back.
        let again = Journal::on_store(&store, "s-1-VM/../x").await.unwrap();
        let back = again.load("job-1").await.unwrap().unwrap();
        assert_eq!(back.durable_offset, 9);
        assert_eq!(again.load_all().await.unwrap().len(), 1);
        // Other agents' journals are listed for the sweep of orphaned partial downloads.
        let other = Journal::on_store(&store, "s-2-VM").await.unwrap();
        other
            .save(&JobRecord::new("job-2", spec(), "file:///srv"))
            .await
            .unwrap();
        let mut ids: Vec<String> = records_on_store(&store)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["job-1", "job-2"]);
        assert!(
            dir.path()
                .join("store/.ssvm-journal/s-2-VM/jobs/job-2.json")
                .is_file()
        );
        assert_eq!(journal_name(".."), "agent");
        assert_eq!(journal_name("a b"), "a_b");
    }
}
