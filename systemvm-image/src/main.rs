//! `systemvm-image`: builds the bootable system VM appliance (see `systemvm_image::build`).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Builds the bootable system VM appliance")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds systemvm.qcow2 (BIOS and UEFI), vmlinuz + initrd.img and manifest.json.
    Build {
        /// Output directory.
        #[arg(long, default_value = "target/systemvm-image")]
        out: PathBuf,
        /// Package download cache.
        #[arg(long, default_value = "target/systemvm-image-cache")]
        cache: PathBuf,
        /// Take the agents (systemvm-init, console-proxy, ssvm-agent) from this directory
        /// instead of building them (static binaries for x86_64-unknown-linux-musl).
        #[arg(long)]
        agents: Option<PathBuf>,
        /// The console proxy's web root.
        #[arg(long, default_value = "console-proxy/web")]
        web: PathBuf,
        /// Time stamp of every file in the image, seconds since 1970 (default: 1980-01-01, the
        /// earliest time a FAT file system holds).
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 315_532_800)]
        epoch: u64,
        /// Build even when the inputs match the manifest in --out.
        #[arg(long)]
        force: bool,
    },
    /// Builds the demo guest (demo-vmlinuz, demo-initrd.img): a shell on its VGA console.
    Demo {
        /// Output directory.
        #[arg(long, default_value = "target/systemvm-image")]
        out: PathBuf,
        /// Package download cache.
        #[arg(long, default_value = "target/systemvm-image-cache")]
        cache: PathBuf,
        /// Time stamp of every file, seconds since 1970.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 315_532_800)]
        epoch: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Build {
            out,
            cache,
            agents,
            web,
            epoch,
            force,
        } => {
            let t = std::time::Instant::now();
            let m = systemvm_image::build::build(&systemvm_image::build::Options {
                out: out.clone(),
                cache,
                agents,
                web,
                epoch,
                force,
            })?;
            for (name, len, sum) in &m.files {
                println!("{}  {:>10}  {}", sum, len, out.join(name).display());
            }
            eprintln!(
                "systemvm-image: {} in {:.1} s (kernel {}, inputs {})",
                out.display(),
                t.elapsed().as_secs_f64(),
                m.kernel,
                &m.inputs[..12]
            );
        }
        Cmd::Demo { out, cache, epoch } => {
            let (k, i) = systemvm_image::build::demo::build(
                &out,
                &cache,
                std::path::Path::new("/bin/busybox"),
                epoch,
            )?;
            println!("{}\n{}", k.display(), i.display());
            eprintln!(
                "systemvm-image: boot it with: qemu-system-x86_64 -kernel {} -initrd {} -append '{}'",
                k.display(),
                i.display(),
                systemvm_image::build::demo::DEMO_CMDLINE
            );
        }
    }
    Ok(())
}
