//! Smoke test of `ssvm-agent serve --core … --vm-id … --secret … --ca …` (the real binary) against
//! a minimal stand-in for core's agent endpoint: the agent verifies the endpoint against the given
//! CA, says Hello as a storage VM and reports its jobs and store health in heartbeats. The real
//! core is exercised in `tests/e2e/agents.rs`.

use std::process::{Command, Stdio};
use std::time::Duration;

use systemvm_proto::agent::{AgentMessage, AgentRole, CoreMessage, Welcome};
use systemvm_tests::standin_core::StandinCore;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_core_reports_storage_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();

    let core = StandinCore::start(dir.path()).await.unwrap();

    let _agent = Kill(
        Command::new(env!("CARGO_BIN_EXE_ssvm-agent"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("file://{}", store.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args([
                "--core",
                // An unreachable first core, then the stand-in: the agent tries each in turn.
                "wss://localhost:1/agent",
                "--core",
                &core.url("localhost"),
                "--vm-id",
                "ssvm-1",
                "--secret",
                "s3cret",
                "--ca",
            ])
            .arg(&core.ca_pem)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let (mut ws, hello) = core
        .accept(Duration::from_secs(20))
        .await
        .expect("the agent did not dial in");
    assert_eq!(hello.role, AgentRole::SecStorage);
    assert_eq!(hello.vm_id, "ssvm-1");
    assert_eq!(hello.secret.expose(), "s3cret");
    let welcome = CoreMessage::Welcome(Welcome {
        version: 1,
        heartbeat_interval_secs: 1,
        console_keys: None,
        config: Default::default(),
    });
    ws.send(&welcome).await.unwrap();
    let mut last = None;
    for _ in 0..6 {
        let AgentMessage::Heartbeat(hb) = ws.recv(Duration::from_secs(5)).await.unwrap() else {
            panic!("expected a heartbeat")
        };
        let storage = hb.load.storage.expect("storage load");
        if storage.store_health == "ok" {
            assert_eq!(storage.jobs_running, 0);
            assert!(storage.capacity_total.is_some_and(|t| t > 0), "{storage:?}");
            last = None;
            break;
        }
        last = Some(storage);
    }
    assert!(last.is_none(), "store never reported healthy: {last:?}");

    // The stand-in stops reading (so it answers no ping) but keeps the socket open, as a hung
    // host would: the agent gives up on it and dials again.
    let started = std::time::Instant::now();
    let again = core.accept(Duration::from_secs(30)).await;
    assert!(again.is_ok(), "the agent kept talking to a silent core");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "reconnected too early: {:?}",
        started.elapsed()
    );
    drop(ws);
}
