//! Registering a template or ISO from a URL: download, decompress, hash, inspect and write in one
//! pass, then install with `template.properties` last.
//!
//! Pipeline: a fetch task reads the HTTP body (stall timeout, size cap) and hashes the downloaded
//! bytes; the install side decompresses when the content is compressed, feeds the format inspector
//! and the installed-file hash, and writes 1 MiB blocks to the store with several writes in flight.
//!
//! Invariants:
//! - Nothing looks installed until it is verified: data goes to `<name>.part`, is renamed to its final
//!   name only after the checksum and the format check pass, and `template.properties` is written last.
//!   A failed job removes its `.part` file.
//! - Every retry and every restart resumes the same way: from the part file's flushed length, whose
//!   bytes are read back to rebuild the hashes and the inspector, with an HTTP Range request validated
//!   by the server's ETag or Last-Modified. Compressed downloads restart from zero instead.
//! - A job with an epoch records it beside the install before the first byte, and checks it before
//!   each checkpoint, the rename and `template.properties` ([`crate::fence`]); fenced, it stops and
//!   removes only its own files.
//! - A store out of space fails the job at once (no retry); a COMMIT that reports a server restart
//!   is retried from the last good checkpoint, so what the server lost is written again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checksum::{Checksum, ChecksumAlgo, Hasher};
use crate::inspect::{ImageFormat, Inspector};
use crate::job::{Installed, JobRecord, JobState, Journal, Progress, install_ids};
use crate::properties::TemplateProperties;
use crate::store::{FileId, Store, StoreError};

/// What the fetch task reports when the install side stopped reading.
const INSTALL_STOPPED: &str = "install side stopped";

/// Size of the blocks written to the store.
pub const BLOCK: usize = 1024 * 1024;

/// Download limits and pacing.
#[derive(Clone, Debug)]
pub struct DownloadSettings {
    /// Largest download accepted (bytes, before decompression) and largest installed file.
    pub max_size: u64,
    /// A body that delivers nothing for this long is abandoned (and retried).
    pub stall_timeout: Duration,
    /// Retries after transient failures (connection, stall, 5xx, truncated body).
    pub retries: u32,
    /// First backoff between retries; doubles each time up to `backoff_max`.
    pub backoff: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Store writes in flight at once.
    pub write_concurrency: usize,
    /// Flush the part file and record the resume point after this many bytes…
    pub checkpoint_every: u64,
    /// …or after this much time, whichever comes first.
    pub checkpoint_interval: Duration,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        DownloadSettings {
            max_size: 50 << 30,
            stall_timeout: Duration::from_secs(60),
            retries: 5,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            write_concurrency: 4,
            checkpoint_every: 256 << 20,
            checkpoint_interval: Duration::from_secs(5),
        }
    }
}

/// How a download attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Worth retrying (network, stall, server error, truncated body).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (checksum or format mismatch, 404, size cap, refused address).
    #[error("{0}")]
    Permanent(String),
    /// Over a size limit (retrying cannot help).
    #[error("{0}")]
    TooLarge(String),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A newer run of the download, or a delete of the install, took over (see [`crate::fence`]).
    #[error("{}", crate::fence::FENCED)]
    Fenced,
}

impl From<StoreError> for DownloadError {
    fn from(e: StoreError) -> Self {
        if e.is_no_space() {
            // Retrying fills the store again; the job fails and its partial file goes.
            DownloadError::Permanent(format!("secondary storage is out of space (no space left): {e}"))
        } else {
            DownloadError::Transient(format!("secondary storage: {e}"))
        }
    }
}

fn permanent(msg: impl Into<String>) -> DownloadError {
    DownloadError::Permanent(msg.into())
}

/// Compression detected from the first bytes of the download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// gzip (one or more members).
    Gzip,
    /// bzip2.
    Bzip2,
    /// xz.
    Xz,
    /// zstd.
    Zstd,
    /// A zip archive: its first entry is the image.
    Zip,
}

impl Compression {
    /// Detects compression from magic bytes.
    pub fn detect(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [b'B', b'Z', b'h', ..] => Compression::Bzip2,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [b'P', b'K', 3, 4, ..] => Compression::Zip,
            _ => Compression::None,
        }
    }
}

/// Everything a download needs, shared by the jobs of one agent.
#[derive(Clone)]
pub struct Downloader {
    /// HTTP client (SSRF-guarded).
    pub http: reqwest::Client,
    /// The store templates are installed into.
    pub store: Store,
    /// The job journal.
    pub journal: Journal,
    /// Limits and pacing.
    pub settings: DownloadSettings,
    /// Internal ranges allowed by configuration (checked again on the initial URL).
    pub allow_internal: Arc<Vec<ipnet::IpNet>>,
    /// The channel to other storage VMs, for copies ([`crate::peer`]).
    pub peers: Arc<crate::peer::Peers>,
}

/// Time to connect to another storage VM.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Retries of a copy from another storage VM (that VM may be restarting meanwhile), at least.
pub const PEER_RETRIES: u32 = 20;

/// Live view of a running job, for progress reporting.
#[derive(Debug, Default)]
pub struct LiveProgress {
    /// Bytes downloaded so far.
    pub bytes: AtomicU64,
    /// Total bytes to download, 0 when unknown.
    pub total: AtomicU64,
    /// Download rate over the last second, bytes per second.
    pub rate: AtomicU64,
    /// The fencing epoch the job runs under (raised when core re-sends the download with a
    /// higher one); 0 = not fenced.
    pub epoch: AtomicU64,
    /// Set (before the job is cancelled) when a delete of the install fenced the job off.
    pub fenced: AtomicBool,
    /// A copy's newer source (core re-sent the job with a fresh link): taken at the next attempt.
    pub source: std::sync::Mutex<Option<(String, systemvm_proto::agent::PeerSource)>>,
}

impl Downloader {
    /// Runs a job to its end, retrying transient failures, and journals every state change.
    pub async fn run(
        &self,
        record: &mut JobRecord,
        live: &LiveProgress,
        cancel: &CancellationToken,
    ) -> JobState {
        record.state = JobState::Running;
        record.error = None;
        live.epoch.fetch_max(record.epoch, Ordering::Relaxed);
        sync_epoch(record, live);
        self.save(record).await;
        let mut attempt = 0u32;
        let mut backoff = self.settings.backoff;
        let retries = if record.spec.peer.is_some() {
            self.settings.retries.max(PEER_RETRIES)
        } else {
            self.settings.retries
        };
        let outcome = loop {
            match self.attempt(record, live, cancel).await {
                Ok(installed) => break Ok(installed),
                Err(DownloadError::Transient(msg)) if attempt < retries && !cancel.is_cancelled() => {
                    attempt += 1;
                    warn!(job.id = %record.id, attempt, error = %msg, "Download attempt failed, retrying");
                    record.error = Some(format!("retrying after: {msg}"));
                    sync_epoch(record, live);
                    self.save(record).await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => break Err(DownloadError::Cancelled),
                    }
                    backoff = (backoff * 2).min(self.settings.backoff_max);
                }
                Err(DownloadError::Cancelled) if live.fenced.load(Ordering::Relaxed) => {
                    break Err(DownloadError::Fenced);
                }
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok(installed) => {
                info!(job.id = %record.id, file = %installed.file, "Template installed");
                record.state = JobState::Completed;
                record.error = None;
                record.installed = Some(installed);
            }
            Err(e) => {
                let fenced = matches!(e, DownloadError::Fenced);
                record.state = if matches!(e, DownloadError::Cancelled) {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                let msg = match e {
                    DownloadError::Transient(m) => format!("{m} (gave up after {retries} retries)"),
                    other => other.to_string(),
                };
                warn!(job.id = %record.id, error = %msg, "Download failed");
                record.error = Some(msg);
                self.discard_part(record).await;
                if !fenced && record.epoch > 0 && record.epoch_recorded {
                    let dir = record.spec.path.trim_matches('/');
                    if let Err(error) = crate::fence::forget(&self.store, dir, record.epoch).await {
                        warn!(job.id = %record.id, %error, "Failed to remove the fencing marker");
                    }
                }
            }
        }
        sync_epoch(record, live);
        self.save(record).await;
        record.state
    }

    pub(crate) async fn save(&self, record: &JobRecord) {
        if let Err(e) = self.journal.save(record).await {
            warn!(job.id = %record.id, error = %format!("{e:#}"), "Failed to write the job journal");
        }
    }

    /// Removes the job's part file and forgets its resume point.
    pub(crate) async fn discard_part(&self, record: &mut JobRecord) {
        if !record.file_name.is_empty() {
            let part = format!("{}/{}.part", record.spec.path.trim_matches('/'), record.file_name);
            match self.store.remove_file(&part).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => warn!(job.id = %record.id, error = %e, "Failed to remove the partial download"),
            }
        }
        record.durable_offset = 0;
        record.validator = None;
    }

    /// One attempt: resume or start, stream, verify, install.
    async fn attempt(
        &self,
        record: &mut JobRecord,
        live: &LiveProgress,
        cancel: &CancellationToken,
    ) -> Result<Installed, DownloadError> {
        let fresh = live
            .source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((url, peer)) = fresh {
            record.spec.url = url;
            record.spec.peer = Some(peer);
            self.save(record).await;
        }
        let url: reqwest::Url = record
            .spec
            .url
            .parse()
            .map_err(|e| permanent(format!("invalid URL: {e}")))?;
        // A copy dials the storage VM core named (mutual TLS on core's CA); anything else is a
        // download from outside, through the SSRF guard.
        let client = match &record.spec.peer {
            Some(peer) => self
                .peers
                .client(peer, PEER_CONNECT_TIMEOUT)
                .await
                .map_err(|e| DownloadError::Transient(format!("{e:#}")))?,
            None => {
                crate::fetch::check_url(&url, &self.allow_internal).map_err(permanent)?;
                self.http.clone()
            }
        };
        let (dir, file, mut state, expected) = self.prepare(record, live, cancel).await?;
        let offset = state.written;
        let mut request = client.get(url.clone());
        if offset > 0
            && let Some(v) = &record.validator
        {
            request = request
                .header(reqwest::header::RANGE, format!("bytes={offset}-"))
                .header(reqwest::header::IF_RANGE, v);
        }
        let response = tokio::select! {
            r = request.send() => r.map_err(|e| classify_reqwest(&e))?,
            _ = cancel.cancelled() => return Err(DownloadError::Cancelled),
        };
        let status = response.status();
        let resumed = offset > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
        if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            return Err(permanent(format!("HTTP {status} from {}", response.url())));
        }
        if !status.is_success() {
            return Err(DownloadError::Transient(format!(
                "HTTP {status} from {}",
                response.url()
            )));
        }
        if offset > 0 && !resumed {
            // The server sent the whole file (no Range support, or the file changed): start over.
            info!(job.id = %record.id, "Server did not resume; downloading from the start");
            return Err(DownloadError::Transient(self.restart(record).await));
        }
        if resumed {
            let start = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(offset) {
                return Err(DownloadError::Transient(self.restart(record).await));
            }
        }
        let total = response.content_length().map(|len| len + offset);
        if let Some(total) = total {
            if total > self.settings.max_size {
                return Err(permanent(format!(
                    "download is {total} bytes, over the {} byte limit",
                    self.settings.max_size
                )));
            }
            live.total.store(total, Ordering::Relaxed);
            record.progress.total = Some(total);
        }
        if !resumed {
            record.validator = validator(response.headers());
        }

        let feed = Feed::spawn(
            response.bytes_stream(),
            FetchTask {
                hasher: state.download_hasher.take(),
                stall: self.settings.stall_timeout,
                max: self.settings.max_size,
                bytes: offset,
            },
            total,
            true,
            true,
        );
        let (download_hasher, _) = self
            .pump(record, live, cancel, &dir, &file, &mut state, feed)
            .await?;
        self.install(record, live, &dir, &mut state, download_hasher, expected.as_ref())
            .await
    }

    /// Opens the install of a job: its directory (with the fencing epoch recorded before any data),
    /// its part file, and the hashes and inspector, rebuilt from the part file's flushed bytes when
    /// the job resumes. Returns the directory, the part file, the state and the expected checksum.
    pub(crate) async fn prepare(
        &self,
        record: &mut JobRecord,
        live: &LiveProgress,
        cancel: &CancellationToken,
    ) -> Result<(String, FileId, InstallState, Option<Checksum>), DownloadError> {
        let (format, expected) = record.spec.validate().map_err(|e| permanent(format!("{e:#}")))?;
        let dir = record.spec.path.trim_matches('/').to_owned();
        if record.file_name.is_empty() {
            record.file_name = format!("{}.{}", random_uuid(), format.extension());
            self.save(record).await;
        }
        let part = format!("{dir}/{}.part", record.file_name);
        let algo = expected.as_ref().map_or(ChecksumAlgo::Sha256, |c| c.algo);
        // INVARIANT: the epoch is recorded beside the install before any data is written; once it
        // is, the directory is never created again (a delete stays a delete).
        sync_epoch(record, live);
        if record.epoch > 0 && record.epoch_recorded {
            self.check_fence(record, live, &dir).await?;
        } else {
            self.store.create_dir_all(&dir).await?;
            if record.epoch > 0 {
                crate::fence::record(&self.store, &dir, record.epoch).await?;
                record.epoch_recorded = true;
                self.save(record).await;
                self.check_fence(record, live, &dir).await?;
            }
        }

        // Resume point: only flushed bytes of an uncompressed download with a validator.
        let mut state = InstallState::new(format, algo);
        let mut file = None;
        if record.durable_offset > 0
            && !record.compressed
            && (record.validator.is_some() || record.spec.upload)
        {
            match self.store.open_file(&part).await {
                Ok((id, size)) if size >= record.durable_offset => {
                    state
                        .replay(&self.store, &id, record.durable_offset, live, cancel)
                        .await?;
                    record.resumes += 1;
                    info!(job.id = %record.id, offset = record.durable_offset, "Resuming download");
                    file = Some(id);
                }
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let file = match file {
            Some(f) => f,
            None => {
                record.durable_offset = 0;
                record.validator = None;
                state = InstallState::new(format, algo);
                self.store.create(&part).await?
            }
        };
        live.bytes.store(state.written, Ordering::Relaxed);

        Ok((dir, file, state, expected))
    }

    /// Streams a feed into the part file: decompression (when the feed allows it and starts at
    /// zero), inspector and installed hash, bounded concurrent writes, checkpoints with fence
    /// checks. Returns the download hash and the bytes received once the feed ended well.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn pump(
        &self,
        record: &mut JobRecord,
        live: &LiveProgress,
        cancel: &CancellationToken,
        dir: &str,
        file: &FileId,
        state: &mut InstallState,
        feed: Feed,
    ) -> Result<(Option<Hasher>, u64), DownloadError> {
        let offset = state.written;
        let total = feed.total;
        let Feed {
            rx,
            task: fetch_handle,
            live_bytes,
            ..
        } = feed;
        // StreamReader is itself buffered (it lends the current chunk): no extra copy here.
        let mut reader = StreamReader::new(tokio_stream_from(rx));

        let compression = if offset == 0 && feed.decompress {
            let head = reader
                .fill_buf()
                .await
                .map_err(|e| DownloadError::Transient(e.to_string()))?;
            Compression::detect(head)
        } else {
            Compression::None
        };
        record.compressed = compression != Compression::None;
        if record.compressed {
            state.separate_installed_hash();
        }
        self.save(record).await;
        let mut body: Box<dyn AsyncRead + Unpin + Send> = match compression {
            Compression::None => Box::new(reader),
            Compression::Gzip => {
                let mut d = async_compression::tokio::bufread::GzipDecoder::new(reader);
                d.multiple_members(true);
                Box::new(d)
            }
            Compression::Bzip2 => Box::new(async_compression::tokio::bufread::BzDecoder::new(reader)),
            Compression::Xz => Box::new(async_compression::tokio::bufread::XzDecoder::new(reader)),
            Compression::Zstd => Box::new(async_compression::tokio::bufread::ZstdDecoder::new(reader)),
            Compression::Zip => zip_first_entry(reader).await?,
        };

        // Install side: decompressed blocks → inspector, installed hash, store writes.
        let mut writes: JoinSet<Result<(), StoreError>> = JoinSet::new();
        let mut last_checkpoint = (state.written, Instant::now());
        let mut checkpoint: Option<(u64, tokio::task::JoinHandle<Result<(), StoreError>>)> = None;
        let mut last_report = Instant::now();
        let mut last_bytes = offset;
        loop {
            if cancel.is_cancelled() {
                fetch_handle.abort();
                return Err(DownloadError::Cancelled);
            }
            let mut block = BytesMut::with_capacity(BLOCK);
            while block.len() < BLOCK {
                match body.read_buf(&mut block).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        drain(&mut writes).await?;
                        // Dropping the reader closes the channel, so the fetch task ends at once.
                        drop(body);
                        let error = fetch_error(fetch_handle, e).await;
                        if matches!(error, DownloadError::Transient(_)) && !record.compressed {
                            // Keep what arrived: everything written so far becomes the resume point.
                            if let Some((_, flush)) = checkpoint.take() {
                                let _ = finish_checkpoint(flush).await;
                            }
                            if self.store.flush(file).await.is_ok() {
                                record.durable_offset = state.written;
                                self.save(record).await;
                            }
                        }
                        return Err(error);
                    }
                }
            }
            if block.is_empty() {
                break;
            }
            let block = block.freeze();
            state.feed(&block)?;
            if state.written > self.settings.max_size {
                fetch_handle.abort();
                return Err(permanent(format!(
                    "image is over the {} byte limit",
                    self.settings.max_size
                )));
            }
            while writes.len() >= self.settings.write_concurrency.max(1) {
                join_one(&mut writes).await?;
            }
            let store = self.store.clone();
            let id = file.clone();
            let at = state.written - block.len() as u64;
            writes.spawn(async move { store.write_at(&id, at, block).await });

            let now_bytes = live_bytes.load(Ordering::Relaxed);
            live.bytes.store(now_bytes, Ordering::Relaxed);
            if last_report.elapsed() >= Duration::from_secs(1) {
                let secs = last_report.elapsed().as_secs_f64();
                record.progress = progress(now_bytes, total, ((now_bytes - last_bytes) as f64 / secs) as u64);
                live.rate.store(record.progress.rate, Ordering::Relaxed);
                last_report = Instant::now();
                last_bytes = now_bytes;
            }
            // Checkpoints: once the writes below an offset are done, a flush runs beside the
            // pipeline; when it completes, that offset becomes the resume point.
            if checkpoint.as_ref().is_some_and(|(_, flush)| flush.is_finished())
                && let Some((at, flush)) = checkpoint.take()
            {
                finish_checkpoint(flush).await?;
                record.durable_offset = at;
                self.save(record).await;
            }
            if checkpoint.is_none()
                && !record.compressed
                && (state.written - last_checkpoint.0 >= self.settings.checkpoint_every
                    || last_checkpoint.1.elapsed() >= self.settings.checkpoint_interval)
            {
                if let Err(e) = self.check_fence(record, live, dir).await {
                    fetch_handle.abort();
                    drain(&mut writes).await?;
                    return Err(e);
                }
                drain(&mut writes).await?;
                let (store, id) = (self.store.clone(), file.clone());
                checkpoint = Some((state.written, tokio::spawn(async move { store.flush(&id).await })));
                last_checkpoint = (state.written, Instant::now());
            }
        }
        drain(&mut writes).await?;
        if let Some((_, flush)) = checkpoint.take() {
            finish_checkpoint(flush).await?;
        }
        let (download_hasher, downloaded) = match fetch_handle.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(DownloadError::Transient(format!("download task failed: {e}"))),
        };
        if feed.flush_at_end {
            self.store.flush(file).await?;
            if !record.compressed {
                record.durable_offset = state.written;
            }
        }
        live.bytes.store(downloaded, Ordering::Relaxed);
        record.progress = progress(downloaded, total, 0);
        self.save(record).await;
        if let Some(total) = total.filter(|_| feed.exact)
            && downloaded != total
        {
            return Err(DownloadError::Transient(format!(
                "connection closed after {downloaded} of {total} bytes"
            )));
        }

        Ok((download_hasher, downloaded))
    }

    /// Verifies what the part file holds (format, then the checksum of the received bytes) and
    /// installs it: rename into place, then `template.properties` last, each only while this run
    /// still holds the install.
    pub(crate) async fn install(
        &self,
        record: &mut JobRecord,
        live: &LiveProgress,
        dir: &str,
        state: &mut InstallState,
        download_hasher: Option<Hasher>,
        expected: Option<&Checksum>,
    ) -> Result<Installed, DownloadError> {
        // Verify: format, then checksum of the downloaded bytes.
        let (inspection, installed_sum) = state.finish(download_hasher.as_ref())?;
        let download_sum = download_hasher
            .map(Hasher::finalize)
            .ok_or_else(|| permanent("download hash missing"))?;
        if let Some(expected) = &expected
            && !expected.matches(&download_sum.hex)
        {
            return Err(permanent(format!(
                "checksum mismatch: expected {expected}, downloaded {download_sum}"
            )));
        }

        // Install: rename into place, then template.properties last; each only while this run
        // still holds the install.
        let final_path = format!("{dir}/{}", record.file_name);
        let part = format!("{final_path}.part");
        self.check_fence(record, live, dir).await?;
        self.store.rename(&part, &final_path).await?;
        let (account, template_id) = install_ids(dir).map_err(|e| permanent(format!("{e:#}")))?;
        let properties = TemplateProperties {
            id: template_id.clone(),
            unique_name: format!("{template_id}-{account}-{}", record.id),
            description: if record.spec.description.is_empty() {
                record
                    .spec
                    .url
                    .parse::<reqwest::Url>()
                    .ok()
                    .and_then(|u| {
                        u.path_segments()
                            .and_then(|mut s| s.next_back())
                            .map(str::to_owned)
                    })
                    .unwrap_or_default()
            } else {
                record.spec.description.clone()
            },
            format: inspection.format,
            filename: record.file_name.clone(),
            size: inspection.physical_size,
            virtual_size: inspection.virtual_size,
            checksum: Some(download_sum.clone()),
            hvm: true,
            public: true,
        };
        let text = properties.to_java_properties(&httpdate_comment());
        if let Err(e) = self.check_fence(record, live, dir).await {
            // Ours, and not installed: remove it.
            if let Err(error) = self.store.remove_file(&final_path).await {
                warn!(job.id = %record.id, %error, "Failed to remove the image of a fenced run");
            }
            return Err(e);
        }
        self.store
            .write_file_atomic(&format!("{dir}/template.properties"), text.as_bytes())
            .await?;
        Ok(Installed {
            file: final_path,
            format: inspection.format.name().to_owned(),
            physical_size: inspection.physical_size,
            virtual_size: inspection.virtual_size,
            download_checksum: download_sum.to_string(),
            installed_sha256: installed_sum.hex,
        })
    }

    /// Whether this run still holds the install (see [`crate::fence`]): [`DownloadError::Fenced`]
    /// when a newer run or a delete took over.
    async fn check_fence(
        &self,
        record: &mut JobRecord,
        live: &LiveProgress,
        dir: &str,
    ) -> Result<(), DownloadError> {
        sync_epoch(record, live);
        if live.fenced.load(Ordering::Relaxed) {
            return Err(DownloadError::Fenced);
        }
        if crate::fence::check(&self.store, dir, record.epoch, record.epoch_recorded).await? {
            Ok(())
        } else {
            warn!(job.id = %record.id, epoch = record.epoch, "A newer run or a delete took over the install; stopping");
            Err(DownloadError::Fenced)
        }
    }

    /// Drops the partial file so the next attempt starts from zero; returns why.
    async fn restart(&self, record: &mut JobRecord) -> String {
        self.discard_part(record).await;
        self.save(record).await;
        "server did not resume the download; restarting from the start".into()
    }
}

/// Takes a higher epoch the job adopted (a re-sent download) into its record.
fn sync_epoch(record: &mut JobRecord, live: &LiveProgress) {
    record.epoch = record.epoch.max(live.epoch.load(Ordering::Relaxed));
}

/// Hashes and inspector of the installed (decompressed) stream.
pub(crate) struct InstallState {
    inspector: Option<Inspector>,
    /// Hash of the downloaded bytes (moves to the fetch task while it runs).
    pub(crate) download_hasher: Option<Hasher>,
    /// SHA-256 of the installed bytes, when it differs from the download hash.
    installed_hasher: Option<Hasher>,
    /// Bytes fed so far (the part file's length once the writes are done).
    pub(crate) written: u64,
}

impl InstallState {
    fn new(format: ImageFormat, algo: ChecksumAlgo) -> Self {
        InstallState {
            inspector: Some(Inspector::new(format)),
            download_hasher: Some(Hasher::new(algo)),
            // Uncompressed and SHA-256: the download hash is the installed hash; hash once.
            installed_hasher: (algo != ChecksumAlgo::Sha256).then(|| Hasher::new(ChecksumAlgo::Sha256)),
            written: 0,
        }
    }

    /// The download is compressed: installed bytes differ from downloaded bytes.
    fn separate_installed_hash(&mut self) {
        if self.installed_hasher.is_none() {
            self.installed_hasher = Some(Hasher::new(ChecksumAlgo::Sha256));
        }
    }

    fn feed(&mut self, block: &[u8]) -> Result<(), DownloadError> {
        if let Some(inspector) = &mut self.inspector {
            inspector.update(block).map_err(|e| permanent(e.to_string()))?;
        }
        if let Some(h) = &mut self.installed_hasher {
            h.update(block);
        }
        self.written += block.len() as u64;
        Ok(())
    }

    /// Rebuilds the state from the first `len` bytes of the part file (uncompressed: downloaded bytes
    /// are installed bytes).
    async fn replay(
        &mut self,
        store: &Store,
        file: &FileId,
        len: u64,
        live: &LiveProgress,
        cancel: &CancellationToken,
    ) -> Result<(), DownloadError> {
        while self.written < len {
            if cancel.is_cancelled() {
                return Err(DownloadError::Cancelled);
            }
            let want = (len - self.written).min(4 * BLOCK as u64) as usize;
            let data = store.read_at(file, self.written, want).await?;
            if data.is_empty() {
                return Err(DownloadError::Transient(
                    "partial download shorter than recorded".into(),
                ));
            }
            if let Some(h) = &mut self.download_hasher {
                h.update(&data);
            }
            self.feed(&data)?;
            live.bytes.store(self.written, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Finishes the inspector and the installed hash.
    fn finish(
        &mut self,
        download: Option<&Hasher>,
    ) -> Result<(crate::inspect::Inspection, Checksum), DownloadError> {
        let inspection = self
            .inspector
            .take()
            .ok_or_else(|| permanent("inspector missing"))?
            .finish()
            .map_err(|e| permanent(e.to_string()))?;
        let installed = match self.installed_hasher.take() {
            Some(h) => h.finalize(),
            None => download
                .cloned()
                .map(Hasher::finalize)
                .ok_or_else(|| permanent("download hash missing"))?,
        };
        Ok((inspection, installed))
    }
}

/// The fetch side: reads the body with a stall timeout and a size cap, hashing what it reads.
pub(crate) struct FetchTask {
    /// Hash of the received bytes (taken from [`InstallState`], given back at the end).
    pub(crate) hasher: Option<Hasher>,
    /// A body that delivers nothing for this long fails.
    pub(crate) stall: Duration,
    /// Most bytes (counting from the start of the file, not of this body).
    pub(crate) max: u64,
    /// Bytes before this body (the resume offset).
    pub(crate) bytes: u64,
}

impl FetchTask {
    async fn run<S, E>(
        mut self,
        stream: S,
        tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
        live: Arc<AtomicU64>,
    ) -> Result<(Option<Hasher>, u64), DownloadError>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Send,
        E: std::error::Error + Send,
    {
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = match tokio::time::timeout(self.stall, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let msg = format!("transfer stalled: no data for {} s", self.stall.as_secs());
                    let _ = tx.send(Err(std::io::Error::other(msg.clone()))).await;
                    return Err(DownloadError::Transient(msg));
                }
            };
            let Some(chunk) = next else { break };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("transfer interrupted: {}", error_chain(&e));
                    let _ = tx.send(Err(std::io::Error::other(msg.clone()))).await;
                    return Err(DownloadError::Transient(msg));
                }
            };
            self.bytes += chunk.len() as u64;
            if self.bytes > self.max {
                let msg = format!("the image is over the {} byte limit", self.max);
                let _ = tx.send(Err(std::io::Error::other(msg.clone()))).await;
                return Err(DownloadError::TooLarge(msg));
            }
            if let Some(h) = &mut self.hasher {
                h.update(&chunk);
            }
            live.store(self.bytes, Ordering::Relaxed);
            if tx.send(Ok(chunk)).await.is_err() {
                // The install side stopped; it reports why.
                return Err(DownloadError::Transient(INSTALL_STOPPED.into()));
            }
        }
        Ok((self.hasher, self.bytes))
    }
}

/// Bytes on their way into an install: a channel fed by a [`FetchTask`] over some body.
pub(crate) struct Feed {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    task: tokio::task::JoinHandle<Result<(Option<Hasher>, u64), DownloadError>>,
    live_bytes: Arc<AtomicU64>,
    /// Bytes the whole file will have, when known (progress; checked when `exact`).
    total: Option<u64>,
    /// A body that ends before `total` failed (a download's Content-Length).
    exact: bool,
    /// Compressed content is decompressed (only when the feed starts at zero).
    decompress: bool,
    /// The part file is flushed when the feed ends, and the resume point moves there (else it
    /// moves only at checkpoints: a tus PATCH that is not the last one).
    flush_at_end: bool,
}

impl Feed {
    /// Starts `fetch` reading `stream`.
    pub(crate) fn spawn<S, E>(
        stream: S,
        fetch: FetchTask,
        total: Option<u64>,
        exact: bool,
        decompress: bool,
    ) -> Feed
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::error::Error + Send + 'static,
    {
        // Room for a few MiB of body chunks between the fetch side and the install side.
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let live_bytes = Arc::new(AtomicU64::new(fetch.bytes));
        let task = tokio::spawn(fetch.run(stream, tx, live_bytes.clone()));
        Feed {
            rx,
            task,
            live_bytes,
            total,
            exact,
            decompress,
            flush_at_end: true,
        }
    }

    /// No flush when the feed ends (the caller flushes often enough on its own).
    pub(crate) fn without_final_flush(mut self) -> Feed {
        self.flush_at_end = false;
        self
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The error of a failed read: the fetch task's own error when the body failed (network, stall,
/// size), else the read error itself (a corrupt compressed stream, which retrying cannot fix).
async fn fetch_error(
    handle: tokio::task::JoinHandle<Result<(Option<Hasher>, u64), DownloadError>>,
    read: std::io::Error,
) -> DownloadError {
    match handle.await {
        Ok(Err(DownloadError::Transient(m))) if m == INSTALL_STOPPED => {
            permanent(format!("cannot decompress the download: {read}"))
        }
        Ok(Err(e)) => e,
        _ => permanent(format!("cannot decompress the download: {read}")),
    }
}

async fn finish_checkpoint(
    flush: tokio::task::JoinHandle<Result<(), StoreError>>,
) -> Result<(), DownloadError> {
    match flush.await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(DownloadError::Transient(format!("store flush task failed: {e}"))),
    }
}

async fn join_one(writes: &mut JoinSet<Result<(), StoreError>>) -> Result<(), DownloadError> {
    match writes.join_next().await {
        Some(Ok(r)) => r.map_err(Into::into),
        Some(Err(e)) => Err(DownloadError::Transient(format!("store write task failed: {e}"))),
        None => Ok(()),
    }
}

async fn drain(writes: &mut JoinSet<Result<(), StoreError>>) -> Result<(), DownloadError> {
    while !writes.is_empty() {
        join_one(writes).await?;
    }
    Ok(())
}

/// Opens the first entry of a zip archive read as a stream (local file header, then deflate or stored data).
async fn zip_first_entry<R>(mut reader: R) -> Result<Box<dyn AsyncRead + Unpin + Send>, DownloadError>
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    let mut head = [0u8; 30];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|e| permanent(format!("zip header unreadable: {e}")))?;
    let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if u32_at(0) != 0x0403_4b50 {
        return Err(permanent("not a zip archive"));
    }
    let flags = u16_at(6);
    let method = u16_at(8);
    let compressed_size = u64::from(u32_at(18));
    let skip = u64::from(u16_at(26)) + u64::from(u16_at(28));
    if flags & 1 != 0 {
        return Err(permanent("encrypted zip archives are not supported"));
    }
    tokio::io::copy(&mut (&mut reader).take(skip), &mut tokio::io::sink())
        .await
        .map_err(|e| permanent(format!("zip header unreadable: {e}")))?;
    match method {
        8 => Ok(Box::new(async_compression::tokio::bufread::DeflateDecoder::new(
            reader,
        ))),
        0 if flags & 8 == 0 => Ok(Box::new(reader.take(compressed_size))),
        0 => Err(permanent("stored zip entries without sizes are not supported")),
        other => Err(permanent(format!(
            "zip compression method {other} is not supported (use deflate)"
        ))),
    }
}

fn progress(bytes: u64, total: Option<u64>, rate: u64) -> Progress {
    Progress {
        bytes,
        total,
        percent: total
            .filter(|t| *t > 0)
            .map(|t| (bytes as f64 * 100.0 / t as f64).min(100.0)),
        rate,
    }
}

/// A strong validator for `If-Range`: a strong ETag, else Last-Modified.
fn validator(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let etag = headers.get(reqwest::header::ETAG).and_then(|v| v.to_str().ok());
    match etag {
        Some(e) if !e.starts_with("W/") => Some(e.to_owned()),
        _ => headers
            .get(reqwest::header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

fn classify_reqwest(e: &reqwest::Error) -> DownloadError {
    let chain = error_chain(e);
    if chain.contains("refusing to download from internal address") || e.is_redirect() || e.is_builder() {
        permanent(chain)
    } else {
        DownloadError::Transient(chain)
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // Fall back to time-derived bytes; uniqueness within one install directory is all that matters.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The date comment Java writes at the top of a properties file.
fn httpdate_comment() -> String {
    format!("written by ssvm-agent at unix time {}", crate::job::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_compression() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::detect(b"BZh91AY"), Compression::Bzip2);
        assert_eq!(
            Compression::detect(&[0xfd, b'7', b'z', b'X', b'Z', 0]),
            Compression::Xz
        );
        assert_eq!(Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(Compression::detect(b"PK\x03\x04"), Compression::Zip);
        assert_eq!(Compression::detect(b"QFI\xfb"), Compression::None);
    }

    #[test]
    fn validators_prefer_strong_etags() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::LAST_MODIFIED,
            "Tue, 24 Nov 2026 10:00:00 GMT".parse().unwrap(),
        );
        assert_eq!(validator(&h).as_deref(), Some("Tue, 24 Nov 2026 10:00:00 GMT"));
        h.insert(reqwest::header::ETAG, "W/\"weak\"".parse().unwrap());
        assert_eq!(validator(&h).as_deref(), Some("Tue, 24 Nov 2026 10:00:00 GMT"));
        h.insert(reqwest::header::ETAG, "\"strong\"".parse().unwrap());
        assert_eq!(validator(&h).as_deref(), Some("\"strong\""));
    }

    #[test]
    fn uuids_look_like_uuids() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, random_uuid());
    }

    #[tokio::test]
    async fn zip_entries_stream() {
        // A zip with one stored entry "a.img" holding "hello".
        let mut zip = Vec::new();
        zip.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        zip.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        zip.extend_from_slice(&0u32.to_le_bytes()); // crc (unchecked)
        zip.extend_from_slice(&5u32.to_le_bytes());
        zip.extend_from_slice(&5u32.to_le_bytes());
        zip.extend_from_slice(&5u16.to_le_bytes());
        zip.extend_from_slice(&0u16.to_le_bytes());
        zip.extend_from_slice(b"a.imghello-trailing-central-directory");
        let mut r = zip_first_entry(tokio::io::BufReader::new(std::io::Cursor::new(zip)))
            .await
            .unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello");
    }
}
