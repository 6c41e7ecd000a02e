//! The ssvm-agent store against a real NFSv3 server: nfs-ganesha (VFS back end) on loopback, with
//! `scripts/fake_rpcbind.py` as the portmapper it registers with at startup.
//!
//! One ganesha serves the whole test binary ([`ganesha`]). Tests that use it hold [`NFS_LOCK`]:
//! the hung-server test stops ganesha (SIGSTOP), which would time out any other test's calls.
//! Ganesha and the stub die with the test process, however it ends (see [`start_ganesha`]).
//! A ganesha that cannot be installed or started fails the tests with the reason; none is skipped.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ssvm_agent::store::{Bytes, DirEntry, Health, Metadata, Store, StoreError, StoreOptions, StoreUrl};

use crate::support::{which, workspace};

/// Serialises the tests that use ganesha (one of them stops it for a while).
pub(crate) static NFS_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The NFS server shared by this test binary.
pub(crate) struct Ganesha {
    /// The store URL of its export: `nfs://127.0.0.1:PORT/export?mountport=M`.
    pub(crate) url: String,
    /// The exported directory on disk.
    pub(crate) dir: PathBuf,
    /// ganesha's log file.
    log: PathBuf,
    pid: u32,
    _guard: Child,
}

impl Ganesha {
    /// Stops the server process (SIGSTOP): its sockets stay open but nothing answers.
    pub(crate) fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub(crate) fn resume(&self) {
        self.signal("CONT");
    }

    /// Pauses until the returned guard is dropped (also when a test panics).
    pub(crate) fn paused(&self) -> Paused<'_> {
        self.pause();
        Paused(self)
    }

    fn signal(&self, name: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {}", self.pid))
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// The store URL, parsed.
    pub(crate) fn store_url(&self) -> StoreUrl {
        self.url.parse().expect("ganesha's store url")
    }

    /// Opens a store on the export.
    pub(crate) async fn open(&self, opts: StoreOptions) -> Store {
        match Store::open(&self.store_url(), opts).await {
            Ok(store) => store,
            Err(e) => panic!("cannot open {}: {e}\nganesha log:\n{}", self.url, self.log_tail()),
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

/// Resumes ganesha when dropped.
pub(crate) struct Paused<'a>(&'a Ganesha);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("(no log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The ganesha shared by every test of this binary, started on first use.
pub(crate) fn ganesha() -> &'static Ganesha {
    static GANESHA: OnceLock<Ganesha> = OnceLock::new();
    GANESHA.get_or_init(start_ganesha)
}

/// Two distinct free loopback ports.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    (port(&a), port(&b))
}

/// Whether a process is gone (or a zombie nobody waited for yet).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("zombie")),
        Err(_) => true,
    }
}

fn start_ganesha() -> Ganesha {
    let bin = which("ganesha.nfsd").unwrap_or_else(|| {
        panic!("ganesha.nfsd not found: run scripts/deps.sh test (packages nfs-ganesha nfs-ganesha-vfs)")
    });
    let base = std::env::temp_dir().join(format!("systemvm-e2e-ganesha-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("export");
    std::fs::create_dir_all(&dir).expect("create the export directory");
    let (nfs_port, mount_port) = free_ports();
    let (conf, log, pid_file) = (
        base.join("ganesha.conf"),
        base.join("ganesha.log"),
        base.join("ganesha.pid"),
    );
    let config = format!(
        "NFS_CORE_PARAM {{ Protocols = 3; NFS_Port = {nfs_port}; MNT_Port = {mount_port}; Bind_Addr = 127.0.0.1; \
         Enable_NLM = false; Enable_RQUOTA = false; mount_path_pseudo = true; }}\n\
         NFS_KRB5 {{ Active_krb5 = false; }}\n\
         EXPORT {{ Export_Id = 1; Path = {dir}; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash; \
         SecType = sys; Protocols = 3; Transports = TCP; FSAL {{ Name = VFS; }} }}\n",
        dir = dir.display(),
    );
    std::fs::write(&conf, config).expect("write ganesha.conf");
    let stub = workspace().join("scripts/fake_rpcbind.py");
    // ganesha registers with the portmapper through /run/rpcbind.sock at startup; the stub answers
    // there (or finds another run's stub answering and exits). The shell prints ganesha's pid, then
    // kills ganesha and the stub and removes the temporary directory when this test process ends
    // (its stdin pipe closes), however it ends.
    let script = format!(
        "python3 {stub} >>{base}/rpcbind.log 2>&1 & r=$!\n\
         i=0; while [ ! -S /run/rpcbind.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n\
         {bin} -F -L {log} -f {conf} -p {pid_file} -N NIV_EVENT >>{log} 2>&1 & g=$!\n\
         echo $g\n\
         read _ignored; kill $g; kill -CONT $g; wait $g; kill $r 2>/dev/null; wait $r; rm -rf {base}\n",
        stub = stub.display(),
        base = base.display(),
        bin = bin.display(),
        log = log.display(),
        conf = conf.display(),
        pid_file = pid_file.display(),
    );
    let mut guard = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("failed to start sh for ganesha");
    let mut line = String::new();
    BufReader::new(guard.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read ganesha's pid");
    let pid: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("ganesha's pid, not {line:?}"));
    let start = Instant::now();
    for port in [mount_port, nfs_port] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                !is_dead(pid),
                "ganesha.nfsd exited at startup (are we root?); its log:\n{}",
                log_tail(&log)
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "ganesha did not listen on {addr} within 20 s; its log:\n{}",
                log_tail(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ganesha {
        url: format!("nfs://127.0.0.1:{nfs_port}/export?mountport={mount_port}"),
        dir,
        log,
        pid,
        _guard: guard,
    }
}

/// Pseudo-random bytes (xorshift), different per seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_store_writes_64_mib_concurrently_and_reads_it_back() {
    let g = ganesha();
    let _serial = NFS_LOCK.lock().await;
    let _ = std::fs::remove_dir_all(g.dir.join("big"));
    let store = g.open(StoreOptions::default()).await;
    assert_eq!(store.url().to_string(), g.url);

    store.create_dir_all("big/t1").await.unwrap();
    let file = store.create("big/t1/data.bin").await.unwrap();
    let data = Bytes::from(pattern(64 * MIB, 1));
    let mut tasks = tokio::task::JoinSet::new();
    // 1 MiB pieces from 64 tasks at once, in no particular order.
    for i in (0..64).map(|i| (i * 37) % 64) {
        let (store, file, piece) = (store.clone(), file.clone(), data.slice(i * MIB..(i + 1) * MIB));
        tasks.spawn(async move { store.write_at(&file, (i * MIB) as u64, piece).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    store.flush(&file).await.unwrap();

    let back = store.read_at(&file, 0, 64 * MIB).await.unwrap();
    assert!(back == data, "read back differs");
    let on_disk = std::fs::read(g.dir.join("big/t1/data.bin")).unwrap();
    assert!(on_disk == data, "file on disk differs");
    // Unaligned, across pieces; short at the end of the file; empty past it.
    let mid = store
        .read_at(&file, (3 * MIB + 123) as u64, 2 * MIB + 7)
        .await
        .unwrap();
    assert!(mid == data.slice(3 * MIB + 123..5 * MIB + 130));
    let tail = store.read_at(&file, (64 * MIB - 5) as u64, MIB).await.unwrap();
    assert!(tail == data.slice(64 * MIB - 5..));
    assert!(
        store
            .read_at(&file, (65 * MIB) as u64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.metadata("big/t1/data.bin").await.unwrap(),
        Some(Metadata {
            is_dir: false,
            size: (64 * MIB) as u64
        })
    );

    store.rename("big/t1/data.bin", "big/t1/final.bin").await.unwrap();
    assert_eq!(store.metadata("big/t1/data.bin").await.unwrap(), None);
    assert_eq!(
        store.list_dir("big/t1").await.unwrap(),
        vec![DirEntry {
            name: "final.bin".into(),
            is_dir: false,
            size: (64 * MIB) as u64
        }]
    );
    let big = store.list_dir("big").await.unwrap();
    assert_eq!(big.len(), 1);
    assert!(big[0].name == "t1" && big[0].is_dir, "{big:?}");
    assert!(
        store
            .list_dir("")
            .await
            .unwrap()
            .iter()
            .any(|e| e.name == "big" && e.is_dir)
    );
    let (reopened, size) = store.open_file("big/t1/final.bin").await.unwrap();
    assert_eq!(size, (64 * MIB) as u64);
    assert!(store.read_at(&reopened, 0, 16).await.unwrap() == data.slice(..16));

    let cap = store.capacity().await.unwrap();
    assert!(
        cap.total > 0 && cap.available <= cap.total && cap.used <= cap.total,
        "{cap:?}"
    );

    store.remove_file("big/t1/final.bin").await.unwrap();
    assert_eq!(store.metadata("big/t1/final.bin").await.unwrap(), None);
    store.remove_dir("big/t1").await.unwrap();
    assert!(!g.dir.join("big/t1").exists());
    assert_eq!(store.health(), Health::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_store_small_files_listing_and_errors() {
    let g = ganesha();
    let _serial = NFS_LOCK.lock().await;
    let _ = std::fs::remove_dir_all(g.dir.join("small"));
    let store = g.open(StoreOptions::default()).await;

    store.create_dir_all("small/props").await.unwrap();
    store.create_dir_all("small/props").await.unwrap();
    let props = "small/props/template.properties";
    store
        .write_file_atomic(props, b"filename=a.qcow2\n")
        .await
        .unwrap();
    assert_eq!(store.read_file(props, 1024).await.unwrap(), b"filename=a.qcow2\n");
    store
        .write_file_atomic(props, b"filename=b.qcow2\nsize=1\n")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(g.dir.join(props)).unwrap(),
        b"filename=b.qcow2\nsize=1\n",
        "replaced on disk"
    );
    match store.read_file(props, 10).await {
        Err(StoreError::TooLarge {
            size: 24, max: 10, ..
        }) => {}
        other => panic!("expected TooLarge: {other:?}"),
    }
    let names: Vec<String> = store
        .list_dir("small/props")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["template.properties"], "no temporary file is left");

    // Rename replaces an existing target.
    store.write_file_atomic("small/a.txt", b"aaa").await.unwrap();
    store.write_file_atomic("small/b.txt", b"bb").await.unwrap();
    store.rename("small/a.txt", "small/b.txt").await.unwrap();
    assert_eq!(store.read_file("small/b.txt", 10).await.unwrap(), b"aaa");
    // Across directories.
    store.rename("small/b.txt", "small/props/b.txt").await.unwrap();
    assert!(store.metadata("small/props/b.txt").await.unwrap().is_some());

    // Enough long names that listing takes more than one READDIRPLUS reply.
    store.create_dir_all("small/many").await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..600 {
        let store = store.clone();
        tasks.spawn(async move {
            let file = store
                .create(&format!("small/many/{i:04}-{}", "x".repeat(100)))
                .await?;
            store.write_at(&file, 0, Bytes::from(vec![7u8; i % 3])).await?;
            store.flush(&file).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    let many = store.list_dir("small/many").await.unwrap();
    assert_eq!(many.len(), 600);
    for (i, entry) in many.iter().enumerate() {
        assert_eq!(entry.name, format!("{i:04}-{}", "x".repeat(100)));
        assert_eq!((entry.is_dir, entry.size), (false, (i % 3) as u64));
    }

    let not_found = [
        store.open_file("small/nope").await.unwrap_err(),
        store.remove_file("small/nope").await.unwrap_err(),
        store.read_file("small/nope", 10).await.unwrap_err(),
        store.create("small/nodir/x").await.unwrap_err(),
        store.rename("small/nope", "small/x").await.unwrap_err(),
        store.list_dir("small/nope").await.unwrap_err(),
        store.remove_dir("small/nope").await.unwrap_err(),
    ];
    for e in not_found {
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        let message = e.to_string();
        assert!(
            message.starts_with(&g.url) && message.contains("not found"),
            "{message}"
        );
    }
    assert_eq!(store.metadata("small/nope").await.unwrap(), None);
    assert!(matches!(
        store.metadata(&format!("{props}/x")).await,
        Err(StoreError::NotADirectory { .. })
    ));
    assert!(matches!(
        store.create_dir_all(&format!("{props}/x")).await,
        Err(StoreError::NotADirectory { .. })
    ));
    assert!(matches!(
        store.open_file("small/props").await,
        Err(StoreError::IsADirectory { .. })
    ));
    assert!(matches!(
        store.create("/abs").await,
        Err(StoreError::InvalidPath { .. })
    ));
    assert!(matches!(
        store.list_dir("small/..").await,
        Err(StoreError::InvalidPath { .. })
    ));
    assert_eq!(
        store.health(),
        Health::Healthy,
        "answers like not-found are no failures"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_store_open_reports_why_it_cannot_connect() {
    let g = ganesha();
    let _serial = NFS_LOCK.lock().await;
    let StoreUrl::Nfs { port, mount_port, .. } = g.store_url() else {
        panic!("not nfs")
    };
    let mount_port = mount_port.expect("mountport");

    // A host name works as well as an address.
    let by_name: StoreUrl = format!("nfs://localhost:{port}/export?mountport={mount_port}")
        .parse()
        .unwrap();
    let store = Store::open(&by_name, StoreOptions::default()).await.unwrap();
    assert!(store.capacity().await.unwrap().total > 0);

    let cases = [
        (
            format!("nfs://127.0.0.1:{port}/no-such-export?mountport={mount_port}"),
            "/no-such-export",
        ),
        (
            format!("nfs://127.0.0.1:{port}/export?mountport=1"),
            "mount port 1",
        ),
    ];
    for (url, what) in cases {
        let url: StoreUrl = url.parse().unwrap();
        let start = Instant::now();
        match Store::open(&url, StoreOptions::default()).await {
            Err(e @ StoreError::Connect { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(what) && message.contains("cannot connect"),
                    "{message}"
                );
            }
            other => panic!("{url}: expected a connect error, got {other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{url}: took {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_store_hung_server_times_out_then_recovers() {
    let g = ganesha();
    let _serial = NFS_LOCK.lock().await;
    let opts = StoreOptions {
        op_timeout: Duration::from_secs(2),
        connections: 2,
        ..StoreOptions::default()
    };
    let store = g.open(opts).await;
    store.create_dir_all("hung").await.unwrap();
    let file = store.create("hung/f.bin").await.unwrap();
    let data = Bytes::from(pattern(2 * MIB, 9));
    store.write_at(&file, 0, data.slice(..MIB)).await.unwrap();
    store.flush(&file).await.unwrap();

    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    {
        let _paused = g.paused();
        let start = Instant::now();
        let err = store
            .write_at(&file, MIB as u64, data.slice(MIB..))
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert!(err.is_timeout(), "expected a timeout: {err:?}");
        assert!(err.to_string().contains("timed out after 2s"), "{err}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
            "took {took:?}"
        );
        match store.health() {
            Health::Unhealthy { error, since } => {
                assert!(error.contains("timed out"), "{error}");
                assert!(since.elapsed().unwrap_or_default() < Duration::from_secs(10));
            }
            Health::Healthy => panic!("still healthy while the server hangs"),
        }
        let ticked = ticks.load(Ordering::Relaxed);
        assert!(
            ticked >= 10,
            "the runtime stalled: {ticked} ticks of 100 ms in {took:?}"
        );
        // The stuck connection was dropped; a new one hangs as well, and times out as well.
        let err = store.metadata("hung/f.bin").await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(!store.health().is_healthy());
    }
    // Resumed: the next call succeeds on a fresh connection and the store is healthy again.
    store
        .write_at(&file, MIB as u64, data.slice(MIB..))
        .await
        .unwrap();
    assert_eq!(store.health(), Health::Healthy);
    store.flush(&file).await.unwrap();
    assert!(store.read_at(&file, 0, 2 * MIB).await.unwrap() == data);
    ticker.abort();
    store.remove_file("hung/f.bin").await.unwrap();
}

/// A private nfs-ganesha (its own export, ports and process) that a test may stop and start
/// again on the same export: a real server restart, so unstable writes get a new write verifier.
/// Stopped (and its directory removed) when dropped; its guard shell also ends it with the test
/// process, however that ends.
pub(crate) struct RestartableGanesha {
    /// The store URL of its export.
    pub(crate) url: String,
    /// The exported directory on disk.
    pub(crate) dir: PathBuf,
    base: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    ports: (u16, u16),
    running: std::sync::Mutex<Option<(u32, Child)>>,
}

impl RestartableGanesha {
    /// Starts one, named `name` (the directory is per test process).
    pub(crate) fn start(name: &str) -> RestartableGanesha {
        // The shared server brings up the portmapper stub this one registers with too.
        let _ = ganesha();
        let bin = which("ganesha.nfsd").expect("ganesha.nfsd not found: run scripts/deps.sh test");
        let base = std::env::temp_dir().join(format!("systemvm-e2e-ganesha-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("export");
        std::fs::create_dir_all(&dir).expect("create the export directory");
        let (nfs_port, mount_port) = free_ports();
        let conf = base.join("ganesha.conf");
        let config = format!(
            "NFS_CORE_PARAM {{ Protocols = 3; NFS_Port = {nfs_port}; MNT_Port = {mount_port}; Bind_Addr = 127.0.0.1; \
             Enable_NLM = false; Enable_RQUOTA = false; mount_path_pseudo = true; }}\n\
             NFS_KRB5 {{ Active_krb5 = false; }}\n\
             EXPORT {{ Export_Id = 1; Path = {dir}; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash; \
             SecType = sys; Protocols = 3; Transports = TCP; FSAL {{ Name = VFS; }} }}\n",
            dir = dir.display(),
        );
        std::fs::write(&conf, config).expect("write ganesha.conf");
        let g = RestartableGanesha {
            url: format!("nfs://127.0.0.1:{nfs_port}/export?mountport={mount_port}"),
            dir,
            log: base.join("ganesha.log"),
            base,
            bin,
            conf,
            ports: (nfs_port, mount_port),
            running: std::sync::Mutex::new(None),
        };
        g.launch();
        g
    }

    fn launch(&self) {
        let script = format!(
            "{bin} -F -L {log} -f {conf} -p {pid} -N NIV_EVENT >>{log} 2>&1 & g=$!\n\
             echo $g\n\
             read _ignored; kill $g 2>/dev/null; kill -CONT $g 2>/dev/null; wait $g\n",
            bin = self.bin.display(),
            log = self.log.display(),
            conf = self.conf.display(),
            pid = self.base.join("ganesha.pid").display(),
        );
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("failed to start sh for ganesha");
        let mut line = String::new();
        BufReader::new(guard.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read ganesha's pid");
        let pid: u32 = line.trim().parse().expect("ganesha's pid");
        let start = Instant::now();
        for port in [self.ports.1, self.ports.0] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(
                    !is_dead(pid),
                    "ganesha.nfsd exited at startup; its log:\n{}",
                    log_tail(&self.log)
                );
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "ganesha did not listen on {addr} within 30 s; its log:\n{}",
                    log_tail(&self.log)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        *self.running.lock().expect("lock") = Some((pid, guard));
    }

    /// Stops the server process (SIGTERM, SIGKILL after 20 s) and waits until it is gone.
    fn stop(&self) {
        let Some((pid, guard)) = self.running.lock().expect("lock").take() else {
            return;
        };
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let start = Instant::now();
        while !is_dead(pid) {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its guard shell reaps it and ends (stdin closes).
        drop(guard);
    }

    /// Stops the server process (SIGSTOP) until the returned guard is dropped (SIGCONT), also
    /// when a test panics: its sockets stay open but nothing answers.
    pub(crate) fn paused(&self) -> PausedRestartable<'_> {
        self.signal("STOP");
        PausedRestartable(self)
    }

    fn signal(&self, name: &str) {
        let pid = self.running.lock().expect("lock").as_ref().map(|(pid, _)| *pid);
        let pid = pid.expect("ganesha is not running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Stops the server and starts it again on the same export and ports.
    pub(crate) fn restart(&self) {
        self.stop();
        // ganesha's write verifier is its start time in seconds: a restart within the same second
        // would keep it (no real server comes back that fast).
        std::thread::sleep(Duration::from_millis(1100));
        self.launch();
    }

    /// Opens a store on the export.
    pub(crate) async fn open(&self, opts: StoreOptions) -> Store {
        let url: StoreUrl = self.url.parse().expect("store url");
        match Store::open(&url, opts).await {
            Ok(store) => store,
            Err(e) => panic!(
                "cannot open {}: {e}\nganesha log:\n{}",
                self.url,
                log_tail(&self.log)
            ),
        }
    }
}

/// Resumes a paused [`RestartableGanesha`] when dropped.
pub(crate) struct PausedRestartable<'a>(&'a RestartableGanesha);

impl Drop for PausedRestartable<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

impl Drop for RestartableGanesha {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_server_restart_before_commit_is_reported_and_rewritten() {
    let _serial = NFS_LOCK.lock().await;
    let g = RestartableGanesha::start("restart-store");
    let opts = StoreOptions {
        op_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    let store = g.open(opts).await;
    store.create_dir_all("r").await.unwrap();
    let file = store.create("r/f.bin").await.unwrap();
    let data = Bytes::from(pattern(4 * MIB, 21));
    store.write_at(&file, 0, data.slice(..2 * MIB)).await.unwrap();
    store.flush(&file).await.unwrap();
    // Unstable writes, then the server restarts before they are committed.
    store
        .write_at(&file, 2 * MIB as u64, data.slice(2 * MIB..))
        .await
        .unwrap();
    g.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        match store.flush(&file).await {
            // A connection error first (the old connection was closed) is fine; the COMMIT on a
            // new connection must then say what happened.
            Err(StoreError::Rpc { .. } | StoreError::Connect { .. } | StoreError::Timeout { .. })
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other,
        }
    };
    match err {
        Err(e @ StoreError::ServerRestarted { .. }) => {
            assert!(e.to_string().contains("rewritten"), "{e}");
        }
        other => panic!("expected ServerRestarted after the restart, got {other:?}"),
    }
    // Rewritten from the last good flush, then committed: the file is whole.
    store
        .write_at(&file, 2 * MIB as u64, data.slice(2 * MIB..))
        .await
        .unwrap();
    store.flush(&file).await.unwrap();
    assert!(store.read_at(&file, 0, 4 * MIB).await.unwrap() == data);
    assert!(std::fs::read(g.dir.join("r/f.bin")).unwrap() == data);
    // And a flush with nothing outstanding is fine.
    store.flush(&file).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_store_reads_a_small_file_that_is_replaced_meanwhile() {
    let g = ganesha();
    let _serial = NFS_LOCK.lock().await;
    let store = g.open(StoreOptions::default()).await;
    store.create_dir_all("replaced").await.unwrap();
    let path = "replaced/record.json";
    let body = |i: usize| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(3000 + i % 7));
    store.write_file_atomic(path, body(0).as_bytes()).await.unwrap();
    // Another agent replaces the record (atomic rename) while this one reads it: on NFS the
    // handle the reader looked up goes stale; the read is retried, never failed or torn.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 1..=150 {
                store.write_file_atomic(path, body(i).as_bytes()).await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let data = store
            .read_file(path, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("read {reads}: {e}"));
        let text = String::from_utf8(data).unwrap();
        let n: usize = text["{\"n\":".len()..text.find(',').unwrap()].parse().unwrap();
        assert_eq!(text, body(n), "a torn read");
        reads += 1;
    }
    writer.await.unwrap();
    assert!(reads > 10, "only {reads} reads");
    store.remove_file(path).await.unwrap();
    store.remove_dir("replaced").await.unwrap();
}
