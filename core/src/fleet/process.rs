//! The `process` driver: system VMs as local processes (`console-proxy serve`, `ssvm-agent serve`)
//! on loopback ports core picks: the embedded default for quickstart, development and tests.
//!
//! Invariants:
//! * a VM's secret reaches its process through the environment (`SYSTEMVM_AGENT_SECRET`), never
//!   its command line (`ps` shows command lines);
//! * a process is recognised by its pid *and* its command line naming the VM id, so a recycled pid
//!   is never taken for (or killed as) a system VM;
//! * each VM has its own directory `DATA_DIR/systemvms/<id>/` (log, storage job journal), removed
//!   when the VM is destroyed;
//! * processes outlive core (like VMs outlive a management server): a restarted core, or the other
//!   core of an HA pair, finds them by pid and their agents reconnect.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use systemvm_proto::agent::AgentRole;

use super::driver::{Driver, DriverError, DriverFuture, Placement, VmSpec, VmState};

/// Time a process gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs system VMs as local processes.
#[derive(Debug, Clone)]
pub struct ProcessDriver {
    /// Directory with the `console-proxy` and `ssvm-agent` binaries.
    pub bin_dir: PathBuf,
    /// Parent of the per-VM directories (`DATA_DIR/systemvms`).
    pub vm_root: PathBuf,
}

/// The directory holding `name` (an agent binary): `dir` itself, or the parent of `dir` (test
/// executables live in `target/debug/deps`, the binaries in `target/debug`).
pub fn find_bin_dir(dir: &Path) -> Option<PathBuf> {
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .find(|d| d.join("console-proxy").is_file() && d.join("ssvm-agent").is_file())
        .map(Path::to_path_buf)
}

impl ProcessDriver {
    /// A driver using the agent binaries next to the running executable (or `SYSTEMVM_BIN_DIR`).
    pub fn beside_current_exe(vm_root: PathBuf) -> Result<Self, DriverError> {
        let dir = match std::env::var_os("SYSTEMVM_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
                .ok_or_else(|| DriverError::Unavailable("cannot locate the running executable".into()))?,
        };
        let bin_dir = find_bin_dir(&dir).ok_or_else(|| {
            DriverError::Unavailable(format!(
                "console-proxy and ssvm-agent not found in {} (build them: cargo build --workspace, or set SYSTEMVM_BIN_DIR)",
                dir.display()
            ))
        })?;
        Ok(Self { bin_dir, vm_root })
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.vm_root.join(id)
    }

    /// The port of a storage VM's transfer server: chosen once and kept in the VM's directory,
    /// so upload and download URLs stay valid across restarts of the VM.
    fn transfer_port(&self, id: &str) -> std::io::Result<u16> {
        let file = self.vm_dir(id).join("transfer.port");
        if let Some(port) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Ok(port);
        }
        let port = free_port()?;
        std::fs::write(&file, port.to_string())?;
        Ok(port)
    }

    fn command(&self, spec: &VmSpec, port: u16) -> tokio::process::Command {
        let mut c = match spec.role {
            AgentRole::ConsoleProxy => {
                let mut c = tokio::process::Command::new(self.bin_dir.join("console-proxy"));
                c.arg("serve")
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--public-url")
                    .arg(format!("http://127.0.0.1:{port}"))
                    .arg("--max-sessions")
                    .arg(spec.max_sessions.max(1).to_string());
                c
            }
            AgentRole::SecStorage => {
                let mut c = tokio::process::Command::new(self.bin_dir.join("ssvm-agent"));
                c.arg("serve")
                    .arg("--store")
                    .arg(spec.store_url.as_deref().unwrap_or_default())
                    .arg("--state-dir")
                    .arg(self.vm_dir(&spec.id).join("state"))
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"));
                match self.transfer_port(&spec.id) {
                    Ok(transfer) => {
                        c.arg("--public-listen").arg(format!("127.0.0.1:{transfer}"));
                    }
                    Err(error) => {
                        tracing::warn!(vm.id = %spec.id, %error, "No transfer port for the storage VM: uploads and download links are off");
                    }
                }
                for cidr in &spec.allow_internal {
                    c.arg("--allow-internal").arg(cidr);
                }
                c
            }
        };
        c.arg("--core")
            .arg(spec.core_urls.join(","))
            .arg("--vm-id")
            .arg(&spec.id)
            .arg("--ca")
            .arg(&spec.ca)
            .env("SYSTEMVM_AGENT_SECRET", spec.secret.expose())
            // The agent ends when core does (it watches for being re-parented).
            .env("SYSTEMVM_PARENT_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .kill_on_drop(false);
        c
    }
}

/// A free loopback TCP port (bound and released; the agent binds it right after).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `pid` is a live process whose command line names `vm_id`.
pub(crate) fn is_our_process(pid: u32, vm_id: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie (exited, not yet reaped) is not running.
    let zombie = state
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && cmdline.split(|b| *b == 0).any(|arg| arg == vm_id.as_bytes())
}

/// Waits (up to 2 s) until `pid` runs the new program (its command line names `vm_id`): right
/// after a spawn the child may still be the forked copy of core.
pub async fn wait_exec(pid: Option<u32>, vm_id: &str) {
    let Some(pid) = pid else { return };
    for _ in 0..200 {
        if is_our_process(pid, vm_id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn signal(pid: u32, sig: &str) {
    let _ = tokio::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

impl ProcessDriver {
    /// Stops the process of VM `id` (SIGTERM, then SIGKILL after [`STOP_GRACE`]; at once when
    /// `force`); a process that is gone, or is not this VM's, is left alone.
    pub fn stop_pid<'a>(
        id: &'a str,
        placement: &'a Placement,
        force: bool,
    ) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let Some(pid) = placement.pid.filter(|p| is_our_process(*p, id)) else {
                return Ok(());
            };
            if !force {
                signal(pid, "TERM").await;
                let deadline = tokio::time::Instant::now() + STOP_GRACE;
                while tokio::time::Instant::now() < deadline {
                    if !is_our_process(pid, id) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            signal(pid, "KILL").await;
            for _ in 0..50 {
                if !is_our_process(pid, id) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        })
    }

    /// Whether VM `id`'s process runs.
    pub fn state_of_pid<'a>(id: &'a str, placement: &'a Placement) -> DriverFuture<'a, VmState> {
        Box::pin(async move {
            match placement.pid {
                Some(pid) if is_our_process(pid, id) => VmState::Running,
                Some(pid) => VmState::Stopped(format!("process {pid} is gone")),
                None => VmState::Stopped("never started".into()),
            }
        })
    }
}

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> DriverFuture<'a, Result<Placement, DriverError>> {
        Box::pin(async move {
            let io = |what: &str| {
                let what = what.to_owned();
                move |source| DriverError::Io { what, source }
            };
            let dir = self.vm_dir(&spec.id);
            std::fs::create_dir_all(&dir).map_err(io("failed to create the VM directory"))?;
            let log_path = dir.join("agent.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(io("failed to open the VM log"))?;
            let err_log = log.try_clone().map_err(io("failed to open the VM log"))?;
            let port = free_port().map_err(io("failed to find a free port"))?;
            let mut child = self
                .command(spec, port)
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(err_log))
                .spawn()
                .map_err(io(&format!("failed to run {}", spec.role.as_str())))?;
            let pid = child.id();
            wait_exec(pid, &spec.id).await;
            // Reap the process when it exits (no zombie); its state is read from /proc.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            tracing::info!(vm.id = %spec.id, vm.name = %spec.name, ?pid, port, log = %log_path.display(), "Started a system VM process");
            Ok(Placement { pid })
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        placement: &'a Placement,
        force: bool,
    ) -> DriverFuture<'a, Result<(), DriverError>> {
        Self::stop_pid(id, placement, force)
    }

    fn state<'a>(&'a self, id: &'a str, placement: &'a Placement) -> DriverFuture<'a, VmState> {
        Self::state_of_pid(id, placement)
    }

    fn destroy<'a>(&'a self, id: &'a str) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { remove_vm_dir(&self.vm_dir(id)) })
    }
}

/// Removes a destroyed VM's directory; one that is already gone is fine.
pub fn remove_vm_dir(dir: &Path) -> Result<(), DriverError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DriverError::Io {
            what: format!("failed to remove {}", dir.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_processes() {
        let me = std::process::id();
        let args: Vec<String> = std::env::args().collect();
        assert!(is_our_process(me, &args[0]));
        assert!(!is_our_process(me, "0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b"));
        assert!(!is_our_process(u32::MAX - 1, &args[0]));
    }

    #[test]
    fn bin_dir_search() {
        let tmp = tempfile::tempdir().unwrap();
        let deps = tmp.path().join("deps");
        std::fs::create_dir_all(&deps).unwrap();
        assert_eq!(find_bin_dir(&deps), None);
        std::fs::write(tmp.path().join("console-proxy"), b"").unwrap();
        std::fs::write(tmp.path().join("ssvm-agent"), b"").unwrap();
        assert_eq!(find_bin_dir(&deps).as_deref(), Some(tmp.path()));
        assert_eq!(find_bin_dir(tmp.path()).as_deref(), Some(tmp.path()));
    }
}
