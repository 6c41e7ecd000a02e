//! The storage agent's link to systemvm-core (`serve --core …`): dials core's agent endpoint with
//! `systemvm-agent-client`, reports jobs and store health/capacity in heartbeats, and runs core's
//! commands (download, cancel, delete an install), reporting job progress; hands the transfer keys
//! and the operator's certificate to the transfer server.
//!
//! Invariants:
//! * a heartbeat never waits on the store: the load is refreshed by its own task (every
//!   [`REFRESH`]) and heartbeats send the latest copy, so a hung NFS server cannot silence the
//!   agent (core would then mark a live agent Disconnected);
//! * a download command is idempotent by job id (it is the local API's submit): sent again after
//!   a reconnect it reports the existing job and re-attaches its progress, never a second download;
//! * a command naming a store this agent does not serve is refused, never run on another store;
//! * one progress watcher per job, ending with the job's final state; every report carries the
//!   job's fencing epoch (core drops those of an older run);
//! * a download re-sent with a higher epoch raises the running job's epoch; a delete with an
//!   epoch fences the downloads into that install first ([`Agent::delete_install`]);
//! * core's settings (`Welcome.config`, then every `ConfigUpdate`) go to
//!   [`Agent::apply_core_config`] as a whole map, in the order they arrive.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;

use systemvm_agent_client::{AgentClient, AnswerFuture, ClientConfig, Hooks, Outbox, unsupported};
use systemvm_proto::agent::{
    AgentCommand, AgentMessage, AgentRole, Answer, Command, InstalledImage, JobPhase, JobProgress, Load,
    StorageLoad,
};

use crate::job::{JobRecord, JobState};
use crate::service::{Agent, Submit};
use crate::store::StoreUrl;

/// How often a watched job's progress is sent to core.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the reported load is refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);

pub use systemvm_agent_client::CoreLink;

/// The running link.
#[derive(Debug)]
pub struct RunningLink {
    client: AgentClient,
    refresher: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl RunningLink {
    /// The client (status).
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Stops the link.
    pub async fn shutdown(self) {
        self.refresher.abort();
        self.watcher.abort();
        self.client.shutdown().await;
    }
}

/// What the link carries beside jobs: where core's transfer keys go, and the transfer server's
/// URL core builds upload and download URLs from.
#[derive(Debug, Default)]
pub struct LinkOptions {
    /// Receives the transfer keys from `Welcome` and `TransferKeysUpdate`.
    pub keys: crate::transfer::TransferKeys,
    /// The transfer server's base URL, when it runs.
    pub endpoint: Option<String>,
    /// Receives the operator's certificate (`Welcome`, `CertificateUpdate`).
    pub cert: Arc<systemvm_agent_client::tls::ServerCert>,
    /// Receives this storage VM's peer certificate (`Welcome`), for copies between zones.
    pub peers: Option<Arc<crate::peer::Peers>>,
}

/// Starts the link (no transfer server).
pub fn connect(agent: Arc<Agent>, link: &CoreLink) -> anyhow::Result<RunningLink> {
    connect_with(agent, link, LinkOptions::default())
}

/// Starts the link.
pub fn connect_with(agent: Arc<Agent>, link: &CoreLink, options: LinkOptions) -> anyhow::Result<RunningLink> {
    let mut config = ClientConfig::new(
        &link.urls,
        &link.ca,
        AgentRole::SecStorage,
        link.vm_id.clone(),
        link.secret.clone(),
    )?;
    config.capabilities = vec!["download".into()];
    if options.endpoint.is_some() {
        config.capabilities.extend(["upload".into(), "extract".into()]);
    }
    config.endpoint = options.endpoint;
    config.software_version = env!("CARGO_PKG_VERSION").into();
    let latest = Arc::new(Mutex::new(StorageLoad {
        store_health: "unknown".into(),
        ..Default::default()
    }));
    let writer = latest.clone();
    let agent_for_commands = agent.clone();
    let agent_for_config = agent.clone();
    let refresher = tokio::spawn(async move {
        loop {
            let load = agent.storage_load().await;
            *writer.lock().unwrap_or_else(PoisonError::into_inner) = load;
            tokio::time::sleep(REFRESH).await;
        }
    });
    let (outbox, start) = AgentClient::prepare();
    let runner = Arc::new(Runner {
        agent: agent_for_commands,
        outbox,
        watched: Mutex::new(HashSet::new()),
    });
    // Jobs that begin outside core's commands (uploads) are watched too; one-shot uploads a
    // restart ended are reported once the channel is up.
    let mut started = runner.agent.subscribe_started();
    let for_started = runner.clone();
    let watcher = tokio::spawn(async move {
        let interrupted = for_started.agent.take_interrupted();
        if !interrupted.is_empty() {
            tokio::time::sleep(PROGRESS_INTERVAL).await;
            for record in interrupted {
                for_started
                    .outbox
                    .send(AgentMessage::JobProgress(progress_of(&record)));
            }
        }
        loop {
            match started.recv().await {
                // A job that already ended (an expired upload) is reported once; others watched.
                Ok(record) if record.state.is_final() => {
                    for_started
                        .outbox
                        .send(AgentMessage::JobProgress(progress_of(&record)));
                }
                Ok(record) => for_started.watch(&record),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let keys = options.keys;
    let cert = options.cert;
    let peers = options.peers;
    let hooks = Hooks {
        peer_identity: Arc::new(move |identity| {
            if let Some(peers) = &peers {
                match peers.set(&identity) {
                    Ok(()) => tracing::info!("Installed the peer certificate from core"),
                    Err(error) => tracing::warn!(%error, "Refused the peer certificate from core"),
                }
            }
        }),
        certificate: Arc::new(
            move |c| match cert.set_pem(&c.chain_pem, c.key_pem.expose(), c.serial) {
                Ok(true) => {
                    tracing::info!(serial = c.serial, domain = %c.domain_suffix, "Installed the certificate from core")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "Refused the certificate from core; keeping the current one")
                }
            },
        ),
        load: Arc::new(move || Load {
            console: None,
            storage: Some(latest.lock().unwrap_or_else(PoisonError::into_inner).clone()),
        }),
        keys: Arc::new(|_| {}),
        transfer_keys: Arc::new(move |k| match k.to_key_set() {
            Ok(set) => {
                tracing::info!(ids = ?set.ids(), "Installed transfer keys from core");
                keys.set(set);
            }
            Err(error) => tracing::warn!(%error, "Ignored invalid transfer keys from core"),
        }),
        config: Arc::new(move |config| agent_for_config.apply_core_config(&config)),
        command: Arc::new(move |c| -> AnswerFuture {
            let runner = runner.clone();
            Box::pin(async move { runner.run(c).await })
        }),
    };
    Ok(RunningLink {
        client: start(config, hooks),
        refresher,
        watcher,
    })
}

/// Runs core's commands.
struct Runner {
    agent: Arc<Agent>,
    outbox: Outbox,
    watched: Mutex<HashSet<String>>,
}

/// A job record as core's progress message.
pub fn progress_of(r: &JobRecord) -> JobProgress {
    let state = match r.state {
        JobState::Queued => JobPhase::Queued,
        JobState::Running => JobPhase::Running,
        JobState::Completed => JobPhase::Completed,
        JobState::Failed => JobPhase::Failed,
        JobState::Cancelled => JobPhase::Cancelled,
    };
    let percent = match r.state {
        JobState::Completed => 100,
        _ => r.progress.percent.map_or(0, |p| p.clamp(0.0, 100.0) as u8),
    };
    JobProgress {
        id: r.id.clone(),
        percent,
        status: format!("{:?}", r.state).to_lowercase(),
        state: Some(state),
        bytes: r.progress.bytes,
        total: r.progress.total,
        error: r.error.clone(),
        installed: r.installed.as_ref().map(|i| InstalledImage {
            file: i.file.clone(),
            format: i.format.clone(),
            physical_size: i.physical_size,
            virtual_size: i.virtual_size,
            sha256: i.installed_sha256.clone(),
        }),
        // Core drops the reports of a run older than the install's current epoch.
        epoch: (r.epoch > 0).then_some(r.epoch),
    }
}

impl Runner {
    fn answer(c: &Command, r: anyhow::Result<serde_json::Value>) -> Answer {
        match r {
            Ok(body) => Answer {
                id: c.id.clone(),
                ok: true,
                body,
                error: None,
            },
            Err(e) => Answer {
                id: c.id.clone(),
                ok: false,
                body: serde_json::Value::Null,
                error: Some(format!("{e:#}")),
            },
        }
    }

    fn check_store(&self, url: &str) -> anyhow::Result<()> {
        let asked: StoreUrl = url
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid store URL {url:?}: {e}"))?;
        anyhow::ensure!(
            &asked == self.agent.store_url(),
            "this storage VM serves {}, not {url}",
            self.agent.store_url()
        );
        Ok(())
    }

    async fn run(self: Arc<Self>, c: Command) -> Answer {
        let Some(typed) = c.typed() else {
            tracing::warn!(body = %c.body, "Unsupported command from core");
            return unsupported(&c);
        };
        let r = match typed {
            AgentCommand::Download(d) => match self.check_store(&d.store_url) {
                Ok(()) => {
                    let submit = Submit {
                        id: Some(d.job_id.clone()),
                        url: d.url,
                        path: d.path,
                        format: d.format,
                        checksum: d.checksum,
                        description: d.description,
                        epoch: d.epoch,
                        peer: d.peer,
                    };
                    match self.agent.submit(submit).await {
                        Ok((_, record)) => {
                            self.watch(&record);
                            serde_json::to_value(progress_of(&record)).map_err(Into::into)
                        }
                        Err((status, msg)) => Err(anyhow::anyhow!("{msg} ({status})")),
                    }
                }
                Err(e) => Err(e),
            },
            AgentCommand::CancelJob { job_id } => {
                let cancelled = self.agent.cancel(&job_id);
                Ok(serde_json::json!({ "cancelled": cancelled }))
            }
            AgentCommand::DeleteInstall {
                store_url,
                path,
                epoch,
            } => match self.check_store(&store_url) {
                Ok(()) => self
                    .agent
                    .delete_install(&path, epoch)
                    .await
                    .map(|removed| serde_json::json!({ "removed": removed })),
                Err(e) => Err(e),
            },
            AgentCommand::SnapshotBackup(cmd) => match self.check_store(&cmd.store_url) {
                Ok(()) => self.snapshot(cmd).await,
                Err(e) => Err(e),
            },
            AgentCommand::SnapshotRestore(cmd) => self.restore(cmd).await,
            AgentCommand::DeleteSnapshot { store_url, path } => match self.check_store(&store_url) {
                Ok(()) => self.delete_snapshot(&path).await,
                Err(e) => Err(e),
            },
            AgentCommand::Replicate(cmd) => match self.check_store(&cmd.store_url) {
                Ok(()) => self.replicate(cmd).await,
                Err(e) => Err(e),
            },
            AgentCommand::DeleteObject { target, key } => crate::replica::delete(&target, &key)
                .await
                .map(|()| serde_json::json!({ "removed": true }))
                .map_err(Into::into),
            AgentCommand::FetchObject(cmd) => match self.check_store(&cmd.store_url) {
                Ok(()) => self.fetch_object(cmd).await,
                Err(e) => Err(e),
            },
            AgentCommand::PresignObject {
                target,
                key,
                expires_secs,
            } => crate::replica::presign(&target, &key, std::time::Duration::from_secs(expires_secs))
                .await
                .map(|url| serde_json::json!({ "url": url }))
                .map_err(Into::into),
            AgentCommand::ProbeObjectStore { target } => crate::replica::probe(&target)
                .await
                .map(|()| serde_json::json!({}))
                .map_err(Into::into),
        };
        Self::answer(&c, r)
    }

    /// Runs a snapshot backup into this agent's store (`snapshots/…` only).
    async fn snapshot(
        &self,
        cmd: systemvm_proto::agent::SnapshotCommand,
    ) -> anyhow::Result<serde_json::Value> {
        let plain = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
        let dir = cmd.dir.trim_matches('/');
        anyhow::ensure!(
            dir.starts_with("snapshots/") && dir.split('/').all(plain),
            "snapshot directory {:?} is not under snapshots/",
            cmd.dir
        );
        anyhow::ensure!(plain(&cmd.name), "invalid snapshot file name {:?}", cmd.name);
        let extents = match cmd.incremental {
            None => crate::snapshot::Extents::Allocated,
            Some(i) => {
                anyhow::ensure!(plain(&i.backing), "invalid backing file name {:?}", i.backing);
                crate::snapshot::Extents::Dirty {
                    context: i.context,
                    backing: i.backing,
                }
            }
        };
        let store = self.agent.downloader_now().store;
        let b = if let Some(file) = cmd.file {
            anyhow::ensure!(
                extents == crate::snapshot::Extents::Allocated,
                "an image file is backed up in full only"
            );
            let (source, path) = self.image_store(&file).await?;
            let mut chain =
                crate::snapshot::Chain::open(&source, &path, crate::snapshot::Format::parse(&file.format)?)
                    .await?;
            crate::snapshot::copy_image(
                &mut chain,
                &store,
                (dir, &cmd.name),
                crate::snapshot::Format::Qcow2,
                cmd.max_rate,
            )
            .await?
        } else {
            let spec = crate::snapshot::BackupSpec {
                nbd: cmd.nbd,
                export: cmd.export,
                extents,
                dir: dir.to_owned(),
                name: cmd.name,
                max_rate: cmd.max_rate,
            };
            crate::snapshot::backup(&store, &spec).await?
        };
        tracing::info!(file = %b.file, bytes_read = b.bytes_read, resumed = b.resumed, "Snapshot backed up");
        Ok(serde_json::to_value(
            systemvm_proto::agent::SnapshotBackedUp::from(b),
        )?)
    }

    /// The store an image lives on and its checked path: this agent's own store, or another
    /// NFS export (primary storage), opened for this command.
    async fn image_store(
        &self,
        image: &systemvm_proto::agent::ImageRef,
    ) -> anyhow::Result<(crate::store::Store, String)> {
        let path = image.path.trim_matches('/');
        anyhow::ensure!(
            !path.is_empty()
                && path
                    .split('/')
                    .all(|s| !s.is_empty() && s != "." && s != ".." && !s.chars().any(char::is_control)),
            "invalid image path {:?}",
            image.path
        );
        let url: StoreUrl = image
            .store_url
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid store URL {:?}: {e}", image.store_url))?;
        if &url == self.agent.store_url() {
            return Ok((self.agent.downloader_now().store, path.to_owned()));
        }
        anyhow::ensure!(
            url.is_nfs(),
            "{} is neither this storage VM's store nor an NFS export",
            image.store_url
        );
        let store = crate::store::Store::open(&url, crate::store::StoreOptions::default())
            .await
            .with_context(|| format!("cannot reach {}", image.store_url))?;
        Ok((store, path.to_owned()))
    }

    /// Removes a snapshot's image, and its directory when that leaves it empty.
    async fn delete_snapshot(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let plain = |s: &str| !s.is_empty() && s != "." && s != "..";
        anyhow::ensure!(
            path.starts_with("snapshots/") && path.split('/').all(plain) && path.split('/').count() >= 3,
            "snapshot path {path:?} is not under snapshots/"
        );
        let store = self.agent.downloader_now().store;
        // What an interrupted backup of it left, too.
        for leftover in [format!("{path}.part.journal"), format!("{path}.part")] {
            let _ = store.remove_file(&leftover).await;
        }
        let removed = match store.remove_file(path).await {
            Ok(()) => true,
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(e.into()),
        };
        if let Some((dir, _)) = path.rsplit_once('/')
            && store.list_dir(dir).await.is_ok_and(|d| d.is_empty())
        {
            let _ = store.remove_dir(dir).await;
        }
        tracing::info!(path, removed, "Snapshot image deleted");
        Ok(serde_json::json!({ "removed": removed }))
    }

    /// Copies a file of this agent's store (an artefact: `template/`, `snapshots/`, `volumes/`) to
    /// an object store.
    async fn replicate(
        &self,
        cmd: systemvm_proto::agent::ReplicateCommand,
    ) -> anyhow::Result<serde_json::Value> {
        artefact_path(&cmd.path)?;
        sha256_hex(&cmd.sha256)?;
        let store = self.agent.downloader_now().store;
        let r = crate::replica::replicate(&store, &cmd.path, &cmd.sha256, &cmd.target, &cmd.key).await?;
        tracing::info!(path = %cmd.path, key = %r.key, parts = r.parts, resumed = r.resumed_parts, "Replica complete");
        Ok(serde_json::to_value(r)?)
    }

    /// Brings a replica back into this agent's store (`template/`, `snapshots/`, `volumes/`).
    async fn fetch_object(
        &self,
        cmd: systemvm_proto::agent::FetchObjectCommand,
    ) -> anyhow::Result<serde_json::Value> {
        artefact_path(&cmd.path)?;
        sha256_hex(&cmd.sha256)?;
        let store = self.agent.downloader_now().store;
        let f = crate::replica::fetch(&store, &cmd.path, &cmd.key, &cmd.sha256, &cmd.target).await?;
        Ok(serde_json::to_value(f)?)
    }

    /// Writes an image and its backing chain, flattened, to another file (a restore).
    async fn restore(&self, cmd: systemvm_proto::agent::RestoreCommand) -> anyhow::Result<serde_json::Value> {
        let from_format = crate::snapshot::Format::parse(&cmd.from.format)?;
        let to_format = crate::snapshot::Format::parse(&cmd.to.format)?;
        let (source, from) = self.image_store(&cmd.from).await?;
        let (dest, to) = self.image_store(&cmd.to).await?;
        let mut chain = crate::snapshot::Chain::open(&source, &from, from_format).await?;
        let (dir, name) = to.rsplit_once('/').unwrap_or(("", to.as_str()));
        if let Some(t) = &cmd.template {
            let own = cmd.to.store_url.parse::<StoreUrl>().ok().as_ref() == Some(self.agent.store_url());
            let parts: Vec<&str> = dir.split('/').collect();
            anyhow::ensure!(
                own && parts.len() == 4
                    && parts[..2] == ["template", "tmpl"]
                    && parts[3] == t.id
                    && crate::job::install_ids(dir).is_ok(),
                "a template is written into this storage VM's store under template/tmpl/<account>/{}/, not {to:?}",
                t.id
            );
        }
        let b = crate::snapshot::copy_image(&mut chain, &dest, (dir, name), to_format, None).await?;
        if let Some(t) = &cmd.template {
            let account = dir.split('/').nth(2).unwrap_or_default();
            let properties = crate::properties::TemplateProperties {
                id: t.id.clone(),
                unique_name: format!("{}-{account}-{}", t.id, t.id),
                description: t.description.clone(),
                format: match to_format {
                    crate::snapshot::Format::Qcow2 => crate::inspect::ImageFormat::Qcow2,
                    crate::snapshot::Format::Raw => crate::inspect::ImageFormat::Raw,
                },
                filename: name.to_owned(),
                size: b.physical_size,
                virtual_size: b.virtual_size,
                checksum: crate::checksum::Checksum::new(crate::checksum::ChecksumAlgo::Sha256, &b.sha256)
                    .ok(),
                hvm: true,
                public: t.public,
            };
            let text = properties.to_java_properties(&format!(
                "written by ssvm-agent at unix time {}",
                crate::job::now()
            ));
            if let Err(e) = dest
                .write_file_atomic(
                    &format!("{dir}/{}", crate::properties::TEMPLATE_PROPERTIES),
                    text.as_bytes(),
                )
                .await
            {
                // Without its properties the image is not an install: it goes.
                let _ = dest.remove_file(&b.file).await;
                return Err(e.into());
            }
        }
        tracing::info!(from = %from, to = %b.file, bytes_read = b.bytes_read, "Snapshot restored");
        Ok(serde_json::to_value(
            systemvm_proto::agent::SnapshotBackedUp::from(b),
        )?)
    }

    /// Sends the job's progress to core until it ends (one watcher per job).
    fn watch(self: &Arc<Self>, record: &JobRecord) {
        if record.state.is_final() {
            return;
        }
        if !self
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(record.id.clone())
        {
            return;
        }
        let runner = self.clone();
        let id = record.id.clone();
        tokio::spawn(async move {
            let mut last: Option<JobProgress> = None;
            loop {
                tokio::time::sleep(PROGRESS_INTERVAL).await;
                let record = match runner.agent.status(&id).await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(job.id = %id, error = %format!("{error:#}"), "Job status unreadable");
                        continue;
                    }
                };
                let p = progress_of(&record);
                let changed = last
                    .as_ref()
                    .is_none_or(|l| l.percent != p.percent || l.state != p.state || l.bytes != p.bytes);
                if changed {
                    runner.outbox.send(AgentMessage::JobProgress(p.clone()));
                    last = Some(p);
                }
                if record.state.is_final() {
                    break;
                }
            }
            runner
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }
}

/// A path under `template/`, `snapshots/` or `volumes/`, without `.` or `..` components.
fn artefact_path(path: &str) -> anyhow::Result<()> {
    let plain = |s: &str| !s.is_empty() && s != "." && s != "..";
    anyhow::ensure!(
        ["template/", "snapshots/", "volumes/"]
            .iter()
            .any(|p| path.starts_with(p))
            && path.split('/').all(plain),
        "{path:?} is not an artefact of the store"
    );
    Ok(())
}

/// A SHA-256 in hex.
fn sha256_hex(s: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()),
        "a replica needs the file's SHA-256 (64 hex digits)"
    );
    Ok(())
}
