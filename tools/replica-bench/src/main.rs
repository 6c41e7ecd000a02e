//! Replication benchmark: the storage VM's replica of a file on the staging store (an nfs-ganesha
//! export, read through the userspace NFS client) side by side in one run with the established
//! client of the same file (read from the export's directory) to the same server, with the same
//! part size, cutoff and parts in flight: to s3s-fs (`ssvm_agent::replica::s3`) against
//! `rclone copyto`, or to a single-node Swift (`ssvm_agent::replica::swift`) against
//! `swift upload --use-slo`.
//! Each run's objects are deleted after it. Reported: seconds, MB/s, and the peak RSS of this
//! process during the replica (sampled every 20 ms).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use ssvm_agent::replica::s3::{self, S3Options, S3Target};
use ssvm_agent::store::{Store, StoreOptions, StoreUrl};
use systemvm_tests::objects::{ACCESS_KEY, S3sFs, SECRET_KEY};

#[derive(Parser)]
#[command(about = "S3 replica of a staging-store file vs. rclone copyto of the same file")]
struct Cli {
    /// The staging store: nfs://HOST:PORT/EXPORT?mountport=N or file:///PATH.
    #[arg(long)]
    store: String,
    /// The file's path in the store.
    #[arg(long)]
    path: String,
    /// The same file on the local file system (what rclone reads).
    #[arg(long)]
    local: PathBuf,
    /// Directory for s3s-fs's data.
    #[arg(long)]
    s3_dir: PathBuf,
    /// Part size (MiB) for both.
    #[arg(long, default_value_t = 16)]
    part_mib: u64,
    /// Parts in flight for both.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `s3` (s3s-fs, against rclone) or `swift` (against the swift CLI).
    #[arg(long, default_value = "s3")]
    provider: String,
    /// Directory for Swift's devices and configuration (`--provider swift`).
    #[arg(long)]
    swift_dir: Option<PathBuf>,
}

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
    let size = std::fs::metadata(&cli.local)
        .with_context(|| format!("{}", cli.local.display()))?
        .len();
    let sum = Command::new("sha256sum").arg(&cli.local).output()?;
    let sha = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .context("sha256sum")?
        .to_owned();
    if cli.provider == "swift" {
        return swift_bench(&cli, &store, size, &sha).await;
    }
    let server = S3sFs::start(&cli.s3_dir);
    server.bucket("bench");
    let target = S3Target {
        endpoint: server.endpoint.clone(),
        region: "us-east-1".into(),
        bucket: "bench".into(),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        path_style: true,
        ca_pem: None,
    };
    let part = cli.part_mib << 20;
    let opts = S3Options {
        cutoff: part,
        min_part: part,
        concurrency: cli.concurrency,
        ..S3Options::default()
    };
    let client = s3::client(&target, &opts)?;
    let mb = size as f64 / 1e6;
    let (mut ours, mut peer, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..cli.runs {
        let mut pair = [0.0f64; 2];
        // The peer goes first in every other run.
        for which in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let key = format!("run{run}-{which}");
            let start = Instant::now();
            if which == 0 {
                let (r, peak) =
                    with_peak_rss(s3::replicate(&store, &cli.path, &sha, &target, &key, &opts)).await?;
                r?;
                rss.push(peak);
            } else {
                let st = Command::new("rclone")
                    .env_remove("AWS_CA_BUNDLE")
                    .env("RCLONE_CONFIG_B_TYPE", "s3")
                    .env("RCLONE_CONFIG_B_PROVIDER", "Other")
                    .env("RCLONE_CONFIG_B_ENDPOINT", &server.endpoint)
                    .env("RCLONE_CONFIG_B_FORCE_PATH_STYLE", "true")
                    .env("RCLONE_CONFIG_B_ACCESS_KEY_ID", ACCESS_KEY)
                    .env("RCLONE_CONFIG_B_SECRET_ACCESS_KEY", SECRET_KEY)
                    .env("RCLONE_CONFIG_B_REGION", "us-east-1")
                    .args(["copyto", "--s3-no-head"])
                    .arg(format!("--s3-chunk-size={}M", cli.part_mib))
                    .arg(format!("--s3-upload-cutoff={}M", cli.part_mib))
                    .arg(format!("--s3-upload-concurrency={}", cli.concurrency))
                    .arg(&cli.local)
                    .arg(format!("b:bench/{key}"))
                    .status()
                    .context("rclone (apt-get install rclone)")?;
                anyhow::ensure!(st.success(), "rclone failed: {st}");
            }
            pair[which] = start.elapsed().as_secs_f64();
            client.delete_object().bucket("bench").key(&key).send().await?;
        }
        eprintln!(
            "run {run}: replica {:.2} s ({:.0} MB/s), rclone {:.2} s ({:.0} MB/s)",
            pair[0],
            mb / pair[0],
            pair[1],
            mb / pair[1]
        );
        ours.push(pair[0]);
        peer.push(pair[1]);
    }
    let (o, p) = (median(ours), median(peer));
    let out = serde_json::json!({
        "bytes": size,
        "runs": cli.runs,
        "part_mib": cli.part_mib,
        "concurrency": cli.concurrency,
        "replica_s": o,
        "replica_mb_s": mb / o,
        "rclone_s": p,
        "rclone_mb_s": mb / p,
        "replica_vs_rclone": p / o,
        "replica_peak_rss_bytes": median(rss),
    });
    report(&cli, &out)
}

fn report(cli: &Cli, out: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(out)?);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec(out)?)?;
    }
    Ok(())
}

/// Runs `f` while sampling this process's RSS every 20 ms; its result and the peak.
async fn with_peak_rss<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<(T, f64)> {
    let peak = Arc::new(AtomicU64::new(rss_bytes()));
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
    let r = f.await;
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    Ok((r, peak.load(Ordering::Relaxed) as f64))
}

/// The Swift pair: our SLO replica against `swift upload --use-slo` with the same segment size
/// and segment threads (4: our replica's segments in flight).
async fn swift_bench(cli: &Cli, store: &Store, size: u64, sha: &str) -> anyhow::Result<()> {
    use ssvm_agent::replica::swift;
    use systemvm_proto::Secret;
    use systemvm_proto::agent::{SwiftAuth, SwiftTarget};
    use systemvm_tests::objects::{SWIFT_KEY, SWIFT_USER, Swift};
    let dir = cli.swift_dir.clone().context("--swift-dir")?;
    let server = Swift::start(&dir);
    server.cli(&["post", "bench"]);
    let part = cli.part_mib << 20;
    let target = SwiftTarget {
        auth_url: server.auth_url.clone(),
        auth: SwiftAuth::V1 {
            user: SWIFT_USER.into(),
            key: Secret(SWIFT_KEY.into()),
        },
        container: "bench".into(),
        segment_size: part,
        ca_pem: None,
        temp_url_key: None,
    };
    let mb = size as f64 / 1e6;
    let (mut ours, mut peer, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..cli.runs {
        let mut pair = [0.0f64; 2];
        for which in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let key = format!("run{run}-{which}");
            let start = Instant::now();
            if which == 0 {
                let (r, peak) = with_peak_rss(swift::replicate(store, &cli.path, sha, &target, &key)).await?;
                r?;
                rss.push(peak);
            } else {
                let st = Command::new("swift")
                    .env("ST_AUTH", &server.auth_url)
                    .env("ST_USER", SWIFT_USER)
                    .env("ST_KEY", SWIFT_KEY)
                    .args(["upload", "--use-slo", "-S"])
                    .arg(part.to_string())
                    .arg(format!("--segment-threads={}", cli.concurrency))
                    .args(["--object-name", &key, "bench"])
                    .arg(&cli.local)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("swift (python3-swiftclient)")?;
                anyhow::ensure!(st.success(), "swift upload failed: {st}");
            }
            pair[which] = start.elapsed().as_secs_f64();
            swift::delete(&target, &key).await?;
            let _ = Command::new("swift")
                .env("ST_AUTH", &server.auth_url)
                .env("ST_USER", SWIFT_USER)
                .env("ST_KEY", SWIFT_KEY)
                .args(["delete", "bench", &key])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        eprintln!(
            "run {run}: replica {:.2} s ({:.0} MB/s), swift upload {:.2} s ({:.0} MB/s)",
            pair[0],
            mb / pair[0],
            pair[1],
            mb / pair[1]
        );
        ours.push(pair[0]);
        peer.push(pair[1]);
    }
    let (o, p) = (median(ours), median(peer));
    let out = serde_json::json!({
        "provider": "swift",
        "bytes": size,
        "runs": cli.runs,
        "segment_mib": cli.part_mib,
        "concurrency": cli.concurrency,
        "replica_s": o,
        "replica_mb_s": mb / o,
        "swift_upload_s": p,
        "swift_upload_mb_s": mb / p,
        "replica_vs_swift_upload": p / o,
        "replica_peak_rss_bytes": median(rss),
    });
    report(cli, &out)
}
