//! `systemvm-core`: the management service of the suite (CLI entry point).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use systemvm_core::cli::data_dir_or_default;
use systemvm_core::{CoreConfig, start};

#[derive(Parser)]
#[command(version, about = "Management service of the Mold system-VM suite")]
struct Cli {
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves the CloudStack-compatible API and the agent endpoint.
    Serve {
        /// Data directory (SQLite database, credentials.json, the agent CA, secrets.key) [default:
        /// $SYSTEMVM_CORE_DATA_DIR, else $XDG_DATA_HOME/systemvm-core, else
        /// ~/.local/share/systemvm-core].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// API listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// PostgreSQL URL (postgres://user:pass@host:port/db); SQLite in the data dir when absent.
        #[arg(long, env = "SYSTEMVM_CORE_DATABASE_URL")]
        database_url: Option<String>,
        /// The key file that encrypts the keys core stores in the database [default:
        /// DATA_DIR/secrets.key, created on first start]. A second core on the same database
        /// needs the first one's file.
        #[arg(long, value_name = "FILE")]
        secrets_key: Option<PathBuf>,
        /// Agent endpoint listen address (TLS WebSocket at /agent, certificate from DATA_DIR/ca.pem).
        #[arg(long, default_value = "0.0.0.0:8250")]
        agent_listen: SocketAddr,
        /// Extra name or IP address in the agent endpoint's certificate (repeatable).
        #[arg(long = "agent-san")]
        agent_sans: Vec<String>,
        /// Deploy and manage the system VMs with this driver: `process` (local processes), `qemu`
        /// (QEMU guests on this host) or `libvirt` (domains on --libvirt-uri); without it, agents
        /// are registered and started by hand.
        #[arg(long, value_parser = ["process", "qemu", "libvirt"])]
        driver: Option<String>,
        /// qemu/libvirt drivers: the system VM image (qcow2), booted copy-on-write.
        #[arg(long, conflicts_with = "vm_kernel")]
        vm_image: Option<PathBuf>,
        /// qemu/libvirt drivers: boot this kernel (with --vm-initrd) instead of an image.
        #[arg(long, requires = "vm_initrd")]
        vm_kernel: Option<PathBuf>,
        /// qemu/libvirt drivers: the initramfs booted with --vm-kernel.
        #[arg(long, requires = "vm_kernel")]
        vm_initrd: Option<PathBuf>,
        /// qemu/libvirt drivers: memory per system VM, MiB.
        #[arg(long, default_value_t = 512)]
        vm_memory: u32,
        /// libvirt driver: the host's libvirt URI.
        #[arg(long, default_value = "qemu:///system")]
        libvirt_uri: String,
        /// Agent endpoint URL(s) given to the system VMs core starts (wss://HOST:PORT/agent,
        /// comma-separated; with two cores, both). Default: this core's endpoint.
        #[arg(long = "agent-url", value_delimiter = ',')]
        agent_urls: Vec<String>,
        /// A libvirt host whose guest VMs' consoles core opens by domain name
        /// (`addConsoleTarget hypervisorvm=NAME`), e.g. qemu+ssh://kvm1/system (repeatable).
        #[arg(long = "guest-libvirt")]
        guest_libvirt: Vec<String>,
    },
    /// Runs the whole suite on this machine: core (SQLite), a console proxy and a storage VM as
    /// local processes, a local image store, and a demo VM under QEMU when QEMU is installed.
    Up {
        /// Data directory [default: $SYSTEMVM_CORE_DATA_DIR, else $XDG_DATA_HOME/systemvm-core,
        /// else ~/.local/share/systemvm-core].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// API listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Image store (nfs://HOST/EXPORT or file:///PATH) [default: file://DATA_DIR/secondary].
        #[arg(long)]
        store: Option<String>,
        /// Do not start the demo VM.
        #[arg(long)]
        no_demo: bool,
        /// The demo VM's kernel (`systemvm-image demo` builds it, with --demo-initrd).
        #[arg(long, requires = "demo_initrd")]
        demo_kernel: Option<PathBuf>,
        /// The demo VM's initramfs: a shell on its console.
        #[arg(long, requires = "demo_kernel")]
        demo_initrd: Option<PathBuf>,
    },
    /// Registers a system VM whose agent is started by hand; prints its id and secret (shown once).
    RegisterSystemvm {
        /// Data directory of the core (its database and CA) [default: as `serve`'s].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// PostgreSQL URL; SQLite in the data dir when absent.
        #[arg(long, env = "SYSTEMVM_CORE_DATABASE_URL")]
        database_url: Option<String>,
        /// consoleproxy or secondarystoragevm (secstorage).
        #[arg(long)]
        role: String,
        /// Zone id (default: the oldest zone).
        #[arg(long)]
        zone: Option<String>,
        /// Name (default: generated).
        #[arg(long)]
        name: Option<String>,
    },
    /// Client subcommands: operations against a running core's API.
    #[command(flatten)]
    Client(systemvm_core::cli::ClientCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    systemvm_telemetry::init_tracing(cli.log_json);
    match cli.command {
        Cmd::Serve {
            data_dir,
            listen,
            database_url,
            secrets_key,
            agent_listen,
            agent_sans,
            driver,
            vm_image,
            vm_kernel,
            vm_initrd,
            vm_memory,
            libvirt_uri,
            agent_urls,
            guest_libvirt,
        } => {
            let data_dir = data_dir_or_default(data_dir.as_deref())?;
            let mut config = CoreConfig::new(data_dir);
            config.listen = listen;
            config.database_url = database_url;
            config.secrets_key = secrets_key;
            config.agent_listen = Some(agent_listen);
            config.agent_sans = agent_sans;
            let boot = match (vm_image, vm_kernel, vm_initrd) {
                (Some(image), _, _) => Some(systemvm_core::fleet::qemu::Boot::Disk { image }),
                (None, Some(kernel), Some(initrd)) => Some(systemvm_core::fleet::qemu::Boot::Kernel {
                    kernel,
                    initrd,
                    cmdline: "console=ttyS0 quiet panic=5".into(),
                }),
                _ => None,
            };
            config.driver = match (driver.as_deref(), boot) {
                (None, _) => None,
                (Some("process"), _) => Some(systemvm_core::DriverKind::Process),
                (Some("qemu"), Some(boot)) => Some(systemvm_core::DriverKind::Qemu {
                    boot,
                    memory_mib: vm_memory,
                }),
                (Some(_), Some(boot)) => Some(systemvm_core::DriverKind::Libvirt {
                    uri: libvirt_uri,
                    boot,
                    memory_mib: vm_memory,
                }),
                (Some(d), None) => {
                    anyhow::bail!("--driver {d} needs --vm-image, or --vm-kernel with --vm-initrd")
                }
            };
            config.agent_urls = agent_urls;
            config.guest_drivers = guest_libvirt
                .into_iter()
                .map(|uri| {
                    std::sync::Arc::new(systemvm_core::fleet::libvirt::LibvirtDriver::guests_only(uri))
                        as std::sync::Arc<dyn systemvm_core::fleet::Driver>
                })
                .collect();
            let core = start(config).await?;
            // The start-up lines are for whoever started us; a closed stdout (a parent that
            // stopped reading) must not stop the service, so write errors are ignored.
            let mut text = format!(
                "API: {}\nCredentials: {}\n",
                core.api_url(),
                core.credentials_path.display()
            );
            if let Some(url) = core.agent_url() {
                text.push_str(&format!(
                    "Agent endpoint: {url} (CA {})\n",
                    core.ca_path.display()
                ));
            }
            text.push_str(&format!("Secrets key: {}\n", core.secrets_key_path.display()));
            {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            }
            let why = systemvm_task::stop_requested().await;
            tracing::info!(signal = why, "Stopping");
            core.shutdown().await;
        }
        Cmd::Up {
            data_dir,
            listen,
            store,
            no_demo,
            demo_kernel,
            demo_initrd,
        } => {
            let data_dir = data_dir_or_default(data_dir.as_deref())?;
            let opts = systemvm_core::up::UpOptions {
                data_dir: data_dir.clone(),
                listen,
                store,
                demo: !no_demo,
                demo_guest: demo_kernel.zip(demo_initrd),
            };
            let up = systemvm_core::up::up(&opts).await?;
            println!("{}", systemvm_core::up::next_steps(&up, &data_dir));
            systemvm_task::stop_requested().await;
            eprintln!("up: stopping");
            systemvm_core::up::down(up).await;
        }
        Cmd::RegisterSystemvm {
            data_dir,
            database_url,
            role,
            zone,
            name,
        } => {
            let data_dir = data_dir_or_default(data_dir.as_deref())?;
            let role = systemvm_proto::agent::AgentRole::parse(&role)
                .with_context(|| format!("invalid role {role:?}: use consoleproxy or secondarystoragevm"))?;
            let ca = data_dir.join("ca.pem");
            anyhow::ensure!(
                ca.exists(),
                "{} missing: start `systemvm-core serve` on this data dir once first",
                ca.display()
            );
            let db = systemvm_core::db::Db::open(database_url.as_deref(), &data_dir)
                .await
                .context("failed to open the database")?;
            let r =
                systemvm_core::model::systemvms::register(&db.pool, role, zone.as_deref(), name.as_deref())
                    .await
                    .map_err(|e| anyhow::anyhow!("failed to register the system VM: {e}"))?;
            db.pool.close().await;
            println!("id: {}", r.id);
            println!("name: {}", r.name);
            println!("secret: {}", r.secret);
            println!("ca: {}", ca.display());
        }
        Cmd::Client(cmd) => {
            if let Err(e) = systemvm_core::cli::run(cmd).await {
                eprintln!("{e:#}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
