//! Uploads straight to a storage VM and download links, end to end: core (process driver) deploys
//! a real `ssvm-agent`, `getUploadParamsForTemplate`/`…ForIso` sign the upload, the storage VM
//! takes CloudStack's multipart POST and tus 1.0, installs through its pipeline, and serves
//! `extractTemplate` links with Range. Browser flows (Chromium) are in `browser_uploads`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::core_api::Core;
use crate::deploy::{kill9, local_store, start, wait_fleet};

/// Signed upload parameters.
#[derive(Debug, Clone)]
pub(crate) struct Up {
    pub(crate) id: String,
    pub(crate) post_url: String,
    pub(crate) metadata: String,
    pub(crate) expires: String,
    pub(crate) signature: String,
}

impl Up {
    fn headers(&self) -> Vec<(String, String)> {
        vec![
            ("X-signature".into(), self.signature.clone()),
            ("X-metadata".into(), self.metadata.clone()),
            ("X-expires".into(), self.expires.clone()),
        ]
    }
}

/// `getUploadParamsForTemplate` (or `…ForIso`) with `extra` parameters.
pub(crate) async fn params(core: &Core, iso: bool, name: &str, extra: &[&str]) -> Up {
    let mut args = vec![
        if iso {
            "getUploadParamsForIso"
        } else {
            "getUploadParamsForTemplate"
        }
        .to_owned(),
        format!("name={name}"),
        "zoneid=-1".to_owned(),
    ];
    if !iso {
        args.extend(["format=QCOW2".to_owned(), "hypervisor=KVM".to_owned()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = core.ok(&args).await;
    let p = &v["getuploadparams"];
    let s = |k: &str| p[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")).to_owned();
    Up {
        id: s("id"),
        post_url: s("postURL"),
        metadata: s("metadata"),
        expires: s("expires"),
        signature: s("signature"),
    }
}

/// An HTTP answer read off the wire.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection; `content_length` overrides the body's length (a
/// lying client). The server may answer before reading the body: write errors are ignored.
pub(crate) async fn request(
    url: &str,
    method: &str,
    headers: &[(String, String)],
    body: &[u8],
    content_length: Option<u64>,
) -> Answer {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        content_length.unwrap_or(body.len() as u64)
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.expect("write head");
    let _ = s.write_all(body).await;
    if content_length.is_some_and(|l| l != body.len() as u64) {
        let _ = s.shutdown().await;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await;
    let (status, headers, body) = crate::support::parse_response(&buf);
    Answer {
        status,
        headers,
        body,
    }
}

/// A multipart part: field, file name, bytes.
type OwnedPart = (&'static str, Option<&'static str>, Vec<u8>);

const BOUNDARY: &str = "----moldUploadBoundary7MA4YWxk";

/// A multipart body as a browser's FormData sends it: `parts` of (field, file name, bytes).
pub(crate) fn multipart(parts: &[(&str, Option<&str>, &[u8])], close: bool) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (field, file, data) in parts {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"").as_bytes(),
        );
        if let Some(f) = file {
            body.extend_from_slice(
                format!("; filename=\"{f}\"\r\nContent-Type: application/octet-stream").as_bytes(),
            );
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    if close {
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    }
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

/// A multipart POST of `parts` with `up`'s headers.
async fn post(up: &Up, parts: &[(&str, Option<&str>, &[u8])]) -> Answer {
    let (ct, body) = multipart(parts, true);
    let mut h = up.headers();
    h.push(("Content-Type".into(), ct));
    request(&up.post_url, "POST", &h, &body, None).await
}

/// The template (or ISO) as `listTemplates`/`listIsos` shows it.
pub(crate) async fn listed(core: &Core, id: &str, iso: bool) -> Value {
    let v = if iso {
        core.ok(&["listIsos", "isofilter=all", &format!("id={id}")]).await
    } else {
        core.ok(&["listTemplates", "templatefilter=all", &format!("id={id}")])
            .await
    };
    v[if iso { "iso" } else { "template" }][0].clone()
}

/// Waits until the template is ready or its upload failed.
pub(crate) async fn settled(core: &Core, id: &str, iso: bool) -> Value {
    let start = Instant::now();
    loop {
        let t = listed(core, id, iso).await;
        let state = t["downloaddetails"][0]["downloadState"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if t["isready"] == true || state.ends_with("ERROR") || state == "ABANDONED" {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "not settled: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The files of an install directory `<store>/template/tmpl/*/<id>/` (name → bytes).
pub(crate) fn install_files(store: &Path, id: &str) -> Vec<(String, PathBuf)> {
    let root = store.join("template/tmpl");
    let mut out = Vec::new();
    for account in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let dir = account.path().join(id);
        for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            out.push((f.file_name().to_string_lossy().into_owned(), f.path()));
        }
    }
    out
}

/// Nothing of `id` looks installed: no image beside its `.part` and fencing marks, no properties.
fn nothing_installed(store: &Path, id: &str) {
    for (name, _) in install_files(store, id) {
        assert!(
            name.ends_with(".part") || name.starts_with(".ssvm-epoch"),
            "{id}: {name} looks installed"
        );
    }
}

/// The SHA-256 of the one image installed for `id`.
pub(crate) fn installed_sha(store: &Path, id: &str) -> String {
    let files = install_files(store, id);
    assert!(files.iter().any(|(n, _)| n == "template.properties"), "{files:?}");
    let image = files
        .iter()
        .find(|(n, _)| !n.ends_with(".properties") && !n.starts_with('.'))
        .unwrap_or_else(|| panic!("no image in {files:?}"));
    hex::encode(Sha256::digest(std::fs::read(&image.1).expect("read image")))
}

/// A refused upload: its status, the template failed with a reason, nothing installed.
async fn refused(core: &Core, store: &Path, up: &Up, a: &Answer, status: u16, says: &str) {
    assert_eq!(a.status, status, "{}", a.text());
    assert!(a.text().contains(says), "{says:?} not in {}", a.text());
    let t = settled(core, &up.id, false).await;
    assert_eq!(t["isready"], false, "{t}");
    assert_eq!(t["downloaddetails"][0]["downloadState"], "UPLOAD_ERROR", "{t}");
    assert!(t["status"].as_str().unwrap_or_default().contains(says), "{t}");
    nothing_installed(store, &up.id);
}

fn iso_image(len: usize) -> Vec<u8> {
    let mut data = systemvm_tests::images::noise(len, 11);
    data[0x8000..0x8006].copy_from_slice(b"\x01CD001");
    data
}

/// Starts a core whose storage VM serves a local store; returns it with the store's directory.
pub(crate) async fn core_with_store(
    store_url: Option<&str>,
) -> (Core, crate::deploy::KillOnDrop, String, PathBuf) {
    let (core, guard) = start(&[]).await;
    let url = store_url.map_or_else(|| local_store(&core), str::to_owned);
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=uploads",
        &format!("url={url}"),
    ])
    .await;
    let ssvm = wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(30)).await;
    let id = ssvm[0]["id"].as_str().expect("id").to_owned();
    let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or_default());
    (core, guard, id, dir)
}

/// Waits until the storage VM's transfer server answers (after a start or a restart).
pub(crate) async fn transfer_up(up: &Up) {
    let start = Instant::now();
    loop {
        let a = request(&up.post_url, "OPTIONS", &[], b"", None).await;
        if a.status == 204 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "transfer server not up: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_signed_checked_resumable_and_extractable() {
    let (mut core, _guard, ssvm, store) = core_with_store(None).await;
    let img =
        systemvm_tests::images::qcow2_of_noise(&core.dir().join("img"), "up.qcow2", 8, 3).expect("qcow2");
    let data = std::fs::read(&img).expect("read");
    let sha = hex::encode(Sha256::digest(&data));
    // Short-lived parameters and links, checked for expiry at the end.
    core.ok(&["updateConfiguration", "name=upload.operation.timeout", "value=1"])
        .await;
    let short = params(&core, false, "short-lived", &[]).await;
    let short_tus = params(&core, false, "short-lived-tus", &[]).await;
    core.ok(&["updateConfiguration", "name=upload.operation.timeout", "value=60"])
        .await;
    let expiry_started = Instant::now();

    // CloudStack's one-shot POST: installed, verified; the same parameters once more are refused.
    let up = params(&core, false, "one-shot", &["isextractable=true"]).await;
    assert!(up.post_url.ends_with(&format!("/upload/{}", up.id)), "{up:?}");
    transfer_up(&up).await;
    let preflight = request(
        &up.post_url,
        "OPTIONS",
        &[("Origin".into(), "http://ui.example".into())],
        b"",
        None,
    )
    .await;
    assert_eq!(preflight.status, 204);
    let allowed = preflight
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_owned();
    for h in ["x-signature", "x-metadata", "x-expires"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    let a = post(&up, &[("files[]", Some("up.qcow2"), &data)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("access-control-allow-origin"), Some("*"));
    let t = settled(&core, &up.id, false).await;
    assert_eq!(t["isready"], true, "{t}");
    assert_eq!(t["status"], "Upload Complete", "{t}");
    assert_eq!(installed_sha(&store, &up.id), sha);
    // A tus upload left half done: its ticket expires at the end of the test.
    let tus_auth = |up: &Up, extra: &[(&str, String)]| {
        let mut h = up.headers();
        h.push(("Tus-Resumable".into(), "1.0.0".into()));
        h.extend(extra.iter().map(|(n, v)| ((*n).to_owned(), v.clone())));
        h
    };
    let created = request(
        &short_tus.post_url,
        "POST",
        &tus_auth(&short_tus, &[("Upload-Length", data.len().to_string())]),
        b"",
        None,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let half_done = request(
        &short_tus.post_url,
        "PATCH",
        &tus_auth(
            &short_tus,
            &[
                ("Upload-Offset", "0".into()),
                ("Content-Type", "application/offset+octet-stream".into()),
            ],
        ),
        &data[..data.len() / 2],
        None,
    )
    .await;
    assert_eq!(half_done.status, 204, "{}", half_done.text());
    let again = post(&up, &[("files[]", Some("up.qcow2"), &data)]).await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert!(again.text().contains("already used"), "{}", again.text());
    assert_eq!(listed(&core, &up.id, false).await["isready"], true);
    core.ok(&[
        "updateConfiguration",
        "name=extract.url.expiration.interval",
        "value=60",
    ])
    .await;
    let e = core
        .ok(&["extractTemplate", &format!("id={}", up.id), "mode=HTTP_DOWNLOAD"])
        .await;
    let short_link = e["template"]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{e}"))
        .to_owned();
    let link_issued = Instant::now();
    core.ok(&[
        "updateConfiguration",
        "name=extract.url.expiration.interval",
        "value=14400",
    ])
    .await;
    assert_eq!(
        request(
            &short_link,
            "GET",
            &[("Range".into(), "bytes=0-0".into())],
            b"",
            None
        )
        .await
        .status,
        206
    );

    // Forged, altered and misdirected credentials: 403, nothing starts.
    let other = params(&core, false, "forged", &[]).await;
    let mut forged = other.clone();
    forged.signature = up.signature.clone();
    let mut altered = other.clone();
    altered.expires = "2099-01-01T00:00:00+0000".into();
    let mut misdirected = up.clone();
    misdirected.post_url = other.post_url.clone();
    for (what, bad) in [
        ("forged", &forged),
        ("altered", &altered),
        ("misdirected", &misdirected),
    ] {
        let a = post(bad, &[("files[]", Some("x.qcow2"), &data)]).await;
        assert_eq!(a.status, 403, "{what}: {}", a.text());
    }
    let t = listed(&core, &other.id, false).await;
    assert_eq!(t["downloaddetails"][0]["downloadState"], "NOT_UPLOADED", "{t}");

    // Bodies that are not one plain, complete file of the declared kind.
    let cases: Vec<(&str, Vec<OwnedPart>, u16, &str)> = vec![
        (
            "no file",
            vec![("name", None, b"x".to_vec())],
            400,
            "no file part",
        ),
        (
            "two files",
            vec![
                ("files[]", Some("a.qcow2"), data.clone()),
                ("files[]", Some("b.qcow2"), data.clone()),
            ],
            400,
            "more than one file",
        ),
        (
            "path",
            vec![("files[]", Some("../../etc/x.qcow2"), data.clone())],
            400,
            "not a plain file name",
        ),
        (
            "format",
            vec![(
                "files[]",
                Some("noise.qcow2"),
                systemvm_tests::images::noise(2 << 20, 5),
            )],
            422,
            "declared format QCOW2",
        ),
    ];
    for (what, parts, status, says) in cases {
        let up = params(&core, false, what, &[]).await;
        let parts: Vec<(&str, Option<&str>, &[u8])> =
            parts.iter().map(|(f, n, d)| (*f, *n, d.as_slice())).collect();
        let a = post(&up, &parts).await;
        refused(&core, &store, &up, &a, status, says).await;
    }
    let wrong_sum = params(
        &core,
        false,
        "checksum",
        &[&format!("checksum={{SHA-256}}{}", "ab".repeat(32))],
    )
    .await;
    let a = post(&wrong_sum, &[("files[]", Some("up.qcow2"), &data)]).await;
    refused(&core, &store, &wrong_sum, &a, 422, "checksum mismatch").await;
    // Truncated: the closing boundary never comes.
    let trunc = params(&core, false, "truncated", &[]).await;
    let (ct, body) = multipart(&[("files[]", Some("up.qcow2"), &data)], false);
    let mut h = trunc.headers();
    h.push(("Content-Type".into(), ct.clone()));
    let a = request(&trunc.post_url, "POST", &h, &body, None).await;
    refused(&core, &store, &trunc, &a, 400, "truncated").await;
    // A lying Content-Length: fewer bytes declared than sent.
    let liar = params(&core, false, "liar", &[]).await;
    let (_, body) = multipart(&[("files[]", Some("up.qcow2"), &data)], true);
    let mut h = liar.headers();
    h.push(("Content-Type".into(), ct.clone()));
    let a = request(&liar.post_url, "POST", &h, &body, Some(body.len() as u64 / 2)).await;
    refused(&core, &store, &liar, &a, 400, "truncated").await;
    // Declared larger than max.template.iso.size (50 GiB): refused before a byte is read.
    let huge = params(&core, false, "huge", &[]).await;
    let mut h = huge.headers();
    h.push(("Content-Type".into(), ct.clone()));
    let a = request(&huge.post_url, "POST", &h, b"", Some(60 << 30)).await;
    assert_eq!(a.status, 413, "{}", a.text());
    assert!(a.text().contains("max.template.iso.size"), "{}", a.text());
    nothing_installed(&store, &huge.id);
    // The account shows its limit and what its templates use.
    let a = core.ok(&["listAccounts", "name=admin"]).await;
    let acct = &a["account"][0];
    assert_eq!(acct["secondarystoragelimit"], "400", "{a}");
    assert!(acct["secondarystoragetotal"].as_f64().unwrap_or(0.0) > 0.0, "{a}");
    // The account's secondary-storage limit: no parameters when nothing is left.
    core.ok(&[
        "updateConfiguration",
        "name=max.account.secondary.storage",
        "value=0",
    ])
    .await;
    let (ok, v) = core
        .cs_raw(&[
            "getUploadParamsForTemplate",
            "name=over",
            "zoneid=-1",
            "format=QCOW2",
            "hypervisor=KVM",
        ])
        .await;
    assert!(!ok, "{v}");
    assert!(v.to_string().contains("max.account.secondary.storage"), "{v}");
    core.ok(&[
        "updateConfiguration",
        "name=max.account.secondary.storage",
        "value=400",
    ])
    .await;

    // tus: create, append, the storage VM killed, resume at its journalled offset, finish.
    let tus = params(
        &core,
        false,
        "resumable",
        &[&format!("checksum={{SHA-256}}{sha}")],
    )
    .await;
    let tus_h = |extra: &[(&str, String)]| {
        let mut h = tus.headers();
        h.push(("Tus-Resumable".into(), "1.0.0".into()));
        h.extend(extra.iter().map(|(n, v)| ((*n).to_owned(), v.clone())));
        h
    };
    let too_big = request(
        &tus.post_url,
        "POST",
        &tus_h(&[("Upload-Length", (60u64 << 30).to_string())]),
        b"",
        None,
    )
    .await;
    assert_eq!(too_big.status, 413, "{}", too_big.text());
    let created = request(
        &tus.post_url,
        "POST",
        &tus_h(&[("Upload-Length", data.len().to_string())]),
        b"",
        None,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.header("location"), Some(tus.post_url.as_str()));
    let patch = |at: usize, bytes: &[u8]| {
        let h = tus_h(&[
            ("Upload-Offset", at.to_string()),
            ("Content-Type", "application/offset+octet-stream".into()),
        ]);
        let url = tus.post_url.clone();
        let bytes = bytes.to_vec();
        async move { request(&url, "PATCH", &h, &bytes, None).await }
    };
    let half = data.len() / 2;
    let a = patch(0, &data[..half]).await;
    assert_eq!(a.status, 204, "{}", a.text());
    assert_eq!(a.header("upload-offset"), Some(half.to_string().as_str()));
    let wrong = patch(half + 1, &data[half + 1..]).await;
    assert_eq!(wrong.status, 409, "{}", wrong.text());
    assert_eq!(wrong.header("upload-offset"), Some(half.to_string().as_str()));
    // Progress reaches the listing while the upload waits for the rest.
    let start = Instant::now();
    loop {
        let t = listed(&core, &tus.id, false).await;
        if t["downloaddetails"][0]["downloadState"] == "UPLOAD_IN_PROGRESS" {
            assert_eq!(t["status"], "50% Uploaded", "{t}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no progress: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A one-shot upload in flight when the storage VM dies: it cannot resume, and says so.
    let one_shot = params(&core, false, "one-shot-killed", &[]).await;
    let (ct, body) = multipart(&[("files[]", Some("up.qcow2"), &data)], true);
    let rest = one_shot.post_url.strip_prefix("http://").expect("http");
    let (host, path) = rest.split_once('/').expect("path");
    let mut conn = tokio::net::TcpStream::connect(host).await.expect("connect");
    let mut head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in one_shot.headers() {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await.expect("head");
    conn.write_all(&body[..body.len() / 2]).await.expect("half");
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill9(&ssvm);
    drop(conn);
    wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(60)).await;
    transfer_up(&tus).await;
    let t = settled(&core, &one_shot.id, false).await;
    assert_eq!(t["downloaddetails"][0]["downloadState"], "UPLOAD_ERROR", "{t}");
    assert!(
        t["status"].as_str().unwrap_or_default().contains("restarted"),
        "{t}"
    );
    nothing_installed(&store, &one_shot.id);
    let start = Instant::now();
    let offset = loop {
        let head = request(&tus.post_url, "HEAD", &tus_h(&[]), b"", None).await;
        if head.status == 200 {
            break head
                .header("upload-offset")
                .expect("offset")
                .parse::<usize>()
                .expect("number");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{head:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The journalled offset: what was flushed (the part file is flushed at least every second).
    assert!(offset <= half, "offset {offset} after the restart, {half} sent");
    let a = patch(offset, &data[offset..]).await;
    assert_eq!(a.status, 204, "{}", a.text());
    let t = settled(&core, &tus.id, false).await;
    assert_eq!(t["isready"], true, "{t}");
    assert_eq!(installed_sha(&store, &tus.id), sha);

    // An ISO through the one-shot POST.
    let iso = iso_image(1 << 20);
    let iso_up = params(&core, true, "an-iso", &["isextractable=true"]).await;
    let a = post(&iso_up, &[("files[]", Some("x.iso"), &iso)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(settled(&core, &iso_up.id, true).await["isready"], true);

    // Download links: whole, ranges, tampered; the right type and length.
    let e = core
        .ok(&["extractTemplate", &format!("id={}", up.id), "mode=HTTP_DOWNLOAD"])
        .await;
    let url = e["template"]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{e}"))
        .to_owned();
    assert_eq!(e["template"]["state"], "DOWNLOAD_URL_CREATED", "{e}");
    let whole = request(&url, "GET", &[], b"", None).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, data);
    assert_eq!(
        whole.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(whole.header("content-type"), Some("application/octet-stream"));
    for (range, from, to) in [
        ("bytes=100-199", 100, 200),
        ("bytes=-10", data.len() - 10, data.len()),
        ("bytes=1048576-", 1 << 20, data.len()),
    ] {
        let part = request(&url, "GET", &[("Range".into(), range.into())], b"", None).await;
        assert_eq!(part.status, 206, "{range}");
        assert_eq!(part.body, &data[from..to], "{range}");
        assert_eq!(
            part.header("content-range"),
            Some(format!("bytes {from}-{}/{}", to - 1, data.len()).as_str())
        );
    }
    let beyond = request(
        &url,
        "GET",
        &[("Range".into(), format!("bytes={}-", data.len()))],
        b"",
        None,
    )
    .await;
    assert_eq!(beyond.status, 416);
    let iso_link = core
        .ok(&["extractIso", &format!("id={}", iso_up.id), "mode=HTTP_DOWNLOAD"])
        .await;
    let iso_url = iso_link["iso"]["url"].as_str().expect("url").to_owned();
    let got = request(&iso_url, "GET", &[], b"", None).await;
    assert_eq!(got.header("content-type"), Some("application/x-iso9660-image"));
    assert_eq!(got.body, iso);
    let token_at = url.find("/download/").expect("path") + "/download/".len();
    let mut tampered = url.clone().into_bytes();
    tampered[token_at + 20] = if tampered[token_at + 20] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let t = request(&String::from_utf8(tampered).expect("utf8"), "GET", &[], b"", None).await;
    assert_eq!(t.status, 403);
    let base = &url[..token_at];
    assert_eq!(
        request(base, "GET", &[], b"", None).await.status,
        403,
        "nothing is listed"
    );
    let (ok, v) = core
        .cs_raw(&["extractTemplate", &format!("id={}", up.id), "mode=FTP_UPLOAD"])
        .await;
    assert!(!ok, "{v}");

    // Rotation: the new key seals, links and parameters made before still open.
    let before = params(&core, false, "before-rotation", &[]).await;
    let r = core.ok(&["rotateTransferKeys"]).await;
    assert_eq!(r["transferkeys"]["storagevmsupdated"], 1, "{r}");
    assert_eq!(r["transferkeys"]["keys"].as_array().map(Vec::len), Some(2), "{r}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = params(&core, false, "after-rotation", &[]).await;
    for up in [&before, &after] {
        let a = post(up, &[("files[]", Some("up.qcow2"), &data)]).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(
        request(&url, "GET", &[("Range".into(), "bytes=0-0".into())], b"", None)
            .await
            .status,
        206
    );

    // Expiry: parameters issued with upload.operation.timeout=1 (minute), a link with 60 s.
    tokio::time::sleep(Duration::from_secs(62).saturating_sub(expiry_started.elapsed())).await;
    let a = post(&short, &[("files[]", Some("up.qcow2"), &data)]).await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert!(a.text().contains("expired"), "{}", a.text());
    // Left unfinished past its expiry: failed by the storage VM, its partial file removed.
    let start = Instant::now();
    loop {
        let t = listed(&core, &short_tus.id, false).await;
        if t["downloaddetails"][0]["downloadState"] == "UPLOAD_ERROR" {
            assert!(
                t["status"].as_str().unwrap_or_default().contains("expired"),
                "{t}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "unfinished upload not failed: {t}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        install_files(&store, &short_tus.id)
            .iter()
            .all(|(n, _)| !n.ends_with(".part")),
        "the partial file is gone: {:?}",
        install_files(&store, &short_tus.id)
    );
    // Never used before its expiry: abandoned, saying why.
    let start = Instant::now();
    loop {
        let t = listed(&core, &short.id, false).await;
        if t["downloaddetails"][0]["downloadState"] == "ABANDONED" {
            assert!(
                t["status"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("upload.operation.timeout"),
                "{t}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "not abandoned: {t}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(61).saturating_sub(link_issued.elapsed())).await;
    let gone = request(&short_link, "GET", &[], b"", None).await;
    assert_eq!(gone.status, 403, "an expired link");
    core.shutdown_with_system_vms().await;
}

/// `getUploadParamsForVolume` through `cs`, the browser's POST to the storage VM: the volume
/// is `Uploaded` on the image store once the file is in; it is extracted and made a template of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_uploads_land_on_the_image_store_and_are_usable() {
    let (core, _guard, _ssvm, store) = core_with_store(None).await;
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .expect("zone")
        .to_owned();
    let img =
        systemvm_tests::images::qcow2_of_noise(&core.dir().join("vol"), "vol.qcow2", 8, 5).expect("qcow2");
    let data = std::fs::read(&img).expect("read");
    let ask = |format: &str| {
        [
            "getUploadParamsForVolume".to_owned(),
            "name=uploaded-disk".to_owned(),
            format!("zoneid={zone}"),
            format!("format={format}"),
        ]
    };
    let bad = ask("VHD");
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let o = core.cs(&bad).await;
    assert_eq!(crate::support::errorcode(&o.json), Some(431), "{o:?}");

    let args = ask("QCOW2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = core.ok(&args).await;
    let p = &v["getuploadparams"];
    let s = |k: &str| p[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")).to_owned();
    let up = Up {
        id: s("id"),
        post_url: s("postURL"),
        metadata: s("metadata"),
        expires: s("expires"),
        signature: s("signature"),
    };
    let before = volume_state(&core, &up.id).await;
    assert_eq!(before["state"], "NotUploaded", "{before}");
    let o = core.cs(&["createSnapshot", &format!("volumeid={}", up.id)]).await;
    assert_eq!(
        crate::support::errorcode(&o.json),
        Some(431),
        "not uploaded yet: {o:?}"
    );

    transfer_up(&up).await;
    let a = post(&up, &[("files[]", Some("vol.qcow2"), &data)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let start = Instant::now();
    let vol = loop {
        let v = volume_state(&core, &up.id).await;
        if v["state"] == "Uploaded" || v["state"] == "UploadError" {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "not uploaded: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(vol["state"], "Uploaded", "{vol}");
    assert_eq!(vol["size"], 8 << 20, "the virtual size: {vol}");
    let path = vol["path"].as_str().expect("path");
    assert!(path.starts_with("volumes/"), "{vol}");
    assert_eq!(std::fs::read(store.join(path)).expect("the uploaded file"), data);
    let again = post(&up, &[("files[]", Some("vol.qcow2"), &data)]).await;
    assert_ne!(again.status, 200, "the parameters make one upload");

    // Usable: a download link of it, and a template of it.
    let e = core
        .ok(&[
            "extractVolume",
            &format!("id={}", up.id),
            &format!("zoneid={zone}"),
            "mode=HTTP_DOWNLOAD",
        ])
        .await;
    let got = request(e["volume"]["url"].as_str().expect("url"), "GET", &[], b"", None).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let back = core.dir().join("vol-back.qcow2");
    std::fs::write(&back, &got.body).expect("write");
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&back)
        .arg(&img)
        .output()
        .expect("qemu-img");
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stdout));
    let os = core.ok(&["listOsTypes"]).await["ostype"][0]["id"]
        .as_str()
        .expect("os")
        .to_owned();
    let t = core
        .ok(&[
            "createTemplate",
            "name=from-upload",
            &format!("ostypeid={os}"),
            &format!("volumeid={}", up.id),
        ])
        .await;
    assert_eq!(t["template"]["isready"], true, "{t}");
}

async fn volume_state(core: &Core, id: &str) -> Value {
    let l = core.ok(&["listVolumes", &format!("id={id}")]).await;
    l["volume"][0].clone()
}
