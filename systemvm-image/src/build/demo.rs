//! The demo guest: a tiny Linux (Debian's kernel, a busybox initramfs) that boots to a root shell
//! on its VGA console, so a console opened through the proxy shows a prompt and takes typing.
//! `systemvm-core up` boots it as its demo VM; it needs no modules, no disk and no network.
//!
//! Invariants: the guest holds nothing but busybox and its scripts (no secret, no agent); the
//! shell is restarted when it exits; the archive is packed like the image's (same epoch, owners).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{kernel, tree};

/// The demo's `/init`: kernel file systems, a banner, then a login shell on tty1 for ever.
pub const DEMO_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
hostname demo-vm
mkdir -p /root
# A name typed without Shift for the serial port (browser tests type into the console).
ln -s /dev/ttyS0 /dev/serial
while true; do
  clear >/dev/tty1
  cat /etc/motd >/dev/tty1
  setsid sh -c 'exec sh -l </dev/tty1 >/dev/tty1 2>&1'
done
"#;

/// The kernel command line the demo boots with (VGA console, no delay).
pub const DEMO_CMDLINE: &str = "console=tty1 quiet panic=5";

/// Builds `demo-vmlinuz` and `demo-initrd.img` into `out`; returns their paths.
pub fn build(out: &Path, cache: &Path, busybox: &Path, epoch: u64) -> Result<(PathBuf, PathBuf)> {
    let kpkg = kernel::fetch(cache, &kernel::kernel_package()?)?;
    let release = kernel::release(&kpkg)?;
    std::fs::create_dir_all(out)?;
    let work = out.join("demo-work");
    let _ = std::fs::remove_dir_all(&work);
    let root = work.join("root");
    tree::busybox(&root, busybox)?;
    tree::put(&root.join("init"), DEMO_INIT.as_bytes(), 0o755)?;
    tree::put(
        &root.join("etc/motd"),
        b"Mold demo guest: a Linux shell on this VM's console (busybox).\nTry: uname -a; ls /; free\n\n",
        0o644,
    )?;
    tree::put(&root.join("etc/profile"), b"export PS1='demo-vm:$PWD# '\n", 0o644)?;
    tree::set_times(&root, epoch)?;
    let initrd = out.join("demo-initrd.img");
    let part = out.join("demo-initrd.img.part");
    tree::pack(&root, &part)?;
    std::fs::rename(&part, &initrd)?;
    let vmlinuz = out.join("demo-vmlinuz");
    std::fs::copy(
        kpkg.root.join("boot").join(format!("vmlinuz-{release}")),
        &vmlinuz,
    )?;
    std::fs::remove_dir_all(&work)?;
    Ok((vmlinuz, initrd))
}
