//! The demo template `up` offers: a small QCOW2 image generated at start and served by a tiny
//! HTTP server on loopback, so the printed `register-template` step works offline.
//!
//! The image is an empty QCOW2 version 3 disk (64 KiB clusters, no backing file, not encrypted,
//! no data allocated): what the storage agent's inspector accepts (`ssvm-agent::inspect`) and
//! `qemu-img check` finds clean. It is built in memory; no tool is needed at run time.
//!
//! Invariants: the server listens on 127.0.0.1 only and answers `GET`/`HEAD` of
//! [`DemoImage::PATH`] with the image (anything else: 404); it stops when the [`DemoImage`] is
//! dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest as _, Sha256};

/// Virtual size of the demo disk.
pub const VIRTUAL_SIZE: u64 = 64 * 1024 * 1024;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: usize = 1 << CLUSTER_BITS;

/// An empty QCOW2 v3 image of `virtual_size` bytes (at most 512 MiB: one L2 table's reach), laid
/// out as `qemu-img create` does: header, refcount table, refcount block, L1 table, one cluster
/// each.
pub fn qcow2(virtual_size: u64) -> Vec<u8> {
    let (refcount_table, refcount_block, l1_table) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);
    let mut img = vec![0u8; 4 * CLUSTER];
    let mut put = |at: usize, bytes: &[u8]| img[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes()); // version
    // 8: backing file offset, 16: its length (none).
    put(20, &CLUSTER_BITS.to_be_bytes());
    put(24, &virtual_size.to_be_bytes());
    // 32: crypt method (none).
    put(36, &1u32.to_be_bytes()); // L1 entries
    put(40, &(l1_table as u64).to_be_bytes());
    put(48, &(refcount_table as u64).to_be_bytes());
    put(56, &1u32.to_be_bytes()); // refcount table clusters
    // 60: snapshots (none); 72..96: feature bits (none).
    put(96, &4u32.to_be_bytes()); // refcount order: 16-bit refcounts
    put(100, &104u32.to_be_bytes()); // header length; zeros after it end the extensions
    put(refcount_table, &(refcount_block as u64).to_be_bytes());
    for cluster in 0..4 {
        put(refcount_block + 2 * cluster, &1u16.to_be_bytes());
    }
    // The L1 table's one entry stays 0: nothing allocated, the disk reads as zeros.
    img
}

/// `{SHA-256}hex` of `data`, the checksum syntax `registerTemplate` takes.
pub fn sha256_checksum(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{{SHA-256}}{hex}")
}

/// The demo image being served.
#[derive(Debug)]
pub struct DemoImage {
    /// The server's address (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// `{SHA-256}hex` of the image.
    pub checksum: String,
    /// The image's length in bytes.
    pub len: u64,
    task: tokio::task::JoinHandle<()>,
}

impl DemoImage {
    /// The image's path on the server.
    pub const PATH: &'static str = "/tiny.qcow2";

    /// Generates the image and serves it on 127.0.0.1 (a free port).
    pub async fn serve() -> std::io::Result<DemoImage> {
        let image = Bytes::from(qcow2(VIRTUAL_SIZE));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let checksum = sha256_checksum(&image);
        let len = image.len() as u64;
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let image = image.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let image = image.clone();
                        async move { Ok::<_, Infallible>(answer(&req, image)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(DemoImage {
            addr,
            checksum,
            len,
            task,
        })
    }

    /// `http://127.0.0.1:PORT/tiny.qcow2`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, Self::PATH)
    }
}

impl Drop for DemoImage {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer<B>(req: &Request<B>, image: Bytes) -> Response<Full<Bytes>> {
    let found = req.uri().path() == DemoImage::PATH;
    let (status, body) = match (req.method(), found) {
        (&Method::GET, true) => (StatusCode::OK, image.clone()),
        (&Method::HEAD, true) => (StatusCode::OK, Bytes::new()),
        (_, true) => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
        (_, false) => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let len = if found { image.len() } else { body.len() };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(hyper::header::CONTENT_LENGTH, len.into());
    if found {
        h.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn qcow2_header_is_what_the_storage_agent_accepts() {
        let img = qcow2(VIRTUAL_SIZE);
        assert_eq!(img.len(), 4 * CLUSTER);
        assert_eq!(&img[..4], b"QFI\xfb");
        assert_eq!(be32(&img, 4), 3, "version");
        assert_eq!(be64(&img, 8), 0, "no backing file");
        assert_eq!(be32(&img, 20), CLUSTER_BITS);
        assert_eq!(be64(&img, 24), VIRTUAL_SIZE);
        assert_eq!(be32(&img, 32), 0, "not encrypted");
        assert_eq!(be64(&img, 72), 0, "no incompatible features");
        assert_eq!(be32(&img, 100), 104, "header length");
        // Refcount table → block; clusters 0..4 in use once each, nothing else.
        assert_eq!(be64(&img, be64(&img, 48) as usize), 2 * CLUSTER as u64);
        let block = &img[2 * CLUSTER..3 * CLUSTER];
        assert!(block[..8].chunks(2).all(|c| c == [0, 1]));
        assert!(block[8..].iter().all(|b| *b == 0));
        assert_eq!(be64(&img, be64(&img, 40) as usize), 0, "L1 entry unallocated");
    }

    #[test]
    fn qemu_img_finds_the_image_clean() {
        // Only where qemu-img is installed (the e2e tests' hosts); the header test above holds
        // everywhere.
        let Ok(dir) = tempfile::tempdir() else { return };
        let path = dir.path().join("tiny.qcow2");
        std::fs::write(&path, qcow2(VIRTUAL_SIZE)).expect("write");
        let Ok(out) = std::process::Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&path)
            .output()
        else {
            return;
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .expect("qemu-img info");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["virtual-size"], VIRTUAL_SIZE);
    }

    #[test]
    fn checksum_syntax() {
        assert_eq!(
            sha256_checksum(b""),
            "{SHA-256}e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn serves_the_image_on_loopback() {
        let demo = DemoImage::serve().await.expect("serve");
        assert!(demo.addr.ip().is_loopback());
        let tls = crate::cli::client::tls_config(None).expect("tls");
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .expect("client");
        let got = client.get(demo.url()).send().await.expect("GET");
        assert_eq!(got.status(), 200);
        let body = got.bytes().await.expect("body");
        assert_eq!(body.len() as u64, demo.len);
        assert_eq!(sha256_checksum(&body), demo.checksum);
        let head = client.head(demo.url()).send().await.expect("HEAD");
        assert_eq!(
            head.headers()[reqwest::header::CONTENT_LENGTH],
            demo.len.to_string().as_str()
        );
        let missing = client
            .get(format!("http://{}/other", demo.addr))
            .send()
            .await
            .expect("GET");
        assert_eq!(missing.status(), 404);
    }
}
