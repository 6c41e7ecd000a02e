//! `ssvm-agent serve`: the local JSON job API of the real binary, and a job that survives kill -9.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use ssvm_agent::fetch::{self, FetchConfig};
use systemvm_tests::http::{Faults, HttpFixture, Route};

struct Agent {
    child: Child,
    api: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(store: &Path, state: &Path) -> Agent {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_ssvm-agent"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(format!("file://{}", store.display()))
        .arg("--state-dir")
        .arg(state)
        .args(["--allow-internal", "127.0.0.0/8", "--checkpoint-secs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "agent API did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Agent {
        child,
        api: format!("http://{addr}"),
    }
}

fn client() -> reqwest::Client {
    fetch::client(&FetchConfig {
        allow_internal: vec!["127.0.0.0/8".parse().unwrap()],
        ..FetchConfig::default()
    })
    .unwrap()
}

async fn status(c: &reqwest::Client, agent: &Agent, id: &str) -> Value {
    c.get(format!("{}/jobs/{id}", agent.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_for(c: &reqwest::Client, agent: &Agent, id: &str, what: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let s = status(c, agent, id).await;
        if what(&s) {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "job {id} never got there: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_api_submit_status_cancel_and_resume_after_kill() {
    let root = std::env::temp_dir().join(format!("ssvm-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (store, state) = (root.join("store"), root.join("state"));
    std::fs::create_dir_all(&store).unwrap();
    // A raw image of noise, paced so jobs run for a few seconds.
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let http = HttpFixture::start().unwrap();
    let slow = |d: &[u8]| Route::File {
        data: d.to_vec().into(),
        pace: Some(Duration::from_millis(60)),
        faults: Faults::default(),
        ranges: true,
    };
    http.route("/disk.img", slow(&data));
    http.route("/other.img", slow(&data));
    let c = client();
    let mut agent = start(&store, &state);

    let job = json!({ "id": "job-a", "url": http.url("/disk.img"), "path": "template/tmpl/2/210", "format": "RAW",
                      "checksum": format!("{{SHA-256}}{}", hex::encode(Sha256::digest(&data))) });
    let r = c
        .post(format!("{}/jobs", agent.api))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Same id, same spec: the same job (idempotent). Same id, other spec: refused.
    let r = c
        .post(format!("{}/jobs", agent.api))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut other = job.clone();
    other["path"] = json!("template/tmpl/2/999");
    assert_eq!(
        c.post(format!("{}/jobs", agent.api))
            .json(&other)
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    // Bad input gets a clear 400 and creates nothing.
    let bad = json!({ "url": "ftp://x/y.img", "path": "template/tmpl/2/211", "format": "RAW" });
    let r = c
        .post(format!("{}/jobs", agent.api))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("scheme"));
    let r = c
        .post(format!("{}/jobs", agent.api))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let mut unknown = job.clone();
    unknown["id"] = json!("job-typo");
    unknown["formt"] = json!("RAW");
    let r = c
        .post(format!("{}/jobs", agent.api))
        .json(&unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("formt"));

    // A second job, cancelled while it runs.
    let cancel = json!({ "id": "job-b", "url": http.url("/other.img"), "path": "template/tmpl/2/212", "format": "RAW" });
    assert_eq!(
        c.post(format!("{}/jobs", agent.api))
            .json(&cancel)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    wait_for(&c, &agent, "job-b", |s| {
        s["progress"]["bytes"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(
        c.delete(format!("{}/jobs/job-b", agent.api))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let s = wait_for(&c, &agent, "job-b", |s| s["state"] == "cancelled").await;
    assert_eq!(s["state"], "cancelled");
    assert!(!store.join("template/tmpl/2/212/template.properties").exists());

    // Progress is visible, then the agent is killed after a checkpoint and started again.
    let s = wait_for(&c, &agent, "job-a", |s| {
        s["durable_offset"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(s["state"], "running");
    assert!(s["progress"]["total"].as_u64() == Some(data.len() as u64), "{s}");
    assert!(s["progress"]["rate"].as_u64().unwrap_or(0) > 0, "{s}");
    let capacity: Value = c
        .get(format!("{}/capacity", agent.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(capacity["capacity"]["total"].as_u64().unwrap() > 0, "{capacity}");
    assert_eq!(capacity["health"]["state"], "healthy", "{capacity}");
    assert_eq!(
        (
            capacity["jobs_running"].as_u64(),
            capacity["jobs_queued"].as_u64()
        ),
        (Some(1), Some(0)),
        "{capacity}"
    );
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    drop(agent);

    let agent = start(&store, &state);
    let s = wait_for(&c, &agent, "job-a", |s| s["state"] == "completed").await;
    assert_eq!(s["resumes"], 1, "{s}");
    assert_eq!(
        s["installed"]["installed_sha256"],
        hex::encode(Sha256::digest(&data))
    );
    let ranges: Vec<_> = http
        .requests("/disk.img")
        .into_iter()
        .filter_map(|r| r.range)
        .collect();
    assert_eq!(ranges.len(), 1, "one Range request after the restart");
    let list: Value = c
        .get(format!("{}/jobs", agent.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(
        c.get(format!("{}/jobs/nope", agent.api))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}
