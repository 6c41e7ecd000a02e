//! `systemvm-core up`: the whole suite on one machine with one command: core on SQLite, the
//! default zone with a local-directory image store (or the one given), the `process` driver
//! starting its console proxy and storage VM, and a demo VM under QEMU (when QEMU is installed)
//! whose console can be opened at once.
//!
//! It also serves a small demo image on loopback ([`demo_image`]) and allows the storage VM to
//! download from there (`secstorage.allowed.internal.sites` gets `127.0.0.1/32`, set before the
//! image store is added, so the storage VM starts with it), so the printed template step works
//! offline.
//!
//! Invariants: `up` returns (prints the next steps) only once both system VMs are Up, or fails
//! saying which one did not come and why (the fleet events); Ctrl-C stops every process it
//! started (system VMs, the demo VM) before core stops; the printed steps name this program by
//! its absolute path and need no environment a new shell of the same user lacks; a restart on the
//! same data dir keeps one demo console target (`demo-vm`).

pub mod demo_image;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use self::demo_image::DemoImage;
use crate::cli::client::{ApiClient, read_credentials};
use crate::{CoreConfig, DriverKind, RunningCore};

/// How long `up` waits for the system VMs.
pub const WAIT: Duration = Duration::from_secs(120);

/// The setting that lets the storage VM download from internal addresses.
pub const ALLOWED_SITES: &str = "secstorage.allowed.internal.sites";
/// What [`ALLOWED_SITES`] must list for the demo image server.
pub const DEMO_SITE: &str = "127.0.0.1/32";
/// Name of the demo VM's console target.
pub const DEMO_TARGET: &str = "demo-vm";

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
    /// The demo VM boots this kernel and initramfs (`systemvm-image demo`: a shell on its
    /// console); without them it has no disk and shows its firmware.
    pub demo_guest: Option<(PathBuf, PathBuf)>,
}

/// What `up` started.
pub struct Up {
    /// The running core.
    pub core: RunningCore,
    /// The demo VM (killed when dropped), with its console target id.
    pub demo: Option<(tokio::process::Child, String)>,
    /// A client of the API as the root admin.
    pub client: ApiClient,
    /// The demo image's server.
    pub image: DemoImage,
}

impl std::fmt::Debug for Up {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Up")
            .field("core", &self.core)
            .field("demo", &self.demo.as_ref().map(|(_, id)| id))
            .field("image", &self.image)
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
    let image = DemoImage::serve()
        .await
        .context("failed to start the demo image server")?;
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
    // The setting is dynamic: a storage VM already running gets it over the agent channel.
    allow_demo_site(&client).await?;
    let stores = call("listImageStores", vec![]).await?;
    let store_existed = !list(&stores, "imagestore").is_empty();
    if !store_existed {
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
    if let Err(e) = wait_system_vms(&client, &opts.data_dir).await {
        core.shutdown_with_system_vms().await;
        return Err(e);
    }
    let demo = if opts.demo {
        let previous = demo_targets(&client).await?;
        let port = previous
            .first()
            .and_then(|t| t["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok());
        match start_demo_vm(&opts.data_dir, port, opts.demo_guest.as_ref()).await {
            Ok(Some((child, vnc, password, same))) => {
                let id = demo_target(&client, previous, vnc, &password, same).await?;
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
    Ok(Up {
        core,
        demo,
        client,
        image,
    })
}

/// Adds [`DEMO_SITE`] to [`ALLOWED_SITES`] unless it is listed already (on a new data dir the
/// value becomes exactly `127.0.0.1/32`); whether it changed anything.
async fn allow_demo_site(client: &ApiClient) -> anyhow::Result<bool> {
    let configs = client
        .call("listConfigurations", &[("name", ALLOWED_SITES)])
        .await
        .map_err(|e| anyhow::anyhow!("listConfigurations: {e}"))?;
    let current = list(&configs, "configuration")
        .into_iter()
        .find(|c| c["name"] == ALLOWED_SITES)
        .and_then(|c| c["value"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut sites: Vec<&str> = current
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if sites.contains(&DEMO_SITE) {
        return Ok(false);
    }
    sites.push(DEMO_SITE);
    let value = sites.join(",");
    client
        .call(
            "updateConfiguration",
            &[("name", ALLOWED_SITES), ("value", &value)],
        )
        .await
        .map_err(|e| anyhow::anyhow!("updateConfiguration {ALLOWED_SITES}: {e}"))?;
    eprintln!("up: {ALLOWED_SITES} = {value} (the storage VM may download the demo image)");
    Ok(true)
}

/// Waits until a console proxy and a storage VM are Running with their agents Up; on timeout,
/// the error names the latest fleet events.
async fn wait_system_vms(client: &ApiClient, data_dir: &Path) -> anyhow::Result<()> {
    let call = |cmd: &'static str, params: &'static [(&'static str, &'static str)]| async move {
        client
            .call(cmd, params)
            .await
            .map_err(|e| anyhow::anyhow!("{cmd}: {e}"))
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let vms = list(&call("listSystemVms", &[]).await?, "systemvm");
        let up = |kind: &str| {
            vms.iter()
                .any(|v| v["systemvmtype"] == kind && v["state"] == "Running" && v["agentstate"] == "Up")
        };
        if up("consoleproxy") && up("secondarystoragevm") {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let events = call("listEvents", &[("pagesize", "10"), ("page", "1")]).await?;
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
            anyhow::bail!(
                "the system VMs did not come Up within {}s; latest events:\n{}\n(logs: {}/systemvms/*/agent.log)",
                WAIT.as_secs(),
                lines.join("\n"),
                data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The console targets named [`DEMO_TARGET`].
async fn demo_targets(client: &ApiClient) -> anyhow::Result<Vec<Value>> {
    let answer = client
        .call("listConsoleTargets", &[("name", DEMO_TARGET)])
        .await
        .map_err(|e| anyhow::anyhow!("listConsoleTargets: {e}"))?;
    Ok(list(&answer, "consoletarget")
        .into_iter()
        .filter(|t| t["name"] == DEMO_TARGET)
        .collect())
}

/// The demo VM's console target: one of `previous` (the targets named [`DEMO_TARGET`] of an
/// earlier `up`) when the VM came back at its address with its password (`same`), else a new
/// one; the others are deleted, so a restart never leaves two.
async fn demo_target(
    client: &ApiClient,
    previous: Vec<Value>,
    vnc: SocketAddr,
    password: &str,
    same: bool,
) -> anyhow::Result<String> {
    let matches = |t: &Value| {
        same && t["host"] == vnc.ip().to_string().as_str()
            && t["port"].as_u64() == Some(u64::from(vnc.port()))
            && t["haspassword"] == true
    };
    let mut kept = None;
    for t in &previous {
        let id = t["id"].as_str().unwrap_or_default();
        if kept.is_none() && matches(t) {
            kept = Some(id.to_owned());
            continue;
        }
        client
            .call("deleteConsoleTarget", &[("id", id)])
            .await
            .map_err(|e| anyhow::anyhow!("deleteConsoleTarget {id}: {e}"))?;
    }
    if let Some(id) = kept {
        return Ok(id);
    }
    let t = client
        .call(
            "addConsoleTarget",
            &[
                ("name", DEMO_TARGET),
                ("host", &vnc.ip().to_string()),
                ("port", &vnc.port().to_string()),
                ("password", password),
            ],
        )
        .await
        .map_err(|e| anyhow::anyhow!("addConsoleTarget: {e}"))?;
    Ok(t["consoletarget"]["id"].as_str().unwrap_or_default().to_owned())
}

/// The demo VM as started: QEMU, its VNC address and password, and whether both are those of
/// the previous start (its console target can be kept).
type DemoVm = (tokio::process::Child, SocketAddr, String, bool);

/// Starts a small VM under QEMU (TCG) with a password-protected VNC server on loopback, booting
/// `guest` (kernel, initramfs) when given; `None` when QEMU is not installed. The password is kept in `DATA_DIR/demo-vm/vnc.secret` and reused,
/// and so is `port` (the previous VNC port) when it is free.
async fn start_demo_vm(
    data_dir: &Path,
    port: Option<u16>,
    guest: Option<&(PathBuf, PathBuf)>,
) -> anyhow::Result<Option<DemoVm>> {
    let Some(qemu) = find_on_path("qemu-system-x86_64") else {
        return Ok(None);
    };
    let dir = data_dir.join("demo-vm");
    std::fs::create_dir_all(&dir)?;
    let secret = dir.join("vnc.secret");
    let kept = std::fs::read_to_string(&secret)
        .ok()
        .filter(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
    let same_password = kept.is_some();
    let password = match kept {
        Some(p) => p,
        None => {
            // VNC passwords are at most 8 characters; letters and digits only.
            let mut password = String::new();
            while password.len() < 8 {
                password.extend(
                    crate::util::random_token::<6>()?
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(8 - password.len()),
                );
            }
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&secret)?;
            f.write_all(password.as_bytes())?;
            password
        }
    };
    let free = |d: u16| std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok();
    let previous = port
        .and_then(|p| p.checked_sub(5900))
        .filter(|d| (60..99).contains(d) && free(*d));
    let display = previous
        .or_else(|| (60..99).find(|d| free(*d)))
        .context("no free VNC display between :60 and :99")?;
    let vnc = SocketAddr::from(([127, 0, 0, 1], 5900 + display));
    let mut cmd = tokio::process::Command::new(qemu);
    if let Some((kernel, initrd)) = guest {
        for f in [kernel, initrd] {
            anyhow::ensure!(
                f.is_file(),
                "{} is missing (systemvm-image demo builds it)",
                f.display()
            );
        }
        cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
        cmd.args(["-append", "console=tty1 quiet panic=5"]);
    }
    let child = cmd
        .args(["-accel", "tcg", "-m", "128", "-display", "none", "-net", "none"])
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
            let same = same_password && previous.is_some();
            return Ok(Some((child, vnc, password, same)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("QEMU's VNC server did not start on {vnc}")
}

/// This program's absolute path (what a new shell, whatever its `PATH`, can run).
fn program() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "systemvm-core".into())
}

/// `word` quoted for a POSIX shell when it holds anything but plain characters.
pub fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=@%:,./".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The `--data-dir`/`--api-url` arguments the printed commands need: none for the data dir a new
/// shell finds by default (`$XDG_DATA_HOME/systemvm-core` or `~/.local/share/systemvm-core`;
/// `SYSTEMVM_CORE_DATA_DIR` is not counted on, a new shell may not have it) and for the default
/// API URL.
fn connect_args(data_dir: &Path, api_url: &str) -> String {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let fresh_default = crate::cli::default_data_dir_in(|name| {
        (name != crate::cli::DATA_DIR_ENV)
            .then(|| std::env::var_os(name))
            .flatten()
    });
    let mut args = String::new();
    if fresh_default.as_deref().map(canonical) != Some(canonical(data_dir)) {
        args.push_str(" --data-dir ");
        args.push_str(&shell_word(&canonical(data_dir).display().to_string()));
    }
    if api_url != crate::cli::DEFAULT_API_URL {
        args.push_str(" --api-url ");
        args.push_str(&shell_word(api_url));
    }
    args
}

/// The upload page beside the API (`…/client/api` → `…/client/upload`).
pub fn upload_page_url(api_url: &str) -> String {
    let base = api_url.trim_end_matches('/');
    let base = base.strip_suffix("/client/api").unwrap_or(base);
    format!("{base}{}", crate::api::upload_page::PATH)
}

/// The next steps `up` prints: each command on its own line, indented by seven spaces, runnable
/// as it is in a new shell.
pub fn next_steps(up: &Up, data_dir: &Path) -> String {
    let (prog, conn) = (shell_word(&program()), connect_args(data_dir, &up.core.api_url()));
    let cmd = |sub: &str, rest: &str| {
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!(" {rest}")
        };
        format!("{prog} {sub}{conn}{rest}")
    };
    let creds = up
        .core
        .credentials_path
        .canonicalize()
        .unwrap_or_else(|_| up.core.credentials_path.clone());
    let mut s = format!(
        "\nThe suite is up.\n  API:         {}\n  Credentials: {}\n  Log in:      a CloudStack UI as user admin, domain ROOT, with the \"password\" in the credentials file\n  Upload page: {} (a template or ISO from your browser, resumable; log in as above)\n\nNext steps:\n  1. Register a template (a demo image `up` serves on {}; a progress bar follows the download):\n       {}\n",
        up.core.api_url(),
        creds.display(),
        upload_page_url(&up.core.api_url()),
        up.image.addr,
        cmd(
            "register-template",
            &format!(
                "--name tiny --format QCOW2 --url {} --checksum {}",
                shell_word(&up.image.url()),
                shell_word(&up.image.checksum)
            )
        ),
    );
    match &up.demo {
        Some((_, id)) => s.push_str(&format!(
            "  2. Open the console of the demo VM (QEMU) in a browser:\n       {}\n",
            cmd("console", id)
        )),
        None => s.push_str(&format!(
            "  2. Add a VM console (any VNC server; replace HOST, PORT, PASSWORD and ID) and open it:\n       {}\n       {}\n",
            cmd(
                "api",
                "addConsoleTarget name=my-vm host=HOST port=PORT password=PASSWORD"
            ),
            cmd("console", "ID"),
        )),
    }
    s.push_str(&format!(
        "  3. List the templates and the system VMs core runs:\n       {}\n       {}\n\nPress Ctrl-C to stop everything.\n",
        cmd("templates", ""),
        cmd("system-vms", ""),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_bash() {
        assert_eq!(shell_word("/usr/bin/systemvm-core"), "/usr/bin/systemvm-core");
        assert_eq!(
            shell_word("http://127.0.0.1:4000/tiny.qcow2"),
            "http://127.0.0.1:4000/tiny.qcow2"
        );
        assert_eq!(shell_word("{SHA-256}ab12"), "'{SHA-256}ab12'");
        assert_eq!(shell_word("/home/a b/x"), "'/home/a b/x'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
        for word in ["{SHA-256}ab12", "/home/a b/x", "it's", "$HOME", "*", "a\"b"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_word(word)))
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), word);
        }
    }
}
