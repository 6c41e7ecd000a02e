//! `ssvm-agent`: register templates/ISOs from URLs into secondary storage, list what a store holds,
//! or run as a service with a local JSON job API.
#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ssvm_agent::download::{DownloadSettings, Downloader, LiveProgress};
use ssvm_agent::fetch::{self, AllowList, FetchConfig};
use ssvm_agent::job::{DownloadSpec, JobRecord, JobState, Journal, derived_job_id, valid_job_id};
use ssvm_agent::store::{Store, StoreOptions, StoreUrl};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Secondary storage agent: templates and ISOs from URLs into NFS or local storage"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Downloads, verifies and installs one template or ISO; exit 0 only when installed and verified.
    /// Run again after an interruption, the same job resumes.
    Download {
        #[command(flatten)]
        store: StoreArgs,
        /// Source URL (http or https).
        #[arg(long)]
        url: String,
        /// Install directory, template/tmpl/ACCOUNT/ID.
        #[arg(long)]
        path: String,
        /// Declared format: QCOW2, RAW, VHD, ISO or OVA.
        #[arg(long)]
        format: String,
        /// Expected checksum of the downloaded bytes, '{ALGO}hex' (no prefix = MD5).
        #[arg(long)]
        checksum: Option<String>,
        /// Job id (default: derived from store, path and URL, so a re-run resumes).
        #[arg(long)]
        job_id: Option<String>,
        /// Description for template.properties.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Lists the templates and ISOs of a store, with their properties, as JSON lines.
    Inventory {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Runs the agent as a service: resumes journalled jobs and serves the local job API.
    Serve {
        #[command(flatten)]
        store: StoreArgs,
        /// Address of the local JSON job API.
        #[arg(long, default_value = "127.0.0.1:8200")]
        listen: SocketAddr,
        /// Jobs downloading at once.
        #[arg(long, default_value_t = 4)]
        concurrent_jobs: usize,
        /// Address of the transfer server browsers reach (signed uploads, download links);
        /// none without it. It serves only what core signed, so it needs --core.
        #[arg(long)]
        public_listen: Option<SocketAddr>,
        /// The base URL browsers reach the transfer server at (default: http://PUBLIC-LISTEN);
        /// core builds upload and download URLs from it.
        #[arg(long)]
        public_url: Option<String>,
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        core: systemvm_agent_client::CoreArgs,
    },
}

#[derive(Args)]
struct StoreArgs {
    /// Secondary storage: nfs://HOST[:PORT]/EXPORT[?mountport=N] or file:///PATH.
    #[arg(long)]
    store: String,
    /// The URL core knows the store by, when this agent reaches it at another address (NAT, a
    /// VM on QEMU's user network): reported to core and accepted in its commands as this store.
    #[arg(long, value_name = "URL")]
    store_as: Option<String>,
    /// Local directory for the job journal. Default: on the store itself,
    /// STORE/.ssvm-journal/AGENT-ID/, so the journal outlives the system VM.
    #[arg(long, env = "SSVM_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Names this agent's journal on the store (default: --vm-id when linked to core, else
    /// host-HOSTNAME).
    #[arg(long, env = "SSVM_AGENT_ID")]
    agent_id: Option<String>,
    /// Seconds an NFS call may take before the store is marked unhealthy.
    #[arg(long, default_value_t = 30)]
    nfs_timeout: u64,
    /// NFS connections per store (parallel writes).
    #[arg(long, default_value_t = 4)]
    nfs_connections: usize,
}

#[derive(Args)]
struct NetArgs {
    /// Internal range a download may reach anyway, e.g. 10.0.0.0/8 (repeatable). With --core,
    /// core's secstorage.allowed.internal.sites replaces it while core sends that setting.
    #[arg(long = "allow-internal")]
    allow_internal: Vec<ipnet::IpNet>,
    /// PEM bundle of trusted CAs for https.
    #[arg(long, default_value = fetch::DEFAULT_CA_BUNDLE)]
    ca_bundle: PathBuf,
    /// Seconds without data before a download is abandoned and retried.
    #[arg(long, default_value_t = 60)]
    stall_timeout: u64,
    /// Retries after transient failures.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Largest download in bytes. With --core, core's max.template.iso.size (GiB) replaces it while
    /// core sends that setting.
    #[arg(long, default_value_t = 50 << 30)]
    max_size: u64,
    /// Seconds between checkpoints of a download's resume point.
    #[arg(long, default_value_t = 5)]
    checkpoint_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    systemvm_telemetry::init_tracing(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let url: StoreUrl = args
        .store
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --store {:?}: {e}", args.store))?;
    let opts = StoreOptions {
        op_timeout: Duration::from_secs(args.nfs_timeout.max(1)),
        connections: args.nfs_connections.max(1),
        ..StoreOptions::default()
    };
    let store = Store::open(&url, opts)
        .await
        .with_context(|| format!("failed to open store {url}"))?;
    match &args.store_as {
        Some(alias) => {
            let alias: StoreUrl = alias
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid --store-as {alias:?}: {e}"))?;
            Ok(store.known_as(alias))
        }
        None => Ok(store),
    }
}

/// The job journal: in `--state-dir` when given, else on the store under the agent's id
/// (`--agent-id`, else core's VM id, else the host name).
async fn open_journal(args: &StoreArgs, store: &Store, vm_id: Option<&str>) -> anyhow::Result<Journal> {
    let journal = match &args.state_dir {
        Some(dir) => {
            let journal = Journal::open(dir)?;
            if let Some(fs) = volatile_fs(dir) {
                tracing::warn!(
                    state_dir = %dir.display(),
                    fs,
                    "The job journal is on a file system that does not survive a restart: jobs will start over (leave --state-dir out to keep the journal on the store)"
                );
            }
            journal
        }
        None => {
            let id = match (&args.agent_id, vm_id) {
                (Some(id), _) => id.clone(),
                (None, Some(vm)) => vm.to_owned(),
                (None, None) => format!("host-{}", host_name()),
            };
            Journal::on_store(store, &id).await?
        }
    };
    tracing::debug!(journal = %journal.location(), "Job journal");
    Ok(journal)
}

/// The kind of a memory-backed file system `dir` is on (lost at a restart), if it is on one.
fn volatile_fs(dir: &std::path::Path) -> Option<&'static str> {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    let st = rustix::fs::statfs(dir).ok()?;
    match u64::try_from(st.f_type).unwrap_or(0) {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The downloader for the command line's settings; its client reads `allow` (which starts as
/// `--allow-internal`), so `serve --core` can apply core's internal sites.
fn downloader(
    store: Store,
    journal: Journal,
    net: &NetArgs,
    allow: &AllowList,
) -> anyhow::Result<Downloader> {
    let fetch_config = FetchConfig {
        ca_bundle: net.ca_bundle.clone(),
        allow_internal: net.allow_internal.clone(),
        ..FetchConfig::default()
    };
    allow.set(net.allow_internal.clone());
    Ok(Downloader {
        http: fetch::client_with_allow_list(&fetch_config, allow)?,
        store,
        journal,
        settings: DownloadSettings {
            stall_timeout: Duration::from_secs(net.stall_timeout.max(1)),
            retries: net.retries,
            max_size: net.max_size,
            checkpoint_interval: Duration::from_secs(net.checkpoint_secs.max(1)),
            ..DownloadSettings::default()
        },
        allow_internal: Arc::new(net.allow_internal.clone()),
        peers: ssvm_agent::peer::Peers::none(),
    })
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    // A file size limit (RLIMIT_FSIZE) must fail the write that passes it (EFBIG: the job fails
    // with "no space"), not kill the agent with SIGXFSZ. The handler stays for the process's life.
    let _file_size_limit = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
        rustix::process::Signal::XFSZ.as_raw(),
    ))
    .context("failed to handle SIGXFSZ")?;
    match command {
        Command::Download {
            store,
            url,
            path,
            format,
            checksum,
            job_id,
            description,
            net,
        } => {
            let spec = DownloadSpec {
                url,
                path,
                format,
                checksum,
                description,
                upload: false,
                resumable: false,
                expires: 0,
                peer: None,
            };
            spec.validate()?;
            let store_args = store;
            let store = open_store(&store_args).await?;
            let journal = open_journal(&store_args, &store, None).await?;
            let id = job_id.unwrap_or_else(|| derived_job_id(&store.url().to_string(), &spec));
            anyhow::ensure!(valid_job_id(&id), "invalid job id {id:?}");
            let mut record = match journal.load(&id).await? {
                Some(r) if r.spec != spec => anyhow::bail!("job {id} exists with another specification"),
                Some(r) if r.state == JobState::Completed => {
                    println!("{}", serde_json::to_string(&r)?);
                    eprintln!("job {id} already completed");
                    return Ok(ExitCode::SUCCESS);
                }
                Some(r) => r,
                None => JobRecord::new(&id, spec, &store.url().to_string()),
            };
            let downloader = downloader(store, journal, &net, &AllowList::default())?;
            let live = Arc::new(LiveProgress::default());
            let cancel = CancellationToken::new();
            let bar = progress_bar(live.clone());
            let ctrl_c = cancel.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    ctrl_c.cancel();
                }
            });
            let state = downloader.run(&mut record, &live, &cancel).await;
            if let Some(bar) = bar {
                bar.abort();
            }
            println!("{}", serde_json::to_string(&record)?);
            if state == JobState::Completed {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "error: job {id} {:?}: {}",
                    state,
                    record.error.as_deref().unwrap_or("no reason recorded")
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Inventory { store } => {
            let store = open_store(&store).await?;
            for entry in ssvm_agent::inventory::scan(&store).await? {
                println!("{}", serde_json::to_string(&entry)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            store,
            listen,
            concurrent_jobs,
            public_listen,
            public_url,
            net,
            core,
        } => {
            let link = core.link()?;
            // Started by core's process driver: end with that core.
            let _parent = systemvm_agent_client::parent::exit_with_parent();
            let store_args = store;
            let store = open_store(&store_args).await?;
            let journal = open_journal(&store_args, &store, link.as_ref().map(|l| l.vm_id.as_str())).await?;
            let allow = AllowList::default();
            let mut downloader = downloader(store, journal, &net, &allow)?;
            // Copies between zones: this VM's side of the channel between storage VMs.
            let peers = match &link {
                Some(l) => ssvm_agent::peer::Peers::new(&l.vm_id, &l.ca)?,
                None => ssvm_agent::peer::Peers::none(),
            };
            downloader.peers = peers.clone();
            let agent = ssvm_agent::service::Agent::with_allow_list(downloader, allow, concurrent_jobs);
            let listener = ssvm_agent::service::bind(listen).await?;
            tracing::info!(addr = %listener.local_addr()?, "Storage agent API listening");
            let resumed = agent.resume_all().await?;
            if resumed > 0 {
                tracing::info!(resumed, "Resumed jobs from the journal");
            }
            let keys = ssvm_agent::transfer::TransferKeys::default();
            let cert = systemvm_agent_client::tls::ServerCert::new();
            let stop = CancellationToken::new();
            let mut endpoint = None;
            let transfer = match public_listen {
                Some(addr) => {
                    anyhow::ensure!(
                        link.is_some(),
                        "--public-listen needs --core (it serves what core signs)"
                    );
                    let listener = ssvm_agent::transfer::bind(addr).await?;
                    let local = listener.local_addr()?;
                    endpoint = Some(
                        public_url
                            .unwrap_or_else(|| format!("http://{local}"))
                            .trim_end_matches('/')
                            .to_owned(),
                    );
                    let vm_id = link.as_ref().map(|l| l.vm_id.clone());
                    let transfers = ssvm_agent::transfer::Transfers::new(
                        agent.clone(),
                        keys.clone(),
                        cert.clone(),
                        peers.clone(),
                        vm_id,
                    )?;
                    let stopped = stop.clone().cancelled_owned();
                    Some(tokio::spawn(ssvm_agent::transfer::serve(
                        transfers, listener, stopped,
                    )))
                }
                None => None,
            };
            let running_link = match &link {
                Some(link) => Some(ssvm_agent::core_link::connect_with(
                    agent.clone(),
                    link,
                    ssvm_agent::core_link::LinkOptions {
                        keys,
                        endpoint,
                        cert,
                        peers: Some(peers),
                    },
                )?),
                None => None,
            };
            let served = ssvm_agent::service::serve(agent, listener, async {
                let why = systemvm_task::stop_requested().await;
                tracing::info!(signal = why, "Shutting down");
                stop.cancel();
            })
            .await;
            if let Some(t) = transfer {
                systemvm_task::stop_within("transfer server", SHUTDOWN_DEADLINE, async {
                    if let Ok(Err(error)) = t.await {
                        tracing::warn!(error = %format!("{error:#}"), "Transfer server failed");
                    }
                })
                .await;
            }
            if let Some(l) = running_link {
                systemvm_task::stop_within("core link", SHUTDOWN_DEADLINE, l.shutdown()).await;
            }
            served?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How long the stop of the core link may take before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// A progress bar on a terminal; nothing otherwise.
fn progress_bar(live: Arc<LiveProgress>) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(tokio::spawn(async move {
        loop {
            let total = live.total.load(Ordering::Relaxed);
            if total > 0 {
                bar.set_length(total);
            }
            bar.set_position(live.bytes.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}
