//! `qemu-nbd` as a test NBD server: a qcow2 image served read-only as export `vda` with its dirty
//! bitmap `b0` (the contexts libvirt's pull-mode backup exports), on a free loopback port; killed
//! when dropped. A missing qemu-nbd panics with the package to install.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `qemu-nbd`.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl QemuNbd {
    /// Serves `img` (qcow2, with a persistent bitmap `b0`) once it listens.
    pub fn serve(img: &Path) -> QemuNbd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "qcow2",
                "-x",
                "vda",
                "-b",
                "127.0.0.1",
                "-t",
                "-e",
                "4",
                "-B",
                "b0",
            ])
            .arg(format!("--port={port}"))
            .arg(img)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-nbd not found: run scripts/deps.sh test (qemu-utils)");
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, addr }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command that must succeed (qemu-img, qemu-io), panicking with its error output.
pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/deps.sh test)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
