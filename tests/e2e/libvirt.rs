//! The `libvirt` driver against a real libvirtd (started by the tests, no systemd; `type='qemu'`
//! domains under TCG): a system VM domain booting Debian's kernel with an initramfs the test builds
//! (its boot parameters in the NoCloud seed), its state, its VNC console, stop and destroy; and a
//! guest domain with a VNC password whose console core resolves by name and opens through a proxy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use systemvm_core::fleet::driver::VmState;
use systemvm_core::fleet::libvirt::LibvirtDriver;
use systemvm_core::fleet::qemu::Boot;
use systemvm_core::fleet::{Driver as _, Placement, VmSpec};
use systemvm_proto::Secret;
use systemvm_proto::agent::AgentRole;

use crate::core_api::{Backend, Core};
use crate::fleet::{linked_proxy, screen_through, ws_url};
use crate::support::{which, workspace};

pub(crate) const URI: &str = "qemu:///system";

/// libvirtd (and virtlogd) for this test binary: an already running one is used, else both are
/// started in the foreground under a shell that stops them when this process ends.
pub(crate) struct Libvirtd {
    _guard: Option<Child>,
}

pub(crate) fn virsh_ok(args: &[&str]) -> bool {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Held by each test that runs guests under this libvirtd: TCG guests booting side by side on
/// two cores miss their deadlines.
pub(crate) static GUESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn libvirtd() -> &'static Libvirtd {
    static D: OnceLock<Libvirtd> = OnceLock::new();
    D.get_or_init(|| {
        let virsh =
            which("virsh").expect("virsh not found: run scripts/deps.sh test (package libvirt-clients)");
        let _ = virsh;
        if virsh_ok(&["version"]) {
            return Libvirtd { _guard: None };
        }
        let daemon = which("libvirtd")
            .expect("libvirtd not found: run scripts/deps.sh test (package libvirt-daemon-system)");
        let logd = which("virtlogd").expect("virtlogd not found: run scripts/deps.sh test");
        let log = std::env::temp_dir().join(format!("systemvm-e2e-libvirtd-{}.log", std::process::id()));
        let guard = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{logd} >>{log} 2>&1 & l=$!; {daemon} >>{log} 2>&1 & d=$!; read _ignored; kill $d $l; wait",
                logd = logd.display(),
                daemon = daemon.display(),
                log = log.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start libvirtd");
        // The first connection probes QEMU's capabilities (about 12 s under TCG here).
        let start = Instant::now();
        while !virsh_ok(&["version"]) {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "libvirtd did not answer within 90 s; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        Libvirtd { _guard: Some(guard) }
    })
}

/// Destroys and undefines the named domains when dropped (also when a test fails).
pub(crate) struct Domains(pub(crate) Vec<String>);

impl Drop for Domains {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = virsh_ok(&["destroy", d]);
            let _ = virsh_ok(&["undefine", d]);
        }
    }
}

/// A gzipped newc initramfs: static busybox as `/init`, which prints `marker` on the serial and
/// VGA consoles and sleeps.
fn initramfs(dir: &Path, marker: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).expect("initramfs dir");
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("static busybox (package busybox-static): run scripts/deps.sh test");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /proc /dev\n/bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t devtmpfs devtmpfs /dev\nfor c in /dev/ttyS0 /dev/tty0; do echo '{marker}' > $c; done\n\
         while true; do /bin/busybox sleep 60; done\n"
    );
    std::fs::write(root.join("init"), init).expect("init");
    let out = dir.join("initramfs.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod 755 init bin/busybox && find . | cpio --quiet -o -H newc | gzip -1 > {}",
            out.display()
        ))
        .current_dir(&root)
        .status()
        .expect("cpio (package cpio)");
    assert!(st.success(), "building the initramfs failed");
    out
}

fn kernel() -> PathBuf {
    let k = workspace().join("target/guest-kernel/vmlinuz");
    assert!(k.is_file(), "{} missing: run scripts/deps.sh test", k.display());
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_driver_runs_a_domain_and_core_opens_a_guest_console() {
    libvirtd();
    let _one_at_a_time = GUESTS.lock().await;
    let tmp = std::env::temp_dir().join(format!("systemvm-e2e-libvirt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("tmp");
    // libvirt's QEMU runs as libvirt-qemu: it must read the kernel, initramfs and seed.
    let _ = Command::new("chmod").arg("755").arg(&tmp).status();
    let marker = "systemvm-e2e-guest up";
    let driver = LibvirtDriver {
        uri: URI.into(),
        vm_root: tmp.join("vms"),
        boot: Boot::Kernel {
            kernel: kernel(),
            initrd: initramfs(&tmp, marker),
            cmdline: "console=ttyS0 quiet panic=5".into(),
        },
        memory_mib: 256,
    };
    std::fs::create_dir_all(&driver.vm_root).expect("vm root");
    let ca = tmp.join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("ca");
    let spec = VmSpec {
        id: "6d1f3a2e-7c4b-4e59-9a1d-5b0c2e3f4a61".into(),
        name: format!("v-e2e-{}-VM", std::process::id()),
        role: AgentRole::ConsoleProxy,
        zone_id: "zone".into(),
        secret: Secret::from("not-on-any-command-line"),
        core_urls: vec!["wss://127.0.0.1:8250/agent".into()],
        ca,
        store_url: None,
        allow_internal: vec![],
        max_sessions: 5,
    };
    let guest = format!("e2e-guest-{}", std::process::id());
    let _domains = Domains(vec![spec.id.clone(), guest.clone()]);

    // Start: the domain runs, its seed is private and holds the VM's boot parameters.
    let started = Instant::now();
    driver.start(&spec).await.expect("start the domain");
    let placement = Placement::default();
    assert_eq!(driver.state(&spec.id, &placement).await, VmState::Running);
    let seed = driver.vm_root.join(&spec.id).join("seed.iso");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&seed).expect("seed").permissions());
    assert_eq!(mode & 0o777, 0o600);
    let seed_text = String::from_utf8_lossy(&std::fs::read(&seed).expect("seed")).into_owned();
    assert!(seed_text.contains(&spec.id) && seed_text.contains("not-on-any-command-line"));
    let xml = driver.virsh(&["dumpxml", &spec.id]).await.expect("dumpxml");
    assert!(
        !xml.contains("not-on-any-command-line"),
        "secret in the domain XML"
    );
    // The guest boots Debian's kernel and the test's init.
    let log = driver.vm_root.join(&spec.id).join("console.log");
    loop {
        if std::fs::read_to_string(&log).unwrap_or_default().contains(marker) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no boot marker in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let booted = started.elapsed();
    // Its console, as libvirt reports it, speaks RFB.
    let vnc = driver
        .console_of(&spec.name)
        .await
        .expect("console_of")
        .expect("a VNC console");
    let mut s = tokio::net::TcpStream::connect((vnc.host.as_str(), vnc.port))
        .await
        .expect("VNC port");
    let mut banner = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut banner)
        .await
        .expect("RFB banner");
    assert!(banner.starts_with(b"RFB 003."), "{banner:?}");
    drop(s);
    assert_eq!(driver.console_of("no-such-domain").await.expect("lookup"), None);

    // A guest domain core does not deploy, with a VNC password: core finds its console by name
    // and a link opens it through a console proxy (the proxy does the VNC authentication).
    let gxml = format!(
        "<domain type='qemu'><name>{guest}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices>\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='pw123456'/><video><model type='vga'/></video>\
         </devices></domain>"
    );
    let gpath = tmp.join("guest.xml");
    std::fs::write(&gpath, gxml).expect("guest xml");
    driver
        .virsh(&["define", &gpath.display().to_string()])
        .await
        .expect("define guest");
    driver.virsh(&["start", &guest]).await.expect("start guest");
    let gvnc = driver
        .console_of(&guest)
        .await
        .expect("console_of")
        .expect("guest console");
    assert_eq!(gvnc.password.as_ref().map(Secret::expose), Some("pw123456"));
    let shared: Arc<dyn systemvm_core::fleet::Driver> = Arc::new(driver.clone());
    let core = Core::start_with(Backend::Sqlite, |c| {
        c.agent_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.guest_drivers = vec![shared];
    })
    .await;
    let proxy = linked_proxy(&core, "v-e2e-libvirt").await;
    let target = core
        .ok(&[
            "addConsoleTarget",
            "name=e2e-vm",
            &format!("hypervisorvm={guest}"),
        ])
        .await;
    let id = target["consoletarget"]["id"].as_str().expect("id").to_owned();
    let e = core
        .ok(&["createConsoleEndpoint", &format!("virtualmachineid={id}")])
        .await;
    assert_eq!(e["consoleendpoint"]["success"], true, "{e}");
    assert!(!e.to_string().contains("pw123456"));
    screen_through(&ws_url(&e["consoleendpoint"])).await;
    proxy.stop().await;

    // Stop and destroy the system VM domain.
    driver.stop(&spec.id, &placement, true).await.expect("stop");
    assert!(matches!(
        driver.state(&spec.id, &placement).await,
        VmState::Stopped(_)
    ));
    driver.destroy(&spec.id).await.expect("destroy");
    assert!(!virsh_ok(&["dominfo", &spec.id]), "domain still defined");
    assert!(!driver.vm_root.join(&spec.id).exists());
    eprintln!("libvirt: boot to marker {booted:?}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_driver_boots_a_system_vm_with_its_seed_and_no_secret_on_the_command_line() {
    use systemvm_core::fleet::qemu::QemuDriver;
    let tmp = std::env::temp_dir().join(format!("systemvm-e2e-qemu-driver-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("tmp");
    let marker = "systemvm-e2e-qemu-guest up";
    let driver = QemuDriver {
        qemu: which("qemu-system-x86_64").expect("qemu-system-x86_64: run scripts/deps.sh"),
        vm_root: tmp.join("vms"),
        boot: Boot::Kernel {
            kernel: kernel(),
            initrd: initramfs(&tmp, marker),
            cmdline: "console=ttyS0 quiet panic=5".into(),
        },
        memory_mib: 256,
    };
    let ca = tmp.join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("ca");
    let spec = VmSpec {
        id: "7e2a4b3f-8d5c-4f6a-8b2e-6c1d3f4a5b72".into(),
        name: "v-e2e-qemu-VM".into(),
        role: AgentRole::ConsoleProxy,
        zone_id: "zone".into(),
        secret: Secret::from("qemu-secret-never-in-ps"),
        core_urls: vec!["wss://127.0.0.1:8250/agent".into()],
        ca,
        store_url: None,
        allow_internal: vec![],
        max_sessions: 5,
    };
    let started = Instant::now();
    let placement = driver.start(&spec).await.expect("start");
    let pid = placement.pid.expect("pid");
    let _kill = crate::deploy::KillOnDrop(spec.id.clone());
    assert_eq!(driver.state(&spec.id, &placement).await, VmState::Running);
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline"))
        .replace('\0', " ");
    assert!(
        !cmdline.contains("qemu-secret-never-in-ps"),
        "secret on QEMU's command line"
    );
    assert!(
        cmdline.contains("systemvm.seed=cidata") && cmdline.contains("hostfwd=tcp:127.0.0.1:"),
        "{cmdline}"
    );
    let seed = std::fs::read(driver.vm_root.join(&spec.id).join("seed.iso")).expect("seed");
    let seed = String::from_utf8_lossy(&seed);
    assert!(
        seed.contains("wss://10.0.2.2:8250/agent"),
        "loopback core URL not rewritten for the guest"
    );
    assert!(seed.contains("qemu-secret-never-in-ps") && seed.contains("\"public_url\""));
    let log = driver.vm_root.join(&spec.id).join("console.log");
    loop {
        if std::fs::read_to_string(&log).unwrap_or_default().contains(marker) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no boot marker in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("qemu driver: boot to marker {:?}", started.elapsed());
    driver.stop(&spec.id, &placement, false).await.expect("stop");
    assert!(matches!(
        driver.state(&spec.id, &placement).await,
        VmState::Stopped(_)
    ));
    driver.destroy(&spec.id).await.expect("destroy");
    assert!(!driver.vm_root.join(&spec.id).exists());
    let _ = std::fs::remove_dir_all(&tmp);
}
