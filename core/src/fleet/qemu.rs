//! The `qemu` driver: system VMs as QEMU guests (TCG) booted from the system VM image, or from a
//! kernel and initramfs, on this host. Boot parameters go in a NoCloud config drive
//! ([`super::seed`]); the guest reaches core through QEMU's user network, where the host's
//! loopback is `10.0.2.2`, so core's agent endpoint must carry that address in its certificate
//! (`--agent-san 10.0.2.2`, added by core when it runs this driver). A console proxy's port 8080
//! is forwarded to a free loopback port, which becomes its public URL; a storage VM's transfer
//! server (port 8080 in its VM too) to a loopback port kept in the VM's directory, so upload and
//! download links survive a restart. A stop asks the guest to power off (ACPI, through QMP) and
//! waits [`POWER_OFF_GRACE`] before signals.
//!
//! Invariants: the kernel command line carries no secret (only `systemvm.seed=cidata`); a QEMU
//! process is recognised by its pid and its command line naming the VM's uuid, as in the process
//! driver; each VM has its own directory (`seed.iso`, `console.log`, `qmp.sock`) removed on
//! destroy; loopback URLs in the seed (core, the store) are rewritten to [`HOST_FROM_GUEST`].

use std::path::PathBuf;
use std::process::Stdio;

use systemvm_proto::agent::AgentRole;

use super::driver::{Driver, DriverError, DriverFuture, Placement, VmSpec, VmState};
use super::process::ProcessDriver;

/// The address of the host's loopback as a QEMU user-network guest sees it.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";
/// The port a console proxy listens on inside its VM (CloudStack's); a storage VM's transfer
/// server listens on the same port inside its own VM.
pub const GUEST_PROXY_PORT: u16 = 8080;
/// How long a guest has to power off after the ACPI request before QEMU is signalled.
pub const POWER_OFF_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What a system VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// A kernel and an initramfs (`-kernel`/`-initrd`), with extra kernel parameters.
    Kernel {
        /// The kernel.
        kernel: PathBuf,
        /// The initramfs.
        initrd: PathBuf,
        /// Extra kernel parameters (no secrets: they are visible in `/proc`).
        cmdline: String,
    },
    /// A bootable disk image (qcow2), used copy-on-write (`snapshot=on`).
    Disk {
        /// The image.
        image: PathBuf,
    },
}

/// Runs system VMs under QEMU.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Parent of the per-VM directories.
    pub vm_root: PathBuf,
    /// What the VMs boot.
    pub boot: Boot,
    /// Memory per VM, MiB.
    pub memory_mib: u32,
}

/// Core URLs as a guest on QEMU's user network reaches them (loopback → [`HOST_FROM_GUEST`]).
pub fn guest_core_urls(urls: &[String]) -> Vec<String> {
    urls.iter().map(|u| guest_url(u)).collect()
}

/// A URL as a guest on QEMU's user network reaches it: a loopback host becomes
/// [`HOST_FROM_GUEST`] (with or without a port).
pub fn guest_url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else {
        return u.to_owned();
    };
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        if let Some(tail) = rest.strip_prefix(host)
            && (tail.is_empty() || tail.starts_with([':', '/', '?']))
        {
            return format!("{scheme}://{HOST_FROM_GUEST}{tail}");
        }
    }
    u.to_owned()
}

/// `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Result<PathBuf, DriverError> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            DriverError::Unavailable("qemu-system-x86_64 not found on PATH (package qemu-system-x86)".into())
        })
}

impl QemuDriver {
    fn vm_dir(&self, id: &str) -> PathBuf {
        self.vm_root.join(id)
    }

    /// QEMU's arguments for `spec` (its seed at `seed`, a forwarded port for a console proxy).
    pub fn args(&self, spec: &VmSpec, seed: &std::path::Path, forward: Option<u16>) -> Vec<String> {
        let dir = self.vm_dir(&spec.id);
        let mut net = "user,id=n0".to_owned();
        // A console proxy's browser port, or a storage VM's transfer port.
        if let Some(port) = forward {
            net.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PROXY_PORT}"));
        }
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-name".into(),
            spec.name.clone(),
            "-uuid".into(),
            spec.id.clone(),
            "-serial".into(),
            format!("file:{}", dir.join("console.log").display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
            "-netdev".into(),
            net,
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
            "-drive".into(),
            format!("file={},media=cdrom,readonly=on", seed.display()),
        ]);
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => a.extend([
                "-kernel".into(),
                kernel.display().to_string(),
                "-initrd".into(),
                initrd.display().to_string(),
                "-append".into(),
                format!("{cmdline} systemvm.seed=cidata").trim().to_owned(),
            ]),
            Boot::Disk { image } => a.extend([
                "-drive".into(),
                format!("file={},if=virtio,format=qcow2,snapshot=on", image.display()),
            ]),
        }
        a
    }
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> DriverFuture<'a, Result<Placement, DriverError>> {
        Box::pin(async move {
            let io = |what: &str| {
                let what = what.to_owned();
                move |source| DriverError::Io { what, source }
            };
            let dir = self.vm_dir(&spec.id);
            std::fs::create_dir_all(&dir).map_err(io("failed to create the VM directory"))?;
            let free_port = || {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .map_err(io("failed to find a free port"))
            };
            let forward = match spec.role {
                AgentRole::ConsoleProxy => free_port()?,
                AgentRole::SecStorage => {
                    let file = dir.join("transfer.port");
                    match std::fs::read_to_string(&file)
                        .ok()
                        .and_then(|t| t.trim().parse().ok())
                    {
                        Some(p) => p,
                        None => {
                            let p = free_port()?;
                            std::fs::write(&file, p.to_string())
                                .map_err(io("failed to keep the transfer port"))?;
                            p
                        }
                    }
                }
            };
            let mut guest = spec.clone();
            guest.core_urls = guest_core_urls(&spec.core_urls);
            guest.store_url = spec.store_url.as_deref().map(guest_url);
            let url = format!("http://127.0.0.1:{forward}");
            let store_as = spec
                .store_url
                .as_deref()
                .filter(|u| Some(*u) != guest.store_url.as_deref());
            let urls = match spec.role {
                AgentRole::ConsoleProxy => super::seed::Urls {
                    public_url: Some(&url),
                    ..Default::default()
                },
                AgentRole::SecStorage => super::seed::Urls {
                    transfer_url: Some(&url),
                    store_as,
                    ..Default::default()
                },
            };
            let seed = super::seed::write_seed_iso(&dir, &guest, urls).await?;
            let forward = Some(forward);
            let mut child = tokio::process::Command::new(&self.qemu)
                .args(self.args(spec, &seed, forward))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.join("qemu.log")).map_err(io("failed to open the QEMU log"))?,
                ))
                .kill_on_drop(false)
                .spawn()
                .map_err(io("failed to run QEMU"))?;
            let pid = child.id();
            super::process::wait_exec(pid, &spec.id).await;
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            tracing::info!(vm.id = %spec.id, ?pid, ?forward, "Started a system VM under QEMU");
            Ok(Placement { pid })
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        placement: &'a Placement,
        force: bool,
    ) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            // A clean stop asks the guest to power off (ACPI) and waits for QEMU to exit; QEMU
            // exits on SIGTERM without telling the guest, the fallback as for a process.
            if !force
                && let Some(pid) = placement.pid
                && super::process::is_our_process(pid, id)
            {
                match qmp_powerdown(&self.vm_dir(id).join("qmp.sock")).await {
                    Ok(()) => {
                        let deadline = tokio::time::Instant::now() + POWER_OFF_GRACE;
                        while tokio::time::Instant::now() < deadline {
                            if !super::process::is_our_process(pid, id) {
                                tracing::info!(vm.id = %id, "The system VM powered off");
                                return Ok(());
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                        tracing::warn!(vm.id = %id, "The system VM did not power off in time");
                    }
                    Err(error) => tracing::warn!(vm.id = %id, %error, "No ACPI power-off through QMP"),
                }
            }
            ProcessDriver::stop_pid(id, placement, force).await
        })
    }

    fn state<'a>(&'a self, id: &'a str, placement: &'a Placement) -> DriverFuture<'a, VmState> {
        ProcessDriver::state_of_pid(id, placement)
    }

    fn destroy<'a>(&'a self, id: &'a str) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { super::process::remove_vm_dir(&self.vm_dir(id)) })
    }
}

/// Asks the guest behind QMP socket `sock` to power off (`system_powerdown`: an ACPI button press).
pub async fn qmp_powerdown(sock: &std::path::Path) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let talk = async {
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| e.to_string())?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let expect_return =
            async |lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>| {
                loop {
                    let line = lines
                        .next_line()
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or("QMP closed")?;
                    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                    if v.get("return").is_some() || v.get("QMP").is_some() {
                        return Ok::<(), String>(());
                    }
                    if let Some(e) = v.get("error") {
                        return Err(format!("QMP error: {e}"));
                    }
                }
            };
        expect_return(&mut lines).await?;
        for cmd in [
            r#"{"execute":"qmp_capabilities"}"#,
            r#"{"execute":"system_powerdown"}"#,
        ] {
            w.write_all(format!("{cmd}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            expect_return(&mut lines).await?;
        }
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), talk)
        .await
        .map_err(|_| "QMP did not answer within 5 s".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use systemvm_proto::Secret;

    fn spec(role: AgentRole) -> VmSpec {
        VmSpec {
            id: "0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b".into(),
            name: "v-0b1e4c4c-VM".into(),
            role,
            zone_id: "z".into(),
            secret: Secret::from("top-secret-value"),
            core_urls: vec![
                "wss://127.0.0.1:8250/agent".into(),
                "wss://core2:8250/agent".into(),
            ],
            ca: PathBuf::from("/ca.pem"),
            store_url: None,
            allow_internal: vec![],
            max_sessions: 10,
        }
    }

    #[test]
    fn loopback_urls_become_the_user_network_host() {
        assert_eq!(guest_url("nfs://127.0.0.1/export"), "nfs://10.0.2.2/export");
        assert_eq!(
            guest_url("nfs://localhost:2049/e?mountport=9"),
            "nfs://10.0.2.2:2049/e?mountport=9"
        );
        assert_eq!(guest_url("nfs://127.0.0.10/e"), "nfs://127.0.0.10/e");
        assert_eq!(guest_url("nfs://store/e"), "nfs://store/e");
    }

    #[test]
    fn loopback_core_urls_become_the_user_network_host() {
        assert_eq!(
            guest_core_urls(&spec(AgentRole::ConsoleProxy).core_urls),
            vec![
                "wss://10.0.2.2:8250/agent".to_owned(),
                "wss://core2:8250/agent".to_owned()
            ]
        );
    }

    #[test]
    fn command_line_has_no_secret_and_forwards_the_proxy_port() {
        let d = QemuDriver {
            qemu: "qemu-system-x86_64".into(),
            vm_root: "/var/lib/core/systemvms".into(),
            boot: Boot::Kernel {
                kernel: "/k".into(),
                initrd: "/i".into(),
                cmdline: "console=ttyS0".into(),
            },
            memory_mib: 256,
        };
        let s = spec(AgentRole::ConsoleProxy);
        let args = d
            .args(&s, std::path::Path::new("/seed.iso"), Some(41000))
            .join(" ");
        assert!(!args.contains("top-secret-value"), "{args}");
        assert!(
            args.contains("-uuid 0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b"),
            "{args}"
        );
        assert!(args.contains("hostfwd=tcp:127.0.0.1:41000-:8080"), "{args}");
        assert!(
            args.contains("-append console=ttyS0 systemvm.seed=cidata"),
            "{args}"
        );
        assert!(args.contains("file=/seed.iso,media=cdrom,readonly=on"), "{args}");
        assert!(args.contains("-accel tcg"), "{args}");
        let disk = QemuDriver {
            boot: Boot::Disk {
                image: "/systemvm.qcow2".into(),
            },
            ..d
        };
        let args = disk
            .args(&spec(AgentRole::SecStorage), std::path::Path::new("/s.iso"), None)
            .join(" ");
        assert!(
            args.contains("file=/systemvm.qcow2,if=virtio,format=qcow2,snapshot=on"),
            "{args}"
        );
        assert!(!args.contains("hostfwd"), "{args}");
        assert!(args.contains("qmp.sock,server=on,wait=off"), "{args}");
    }
}
