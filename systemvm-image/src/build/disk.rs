//! The bootable disk, made from files alone (no mount, no loop device): a GPT with an EFI system
//! partition (FAT32: the kernel, the stage-1 initramfs, SYSLINUX for BIOS and systemd-boot for
//! UEFI, one boot entry each) and the root partition (GPT name `svmroot`: a squashfs of the root
//! tree, zstd-compressed, read-only by nature), converted to a compressed qcow2.
//!
//! Invariants: every identifier the tools would draw at random (disk and partition GUIDs, file
//! system volume id) is fixed, the tools that stamp the current time (mtools, SYSLINUX's files
//! in the FAT) run under a frozen clock at the epoch (libfaketime), and the squashfs takes every
//! time from the epoch and every owner as root, so the same trees give the same image; the
//! kernel command line is the same for both loaders.

use std::path::Path;

use anyhow::{Context as _, Result};

use super::tools::{arg, run, run_in};

/// The root partition's GPT name (the loaders' `root=PARTNAME=`; the kernel shows it in the
/// partition's uevent).
pub const ROOT_NAME: &str = "svmroot";
/// The kernel command line of the disk's boot entries.
pub const CMDLINE: &str = "console=ttyS0 panic=5 quiet root=PARTNAME=svmroot systemvm.seed=cidata";
/// EFI system partition size, MiB.
const ESP_MIB: u64 = 64;

const DISK_GUID: &str = "5C9D2A10-6E0B-4C0B-9E52-53595356D000";
const ESP_GUID: &str = "5C9D2A10-6E0B-4C0B-9E52-53595356D001";
const ROOT_GUID: &str = "5C9D2A10-6E0B-4C0B-9E52-53595356D002";
const ESP_VOLID: &str = "53564d31";

/// The inputs of the disk.
#[derive(Debug)]
pub struct DiskInputs<'a> {
    /// The kernel.
    pub vmlinuz: &'a Path,
    /// The stage-1 initramfs.
    pub initrd: &'a Path,
    /// The root tree.
    pub root: &'a Path,
    /// `systemd-bootx64.efi`.
    pub sdboot: &'a Path,
    /// SYSLINUX's GPT MBR (`gptmbr.bin`).
    pub gptmbr: &'a Path,
    /// Seconds since the epoch for every time stamp.
    pub epoch: u64,
}

/// Runs `program args…` with the clock frozen at `epoch` (package faketime) and `env`.
fn frozen(epoch: u64, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let at = run("date", &["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%d %H:%M:%S"])?;
    let mut a = vec!["-f", at.trim(), program];
    a.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("TZ", "UTC"));
    run_in(None, "faketime", &a, &env)
}

/// Builds `out` (qcow2) in the scratch directory `work`.
pub fn build(i: &DiskInputs<'_>, work: &Path, out: &Path) -> Result<()> {
    let epoch = i.epoch.to_string();
    let at = |program: &str, args: &[&str], env: &[(&str, &str)]| frozen(i.epoch, program, args, env);
    let esp = work.join("esp.img");
    let _ = std::fs::remove_file(&esp);
    let sectors = (ESP_MIB * 1024).to_string();
    at(
        "mkfs.vfat",
        &[
            "-F",
            "32",
            "-n",
            "SVMESP",
            "-i",
            ESP_VOLID,
            "--invariant",
            "-C",
            arg(&esp)?,
            &sectors,
        ],
        &[],
    )?;
    // mtools takes file times from the sources (-m) and, for what it makes itself, the clock:
    // SOURCE_DATE_EPOCH pins those.
    let env = [("MTOOLS_SKIP_CHECK", "1"), ("SOURCE_DATE_EPOCH", epoch.as_str())];
    let m = |program: &str, args: &[&str]| at(program, args, &env);
    let img = arg(&esp)?;
    m(
        "mmd",
        &[
            "-i",
            img,
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
            "::/syslinux",
        ],
    )?;
    let stage = work.join("esp-files");
    std::fs::create_dir_all(&stage)?;
    let files = [
        ("loader.conf", "default systemvm.conf\ntimeout 0\n".to_owned()),
        (
            "systemvm.conf",
            format!("title systemvm\nlinux /vmlinuz\ninitrd /initrd.img\noptions {CMDLINE}\n"),
        ),
        (
            "syslinux.cfg",
            format!(
                "DEFAULT systemvm\nPROMPT 0\nTIMEOUT 0\nLABEL systemvm\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {CMDLINE}\n"
            ),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(stage.join(name), text)?;
    }
    super::tree::set_times(&stage, i.epoch)?;
    let copies = [
        (i.sdboot.to_path_buf(), "::/EFI/BOOT/BOOTX64.EFI"),
        (i.vmlinuz.to_path_buf(), "::/vmlinuz"),
        (i.initrd.to_path_buf(), "::/initrd.img"),
        (stage.join("loader.conf"), "::/loader/loader.conf"),
        (stage.join("systemvm.conf"), "::/loader/entries/systemvm.conf"),
        (stage.join("syslinux.cfg"), "::/syslinux/syslinux.cfg"),
    ];
    for (src, dst) in &copies {
        m("mcopy", &["-m", "-i", img, arg(src)?, dst])?;
    }
    at("syslinux", &["--install", "--directory", "/syslinux", img], &env)?;

    let root_img = work.join("root.img");
    let _ = std::fs::remove_file(&root_img);
    run(
        "mksquashfs",
        &[
            arg(i.root)?,
            arg(&root_img)?,
            "-noappend",
            "-quiet",
            "-no-progress",
            "-comp",
            "zstd",
            "-Xcompression-level",
            "19",
            "-all-root",
            "-no-xattrs",
            "-all-time",
            &epoch,
            "-mkfs-time",
            &epoch,
        ],
    )?;
    let root_mib = std::fs::metadata(&root_img)?.len().div_ceil(1 << 20) + 1;

    let raw = work.join("disk.raw");
    let _ = std::fs::remove_file(&raw);
    let total_mib = 1 + ESP_MIB + root_mib + 1;
    std::fs::File::create(&raw)?.set_len(total_mib << 20)?;
    let table = format!(
        "label: gpt\nlabel-id: {DISK_GUID}\n\
         start=1MiB, size={ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={ESP_GUID}, name=esp, attrs=LegacyBIOSBootable\n\
         start={}MiB, size={root_mib}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={ROOT_GUID}, name={ROOT_NAME}\n",
        1 + ESP_MIB
    );
    sfdisk(&raw, &table)?;
    let raw_s = arg(&raw)?;
    let dd = |src: &Path, extra: &[&str]| -> Result<()> {
        let mut a = vec![
            format!("if={}", arg(src)?),
            format!("of={raw_s}"),
            "conv=notrunc,sparse".into(),
            "status=none".into(),
        ];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        run("dd", &a.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(())
    };
    dd(i.gptmbr, &["bs=440", "count=1"])?;
    dd(&esp, &["bs=1M", "seek=1"])?;
    dd(&root_img, &["bs=1M", &format!("seek={}", 1 + ESP_MIB)])?;
    let tmp = out.with_extension("qcow2.part");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw_s,
            arg(&tmp)?,
        ],
    )?;
    std::fs::rename(&tmp, out)?;
    for f in [esp, root_img, raw] {
        let _ = std::fs::remove_file(f);
    }
    Ok(())
}

fn sfdisk(raw: &Path, table: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", arg(raw)?])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("failed to run sfdisk (package fdisk)")?;
    child
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(table.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("sfdisk failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
