//! Download jobs: their specification, state, progress, and the journal that outlives the process.
//!
//! Invariants:
//! - A job id names one job for good: submitting the same id with the same specification returns the
//!   existing job (idempotent); with another specification it is refused.
//! - Each journal record is written to a temporary file, synced and renamed, so a crash leaves the old
//!   record or the new one, never a torn one. Records carry a format version.
//! - `durable_offset` only counts bytes already flushed to the store, so a resumed job never trusts
//!   bytes that may not have reached the disk.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::checksum::Checksum;
use crate::inspect::ImageFormat;

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
            matches!(url.scheme(), "http" | "https"),
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

/// The job journal: one JSON file per job in `<state-dir>/jobs/`.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal under a state directory.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(Journal { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Reads one job's record.
    pub fn load(&self, id: &str) -> anyhow::Result<Option<JobRecord>> {
        let path = self.path(id);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let record: JobRecord = serde_json::from_slice(&bytes)
                    .with_context(|| format!("journal record {} is unreadable", path.display()))?;
                anyhow::ensure!(
                    record.version <= JOURNAL_VERSION,
                    "journal record {} has a newer format ({})",
                    path.display(),
                    record.version
                );
                Ok(Some(record))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
        }
    }

    /// Reads every record (unreadable ones are reported, not dropped silently).
    pub fn load_all(&self) -> anyhow::Result<BTreeMap<String, JobRecord>> {
        let mut out = BTreeMap::new();
        for entry in
            std::fs::read_dir(&self.dir).with_context(|| format!("failed to list {}", self.dir.display()))?
        {
            let name = entry?.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(record) = self.load(id)? {
                out.insert(id.to_owned(), record);
            }
        }
        Ok(out)
    }

    /// Writes a record atomically (temporary file, fsync, rename).
    pub fn save(&self, record: &JobRecord) -> anyhow::Result<()> {
        let path = self.path(&record.id);
        let tmp = self.dir.join(format!(".{}.tmp", record.id));
        let mut record = record.clone();
        record.updated = now();
        let bytes = serde_json::to_vec_pretty(&record)?;
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("failed to write {}", tmp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))?;
        Ok(())
    }
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
        }
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

    #[test]
    fn journal_roundtrip_and_ids() {
        let dir = std::env::temp_dir().join(format!("ssvm-journal-{}", std::process::id()));
        let journal = Journal::open(&dir).unwrap();
        let mut record = JobRecord::new("job-1", spec(), "file:///srv");
        record.state = JobState::Running;
        record.durable_offset = 42;
        journal.save(&record).unwrap();
        let back = journal.load("job-1").unwrap().unwrap();
        assert_eq!((back.state, back.durable_offset), (JobState::Running, 42));
        assert_eq!(journal.load_all().unwrap().len(), 1);
        assert!(journal.load("nope").unwrap().is_none());
        assert!(valid_job_id("dl-0123abcd") && !valid_job_id("../x") && !valid_job_id(""));
        let id = derived_job_id("file:///srv", &spec());
        assert_eq!(id, derived_job_id("file:///srv", &spec()));
        assert!(valid_job_id(&id));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
