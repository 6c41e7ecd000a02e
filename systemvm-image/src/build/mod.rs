//! `systemvm-image build`: the system VM appliance from its inputs — Debian's kernel and
//! systemd-boot packages (downloaded, never installed), Debian's static busybox and SYSLINUX,
//! the agents and `systemvm-init` as static musl binaries, the console proxy's web assets —
//! into `--out`: `systemvm.qcow2` (BIOS and UEFI), `vmlinuz` + `initrd.img` (the kernel pair:
//! everything in RAM), `manifest.json`.
//!
//! Invariants: the outputs appear only complete (built in `work/`, renamed last, the manifest
//! after the images); the manifest's `inputs` digest covers every input file and the builder's
//! version, and a build whose digest matches the manifest in `--out` does nothing; times in
//! every archive and file system are the epoch the manifest records.

pub mod demo;
pub mod disk;
pub mod kernel;
pub mod tools;
pub mod tree;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use self::tools::arg;

/// The Rust target of the agents in the image.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The cargo profile they are built with (release, stripped).
pub const PROFILE: &str = "image";

/// What to build from.
#[derive(Debug, Clone)]
pub struct Options {
    /// Output directory.
    pub out: PathBuf,
    /// Download and unpack cache.
    pub cache: PathBuf,
    /// The agents (`systemvm-init`, `console-proxy`, `ssvm-agent`); built with cargo when `None`.
    pub agents: Option<PathBuf>,
    /// The console proxy's web root.
    pub web: PathBuf,
    /// Time stamp of every file, seconds since 1970 (the command's default: 1980-01-01).
    pub epoch: u64,
    /// Build again even when the manifest's inputs match.
    pub force: bool,
}

/// `manifest.json`: what an image was built from and what it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// The builder's version (the agents' too: one workspace).
    pub version: String,
    /// SHA-256 over every input (names and bytes).
    pub inputs: String,
    /// The kernel package.
    pub kernel: String,
    /// The systemd-boot package.
    pub sdboot: String,
    /// Time stamps in the image.
    pub epoch: u64,
    /// The directory the agents were taken from.
    pub agents: PathBuf,
    /// Output files: name → (bytes, SHA-256).
    pub files: Vec<(String, u64, String)>,
}

/// The workspace's root (this crate's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the agents for the image are compiled: `SYSTEMVM_IMAGE_TARGET_DIR`, else
/// `$XDG_CACHE_HOME/systemvm-image/target` (`~/.cache/…`). Outside the checkout on purpose: the
/// musl release build of the agents' dependencies takes minutes on two cores and is the same for
/// every checkout, so a fresh clone on the same machine compiles only the workspace's own crates
/// (cargo's fingerprints decide what is stale, as in any target directory).
pub fn agents_target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SYSTEMVM_IMAGE_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| workspace_root().join("target"));
    cache.join("systemvm-image/target")
}

/// Builds the agents for the image with cargo; returns their directory.
pub fn build_agents() -> Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("systemvm-image: cargo build --profile {PROFILE} --target {TARGET} (the agents)");
    let target_dir = agents_target_dir();
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--locked", "--profile", PROFILE, "--target", TARGET])
        .args(["-p", "console-proxy", "-p", "ssvm-agent", "-p", "systemvm-image"])
        .args([
            "--bin",
            "console-proxy",
            "--bin",
            "ssvm-agent",
            "--bin",
            "systemvm-init",
        ])
        .status()
        .context("failed to run cargo")?;
    if !status.success() {
        bail!("building the agents for {TARGET} failed ({status}); scripts/deps.sh test adds the target");
    }
    Ok(target_dir.join(TARGET).join(PROFILE))
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every file under `dir`, sorted, relative.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(d)
            .with_context(|| format!("failed to read {}", d.display()))?
            .flatten()
        {
            let t = e.file_type()?;
            if t.is_dir() {
                walk(base, &e.path(), out)?;
            } else if t.is_file() {
                out.push(e.path().strip_prefix(base)?.to_path_buf());
            }
        }
        Ok(())
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v)?;
    v.sort();
    Ok(v)
}

/// Builds the image; returns its manifest.
pub fn build(o: &Options) -> Result<Manifest> {
    let agents = match &o.agents {
        Some(a) => a.clone(),
        None => build_agents()?,
    };
    let kpkg_name = kernel::kernel_package()?;
    let kpkg = kernel::fetch(&o.cache, &kpkg_name)?;
    let sdpkg = kernel::fetch(&o.cache, "systemd-boot-efi")?;
    let release = kernel::release(&kpkg)?;
    let vmlinuz = kpkg.root.join("boot").join(format!("vmlinuz-{release}"));
    let sdboot = sdpkg.root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    let busybox = PathBuf::from("/bin/busybox");
    let gptmbr = PathBuf::from("/usr/lib/syslinux/mbr/gptmbr.bin");
    let ca_bundle = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    for (p, pkg) in [
        (&busybox, "busybox-static"),
        (&gptmbr, "syslinux-common"),
        (&ca_bundle, "ca-certificates"),
    ] {
        if !p.is_file() {
            bail!("{} is missing (package {pkg}; scripts/deps.sh test)", p.display());
        }
    }
    if !o.web.join("node_modules/@novnc/novnc/core/rfb.js").is_file() {
        bail!(
            "{} has no noVNC (npm ci there; scripts/deps.sh test)",
            o.web.display()
        );
    }

    // The inputs digest: the builder, then each input file's name and content digest.
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION"));
    h.update(o.epoch.to_le_bytes());
    let exe = std::env::current_exe()?;
    let mut inputs: Vec<(String, PathBuf)> = vec![
        ("builder".into(), exe),
        ("kernel".into(), o.cache.join("debs").join(&kpkg.deb)),
        ("sdboot".into(), o.cache.join("debs").join(&sdpkg.deb)),
        ("busybox".into(), busybox.clone()),
        ("gptmbr".into(), gptmbr.clone()),
        ("ca".into(), ca_bundle.clone()),
    ];
    for a in ["systemvm-init", "console-proxy", "ssvm-agent"] {
        inputs.push((a.into(), agents.join(a)));
    }
    for f in files_under(&o.web.join("node_modules/@novnc/novnc"))? {
        inputs.push((
            format!("novnc/{}", f.display()),
            o.web.join("node_modules/@novnc/novnc").join(&f),
        ));
    }
    inputs.push(("console.html".into(), o.web.join("console.html")));
    if o.web.join("static").is_dir() {
        for f in files_under(&o.web.join("static"))? {
            inputs.push((format!("static/{}", f.display()), o.web.join("static").join(&f)));
        }
    }
    for (name, path) in &inputs {
        h.update(name.as_bytes());
        h.update(sha256_file(path)?.as_bytes());
    }
    let digest = hex(&h.finalize());
    let manifest_path = o.out.join("manifest.json");
    if !o.force
        && let Ok(text) = std::fs::read_to_string(&manifest_path)
        && let Ok(old) = serde_json::from_str::<Manifest>(&text)
        && old.inputs == digest
        && old
            .files
            .iter()
            .all(|(n, len, _)| std::fs::metadata(o.out.join(n)).is_ok_and(|m| m.len() == *len))
    {
        eprintln!("systemvm-image: {} is up to date", o.out.display());
        return Ok(old);
    }

    std::fs::create_dir_all(&o.out)?;
    let work = o.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _ = std::fs::remove_file(&manifest_path);

    let modules = kernel::module_files(&kpkg, &release)?;
    let stage1 = work.join("stage1");
    tree::stage1(&stage1, &busybox, &kpkg.root, &release, &modules)?;
    let root = work.join("root");
    let release_text = format!(
        "SYSTEMVM_VERSION={}\nSYSTEMVM_INPUTS={digest}\nKERNEL={release}\n",
        env!("CARGO_PKG_VERSION")
    );
    tree::root(
        &root,
        &tree::RootInputs {
            busybox: busybox.clone(),
            agents: agents.clone(),
            web: o.web.clone(),
            ca_bundle,
            release_text,
        },
    )?;
    tree::set_times(&stage1, o.epoch)?;
    tree::set_times(&root, o.epoch)?;
    let stage1_cpio = work.join("stage1.cpio.gz");
    tree::pack(&stage1, &stage1_cpio)?;
    let root_cpio = work.join("root.cpio.gz");
    tree::pack(&root, &root_cpio)?;

    // The kernel pair: stage 1 and the root concatenated (the kernel unpacks both).
    let mut full = std::fs::read(&stage1_cpio)?;
    full.extend(std::fs::read(&root_cpio)?);
    std::fs::write(work.join("initrd.img"), full)?;
    std::fs::copy(&vmlinuz, work.join("vmlinuz"))?;
    disk::build(
        &disk::DiskInputs {
            vmlinuz: &vmlinuz,
            initrd: &stage1_cpio,
            root: &root,
            sdboot: &sdboot,
            gptmbr: &gptmbr,
            epoch: o.epoch,
        },
        &work,
        &work.join("systemvm.qcow2"),
    )?;
    let mut files = Vec::new();
    for name in ["systemvm.qcow2", "vmlinuz", "initrd.img"] {
        let from = work.join(name);
        let len = std::fs::metadata(&from)?.len();
        let sum = sha256_file(&from)?;
        std::fs::rename(&from, o.out.join(name)).with_context(|| format!("failed to install {name}"))?;
        files.push((name.to_owned(), len, sum));
    }
    let manifest = Manifest {
        version: env!("CARGO_PKG_VERSION").into(),
        inputs: digest,
        kernel: kpkg.deb.clone(),
        sdboot: sdpkg.deb.clone(),
        epoch: o.epoch,
        agents: agents.clone(),
        files,
    };
    let tmp = manifest_path.with_extension("json.part");
    std::fs::write(&tmp, serde_json::to_string_pretty(&manifest)?)?;
    std::fs::rename(&tmp, &manifest_path)?;
    std::fs::remove_dir_all(&work)?;
    let _ = arg(&o.out)?;
    Ok(manifest)
}
