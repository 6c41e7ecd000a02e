//! A QEMU VM showing its SeaBIOS screen with a password-protected VNC server on loopback: the
//! real VNC server for console tests outside the e2e binary (which has its own in
//! `tests/e2e/support.rs`). QEMU is killed when the test process ends, however it ends.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The VNC password the VM is started with (VNC passwords are at most 8 characters).
pub const VNC_PASSWORD: &str = "secret12";

/// A running VM.
pub struct VncVm {
    /// The VNC server's address.
    pub vnc: SocketAddr,
    _guard: Child,
}

impl VncVm {
    /// Starts `qemu-system-x86_64` (TCG, 64 MiB, no disk) with VNC on a free display of
    /// 127.0.0.1, files in `dir`; waits until the VNC port listens.
    pub fn start(dir: &Path) -> std::io::Result<VncVm> {
        let bin = which("qemu-system-x86_64").ok_or_else(|| {
            std::io::Error::other(
                "qemu-system-x86_64 not found: run scripts/deps.sh (package qemu-system-x86)",
            )
        })?;
        std::fs::create_dir_all(dir)?;
        let secret = dir.join("vnc.secret");
        std::fs::write(&secret, VNC_PASSWORD)?;
        let display = (40..99)
            .find(|d| TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok())
            .ok_or_else(|| std::io::Error::other("no free VNC display between :40 and :99"))?;
        let vnc = SocketAddr::from(([127, 0, 0, 1], 5900 + display));
        let qemu = format!(
            "{bin} -accel tcg -m 64 -display none -net none -monitor none -serial none -no-reboot \
             -name fixture-vm -object secret,id=vncpw,file={secret} \
             -vnc 127.0.0.1:{display},password-secret=vncpw",
            bin = bin.display(),
            secret = secret.display(),
        );
        // The shell kills QEMU when this process ends (its stdin pipe closes).
        let guard = Command::new("sh")
            .arg("-c")
            .arg(format!("{qemu} & q=$!; read _ignored; kill $q; wait $q"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let started = Instant::now();
        while TcpStream::connect_timeout(&vnc, Duration::from_millis(200)).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                return Err(std::io::Error::other(format!(
                    "QEMU's VNC server did not listen on {vnc} within 20 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(VncVm { vnc, _guard: guard })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
