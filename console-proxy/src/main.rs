//! `console-proxy`: serve consoles, make key sets, issue tokens (standalone mode).
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use console_proxy::config::{self, ProxyConfig, dto};
use systemvm_proto::Secret;
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, KeySet, ViewerMode, VmRef};

#[derive(Parser)]
#[command(
    version,
    about = "Console proxy: hypervisor VNC to stock noVNC in the browser over WebSocket"
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
    /// Writes a new token key set (file mode 0600).
    Keygen {
        /// Key file to write.
        #[arg(long)]
        out: PathBuf,
        /// Add a new primary key to an existing file instead of refusing to overwrite it (rotation).
        #[arg(long)]
        rotate: bool,
    },
    /// Serves the console page and the WebSocket.
    Serve {
        /// TOML configuration file (see `console_proxy::config::dto::ConfigFile`); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:8080] (8080 for ws://, 8443 for wss:// in a system VM).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Key file written by `keygen`.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// PEM certificate chain: serve https:// and wss://.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of the certificate.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Web root with console.html and node_modules/@novnc/novnc.
        #[arg(long, env = "CONSOLE_PROXY_WEB")]
        web: Option<PathBuf>,
        /// Web origin allowed to open consoles besides the proxy's own (repeatable).
        #[arg(long = "allowed-origin")]
        allowed_origins: Vec<String>,
        /// Most concurrent console sessions [default: 1000].
        #[arg(long)]
        max_sessions: Option<usize>,
        /// Seconds between WebSocket pings [default: 30]; a browser silent for three intervals is dropped.
        #[arg(long)]
        keepalive: Option<u64>,
        /// Seconds one write toward the browser may wait [default: 30]; a browser that stops reading
        /// is dropped after it.
        #[arg(long, value_name = "SECS")]
        write_timeout: Option<u64>,
        /// Seconds without keyboard, mouse or clipboard input after which a session is closed
        /// [default: 0 = never]. With --core, core's consoleproxy.session.timeout replaces it.
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// With --core: the base URL browsers reach this proxy at (core builds console links from
        /// it); default http(s)://LISTEN-ADDRESS.
        #[arg(long)]
        public_url: Option<String>,
        #[command(flatten)]
        core: systemvm_agent_client::CoreArgs,
    },
    /// Prints one console token (or a console URL with --url).
    Token {
        /// Key file written by `keygen`.
        #[arg(long)]
        keys: PathBuf,
        /// VNC server, HOST:PORT.
        #[arg(long)]
        vnc: String,
        /// VNC password (or set CONSOLE_PROXY_VNC_PASSWORD to keep it out of `ps`).
        #[arg(long, env = "CONSOLE_PROXY_VNC_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Seconds the token stays usable.
        #[arg(long, default_value_t = 300)]
        ttl: u64,
        /// VM id recorded in logs.
        #[arg(long, default_value = "")]
        vm_id: String,
        /// Name shown in the console page and as the desktop name.
        #[arg(long, default_value = "")]
        vm_name: String,
        /// Only this web origin may use the token (repeatable).
        #[arg(long = "origin")]
        origins: Vec<String>,
        /// Only a browser from this address may use the token.
        #[arg(long)]
        client_ip: Option<IpAddr>,
        /// Screen only: keyboard, mouse and clipboard input are dropped.
        #[arg(long)]
        view_only: bool,
        /// Guest keyboard layout, e.g. en-us.
        #[arg(long)]
        locale: Option<String>,
        /// Print `URL/console?token=…` for this proxy base URL instead of the bare token.
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { out, rotate } => keygen(&out, rotate),
        Command::Token {
            keys,
            vnc,
            password,
            ttl,
            vm_id,
            vm_name,
            origins,
            client_ip,
            view_only,
            locale,
            url,
        } => {
            let keys = config::load_keys(&keys)?;
            let (host, port) = vnc.rsplit_once(':').context("--vnc must be HOST:PORT")?;
            let port: u16 = port.parse().context("--vnc port must be a number")?;
            let now = console_proxy::unix_now();
            let claims = ConsoleTokenClaims {
                target: ConsoleTarget::Vnc {
                    host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                    port,
                    password: password.map(Secret),
                },
                vm: VmRef {
                    id: vm_id,
                    display_name: vm_name,
                },
                session_id: systemvm_proto::console::new_session_id()?,
                not_before: now,
                expires: now + ttl,
                client_ip,
                allowed_origins: origins,
                viewer: if view_only {
                    ViewerMode::ViewOnly
                } else {
                    ViewerMode::Interactive
                },
                keyboard_locale: locale,
            };
            let token = keys.seal(&claims)?;
            match url {
                Some(base) => println!("{}/console?token={token}", base.trim_end_matches('/')),
                None => println!("{token}"),
            }
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            keys,
            tls_cert,
            tls_key,
            web,
            allowed_origins,
            max_sessions,
            keepalive,
            write_timeout,
            idle_timeout,
            public_url,
            core,
        } => {
            let link = core.link()?;
            systemvm_telemetry::init_tracing(cli.log_json);
            let file = match &config {
                Some(path) => dto::ConfigFile::load(path)?,
                None => dto::ConfigFile::default(),
            };
            let flags = dto::ConfigFile {
                listen,
                keys,
                web,
                allowed_origins,
                max_sessions,
                keepalive_secs: keepalive,
                write_timeout_secs: write_timeout,
                idle_timeout_secs: idle_timeout,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| dto::TlsFiles { cert, key }),
                ..Default::default()
            };
            serve(
                config::from_file_and_flags_with(file, flags, link.is_none())?,
                link,
                public_url,
            )
        }
    }
}

#[tokio::main]
async fn serve(
    config: ProxyConfig,
    link: Option<console_proxy::core_link::CoreLink>,
    public_url: Option<String>,
) -> anyhow::Result<()> {
    // Started by core's process driver: end with that core.
    let _parent = systemvm_agent_client::parent::exit_with_parent();
    let max_sessions = config.max_sessions;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let proxy = std::sync::Arc::new(console_proxy::start(config).await?);
    let endpoint = public_url.unwrap_or_else(|| format!("{scheme}://{}", proxy.addr));
    let client = match &link {
        Some(link) => Some(console_proxy::core_link::connect(
            proxy.clone(),
            max_sessions,
            link,
            Some(endpoint),
        )?),
        None => None,
    };
    let why = systemvm_task::stop_requested().await;
    tracing::info!(signal = why, "Shutting down");
    // One ordered stop with a deadline: the core link says goodbye, sessions get their close.
    systemvm_task::stop_within("console proxy", SHUTDOWN_DEADLINE, async {
        if let Some(client) = client {
            client.shutdown().await;
        }
        if let Ok(proxy) = std::sync::Arc::try_unwrap(proxy) {
            proxy.shutdown().await;
        }
    })
    .await;
    Ok(())
}

/// How long the stop may take before the process exits anyway.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn keygen(out: &Path, rotate: bool) -> anyhow::Result<()> {
    let keys = if rotate && out.exists() {
        let mut keys = config::load_keys(out)?;
        let id = keys.rotate()?;
        eprintln!("added key {id} as primary; older keys still open tokens until removed from the file");
        keys
    } else {
        anyhow::ensure!(
            !out.exists(),
            "{} exists; use --rotate to add a key to it",
            out.display()
        );
        KeySet::generate()?
    };
    write_private(out, keys.to_json()?.as_bytes())
}

/// Writes a file readable by its owner only, through a temporary file (`PATH.tmp`) and a rename.
/// The temporary file is created new with mode 0600: an existing one, or a symlink planted there,
/// is refused, never followed or reused with its mode.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut name = path
        .file_name()
        .context("the key file needs a file name")?
        .to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} already exists (left by an interrupted keygen, or planted there); \
             check it and remove it, then run keygen again",
            tmp.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("failed to create {}", tmp.display())),
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("failed to write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
