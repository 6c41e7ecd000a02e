//! Running the host tools the builder drives (apt-get, dpkg-deb, mkfs, mtools, sfdisk, cpio,
//! qemu-img), each from its Debian package, with errors that name the command and its output.
//!
//! Invariants: a tool that fails is an error carrying its stderr; nothing is run through a shell
//! except the cpio pipeline, whose inputs are paths the builder made.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Runs `program args…` in `dir` (when given), with extra environment; returns stdout.
pub fn run_in(dir: Option<&Path>, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null());
    if let Some(d) = dir {
        c.current_dir(d);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .with_context(|| format!("failed to run {program} (scripts/deps.sh test installs it)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…`; returns stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_in(None, program, args, &[])
}

/// A path as a `&str` argument (the builder's paths are UTF-8).
pub fn arg(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
