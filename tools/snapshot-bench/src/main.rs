//! Snapshot backup benchmark: a sparse qcow2 disk (SIZE GiB, ALLOCATED MiB written in extents
//! spread over it, then CHANGE % changed after a dirty bitmap was added) exported by `qemu-nbd`
//! as libvirt's pull-mode backup exports it; in one run, RUNS times each: the storage VM's full
//! backup (allocated extents into a qcow2 on the store) against `qemu-img convert -O qcow2` of the
//! same export into the same store (then `sync` of its file; the backup flushes its own), and the
//! incremental backup (dirty extents over the full one). Medians, ratios and bytes read.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use ssvm_agent::snapshot::{BackupSpec, Extents, backup};
use ssvm_agent::store::{Store, StoreOptions};

#[derive(Parser)]
struct Args {
    /// Working directory (the disk and the store `store/` under it).
    #[arg(long, default_value = "target/bench/snapshot/work")]
    dir: PathBuf,
    /// Virtual size, GiB.
    #[arg(long, default_value_t = 8)]
    size_gib: u64,
    /// Allocated data, MiB.
    #[arg(long, default_value_t = 1024)]
    allocated_mib: u64,
    /// Share of the disk changed after the bitmap, percent.
    #[arg(long, default_value_t = 1.0)]
    change_pct: f64,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where the JSON results go.
    #[arg(long)]
    json: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Writes `total_mib` MiB in 16 MiB extents spread evenly over the disk, pattern `seed + i`.
fn spread(img: &Path, size: u64, total_mib: u64, seed: u8, shift: u64) -> anyhow::Result<()> {
    let extent = 16 * MIB;
    let n = (total_mib * MIB).div_ceil(extent).max(1);
    let stride = size / n;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for i in 0..n {
        let at = (i * stride + shift) / MIB * MIB;
        let len = extent.min(total_mib * MIB - i * extent).min(size - at);
        cmd.arg("-c")
            .arg(format!("write -P {} {at} {len}", seed.wrapping_add(i as u8)));
    }
    run(cmd.arg(img))
}

/// CPU seconds (user + system) of this process and of its waited-for children, from
/// `/proc/self/stat` (clock ticks of 1/100 s).
fn cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| f.get(i - 3).copied().unwrap_or(0.0) / 100.0;
    (at(14) + at(15), at(16) + at(17))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size = args.size_gib << 30;
    let _ = std::fs::remove_dir_all(&args.dir);
    let store_dir = args.dir.join("store");
    std::fs::create_dir_all(&store_dir)?;
    let img = args.dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(size.to_string()))?;
    spread(&img, size, args.allocated_mib, 1, 0)?;
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"))?;
    let change_mib = ((size as f64 * args.change_pct / 100.0) / MIB as f64).round() as u64;
    spread(&img, size, change_mib.max(1), 101, 8 * MIB)?;
    let server = systemvm_tests::nbd::QemuNbd::serve(&img);
    let addr = server.addr.clone();
    let url = format!("file://{}", std::fs::canonicalize(&store_dir)?.display()).parse()?;
    let store = Store::open(&url, StoreOptions::default()).await?;
    let spec = |extents, name: &str| BackupSpec {
        nbd: addr.clone(),
        export: "vda".into(),
        extents,
        dir: "snapshots/bench/vol".into(),
        name: name.into(),
        max_rate: None,
    };
    let (mut full_t, mut conv_t, mut inc_t) = (Vec::new(), Vec::new(), Vec::new());
    // CPU seconds of the backup (this process) and of qemu-img (its child), per run.
    let (mut full_cpu, conv_cpu) = (Vec::new(), std::cell::RefCell::new(Vec::new()));
    let (mut full_read, mut inc_read, mut full_size, mut inc_size, mut conv_size) = (0, 0, 0, 0, 0);
    for r in 0..args.runs {
        let out = store_dir.join(format!("convert-{r}.qcow2"));
        let convert = |out: &Path| -> anyhow::Result<f64> {
            let (_, c0) = cpu();
            let t = Instant::now();
            run(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(format!("nbd://{addr}/vda"))
                .arg(out))?;
            run(Command::new("sync").arg(out))?;
            let took = t.elapsed().as_secs_f64();
            conv_cpu.borrow_mut().push(cpu().1 - c0);
            Ok(took)
        };
        // The peer goes first in every other run, so neither side always follows the other.
        if r % 2 == 1 {
            conv_t.push(convert(&out)?);
        }
        let (c0, _) = cpu();
        let t = Instant::now();
        let full = backup(&store, &spec(Extents::Allocated, &format!("full-{r}.qcow2"))).await?;
        full_t.push(t.elapsed().as_secs_f64());
        full_cpu.push(cpu().0 - c0);
        let t = Instant::now();
        let inc = backup(
            &store,
            &spec(
                Extents::Dirty {
                    context: "qemu:dirty-bitmap:b0".into(),
                    backing: format!("full-{r}.qcow2"),
                },
                &format!("inc-{r}.qcow2"),
            ),
        )
        .await?;
        inc_t.push(t.elapsed().as_secs_f64());
        if r % 2 == 0 {
            conv_t.push(convert(&out)?);
        }
        (full_read, inc_read) = (full.bytes_read, inc.bytes_read);
        (full_size, inc_size) = (full.physical_size, inc.physical_size);
        conv_size = std::fs::metadata(&out)?.len();
        for f in [store_dir.join(&full.file), store_dir.join(&inc.file), out] {
            std::fs::remove_file(f)?;
        }
        eprintln!(
            "run {r}: full {:.2} s ({:.2} s CPU), incremental {:.2} s, qemu-img convert {:.2} s ({:.2} s CPU)",
            full_t[r],
            full_cpu[r],
            inc_t[r],
            conv_t[r],
            conv_cpu.borrow()[r]
        );
    }
    let (f, i, c) = (median(full_t), median(inc_t), median(conv_t));
    let (fc, cc) = (median(full_cpu), median(conv_cpu.into_inner()));
    let result = serde_json::json!({
        "virtual_gib": args.size_gib,
        "allocated_mib": args.allocated_mib,
        "changed_mib": change_mib,
        "runs": args.runs,
        "full_s": f,
        "incremental_s": i,
        "qemu_img_convert_s": c,
        "full_vs_convert": f / c,
        "full_cpu_s": fc,
        "qemu_img_convert_cpu_s": cc,
        "incremental_vs_full": i / f,
        "full_bytes_read": full_read,
        "incremental_bytes_read": inc_read,
        "full_image_bytes": full_size,
        "incremental_image_bytes": inc_size,
        "convert_image_bytes": conv_size,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(p) = args.json {
        std::fs::write(p, result.to_string())?;
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
