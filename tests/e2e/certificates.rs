//! `uploadCustomCertificate` end to end: a test CA's wildcard certificate (and its chain) reaches
//! the console proxy and the storage VM core deployed; their URLs become
//! `https://a-b-c-d.<domain>:port`; TLS clients and Chromium (trusting only that CA) verify them; a
//! certificate swapped while a console session and an upload run leaves both alive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::console::RfbOverWs;
use crate::core_api::Core;
use crate::deploy::{add_qemu_target, wait_fleet};
use crate::uploads::{core_with_store, installed_sha, params, settled};

const DOMAIN: &str = "mold.test";
const HOST: &str = "127-0-0-1.mold.test";

struct TestCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Mold test CA");
        let cert = params.self_signed(&key).expect("CA");
        TestCa {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A `*.mold.test` certificate: (PEM, key PEM, DER).
    fn leaf(&self) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("leaf");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("root");
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A verified TLS connection to `port` on loopback as `HOST`.
    async fn connect(&self, port: u16) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let name = rustls::pki_types::ServerName::try_from(HOST).expect("name");
        self.client().connect(name, tcp).await
    }
}

/// The certificate a server on `port` presents (verified against the CA), when it speaks TLS.
async fn presented(ca: &TestCa, port: u16) -> Option<Vec<u8>> {
    let tls = ca.connect(port).await.ok()?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
}

/// Waits until the server on `port` presents `der`.
async fn presents(ca: &TestCa, port: u16, der: &[u8]) {
    let start = Instant::now();
    while presented(ca, port).await.as_deref() != Some(der) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "port {port} never presented the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn port_of(url: &str) -> u16 {
    let host = url.split('/').nth(2).expect("host");
    host.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

async fn upload_cert(core: &Core, args: &[String]) -> (bool, Value) {
    let mut all = vec![
        "uploadCustomCertificate".to_owned(),
        format!("domainsuffix={DOMAIN}"),
    ];
    all.extend(args.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    core.cs_raw(&refs).await
}

/// CloudStack's order: the chain first (the CA, id 2), then the server certificate (id 1) with its
/// key; returns the second answer.
async fn install(core: &Core, ca: &TestCa, cert: &str, key: &str) -> Value {
    let (ok, v) = upload_cert(
        core,
        &[
            "id=2".into(),
            "name=root".into(),
            format!("certificate={}", ca.cert.pem()),
        ],
    )
    .await;
    assert!(ok, "{v}");
    let (ok, v) = upload_cert(
        core,
        &[
            "id=1".into(),
            format!("certificate={cert}"),
            format!("privatekey={key}"),
        ],
    )
    .await;
    assert!(ok, "{v}");
    v
}

/// An NSS database trusting only `ca` in a fresh HOME, for Chromium.
fn chromium_home(ca: &TestCa, dir: &std::path::Path) -> std::path::PathBuf {
    let home = dir.join("chromium-home");
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).expect("nssdb dir");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).expect("ca.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("certutil")
            .args(args)
            .output()
            .expect("certutil missing: run scripts/deps.sh (package libnss3-tools)");
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let db_arg = format!("sql:{}", db.display());
    run(&["-d", &db_arg, "-N", "--empty-password"]);
    run(&[
        "-d",
        &db_arg,
        "-A",
        "-t",
        "C,,",
        "-n",
        "mold-test-ca",
        "-i",
        &ca_file.display().to_string(),
    ]);
    home
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_certificate_reaches_the_system_vms_and_a_swap_keeps_sessions_alive() {
    let (mut core, _guard, _ssvm, store) = core_with_store(None).await;
    wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(30)).await;
    let target = add_qemu_target(&core).await;
    let ca = TestCa::new();
    let (cert1, key1, der1) = ca.leaf();
    let (_, other_key, _) = ca.leaf();

    // Refused: a key that is not the certificate's; a server certificate without its key.
    let (ok, v) = upload_cert(
        &core,
        &[format!("certificate={cert1}"), format!("privatekey={other_key}")],
    )
    .await;
    assert!(!ok, "{v}");
    assert!(v.to_string().contains("does not match"), "{v}");
    let (ok, v) = upload_cert(&core, &[format!("certificate={cert1}"), "id=1".into()]).await;
    assert!(!ok, "{v}");
    // CloudStack's order: the chain first (id 2), then the server certificate with its key.
    let v = install(&core, &ca, &cert1, &key1).await;
    assert!(
        !v.to_string().contains("PRIVATE KEY"),
        "the key is never echoed: {v}"
    );

    // Links and upload URLs name the VMs under the domain, over https; both present the certificate.
    let up = params(&core, false, "over-https", &[]).await;
    assert!(up.post_url.starts_with(&format!("https://{HOST}:")), "{up:?}");
    let link = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={target}")])
        .await;
    let console_url = link["consoleendpoint"]["url"].as_str().expect("url").to_owned();
    assert!(console_url.starts_with(&format!("https://{HOST}:")), "{link}");
    let (ssvm_port, proxy_port) = (port_of(&up.post_url), port_of(&console_url));
    presents(&ca, ssvm_port, &der1).await;
    presents(&ca, proxy_port, &der1).await;

    // Chromium, trusting only the test CA: the console page over https, and the Mold UI's upload.
    let img_dir = core.dir().join("img");
    let img = systemvm_tests::images::qcow2_of_noise(&img_dir, "tls.qcow2", 4, 13).expect("qcow2");
    let data = std::fs::read(&img).expect("read");
    let home = chromium_home(&ca, core.dir());
    let rules = format!("--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1");
    let env = [
        ("HOME", home.display().to_string()),
        ("CHROMIUM_EXTRA_ARGS", rules.clone()),
    ];
    let shot = crate::support::artifacts().join("console-custom-certificate.png");
    let (url, envs) = (console_url.clone(), env.clone());
    let check = tokio::task::spawn_blocking(move || {
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::support::check_page_env(&url, &shot, "connected", &envs)
    })
    .await
    .expect("check");
    assert!(
        check.matched,
        "the console over https with the uploaded certificate: {}",
        check.report
    );
    let page = systemvm_tests::http::HttpFixture::start().expect("http");
    page.file("/mold.html", b"<!doctype html><input type=file id=f>".to_vec());
    let out = tokio::process::Command::new("node")
        .current_dir(crate::support::workspace().join("core/web"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("e2e/upload.mjs")
        .arg("mold")
        .arg(page.url("/mold.html"))
        .arg(&img)
        .arg(
            serde_json::json!({"postURL": up.post_url, "signature": up.signature, "metadata": up.metadata, "expires": up.expires})
                .to_string(),
        )
        .output()
        .await
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "upload over https from Chromium: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(settled(&core, &up.id, false).await["isready"], true);

    // A console session and an upload in flight while the certificate is swapped.
    let endpoint = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={target}")])
        .await;
    let ws = &endpoint["consoleendpoint"]["websocket"];
    let wss = format!(
        "wss://{HOST}:{}/{}?token={}",
        ws["port"].as_str().expect("port"),
        ws["path"].as_str().expect("path"),
        ws["token"].as_str().expect("token")
    );
    let tls = ca.connect(proxy_port).await.expect("tls to the proxy");
    let (socket, _) = tokio_tungstenite::client_async(wss, tls)
        .await
        .expect("wss upgrade");
    let mut rfb = RfbOverWs {
        ws: socket,
        buf: Vec::new(),
    };
    let (mut w, mut h, _) = rfb.handshake().await.expect("handshake");
    assert!(!rfb.full_frame(&mut w, &mut h).await.is_empty());

    let tus = params(&core, false, "across-a-swap", &[]).await;
    let headers = |extra: &str| {
        format!(
            "X-signature: {}\r\nX-metadata: {}\r\nX-expires: {}\r\nTus-Resumable: 1.0.0\r\n{extra}",
            tus.signature, tus.metadata, tus.expires
        )
    };
    let path = tus
        .post_url
        .split_once(&format!("{HOST}:{ssvm_port}"))
        .expect("path")
        .1
        .to_owned();
    let mut create = ca.connect(ssvm_port).await.expect("tls");
    create
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 0\r\n{}\r\n",
                headers(&format!("Upload-Length: {}\r\n", data.len()))
            )
            .as_bytes(),
        )
        .await
        .expect("create");
    let mut answer = Vec::new();
    let _ = create.read_to_end(&mut answer).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut patch = ca.connect(ssvm_port).await.expect("tls");
    patch
        .write_all(
            format!(
                "PATCH {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: {}\r\n{}\r\n",
                data.len(),
                headers("Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n")
            )
            .as_bytes(),
        )
        .await
        .expect("patch head");
    let half = data.len() / 2;
    patch.write_all(&data[..half]).await.expect("first half");
    patch.flush().await.expect("flush");

    let (cert2, key2, der2) = ca.leaf();
    install(&core, &ca, &cert2, &key2).await;
    presents(&ca, ssvm_port, &der2).await;
    presents(&ca, proxy_port, &der2).await;

    // Both sessions opened under the old certificate go on.
    assert!(
        !rfb.full_frame(&mut w, &mut h).await.is_empty(),
        "the console session survived the swap"
    );
    patch.write_all(&data[half..]).await.expect("second half");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), patch.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 204"),
        "the upload survived the swap: {text}"
    );
    assert_eq!(settled(&core, &tus.id, false).await["isready"], true);
    assert_eq!(installed_sha(&store, &tus.id), hex::encode(Sha256::digest(&data)));
    core.shutdown_with_system_vms().await;
}
