//! `systemvm-core`: the management service of the Mold system-VM suite. This milestone builds its
//! foundation: the CloudStack-compatible query API (`/client/api`) and its persistent state.
//!
//! # Architecture notes
//!
//! * **Code map** (layers: HTTP handlers → domain layer ← background parts; ARCHITECTURE.md).
//!   Handlers: [`server`] (limits, auth, dispatch), [`command`] (what a command is), [`api`] (one
//!   file per resource, the command table, the async job runner), [`params`], [`paging`],
//!   [`error`] (CloudStack's error shape, the edge mapping of domain and fleet errors). Domain:
//!   [`model`]. Background parts: [`agent`] (the agent endpoint), [`dispatch`], [`follow`],
//!   [`fleet`]. Shared: [`state`], [`hub`], [`limits`], [`db`], [`ca`], [`secrets`], [`signing`], [`util`].
//! * **One schema, two backends, through `sqlx::AnyPool`.** SQLite (`DATA_DIR/core.db`) by default,
//!   PostgreSQL with `--database-url postgres://…`. `AnyPool` was chosen over an enum of
//!   `SqlitePool`/`PgPool` because it keeps a single copy of every query: the schema is written in
//!   portable SQL (TEXT, BIGINT; UUID text keys, so no AUTOINCREMENT/SERIAL difference; flags are
//!   BIGINT 0/1, keeping to the two types `Any` maps the same way on both drivers; dates are
//!   CloudStack text in UTC) and queries use `$n` placeholders, which SQLite also accepts. The price is that
//!   `Any` only maps basic types and offers no compile-time checking; both backends run every API
//!   end-to-end test, which is what keeps the SQL portable.
//! * **Migrations** are embedded (`include_str!`) and applied by [`db`] itself, each in a
//!   transaction with its `schema_migrations` row; no `sqlx` macros or `migrate` feature are needed.
//! * **Sessions** (`command=login`) live in the database (`model::sessions`): a restart or a
//!   failover keeps users logged in.
//!
//! Architecture invariant: every response is CloudStack-shaped JSON with exactly one top-level key
//! and HTTP status = `errorcode`; XML (`response=xml`) is not served — JSON is always answered.
//!
//! Architecture invariant: no command runs without authentication, except `login` and requests on
//! the integration listener, which binds 127.0.0.1 only and is off unless `integration.api.port`
//! is set (read at start).
//!
//! Architecture invariant: secrets (API secret keys, passwords, session keys) never reach a log;
//! passwords are stored only as Argon2id hashes; `credentials.json` is written 0600 via
//! temp-file + rename.
//!
//! Architecture invariant: the keys core keeps in the database (console-token keys, the agent
//! CA key) are stored encrypted with the secrets key ([`secrets`]), which lives outside the
//! database (`DATA_DIR/secrets.key` or `--secrets-key`): a database dump alone forges no token.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, RwLock};

pub mod agent;
pub mod api;
pub mod backup;
pub mod ca;
pub mod cli;
pub mod command;
pub mod db;
pub mod dispatch;
pub mod error;
pub mod fleet;
pub mod follow;
pub mod hub;
pub mod limits;
pub mod model;
pub mod paging;
pub mod replicate;
pub mod roles;
pub mod secrets;
pub mod server;
pub mod state;
pub mod up;
pub mod util;

pub use systemvm_api_request::{params, signing};

/// The CloudStack API version this suite answers as (`listCapabilities`): the stock UI 4.22
/// and Ansible read it to pick features.
pub const CLOUDSTACK_VERSION: &str = "4.22.0.0";

use crate::state::{Role, Shared, State};

/// How to run the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Data directory (SQLite database, `credentials.json`, the agent CA, `secrets.key`).
    pub data_dir: PathBuf,
    /// Address of the public API listener.
    pub listen: SocketAddr,
    /// `postgres://…` (or `sqlite:…`); `None` = SQLite file `DATA_DIR/core.db`.
    pub database_url: Option<String>,
    /// Address of the agent endpoint (TLS WebSocket at `/agent`); `None` = no agent endpoint.
    /// The CLI defaults to `0.0.0.0:8250`; the library leaves it off so tests do not collide.
    pub agent_listen: Option<SocketAddr>,
    /// Extra subject alternative names (DNS names or IP addresses) of the agent endpoint's
    /// certificate, besides loopback, `localhost` and the host name.
    pub agent_sans: Vec<String>,
    /// The hypervisor driver of the system VMs core deploys; `None` = core deploys nothing
    /// (agents are registered and started by hand).
    pub driver: Option<DriverKind>,
    /// Agent endpoint URLs given to the VMs core starts (`--core`); default: this core's endpoint
    /// (loopback when it listens on every address). With two cores, list both.
    pub agent_urls: Vec<String>,
    /// Drivers of hypervisor hosts whose guest VMs' consoles core resolves by name
    /// (`addConsoleTarget hypervisorvm=NAME`).
    pub guest_drivers: Vec<Arc<dyn fleet::Driver>>,
    /// Connection and time limits of the API listeners.
    pub api_limits: server::ApiLimits,
    /// The secrets key file, which encrypts the keys core stores in the database (console-token
    /// keys, the agent CA key); `None` = `DATA_DIR/secrets.key`, created on first start. Every
    /// core on one database needs the same key: point a second core at the first one's file.
    pub secrets_key: Option<PathBuf>,
}

/// How long a clean stop waits for in-flight API requests, agent closes and the other tasks.
pub const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Which driver runs the system VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverKind {
    /// Local processes (`console-proxy`, `ssvm-agent` from the directory of the running
    /// executable, or `SYSTEMVM_BIN_DIR`).
    Process,
    /// QEMU guests on this host (`qemu-system-x86_64` from `PATH`), booting `boot` with
    /// `memory_mib` MiB; core adds `10.0.2.2` (the host as the guests see it) to its agent
    /// endpoint's certificate.
    Qemu {
        /// What the system VMs boot.
        boot: fleet::qemu::Boot,
        /// Memory per VM, MiB.
        memory_mib: u32,
    },
    /// libvirt domains on the host of `uri` (through `virsh`), booting `boot`.
    Libvirt {
        /// The libvirt URI.
        uri: String,
        /// What the system VMs boot.
        boot: fleet::qemu::Boot,
        /// Memory per VM, MiB.
        memory_mib: u32,
    },
}

impl CoreConfig {
    /// Defaults: listen on 127.0.0.1:8080, SQLite in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            database_url: None,
            agent_listen: None,
            agent_sans: Vec::new(),
            driver: None,
            agent_urls: Vec::new(),
            guest_drivers: Vec::new(),
            api_limits: server::ApiLimits::default(),
            secrets_key: None,
        }
    }
}

/// A core serving in the background: call [`RunningCore::shutdown`] to stop it (dropping it aborts
/// its tasks without the clean stop).
#[derive(Debug)]
pub struct RunningCore {
    /// The public API's bound address (`http://ADDR/client/api`).
    pub addr: SocketAddr,
    /// The integration listener's address, when `integration.api.port` > 0.
    pub integration_addr: Option<SocketAddr>,
    /// `DATA_DIR/credentials.json`.
    pub credentials_path: PathBuf,
    /// The agent endpoint's bound address, when [`CoreConfig::agent_listen`] is set.
    pub agent_addr: Option<SocketAddr>,
    /// `DATA_DIR/ca.pem`: the CA agents verify core with (`--ca`).
    pub ca_path: PathBuf,
    /// The secrets key file ([`CoreConfig::secrets_key`]): a second core on this database needs
    /// a copy of it.
    pub secrets_key_path: PathBuf,
    state: State,
    tasks: systemvm_task::Tasks,
}

impl RunningCore {
    /// The API endpoint URL.
    pub fn api_url(&self) -> String {
        format!("http://{}/client/api", self.addr)
    }

    /// The agent endpoint URL (`wss://ADDR/agent`), when it listens.
    pub fn agent_url(&self) -> Option<String> {
        self.agent_addr.map(|a| format!("wss://{a}{}", agent::PATH))
    }

    /// The console-token keys core gives console proxies (for issuing tokens).
    pub fn console_keys(&self) -> systemvm_proto::console::KeySet {
        self.state.console_keys()
    }

    /// Whether system VM `id`'s agent is connected to this core now.
    pub fn agent_connected(&self, id: &str) -> bool {
        self.state.agents.connection(id).is_some()
    }

    /// Whether this core holds the leader lease.
    pub fn is_leader(&self) -> bool {
        self.state.is_leader()
    }

    /// This core's instance id (the owner of the jobs it runs, the lease holder's name).
    pub fn instance_id(&self) -> &str {
        &self.state.instance_id
    }

    /// Stops core (as [`RunningCore::shutdown`]) and then the processes/domains of every system
    /// VM it manages, without changing what core wants of them: started again, core starts them
    /// again (`up` on Ctrl-C; tests). The fleet manager stops first, so it can't restart them.
    pub async fn shutdown_with_system_vms(self) {
        self.tasks.shutdown(SHUTDOWN_DEADLINE).await;
        if let Some(fleet) = self.state.fleet.get() {
            fleet::lifecycle::stop_all_with_core(&self.state, fleet).await;
        }
        self.state.jobs.lock().await.shutdown().await;
        self.state.db.pool.close().await;
    }

    /// Stops as a crash would (tests of HA): tasks are aborted, sockets close, the lease is not
    /// released (the standby must wait for it to expire) and nothing is flushed.
    pub async fn abort(self) {
        self.tasks.abort().await;
        self.state.agents.close_all();
        self.state.jobs.lock().await.shutdown().await;
        self.state.db.pool.close().await;
    }

    /// Stops the listeners, aborts running async jobs (the next start fails them) and closes the
    /// database pool.
    pub async fn shutdown(self) {
        self.tasks.shutdown(SHUTDOWN_DEADLINE).await;
        self.state.jobs.lock().await.shutdown().await;
        self.state.db.pool.close().await;
    }
}

/// The `credentials.json` content (0600): the root admin's API keys, name and password.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// API key of the root admin.
    pub apikey: String,
    /// Secret key of the root admin.
    pub secretkey: String,
    /// The root admin's user name (log in to the UI with it, domain ROOT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The root admin's password as set at first start (changing it with `updateUser` does not
    /// update this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

fn write_credentials(path: &Path, creds: &Credentials) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("failed to create {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(creds)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// Creates the data directory (0700) and, for SQLite, the database file (0600) before sqlx opens
/// it: both hold secrets (API secret keys).
fn prepare_data_dir(dir: &Path, sqlite: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    if sqlite {
        let db = dir.join("core.db");
        if !db.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&db)
                .with_context(|| format!("failed to create {}", db.display()))?;
        }
    }
    Ok(())
}

/// First start: the root admin account and user, its password and keys, `credentials.json`,
/// the default zone. A `credentials.json` from before passwords were written gets one (the old
/// random password was never shown to anyone).
async fn bootstrap(state: &State, credentials: &Path) -> anyhow::Result<()> {
    use model::directory::{accounts, users};
    if !accounts::any(state).await? {
        let password = util::random_token::<18>()?;
        let (_, user_id) = accounts::create(
            state,
            None,
            &accounts::NewAccount {
                account: "admin",
                domain_id: None,
                username: "admin",
                password: &password,
                email: "admin@localhost",
                firstname: "Root",
                lastname: "Admin",
                timezone: None,
                network_domain: None,
                role: Role::RootAdmin,
                is_system: true,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("failed to create the root admin: {e}"))?;
        let (apikey, secretkey) = users::new_keys(state, &user_id)
            .await
            .map_err(|e| anyhow::anyhow!("failed to create the root admin's keys: {e}"))?;
        write_credentials(
            credentials,
            &Credentials {
                apikey,
                secretkey,
                username: Some("admin".into()),
                password: Some(password),
            },
        )?;
        tracing::info!(path = %credentials.display(), "Created the root admin and wrote its password and API keys");
    } else if !credentials.exists() {
        tracing::warn!(path = %credentials.display(), "Credentials file missing; the root admin keys are in the database only");
    } else {
        let text = std::fs::read_to_string(credentials)
            .with_context(|| format!("failed to read {}", credentials.display()))?;
        let mut creds: Credentials = serde_json::from_str(&text)
            .with_context(|| format!("failed to parse {}", credentials.display()))?;
        if creds.password.is_none()
            && let Some(root) = model::directory::auth::root_admin(state).await?
        {
            let password = util::random_token::<18>()?;
            users::set_password(state, &root.caller.user_id, &password)
                .await
                .map_err(|e| anyhow::anyhow!("failed to set the root admin's password: {e}"))?;
            creds.username = Some(root.caller.username.clone());
            creds.password = Some(password);
            write_credentials(credentials, &creds)?;
            tracing::info!(path = %credentials.display(), "Gave the root admin a password and wrote it beside its keys");
        }
    }
    api::zones::ensure_default_zone(state)
        .await
        .map_err(|e| anyhow::anyhow!("failed to create the default zone: {}", e.text))?;
    Ok(())
}

fn kind_name(kind: &DriverKind) -> &'static str {
    match kind {
        DriverKind::Process => "process",
        DriverKind::Qemu { .. } => "qemu",
        DriverKind::Libvirt { .. } => "libvirt",
    }
}

/// The driver that runs the system VMs of `kind`, keeping per-VM files under `vm_root`.
fn make_driver(kind: &DriverKind, vm_root: PathBuf) -> anyhow::Result<Arc<dyn fleet::Driver>> {
    Ok(match kind {
        DriverKind::Process => Arc::new(
            fleet::process::ProcessDriver::beside_current_exe(vm_root)
                .context("the process driver cannot run")?,
        ),
        DriverKind::Libvirt {
            uri,
            boot,
            memory_mib,
        } => Arc::new(fleet::libvirt::LibvirtDriver {
            uri: uri.clone(),
            vm_root,
            boot: boot.clone(),
            memory_mib: *memory_mib,
        }),
        DriverKind::Qemu { boot, memory_mib } => Arc::new(fleet::qemu::QemuDriver {
            qemu: fleet::qemu::find_qemu().context("the qemu driver cannot run")?,
            vm_root,
            boot: boot.clone(),
            memory_mib: *memory_mib,
        }),
    })
}

/// Opens the database, bootstraps on first start, binds the listeners, then takes part in the
/// leader lease (a core that cannot bind leaves no lease behind) and starts its tasks.
pub async fn start(config: CoreConfig) -> anyhow::Result<RunningCore> {
    prepare_data_dir(&config.data_dir, config.database_url.is_none())?;
    let db = db::Db::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .context("failed to open the database")?;
    let settings = model::settings::load(&db.pool).await?;
    let secrets_key_path = config
        .secrets_key
        .clone()
        .unwrap_or_else(|| config.data_dir.join(secrets::FILE));
    let secrets = secrets::SecretsKey::open_or_create(&secrets_key_path, &db.pool)
        .await
        .context("failed to load the secrets key")?;
    let console_keys = model::consoles::load_keys(&db.pool, &secrets)
        .await
        .context("failed to load the console-token keys")?;
    let transfer_keys = model::keyrings::load(&db.pool, &secrets, model::keyrings::Ring::Transfer)
        .await
        .context("failed to load the transfer keys")?;
    let ca = Arc::new(
        ca::Ca::load_shared(&config.data_dir, &db.pool, &secrets)
            .await
            .context("failed to set up the agent CA")?,
    );
    let state: State = Arc::new(Shared {
        db,
        ca: ca.clone(),
        settings: RwLock::new(settings),
        settings_changed: tokio::sync::Notify::new(),
        jobs_wakeup: tokio::sync::Notify::new(),
        data_dir: config.data_dir.clone(),
        jobs: Mutex::new(tokio::task::JoinSet::new()),
        console_keys: std::sync::RwLock::new(console_keys),
        transfer_keys: std::sync::RwLock::new(transfer_keys),
        cert_serial: std::sync::atomic::AtomicU64::new(0),
        secrets,
        agents: hub::Hub::default(),
        dispatch_wakeup: tokio::sync::Notify::new(),
        dispatched: std::sync::Mutex::new(HashMap::new()),
        instance_id: util::new_uuid()?,
        leader: std::sync::atomic::AtomicBool::new(false),
        fleet: std::sync::OnceLock::new(),
        guest_drivers: config.guest_drivers.clone(),
    });
    // This core is alive from now on; jobs of cores that are not are failed (never the jobs of
    // the other core, which keeps its heartbeat fresh).
    fleet::lease::heartbeat(&state.db, &state.instance_id)
        .await
        .context("failed to record this core in the database")?;
    let orphans = api::job_runner::fail_orphans(&state.db).await?;
    if orphans > 0 {
        tracing::warn!(
            orphans,
            "Failed async jobs left pending by a management server that is gone"
        );
    }
    let credentials_path = config.data_dir.join("credentials.json");
    bootstrap(&state, &credentials_path).await?;

    // Every listener is bound before this core takes part in the lease.
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to bind the API listener on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let port =
        u16::try_from(model::settings::int(&state, &model::settings::INTEGRATION_PORT).await).unwrap_or(0);
    let integration = if port > 0 {
        Some(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .await
                .with_context(|| format!("failed to bind the integration port 127.0.0.1:{port}"))?,
        )
    } else {
        None
    };
    let agent_listener = match config.agent_listen {
        Some(listen) => {
            let mut sans = config.agent_sans.clone();
            if matches!(config.driver, Some(DriverKind::Qemu { .. })) {
                sans.push(fleet::qemu::HOST_FROM_GUEST.to_owned());
            }
            let tls = ca
                .server_config(&sans)
                .context("failed to issue the agent endpoint certificate")?;
            let l = TcpListener::bind(listen)
                .await
                .with_context(|| format!("failed to bind the agent endpoint on {listen}"))?;
            Some((l, tls))
        }
        None => None,
    };
    if config.driver.is_some() && agent_listener.is_none() {
        anyhow::bail!("a driver needs the agent endpoint (agent_listen) for its system VMs to dial in");
    }
    let driver = match &config.driver {
        Some(kind) => Some(make_driver(kind, config.data_dir.join("systemvms"))?),
        None => None,
    };
    let leader = fleet::lease::try_acquire(&state.db, &state.instance_id)
        .await
        .context("failed to read the leader lease")?;
    state.leader.store(leader, std::sync::atomic::Ordering::SeqCst);
    if !leader {
        tracing::warn!("Another core holds the leader lease: this core serves the API and stands by");
    }
    let mut tasks = systemvm_task::Tasks::new();
    let st = state.clone();
    tasks.spawn("lease", |s| fleet::lease::run(st, s.receiver()));
    let st = state.clone();
    tasks.spawn("job-runner", |s| api::job_runner::run(st, s.receiver()));
    let st = state.clone();
    tasks.spawn("follower", |s| follow::run(st, s.receiver()));
    let st = state.clone();
    let api_limits = config.api_limits;
    tasks.spawn("api", |s| {
        server::serve(listener, st, server::Listener::Public, api_limits, s.receiver())
    });
    let mut integration_addr = None;
    if let Some(l) = integration {
        integration_addr = Some(l.local_addr()?);
        tracing::warn!(
            port,
            "Integration API port open on loopback: unauthenticated root-admin access"
        );
        let st = state.clone();
        tasks.spawn("integration-api", |s| {
            server::serve(l, st, server::Listener::Integration, api_limits, s.receiver())
        });
    }
    let mut agent_addr = None;
    if let Some((l, tls)) = agent_listener {
        let a = l.local_addr()?;
        agent_addr = Some(a);
        let st = state.clone();
        tasks.spawn("agent-endpoint", |s| agent::serve(l, tls, st, s.receiver()));
        let st = state.clone();
        tasks.spawn("agent-monitor", |s| agent::monitor(st, s.receiver()));
        let st = state.clone();
        tasks.spawn("dispatcher", |s| dispatch::run(st, s.receiver()));
        let st = state.clone();
        tasks.spawn("snapshot-runner", |s| backup::run(st, s.receiver()));
        let st = state.clone();
        tasks.spawn("replicator", |s| replicate::run(st, s.receiver()));
        tracing::info!(addr = %a, ca = %ca.cert_path.display(), "Agent endpoint listening");
        if let Some(kind) = &config.driver {
            let Some(driver) = driver.clone() else {
                anyhow::bail!("no driver built for {}", kind_name(kind));
            };
            let urls = if config.agent_urls.is_empty() {
                let host = if a.ip().is_unspecified() {
                    std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
                } else {
                    a
                };
                vec![format!("wss://{host}{}", agent::PATH)]
            } else {
                config.agent_urls.clone()
            };
            let mut f = fleet::Fleet::new(driver, urls, ca.cert_path.clone());
            f.vm_root = config.data_dir.join("systemvms");
            f.zone_boot = match kind {
                DriverKind::Qemu { boot, memory_mib } | DriverKind::Libvirt { boot, memory_mib, .. } => {
                    Some((boot.clone(), *memory_mib))
                }
                DriverKind::Process => None,
            };
            let f = Arc::new(f);
            let _ = state.fleet.set(f.clone());
            let st = state.clone();
            tasks.spawn("fleet-manager", |s| fleet::run(st, f, s.receiver()));
            tracing::info!(driver = kind_name(kind), "Fleet manager running");
        }
    }
    tracing::info!(%addr, backend = ?state.db.backend, "Core API listening");
    Ok(RunningCore {
        addr,
        integration_addr,
        credentials_path,
        agent_addr,
        ca_path: ca.cert_path.clone(),
        secrets_key_path,
        state,
        tasks,
    })
}
