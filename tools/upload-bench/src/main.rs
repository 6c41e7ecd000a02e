//! Upload benchmark: the same bytes, in one run, into the same store, three ways:
//!
//! - `sink`: a plain HTTP POST to a minimal server that writes the body to the store (1 MiB blocks,
//!   four in flight, then a flush): the floor a server can reach on this store;
//! - `upload`: CloudStack's one-shot multipart POST to the storage VM's transfer server (ticket
//!   check, multipart parsing, SHA-256, format inspection, part file, checkpoints, rename,
//!   `template.properties`);
//! - `tus`: the same file with tus 1.0 in PATCHes of `--chunk-mib` (8 by default).
//!
//! Reported: MB/s of each, the ratios upload/sink and tus/upload, and the process's peak RSS
//! during each transfer, with a small upload first (this process holds the client, the sink and
//! the transfer server; the client streams a fixed 1 MiB block, so the same peak for a small and
//! a large file means the server holds no file-sized buffer).
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt as _;
use ssvm_agent::download::{DownloadSettings, Downloader};
use ssvm_agent::fetch::{self, FetchConfig};
use ssvm_agent::job::Journal;
use ssvm_agent::store::{Store, StoreOptions, StoreUrl};
use systemvm_proto::console::KeySet;
use systemvm_proto::transfer::UploadTicket;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(about = "Uploads through the storage VM's transfer server against a minimal sink")]
struct Cli {
    /// Store to write to: nfs://HOST:PORT/EXPORT?mountport=N or file:///PATH.
    #[arg(long)]
    store: String,
    /// Size of the file, MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Size of a smaller file also uploaded, to show the RSS does not grow with the file.
    #[arg(long, default_value_t = 256)]
    small_mib: u64,
    /// tus PATCH size, MiB.
    #[arg(long, default_value_t = 8)]
    chunk_mib: u64,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const BLOCK: usize = 1 << 20;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples the RSS every 20 ms while `f` runs; returns its result, seconds and peak RSS.
async fn measured<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, f64, u64)> {
    let base = rss_bytes();
    let peak = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let start = Instant::now();
    let out = f.await;
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    Ok((out?, secs, peak.load(Ordering::Relaxed)))
}

fn block() -> Bytes {
    let mut b = vec![0u8; BLOCK];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in b.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    Bytes::from(b)
}

/// Sends a request with a body of `head_body`, then `size` bytes of `block`, then `tail`; returns
/// the status line.
async fn send(
    addr: SocketAddr,
    head: &str,
    prefix: &[u8],
    size: u64,
    block: &Bytes,
    tail: &[u8],
) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(prefix).await?;
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        s.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    s.write_all(tail).await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// The minimal sink: writes each POST body to the store as `bench/sink.raw` (1 MiB blocks, four in
/// flight), flushes, answers 200.
async fn sink(store: Store) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let status = match write_body(&store, req.into_body()).await {
                                Ok(()) => 200,
                                Err(_) => 500,
                            };
                            let mut resp = hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn write_body(store: &Store, mut body: hyper::body::Incoming) -> anyhow::Result<()> {
    store.create_dir_all("bench").await?;
    let file = store.create("bench/sink.raw").await?;
    let mut writes = JoinSet::new();
    let (mut at, mut pending) = (0u64, bytes::BytesMut::with_capacity(BLOCK));
    let flush_block =
        |data: Bytes, at: u64, writes: &mut JoinSet<Result<(), ssvm_agent::store::StoreError>>| {
            let (store, file) = (store.clone(), file.clone());
            writes.spawn(async move { store.write_at(&file, at, data).await });
        };
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            pending.extend_from_slice(&data);
            while pending.len() >= BLOCK {
                let data = pending.split_to(BLOCK).freeze();
                while writes.len() >= 4 {
                    writes.join_next().await.context("join")???;
                }
                flush_block(data, at, &mut writes);
                at += BLOCK as u64;
            }
        }
    }
    if !pending.is_empty() {
        flush_block(pending.freeze(), at, &mut writes);
    }
    while let Some(r) = writes.join_next().await {
        r??;
    }
    store.flush(&file).await?;
    Ok(())
}

fn ticket(keys: &KeySet, base: &str, format: &str) -> anyhow::Result<(UploadTicket, String, String)> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let id = format!("bench{}", u64::from_le_bytes(raw));
    let t = UploadTicket {
        id: id.clone(),
        post_url: format!("{base}/upload/{id}"),
        store_url: String::new(),
        path: format!("template/tmpl/bench/{id}"),
        format: format.into(),
        checksum: None,
        description: "upload-bench".into(),
        max_bytes: u64::MAX / 2,
        limit_reason: String::new(),
        expires: u64::MAX / 2,
        expires_text: "2099-01-01T00:00:00+0000".into(),
        epoch: 0,
        vm_id: String::new(),
    };
    let (m, s) = t.seal(keys).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((t, m, s))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let url: StoreUrl = cli
        .store
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --store: {e}"))?;
    let store = Store::open(&url, StoreOptions::default()).await?;
    let state = std::env::temp_dir().join(format!("upload-bench-{}", std::process::id()));
    let downloader = Downloader {
        http: fetch::client(&FetchConfig::default())?,
        store: store.clone(),
        journal: Journal::open(&state)?,
        settings: DownloadSettings {
            max_size: u64::MAX / 2,
            ..DownloadSettings::default()
        },
        allow_internal: Arc::new(Vec::new()),
        peers: ssvm_agent::peer::Peers::none(),
    };
    let agent = ssvm_agent::service::Agent::new(downloader, 4);
    let keys = KeySet::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let transfer_keys = ssvm_agent::transfer::TransferKeys::default();
    transfer_keys.set(keys.clone());
    let transfers = ssvm_agent::transfer::Transfers::new(
        agent,
        transfer_keys,
        systemvm_agent_client::tls::ServerCert::new(),
        ssvm_agent::peer::Peers::none(),
        None,
    )?;
    let listener = ssvm_agent::transfer::bind("127.0.0.1:0".parse()?).await?;
    let server = listener.local_addr()?;
    tokio::spawn(ssvm_agent::transfer::serve(
        transfers,
        listener,
        std::future::pending(),
    ));
    let sink_addr = sink(store.clone()).await?;
    let base = format!("http://{server}");
    let block = block();
    let mut store_url = url.to_string();
    if store_url.is_empty() {
        store_url = cli.store.clone();
    }

    let upload = |size: u64| {
        let (keys, base, block, store_url) = (keys.clone(), base.clone(), block.clone(), store_url.clone());
        async move {
            let (mut t, _, _) = ticket(&keys, &base, "RAW")?;
            t.store_url = store_url;
            let (m, s) = t.seal(&keys).map_err(|e| anyhow::anyhow!("{e}"))?;
            let boundary = "----uploadBenchBoundary";
            let prefix = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files[]\"; filename=\"bench.raw\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            );
            let tail = format!("\r\n--{boundary}--\r\n");
            let len = prefix.len() as u64 + size + tail.len() as u64;
            let head = format!(
                "POST /upload/{} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len}\r\nX-signature: {s}\r\nX-metadata: {m}\r\nX-expires: {}\r\n\r\n",
                t.id, t.expires_text
            );
            let status = send(server, &head, prefix.as_bytes(), size, &block, tail.as_bytes()).await?;
            anyhow::ensure!(status.contains(" 200 "), "upload answered {status}");
            Ok(t)
        }
    };
    let tus = |size: u64, chunk: u64| {
        let (keys, base, block, store_url) = (keys.clone(), base.clone(), block.clone(), store_url.clone());
        async move {
            let (mut t, _, _) = ticket(&keys, &base, "RAW")?;
            t.store_url = store_url;
            let (m, s) = t.seal(&keys).map_err(|e| anyhow::anyhow!("{e}"))?;
            let auth = format!(
                "X-signature: {s}\r\nX-metadata: {m}\r\nX-expires: {}\r\nTus-Resumable: 1.0.0\r\n",
                t.expires_text
            );
            let head = format!(
                "POST /upload/{} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: 0\r\nUpload-Length: {size}\r\n{auth}\r\n",
                t.id
            );
            let status = send(server, &head, b"", 0, &block, b"").await?;
            anyhow::ensure!(status.contains(" 201 "), "tus creation answered {status}");
            let mut at = 0;
            while at < size {
                let n = chunk.min(size - at);
                let head = format!(
                    "PATCH /upload/{} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {n}\r\nUpload-Offset: {at}\r\nContent-Type: application/offset+octet-stream\r\n{auth}\r\n",
                    t.id
                );
                let status = send(server, &head, b"", n, &block, b"").await?;
                anyhow::ensure!(status.contains(" 204 "), "tus PATCH at {at} answered {status}");
                at += n;
            }
            Ok(t)
        }
    };
    let sink_post = |size: u64| {
        let block = block.clone();
        async move {
            let head = format!(
                "POST /sink HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n"
            );
            let status = send(sink_addr, &head, b"", size, &block, b"").await?;
            anyhow::ensure!(status.contains(" 200 "), "sink answered {status}");
            Ok(())
        }
    };
    let cleanup = |t: UploadTicket| {
        let agent_store = store.clone();
        async move {
            for e in agent_store.list_dir(&t.path).await.unwrap_or_default() {
                let _ = agent_store.remove_file(&format!("{}/{}", t.path, e.name)).await;
            }
            let _ = agent_store.remove_dir(&t.path).await;
        }
    };

    let size = cli.size_mib << 20;
    let mb = size as f64 / 1e6;
    let (mut sink_r, mut up_r, mut tus_r, mut rss) = (Vec::new(), Vec::new(), Vec::new(), [0u64; 4]);
    let baseline = rss_bytes();
    for run in 0..cli.runs {
        // The small upload first: a peak that does not grow with the file size is flat.
        let (t, _, r3) = measured(upload(cli.small_mib << 20)).await?;
        cleanup(t).await;
        let ((), s, r0) = measured(sink_post(size)).await?;
        let _ = store.remove_file("bench/sink.raw").await;
        let (t, u, r1) = measured(upload(size)).await?;
        cleanup(t).await;
        let (t, tu, r2) = measured(tus(size, cli.chunk_mib << 20)).await?;
        cleanup(t).await;
        if run == 0 {
            // The first run only: later ones start with what the allocator kept.
            rss = [r0, r1, r2, r3];
        }
        eprintln!(
            "run {}: sink {:.0} MB/s, upload {:.0} MB/s, tus {:.0} MB/s",
            run + 1,
            mb / s,
            mb / u,
            mb / tu
        );
        sink_r.push(mb / s);
        up_r.push(mb / u);
        tus_r.push(mb / tu);
    }
    let (s, u, t) = (median(sink_r), median(up_r), median(tus_r));
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let result = serde_json::json!({
        "size_mib": cli.size_mib,
        "runs": cli.runs,
        "chunk_mib": cli.chunk_mib,
        "sink_mb_s": s,
        "upload_mb_s": u,
        "tus_mb_s": t,
        "upload_vs_sink": u / s,
        "tus_vs_upload": t / u,
        "rss_before_mib": mib(baseline),
        "peak_rss_mib": {
            "sink": mib(rss[0]),
            "upload": mib(rss[1]),
            "tus": mib(rss[2]),
            "upload_small": mib(rss[3]),
            "small_mib": cli.small_mib,
        },
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(p) = cli.json {
        std::fs::write(&p, serde_json::to_string_pretty(&result)?)?;
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
