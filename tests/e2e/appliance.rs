//! The system VM image (`systemvm-image build`, run by scripts/test.sh before the tests) on real
//! QEMU guests under TCG: core's `qemu` driver deploys it and the agents inside register; the
//! storage VM installs a template into nfs-ganesha on the host; a console opens through the proxy
//! VM; a stop powers the guest off through ACPI; a killed QEMU is restarted by the fleet. The same
//! image under UEFI, the kernel + initramfs pair, and a rebuild that gives the same bytes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use systemvm_core::DriverKind;
use systemvm_core::fleet::qemu::Boot;
use systemvm_tests::http::HttpFixture;

use crate::console::open;
use crate::core_api::{Backend, Core};
use crate::deploy::{KillOnDrop, kill9, vms, wait_fleet};
use crate::fleet::console_works;
use crate::nfs::RestartableGanesha;
use crate::support::{Proxy, VNC_PASSWORD, artifacts, check_page_with, claims, qemu, which, workspace};

/// A scratch directory of this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("systemvm-e2e-appliance-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The image scripts/test.sh builds.
fn image_dir() -> PathBuf {
    let d = workspace().join("target/systemvm-image");
    assert!(
        d.join("manifest.json").is_file() && d.join("systemvm.qcow2").is_file(),
        "{} has no image: run `cargo run -p systemvm-image -- build` (scripts/test.sh does)",
        d.display()
    );
    d
}

fn console_log(core: &Core, vm_id: &str) -> String {
    std::fs::read_to_string(core.dir().join("systemvms").join(vm_id).join("console.log")).unwrap_or_default()
}

/// Polls `check` until it gives `Ok`; on time-out, fails with the last `Err` (the state seen).
async fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<Value, String>,
) -> Value {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) => assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_deploys_the_image_on_qemu_and_its_agents_work() {
    let image = image_dir().join("systemvm.qcow2");
    let nfs = RestartableGanesha::start("appliance");
    let vnc = qemu();
    let _one_at_a_time = crate::libvirt::GUESTS.lock().await;
    let started = Instant::now();
    let mut core = Core::start_with(Backend::Sqlite, |c| {
        c.agent_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.driver = Some(DriverKind::Qemu {
            boot: Boot::Disk { image: image.clone() },
            memory_mib: 256,
        });
    })
    .await;
    let _guard = KillOnDrop(core.dir().display().to_string());
    core.ok(&[
        "updateConfiguration",
        "name=secstorage.allowed.internal.sites",
        "value=10.0.2.2/32",
    ])
    .await;
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=ganesha",
        &format!("url={}", nfs.url),
    ])
    .await;

    // Both VMs boot the image and their agents register with core (TCG, two guests at once).
    let proxy = wait_fleet(&core, "consoleproxy", 1, Duration::from_secs(240)).await;
    let ssvm = wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(240)).await;
    eprintln!(
        "appliance: both system VMs Up {:.1} s after core started",
        started.elapsed().as_secs_f64()
    );
    let proxy_id = proxy[0]["id"].as_str().expect("id").to_owned();
    let ssvm_id = ssvm[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(proxy[0]["hypervisor"], "qemu", "{proxy:?}");
    let log = console_log(&core, &proxy_id);
    assert!(log.contains("] role ConsoleProxy"), "{log}");
    assert!(log.contains("by DHCP"), "{log}");

    // The storage VM installs a template from the host into ganesha's export, over the guest's
    // user network (the host is 10.0.2.2 there).
    let http = HttpFixture::start().expect("http");
    let data = systemvm_tests::images::noise(3 << 20, 7);
    http.file("/t.raw", data.clone());
    let url = http.url("/t.raw").replacen("127.0.0.1", "10.0.2.2", 1);
    let t = core
        .ok(&[
            "registerTemplate",
            "name=from-the-vm",
            "format=RAW",
            "hypervisor=KVM",
            &format!("url={url}"),
            &format!("checksum={{SHA-256}}{}", hex::encode(Sha256::digest(&data))),
        ])
        .await;
    let tid = t["template"][0]["id"].as_str().expect("id").to_owned();
    wait_for(
        "template installed by the storage VM",
        Duration::from_secs(120),
        async || {
            let t = core
                .ok(&["listTemplates", "templatefilter=all", &format!("id={tid}")])
                .await;
            if t["template"][0]["isready"] == true {
                Ok(t)
            } else {
                Err(format!(
                    "{t}\nstorage VM console:\n{}",
                    console_log(&core, &ssvm_id)
                ))
            }
        },
    )
    .await;
    let installed = find_file(&nfs.dir.join("template"), data.len() as u64);
    assert_eq!(
        std::fs::read(&installed).expect("installed file"),
        data,
        "{}",
        installed.display()
    );

    // A console through the proxy VM to a QEMU guest on the host.
    let target = core
        .ok(&[
            "addConsoleTarget",
            "name=e2e-vm",
            "host=10.0.2.2",
            &format!("port={}", vnc.vnc.port()),
            &format!("password={VNC_PASSWORD}"),
        ])
        .await;
    let target = target["consoletarget"]["id"].as_str().expect("id").to_owned();
    console_works(&core, &target).await;

    // A killed QEMU is noticed and the VM restarted; its agent comes back.
    kill9(&ssvm_id);
    wait_for("the storage VM restarted", Duration::from_secs(180), async || {
        let v = vms(&core, "secondarystoragevm").await;
        if v.len() == 1
            && v[0]["id"] == ssvm_id.as_str()
            && v[0]["state"] == "Running"
            && v[0]["agentstate"] == "Up"
        {
            Ok(v[0].clone())
        } else {
            Err(format!("{v:?}"))
        }
    })
    .await;

    // A stop is an ACPI power-off: the init stops the agent and powers the guest off itself.
    let stopped = core.ok(&["stopSystemVm", &format!("id={proxy_id}")]).await;
    assert_eq!(stopped["systemvm"]["state"], "Stopped", "{stopped}");
    let log = console_log(&core, &proxy_id);
    assert!(log.contains("] power button"), "{log}");
    assert!(log.contains("] powering off"), "{log}");
    core.shutdown_with_system_vms().await;
}

/// The file of `len` bytes under `dir` (the installed template).
fn find_file(dir: &Path, len: u64) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.metadata().is_ok_and(|m| m.len() == len) {
                return p;
            }
        }
    }
    panic!("no file of {len} bytes under {}", dir.display());
}

/// A config drive as core writes it, for a console proxy whose core is nowhere (the test reads
/// what the guest's init prints, up to the agent's start).
async fn seed(dir: &Path) -> PathBuf {
    use systemvm_core::fleet::{VmSpec, seed};
    let ca = dir.join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .expect("ca");
    let spec = VmSpec {
        id: "0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b".into(),
        name: "v-uefi-VM".into(),
        role: systemvm_proto::agent::AgentRole::ConsoleProxy,
        zone_id: "z".into(),
        secret: systemvm_proto::Secret::from("not-used"),
        core_urls: vec!["wss://10.0.2.2:9/agent".into()],
        ca,
        store_url: None,
        allow_internal: vec![],
        max_sessions: 1,
    };
    seed::write_seed_iso(dir, &spec, seed::Urls::default())
        .await
        .expect("seed")
}

/// Boots QEMU with `args` until its serial log (`dir/serial.log`) shows `marker`.
fn boot_until(dir: &Path, args: &[String], marker: &str, within: Duration) -> (String, Duration) {
    let bin = which("qemu-system-x86_64").expect("qemu-system-x86_64: run scripts/deps.sh test");
    let log = dir.join("serial.log");
    let mut child = Command::new(bin)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args(["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let start = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(marker) {
            break text;
        }
        if start.elapsed() > within || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no {marker:?} on the serial console within {within:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    (text, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_boots_under_uefi_and_as_a_kernel_pair() {
    let images = image_dir();
    let _one_at_a_time = crate::libvirt::GUESTS.lock().await;
    let tmp = Scratch::new("boots");
    let iso = seed(tmp.path()).await;
    let started = "] agent /opt/systemvm/bin/console-proxy started";
    let cdrom = format!("file={},media=cdrom,readonly=on", iso.display());

    // UEFI (OVMF, q35): systemd-boot → kernel → the read-only root.
    let vars = tmp.path().join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
        .expect("OVMF vars (package ovmf): run scripts/deps.sh test");
    let uefi: Vec<String> = [
        "-machine".into(),
        "q35".into(),
        "-drive".into(),
        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", vars.display()),
        "-drive".into(),
        format!(
            "file={},if=virtio,format=qcow2,snapshot=on",
            images.join("systemvm.qcow2").display()
        ),
        "-drive".into(),
        cdrom.clone(),
    ]
    .into();
    let (log, took) = boot_until(tmp.path(), &uefi, started, Duration::from_secs(120));
    assert!(log.contains("] role ConsoleProxy, VM 0b1e4c4c"), "{log}");
    assert!(
        !log.contains("not-used"),
        "the secret reached the console:\n{log}"
    );
    eprintln!(
        "appliance: UEFI boot to the agent's start in {:.1} s",
        took.as_secs_f64()
    );

    // The kernel pair: everything in RAM, no disk.
    let _ = std::fs::remove_file(tmp.path().join("serial.log"));
    let pair: Vec<String> = [
        "-kernel".into(),
        images.join("vmlinuz").display().to_string(),
        "-initrd".into(),
        images.join("initrd.img").display().to_string(),
        "-append".into(),
        "console=ttyS0 quiet panic=5 systemvm.seed=cidata".into(),
        "-drive".into(),
        cdrom,
    ]
    .into();
    let (log, took) = boot_until(tmp.path(), &pair, started, Duration::from_secs(120));
    assert!(log.contains("by DHCP"), "{log}");
    eprintln!(
        "appliance: kernel-pair boot to the agent's start in {:.1} s",
        took.as_secs_f64()
    );
}

#[test]
fn a_rebuild_from_the_same_inputs_gives_the_same_bytes() {
    let images = image_dir();
    let tmp = Scratch::new("rebuild");
    let built: Value =
        serde_json::from_str(&std::fs::read_to_string(images.join("manifest.json")).expect("manifest"))
            .expect("json");
    let agents = PathBuf::from(
        built["agents"]
            .as_str()
            .expect("the manifest names the agents' directory"),
    );
    let out = tmp.path().join("again");
    let st = Command::new(workspace().join("target/debug/systemvm-image"))
        .current_dir(workspace())
        .arg("build")
        .arg("--out")
        .arg(&out)
        .arg("--agents")
        .arg(&agents)
        .arg("--cache")
        .arg(workspace().join("target/systemvm-image-cache"))
        .stdout(Stdio::null())
        .status()
        .expect("systemvm-image (cargo build -p systemvm-image)");
    assert!(st.success());
    let manifest = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).expect("manifest"))
            .expect("json")
    };
    let (a, b) = (manifest(&images), manifest(&out));
    assert_eq!(a["inputs"], b["inputs"], "different inputs: {a} {b}");
    assert_eq!(a["files"], b["files"], "same inputs, different outputs");
    let qcow2 = std::fs::metadata(images.join("systemvm.qcow2"))
        .expect("image")
        .len();
    assert!(qcow2 <= 32 << 20, "the image is {qcow2} bytes, more than 32 MiB");
}

/// The demo guest (`systemvm-image demo`) under QEMU with a password-protected VNC server; its
/// serial port in a file. Killed when dropped.
struct DemoGuest {
    child: std::process::Child,
    vnc: std::net::SocketAddr,
    serial: PathBuf,
}

impl DemoGuest {
    fn boot(tmp: &Scratch) -> DemoGuest {
        let st = Command::new(workspace().join("target/debug/systemvm-image"))
            .current_dir(workspace())
            .args(["demo", "--out"])
            .arg(tmp.path())
            .arg("--cache")
            .arg(workspace().join("target/systemvm-image-cache"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("systemvm-image (cargo build -p systemvm-image)");
        assert!(st.success(), "systemvm-image demo failed");
        let secret = tmp.path().join("vnc.secret");
        std::fs::write(&secret, VNC_PASSWORD).expect("secret");
        let display = (40..99)
            .find(|d| std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok())
            .expect("a free VNC display");
        let vnc: std::net::SocketAddr = format!("127.0.0.1:{}", 5900 + display).parse().expect("addr");
        let serial = tmp.path().join("serial.log");
        let bin = which("qemu-system-x86_64").expect("qemu-system-x86_64: run scripts/deps.sh test");
        let mut child = Command::new(bin)
            .args([
                "-accel",
                "tcg",
                "-m",
                "128",
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-net",
                "none",
            ])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(tmp.path().join("demo-vmlinuz"))
            .arg("-initrd")
            .arg(tmp.path().join("demo-initrd.img"))
            .args(["-append", "console=tty1 quiet panic=5"])
            .arg("-object")
            .arg(format!("secret,id=vncpw,file={}", secret.display()))
            .arg("-vnc")
            .arg(format!("127.0.0.1:{display},password-secret=vncpw"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu");
        let start = Instant::now();
        while std::net::TcpStream::connect(vnc).is_err() {
            assert!(child.try_wait().ok().flatten().is_none(), "QEMU exited");
            assert!(start.elapsed() < Duration::from_secs(20), "no VNC server");
            std::thread::sleep(Duration::from_millis(100));
        }
        DemoGuest { child, vnc, serial }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

impl Drop for DemoGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_guest_takes_typing_through_the_proxy() {
    let tmp = Scratch::new("demo");
    let _one_at_a_time = crate::libvirt::GUESTS.lock().await;
    let guest = DemoGuest::boot(&tmp);
    // Typing through the proxy, as noVNC sends keys: the shell on the VGA console runs the
    // command, and its output (the shell's arithmetic) lands on the serial port.
    let proxy = Proxy::start().await;
    let token = proxy
        .keys
        .seal(&claims(guest.vnc, Some(VNC_PASSWORD)))
        .expect("token");
    let mut rfb = open(&proxy.ws_url(&token), None).await;
    rfb.handshake().await.expect("handshake through the proxy");
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        rfb.type_text(&format!("echo typed-$((6*7))-{n} >/dev/ttyS0\n"))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let out = guest.serial();
        if out.contains("typed-42-") {
            eprintln!(
                "appliance: the demo guest ran a typed command {:.1} s after its VNC server was up",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the typed command never ran; serial: {out}"
        );
    }
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_guest_takes_typing_from_novnc_in_chromium() {
    let tmp = Scratch::new("demo-browser");
    let _one_at_a_time = crate::libvirt::GUESTS.lock().await;
    let guest = DemoGuest::boot(&tmp);
    let proxy = Proxy::start().await;
    let shot = artifacts().join("demo-guest-typed.png");
    // The stock noVNC page in Chromium; the text is typed into its canvas (lower case only:
    // `/dev/serial` is the guest's name for its serial port). Until the shell is up the keys
    // go nowhere, so the page is opened again (a new one-time link) until the command ran.
    let start = Instant::now();
    loop {
        let token = proxy
            .keys
            .seal(&claims(guest.vnc, Some(VNC_PASSWORD)))
            .expect("token");
        let url = proxy.page_url(&token);
        let shot = shot.clone();
        let check = tokio::task::spawn_blocking(move || {
            check_page_with(
                &url,
                &shot,
                "connected",
                &[],
                &["--type", "cp /etc/motd /dev/serial"],
            )
        })
        .await
        .expect("browser check");
        assert_eq!(check.report["state"], "connected", "{:?}", check.report);
        if guest.serial().contains("Mold demo guest") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the command typed in noVNC never ran; serial: {}",
            guest.serial()
        );
    }
    proxy.running.shutdown().await;
}
