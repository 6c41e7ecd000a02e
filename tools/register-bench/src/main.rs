//! Template registration benchmark: the whole pipeline (HTTP download → SHA-256 → format check →
//! store writes → install) against each stage alone, in one run on the same bytes:
//!
//! - `http`: the download to nowhere (reqwest over loopback from an in-process server);
//! - `sha256`: the digest over the bytes in memory;
//! - `store`: plain writes of the bytes to the store (1 MiB blocks, the pipeline's concurrency) and a flush.
//!
//! The pipeline's throughput is reported as a ratio to the slowest stage: 1.0 means the stages
//! overlap perfectly and the pipeline costs nothing beyond its slowest part.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt as _;
use ssvm_agent::checksum::{ChecksumAlgo, Hasher};
use ssvm_agent::download::{BLOCK, DownloadSettings, Downloader, LiveProgress};
use ssvm_agent::fetch::{self, FetchConfig};
use ssvm_agent::job::{DownloadSpec, JobRecord, JobState, Journal};
use ssvm_agent::store::{Store, StoreOptions, StoreUrl};
use systemvm_tests::http::HttpFixture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Template registration pipeline vs. its stages alone")]
struct Cli {
    /// Store to write to: nfs://HOST:PORT/EXPORT?mountport=N or file:///PATH.
    #[arg(long)]
    store: String,
    /// The image to register (a qcow2).
    #[arg(long)]
    image: PathBuf,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let data = Bytes::from(
        std::fs::read(&cli.image).with_context(|| format!("failed to read {}", cli.image.display()))?,
    );
    let mb = data.len() as f64 / 1e6;
    let http = HttpFixture::start()?;
    http.file("/image.qcow2", data.clone());
    let url: StoreUrl = cli
        .store
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --store: {e}"))?;
    let store = Store::open(&url, StoreOptions::default()).await?;
    let allow: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse()?];
    let client = fetch::client(&FetchConfig {
        allow_internal: allow.clone(),
        ..FetchConfig::default()
    })?;
    let state = tempdir("register-bench-state")?;
    let settings = DownloadSettings::default();
    let downloader = Downloader {
        http: client.clone(),
        store: store.clone(),
        journal: Journal::open(&state)?,
        settings: settings.clone(),
        allow_internal: Arc::new(allow),
        peers: ssvm_agent::peer::Peers::none(),
    };
    let expected = {
        let mut h = Hasher::new(ChecksumAlgo::Sha256);
        h.update(&data);
        h.finalize()
    };

    let mut rows: Vec<[f64; 4]> = Vec::new();
    for run in 0..cli.runs {
        let t_http = time(|| async {
            let mut body = client
                .get(http.url("/image.qcow2"))
                .send()
                .await?
                .error_for_status()?
                .bytes_stream();
            let mut n = 0usize;
            while let Some(chunk) = body.next().await {
                n += chunk?.len();
            }
            anyhow::ensure!(n == data.len(), "short download");
            Ok(())
        })
        .await?;
        let t_sha = time(|| async {
            let mut h = Hasher::new(ChecksumAlgo::Sha256);
            for block in data.chunks(BLOCK) {
                h.update(block);
            }
            anyhow::ensure!(h.finalize().hex == expected.hex, "digest differs");
            Ok(())
        })
        .await?;
        let plain = format!("bench-plain-{run}.raw");
        let t_store = time(|| async {
            let file = store.create(&plain).await?;
            let mut writes = JoinSet::new();
            for (i, block) in data.chunks(BLOCK).enumerate() {
                while writes.len() >= settings.write_concurrency {
                    if let Some(r) = writes.join_next().await {
                        r??;
                    }
                }
                let (store, file, block) = (store.clone(), file.clone(), data.slice_ref(block));
                writes.spawn(async move { store.write_at(&file, (i * BLOCK) as u64, block).await });
            }
            while let Some(r) = writes.join_next().await {
                r??;
            }
            store.flush(&file).await?;
            Ok(())
        })
        .await?;
        store.remove_file(&plain).await?;
        let path = format!("template/tmpl/bench/{run}");
        let spec = DownloadSpec {
            url: http.url("/image.qcow2"),
            path: path.clone(),
            format: "QCOW2".into(),
            checksum: Some(expected.to_string()),
            description: "benchmark".into(),
            upload: false,
            resumable: false,
            expires: 0,
            peer: None,
        };
        let mut record = JobRecord::new(&format!("bench-{run}-{}", std::process::id()), spec, &cli.store);
        let t_pipe = time(|| async {
            let state = downloader
                .run(&mut record, &LiveProgress::default(), &CancellationToken::new())
                .await;
            anyhow::ensure!(
                state == JobState::Completed,
                "pipeline failed: {:?}",
                record.error
            );
            Ok(())
        })
        .await?;
        for entry in store.list_dir(&path).await? {
            store.remove_file(&format!("{path}/{}", entry.name)).await?;
        }
        store.remove_dir(&path).await?;
        let row = [
            mb / t_http.as_secs_f64(),
            mb / t_sha.as_secs_f64(),
            mb / t_store.as_secs_f64(),
            mb / t_pipe.as_secs_f64(),
        ];
        eprintln!(
            "run {}: http {:.0} MB/s, sha256 {:.0} MB/s, store {:.0} MB/s, pipeline {:.0} MB/s",
            run + 1,
            row[0],
            row[1],
            row[2],
            row[3]
        );
        rows.push(row);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (http_m, sha_m, store_m, pipe_m) = (median(0), median(1), median(2), median(3));
    let slowest = http_m.min(sha_m).min(store_m);
    let per_run: Vec<f64> = rows.iter().map(|r| r[3] / r[0].min(r[1]).min(r[2])).collect();
    let report = serde_json::json!({
        "image_bytes": data.len(),
        "store": cli.store,
        "runs": cli.runs,
        "median_mbps": { "http": http_m, "sha256": sha_m, "store": store_m, "pipeline": pipe_m },
        "ratio_pipeline_to_slowest_stage": pipe_m / slowest,
        "per_run_ratio": per_run,
        "all_runs_mbps": rows,
    });
    println!("stage            median MB/s");
    println!("http download    {http_m:>10.0}");
    println!("sha256           {sha_m:>10.0}");
    println!("store write      {store_m:>10.0}");
    println!("pipeline         {pipe_m:>10.0}");
    println!("pipeline / slowest stage = {:.2}", pipe_m / slowest);
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

async fn time<F, Fut>(f: F) -> anyhow::Result<Duration>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    f().await?;
    Ok(start.elapsed())
}

fn tempdir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
