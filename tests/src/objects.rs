//! Object stores as test servers: s3s-fs (S3 on a directory; checks SigV4 signatures and
//! checksums, keeps its data across restarts) and moto (S3 in memory; multipart bookkeeping),
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
