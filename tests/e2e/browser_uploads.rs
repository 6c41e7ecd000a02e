//! Browser uploads in headless Chromium into nfs-ganesha through a real storage VM: the Mold UI's
//! multipart XHR from a page of another origin (template ≥ 64 MiB, and an ISO), and core's upload
//! page (tus-js-client) interrupted by a `kill -9` of the storage VM and resumed after its restart.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use systemvm_tests::http::HttpFixture;
use tokio::io::AsyncBufReadExt as _;

use crate::deploy::kill9;
use crate::nfs::{NFS_LOCK, ganesha};
use crate::support::workspace;
use crate::uploads::{core_with_store, installed_sha, params, settled, transfer_up};

fn web() -> std::path::PathBuf {
    let web = workspace().join("core/web");
    assert!(
        web.join("node_modules/playwright-core").is_dir() && web.join("node_modules/tus-js-client").is_dir(),
        "core/web/node_modules missing: run scripts/deps.sh (npm ci in core/web)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file(),
        "Chromium missing: run scripts/deps.sh (package chromium)"
    );
    web
}

/// The Mold UI's upload, from a page served by `page`.
async fn mold_upload(page: &HttpFixture, file: &std::path::Path, up: &crate::uploads::Up) -> Value {
    let out = tokio::process::Command::new("node")
        .current_dir(web())
        .arg("e2e/upload.mjs")
        .arg("mold")
        .arg(page.url("/mold.html"))
        .arg(file)
        .arg(
            json!({
                "postURL": up.post_url,
                "signature": up.signature,
                "metadata": up.metadata,
                "expires": up.expires,
            })
            .to_string(),
        )
        .output()
        .await
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(2),
        "browser upload could not run: {stderr}"
    );
    stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON from the browser: {stdout} {stderr}"))
}

/// The storage VM's journal record of job `id`, found under the core's data dir (the process
/// driver gives each VM a state directory there).
fn job_record(dir: &std::path::Path, id: &str) -> Option<Value> {
    let name = format!("{id}.json");
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == name.as_str()) {
                return std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            }
        }
    }
    None
}

fn admin_password(core: &crate::core_api::Core) -> String {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(&core.running().credentials_path).expect("credentials"),
    )
    .expect("json");
    v["password"].as_str().expect("password").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_upload_to_the_storage_vm_and_resume_after_it_is_killed() {
    let _nfs = NFS_LOCK.lock().await;
    let g = ganesha();
    let (mut core, _guard, ssvm, _) = core_with_store(Some(&g.url)).await;
    let img_dir = core.dir().join("img");
    let big = systemvm_tests::images::qcow2_of_noise(&img_dir, "big.qcow2", 64, 9).expect("qcow2");
    let big_sha = hex::encode(Sha256::digest(std::fs::read(&big).expect("read")));
    let page = HttpFixture::start().expect("http");
    page.file(
        "/mold.html",
        b"<!doctype html><html><body><input type=file id=f></body></html>".to_vec(),
    );

    // The Mold UI: a cross-origin XHR (preflight, multipart, the signed headers).
    let up = params(&core, false, "from-mold-ui", &[]).await;
    transfer_up(&up).await;
    let r = mold_upload(&page, &big, &up).await;
    assert_eq!(r["status"], 200, "{r}");
    let origin = r["origin"].as_str().unwrap_or_default().to_owned();
    assert!(
        !up.post_url.starts_with(&origin),
        "the page is on another origin: {origin} vs {}",
        up.post_url
    );
    let t = settled(&core, &up.id, false).await;
    assert_eq!(t["isready"], true, "{t}");
    assert_eq!(
        installed_sha(&g.dir, &up.id),
        big_sha,
        "the installed template is the file"
    );
    assert!(t["size"].as_u64().unwrap_or(0) >= 64 << 20, "{t}");

    let mut iso = systemvm_tests::images::noise(4 << 20, 21);
    iso[0x8000..0x8006].copy_from_slice(b"\x01CD001");
    let iso_file = img_dir.join("small.iso");
    std::fs::write(&iso_file, &iso).expect("write iso");
    let iso_up = params(&core, true, "iso-from-mold-ui", &[]).await;
    let r = mold_upload(&page, &iso_file, &iso_up).await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(settled(&core, &iso_up.id, true).await["isready"], true);
    assert_eq!(
        installed_sha(&g.dir, &iso_up.id),
        hex::encode(Sha256::digest(&iso))
    );

    // Core's upload page with tus, in 4 MiB PATCHes on a slow link; the storage VM killed once it
    // journalled a resume point (≥ 16 MiB flushed) while still receiving, restarted by the fleet;
    // the page resumes at the journalled offset.
    let mut child = tokio::process::Command::new("node")
        .current_dir(web())
        .arg("e2e/upload.mjs")
        .arg("page")
        .arg(format!("http://{}", core.running().addr))
        .arg("admin")
        .arg(admin_password(&core))
        .arg(&big)
        .arg("from-upload-page")
        .args(["--query", "chunk=4194304&pause=250", "--timeout-ms", "240000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut killed, mut after_kill_min, mut last) = (false, u64::MAX, Value::Null);
    let start = Instant::now();
    while let Some(line) = lines.next_line().await.expect("read") {
        let s: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        assert_eq!(s["tus"], true, "the page has tus-js-client: {s}");
        let bytes = s["bytes"].as_u64().unwrap_or(0);
        // Killed once the storage VM journalled a resume point and is still receiving.
        let resumable = !killed
            && s["id"]
                .as_str()
                .and_then(|id| job_record(core.dir(), id))
                .is_some_and(|r| {
                    r["state"] == "running" && r["durable_offset"].as_u64().unwrap_or(0) >= 16 << 20
                });
        if resumable {
            kill9(&ssvm);
            killed = true;
        } else if killed && s["phase"] == "uploading" && bytes > 0 {
            after_kill_min = after_kill_min.min(bytes);
        }
        last = s;
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "page upload too slow: {last}"
        );
    }
    let status = child.wait().await.expect("wait");
    assert!(status.success(), "the page's upload failed: {last}");
    assert!(killed, "the storage VM was killed mid-upload: {last}");
    assert!(after_kill_min > 0, "progress after the kill: {last}");
    let id = last["id"].as_str().expect("template id").to_owned();
    // The storage VM's journal: the upload resumed from its part file (not from zero).
    let record = job_record(core.dir(), &id).unwrap_or_else(|| panic!("no journal record of {id}"));
    assert_eq!(record["state"], "completed", "{record}");
    assert!(
        record["resumes"].as_u64().unwrap_or(0) >= 1,
        "resumed from the part file: {record}"
    );
    let t = settled(&core, &id, false).await;
    assert_eq!(t["isready"], true, "{t}");
    assert_eq!(installed_sha(&g.dir, &id), big_sha);
    // The export is shared with the other NFS tests: the images go (through the storage VM).
    for (id, cmd) in [
        (&up.id, "deleteTemplate"),
        (&iso_up.id, "deleteIso"),
        (&id, "deleteTemplate"),
    ] {
        core.ok(&[cmd, &format!("id={id}")]).await;
        assert!(
            crate::uploads::install_files(&g.dir, id).is_empty(),
            "{id} still on the store"
        );
    }
    core.shutdown_with_system_vms().await;
}
