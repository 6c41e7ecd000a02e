//! Cross-zone copies (`copyTemplate`, `copyIso`) between two zones' storage VMs (process driver),
//! each zone's image store on its own nfs-ganesha export: the per-zone state in `listTemplates`,
//! the bytes checked on the destination export, copies that survive a `kill -9` of the
//! destination's storage VM and of the source's in the middle of the transfer, the peer link
//! refused to anyone but the destination storage VM, per-zone extract and delete; on PostgreSQL.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use systemvm_tests::http::HttpFixture;

use crate::core_api::Backend;
use crate::core_api::Core;
use crate::deploy::{kill9, start_on, vms, wait_fleet};
use crate::fleet::cs_err;
use crate::nfs::RestartableGanesha;
use crate::uploads::{install_files, installed_sha, request};

/// The template as `zone` lists it.
async fn in_zone(core: &Core, id: &str, iso: bool, zone: &str) -> Option<Value> {
    let v = if iso {
        core.ok(&[
            "listIsos",
            "isofilter=all",
            &format!("id={id}"),
            &format!("zoneid={zone}"),
        ])
        .await
    } else {
        core.ok(&[
            "listTemplates",
            "templatefilter=all",
            &format!("id={id}"),
            &format!("zoneid={zone}"),
        ])
        .await
    };
    v[if iso { "iso" } else { "template" }]
        .as_array()
        .and_then(|a| a.first().cloned())
}

/// Waits until `id` is ready in `zone`.
async fn ready_in(core: &Core, id: &str, iso: bool, zone: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        if let Some(t) = in_zone(core, id, iso, zone).await {
            if t["isready"] == true {
                return t;
            }
            let state = t["downloaddetails"][0]["downloadState"]
                .as_str()
                .unwrap_or_default();
            assert!(!state.ends_with("ERROR"), "failed in {zone}: {t}");
        }
        assert!(
            start.elapsed() < within,
            "{id} not ready in {zone}: {:?}",
            in_zone(core, id, iso, zone).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the destination store holds part of `id` (its `.part` file has bytes).
async fn partly_copied(store: &Path, id: &str) {
    let start = Instant::now();
    loop {
        let part = install_files(store, id)
            .into_iter()
            .find(|(n, _)| n.ends_with(".part"))
            .and_then(|(_, p)| std::fs::metadata(p).ok())
            .is_some_and(|m| m.len() > 0);
        if part {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no bytes of {id} arrived: {:?}",
            install_files(store, id)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The storage VM of `zone`.
async fn ssvm_of(core: &Core, zone: &str) -> String {
    vms(core, "secondarystoragevm")
        .await
        .into_iter()
        .find(|v| v["zoneid"] == zone)
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no storage VM in zone {zone}"))
}

/// The journal records of copies (jobs whose bytes come from another storage VM) under `dir`
/// (the process driver gives each storage VM a state directory under core's data dir).
fn copy_jobs(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(v) = std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .filter(|v| v["spec"]["peer"].is_object())
            {
                out.push(v);
            }
        }
    }
    out
}

/// A GET on the source over TLS for its peer name, verified against core's CA but without a
/// client certificate: `Err` when the source refuses the connection (no HTTP answer).
async fn peer_without_certificate(ca: &Path, address: &str, vm: &str, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pem = std::fs::read(ca).expect("core's CA");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.expect("CA")).expect("CA");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = systemvm_proto::agent::peer_name(vm);
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let server = rustls::pki_types::ServerName::try_from(name.clone()).expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(server, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    if buf.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_isos_copy_between_zones_and_survive_restarts() {
    // On PostgreSQL (the rest of the template tests run on SQLite too).
    let (core, _guard) = start_on(
        Backend::Postgres,
        &[("secstorage.allowed.internal.sites", "127.0.0.0/8")],
    )
    .await;
    let a_nfs = RestartableGanesha::start("copy-a");
    let b_nfs = RestartableGanesha::start("copy-b");
    let zone_a = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .expect("zone")
        .to_owned();
    let zone_b = core
        .ok(&[
            "createZone",
            "name=zone-b",
            "networktype=Basic",
            "dns1=192.0.2.1",
            "internaldns1=192.0.2.2",
        ])
        .await["zone"]["id"]
        .as_str()
        .expect("zone b")
        .to_owned();
    for (zone, name, url) in [(&zone_a, "store-a", &a_nfs.url), (&zone_b, "store-b", &b_nfs.url)] {
        core.ok(&[
            "addImageStore",
            "provider=NFS",
            &format!("name={name}"),
            &format!("url={url}"),
            &format!("zoneid={zone}"),
        ])
        .await;
    }
    wait_fleet(&core, "secondarystoragevm", 2, Duration::from_secs(60)).await;

    // A template and an ISO installed in zone A.
    let img = systemvm_tests::images::qcow2_of_noise(&core.dir().join("img"), "copy.qcow2", 160, 21)
        .expect("qcow2");
    let qcow2 = std::fs::read(&img).expect("read");
    let mut iso = systemvm_tests::images::noise(96 << 20, 22);
    iso[0x8000..0x8006].copy_from_slice(b"\x01CD001");
    let (qcow2_sha, iso_sha) = (sha_hex(&qcow2), sha_hex(&iso));
    let http = HttpFixture::start().expect("http fixture");
    http.file("/copy.qcow2", qcow2);
    http.file("/copy.iso", iso);
    let t = core
        .ok(&[
            "registerTemplate",
            "name=copied",
            "format=QCOW2",
            "hypervisor=KVM",
            "isextractable=true",
            &format!("url={}", http.url("/copy.qcow2")),
            &format!("zoneid={zone_a}"),
            &format!("checksum={{SHA-256}}{qcow2_sha}"),
        ])
        .await["template"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let i = core
        .ok(&[
            "registerIso",
            "name=copied-iso",
            &format!("url={}", http.url("/copy.iso")),
            &format!("zoneid={zone_a}"),
        ])
        .await["iso"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    ready_in(&core, &t, false, &zone_a, Duration::from_secs(120)).await;
    ready_in(&core, &i, true, &zone_a, Duration::from_secs(120)).await;

    // Refused with CloudStack's parameter error, nothing recorded.
    for (args, says) in [
        (vec![format!("id={t}")], "Either destzoneid or destzoneids"),
        (
            vec![
                format!("id={t}"),
                format!("destzoneid={zone_b}"),
                format!("destzoneids={zone_b}"),
            ],
            "cannot be specified at the same time",
        ),
        (
            vec![format!("id={t}"), format!("destzoneid={zone_a}")],
            "different source and destination",
        ),
        (
            vec![
                format!("id={t}"),
                format!("destzoneids={zone_b}"),
                format!("sourcezoneid={zone_b}"),
            ],
            "not ready in zone",
        ),
    ] {
        let mut all = vec!["copyTemplate".to_owned()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let (code, text) = cs_err(&core, &refs).await;
        assert_eq!(code, 431, "{refs:?}: {text}");
        assert!(text.contains(says), "{says:?} not in {text}");
    }
    assert!(in_zone(&core, &t, false, &zone_b).await.is_none());

    // The template: the destination's storage VM is killed while the bytes arrive (its store
    // paused, so the copy cannot end meanwhile); restarted by the fleet, it finishes the copy.
    let ssvm_b = ssvm_of(&core, &zone_b).await;
    let ssvm_a = ssvm_of(&core, &zone_a).await;
    let copy_args = [
        "copyTemplate".to_owned(),
        format!("id={t}"),
        format!("destzoneids={zone_b}"),
    ];
    let copy_refs: Vec<&str> = copy_args.iter().map(String::as_str).collect();
    let interrupt = async {
        partly_copied(&b_nfs.dir, &t).await;
        let waiting = in_zone(&core, &t, false, &zone_b)
            .await
            .expect("listed in zone b");
        assert_eq!(waiting["isready"], false, "{waiting}");
        assert_eq!(waiting["downloaddetails"][0]["datastore"], "store-b", "{waiting}");
        // Only the destination storage VM may use its link: a browser (no client certificate)
        // gets 403 from the source.
        let jobs = copy_jobs(core.dir());
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let link = jobs[0]["spec"]["url"].as_str().expect("url").to_owned();
        assert_eq!(jobs[0]["spec"]["peer"]["vm_id"], ssvm_a.as_str(), "{jobs:?}");
        let path = link.splitn(4, '/').nth(3).expect("path").to_owned();
        let address = jobs[0]["spec"]["peer"]["address"]
            .as_str()
            .expect("address")
            .to_owned();
        let plain = request(&format!("http://{address}/{path}"), "GET", &[], b"", None).await;
        assert_eq!(plain.status, 403, "{}", plain.text());
        // …and TLS for the source's peer name without the destination's certificate gets no
        // answer at all.
        let refused = peer_without_certificate(&core.running().ca_path, &address, &ssvm_a, &path).await;
        assert!(refused.is_err(), "{refused:?}");
        let paused = b_nfs.paused();
        tokio::time::sleep(Duration::from_millis(300)).await;
        kill9(&ssvm_b);
        drop(paused);
    };
    let (copied, ()) = tokio::join!(core.ok(&copy_refs), interrupt);
    assert_eq!(copied["template"]["zoneid"], zone_b.as_str(), "{copied}");
    assert_eq!(copied["template"]["isready"], true, "{copied}");
    assert_eq!(installed_sha(&b_nfs.dir, &t), qcow2_sha);
    let both = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={t}")])
        .await;
    assert_eq!(both["count"], 2, "{both}");
    let zones: Vec<&str> = both["template"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|v| v["isready"] == true)
        .filter_map(|v| v["zoneid"].as_str())
        .collect();
    assert_eq!(zones, [zone_a.as_str(), zone_b.as_str()], "{both}");
    // Zone B cannot be deleted while it holds the copy (the refusal says so).
    let (_, text) = cs_err(&core, &["deleteZone", &format!("id={zone_b}")]).await;
    assert!(text.contains("1 copied template(s) or ISO(s)"), "{text}");
    // A second copy request for a zone that holds it changes nothing.
    let again = core.ok(&copy_refs).await;
    assert_eq!(again["template"]["isready"], true, "{again}");

    // The ISO: the source's storage VM is killed mid-transfer (its store paused); the
    // destination retries until the source is back and resumes.
    let iso_args = [
        "copyIso".to_owned(),
        format!("id={i}"),
        format!("destzoneid={zone_b}"),
    ];
    let iso_refs: Vec<&str> = iso_args.iter().map(String::as_str).collect();
    let interrupt = async {
        partly_copied(&b_nfs.dir, &i).await;
        let paused = a_nfs.paused();
        tokio::time::sleep(Duration::from_millis(300)).await;
        kill9(&ssvm_a);
        drop(paused);
    };
    let (copied, ()) = tokio::join!(core.ok(&iso_refs), interrupt);
    assert_eq!(copied["iso"]["zoneid"], zone_b.as_str(), "{copied}");
    assert_eq!(installed_sha(&b_nfs.dir, &i), iso_sha);
    // It went on from the bytes it had (a Range under the source's ETag), not from zero.
    let jobs = copy_jobs(core.dir());
    let iso_job = jobs
        .iter()
        .find(|j| j["spec"]["description"] == "copied-iso")
        .unwrap_or_else(|| panic!("{jobs:?}"));
    assert!(iso_job["resumes"].as_u64().unwrap_or(0) >= 1, "{iso_job}");
    assert_eq!(
        iso_job["validator"],
        format!("\"{iso_sha}\"").as_str(),
        "{iso_job}"
    );

    // The copy in zone B can be extracted from zone B's storage VM: the whole file, a range
    // under the file's ETag, and the whole file again when If-Range names other bytes.
    wait_fleet(&core, "secondarystoragevm", 2, Duration::from_secs(60)).await;
    let e = core
        .ok(&[
            "extractTemplate",
            &format!("id={t}"),
            "mode=HTTP_DOWNLOAD",
            &format!("zoneid={zone_b}"),
        ])
        .await;
    assert_eq!(e["template"]["zoneid"], zone_b.as_str(), "{e}");
    let url = e["template"]["url"].as_str().expect("url").to_owned();
    let whole = request(&url, "GET", &[], b"", None).await;
    assert_eq!(whole.status, 200);
    assert_eq!(sha_hex(&whole.body), qcow2_sha);
    let etag = whole.header("etag").expect("etag").to_owned();
    assert_eq!(etag, format!("\"{qcow2_sha}\""));
    let part = request(
        &url,
        "GET",
        &[
            ("Range".into(), "bytes=100-199".into()),
            ("If-Range".into(), etag.clone()),
        ],
        b"",
        None,
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, whole.body[100..200]);
    let stale = request(
        &url,
        "GET",
        &[
            ("Range".into(), "bytes=100-199".into()),
            ("If-Range".into(), "\"other\"".into()),
        ],
        b"",
        None,
    )
    .await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body.len(), whole.body.len());

    // Deleting the template in its own zone: the copy in zone B becomes its install.
    core.ok(&["deleteTemplate", &format!("id={t}"), &format!("zoneid={zone_a}")])
        .await;
    let left = core
        .ok(&["listTemplates", "templatefilter=all", &format!("id={t}")])
        .await;
    assert_eq!(left["count"], 1, "{left}");
    assert_eq!(left["template"][0]["zoneid"], zone_b.as_str(), "{left}");
    assert!(install_files(&a_nfs.dir, &t).is_empty(), "files left in zone a");
    assert_eq!(installed_sha(&b_nfs.dir, &t), qcow2_sha);
    // Deleting the ISO everywhere removes both zones' files.
    core.ok(&["deleteIso", &format!("id={i}")]).await;
    let gone = core.ok(&["listIsos", "isofilter=all", &format!("id={i}")]).await;
    assert_eq!(gone["count"].as_i64().unwrap_or(0), 0, "{gone}");
    assert!(install_files(&a_nfs.dir, &i).is_empty());
    assert!(install_files(&b_nfs.dir, &i).is_empty());
}
