//! Core driving its system VMs end to end, on SQLite and on PostgreSQL, with the real `cs` client:
//! * a template and an ISO registered through core are downloaded by a storage agent linked to
//!   core into nfs-ganesha, their progress and `isready` visible in `listTemplates`/`listIsos`,
//!   capacity in `listImageStores`/`listCapacity`, and `deleteTemplate` removes the files;
//! * `createConsoleEndpoint` returns a link that opens QEMU's console through a console proxy
//!   registered with core (RFB over the WebSocket, and stock noVNC in Chromium), a link opens one
//!   session across two proxies, affinity keeps a VM on its proxy, and key rotation reaches the
//!   proxies without breaking links issued before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use ssvm_agent::download::{DownloadSettings, Downloader};
use ssvm_agent::fetch::{self, FetchConfig};
use ssvm_agent::job::Journal;
use ssvm_agent::store::StoreOptions;
use systemvm_proto::Secret;
use systemvm_proto::ws::close_code;
use systemvm_tests::http::HttpFixture;

use crate::agents::start_core;
use crate::console::{distinct_pixels, open};
use crate::core_api::{Backend, Core};
use crate::nfs::{NFS_LOCK, ganesha};
use crate::support::{VNC_PASSWORD, artifacts, check_page, qemu, workspace};

mod template_registered_through_core_lands_on_ganesha {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::template_registered_through_core_lands_on_ganesha(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::template_registered_through_core_lands_on_ganesha(super::Backend::Postgres).await;
    }
}

mod console_endpoint_opens_qemu_through_a_registered_proxy {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::console_endpoint_opens_qemu_through_a_registered_proxy(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::console_endpoint_opens_qemu_through_a_registered_proxy(super::Backend::Postgres).await;
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-fleet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn link(core: &Core, id: &str, secret: &str) -> systemvm_agent_client::CoreLink {
    systemvm_agent_client::CoreLink {
        urls: vec![core.agent_url()],
        vm_id: id.to_owned(),
        secret: Secret(secret.to_owned()),
        ca: core.running().ca_path.clone(),
    }
}

/// A storage agent on ganesha's export, linked to core (what `ssvm-agent serve --store … --core …` runs).
async fn storage_agent(core: &Core, state_dir: &Path) -> ssvm_agent::core_link::RunningLink {
    let (id, secret) = core.register("secondarystoragevm", "s-e2e-VM").await;
    let store = ganesha().open(StoreOptions::default()).await;
    let allow: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().expect("cidr")];
    let downloader = Downloader {
        http: fetch::client(&FetchConfig {
            allow_internal: allow.clone(),
            ..FetchConfig::default()
        })
        .expect("http client"),
        store,
        journal: Journal::open(state_dir).expect("journal"),
        settings: DownloadSettings::default(),
        allow_internal: Arc::new(allow),
        peers: ssvm_agent::peer::Peers::none(),
    };
    let agent = ssvm_agent::service::Agent::new(downloader, 2);
    let running = ssvm_agent::core_link::connect(agent, &link(core, &id, &secret)).expect("storage link");
    core.wait_agent_state(&id, "Up", Duration::from_secs(15)).await;
    running
}

/// Polls `list` (listTemplates or listIsos) for `id` until it is ready or failed; returns the
/// last item and the statuses seen on the way.
async fn wait_download(core: &Core, list: &[&str], id: &str, within: Duration) -> (Value, Vec<String>) {
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let mut args = list.to_vec();
        let id_arg = format!("id={id}");
        args.push(&id_arg);
        let v = core.ok(&args).await;
        let item = v
            .as_object()
            .and_then(|o| {
                o.values()
                    .find_map(|x| x.as_array().and_then(|a| a.first().cloned()))
            })
            .unwrap_or_else(|| panic!("{id} not listed: {v}"));
        let status = item["status"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&status) {
            seen.push(status);
        }
        let state = item["downloaddetails"][0]["downloadState"].clone();
        if item["isready"] == true || state == "DOWNLOAD_ERROR" || state == "ABANDONED" {
            return (item, seen);
        }
        assert!(
            start.elapsed() < within,
            "{id} not done within {within:?}: {item}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first object holding `errorcode` in `v` (an error response, or an async job's result).
fn find_error(v: &Value) -> Option<&Value> {
    if v.get("errorcode").is_some() {
        return Some(v);
    }
    v.as_object()?.values().find_map(find_error)
}

/// Runs `cs` expecting a failure; returns (errorcode, errortext).
pub(crate) async fn cs_err(core: &Core, args: &[&str]) -> (i64, String) {
    let (ok, json) = core.cs_raw(args).await;
    assert!(!ok, "cs {args:?} should fail: {json}");
    let e = find_error(&json).unwrap_or_else(|| panic!("no error in {json}"));
    (
        e["errorcode"].as_i64().unwrap_or_default(),
        e["errortext"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn template_registered_through_core_lands_on_ganesha(backend: Backend) {
    let _serial = NFS_LOCK.lock().await;
    let nfs = ganesha();
    let tmp = temp(if matches!(backend, Backend::Sqlite) {
        "tmpl-sqlite"
    } else {
        "tmpl-pg"
    });
    let core = start_core(matches!(backend, Backend::Postgres)).await;
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .expect("default zone")
        .to_owned();

    // No image store yet: registration is refused with CloudStack's parameter error, nothing recorded.
    let (code, text) = cs_err(
        &core,
        &[
            "registerTemplate",
            "name=x",
            "displaytext=x",
            "format=QCOW2",
            "hypervisor=KVM",
            "url=http://127.0.0.1/x.qcow2",
            &format!("zoneid={zone}"),
        ],
    )
    .await;
    assert_eq!(code, 431, "{text}");
    assert!(text.contains("no image store"), "{text}");

    let store = core
        .ok(&[
            "addImageStore",
            "provider=NFS",
            "name=ganesha",
            &format!("url={}", nfs.url),
            &format!("zoneid={zone}"),
        ])
        .await;
    assert_eq!(store["imagestore"]["protocol"], "nfs", "{store}");
    assert_eq!(store["imagestore"]["providername"], "NFS", "{store}");
    let (code, _) = cs_err(&core, &["addImageStore", "provider=NFS", "url=nfs://only-a-host"]).await;
    assert_eq!(code, 431);
    let (code, _) = cs_err(&core, &["addImageStore", "provider=S3", "url=nfs://h/e"]).await;
    assert_eq!(code, 431);

    // Registered while no storage VM is Up: it waits, and says so.
    let img = systemvm_tests::images::qcow2_of_noise(&tmp.join("img"), "centos.qcow2", 8, 7).expect("qcow2");
    let data = std::fs::read(&img).expect("read qcow2");
    let http = HttpFixture::start().expect("http fixture");
    http.file("/centos.qcow2", data.clone());
    let sum = format!("{{SHA-256}}{}", hex::encode(Sha256::digest(&data)));
    let reg = core
        .ok(&[
            "registerTemplate",
            "name=centos",
            "displaytext=CentOS e2e",
            "format=QCOW2",
            "hypervisor=KVM",
            &format!("url={}", http.url("/centos.qcow2")),
            &format!("zoneid={zone}"),
            &format!("checksum={sum}"),
            "ispublic=true",
        ])
        .await;
    assert_eq!(reg["count"], 1, "{reg}");
    let t = &reg["template"][0];
    let tid = t["id"].as_str().expect("template id").to_owned();
    assert_eq!(t["isready"], false, "{t}");
    assert_eq!(t["downloaddetails"][0]["downloadState"], "NOT_DOWNLOADED", "{t}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let waiting = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
        .await;
    assert!(
        waiting["template"][0]["status"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Waiting for a storage VM serving image store ganesha"),
        "{waiting}"
    );

    // The storage VM comes Up, takes the download and installs it on ganesha.
    let agent = storage_agent(&core, &tmp.join("state")).await;
    let (item, seen) = wait_download(
        &core,
        &["listTemplates", "templatefilter=all"],
        &tid,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(item["isready"], true, "{item} (statuses {seen:?})");
    assert_eq!(item["status"], "Download Complete", "{item}");
    assert_eq!(
        item["downloaddetails"][0]["downloadState"], "DOWNLOADED",
        "{item}"
    );
    assert_eq!(item["downloaddetails"][0]["downloadPercent"], "100", "{item}");
    assert_eq!(item["size"], 8 * 1024 * 1024, "virtual size of the qcow2: {item}");
    assert_eq!(item["format"], "QCOW2");
    let account = item["accountid"].as_str().expect("account id");
    let dir = nfs.dir.join(format!("template/tmpl/{account}/{tid}"));
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("install dir {} on the export: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let image = names
        .iter()
        .find(|n| n.ends_with(".qcow2"))
        .unwrap_or_else(|| panic!("no qcow2 in {names:?}"));
    let on_disk = std::fs::read(dir.join(image)).expect("installed image");
    assert_eq!(Sha256::digest(&on_disk)[..], Sha256::digest(&data)[..]);
    assert!(names.iter().any(|n| n == "template.properties"), "{names:?}");
    // A non-admin filter still sees it (public), and a keyword search finds it.
    let found = core
        .ok(&["listTemplates", "templatefilter=executable", "keyword=cent"])
        .await;
    assert_eq!(found["count"], 1, "{found}");

    // Capacity from the storage VM's heartbeats.
    let start = Instant::now();
    loop {
        let stores = core.ok(&["listImageStores"]).await;
        let cap = core
            .ok(&["listCapacity", "type=6", &format!("zoneid={zone}")])
            .await;
        let total = cap["capacity"][0]["capacitytotal"].as_u64().unwrap_or(0);
        if stores["imagestore"][0]["disksizetotal"].as_u64().unwrap_or(0) > 0 && total > 0 {
            assert_eq!(cap["capacity"][0]["type"], 6, "{cap}");
            assert!(
                cap["capacity"][0]["capacityused"].as_u64().unwrap_or(0) <= total,
                "{cap}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no capacity reported: {stores} {cap}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let none = core.ok(&["listCapacity", "type=0"]).await;
    assert!(none.get("capacity").is_none(), "{none}");

    // A wrong checksum fails the download with the reason, and leaves no image behind.
    let bad = core
        .ok(&[
            "registerTemplate",
            "name=bad",
            "displaytext=bad",
            "format=QCOW2",
            "hypervisor=KVM",
            &format!("url={}", http.url("/centos.qcow2")),
            &format!("checksum={{SHA-256}}{}", "0".repeat(64)),
        ])
        .await;
    let bad_id = bad["template"][0]["id"].as_str().expect("id").to_owned();
    let (item, _) = wait_download(
        &core,
        &["listTemplates", "templatefilter=self"],
        &bad_id,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        item["downloaddetails"][0]["downloadState"], "DOWNLOAD_ERROR",
        "{item}"
    );
    assert!(
        item["status"].as_str().unwrap_or_default().contains("checksum"),
        "{item}"
    );
    let bad_dir = nfs.dir.join(format!("template/tmpl/{account}/{bad_id}"));
    let leftovers: Vec<_> = std::fs::read_dir(&bad_dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "failed download left {leftovers:?}");

    // A user sees its own and public templates only, and can't delete someone else's.
    let (_, _, key, secret) = core.account("tmpl-user", "User").await;
    let (ok, seen) = core
        .cs_with(&key, &secret, &["listTemplates", "templatefilter=executable"])
        .await;
    assert!(ok, "{seen}");
    assert_eq!(seen["count"], 1, "only the public template: {seen}");
    assert_eq!(seen["template"][0]["id"], tid.as_str());
    let (ok, seen) = core
        .cs_with(
            &key,
            &secret,
            &["listTemplates", "templatefilter=all", &format!("id={bad_id}")],
        )
        .await;
    assert!(
        ok && seen.get("template").is_none(),
        "another account's private template shown: {seen}"
    );
    let (ok, denied) = core
        .cs_with(&key, &secret, &["deleteTemplate", &format!("id={tid}")])
        .await;
    assert!(!ok, "{denied}");
    assert_eq!(
        find_error(&denied).map(|e| e["errorcode"].clone()),
        Some(serde_json::json!(531)),
        "{denied}"
    );

    // Bad input: CloudStack's parameter errors, nothing recorded.
    for (args, want) in [
        (vec!["format=VMDK", "url=http://127.0.0.1/a"], "not supported"),
        (vec!["format=QCOW2", "url=file:///etc/passwd"], "http"),
        (
            vec!["format=QCOW2", "url=http://127.0.0.1/a", "checksum=xyz"],
            "checksum",
        ),
        (
            vec!["format=QCOW2", "url=http://127.0.0.1/a", "directdownload=true"],
            "Direct download",
        ),
    ] {
        let mut a = vec!["registerTemplate", "name=n", "displaytext=n", "hypervisor=KVM"];
        a.extend(args);
        let (code, text) = cs_err(&core, &a).await;
        assert_eq!(code, 431, "{a:?}: {text}");
        assert!(text.contains(want), "{a:?}: {text}");
    }
    let all = core.ok(&["listTemplates", "templatefilter=all"]).await;
    assert_eq!(all["count"], 2, "only the two registrations exist: {all}");

    // An ISO goes the same way into listIsos.
    let iso_src = tmp.join("iso-src");
    std::fs::create_dir_all(&iso_src).expect("iso dir");
    std::fs::write(iso_src.join("README"), b"e2e iso").expect("iso file");
    let iso_path = tmp.join("tools.iso");
    let st = std::process::Command::new("genisoimage")
        .args(["-quiet", "-V", "E2E", "-o"])
        .arg(&iso_path)
        .arg(&iso_src)
        .status()
        .expect("genisoimage (scripts/deps.sh installs it)");
    assert!(st.success());
    http.file("/tools.iso", std::fs::read(&iso_path).expect("iso"));
    let iso = core
        .ok(&[
            "registerIso",
            "name=tools",
            "displaytext=tools",
            &format!("url={}", http.url("/tools.iso")),
            &format!("zoneid={zone}"),
        ])
        .await;
    assert_eq!(iso["count"], 1, "{iso}");
    let iso_id = iso["iso"][0]["id"].as_str().expect("iso id").to_owned();
    let (item, _) = wait_download(
        &core,
        &["listIsos", "isofilter=all"],
        &iso_id,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(item["isready"], true, "{item}");
    assert_eq!(item["format"], "ISO");
    assert_eq!(item["bootable"], true);
    let templates = core.ok(&["listTemplates", "templatefilter=all"]).await;
    assert_eq!(templates["count"], 2, "the ISO is not a template: {templates}");

    // deleteTemplate (async) removes the files from the export and the template from the lists.
    let del = core.ok(&["deleteTemplate", &format!("id={tid}")]).await;
    assert_eq!(del["success"], true, "{del}");
    assert!(!dir.exists(), "{} still on the export", dir.display());
    let gone = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
        .await;
    assert!(gone.get("template").is_none(), "{gone}");
    let del = core.ok(&["deleteIso", &format!("id={iso_id}")]).await;
    assert_eq!(del["success"], true, "{del}");
    let (code, _) = cs_err(&core, &["deleteTemplate", &format!("id={tid}")]).await;
    assert_eq!(code, 431, "deleting twice");
    // The store still holds the failed template's record: it can't be deleted yet.
    let (code, _) = cs_err(
        &core,
        &[
            "deleteImageStore",
            &format!("id={}", store["imagestore"]["id"].as_str().unwrap_or_default()),
        ],
    )
    .await;
    assert_eq!(code, 536);

    agent.shutdown().await;
    let _ = std::fs::remove_dir_all(&tmp);
}

/// An in-process console proxy linked to core.
pub(crate) struct LinkedProxy {
    proxy: Arc<console_proxy::RunningProxy>,
    client: systemvm_agent_client::AgentClient,
    id: String,
}

pub(crate) async fn linked_proxy(core: &Core, name: &str) -> LinkedProxy {
    let (id, secret) = core.register("consoleproxy", name).await;
    let config = console_proxy::ProxyConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        systemvm_proto::console::KeySet::default(),
        workspace().join("console-proxy/web"),
    );
    let proxy = Arc::new(console_proxy::start(config).await.expect("console proxy"));
    let endpoint = format!("http://{}", proxy.addr);
    let client =
        console_proxy::core_link::connect(proxy.clone(), 10, &link(core, &id, &secret), Some(endpoint))
            .expect("proxy link");
    core.wait_agent_state(&id, "Up", Duration::from_secs(15)).await;
    LinkedProxy { proxy, client, id }
}

impl LinkedProxy {
    pub(crate) async fn stop(self) {
        self.client.shutdown().await;
        if let Ok(p) = Arc::try_unwrap(self.proxy) {
            p.shutdown().await;
        }
    }
}

/// Opens a console link's WebSocket and checks the VM's screen (named `e2e-vm`) comes through.
pub(crate) async fn screen_through(ws_url: &str) {
    let mut rfb = open(ws_url, None).await;
    let (mut w, mut h, name) = rfb.handshake().await.expect("console opens through the proxy");
    assert_eq!(name, "e2e-vm");
    let mut colours = 0;
    for _ in 0..40 {
        colours = distinct_pixels(&rfb.full_frame(&mut w, &mut h).await);
        if colours >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(colours >= 2, "the VM's screen stayed uniform");
}

/// The WebSocket URL of a `consoleendpoint` answer.
pub(crate) fn ws_url(endpoint: &Value) -> String {
    let ws = &endpoint["websocket"];
    format!(
        "ws://{}:{}/{}?token={}",
        ws["host"].as_str().expect("host"),
        ws["port"].as_str().expect("port is a string"),
        ws["path"].as_str().expect("path"),
        ws["token"].as_str().expect("token")
    )
}

/// Makes a console link for `target` through `core` and checks the VM's screen comes through it.
pub(crate) async fn console_works(core: &Core, target: &str) {
    let e = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={target}")])
        .await;
    assert_eq!(e["consoleendpoint"]["success"], true, "{e}");
    screen_through(&ws_url(&e["consoleendpoint"])).await;
}

async fn console_endpoint_opens_qemu_through_a_registered_proxy(backend: Backend) {
    let vm = qemu();
    let core = start_core(matches!(backend, Backend::Postgres)).await;
    let a = linked_proxy(&core, "v-e2e-a").await;
    let b = linked_proxy(&core, "v-e2e-b").await;

    let target = core
        .ok(&[
            "addConsoleTarget",
            "name=e2e-vm",
            "host=127.0.0.1",
            &format!("port={}", vm.vnc.port()),
            &format!("password={VNC_PASSWORD}"),
        ])
        .await;
    let vm_id = target["consoletarget"]["id"].as_str().expect("id").to_owned();
    let listed = core.ok(&["listConsoleTargets", &format!("id={vm_id}")]).await;
    assert_eq!(listed["consoletarget"][0]["haspassword"], true, "{listed}");
    assert!(
        !listed.to_string().contains(VNC_PASSWORD),
        "password shown: {listed}"
    );
    let (code, _) = cs_err(&core, &["addConsoleTarget", "name=x", "host=a b", "port=5900"]).await;
    assert_eq!(code, 431);
    let (code, _) = cs_err(&core, &["addConsoleTarget", "name=x", "host=h", "port=70000"]).await;
    assert_eq!(code, 431);

    // The link opens the VM's screen through one of the registered proxies.
    let e1 = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={vm_id}")])
        .await;
    let e1 = &e1["consoleendpoint"];
    assert_eq!(e1["success"], true, "{e1}");
    assert_eq!(e1["websocket"]["path"], "websockify");
    let url = e1["url"].as_str().expect("url");
    let (first, other) = if url.starts_with(&format!("http://{}/", a.proxy.addr)) {
        (&a, &b)
    } else {
        assert!(url.starts_with(&format!("http://{}/", b.proxy.addr)), "{url}");
        (&b, &a)
    };
    assert!(!url.contains(VNC_PASSWORD) && !e1.to_string().contains(VNC_PASSWORD));
    let ws1 = ws_url(e1);
    screen_through(&ws1).await;

    // The same link on the other proxy: refused, because core saw the session id already.
    let token = e1["websocket"]["token"].as_str().expect("token");
    let replay = format!("ws://{}/websockify?token={token}", other.proxy.addr);
    let mut rfb = open(&replay, None).await;
    let closed = rfb
        .handshake()
        .await
        .expect_err("replay on another proxy refused");
    assert_eq!(closed.code, close_code::TOKEN_REFUSED, "{}", closed.reason);
    assert!(closed.reason.contains("already used"), "{}", closed.reason);

    // Affinity: the next link for this VM goes through the proxy that served it (after the
    // heartbeat reported its load).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e2 = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={vm_id}")])
        .await;
    let e2 = &e2["consoleendpoint"];
    assert!(
        e2["url"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("http://{}/", first.proxy.addr)),
        "affinity to {}: {e2}",
        first.id
    );

    // Rotation: both proxies get the new key set; the link issued before it still opens, and so
    // does one sealed with the new key.
    let rot = core.ok(&["rotateConsoleKeys"]).await;
    assert_eq!(rot["consolekeys"]["proxiesupdated"], 2, "{rot}");
    let e3 = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={vm_id}")])
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    screen_through(&ws_url(e2)).await;
    screen_through(&ws_url(&e3["consoleendpoint"])).await;

    // A browser with stock noVNC opens a fresh link's console page.
    if matches!(backend, Backend::Sqlite) {
        let e4 = core
            .ok(&["createConsoleEndpoint", &format!("virtualmachineid={vm_id}")])
            .await;
        let page = e4["consoleendpoint"]["url"].as_str().expect("url").to_owned();
        let shot = artifacts().join("console-via-core.png");
        let check = tokio::task::spawn_blocking(move || check_page(&page, &shot, "connected"))
            .await
            .expect("browser check");
        assert!(check.matched, "{}", check.report);
    }

    // A VM named on a hypervisor host core does not know: no link, and the reason.
    let guest = core
        .ok(&[
            "addConsoleTarget",
            "name=elsewhere",
            "hypervisorvm=no-such-domain",
        ])
        .await;
    let guest_id = guest["consoletarget"]["id"].as_str().expect("id").to_owned();
    assert_eq!(
        guest["consoletarget"]["hypervisorvm"], "no-such-domain",
        "{guest}"
    );
    let e = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={guest_id}")])
        .await;
    assert_eq!(e["consoleendpoint"]["success"], false, "{e}");
    assert!(
        e["consoleendpoint"]["details"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-domain"),
        "{e}"
    );
    let (code, _) = cs_err(
        &core,
        &[
            "addConsoleTarget",
            "name=x",
            "host=h",
            "port=5900",
            "hypervisorvm=d",
        ],
    )
    .await;
    assert_eq!(code, 431);

    // Unknown VM: CloudStack's parameter error. No proxy Up: success false with the reason.
    let (code, _) = cs_err(
        &core,
        &[
            "createConsoleEndpoint",
            "virtualmachineid=00000000-0000-4000-8000-0000000000ff",
        ],
    )
    .await;
    assert_eq!(code, 431);
    a.stop().await;
    b.stop().await;
    let start = Instant::now();
    loop {
        let e = core
            .ok(&["createConsoleEndpoint", &format!("virtualmachineid={vm_id}")])
            .await;
        if e["consoleendpoint"]["success"] == false {
            assert!(
                e["consoleendpoint"]["details"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("No console proxy"),
                "{e}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "links still made: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
