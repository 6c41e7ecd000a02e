//! Smoke tests of the `console-proxy` binary: keygen, token, serve.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use systemvm_proto::console::{ConsoleTarget, KeySet, ViewerMode};

const BIN: &str = env!("CARGO_BIN_EXE_console-proxy");

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("console-proxy-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn load(path: &Path) -> KeySet {
    KeySet::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn keygen_writes_a_private_key_file_and_rotates() {
    let dir = temp_dir("keygen");
    let keys = dir.join("keys.json");
    let k = keys.to_str().unwrap();
    assert!(run(&["keygen", "--out", k]).status.success());
    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(load(&keys).ids(), vec![1]);

    let again = run(&["keygen", "--out", k]);
    assert!(!again.status.success(), "overwrote an existing key file");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--rotate"));

    assert!(run(&["keygen", "--out", k, "--rotate"]).status.success());
    assert_eq!(load(&keys).ids(), vec![1, 2]);
}

#[test]
fn keygen_refuses_a_leftover_or_planted_temp_file() {
    let dir = temp_dir("keygen-tmp");
    let keys = dir.join("keys.json");
    let k = keys.to_str().unwrap();
    let tmp = dir.join("keys.json.tmp");
    let refused = |what: &str| {
        let out = run(&["keygen", "--out", k]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "keygen wrote through {what}");
        assert!(
            stderr.contains(tmp.to_str().unwrap()) && stderr.contains("already exists"),
            "{what}: {stderr}"
        );
        assert!(!keys.exists(), "{what}: a key file was written");
    };

    // A symlink planted where the temporary file goes is not followed.
    let target = dir.join("elsewhere");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    refused("a symlink");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    std::fs::remove_file(&tmp).unwrap();
    std::os::unix::fs::symlink(dir.join("nowhere"), &tmp).unwrap();
    refused("a dangling symlink");
    assert!(!dir.join("nowhere").exists());
    std::fs::remove_file(&tmp).unwrap();

    // A leftover with a loose mode (say from an interrupted run) is neither reused nor its mode kept.
    std::fs::write(&tmp, "old").unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused("a leftover file");
    assert_eq!(std::fs::read_to_string(&tmp).unwrap(), "old");
    std::fs::remove_file(&tmp).unwrap();

    // With the way clear: a 0600 key file and no temporary file left behind; rotation alike.
    assert!(run(&["keygen", "--out", k]).status.success());
    assert!(run(&["keygen", "--out", k, "--rotate"]).status.success());
    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(load(&keys).ids(), vec![1, 2]);
    assert!(!tmp.exists());
}

#[test]
fn token_prints_a_sealed_token_with_the_claims() {
    let dir = temp_dir("token");
    let keys = dir.join("keys.json");
    let k = keys.to_str().unwrap();
    assert!(run(&["keygen", "--out", k]).status.success());
    let out = Command::new(BIN)
        .args([
            "token",
            "--keys",
            k,
            "--vnc",
            "10.1.2.3:5901",
            "--ttl",
            "60",
            "--vm-name",
            "web-01",
        ])
        .args([
            "--view-only",
            "--origin",
            "https://ui.example",
            "--client-ip",
            "192.0.2.7",
        ])
        .env("CONSOLE_PROXY_VNC_PASSWORD", "pw123456")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = load(&keys).open(token.trim()).unwrap();
    match claims.target {
        ConsoleTarget::Vnc { host, port, password } => {
            assert_eq!((host.as_str(), port), ("10.1.2.3", 5901));
            assert_eq!(password.unwrap().expose(), "pw123456");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(claims.expires - claims.not_before, 60);
    assert_eq!(claims.vm.display_name, "web-01");
    assert_eq!(claims.viewer, ViewerMode::ViewOnly);
    assert_eq!(claims.allowed_origins, vec!["https://ui.example".to_string()]);
    assert_eq!(claims.session_id.len(), 32);

    let bad = run(&["token", "--keys", k, "--vnc", "no-port"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HOST:PORT"));
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
fn serve_answers_the_page_and_refuses_bad_tokens() {
    let dir = temp_dir("serve");
    let keys = dir.join("keys.json");
    assert!(run(&["keygen", "--out", keys.to_str().unwrap()]).status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &addr, "--keys", keys.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let start = Instant::now();
    loop {
        let line = lines.next().expect("serve exited before listening").unwrap();
        if line.contains("Console proxy listening") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "serve did not start");
    }

    let page = http_get(&addr, "/console?token=x");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'self'")
    );
    assert!(page.to_ascii_lowercase().contains("referrer-policy: no-referrer"));
    assert!(http_get(&addr, "/novnc/core/rfb.js").starts_with("HTTP/1.1 200"));
    assert!(http_get(&addr, "/novnc/../package.json").starts_with("HTTP/1.1 404"));
    let not_ws = http_get(&addr, "/websockify?token=x");
    assert!(not_ws.starts_with("HTTP/1.1 400"), "{not_ws}");

    // A WebSocket with a bad token is upgraded, then closed with code 4001 and a reason.
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET /websockify?token=garbage HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: binary, base64\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "accept key of RFC 6455's example"
    );
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-protocol: binary\r\n"),
        "{text}"
    );
    let body = &resp[text.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(body[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([body[2], body[3]]), 4001);
    assert_eq!(&body[4..], b"console token is not valid");
}

#[test]
fn serve_exits_cleanly_when_its_parent_is_not_the_one_named() {
    let dir = temp_dir("parent-named");
    let keys = dir.join("keys.json");
    assert!(run(&["keygen", "--out", keys.to_str().unwrap()]).status.success());
    // This test process is the parent, not pid 1: as if core had died before the proxy started.
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--keys",
            keys.to_str().unwrap(),
        ])
        .env("SYSTEMVM_PARENT_PID", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("serve kept running without its parent");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("re-parented"), "{stderr}");
}

#[test]
fn serve_ends_with_the_parent_that_started_it() {
    let dir = temp_dir("parent-dies");
    let keys = dir.join("keys.json");
    assert!(run(&["keygen", "--out", keys.to_str().unwrap()]).status.success());
    let log = dir.join("serve.log");
    let mut agent = systemvm_tests::orphan::UnderShell::start(
        Path::new(BIN),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--keys",
            keys.to_str().unwrap(),
        ],
        &log,
    )
    .unwrap();
    // Its parent lives: it keeps serving (well past a check interval).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        agent.agent_running(),
        "serve ended with its parent alive: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    agent.end_parent().unwrap();
    assert!(
        agent.wait_agent_gone(Duration::from_secs(5)),
        "serve outlived its parent"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("re-parented"), "{log}");
}
