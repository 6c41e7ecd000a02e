//! The two file trees of the image: stage 1 (the initramfs: busybox, `/init`, the kernel
//! modules) and the root (busybox, `systemvm-init`, the agents, the console's web assets, the CA
//! bundle), and their packing as `newc` cpio archives.
//!
//! Invariants: every path, mode, owner and time in a tree is set by the builder (times are the
//! build's epoch), so the same inputs pack to the same bytes; the root holds no secret and no
//! writable path except the mount points (`/run` is tmpfs at boot, `/tmp` links into it).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::tools::{arg, run};

/// The stage-1 `/init`: mounts the kernel file systems, loads the modules listed in
/// `/etc/modules`, then either switches to the root partition named by `root=` (its GPT name,
/// a label, or a device; a squashfs, read-only) or,
/// without `root=` (the kernel + initramfs pair), runs the init from the initramfs itself.
pub const STAGE1_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
for m in $(cat /etc/modules); do modprobe -q "$m" || echo "init: module $m not loaded"; done
root=
for w in $(cat /proc/cmdline); do
  case "$w" in root=*) root="${w#root=}" ;; esac
done
if [ -z "$root" ]; then
  exec /sbin/systemvm-init
fi
dev=
i=0
while [ $i -lt 100 ]; do
  case "$root" in
    PARTNAME=*)
      for u in /sys/class/block/*/uevent; do
        if grep -qx "PARTNAME=${root#PARTNAME=}" "$u"; then d="${u%/uevent}"; dev="/dev/${d##*/}"; fi
      done ;;
    LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) [ -b "$root" ] && dev="$root" ;;
  esac
  [ -n "$dev" ] && break
  sleep 0.1
  i=$((i + 1))
done
if [ -z "$dev" ]; then
  echo "init: root $root not found"; sleep 5; poweroff -f
fi
mkdir -p /newroot
mount -t squashfs -o ro "$dev" /newroot || { echo "init: cannot mount $dev"; sleep 5; poweroff -f; }
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/systemvm-init
"#;

/// Creates `path`'s parent and writes `bytes` with `mode`.
pub fn put(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, bytes).with_context(|| format!("failed to write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies `from` to `to` with `mode`.
pub fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("failed to read {}", from.display()))?;
    put(to, &bytes, mode)
}

/// Copies a directory tree (files 0644, directories 0755).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("failed to read {}", from.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else if e.file_type()?.is_file() {
            copy(&e.path(), &dst, 0o644)?;
        }
    }
    Ok(())
}

/// Static busybox and a link for each of its applets.
pub fn busybox(root: &Path, busybox: &Path) -> Result<()> {
    copy(busybox, &root.join("bin/busybox"), 0o755)?;
    let list = run(arg(busybox)?, &["--list-full"])?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let link = root.join(applet);
        if link.exists() || applet == "bin/busybox" {
            continue;
        }
        if let Some(p) = link.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)?;
    }
    Ok(())
}

/// The stage-1 tree: busybox, `/init`, the modules (with their `modules.dep`).
pub fn stage1(
    dir: &Path,
    busybox_bin: &Path,
    kroot: &Path,
    release: &str,
    modules: &[PathBuf],
) -> Result<()> {
    busybox(dir, busybox_bin)?;
    put(&dir.join("init"), STAGE1_INIT.as_bytes(), 0o755)?;
    let names: Vec<String> = super::kernel::MODULES.iter().map(|m| (*m).to_owned()).collect();
    put(
        &dir.join("etc/modules"),
        format!("{}\n", names.join("\n")).as_bytes(),
        0o644,
    )?;
    for m in modules {
        copy(&kroot.join(m), &dir.join(m), 0o644)?;
    }
    for f in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
        let src = kroot.join("lib/modules").join(release).join(f);
        if src.exists() {
            copy(&src, &dir.join("lib/modules").join(release).join(f), 0o644)?;
        }
    }
    run("depmod", &["-b", arg(dir)?, release])?;
    for d in ["proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    Ok(())
}

/// What the root tree is made of.
#[derive(Debug, Clone)]
pub struct RootInputs {
    /// Static busybox.
    pub busybox: PathBuf,
    /// Directory with `systemvm-init`, `console-proxy`, `ssvm-agent`.
    pub agents: PathBuf,
    /// The console proxy's web root (`console.html`, `static/`, `node_modules/@novnc/novnc`).
    pub web: PathBuf,
    /// The CA bundle for the storage VM's https downloads.
    pub ca_bundle: PathBuf,
    /// `/etc/systemvm-release`.
    pub release_text: String,
}

/// The root tree.
pub fn root(dir: &Path, i: &RootInputs) -> Result<()> {
    busybox(dir, &i.busybox)?;
    copy(
        &i.agents.join("systemvm-init"),
        &dir.join("sbin/systemvm-init"),
        0o755,
    )?;
    for a in ["console-proxy", "ssvm-agent"] {
        copy(&i.agents.join(a), &dir.join("opt/systemvm/bin").join(a), 0o755)?;
    }
    let web = dir.join("opt/systemvm/web");
    copy(&i.web.join("console.html"), &web.join("console.html"), 0o644)?;
    if i.web.join("static").is_dir() {
        copy_dir(&i.web.join("static"), &web.join("static"))?;
    }
    let novnc = i.web.join("node_modules/@novnc/novnc");
    for part in ["core", "vendor"] {
        copy_dir(
            &novnc.join(part),
            &web.join("node_modules/@novnc/novnc").join(part),
        )?;
    }
    for f in ["package.json", "LICENSE.txt"] {
        if novnc.join(f).exists() {
            copy(
                &novnc.join(f),
                &web.join("node_modules/@novnc/novnc").join(f),
                0o644,
            )?;
        }
    }
    copy(
        &i.ca_bundle,
        &dir.join("etc/ssl/certs/ca-certificates.crt"),
        0o644,
    )?;
    put(&dir.join("etc/passwd"), b"root:x:0:0:root:/run:/bin/sh\n", 0o644)?;
    put(&dir.join("etc/group"), b"root:x:0:\n", 0o644)?;
    put(
        &dir.join("etc/systemvm-release"),
        i.release_text.as_bytes(),
        0o644,
    )?;
    std::os::unix::fs::symlink("/run/resolv.conf", dir.join("etc/resolv.conf"))?;
    for d in ["proc", "sys", "dev", "run"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::os::unix::fs::symlink("/run/tmp", dir.join("tmp"))?;
    std::fs::create_dir_all(dir.join("var"))?;
    std::os::unix::fs::symlink("/run/tmp", dir.join("var/tmp"))?;
    Ok(())
}

/// Sets every entry's time to `epoch` (symlinks themselves, not their targets).
pub fn set_times(dir: &Path, epoch: u64) -> Result<()> {
    run(
        "find",
        &[
            arg(dir)?,
            "-exec",
            "touch",
            "-h",
            "-d",
            &format!("@{epoch}"),
            "{}",
            "+",
        ],
    )?;
    Ok(())
}

/// Packs `dir` as a gzip'd newc cpio archive at `out` (sorted, owner 0, no gzip name or time).
pub fn pack(dir: &Path, out: &Path) -> Result<()> {
    let script = "find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --reproducible --quiet | gzip -9n";
    let data = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("failed to run the cpio pipeline (packages cpio, gzip)")?;
    if !data.status.success() || data.stdout.is_empty() {
        anyhow::bail!("packing {} failed: {}", dir.display(), data.status);
    }
    std::fs::write(out, data.stdout)?;
    Ok(())
}
