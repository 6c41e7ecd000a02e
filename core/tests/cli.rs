//! The `systemvm-core serve` binary: prints the API URL and the credentials path, answers, stops.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};

/// `systemvm-core serve` on loopback ports with its stdout piped.
fn spawn_serve(data_dir: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_systemvm-core"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("failed to start systemvm-core")
}

#[test]
fn serve_prints_url_and_credentials_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_serve(dir.path());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let api = lines.next().unwrap().unwrap();
    let creds = lines.next().unwrap().unwrap();
    let agent = lines.next().unwrap().unwrap();
    assert!(agent.starts_with("Agent endpoint: wss://127.0.0.1:"), "{agent}");
    assert!(
        agent.ends_with(&format!("/agent (CA {})", dir.path().join("ca.pem").display())),
        "{agent}"
    );
    let url = api.strip_prefix("API: http://").unwrap();
    let addr = url.strip_suffix("/client/api").unwrap();
    assert_eq!(
        creds,
        format!("Credentials: {}", dir.path().join("credentials.json").display())
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("credentials.json")).unwrap()).unwrap();
    assert_eq!(c["apikey"].as_str().unwrap().len(), 86);
    // Unsigned: 401 in CloudStack's shape.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(
        b"GET /client/api?command=listZones&response=json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains(r#""errorcode":401"#), "{out}");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn register_systemvm_prints_id_secret_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let register = |role: &str| {
        Command::new(env!("CARGO_BIN_EXE_systemvm-core"))
            .args(["register-systemvm", "--role", role, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    // Before core ever ran on the data dir there is no CA to hand out.
    let early = register("consoleproxy");
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("once first"));

    let mut child = spawn_serve(dir.path());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _ = lines.next().unwrap().unwrap();
    let out = register("secondarystoragevm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    assert_eq!(field("id").len(), 36);
    assert!(field("name").starts_with("s-"));
    assert_eq!(field("secret").len(), 43);
    assert_eq!(field("ca"), dir.path().join("ca.pem").display().to_string());
    let bad = register("router");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid role"));
    child.kill().unwrap();
    let _ = child.wait();
}
