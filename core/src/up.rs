//! `systemvm-core up`: the whole suite on one machine with one command: core on SQLite, the
//! default zone with a local-directory image store (or the one given), the `process` driver
//! starting its console proxy and storage VM, and a demo VM under QEMU (when QEMU is installed)
//! whose console can be opened at once.
//!
//! Invariants: `up` returns (prints the next steps) only once both system VMs are Up, or fails
//! saying which one did not come and why (the fleet events); Ctrl-C stops every process it
//! started (system VMs, the demo VM) before core stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::cli::client::{ApiClient, read_credentials};
use crate::{CoreConfig, DriverKind, RunningCore};

/// How long `up` waits for the system VMs.
pub const WAIT: Duration = Duration::from_secs(120);

/// `up`'s options.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Data directory.
    pub data_dir: PathBuf,
    /// API listen address.
    pub listen: SocketAddr,
    /// Image store URL (default `file://DATA_DIR/secondary`).
    pub store: Option<String>,
    /// Start a demo VM under QEMU when QEMU is installed.
    pub demo: bool,
}

/// What `up` started.
pub struct Up {
    /// The running core.
    pub core: RunningCore,
    /// The demo VM (killed when dropped), with its console target id.
    pub demo: Option<(tokio::process::Child, String)>,
    /// A client of the API as the root admin.
    pub client: ApiClient,
}

impl std::fmt::Debug for Up {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Up")
            .field("core", &self.core)
            .field("demo", &self.demo.as_ref().map(|(_, id)| id))
            .finish_non_exhaustive()
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn list(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}

/// Starts everything and waits for the system VMs.
pub async fn up(opts: &UpOptions) -> anyhow::Result<Up> {
    let mut config = CoreConfig::new(&opts.data_dir);
    config.listen = opts.listen;
    config.agent_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.driver = Some(DriverKind::Process);
    let core = crate::start(config).await?;
    let creds = read_credentials(&opts.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = ApiClient::new(&core.api_url(), creds, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let call = |cmd: &'static str, params: Vec<(String, String)>| {
        let client = &client;
        async move {
            client
                .call_owned(cmd, &params)
                .await
                .map_err(|e| anyhow::anyhow!("{cmd}: {e}"))
        }
    };
    let stores = call("listImageStores", vec![]).await?;
    if list(&stores, "imagestore").is_empty() {
        let url = match &opts.store {
            Some(u) => u.clone(),
            None => {
                let dir = opts.data_dir.join("secondary");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("failed to create {}", dir.display()))?;
                let dir = dir.canonicalize()?;
                format!("file://{}", dir.display())
            }
        };
        call(
            "addImageStore",
            vec![
                ("provider".into(), "NFS".into()),
                ("name".into(), "secondary".into()),
                ("url".into(), url.clone()),
            ],
        )
        .await?;
        eprintln!("up: image store {url}");
    }
    eprintln!("up: waiting for the console proxy and the storage VM…");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let vms = list(&call("listSystemVms", vec![]).await?, "systemvm");
        let up = |kind: &str| {
            vms.iter()
                .any(|v| v["systemvmtype"] == kind && v["state"] == "Running" && v["agentstate"] == "Up")
        };
        if up("consoleproxy") && up("secondarystoragevm") {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let events = call(
                "listEvents",
                vec![("pagesize".into(), "10".into()), ("page".into(), "1".into())],
            )
            .await?;
            let lines: Vec<String> = list(&events, "event")
                .iter()
                .map(|e| {
                    format!(
                        "  {} {}: {}",
                        e["created"],
                        e["type"],
                        e["description"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            core.shutdown_with_system_vms().await;
            anyhow::bail!(
                "the system VMs did not come Up within {}s; latest events:\n{}\n(logs: {}/systemvms/*/agent.log)",
                WAIT.as_secs(),
                lines.join("\n"),
                opts.data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let demo = if opts.demo {
        match start_demo_vm(&opts.data_dir).await {
            Ok(Some((child, vnc, password))) => {
                let t = call(
                    "addConsoleTarget",
                    vec![
                        ("name".into(), "demo-vm".into()),
                        ("host".into(), vnc.ip().to_string()),
                        ("port".into(), vnc.port().to_string()),
                        ("password".into(), password),
                    ],
                )
                .await?;
                let id = t["consoletarget"]["id"].as_str().unwrap_or_default().to_owned();
                Some((child, id))
            }
            Ok(None) => None,
            Err(e) => {
                eprintln!("up: no demo VM: {e:#}");
                None
            }
        }
    } else {
        None
    };
    Ok(Up { core, demo, client })
}

/// Starts a small VM under QEMU (TCG) with a password-protected VNC server on loopback; `None`
/// when QEMU is not installed.
async fn start_demo_vm(
    data_dir: &Path,
) -> anyhow::Result<Option<(tokio::process::Child, SocketAddr, String)>> {
    let Some(qemu) = find_on_path("qemu-system-x86_64") else {
        return Ok(None);
    };
    let dir = data_dir.join("demo-vm");
    std::fs::create_dir_all(&dir)?;
    let password = crate::util::random_token::<6>()?
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>();
    let secret = dir.join("vnc.secret");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&secret)?;
        f.write_all(password.as_bytes())?;
    }
    let display = (60..99)
        .find(|d| std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok())
        .context("no free VNC display between :60 and :99")?;
    let vnc = SocketAddr::from(([127, 0, 0, 1], 5900 + display));
    let child = tokio::process::Command::new(qemu)
        .args(["-accel", "tcg", "-m", "64", "-display", "none", "-net", "none"])
        .args(["-monitor", "none", "-serial", "none", "-name", "demo-vm"])
        .arg("-object")
        .arg(format!("secret,id=vncpw,file={}", secret.display()))
        .arg("-vnc")
        .arg(format!("127.0.0.1:{display},password-secret=vncpw"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start QEMU")?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(vnc).await.is_ok() {
            return Ok(Some((child, vnc, password)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("QEMU's VNC server did not start on {vnc}")
}

/// How to call this program: `systemvm-core` when that is what `PATH` finds, else its full path.
fn program() -> String {
    let me = std::env::current_exe().ok();
    let found = find_on_path("systemvm-core");
    match (me, found) {
        (Some(me), Some(found)) if found.canonicalize().ok() == me.canonicalize().ok() => {
            "systemvm-core".into()
        }
        (Some(me), _) => me.display().to_string(),
        (None, _) => "systemvm-core".into(),
    }
}

/// The next steps `up` prints.
pub fn next_steps(up: &Up, data_dir: &Path) -> String {
    let prog = program();
    let api = up.core.api_url();
    let d = if api == "http://127.0.0.1:8080/client/api" {
        data_dir.display().to_string()
    } else {
        format!("{} --api-url {api}", data_dir.display())
    };
    let mut s = format!(
        "\nThe suite is up.\n  API:         {}\n  Credentials: {}\n\nNext steps:\n  1. Register a template (a progress bar follows the download):\n       {prog} register-template --data-dir {d} --name tiny --format QCOW2 --url https://example.org/tiny.qcow2\n",
        up.core.api_url(),
        up.core.credentials_path.display(),
    );
    match &up.demo {
        Some((_, id)) => s.push_str(&format!(
            "  2. Open the console of the demo VM (QEMU) in a browser:\n       {prog} console --data-dir {d} {id}\n"
        )),
        None => s.push_str(&format!(
            "  2. Add a VM console (any VNC server) and open it:\n       {prog} api --data-dir {d} addConsoleTarget name=my-vm host=127.0.0.1 port=5901 password=…\n       {prog} console --data-dir {d} ID\n"
        )),
    }
    s.push_str(&format!(
        "  3. List the system VMs core runs:\n       {prog} system-vms --data-dir {d}\n\nPress Ctrl-C to stop everything.\n"
    ));
    s
}

/// Stops what `up` started.
pub async fn down(up: Up) {
    if let Some((mut child, _)) = up.demo {
        let _ = child.kill().await;
    }
    up.core.shutdown_with_system_vms().await;
}
