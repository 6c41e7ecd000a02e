//! `ssvm-agent serve` started by core's process driver (`SYSTEMVM_PARENT_PID` set) ends with its
//! parent: at once, with code 0, when the parent is not the named one, and within a check
//! interval of its parent dying (the agent is re-parented).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ssvm-agent");

fn serve_args(dir: &Path) -> Vec<String> {
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--store".into(),
        format!("file://{}", store.display()),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ]
}

#[test]
fn serve_exits_cleanly_when_its_parent_is_not_the_one_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(serve_args(dir.path()))
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
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("re-parented"), "{stderr}");
}

#[test]
fn serve_ends_with_the_parent_that_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = serve_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.path().join("serve.log");
    let mut agent = systemvm_tests::orphan::UnderShell::start(Path::new(BIN), &args, &log).unwrap();
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
