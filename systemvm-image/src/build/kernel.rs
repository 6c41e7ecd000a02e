//! The guest kernel and the boot loaders, from Debian's packages: `apt-get download` into the
//! builder's cache and `dpkg-deb -x`, never installed on the build host. Also the list of kernel
//! modules the initramfs must carry (Debian builds virtio, squashfs and iso9660 as modules).
//!
//! Invariants: a package is downloaded once per version and unpacked into a directory named by
//! its file name (a partial unpack is removed first); the module set is the closure of
//! [`MODULES`] under `modprobe --show-depends`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::tools::{arg, run, run_in};

/// The modules the system VM needs: virtio disk and network, the root (squashfs) and config-drive
/// file systems, the CD-ROM (IDE or AHCI), and the ACPI power button through evdev.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "squashfs",
    "isofs",
    "sr_mod",
    "ata_piix",
    "ahci",
    "evdev",
    "button",
];

/// An unpacked Debian package.
#[derive(Debug, Clone)]
pub struct Package {
    /// `name_version_arch.deb`.
    pub deb: String,
    /// Where it is unpacked.
    pub root: PathBuf,
}

/// The package `linux-image-amd64` depends on now (e.g. `linux-image-6.1.0-57-amd64`).
pub fn kernel_package() -> Result<String> {
    let deps = run("apt-cache", &["depends", "linux-image-amd64"])?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .context("apt-cache knows no linux-image-amd64 dependency (apt-get update?)")
}

/// Downloads (once) and unpacks (once) `name` into `cache`.
pub fn fetch(cache: &Path, name: &str) -> Result<Package> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let find = || -> Result<Option<String>> {
        Ok(std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
            .max())
    };
    let deb = match find()? {
        Some(d) => d,
        None => {
            eprintln!("systemvm-image: apt-get download {name}");
            run_in(Some(&debs), "apt-get", &["download", "-qq", name], &[])?;
            find()?.with_context(|| format!("apt-get download {name} left no .deb"))?
        }
    };
    let root = cache.join("unpacked").join(deb.trim_end_matches(".deb"));
    let done = root.join(".unpacked");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        run("dpkg-deb", &["-x", arg(&debs.join(&deb))?, arg(&root)?])?;
        std::fs::write(&done, "")?;
    }
    // modprobe names files by absolute path.
    let root = std::fs::canonicalize(&root)?;
    Ok(Package { deb, root })
}

/// The kernel release of an unpacked kernel package (its `lib/modules/<release>`).
pub fn release(kpkg: &Package) -> Result<String> {
    let dir = kpkg.root.join("lib/modules");
    let r = std::fs::read_dir(&dir)
        .with_context(|| format!("{} has no lib/modules", kpkg.root.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("no kernel release under lib/modules")?;
    Ok(r)
}

/// The module files (relative to the package root) for [`MODULES`] and their dependencies,
/// sorted; builtin ones need no file.
pub fn module_files(kpkg: &Package, release: &str) -> Result<Vec<PathBuf>> {
    let root = arg(&kpkg.root)?;
    if !kpkg
        .root
        .join("lib/modules")
        .join(release)
        .join("modules.dep")
        .exists()
    {
        run("depmod", &["-b", root, release])?;
    }
    let mut files = Vec::new();
    for m in MODULES {
        let out = run("modprobe", &["-d", root, "-S", release, "--show-depends", m])?;
        for line in out.lines() {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some("insmod"), Some(path)) => {
                    let rel = Path::new(path)
                        .strip_prefix(root)
                        .with_context(|| format!("modprobe named {path} outside the package"))?;
                    files.push(rel.to_path_buf());
                }
                (Some("builtin"), _) => {}
                _ => bail!("unexpected modprobe output for {m}: {line}"),
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}
