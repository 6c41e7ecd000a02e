//! Object stores as test servers: s3s-fs (S3 on a directory; checks SigV4 signatures and
//! checksums, keeps its data across restarts), moto (S3 in memory; multipart bookkeeping) and a
//! single-node Swift (tempauth, temp URLs, SLO, container quotas; the `swift` CLI reads objects back),
//! each on a free loopback port, killed when dropped; and boto3 as the independent client that
//! reads objects back. A missing server or client panics with what to install
//! (`scripts/deps.sh test` installs all three).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Access key of the test servers.
pub const ACCESS_KEY: &str = "replica-test";
/// Secret key of the test servers.
pub const SECRET_KEY: &str = "replica-test-secret";

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn wait_listening(addr: &str, what: &str, within: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < within, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// The Python of the venv holding moto and boto3.
pub fn s3_python() -> PathBuf {
    let py = repo_root().join("target/s3-venv/bin/python");
    assert!(
        py.exists(),
        "{} not found: run scripts/deps.sh test (moto, boto3)",
        py.display()
    );
    py
}

/// A running s3s-fs over a directory, restartable on the same port and data.
#[derive(Debug)]
pub struct S3sFs {
    child: Option<Child>,
    /// Where its buckets live (a bucket is a directory).
    pub dir: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
}

impl S3sFs {
    /// Starts s3s-fs on `dir` (created) with [`ACCESS_KEY`] / [`SECRET_KEY`].
    pub fn start(dir: &Path) -> S3sFs {
        std::fs::create_dir_all(dir).expect("s3s-fs directory");
        let port = free_port();
        let mut s = S3sFs {
            child: None,
            dir: dir.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        };
        s.restart();
        s
    }

    /// Starts it again (after [`S3sFs::kill`]) on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.dir)
            .env("RUST_LOG", "s3s_fs=warn,s3s=warn")
            .stdout(Stdio::null())
            // Its log beside its directory, for a failure's post-mortem.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.with_extension("log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .expect("s3s-fs not found: run scripts/deps.sh test (cargo install s3s-fs)");
        self.child = Some(child);
        wait_listening(
            &format!("127.0.0.1:{}", self.port),
            "s3s-fs",
            Duration::from_secs(20),
        );
    }

    /// Freezes it (SIGSTOP): requests in flight hang.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-STOP", &c.id().to_string()]).status();
        }
    }

    /// Kills it (SIGKILL), frozen or not.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Makes a bucket (a directory of the server's).
    pub fn bucket(&self, name: &str) {
        std::fs::create_dir_all(self.dir.join(name)).expect("bucket directory");
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running moto server (S3 in memory, any credentials).
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Moto {
    /// Starts moto_server on a free port.
    pub fn start() -> Moto {
        let port = free_port();
        let bin = repo_root().join("target/s3-venv/bin/moto_server");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/deps.sh test)", bin.display()));
        wait_listening(&format!("127.0.0.1:{port}"), "moto", Duration::from_secs(60));
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What boto3 reads of an object: `None` when there is no such object; else its size, the
/// SHA-256 of the bytes it downloaded and its `sha256` metadata entry.
pub fn boto3_read(endpoint: &str, bucket: &str, key: &str) -> Option<(u64, String, Option<String>)> {
    let script = r#"
import sys, json, hashlib, boto3, botocore
ep, bucket, key, ak, sk = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=ak,
                  aws_secret_access_key=sk,
                  config=botocore.config.Config(s3={"addressing_style": "path"}))
try:
    o = s3.get_object(Bucket=bucket, Key=key)
except botocore.exceptions.ClientError as e:
    if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
        print("null"); sys.exit(0)
    raise
h = hashlib.sha256(); n = 0
for chunk in o["Body"].iter_chunks(1 << 20):
    h.update(chunk); n += len(chunk)
print(json.dumps([n, h.hexdigest(), o.get("Metadata", {}).get("sha256")]))
"#;
    let out = Command::new(s3_python())
        .arg("-c")
        .arg(script)
        .args([endpoint, bucket, key, ACCESS_KEY, SECRET_KEY])
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .expect("boto3");
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("boto3's answer");
    if v.is_null() {
        return None;
    }
    Some((
        v[0].as_u64().expect("size"),
        v[1].as_str().expect("sha256").to_owned(),
        v[2].as_str().map(str::to_owned),
    ))
}

/// Swift's tempauth user of [`Swift`] (`account:user`).
pub const SWIFT_USER: &str = "test:tester";
/// Its key.
pub const SWIFT_KEY: &str = "testing";

/// A single-node OpenStack Swift (Debian's packages: proxy with tempauth, SLO and container
/// quotas; account, container and object servers; a memcached for tokens) on free loopback
/// ports over a directory, stopped when dropped; one-replica rings.
#[derive(Debug)]
pub struct Swift {
    children: Vec<Child>,
    /// `http://127.0.0.1:PORT/auth/v1.0`.
    pub auth_url: String,
    /// Where its configuration, devices and logs live.
    pub dir: PathBuf,
}

impl Swift {
    /// Starts it on `dir` (created); waits until the proxy answers an auth request.
    pub fn start(dir: &Path) -> Swift {
        for bin in ["swift-proxy-server", "swift-ring-builder", "memcached", "swift"] {
            assert!(
                on_path(bin),
                "{bin} not found: run scripts/deps.sh test (Debian's swift packages, memcached)"
            );
        }
        let etc = dir.join("etc");
        let dev = dir.join("srv/d1");
        let log = dir.join("log");
        for d in [&etc, &dev, &log] {
            std::fs::create_dir_all(d).expect("swift dirs");
        }
        let [memc, account, container, object, proxy] = [0; 5].map(|_| free_port());
        let server = |kind: &str, port: u16| {
            format!(
                "[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {port}\nworkers = 0\nuser = root\nswift_dir = {etc}\ndevices = {devs}\nmount_check = false\n\n[pipeline:main]\npipeline = {kind}-server\n\n[app:{kind}-server]\nuse = egg:swift#{kind}\n",
                etc = etc.display(),
                devs = dir.join("srv").display()
            )
        };
        std::fs::write(
            etc.join("swift.conf"),
            "[swift-hash]\nswift_hash_path_prefix = changeme\nswift_hash_path_suffix = changeme\n\n[storage-policy:0]\nname = Policy-0\ndefault = yes\n",
        )
        .expect("swift.conf");
        for (kind, port) in [("account", account), ("container", container), ("object", object)] {
            std::fs::write(etc.join(format!("{kind}-server.conf")), server(kind, port)).expect("conf");
            let builder = etc.join(format!("{kind}.builder"));
            for args in [
                vec!["create".to_owned(), "6".into(), "1".into(), "1".into()],
                vec!["add".into(), format!("r1z1-127.0.0.1:{port}/d1"), "100".into()],
                vec!["rebalance".into()],
            ] {
                let out = Command::new("swift-ring-builder")
                    .arg(&builder)
                    .args(&args)
                    .output()
                    .expect("swift-ring-builder");
                // `rebalance` exits 1 when it only warns.
                assert!(
                    out.status.code().is_some_and(|c| c <= 1),
                    "ring {kind} {args:?}: {out:?}"
                );
            }
        }
        std::fs::write(
            etc.join("proxy-server.conf"),
            format!(
                "[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {proxy}\nworkers = 0\nuser = root\nswift_dir = {etc}\n\n\
                 [pipeline:main]\npipeline = catch_errors proxy-logging cache tempurl tempauth container-quotas slo dlo proxy-logging proxy-server\n\n\
                 [app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n\
                 [filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {SWIFT_KEY} .admin\n\n\
                 [filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{memc}\n\n\
                 [filter:container-quotas]\nuse = egg:swift#container_quotas\n\n\
                 [filter:tempurl]\nuse = egg:swift#tempurl\n\n\
                 [filter:catch_errors]\nuse = egg:swift#catch_errors\n\n[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n\
                 [filter:slo]\nuse = egg:swift#slo\n\n[filter:dlo]\nuse = egg:swift#dlo\n",
                etc = etc.display()
            ),
        )
        .expect("proxy conf");
        let mut children = Vec::new();
        let out = |name: &str| {
            std::fs::File::create(log.join(format!("{name}.log"))).map_or_else(|_| Stdio::null(), Stdio::from)
        };
        children.push(
            Command::new("memcached")
                .args([
                    "-l",
                    "127.0.0.1",
                    "-p",
                    &memc.to_string(),
                    "-U",
                    "0",
                    "-u",
                    "root",
                    "-m",
                    "64",
                ])
                .stdout(Stdio::null())
                .stderr(out("memcached"))
                .spawn()
                .expect("memcached"),
        );
        for kind in ["account", "container", "object", "proxy"] {
            children.push(
                Command::new(format!("swift-{kind}-server"))
                    .arg(etc.join(format!("{kind}-server.conf")))
                    .arg("-v")
                    .stdout(out(kind))
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("swift-{kind}-server: {e} (run scripts/deps.sh test)")),
            );
        }
        let s = Swift {
            children,
            auth_url: format!("http://127.0.0.1:{proxy}/auth/v1.0"),
            dir: dir.to_path_buf(),
        };
        for port in [account, container, object, proxy] {
            wait_listening(&format!("127.0.0.1:{port}"), "swift", Duration::from_secs(60));
        }
        s
    }

    /// Runs the `swift` CLI (python3-swiftclient) with this server's credentials in its
    /// environment; its standard output (it must succeed).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("swift")
            .args(args)
            .env("ST_AUTH", &self.auth_url)
            .env("ST_USER", SWIFT_USER)
            .env("ST_KEY", SWIFT_KEY)
            .output()
            .expect("swift CLI");
        assert!(
            out.status.success(),
            "swift {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `container/key` as the `swift` CLI downloads it, or `None` when there is no such object.
    pub fn read(&self, container: &str, key: &str) -> Option<Vec<u8>> {
        let to = self.dir.join("download");
        let _ = std::fs::remove_file(&to);
        let out = Command::new("swift")
            .args(["download", container, key, "-o"])
            .arg(&to)
            .env("ST_AUTH", &self.auth_url)
            .env("ST_USER", SWIFT_USER)
            .env("ST_KEY", SWIFT_KEY)
            .output()
            .expect("swift CLI");
        if !out.status.success() {
            return None;
        }
        std::fs::read(&to).ok()
    }
}

impl Drop for Swift {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
