//! The storage VM's NBD client against a real server: `qemu-nbd` exporting a qcow2 image with
//! known data and a persistent dirty bitmap (what libvirt's pull-mode backup exports are). The
//! allocation map and the dirty extents must be exactly what was written, reads byte-exact.
//! A missing qemu-nbd fails the test (scripts/deps.sh installs qemu-utils).

use std::process::Command;
use std::time::Duration;

use ssvm_agent::nbd::NbdClient;
use systemvm_nbd::{STATE_DIRTY, STATE_HOLE};
use systemvm_tests::nbd::{QemuNbd, run};

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `qemu-nbd` serving `img` as `vda` with bitmap `b0`.
fn serve(img: &std::path::Path) -> (QemuNbd, String) {
    let s = QemuNbd::serve(img);
    let addr = s.addr.clone();
    (s, addr)
}

#[tokio::test]
async fn reads_allocation_dirty_extents_and_data_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    // Before the bitmap: 2 MiB at 1 MiB and 64 KiB at 40 MiB; after it: 128 KiB at 20 MiB.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xaa 1M 2M",
            "-c",
            "write -P 0xbb 40M 64k",
        ])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xcc 20M 128k"])
        .arg(&img));
    let (_server, addr) = serve(&img);

    let timeout = Duration::from_secs(10);
    let mut c = NbdClient::connect(
        &addr,
        "vda",
        &["base:allocation", "qemu:dirty-bitmap:b0"],
        timeout,
    )
    .await
    .unwrap();
    assert_eq!(c.export().size, 64 * MIB);
    assert!(c.export().structured);
    let size = c.export().size;

    let alloc = c.extents("base:allocation", 0, size).await.unwrap();
    let total: u64 = alloc.iter().map(|e| e.1).sum();
    assert_eq!(total, size, "{alloc:?}");
    let data: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|e| e.2 & STATE_HOLE == 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        data,
        [(MIB, 2 * MIB), (20 * MIB, 128 << 10), (40 * MIB, 64 << 10)],
        "{alloc:?}"
    );

    let dirty: Vec<(u64, u64)> = c
        .extents("qemu:dirty-bitmap:b0", 0, size)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.2 & STATE_DIRTY != 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(dirty, [(20 * MIB, 128 << 10)]);

    // Reads: data byte-exact, holes as zeroes, across the edge of an allocated extent.
    let a = c.read(MIB, 2 * MIB as u32).await.unwrap();
    assert!(a.iter().all(|b| *b == 0xaa));
    let edge = c.read(3 * MIB - 4096, 8192).await.unwrap();
    assert!(edge[..4096].iter().all(|b| *b == 0xaa) && edge[4096..].iter().all(|b| *b == 0));
    let hole = c.read(50 * MIB, 1 << 16).await.unwrap();
    assert!(hole.iter().all(|b| *b == 0));
    let max = c.export().max_read();
    assert!(c.read(0, max + 1).await.is_err(), "over the server's block size");
    assert!(c.read(size, 1).await.is_err(), "past the end");
    c.disconnect().await;

    // An unknown bitmap is refused at the handshake with the server's reason.
    let e = NbdClient::connect(&addr, "vda", &["qemu:dirty-bitmap:nope"], timeout)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("context"), "{e:#}");
    let e = NbdClient::connect(&addr, "nope", &[], timeout).await.unwrap_err();
    assert!(e.to_string().contains("refused"), "{e:#}");
}

/// `qemu-img compare` of two images (each with its backing chain): identical contents.
fn identical(a: &std::path::Path, b: &std::path::Path) {
    run(Command::new("qemu-img").arg("compare").arg(a).arg(b));
}

#[tokio::test]
async fn snapshot_backups_copy_allocated_then_dirty_extents_into_qcow2_chains() {
    use ssvm_agent::snapshot::{Extents, backup};
    use ssvm_agent::store::{Store, StoreOptions};

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1G"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -P 0x22 700M 1M",
            "-c",
            "write -P 0x33 1023M 1M",
        ])
        .arg(&img));
    let store_dir = dir.path().join("secondary");
    std::fs::create_dir_all(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display()).parse().unwrap();
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    let snaps = "snapshots/2/vol-1";

    // Full: the 5 MiB allocated, not the 1 GiB disk.
    let first = dir.path().join("first.qcow2");
    std::fs::copy(&img, &first).unwrap();
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    let (server, addr) = serve(&img);
    let spec = |extents, name: &str| ssvm_agent::snapshot::BackupSpec {
        nbd: addr.clone(),
        export: "vda".into(),
        extents,
        dir: snaps.into(),
        name: name.into(),
        max_rate: None,
    };
    let full = backup(&store, &spec(Extents::Allocated, "s1.qcow2"))
        .await
        .unwrap();
    assert_eq!(full.virtual_size, 1 << 30);
    assert_eq!(full.bytes_read, 5 * MIB, "{full:?}");
    let full_path = store_dir.join(&full.file);
    run(Command::new("qemu-img").arg("check").arg(&full_path));
    identical(&full_path, &first);
    let on_disk = std::fs::read(&full_path).unwrap();
    assert_eq!(on_disk.len() as u64, full.physical_size);
    assert_eq!(
        hex::encode(sha2::Digest::finalize(
            <sha2::Sha256 as sha2::Digest>::new_with_prefix(&on_disk)
        )),
        full.sha256
    );
    assert!(full.physical_size < 6 * MIB, "{full:?}");
    drop(server);

    // About 1 % changes (10 MiB of the 1 GiB); the incremental reads only that, over s1.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1M 64k",
            "-c",
            "write -P 0x55 200M 10M",
        ])
        .arg(&img));
    let (_server, addr2) = serve(&img);
    let mut inc_spec = spec(
        Extents::Dirty {
            context: "qemu:dirty-bitmap:b0".into(),
            backing: "s1.qcow2".into(),
        },
        "s2.qcow2",
    );
    inc_spec.nbd = addr2;
    let inc = backup(&store, &inc_spec).await.unwrap();
    assert_eq!(inc.bytes_read, 10 * MIB + (64 << 10), "{inc:?}");
    let inc_path = store_dir.join(&inc.file);
    run(Command::new("qemu-img").arg("check").arg(&inc_path));
    identical(&inc_path, &img);
    // The first snapshot still restores the disk as it was.
    identical(&full_path, &first);
    assert!(!store_dir.join(format!("{}.part", inc.file)).exists());

    // An export that is not there: a clear failure, nothing left that looks like a snapshot.
    let mut gone = spec(Extents::Allocated, "s3.qcow2");
    gone.nbd = format!("127.0.0.1:{}", free_port());
    let e = backup(&store, &gone).await.unwrap_err();
    assert!(format!("{e:#}").contains("failed to"), "{e:#}");
    assert!(!store_dir.join(snaps).join("s3.qcow2").exists());
    assert!(!store_dir.join(snaps).join("s3.qcow2.part").exists());
}

#[tokio::test]
async fn an_interrupted_backup_continues_from_its_journal_to_the_same_image() {
    use ssvm_agent::snapshot::{Extents, backup};
    use ssvm_agent::store::{Store, StoreOptions};

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("256M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 0 8M",
            "-c",
            "write -P 0x62 100M 8M",
        ])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    let store_dir = dir.path().join("secondary");
    std::fs::create_dir_all(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display()).parse().unwrap();
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    let (_server, addr) = serve(&img);
    let spec = |name: &str, max_rate| ssvm_agent::snapshot::BackupSpec {
        nbd: addr.clone(),
        export: "vda".into(),
        extents: Extents::Allocated,
        dir: "snapshots/2/v".into(),
        name: name.into(),
        max_rate,
    };
    let whole = backup(&store, &spec("whole.qcow2", None)).await.unwrap();
    assert_eq!(whole.resumed, 0);

    // 16 MiB at 4 MiB/s: stopped after 2.5 s, as a storage VM killed mid-backup stops.
    let slow = spec("s1.qcow2", Some(4 * MIB));
    let cut = tokio::time::timeout(Duration::from_millis(2500), backup(&store, &slow)).await;
    assert!(cut.is_err(), "the backup finished before it was interrupted");
    let journal = store_dir.join("snapshots/2/v/s1.qcow2.part.journal");
    assert!(journal.exists(), "no journal after 2.5 s");
    assert!(!store_dir.join("snapshots/2/v/s1.qcow2").exists());

    let again = backup(&store, &spec("s1.qcow2", None)).await.unwrap();
    assert!(again.resumed >= 4 * MIB, "{again:?}");
    assert!(again.bytes_read < 16 * MIB, "read again: {again:?}");
    assert_eq!(
        again.sha256, whole.sha256,
        "the same image as an uninterrupted backup"
    );
    let path = store_dir.join(&again.file);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(store_dir.join(&whole.file)).unwrap()
    );
    run(Command::new("qemu-img").arg("check").arg(&path));
    identical(&path, &img);
    assert!(!journal.exists() && !store_dir.join("snapshots/2/v/s1.qcow2.part").exists());

    // A journal for another layout (the disk changed) is not trusted: the backup starts over.
    let stale = spec("s2.qcow2", Some(4 * MIB));
    let _ = tokio::time::timeout(Duration::from_millis(2500), backup(&store, &stale)).await;
    drop(_server);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x63 200M 1M"])
        .arg(&img));
    let (_server2, addr2) = serve(&img);
    let mut fresh = spec("s2.qcow2", None);
    fresh.nbd = addr2;
    let b = backup(&store, &fresh).await.unwrap();
    assert_eq!((b.resumed, b.bytes_read), (0, 17 * MIB), "{b:?}");
    identical(&store_dir.join(&b.file), &img);
}
