//! The core's CloudStack-compatible API driven by the real `cs` CLI (PyPI `cs` 5.2.0 in
//! `target/cs-venv`, installed by `scripts/deps.sh test`) and by raw HTTP for what `cs` cannot
//! send (tampered signatures, login cookies, oversized requests). Every scenario runs against both
//! backends: SQLite in a temp dir, and PostgreSQL from Debian's packages as a throwaway cluster
//! started once per test binary and stopped when the test process exits.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use systemvm_core::signing::{Encoding, sign, string_to_sign};
use systemvm_core::{CoreConfig, RunningCore};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{wait_port, workspace};

#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

// === PostgreSQL throwaway cluster ===

struct Postgres {
    port: u16,
    bin: PathBuf,
    _guard: Child,
}

fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(start_postgres)
}

fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("PostgreSQL missing ({e}): run scripts/deps.sh test (package postgresql)"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let v = versions
        .last()
        .expect("no PostgreSQL version under /usr/lib/postgresql: run scripts/deps.sh test");
    let bin = root.join(v.to_string()).join("bin");
    assert!(bin.join("initdb").is_file(), "{} has no initdb", bin.display());
    bin
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Runs `cmd` through `sh`, as the `postgres` user when we are root (PostgreSQL refuses root).
fn as_pg(cmd: &str) -> Command {
    let mut c = Command::new("sh");
    if is_root() {
        c.args(["-c", &format!("su postgres -s /bin/sh -c \"{cmd}\"")]);
    } else {
        c.args(["-c", cmd]);
    }
    c
}

fn start_postgres() -> Postgres {
    let bin = pg_bin();
    let dir = std::env::temp_dir().join(format!("systemvm-e2e-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        let ok = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "chown of {} to postgres failed", dir.display());
    }
    let data = dir.join("data");
    let out = as_pg(&format!(
        "{}/initdb -D {} -A trust -U postgres --no-sync -E UTF8",
        bin.display(),
        data.display()
    ))
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = format!(
        "{bin}/pg_ctl -D {data} -o '-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off' -l {dir}/log -w start",
        bin = bin.display(),
        data = data.display(),
        dir = dir.display()
    );
    let stop = format!("{}/pg_ctl -D {} -m immediate stop", bin.display(), data.display());
    let (start_cmd, stop_cmd) = if is_root() {
        (
            format!("su postgres -s /bin/sh -c \"{start}\""),
            format!("su postgres -s /bin/sh -c \"{stop}\""),
        )
    } else {
        (start, stop)
    };
    // The shell stops the cluster and removes its files when this test process ends (its stdin
    // pipe closes), however it ends.
    let guard = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{start_cmd} >&2 || exit 1; read _ignored; {stop_cmd} >/dev/null 2>&1; rm -rf {}",
            dir.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(30),
        &format!("PostgreSQL (log: {}/log)", dir.display()),
    );
    Postgres {
        port,
        bin,
        _guard: guard,
    }
}

/// A fresh database on the shared cluster; returns its URL.
pub(crate) fn postgres_database() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let pg = postgres();
    let name = format!(
        "core_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    // Concurrent CREATE DATABASE can fail transiently (template1 in use): retry a few times.
    let mut out = None;
    for attempt in 0..5 {
        let o = Command::new(pg.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        if o.status.success() {
            out = None;
            break;
        }
        out = Some(o);
        std::thread::sleep(std::time::Duration::from_millis(200 * (attempt + 1)));
    }
    if let Some(o) = out {
        panic!("CREATE DATABASE failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    format!("postgres://postgres@127.0.0.1:{}/{name}", pg.port)
}

// === The core under test ===

/// A core started in process on a temporary data dir (removed when dropped), with its root admin keys.
pub(crate) struct Core {
    running: Option<RunningCore>,
    config: CoreConfig,
    pub(crate) key: String,
    pub(crate) secret: String,
    dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `cs` did.
#[derive(Debug)]
pub(crate) struct CsOut {
    pub(crate) ok: bool,
    pub(crate) json: Value,
    pub(crate) stderr: String,
}

/// A raw HTTP answer.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) json: Value,
}

impl Raw {
    pub(crate) fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

pub(crate) fn cs_bin() -> PathBuf {
    let bin = workspace().join("target/cs-venv/bin/cs");
    assert!(
        bin.is_file(),
        "{} missing: run scripts/deps.sh test",
        bin.display()
    );
    bin
}

pub(crate) fn enc(v: &str) -> String {
    systemvm_core::signing::encode_value(v, Encoding::Java)
}

impl Core {
    pub(crate) async fn start(backend: Backend) -> Core {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a core after `adjust` changed its configuration.
    pub(crate) async fn start_with(backend: Backend, adjust: impl FnOnce(&mut CoreConfig)) -> Core {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "systemvm-e2e-core-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = CoreConfig::new(&dir);
        config.listen = "127.0.0.1:0".parse().unwrap();
        if let Backend::Postgres = backend {
            config.database_url = Some(tokio::task::spawn_blocking(postgres_database).await.unwrap());
        }
        adjust(&mut config);
        let running = systemvm_core::start(config.clone())
            .await
            .expect("core failed to start");
        // A second core on an existing database writes no credentials: its caller sets the keys.
        let creds: Value = std::fs::read_to_string(&running.credentials_path)
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or_default();
        Core {
            running: Some(running),
            config,
            key: creds["apikey"].as_str().unwrap_or_default().to_owned(),
            secret: creds["secretkey"].as_str().unwrap_or_default().to_owned(),
            dir: TempDir(dir),
        }
    }

    pub(crate) fn running(&self) -> &RunningCore {
        self.running.as_ref().unwrap()
    }

    /// The data dir.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Stops the core, then every system VM it manages (the fleet manager first, so nothing restarts).
    pub(crate) async fn shutdown_with_system_vms(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown_with_system_vms().await;
        }
    }

    /// Stops the core as a crash would (no lease release, no clean close).
    pub(crate) async fn crash(&mut self) {
        if let Some(r) = self.running.take() {
            r.abort().await;
        }
    }

    /// Stops and starts the core again on the same data dir, database and agent port.
    pub(crate) async fn restart(&mut self) {
        let old = self.running.take().unwrap();
        if old.agent_addr.is_some() {
            self.config.agent_listen = old.agent_addr;
        }
        old.shutdown().await;
        self.running = Some(
            systemvm_core::start(self.config.clone())
                .await
                .expect("core failed to restart"),
        );
    }

    /// `cs` as the root admin, GET.
    pub(crate) async fn cs(&self, args: &[&str]) -> CsOut {
        self.cs_as(&self.key.clone(), &self.secret.clone(), false, args)
            .await
    }

    /// `cs` with the given keys (empty = unsigned), GET or POST.
    pub(crate) async fn cs_as(&self, key: &str, secret: &str, post: bool, args: &[&str]) -> CsOut {
        self.cs_at(&self.running().api_url(), key, secret, post, args)
            .await
    }

    async fn cs_at(&self, endpoint: &str, key: &str, secret: &str, post: bool, args: &[&str]) -> CsOut {
        let mut c = tokio::process::Command::new(cs_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir())
            .env("CLOUDSTACK_ENDPOINT", endpoint)
            .env("CLOUDSTACK_POLL_INTERVAL", "0.1")
            .env("CLOUDSTACK_TIMEOUT", "30");
        if !key.is_empty() {
            c.env("CLOUDSTACK_KEY", key).env("CLOUDSTACK_SECRET", secret);
        }
        if post {
            c.arg("--post");
        }
        let out = c.args(args).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        CsOut {
            ok: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `cs` with another account's keys: (success, JSON printed).
    pub(crate) async fn cs_with(&self, key: &str, secret: &str, args: &[&str]) -> (bool, Value) {
        let o = self.cs_as(key, secret, false, args).await;
        (o.ok, o.json)
    }

    /// `cs` as the root admin: (success, JSON printed).
    pub(crate) async fn cs_raw(&self, args: &[&str]) -> (bool, Value) {
        let o = self.cs(args).await;
        (o.ok, o.json)
    }

    /// `cs` that must succeed; returns its JSON.
    pub(crate) async fn ok(&self, args: &[&str]) -> Value {
        let o = self.cs(args).await;
        assert!(o.ok, "cs {args:?} failed: {}\n{}", o.stderr, o.json);
        o.json
    }

    /// A query string with `params` signed by `key`/`secret` the way CloudStack verifies it.
    fn signed(params: &[(&str, &str)], key: &str, secret: &str, encoding: Encoding) -> String {
        let mut all: Vec<(String, String)> = params
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        all.push(("apiKey".into(), key.into()));
        all.push(("response".into(), "json".into()));
        let sig = sign(secret, &string_to_sign(&all, encoding));
        all.push(("signature".into(), sig));
        all.iter()
            .map(|(n, v)| format!("{}={}", enc(n), enc(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// One raw HTTP/1.1 request to `/client/api`.
    pub(crate) async fn raw(&self, method: &str, query: &str, body: &[u8], cookie: Option<&str>) -> Raw {
        let mut s = tokio::net::TcpStream::connect(self.running().addr).await.unwrap();
        let mut head = format!(
            "{method} /client/api?{query} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if method == "POST" {
            head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        if let Some(c) = cookie {
            head.push_str(&format!("Cookie: {c}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // The server may answer (and close) before reading a refused body: ignore write errors.
        let _ = s.write_all(body).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let (status, headers, body) = crate::support::parse_response(&buf);
        Raw {
            status,
            headers,
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        }
    }

    /// A GET signed with the root admin's keys, sent raw; returns (status, JSON).
    pub(crate) async fn signed_get(&self, params: &[(&str, &str)]) -> (u16, Value) {
        let q = Self::signed(params, &self.key, &self.secret, Encoding::Java);
        let r = self.raw("GET", &q, b"", None).await;
        (r.status, r.json)
    }

    /// Logs `user` in as the web UI does (POST `login`); returns the cookie header and the
    /// session key.
    pub(crate) async fn login(&self, user: &str, password: &str) -> (String, String) {
        let body = format!(
            "command=login&username={}&password={}&domain=%2F&response=json",
            enc(user),
            enc(password)
        );
        let r = self.raw("POST", "", body.as_bytes(), None).await;
        assert_eq!(r.status, 200, "{}", r.json);
        let key = r.json["loginresponse"]["sessionkey"].as_str().unwrap().to_owned();
        let jsession = r
            .header("set-cookie")
            .iter()
            .find_map(|c| c.strip_prefix("JSESSIONID="))
            .and_then(|c| c.split(';').next())
            .unwrap()
            .to_owned();
        (format!("JSESSIONID={jsession}; sessionkey={key}"), key)
    }

    /// Calls `command` with a login session (as the web UI does); returns (status, JSON).
    pub(crate) async fn with_session(&self, cookie: &str, key: &str, command: &str) -> (u16, Value) {
        let q = format!("command={command}&response=json&sessionkey={}", enc(key));
        let r = self.raw("GET", &q, b"", Some(cookie)).await;
        (r.status, r.json)
    }

    /// Creates an account with `role` and registers keys for its user; returns (account id, user id, key, secret).
    pub(crate) async fn account(&self, name: &str, role: &str) -> (String, String, String, String) {
        let a = self
            .ok(&[
                "createAccount",
                &format!("username={name}"),
                "password=Pa ss~word1",
                &format!("email={name}@example.org"),
                "firstname=Test",
                "lastname=User",
                &format!("roletype={role}"),
            ])
            .await;
        let account_id = a["account"]["id"].as_str().unwrap().to_owned();
        let user_id = a["account"]["user"][0]["id"].as_str().unwrap().to_owned();
        let k = self.ok(&["registerUserKeys", &format!("id={user_id}")]).await;
        (
            account_id,
            user_id,
            k["userkeys"]["apikey"].as_str().unwrap().to_owned(),
            k["userkeys"]["secretkey"].as_str().unwrap().to_owned(),
        )
    }
}

/// Runs the scenario `$name(Backend)` as two tests, `$name::sqlite` and `$name::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await;
            }
        }
    )*};
}

both_backends!(
    signed_get_and_post,
    signature_failures,
    errors_and_limits,
    paging,
    async_jobs,
    login_session,
    roles,
    configurations,
    integration_port_and_restart,
    zone_fields_by_role,
    delete_zone_in_use,
    keys_at_rest,
);

// === Scenarios ===

async fn signed_get_and_post(backend: Backend) {
    let core = Core::start(backend).await;
    let mode = std::fs::metadata(&core.running().credentials_path)
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    if let Backend::Sqlite = backend {
        let data_dir = core.running().credentials_path.parent().unwrap().to_owned();
        for (path, want) in [(data_dir.clone(), 0o700), (data_dir.join("core.db"), 0o600)] {
            let mode = std::fs::metadata(&path).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                want,
                "{}",
                path.display()
            );
        }
    }
    let zones = core.ok(&["listZones"]).await;
    assert_eq!(zones["count"], 1, "{zones}");
    assert_eq!(zones["zone"][0]["name"], "default-zone");

    // POST, with a value that needs encoding (space, `~`, `/`, UTF-8).
    let o = core
        .cs_as(
            &core.key,
            &core.secret,
            true,
            &[
                "createZone",
                "name=Zone ~é/1",
                "networktype=basic",
                "dns1=192.0.2.1",
                "internaldns1=192.0.2.2",
            ],
        )
        .await;
    assert!(o.ok, "{} {}", o.stderr, o.json);
    assert_eq!(o.json["zone"]["name"], "Zone ~é/1");
    assert_eq!(o.json["zone"]["networktype"], "Basic");
    assert_eq!(o.json["zone"]["allocationstate"], "Enabled");
    let id = o.json["zone"]["id"].as_str().unwrap().to_owned();

    let found = core.ok(&["listZones", &format!("id={id}")]).await;
    assert_eq!(found["count"], 1);
    assert_eq!(found["zone"][0]["dns1"], "192.0.2.1");
    assert_eq!(core.ok(&["listZones", "keyword=ZONE ~"]).await["count"], 1);
    // `_` and `%` in a keyword match themselves, not any character.
    for name in ["name=k_1", "name=kx1"] {
        core.ok(&[
            "createZone",
            name,
            "networktype=Basic",
            "dns1=1.1.1.1",
            "internaldns1=1.1.1.1",
        ])
        .await;
    }
    let k = core.ok(&["listZones", "keyword=k_"]).await;
    assert_eq!(k["count"], 1, "{k}");
    assert_eq!(k["zone"][0]["name"], "k_1");
    assert!(core.ok(&["listZones", "keyword=%"]).await.get("zone").is_none());

    // Duplicate names are a 431.
    let dup = core
        .cs(&[
            "createZone",
            "name=Zone ~é/1",
            "networktype=Advanced",
            "dns1=1.1.1.1",
            "internaldns1=1.1.1.1",
        ])
        .await;
    assert!(!dup.ok);
    assert!(dup.stderr.contains("431"), "{}", dup.stderr);

    // deleteZone is sync: {"success": true}; then the zone is gone.
    assert_eq!(
        core.ok(&["deleteZone", &format!("id={id}")]).await["success"],
        true
    );
    assert!(
        core.ok(&["listZones", &format!("id={id}")])
            .await
            .get("zone")
            .is_none()
    );
    assert_eq!(core.ok(&["listZones"]).await["count"], 3);
    // An empty list is an empty object.
    let raw = core
        .raw(
            "GET",
            &Core::signed(
                &[("command", "listZones"), ("name", "nope")],
                &core.key,
                &core.secret,
                Encoding::Java,
            ),
            b"",
            None,
        )
        .await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.json, serde_json::json!({"listzonesresponse": {}}));
    assert_eq!(
        raw.header("content-type"),
        vec!["application/json; charset=UTF-8"]
    );

    // listApis comes from the command table.
    let apis = core.ok(&["listApis"]).await;
    let names: Vec<&str> = apis["api"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"createZone") && names.contains(&"queryAsyncJobResult"),
        "{names:?}"
    );
    let del = apis["api"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "deleteAccount")
        .unwrap();
    assert_eq!(del["isasync"], true);
    assert_eq!(del["params"][0]["name"], "id");
    assert_eq!(del["params"][0]["required"], true);
    assert_eq!(del["params"][0]["type"], "uuid");
}

async fn signature_failures(backend: Backend) {
    let core = Core::start(backend).await;
    let (key, secret) = (core.key.clone(), core.secret.clone());
    let listed = |q: String| {
        let core = &core;
        async move { core.raw("GET", &q, b"", None).await }
    };

    // A correct v2 signature (no expires), then the RFC 3986 `~` variant, both accepted.
    let ok = listed(Core::signed(
        &[("command", "listZones"), ("name", "a~b")],
        &key,
        &secret,
        Encoding::Java,
    ))
    .await;
    assert_eq!(ok.status, 200, "{}", ok.json);
    let tilde = listed(Core::signed(
        &[("command", "listZones"), ("name", "a~b")],
        &key,
        &secret,
        Encoding::Rfc3986Tilde,
    ))
    .await;
    assert_eq!(tilde.status, 200, "{}", tilde.json);

    // Tampered: a parameter changed after signing.
    let q = Core::signed(
        &[("command", "listZones"), ("name", "x")],
        &key,
        &secret,
        Encoding::Java,
    )
    .replace("name=x", "name=y");
    let bad = listed(q).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json["listzonesresponse"]["errorcode"], 401);
    assert_eq!(
        bad.json["listzonesresponse"]["errortext"],
        "unable to verify user credentials and/or request signature"
    );
    // Wrong secret, unknown key, no credentials at all.
    assert_eq!(
        listed(Core::signed(
            &[("command", "listZones")],
            &key,
            "wrong",
            Encoding::Java
        ))
        .await
        .status,
        401
    );
    assert_eq!(
        listed(Core::signed(
            &[("command", "listZones")],
            "nokey",
            &secret,
            Encoding::Java
        ))
        .await
        .status,
        401
    );
    assert_eq!(listed("command=listZones&response=json".into()).await.status, 401);

    // v3: expires in every accepted format; past ⇒ 401, missing ⇒ 401.
    let now = time::OffsetDateTime::now_utc();
    let future = now + time::Duration::minutes(10);
    let past = now - time::Duration::minutes(1);
    let fmt = |t: time::OffsetDateTime, off_h: i8, style: u8| -> String {
        let o = time::UtcOffset::from_hms(off_h, 0, 0).unwrap();
        let t = t.to_offset(o);
        let base = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        let sign = if off_h < 0 { '-' } else { '+' };
        match style {
            0 => format!("{base}{sign}{:02}00", off_h.unsigned_abs()),
            1 => format!("{base}Z"),
            _ => format!("{base}.123456{sign}{:02}:00", off_h.unsigned_abs()),
        }
    };
    for expires in [
        fmt(future, 0, 0),
        fmt(future, 0, 1),
        fmt(future, -7, 0),
        fmt(future, 2, 2),
    ] {
        let q = Core::signed(
            &[
                ("command", "listZones"),
                ("signatureVersion", "3"),
                ("expires", &expires),
            ],
            &key,
            &secret,
            Encoding::Java,
        );
        assert_eq!(listed(q).await.status, 200, "expires={expires}");
    }
    for expires in [fmt(past, 0, 0), fmt(past, -7, 0), "garbage".to_owned()] {
        let q = Core::signed(
            &[
                ("command", "listZones"),
                ("signatureVersion", "3"),
                ("expires", &expires),
            ],
            &key,
            &secret,
            Encoding::Java,
        );
        assert_eq!(listed(q).await.status, 401, "expires={expires}");
    }
    let q = Core::signed(
        &[("command", "listZones"), ("signatureVersion", "3")],
        &key,
        &secret,
        Encoding::Java,
    );
    assert_eq!(listed(q).await.status, 401);
    // Case-insensitive names (cloudstack-go sends signatureversion, egoscale apikey).
    let mut params: Vec<(String, String)> = vec![
        ("command".into(), "listZones".into()),
        ("signatureversion".into(), "3".into()),
        ("expires".into(), fmt(future, 0, 1)),
        ("apikey".into(), key.clone()),
        ("response".into(), "json".into()),
    ];
    let sig = sign(&secret, &string_to_sign(&params, Encoding::Java));
    params.push(("Signature".into(), sig));
    let q = params
        .iter()
        .map(|(n, v)| format!("{n}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    assert_eq!(listed(q).await.status, 200);

    // `cs` with a wrong secret fails with 401.
    let o = core.cs_as(&key, "wrong-secret", false, &["listZones"]).await;
    assert!(!o.ok);
    assert!(o.stderr.contains("401"), "{}", o.stderr);
}

async fn errors_and_limits(backend: Backend) {
    let core = Core::start(backend).await;
    // Unknown command: 432 under `errorresponse`.
    let o = core.cs(&["fooBar"]).await;
    assert!(!o.ok);
    assert!(o.stderr.contains("432"), "{}", o.stderr);
    assert_eq!(o.json["errorresponse"]["errorcode"], 432, "{}", o.json);
    // Missing parameter: 431 with CloudStack's sentence.
    let o = core
        .cs(&["createZone", "name=z", "networktype=Basic", "dns1=1.1.1.1"])
        .await;
    assert!(!o.ok);
    let e = &o.json["createzoneresponse"];
    assert_eq!(e["errorcode"], 431, "{}", o.json);
    assert_eq!(e["cserrorcode"], 4350);
    assert_eq!(
        e["errortext"],
        "Unable to execute API command createzone due to missing parameter internaldns1"
    );
    // Wrong type: 431.
    let o = core.cs(&["listZones", "id=not-a-uuid"]).await;
    assert_eq!(o.json["listzonesresponse"]["errorcode"], 431, "{}", o.json);

    // Unknown command without credentials: still 432 (as CloudStack, the command is checked first).
    let r = core.raw("GET", "command=fooBar&response=json", b"", None).await;
    assert_eq!(r.status, 432);
    assert_eq!(r.json["errorresponse"]["errorcode"], 432);
    // `response=xml` is answered in JSON.
    let mut params: Vec<(String, String)> = vec![
        ("command".into(), "listZones".into()),
        ("response".into(), "xml".into()),
        ("apiKey".into(), core.key.clone()),
    ];
    let sig = sign(&core.secret, &string_to_sign(&params, Encoding::Java));
    params.push(("signature".into(), sig));
    let q = params
        .iter()
        .map(|(n, v)| format!("{n}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    let r = core.raw("GET", &q, b"", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["listzonesresponse"]["count"], 1);
    assert_eq!(r.header("content-type"), vec!["application/json; charset=UTF-8"]);
    // Neither GET nor POST: 405.
    assert_eq!(core.raw("PUT", "command=listZones", b"", None).await.status, 405);

    // Malformed encoding: 430; too many parameters and too large a body: 431.
    let r = core.raw("GET", "command=listZones&name=%zz", b"", None).await;
    assert_eq!(r.status, 430);
    assert_eq!(r.json["errorresponse"]["errorcode"], 430);
    let many: String = (0..3000).map(|i| format!("p{i}=1&")).collect();
    let r = core
        .raw("POST", "", format!("{many}command=listZones").as_bytes(), None)
        .await;
    assert_eq!(r.status, 431, "{}", r.json);
    let big = vec![b'a'; 1024 * 1024 + 10];
    let r = core.raw("POST", "command=listZones", &big, None).await;
    assert_eq!(r.status, 431);
    // Internal errors never leak: checked in unit tests (error::tests::internal_hides_the_cause).
}

async fn paging(backend: Backend) {
    let core = Core::start(backend).await;
    // Created concurrently: the backends must take parallel writes.
    let names: Vec<String> = (0..7).map(|i| format!("name=page-{i}")).collect();
    let args: Vec<[&str; 5]> = names
        .iter()
        .map(|n| {
            [
                "createZone",
                n.as_str(),
                "networktype=Advanced",
                "dns1=1.1.1.1",
                "internaldns1=1.1.1.1",
            ]
        })
        .collect();
    futures_util::future::join_all(args.iter().map(|a| core.ok(a))).await;
    // 8 zones with the default one; pages of 3.
    let p2 = core.ok(&["listZones", "page=2", "pagesize=3"]).await;
    assert_eq!(p2["count"], 8);
    assert_eq!(p2["zone"].as_array().unwrap().len(), 3);
    let p3 = core.ok(&["listZones", "page=3", "pagesize=3"]).await;
    assert_eq!(p3["zone"].as_array().unwrap().len(), 2);
    let p4 = core.ok(&["listZones", "page=4", "pagesize=3"]).await;
    assert_eq!(p4["count"], 8, "count is the total even past the end: {p4}");
    assert!(p4.get("zone").is_none(), "{p4}");
    // `cs` fetch_list walks every page.
    let all = core.ok(&["listZones", "fetch_list=true", "pagesize=3"]).await;
    let names: Vec<&str> = all
        .as_array()
        .unwrap_or_else(|| panic!("{all}"))
        .iter()
        .map(|z| z["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 8, "{names:?}");
    let mut dedup = names.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), 8, "pages overlap: {names:?}");
    assert_eq!(
        core.ok(&["listZones", "pagesize=-1"]).await["zone"]
            .as_array()
            .unwrap()
            .len(),
        8
    );

    // Page without pagesize (cs always adds pagesize, so raw), pagesize -1 with page, too big: 431.
    for q in [
        vec![("command", "listZones"), ("page", "1")],
        vec![("command", "listZones"), ("pagesize", "3")],
        vec![("command", "listZones"), ("page", "1"), ("pagesize", "-1")],
        vec![("command", "listZones"), ("page", "1"), ("pagesize", "501")],
    ] {
        let r = core
            .raw(
                "GET",
                &Core::signed(&q, &core.key, &core.secret, Encoding::Java),
                b"",
                None,
            )
            .await;
        assert_eq!(r.status, 431, "{q:?}: {}", r.json);
    }
}

async fn async_jobs(backend: Backend) {
    let core = Core::start(backend).await;
    let (account_id, _, _, _) = core.account("doomed", "User").await;
    // cs polls queryAsyncJobResult until the job ends and prints its jobresult.
    let done = core.ok(&["deleteAccount", &format!("id={account_id}")]).await;
    assert_eq!(done, serde_json::json!({"success": true}));
    assert!(
        core.ok(&["listAccounts", &format!("id={account_id}")])
            .await
            .get("account")
            .is_none()
    );

    // Deleting the root admin fails inside the job.
    let admin = core.ok(&["listAccounts", "name=admin"]).await;
    let admin_id = admin["account"][0]["id"].as_str().unwrap().to_owned();
    let o = core.cs(&["deleteAccount", &format!("id={admin_id}")]).await;
    assert!(!o.ok, "{}", o.json);
    // The raw answer of an async command is its job id; then poll it ourselves.
    let submitted = core
        .raw(
            "GET",
            &Core::signed(
                &[("command", "deleteAccount"), ("id", &admin_id)],
                &core.key,
                &core.secret,
                Encoding::Java,
            ),
            b"",
            None,
        )
        .await;
    assert_eq!(submitted.status, 200);
    let job_id = submitted.json["deleteaccountresponse"]["jobid"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut result = Value::Null;
    for _ in 0..100 {
        result = core
            .ok(&["queryAsyncJobResult", &format!("jobid={job_id}")])
            .await;
        if result["jobstatus"] != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(result["jobstatus"], 2, "{result}");
    assert_eq!(result["jobresultcode"], 531);
    assert_eq!(result["jobresult"]["errorcode"], 531);
    assert!(
        result["jobresult"]["errortext"]
            .as_str()
            .unwrap()
            .contains("root admin"),
        "{result}"
    );
    assert_eq!(result["jobid"], job_id.as_str());
    assert_eq!(
        result["cmd"],
        "org.apache.cloudstack.api.command.DeleteAccountCmd"
    );

    let jobs = core.ok(&["listAsyncJobs"]).await;
    let list = jobs["asyncjobs"].as_array().unwrap_or_else(|| panic!("{jobs}"));
    assert!(list.len() >= 3, "{jobs}");
    assert!(
        list.iter()
            .any(|j| j["jobstatus"] == 1 && j["jobresult"]["success"] == true)
    );
    assert!(
        list.iter()
            .any(|j| j["jobstatus"] == 2 && j["jobresultcode"] == 531)
    );
    // Unknown job: 431.
    let o = core
        .cs(&[
            "queryAsyncJobResult",
            "jobid=00000000-0000-4000-8000-000000000000",
        ])
        .await;
    assert!(!o.ok);
}

async fn login_session(backend: Backend) {
    let mut core = Core::start(backend).await;
    core.account("alice", "User").await;
    // GET is refused.
    let r = core
        .raw(
            "GET",
            "command=login&username=alice&password=x&response=json",
            b"",
            None,
        )
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json["loginresponse"]["errorcode"], 405);
    // Wrong password: 531.
    let r = core
        .raw(
            "POST",
            "",
            b"command=login&username=alice&password=nope&domain=%2F&response=json",
            None,
        )
        .await;
    assert_eq!(r.status, 531);
    // Right password (space and `~` in it).
    let body = format!(
        "command=login&username=alice&password={}&domain=%2F&response=json",
        enc("Pa ss~word1")
    );
    let r = core.raw("POST", "", body.as_bytes(), None).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let login = &r.json["loginresponse"];
    assert_eq!(login["username"], "alice");
    let key = login["sessionkey"].as_str().unwrap().to_owned();
    let cookies = r.header("set-cookie");
    let jsession = cookies
        .iter()
        .find_map(|c| c.strip_prefix("JSESSIONID="))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with(&format!("sessionkey={key}"))),
        "{cookies:?}"
    );
    // Not readable by scripts, not sent along cross-site requests; `Secure` only behind HTTPS.
    assert!(
        cookies
            .iter()
            .all(|c| c.contains("HttpOnly") && c.contains("SameSite=Lax") && !c.contains("Secure")),
        "{cookies:?}"
    );
    let cookie = format!("JSESSIONID={jsession}; sessionkey={key}");

    let q = format!("command=listAccounts&response=json&sessionkey={}", enc(&key));
    let r = core.raw("GET", &q, b"", Some(&cookie)).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["listaccountsresponse"]["count"], 1);
    assert_eq!(r.json["listaccountsresponse"]["account"][0]["name"], "alice");
    // Sessions live in the database: a restart of core keeps the user logged in.
    core.restart().await;
    let r = core.raw("GET", &q, b"", Some(&cookie)).await;
    assert_eq!(r.status, 200, "session lost by a restart: {}", r.json);
    // Session key missing as parameter, or wrong: 401.
    assert_eq!(
        core.raw("GET", "command=listZones&response=json", b"", Some(&cookie))
            .await
            .status,
        401
    );
    let wrong = format!("JSESSIONID={jsession}; sessionkey=wrong");
    assert_eq!(core.raw("GET", &q, b"", Some(&wrong)).await.status, 401);
    // Logout ends the session.
    let r = core
        .raw(
            "GET",
            &format!("command=logout&response=json&sessionkey={}", enc(&key)),
            b"",
            Some(&cookie),
        )
        .await;
    assert_eq!(r.json["logoutresponse"]["description"], "success");
    assert_eq!(core.raw("GET", &q, b"", Some(&cookie)).await.status, 401);
}

async fn roles(backend: Backend) {
    let core = Core::start(backend).await;
    let (ro_account, ro_user, ro_key, ro_secret) = core.account("viewer", "ReadOnly").await;
    let (user_account, user_user, user_key, user_secret) = core.account("worker", "User").await;

    // Read-Only: list* works, anything else is 432 (as an unknown command), including renewing
    // its own keys.
    let o = core.cs_as(&ro_key, &ro_secret, false, &["listZones"]).await;
    assert!(o.ok && o.json["count"] == 1, "{} {}", o.stderr, o.json);
    let o = core
        .cs_as(
            &ro_key,
            &ro_secret,
            false,
            &[
                "createZone",
                "name=x",
                "networktype=Basic",
                "dns1=1.1.1.1",
                "internaldns1=1.1.1.1",
            ],
        )
        .await;
    assert!(!o.ok);
    assert_eq!(o.json["createzoneresponse"]["errorcode"], 432, "{}", o.json);
    assert_eq!(o.json["createzoneresponse"]["cserrorcode"], 9999);
    let o = core
        .cs_as(
            &ro_key,
            &ro_secret,
            false,
            &["registerUserKeys", &format!("id={ro_user}")],
        )
        .await;
    assert_eq!(o.json["registeruserkeysresponse"]["errorcode"], 432, "{}", o.json);
    let o = core.cs_as(&ro_key, &ro_secret, false, &["listAccounts"]).await;
    assert_eq!(o.json["count"], 1, "{}", o.json);
    assert_eq!(o.json["account"][0]["id"], ro_account.as_str());
    // listApis shows a Read-Only caller only what it may call: reads, and the UI's start-up probe.
    let o = core.cs_as(&ro_key, &ro_secret, false, &["listApis"]).await;
    assert!(o.json["api"].as_array().unwrap().iter().all(|a| {
        let n = a["name"].as_str().unwrap();
        n.starts_with("list") || n.starts_with("query") || n.starts_with("get") || n == "cloudianIsEnabled"
    }));

    // User: its own resources only; admin commands are 432; another account's user is not found.
    let o = core.cs_as(&user_key, &user_secret, false, &["listUsers"]).await;
    assert_eq!(o.json["count"], 1, "{}", o.json);
    assert_eq!(o.json["user"][0]["id"], user_user.as_str());
    assert!(o.json["user"][0].get("secretkey").is_none());
    let o = core
        .cs_as(&user_key, &user_secret, false, &["listAccounts"])
        .await;
    assert_eq!(o.json["account"][0]["id"], user_account.as_str());
    let o = core
        .cs_as(&user_key, &user_secret, false, &["listConfigurations"])
        .await;
    assert_eq!(
        o.json["listconfigurationsresponse"]["errorcode"], 432,
        "{}",
        o.json
    );
    let o = core
        .cs_as(
            &user_key,
            &user_secret,
            false,
            &["registerUserKeys", &format!("id={ro_user}")],
        )
        .await;
    assert_eq!(o.json["registeruserkeysresponse"]["errorcode"], 431, "{}", o.json);
    let o = core
        .cs_as(
            &user_key,
            &user_secret,
            false,
            &["deleteAccount", &format!("id={ro_account}")],
        )
        .await;
    assert_eq!(o.json["deleteaccountresponse"]["errorcode"], 432, "{}", o.json);
    // The admin's jobs are not visible to the user.
    core.ok(&["deleteAccount", &format!("id={ro_account}")]).await;
    let o = core
        .cs_as(&user_key, &user_secret, false, &["listAsyncJobs"])
        .await;
    assert!(o.ok && o.json.get("asyncjobs").is_none(), "{}", o.json);
    // Renewing its own keys works and replaces the old pair.
    let o = core
        .cs_as(
            &user_key,
            &user_secret,
            true,
            &["registerUserKeys", &format!("id={user_user}")],
        )
        .await;
    assert!(o.ok, "{} {}", o.stderr, o.json);
    let (k2, s2) = (
        o.json["userkeys"]["apikey"].as_str().unwrap(),
        o.json["userkeys"]["secretkey"].as_str().unwrap(),
    );
    assert!(core.cs_as(k2, s2, false, &["listZones"]).await.ok);
    assert!(
        !core
            .cs_as(&user_key, &user_secret, false, &["listZones"])
            .await
            .ok
    );
    // The deleted Read-Only account's keys stop working.
    assert!(!core.cs_as(&ro_key, &ro_secret, false, &["listZones"]).await.ok);
}

async fn configurations(backend: Backend) {
    let core = Core::start(backend).await;
    let all = core.ok(&["listConfigurations"]).await;
    let find = |v: &Value, name: &str| -> Value {
        v["configuration"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    for (name, value) in [
        ("consoleproxy.session.max", "50"),
        ("consoleproxy.capacity.standby", "10"),
        ("consoleproxy.capacityscan.interval", "30000"),
        ("consoleproxy.launch.max", "10"),
        ("consoleproxy.session.timeout", "300000"),
        ("secstorage.allowed.internal.sites", ""),
        ("max.template.iso.size", "50"),
        ("default.page.size", "500"),
        ("integration.api.port", "0"),
    ] {
        let c = find(&all, name);
        assert_eq!(c["value"], value, "{name}: {c}");
        assert_eq!(c["defaultvalue"], value);
        for field in ["category", "description", "isdynamic", "scope", "type"] {
            assert!(c.get(field).is_some(), "{name} lacks {field}");
        }
    }
    let u = core
        .ok(&["updateConfiguration", "name=consoleproxy.session.max", "value=70"])
        .await;
    assert_eq!(u["configuration"]["value"], "70");
    let one = core
        .ok(&["listConfigurations", "name=consoleproxy.session.max"])
        .await;
    assert_eq!(one["count"], 1);
    assert_eq!(one["configuration"][0]["value"], "70");
    for bad in [
        ["name=consoleproxy.session.max", "value=lots"],
        ["name=integration.api.port", "value=70000"],
        ["name=no.such.setting", "value=1"],
    ] {
        let o = core.cs(&["updateConfiguration", bad[0], bad[1]]).await;
        assert_eq!(
            o.json["updateconfigurationresponse"]["errorcode"], 431,
            "{bad:?}: {}",
            o.json
        );
    }
    // default.page.size is the maximum page size.
    core.ok(&["updateConfiguration", "name=default.page.size", "value=2"])
        .await;
    let o = core.cs(&["listConfigurations", "page=1", "pagesize=3"]).await;
    assert_eq!(
        o.json["listconfigurationsresponse"]["errorcode"], 431,
        "{}",
        o.json
    );
    let o = core.ok(&["listConfigurations", "page=1", "pagesize=2"]).await;
    assert_eq!(o["configuration"].as_array().unwrap().len(), 2);
}

async fn integration_port_and_restart(backend: Backend) {
    let mut core = Core::start(backend).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    core.ok(&[
        "updateConfiguration",
        "name=integration.api.port",
        &format!("value={port}"),
    ])
    .await;
    core.ok(&[
        "createZone",
        "name=persisted",
        "networktype=Advanced",
        "dns1=1.1.1.1",
        "internaldns1=1.1.1.1",
    ])
    .await;
    assert!(
        core.running().integration_addr.is_none(),
        "the port opens on restart only"
    );
    core.restart().await;
    let addr = core
        .running()
        .integration_addr
        .expect("integration listener after restart");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_eq!(addr.port(), port);
    // Unsigned `cs` works on the integration port, as the root admin.
    let o = core
        .cs_at(
            &format!("http://{addr}/client/api"),
            "",
            "",
            false,
            &["listZones", "name=persisted"],
        )
        .await;
    assert!(o.ok, "{} {}", o.stderr, o.json);
    assert_eq!(o.json["count"], 1);
    // The public port still wants a signature; the old keys survived the restart.
    assert!(!core.cs_as("", "", false, &["listZones"]).await.ok);
    assert_eq!(core.ok(&["listZones", "name=persisted"]).await["count"], 1);
    // Back to 0: closed after the next restart.
    core.ok(&["updateConfiguration", "name=integration.api.port", "value=0"])
        .await;
    core.restart().await;
    assert!(core.running().integration_addr.is_none());
}

async fn zone_fields_by_role(backend: Backend) {
    let core = Core::start(backend).await;
    let z = core
        .ok(&[
            "createZone",
            "name=private-bits",
            "networktype=Advanced",
            "dns1=192.0.2.1",
            "dns2=192.0.2.2",
            "internaldns1=10.9.0.1",
            "internaldns2=10.9.0.2",
            "systemvmdriver=none",
        ])
        .await;
    assert_eq!(z["zone"]["internaldns1"], "10.9.0.1", "{z}");
    let id = z["zone"]["id"].as_str().unwrap().to_owned();
    // The root admin sees everything.
    let admin = core.ok(&["listZones", &format!("id={id}")]).await;
    let zone = &admin["zone"][0];
    assert_eq!(zone["internaldns1"], "10.9.0.1", "{admin}");
    assert_eq!(zone["internaldns2"], "10.9.0.2", "{admin}");
    assert_eq!(zone["systemvmdriver"], "none", "{admin}");
    // Users and read-only users get the zone without its internal DNS servers and driver.
    let (_, _, user_key, user_secret) = core.account("zone-user", "User").await;
    let (_, _, ro_key, ro_secret) = core.account("zone-viewer", "ReadOnly").await;
    for (who, key, secret) in [
        ("user", &user_key, &user_secret),
        ("read-only", &ro_key, &ro_secret),
    ] {
        let (ok, all) = core.cs_with(key, secret, &["listZones"]).await;
        assert!(ok, "{who}: {all}");
        assert_eq!(all["count"], 2, "{who}: {all}");
        for zone in all["zone"].as_array().unwrap() {
            for hidden in ["internaldns1", "internaldns2", "systemvmdriver"] {
                assert!(zone.get(hidden).is_none(), "{who} sees {hidden}: {zone}");
            }
            assert!(zone.get("dns1").is_some() && zone.get("name").is_some(), "{zone}");
        }
        let text = all.to_string();
        assert!(!text.contains("10.9.0."), "{who}: {text}");
        let (_, one) = core
            .cs_with(key, secret, &["listZones", &format!("id={id}")])
            .await;
        assert_eq!(one["zone"][0]["dns1"], "192.0.2.1", "{who}: {one}");
        assert!(one["zone"][0].get("internaldns1").is_none(), "{who}: {one}");
    }
}

async fn delete_zone_in_use(backend: Backend) {
    let core = Core::start(backend).await;
    let zone = |name: &'static str| {
        let core = &core;
        async move {
            core.ok(&[
                "createZone",
                &format!("name={name}"),
                "networktype=Advanced",
                "dns1=192.0.2.1",
                "internaldns1=192.0.2.2",
                "systemvmdriver=none",
            ])
            .await["zone"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let refusal = |id: String| {
        let core = &core;
        async move {
            let o = core.cs(&["deleteZone", &format!("id={id}")]).await;
            assert!(!o.ok, "deleteZone of a zone in use succeeded: {}", o.json);
            let e = &o.json["deletezoneresponse"];
            assert_eq!(e["errorcode"], 536, "{}", o.json);
            e["errortext"].as_str().unwrap().to_owned()
        }
    };
    let busy = zone("busy").await;
    core.ok(&["registerSystemVm", "role=consoleproxy", &format!("zoneid={busy}")])
        .await;
    let store_dir = core.dir().join("busy-store");
    std::fs::create_dir_all(&store_dir).unwrap();
    core.ok(&[
        "addImageStore",
        "provider=NFS",
        "name=busy-store",
        &format!("url=file://{}", store_dir.display()),
        &format!("zoneid={busy}"),
    ])
    .await;
    core.ok(&[
        "registerTemplate",
        "name=busy-template",
        "url=http://192.0.2.80/busy.qcow2",
        "format=QCOW2",
        "hypervisor=KVM",
        &format!("zoneid={busy}"),
    ])
    .await;
    let target = core
        .ok(&[
            "addConsoleTarget",
            "name=busy-vm",
            "host=127.0.0.1",
            "port=5900",
            &format!("zoneid={busy}"),
        ])
        .await["consoletarget"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // CloudStack's kind of refusal, saying what is left; never a 530 from a foreign key.
    let text = refusal(busy.clone()).await;
    for left in [
        "busy",
        "1 system VM(s)",
        "1 image store(s)",
        "1 template(s) or ISO(s)",
        "1 console target(s)",
    ] {
        assert!(text.contains(left), "{left:?} missing: {text}");
    }
    assert_eq!(core.ok(&["listZones", &format!("id={busy}")]).await["count"], 1);
    // What is gone is no longer named.
    core.ok(&["deleteConsoleTarget", &format!("id={target}")]).await;
    let text = refusal(busy.clone()).await;
    assert!(
        !text.contains("console target") && text.contains("system VM"),
        "{text}"
    );

    // A zone whose last resource is gone is deleted.
    let brief = zone("brief").await;
    let target = core
        .ok(&[
            "addConsoleTarget",
            "name=brief-vm",
            "host=127.0.0.1",
            "port=5900",
            &format!("zoneid={brief}"),
        ])
        .await["consoletarget"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = refusal(brief.clone()).await;
    assert!(text.contains("1 console target(s)"), "{text}");
    core.ok(&["deleteConsoleTarget", &format!("id={target}")]).await;
    assert_eq!(
        core.ok(&["deleteZone", &format!("id={brief}")]).await["success"],
        true
    );
    assert!(
        core.ok(&["listZones", &format!("id={brief}")])
            .await
            .get("zone")
            .is_none()
    );
    // An unknown zone stays a 431.
    let o = core
        .cs(&["deleteZone", "id=00000000-0000-4000-8000-000000000000"])
        .await;
    assert_eq!(o.json["deletezoneresponse"]["errorcode"], 431, "{}", o.json);
}

impl Core {
    /// The core's database, opened beside it.
    pub(crate) async fn db(&self) -> systemvm_core::db::Db {
        systemvm_core::db::Db::open(self.config.database_url.as_deref(), self.dir())
            .await
            .unwrap()
    }

    /// The database URL a second core on this database uses.
    fn shared_database_url(&self) -> String {
        self.config
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.dir().join("core.db").display()))
    }
}

async fn core_key(db: &systemvm_core::db::Db, name: &str) -> String {
    sqlx::query_scalar("SELECT value FROM core_keys WHERE name = $1")
        .bind(name)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The raw keys of a console-token key set (base64url, as in its JSON).
fn raw_console_keys(keys: &systemvm_proto::console::KeySet) -> Vec<String> {
    let v: Value = serde_json::from_str(&keys.to_json().unwrap()).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_owned())
        .collect()
}

async fn keys_at_rest(backend: Backend) {
    let mut core = Core::start(backend).await;
    let key_file = core.running().secrets_key_path.clone();
    assert_eq!(key_file, core.dir().join("secrets.key"));
    let mode = std::fs::metadata(&key_file).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    let console = core.running().console_keys();
    let ca_pem = std::fs::read_to_string(core.dir().join("ca-key.pem")).unwrap();
    let ca_body: String = ca_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let db = core.db().await;
    let at_rest = |console_row: &str, ca_row: &str| {
        assert!(console_row.starts_with("enc:v1:"), "{console_row}");
        for key in raw_console_keys(&console) {
            assert!(!console_row.contains(&key), "console key in clear: {console_row}");
        }
        assert!(ca_row.starts_with("enc:v1:"), "{ca_row}");
        assert!(
            !ca_row.contains("PRIVATE KEY") && !ca_row.contains(&ca_body[..40]),
            "{ca_row}"
        );
    };
    at_rest(&core_key(&db, "console").await, &core_key(&db, "ca_key").await);

    // A restart with its key file reads the same keys.
    core.restart().await;
    assert_eq!(core.running().console_keys().ids(), console.ids());
    assert_eq!(core.ok(&["listZones"]).await["count"], 1);

    // A database from before (keys in clear) is read, then stored encrypted on the next start.
    let clear = console.to_json().unwrap();
    for (name, value) in [("console", clear.as_str()), ("ca_key", ca_pem.as_str())] {
        sqlx::query("UPDATE core_keys SET value = $1 WHERE name = $2")
            .bind(value)
            .bind(name)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    core.restart().await;
    assert_eq!(
        raw_console_keys(&core.running().console_keys()),
        raw_console_keys(&console)
    );
    at_rest(&core_key(&db, "console").await, &core_key(&db, "ca_key").await);

    // A second core on this database without the first one's key file refuses to start.
    let second = |name: &str, key: Option<PathBuf>| {
        let dir = core.dir().with_file_name(format!(
            "{}-{name}",
            core.dir().file_name().unwrap().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = CoreConfig::new(&dir);
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.database_url = Some(core.shared_database_url());
        c.secrets_key = key;
        (TempDir(dir), c)
    };
    let (dir, config) = second("nokey", None);
    let err = systemvm_core::start(config)
        .await
        .expect_err("started without the key file");
    let text = format!("{err:#}");
    assert!(text.contains("copy the secrets.key of the first core"), "{text}");
    assert!(
        !dir.0.join("secrets.key").exists(),
        "a useless key file was created"
    );
    let wrong = dir.0.join("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    let (_dir2, config) = second("wrongkey", Some(wrong));
    let err = systemvm_core::start(config)
        .await
        .expect_err("started with another key");
    let text = format!("{err:#}");
    assert!(
        text.contains("another secrets key") && text.contains("copy the secrets.key"),
        "{text}"
    );
    // With the first core's key file it starts and issues links the first core's proxies open.
    let (_dir3, config) = second("sharedkey", Some(key_file.clone()));
    let other = systemvm_core::start(config)
        .await
        .expect("the second core with the shared key");
    assert_eq!(
        raw_console_keys(&other.console_keys()),
        raw_console_keys(&console)
    );
    other.shutdown().await;
    db.pool.close().await;
}
