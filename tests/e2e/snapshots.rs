//! Snapshot backups through `cs` against real components: a QEMU guest run by a real libvirtd
//! whose qcow2 disk (a boot sector that prints a marker on the serial port, and known data) lives
//! on a primary pool (an nfs-ganesha export, mounted where KVM hosts mount pools:
//! `/mnt/<pool id>/`); the image store is another ganesha export; the storage VM is a process.
//! `createSnapshot` of the running guest reads about the allocated bytes (libvirt pull-mode
//! backup, NBD), a second after ~1 % changed reads about that 1 % (incremental, dirty bitmap);
//! `createVolume` from each is `qemu-img compare`-identical to the disk at that moment and boots;
//! `revertSnapshot` is refused while the guest runs and restores the disk once it is stopped; a
//! snapshot of the stopped guest is read from the pool through NFS; deletion keeps an image a
//! later snapshot builds on; policies are created, updated in place, listed and deleted. Faults:
//! the storage VM killed mid-backup (the backup resumes on its restart), the NBD export
//! vanishing (a clean failure, no image, the next incremental still complete). A policy keeping
//! two, run three times by the backup runner, keeps the newest two.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::core_api::{Backend, Core};
use crate::deploy::{KillOnDrop, wait_fleet};
use crate::libvirt::{Domains, URI, libvirtd};
use crate::nfs::RestartableGanesha;
use crate::support::errorcode;

/// A boot sector that writes `msg` to COM1 and halts.
fn boot_sector(msg: &str) -> Vec<u8> {
    let mut s = vec![
        0xFA, 0x31, 0xC0, 0x8E, 0xD8, 0xBE, 0x1A, 0x7C, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE,
        0xEB, 0xF8, 0xF4, 0xEB, 0xFD, 0x90, 0x90, 0x90, 0x90,
    ];
    s.extend_from_slice(msg.as_bytes());
    s.extend_from_slice(b"\r\n\0");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &Path, ops: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for op in ops {
        c.args(["-c", op]);
    }
    run(c.arg(img));
}

fn identical(a: &Path, b: &Path) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b));
}

/// Boots `disk` under QEMU (TCG) until `marker` is on its serial port.
fn boots(disk: &Path, marker: &str) {
    let log = disk.with_extension("serial.log");
    let _ = std::fs::remove_file(&log);
    let mut q = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc,accel=tcg",
            "-m",
            "64",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=virtio,readonly=on",
            disk.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64: run scripts/deps.sh test");
    let started = Instant::now();
    let seen = loop {
        if std::fs::read_to_string(&log).unwrap_or_default().contains(marker) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = q.kill();
    let _ = q.wait();
    assert!(seen, "{} did not boot to {marker:?}", disk.display());
}

fn id(v: &Value, key: &str) -> String {
    v[key]["id"].as_str().expect("id").to_owned()
}

fn n(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| v.as_str().and_then(|s| s.parse().ok()).expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_volumes_back_up_in_full_then_incrementally_and_restore_byte_identical() {
    libvirtd();
    let _one_at_a_time = crate::libvirt::GUESTS.lock().await;
    let sec = RestartableGanesha::start("snap-sec");
    let pri = RestartableGanesha::start("snap-pri");
    let driver = systemvm_core::fleet::libvirt::LibvirtDriver::guests_only(URI);
    let shared: std::sync::Arc<dyn systemvm_core::fleet::Driver> = std::sync::Arc::new(driver.clone());
    let core = Core::start_with(Backend::Sqlite, |c| {
        c.agent_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.driver = Some(systemvm_core::DriverKind::Process);
        c.guest_drivers = vec![shared];
    })
    .await;
    let _guard = KillOnDrop(core.dir().display().to_string());
    let zone = core.ok(&["listZones"]).await["zone"][0]["id"]
        .as_str()
        .expect("zone")
        .to_owned();
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=snap-store",
        &format!("url={}", sec.url),
        &format!("zoneid={zone}"),
    ])
    .await;
    let pool = id(
        &core
            .ok(&[
                "createStoragePool",
                "name=snap-primary",
                &format!("url={}", pri.url),
                &format!("zoneid={zone}"),
            ])
            .await,
        "storagepool",
    );
    // The KVM host's mount of the pool.
    let mount = PathBuf::from(format!("/mnt/{pool}"));
    std::os::unix::fs::symlink(&pri.dir, &mount).expect("mount point of the pool");
    struct Unlink(PathBuf);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unlink = Unlink(mount.clone());
    // libvirt's QEMU (libvirt-qemu) must reach the disk through every parent directory.
    let mut d = pri.dir.clone();
    while d.starts_with(std::env::temp_dir()) && d != std::env::temp_dir() {
        let _ = Command::new("chmod").arg("755").arg(&d).status();
        d = d.parent().expect("parent").to_path_buf();
    }
    wait_fleet(&core, "secondarystoragevm", 1, Duration::from_secs(60)).await;

    // The guest's 1 GiB disk: a boot sector and 32 MiB of known data; references of the disk
    // at each snapshot, made the same way.
    let marker = "snapshot-guest-booted";
    let disk = pri.dir.join("guest.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("1G"));
    let sector = core.dir().join("boot.bin");
    std::fs::write(&sector, boot_sector(marker)).expect("boot sector");
    qemu_io(
        &disk,
        &[
            &format!("write -s {} 0 512", sector.display()),
            "write -P 0x5a 64M 32M",
        ],
    );
    let refs = core.dir().join("refs");
    std::fs::create_dir_all(&refs).expect("refs");
    let (ref1, ref2) = (refs.join("ref1.qcow2"), refs.join("ref2.qcow2"));
    std::fs::copy(&disk, &ref1).expect("ref1");
    std::fs::copy(&disk, &ref2).expect("ref2");
    qemu_io(&ref2, &["write -P 0xcc 300M 10M"]);

    let guest = format!("snap-guest-{}", std::process::id());
    let _domains = Domains(vec![guest.clone()]);
    let serial = pri.dir.join("guest-serial.log");
    let xml = format!(
        "<domain type='qemu'><name>{guest}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><features><acpi/></features><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}/guest.qcow2'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='file'><source path='{}'/></serial>\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices></domain>",
        mount.display(),
        serial.display()
    );
    let xml_path = core.dir().join("guest.xml");
    std::fs::write(&xml_path, xml).expect("guest xml");
    driver
        .virsh(&["define", &xml_path.display().to_string()])
        .await
        .expect("define");
    driver.virsh(&["start", &guest]).await.expect("start");
    let target = core
        .ok(&[
            "addConsoleTarget",
            "name=snap-vm",
            &format!("hypervisorvm={guest}"),
        ])
        .await;
    let vm = target["consoletarget"]["id"].as_str().expect("vm").to_owned();

    // The guest's disk is a volume on the pool.
    let vols = core.ok(&["listVolumes", &format!("virtualmachineid={vm}")]).await;
    let vol = &vols["volume"][0];
    assert_eq!(
        (
            vol["type"].as_str(),
            vol["path"].as_str(),
            vol["storageid"].as_str()
        ),
        (Some("ROOT"), Some("guest.qcow2"), Some(pool.as_str())),
        "{vols}"
    );
    assert_eq!(n(&vol["size"]), 1 << 30);
    let volume = vol["id"].as_str().expect("volume").to_owned();

    // Full: about the allocated 32 MiB (and the boot sector's cluster), not 1 GiB.
    let s1 = core
        .ok(&["createSnapshot", &format!("volumeid={volume}"), "name=s1"])
        .await;
    let s1v = &s1["snapshot"];
    assert_eq!(
        (s1v["state"].as_str(), s1v["intervaltype"].as_str()),
        (Some("BackedUp"), Some("MANUAL")),
        "{s1}"
    );
    let read1 = n(&s1v["bytesread"]);
    assert!(
        (32 << 20..=33 << 20).contains(&read1),
        "full backup read {read1} bytes"
    );
    assert_eq!(n(&s1v["virtualsize"]), 1 << 30);
    let s1 = id(&s1, "snapshot");

    // ~1 % of the disk changes while the guest runs; the incremental reads that.
    driver
        .virsh(&[
            "qemu-monitor-command",
            &guest,
            "--hmp",
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P 0xcc 300M 10M\"",
        ])
        .await
        .expect("write into the running guest's disk");
    let s2 = core.ok(&["createSnapshot", &format!("volumeid={volume}")]).await;
    let read2 = n(&s2["snapshot"]["bytesread"]);
    assert_eq!(read2, 10 << 20, "the incremental read {read2} bytes");
    assert!(
        s2["snapshot"]["name"]
            .as_str()
            .expect("name")
            .starts_with(&format!("{guest}_")),
        "{s2}"
    );
    let s2 = id(&s2, "snapshot");
    let listed = core.ok(&["listSnapshots", &format!("volumeid={volume}")]).await;
    assert_eq!(listed["count"], 2, "{listed}");
    assert_eq!(listed["snapshot"][0]["id"], s2.as_str(), "newest first");

    // A volume from each snapshot: the disk at that moment, and it boots.
    for (snap, reference) in [(&s1, &ref1), (&s2, &ref2)] {
        let v = core
            .ok(&["createVolume", &format!("snapshotid={snap}"), "name=restored"])
            .await;
        assert_eq!(v["volume"]["snapshotid"], snap.as_str(), "{v}");
        assert_eq!(v["volume"]["storageid"], pool.as_str());
        let file = pri.dir.join(v["volume"]["path"].as_str().expect("path"));
        identical(&file, reference);
        boots(&file, marker);
    }

    // Revert: refused while the guest runs, then the disk as it was at s1.
    let o = core.cs(&["revertSnapshot", &format!("id={s1}")]).await;
    assert_eq!(errorcode(&o.json), Some(431), "{o:?}");
    assert!(o.json.to_string().contains("not in the shutdown state"), "{o:?}");
    let os = core.ok(&["listOsTypes"]).await["ostype"][0]["id"]
        .as_str()
        .expect("an OS type")
        .to_owned();
    let from_volume = [
        "createTemplate".to_owned(),
        "name=from-volume".to_owned(),
        format!("ostypeid={os}"),
        format!("volumeid={volume}"),
    ];
    let from_volume: Vec<&str> = from_volume.iter().map(String::as_str).collect();
    let o = core.cs(&from_volume).await;
    assert_eq!(errorcode(&o.json), Some(431), "a running guest's volume: {o:?}");
    let o = core
        .cs(&[
            "extractVolume",
            &format!("id={volume}"),
            &format!("zoneid={zone}"),
            "mode=HTTP_DOWNLOAD",
        ])
        .await;
    assert_eq!(errorcode(&o.json), Some(431), "a running guest's volume: {o:?}");

    // A template from a snapshot: on the image store with its template.properties, ready,
    // the disk at that moment.
    let t = core
        .ok(&[
            "createTemplate",
            "name=from-s2",
            "displaytext=the guest at s2",
            &format!("ostypeid={os}"),
            &format!("snapshotid={s2}"),
        ])
        .await;
    let tv = &t["template"];
    assert_eq!(
        (
            tv["isready"].as_bool(),
            tv["format"].as_str(),
            tv["ostypeid"].as_str()
        ),
        (Some(true), Some("QCOW2"), Some(os.as_str())),
        "{t}"
    );
    let tid = tv["id"].as_str().expect("template id").to_owned();
    let tdir = walk(&sec.dir)
        .into_iter()
        .find(|p| p.ends_with(format!("{tid}/{tid}.qcow2")))
        .unwrap_or_else(|| panic!("no image of template {tid}"));
    identical(&tdir, &ref2);
    let props = std::fs::read_to_string(tdir.with_file_name("template.properties")).expect("properties");
    assert!(
        props.contains(&format!("id={tid}")) && props.contains("qcow2=true"),
        "{props}"
    );
    let listed = core
        .ok(&["listTemplates", "templatefilter=self", &format!("id={tid}")])
        .await;
    assert_eq!(listed["template"][0]["isready"], true, "{listed}");
    let o = core
        .cs(&["createTemplate", "name=x", &format!("ostypeid={os}")])
        .await;
    assert_eq!(errorcode(&o.json), Some(431), "neither source: {o:?}");

    driver.virsh(&["destroy", &guest]).await.expect("stop the guest");
    let r = core.ok(&["revertSnapshot", &format!("id={s1}")]).await;
    assert_eq!(r["snapshot"]["id"], s1.as_str(), "{r}");
    identical(&disk, &ref1);

    // The stopped guest's volume: a template of it, and a download link of it.
    let t = core.ok(&from_volume).await;
    let tid = t["template"]["id"].as_str().expect("template id").to_owned();
    let timg = walk(&sec.dir)
        .into_iter()
        .find(|p| p.ends_with(format!("{tid}/{tid}.qcow2")))
        .unwrap_or_else(|| panic!("no image of template {tid}"));
    identical(&timg, &ref1);
    let e = core
        .ok(&[
            "extractVolume",
            &format!("id={volume}"),
            &format!("zoneid={zone}"),
            "mode=HTTP_DOWNLOAD",
        ])
        .await;
    assert_eq!(e["volume"]["state"], "DOWNLOAD_URL_CREATED", "{e}");
    let url = e["volume"]["url"].as_str().expect("url");
    let got = crate::uploads::request(url, "GET", &[], b"", None).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let downloaded = core.dir().join("extracted.qcow2");
    std::fs::write(&downloaded, &got.body).expect("write the download");
    identical(&downloaded, &ref1);

    // The stopped guest's disk is read from the pool through NFS: its data clusters.
    let s3 = core
        .ok(&["createSnapshot", &format!("volumeid={volume}"), "name=s3"])
        .await;
    let read3 = n(&s3["snapshot"]["bytesread"]);
    assert!(
        (32 << 20..=33 << 20).contains(&read3),
        "file backup read {read3} bytes"
    );
    let s3 = id(&s3, "snapshot");

    // Deleting s1, which s2 builds on: hidden, its image kept; deleting s2 removes both.
    let file_of = |snap: &str| {
        walk(&sec.dir).into_iter().find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy() == format!("{snap}.qcow2"))
        })
    };
    assert!(file_of(&s1).is_some() && file_of(&s2).is_some());
    core.ok(&["deleteSnapshot", &format!("id={s1}")]).await;
    let left = core.ok(&["listSnapshots", &format!("volumeid={volume}")]).await;
    assert_eq!(left["count"], 2, "{left}");
    assert!(file_of(&s1).is_some(), "s2 builds on s1's image");
    core.ok(&["deleteSnapshot", &format!("id={s2}")]).await;
    assert!(
        file_of(&s1).is_none() && file_of(&s2).is_none(),
        "both images gone"
    );
    core.ok(&["deleteSnapshot", &format!("id={s3}")]).await;
    assert!(
        core.ok(&["listSnapshots", &format!("volumeid={volume}")])
            .await
            .get("snapshot")
            .is_none()
    );
    let o = core.cs(&["deleteSnapshot", &format!("id={s3}")]).await;
    assert_eq!(errorcode(&o.json), Some(431), "{o:?}");

    // Policies: CloudStack's shapes and refusals; one per interval (created again: updated).
    let p = core
        .ok(&[
            "createSnapshotPolicy",
            &format!("volumeid={volume}"),
            "intervaltype=DAILY",
            "schedule=30:02",
            "timezone=Asia/Seoul",
            "maxsnaps=3",
        ])
        .await;
    assert_eq!(
        (
            p["snapshotpolicy"]["intervaltype"].as_u64(),
            p["snapshotpolicy"]["maxsnaps"].as_u64()
        ),
        (Some(1), Some(3)),
        "{p}"
    );
    let again = core
        .ok(&[
            "createSnapshotPolicy",
            &format!("volumeid={volume}"),
            "intervaltype=daily",
            "schedule=00:04",
            "timezone=UTC",
            "maxsnaps=2",
        ])
        .await;
    assert_eq!(
        again["snapshotpolicy"]["id"], p["snapshotpolicy"]["id"],
        "{again}"
    );
    for bad in [
        ["intervaltype=WEEKLY", "schedule=0:1:8", "maxsnaps=2"],
        ["intervaltype=HOURLY", "schedule=5", "maxsnaps=9"],
        ["intervaltype=YEARLY", "schedule=5", "maxsnaps=1"],
    ] {
        let mut args = vec![
            "createSnapshotPolicy".to_owned(),
            format!("volumeid={volume}"),
            "timezone=UTC".into(),
        ];
        args.extend(bad.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = core.cs(&refs).await;
        assert_eq!(errorcode(&o.json), Some(431), "{bad:?}: {o:?}");
    }
    let listed = core
        .ok(&["listSnapshotPolicies", &format!("volumeid={volume}")])
        .await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["snapshotpolicy"][0]["schedule"], "00:04");
    let pid = id(&p, "snapshotpolicy");
    core.ok(&["deleteSnapshotPolicies", &format!("id={pid}")]).await;
    assert!(
        core.ok(&["listSnapshotPolicies", &format!("volumeid={volume}")])
            .await
            .get("snapshotpolicy")
            .is_none()
    );

    // Faults, with the guest running again and backups held to 4 MiB/s so each lasts seconds.
    driver
        .virsh(&["start", &guest])
        .await
        .expect("start the guest again");
    core.ok(&[
        "updateConfiguration",
        "name=snapshot.backup.rate",
        &format!("value={}", 4 << 20),
    ])
    .await;
    let ssvm = crate::deploy::vms(&core, "secondarystoragevm").await[0]["id"]
        .as_str()
        .expect("storage VM")
        .to_owned();
    let find = |suffix: &'static str| {
        let dir = sec.dir.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(60);
            while !walk(&dir).iter().any(|p| p.to_string_lossy().ends_with(suffix)) {
                assert!(Instant::now() < until, "no {suffix} file in the store");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let no_job = || async {
        let info = driver.virsh(&["domjobinfo", &guest]).await.expect("domjobinfo");
        assert!(info.contains("None"), "the backup job was not ended: {info}");
    };

    // The storage VM killed mid-backup: the fleet restarts it, core sends the backup again,
    // the agent continues its image from its journal (it reads less than the whole), and the
    // snapshot restores identical.
    let args = [
        "createSnapshot".to_owned(),
        format!("volumeid={volume}"),
        "name=s4".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (s4, ()) = tokio::join!(core.cs(&args), async {
        // A few of the 4 MiB blocks committed, then the kill.
        find(".part.journal").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        crate::deploy::kill9(&ssvm);
    });
    assert!(s4.ok, "{}\n{}", s4.stderr, s4.json);
    let read4 = n(&s4.json["snapshot"]["bytesread"]);
    assert!(
        read4 > 0 && read4 <= 28 << 20,
        "the resumed backup read {read4} bytes (the whole is 32 MiB)"
    );
    no_job().await;
    let s4 = id(&s4.json, "snapshot");
    let v = core
        .ok(&["createVolume", &format!("snapshotid={s4}"), "name=after-kill"])
        .await;
    identical(&pri.dir.join(v["volume"]["path"].as_str().expect("path")), &ref1);
    assert!(
        !walk(&sec.dir)
            .iter()
            .any(|p| p.to_string_lossy().contains(".part")),
        "no part file is left"
    );

    // The NBD export vanishing mid-backup (the host's job aborted): a clear failure, nothing
    // that looks complete, and the checkpoint it made gone, so the next incremental still
    // covers every change since s4.
    driver
        .virsh(&[
            "qemu-monitor-command",
            &guest,
            "--hmp",
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P 0x77 500M 16M\"",
        ])
        .await
        .expect("write into the running guest's disk");
    let ref3 = refs.join("ref3.qcow2");
    std::fs::copy(&ref1, &ref3).expect("ref3");
    qemu_io(&ref3, &["write -P 0x77 500M 16M"]);
    let args = [
        "createSnapshot".to_owned(),
        format!("volumeid={volume}"),
        "name=s5".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (s5, ()) = tokio::join!(core.cs(&args), async {
        find(".part").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        driver
            .virsh(&["domjobabort", &guest])
            .await
            .expect("abort the backup job");
    });
    assert!(!s5.ok, "{}", s5.json);
    let listed = core
        .ok(&["listSnapshots", &format!("volumeid={volume}"), "name=s5"])
        .await;
    let s5v = &listed["snapshot"][0];
    assert_eq!(s5v["state"], "Error", "{listed}");
    let s5 = s5v["id"].as_str().expect("id").to_owned();
    assert!(file_of(&s5).is_none(), "no image of the failed snapshot");
    assert!(
        !walk(&sec.dir)
            .iter()
            .any(|p| p.to_string_lossy().contains(".part")),
        "no part file is left"
    );
    let checkpoints = driver
        .virsh(&["checkpoint-list", &guest, "--name"])
        .await
        .expect("checkpoints");
    assert!(!checkpoints.contains(&s5), "{checkpoints}");
    no_job().await;
    core.ok(&["updateConfiguration", "name=snapshot.backup.rate", "value=0"])
        .await;
    let s6 = core
        .ok(&["createSnapshot", &format!("volumeid={volume}"), "name=s6"])
        .await;
    assert_eq!(n(&s6["snapshot"]["bytesread"]), 16 << 20, "{s6}");
    let s6 = id(&s6, "snapshot");
    let v = core
        .ok(&["createVolume", &format!("snapshotid={s6}"), "name=after-abort"])
        .await;
    identical(&pri.dir.join(v["volume"]["path"].as_str().expect("path")), &ref3);
    core.ok(&["deleteSnapshot", &format!("id={s5}")]).await;

    // A policy keeping two, made due three times: each run takes a RECURRING snapshot through
    // the runner, and retention leaves the newest two (the oldest gone from the list).
    let policy = core
        .ok(&[
            "createSnapshotPolicy",
            &format!("volumeid={volume}"),
            "intervaltype=HOURLY",
            "schedule=0",
            "timezone=UTC",
            "maxsnaps=2",
        ])
        .await;
    let policy = id(&policy, "snapshotpolicy");
    let db = core.db().await;
    let recurring = || async {
        let l = core
            .ok(&[
                "listSnapshots",
                &format!("volumeid={volume}"),
                "snapshottype=RECURRING",
            ])
            .await;
        l.get("snapshot")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut taken: Vec<String> = Vec::new();
    for run in 1..=3 {
        sqlx::query("UPDATE snapshot_policies SET next_run_ms = 0 WHERE id = $1")
            .bind(policy.clone())
            .execute(&db.pool)
            .await
            .expect("make the policy due");
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let l = recurring().await;
            let fresh = l
                .iter()
                .find(|s| !taken.iter().any(|t| s["id"] == t.as_str()) && s["state"] == "BackedUp");
            let expected = run.min(2);
            if let Some(f) = fresh
                && l.len() == expected
            {
                assert_eq!(f["intervaltype"], "HOURLY", "{f}");
                taken.push(f["id"].as_str().expect("id").to_owned());
                break;
            }
            assert!(Instant::now() < until, "run {run} of the policy: {l:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let kept: Vec<String> = recurring()
        .await
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(!kept.contains(&taken[0]), "the oldest is gone: {kept:?}");
    assert!(
        kept.contains(&taken[1]) && kept.contains(&taken[2]),
        "{kept:?} {taken:?}"
    );
    // The newest of the chain restores identical to the disk now (the guest writes nothing).
    let v = core
        .ok(&[
            "createVolume",
            &format!("snapshotid={}", taken[2]),
            "name=from-policy",
        ])
        .await;
    identical(&pri.dir.join(v["volume"]["path"].as_str().expect("path")), &ref3);
    core.ok(&["deleteSnapshotPolicies", &format!("id={policy}")])
        .await;
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
