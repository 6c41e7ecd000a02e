//! Test images: deterministic noise and qcow2 images made from it with the real `qemu-img`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `len` bytes of deterministic noise (xorshift64), different for each `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `dir/name` as a qcow2 holding `mib` MiB of noise (so its size is about `mib` MiB).
pub fn qcow2_of_noise(dir: &Path, name: &str, mib: usize, seed: u64) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let raw = dir.join(format!("{name}.raw"));
    let img = dir.join(name);
    std::fs::write(&raw, noise(mib << 20, seed))?;
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img)
        .output()
        .map_err(|e| std::io::Error::other(format!("qemu-img: {e} (run scripts/deps.sh test)")))?;
    std::fs::remove_file(&raw)?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "qemu-img failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(img)
}
