//! Real components for the end-to-end tests: QEMU's VNC server, the console proxy in process, and
//! stock noVNC in headless Chromium. A component that cannot start fails the test with the reason.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use console_proxy::{ProxyConfig, RunningProxy};
use systemvm_proto::Secret;
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, KeySet, ViewerMode, VmRef};

/// The VNC password QEMU is started with (VNC passwords are at most 8 characters).
pub(crate) const VNC_PASSWORD: &str = "secret12";

/// Workspace root.
pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where tests leave artefacts (screenshots): `target/test-artifacts`.
pub(crate) fn artifacts() -> PathBuf {
    let dir = workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Waits until a TCP port accepts connections.
pub(crate) fn wait_port(addr: SocketAddr, within: Duration, what: &str) {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < within,
            "{what} did not listen on {addr} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A QEMU VM showing its SeaBIOS screen, with a password-protected VNC server on loopback.
pub(crate) struct Qemu {
    /// The VNC server's address.
    pub(crate) vnc: SocketAddr,
    _guard: Child,
}

/// The QEMU shared by every test of this binary, started on first use.
pub(crate) fn qemu() -> &'static Qemu {
    static QEMU: OnceLock<Qemu> = OnceLock::new();
    QEMU.get_or_init(start_qemu)
}

fn start_qemu() -> Qemu {
    let bin = which("qemu-system-x86_64")
        .expect("qemu-system-x86_64 not found: run scripts/deps.sh (package qemu-system-x86)");
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create qemu dir");
    let secret = dir.join("vnc.secret");
    std::fs::write(&secret, VNC_PASSWORD).expect("write vnc secret");
    // A display number whose port is free now.
    let display = (40..99)
        .find(|d| TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok())
        .expect("no free VNC display between :40 and :99");
    let vnc: SocketAddr = format!("127.0.0.1:{}", 5900 + display).parse().expect("vnc addr");
    let qemu_cmd = format!(
        "{bin} -accel tcg -m 64 -display none -net none -monitor none -serial none -no-reboot \
         -name e2e-vm -object secret,id=vncpw,file={secret} -vnc 127.0.0.1:{display},password-secret=vncpw",
        bin = bin.display(),
        secret = secret.display(),
    );
    // The shell kills QEMU when this test process ends (its stdin pipe closes), however it ends.
    let guard = Command::new("sh")
        .arg("-c")
        .arg(format!("{qemu_cmd} & q=$!; read _ignored; kill $q; wait $q"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("failed to start QEMU");
    wait_port(vnc, Duration::from_secs(20), "QEMU's VNC server");
    Qemu { vnc, _guard: guard }
}

/// Finds a program on PATH.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A console proxy serving in process on a free loopback port, with its key set.
pub(crate) struct Proxy {
    /// The running proxy.
    pub(crate) running: RunningProxy,
    /// Keys it trusts.
    pub(crate) keys: KeySet,
}

impl Proxy {
    /// Starts a proxy with default settings (plain ws://).
    pub(crate) async fn start() -> Proxy {
        Self::start_with(|_| {}).await
    }

    /// Starts a proxy after `adjust` changed its settings.
    pub(crate) async fn start_with(adjust: impl FnOnce(&mut ProxyConfig)) -> Proxy {
        let keys = KeySet::generate().expect("keys");
        let mut config = ProxyConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            keys.clone(),
            workspace().join("console-proxy/web"),
        );
        adjust(&mut config);
        let running = console_proxy::start(config)
            .await
            .expect("console proxy failed to start");
        Proxy { running, keys }
    }

    /// `ws://…/websockify?token=…`.
    pub(crate) fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/websockify?token={token}", self.running.addr)
    }

    /// `http://…/console?token=…`.
    pub(crate) fn page_url(&self, token: &str) -> String {
        format!("http://{}/console?token={token}", self.running.addr)
    }
}

/// Claims for a VNC console, valid for five minutes from now.
pub(crate) fn claims(vnc: SocketAddr, password: Option<&str>) -> ConsoleTokenClaims {
    let now = console_proxy::unix_now();
    ConsoleTokenClaims {
        target: ConsoleTarget::Vnc {
            host: vnc.ip().to_string(),
            port: vnc.port(),
            password: password.map(|p| Secret(p.to_owned())),
        },
        vm: VmRef {
            id: "vm-e2e".into(),
            display_name: "e2e-vm".into(),
        },
        session_id: systemvm_proto::console::new_session_id().expect("session id"),
        not_before: now,
        expires: now + 300,
        client_ip: None,
        allowed_origins: vec![],
        viewer: ViewerMode::Interactive,
        keyboard_locale: None,
    }
}

/// The outcome of opening the console page in headless Chromium (`console-proxy/web/e2e/check.mjs`).
#[derive(Debug)]
pub(crate) struct PageCheck {
    /// Whether the outcome matched the expectation.
    pub(crate) matched: bool,
    /// The JSON line the script printed.
    pub(crate) report: serde_json::Value,
}

/// Opens `url` in headless Chromium and waits for `expect` (`connected` or `failed`).
pub(crate) fn check_page(url: &str, screenshot: &Path, expect: &str) -> PageCheck {
    check_page_env(url, screenshot, expect, &[])
}

/// [`check_page`] with more environment for node and Chromium (`HOME` for its NSS trust store,
/// `CHROMIUM_EXTRA_ARGS`).
pub(crate) fn check_page_env(url: &str, screenshot: &Path, expect: &str, env: &[(&str, &str)]) -> PageCheck {
    check_page_with(url, screenshot, expect, env, &[])
}

/// [`check_page_env`] with more arguments for the check script (e.g. `--type TEXT`).
pub(crate) fn check_page_with(
    url: &str,
    screenshot: &Path,
    expect: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> PageCheck {
    let web = workspace().join("console-proxy/web");
    assert!(
        web.join("node_modules/playwright-core").is_dir(),
        "playwright-core missing: run scripts/deps.sh (npm ci in console-proxy/web)"
    );
    assert!(
        Path::new("/usr/bin/chromium").is_file(),
        "Chromium missing: run scripts/deps.sh (package chromium)"
    );
    let out = Command::new("node")
        .current_dir(&web)
        .envs(env.iter().copied())
        .args(["e2e/check.mjs", url])
        .arg(screenshot)
        .args(["--expect", expect, "--timeout-ms", "30000"])
        .args(extra)
        .output()
        .expect("failed to run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(2),
        "browser check could not run: {stderr}"
    );
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON from the browser check; stdout: {stdout}; stderr: {stderr}"));
    if !out.status.success() {
        let _ = std::io::stderr().write_all(stderr.as_bytes());
    }
    PageCheck {
        matched: out.status.success(),
        report,
    }
}

/// The error code anywhere in a failed API answer (`errorcode`, also inside an async job's
/// result).
pub(crate) fn errorcode(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Object(m) => m
            .get("errorcode")
            .and_then(serde_json::Value::as_i64)
            .or_else(|| m.values().find_map(errorcode)),
        _ => None,
    }
}

/// An HTTP/1.1 response read off the wire: (status, headers, body); 0 when there is none.
pub(crate) fn parse_response(buf: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let body = buf.get(split + 4..).unwrap_or_default().to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap_or_default()
        .split(' ')
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    (status, headers, body)
}
