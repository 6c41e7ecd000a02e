//! The `systemvm-core` binary: `serve` prints the API URL and the credentials path, answers,
//! stops; `register-systemvm`; the client subcommands against a served core and a fake API.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions fail the test on any setup error"
)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};

/// `systemvm-core serve` on loopback ports with its stdout piped.
fn spawn_serve(data_dir: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_systemvm-core"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("failed to start systemvm-core")
}

#[test]
fn serve_prints_url_and_credentials_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_serve(dir.path());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let api = lines.next().unwrap().unwrap();
    let creds = lines.next().unwrap().unwrap();
    let agent = lines.next().unwrap().unwrap();
    assert!(agent.starts_with("Agent endpoint: wss://127.0.0.1:"), "{agent}");
    assert!(
        agent.ends_with(&format!("/agent (CA {})", dir.path().join("ca.pem").display())),
        "{agent}"
    );
    let url = api.strip_prefix("API: http://").unwrap();
    let addr = url.strip_suffix("/client/api").unwrap();
    assert_eq!(
        creds,
        format!("Credentials: {}", dir.path().join("credentials.json").display())
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("credentials.json")).unwrap()).unwrap();
    assert_eq!(c["apikey"].as_str().unwrap().len(), 86);
    // Unsigned: 401 in CloudStack's shape.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(
        b"GET /client/api?command=listZones&response=json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains(r#""errorcode":401"#), "{out}");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn register_systemvm_prints_id_secret_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let register = |role: &str| {
        Command::new(env!("CARGO_BIN_EXE_systemvm-core"))
            .args(["register-systemvm", "--role", role, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    // Before core ever ran on the data dir there is no CA to hand out.
    let early = register("consoleproxy");
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("once first"));

    let mut child = spawn_serve(dir.path());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _ = lines.next().unwrap().unwrap();
    let out = register("secondarystoragevm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    assert_eq!(field("id").len(), 36);
    assert!(field("name").starts_with("s-"));
    assert_eq!(field("secret").len(), 43);
    assert_eq!(field("ca"), dir.path().join("ca.pem").display().to_string());
    let bad = register("router");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid role"));
    child.kill().unwrap();
    let _ = child.wait();
}

/// A `systemvm-core serve` child on a temp data dir, killed on drop.
struct Core {
    child: std::process::Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` and waits for its four start-up lines (it is listening once they are out).
fn start_core() -> Core {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_serve(dir.path());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let api = lines.next().unwrap().unwrap();
    let url = api.strip_prefix("API: ").unwrap().to_owned();
    // Every start-up line (credentials, agent endpoint, secrets key) before the pipe goes.
    for _ in 0..3 {
        let _ = lines.next().unwrap().unwrap();
    }
    Core { child, dir, url }
}

/// The binary with no client settings inherited from the environment, and a HOME without a
/// default data dir (none of the user's own credentials are found).
fn bare_client() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_systemvm-core"));
    for var in [
        "SYSTEMVM_CORE_API_URL",
        "SYSTEMVM_CORE_DATA_DIR",
        "SYSTEMVM_CORE_API_KEY",
        "SYSTEMVM_CORE_SECRET_KEY",
        "XDG_DATA_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", "/nonexistent/systemvm-core-test-home");
    cmd
}

/// Result of one client run: success, stdout, stderr.
struct Run {
    ok: bool,
    out: String,
    err: String,
}

fn finish(mut cmd: Command) -> Run {
    let o = cmd.output().unwrap();
    Run {
        ok: o.status.success(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs a client subcommand against `core` with `--api-url` and `--data-dir`.
fn client(core: &Core, args: &[&str]) -> Run {
    let mut cmd = bare_client();
    cmd.args(args)
        .arg("--api-url")
        .arg(&core.url)
        .arg("--data-dir")
        .arg(core.dir.path());
    finish(cmd)
}

/// Like [`client`], but the run must succeed.
fn client_ok(core: &Core, args: &[&str]) -> String {
    let r = client(core, args);
    assert!(r.ok, "{args:?} failed: {}", r.err);
    r.out
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn client_lists_zones_system_vms_and_configs() {
    let core = start_core();
    let zones = client_ok(&core, &["zones"]);
    let lines: Vec<&str> = zones.lines().collect();
    assert_eq!(lines.len(), 2, "{zones}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "NAME", "ALLOCATION"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row.len(), 3, "{zones}");
    assert_eq!(row[0].len(), 36);
    assert_eq!(&row[1..], ["default-zone", "Enabled"]);
    // Columns line up: NAME starts at the same offset in both lines.
    assert_eq!(lines[0].find("NAME"), lines[1].find("default-zone"));

    // Empty list ({}): the header alone.
    let none = client_ok(&core, &["system-vms"]);
    assert_eq!(
        none.split_whitespace().collect::<Vec<_>>(),
        [
            "ID", "NAME", "TYPE", "STATE", "AGENT", "ZONE", "SESSIONS", "VERSION"
        ]
    );
    let reg = bare_client()
        .args([
            "register-systemvm",
            "--role",
            "consoleproxy",
            "--name",
            "v-cli-1",
            "--data-dir",
        ])
        .arg(core.dir.path())
        .output()
        .unwrap();
    assert!(reg.status.success(), "{}", String::from_utf8_lossy(&reg.stderr));
    let vms = client_ok(&core, &["system-vms"]);
    let row = vms.lines().nth(1).unwrap_or_else(|| panic!("no VM row: {vms}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // ID NAME TYPE STATE AGENT ZONE SESSIONS VERSION, the empty version shown as `-`.
    assert_eq!(cells.len(), 8, "{vms}");
    assert_eq!(cells[1..3], ["v-cli-1", "consoleproxy"], "{vms}");
    assert_eq!(cells[5..], ["default-zone", "0", "-"], "{vms}");

    let configs = client_ok(&core, &["configs", "--name", "default.page.size"]);
    let lines: Vec<&str> = configs.lines().collect();
    assert_eq!(lines.len(), 2, "{configs}");
    assert!(lines[0].starts_with("NAME"), "{configs}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..2], ["default.page.size", "500"]);

    // --json prints the inner response; `api` prints any command's.
    let j = json_of(&client_ok(&core, &["zones", "--json"]));
    assert_eq!(j["count"], 1);
    assert_eq!(j["zone"][0]["name"], "default-zone");
    let j = json_of(&client_ok(&core, &["api", "listZones", "name=default-zone"]));
    assert_eq!(j["zone"][0]["allocationstate"], "Enabled");
    let j = json_of(&client_ok(&core, &["api", "listZones", "name=no such zone"]));
    assert_eq!(j, serde_json::json!({}));
    let bad = client(&core, &["api", "noSuchCommand"]);
    assert!(!bad.ok);
    assert!(bad.err.starts_with("error 432: "), "{}", bad.err);
}

#[test]
fn client_set_config_and_read_it_back() {
    let core = start_core();
    assert_eq!(
        client_ok(&core, &["set-config", "default.page.size", "77"]),
        "default.page.size = 77\n"
    );
    let j = json_of(&client_ok(
        &core,
        &["configs", "--name", "default.page.size", "--json"],
    ));
    assert_eq!(j["configuration"][0]["value"], "77");
    let bad = client(&core, &["set-config", "default.page.size", "many"]);
    assert!(!bad.ok);
    assert!(bad.out.is_empty(), "{}", bad.out);
    assert!(bad.err.starts_with("error 431: "), "{}", bad.err);
    let j = json_of(&client_ok(
        &core,
        &["set-config", "default.page.size", "500", "--json"],
    ));
    assert_eq!(j["configuration"]["value"], "500");
}

#[test]
fn client_credentials_from_data_dir_flags_and_env() {
    let core = start_core();
    let creds = json_of(&std::fs::read_to_string(core.dir.path().join("credentials.json")).unwrap());
    let key = creds["apikey"].as_str().unwrap();
    let secret = creds["secretkey"].as_str().unwrap();

    // --data-dir alone (through `client`), and the same through the environment.
    assert!(client_ok(&core, &["zones"]).contains("default-zone"));
    let mut env = bare_client();
    env.arg("zones")
        .env("SYSTEMVM_CORE_API_URL", &core.url)
        .env("SYSTEMVM_CORE_DATA_DIR", core.dir.path());
    let r = finish(env);
    assert!(r.ok && r.out.contains("default-zone"), "{}", r.err);

    // Explicit keys, no data dir.
    let with_keys = |secret: &str| {
        let mut cmd = bare_client();
        cmd.args([
            "zones",
            "--api-url",
            &core.url,
            "--api-key",
            key,
            "--secret-key",
            secret,
        ]);
        finish(cmd)
    };
    let r = with_keys(secret);
    assert!(r.ok && r.out.contains("default-zone"), "{}", r.err);
    let r = with_keys("wrong-secret");
    assert!(!r.ok);
    assert!(r.out.is_empty(), "{}", r.out);
    assert!(r.err.contains("error 401"), "{}", r.err);
    assert!(!r.err.contains(key), "the error shows the API key: {}", r.err);

    // Nothing to sign with (no credentials.json in the default data dir), or a data dir without
    // credentials.json.
    let mut none = bare_client();
    none.args(["zones", "--api-url", &core.url]);
    let r = finish(none);
    assert!(!r.ok && r.err.contains("no API credentials"), "{}", r.err);
    assert!(
        r.err
            .contains("/nonexistent/systemvm-core-test-home/.local/share/systemvm-core/credentials.json"),
        "{}",
        r.err
    );
    assert!(r.err.contains("systemvm-core up"), "{}", r.err);
    let mut homeless = bare_client();
    homeless
        .args(["zones", "--api-url", &core.url])
        .env_remove("HOME");
    let r = finish(homeless);
    assert!(!r.ok && r.err.contains("--data-dir"), "{}", r.err);
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = bare_client();
    cmd.args(["zones", "--api-url", &core.url, "--data-dir"])
        .arg(empty.path());
    let r = finish(cmd);
    assert!(!r.ok && r.err.contains("credentials.json"), "{}", r.err);
}

/// `serve` and the client without `--data-dir`: both use `$XDG_DATA_HOME/systemvm-core`, else
/// `$HOME/.local/share/systemvm-core`, and `SYSTEMVM_CORE_DATA_DIR` over both.
#[test]
fn serve_and_client_share_the_default_data_dir() {
    let home = tempfile::tempdir().unwrap();
    let xdg = home.path().join("xdg-data");
    let fixed = home.path().join("fixed");
    for (vars, dir) in [
        (vec![], home.path().join(".local/share/systemvm-core")),
        (vec![("XDG_DATA_HOME", xdg.as_path())], xdg.join("systemvm-core")),
        (
            vec![
                ("XDG_DATA_HOME", xdg.as_path()),
                ("SYSTEMVM_CORE_DATA_DIR", fixed.as_path()),
            ],
            fixed.clone(),
        ),
    ] {
        let with_env = |mut cmd: Command| {
            for var in ["SYSTEMVM_CORE_DATA_DIR", "XDG_DATA_HOME"] {
                cmd.env_remove(var);
            }
            cmd.env("HOME", home.path());
            for (k, v) in &vars {
                cmd.env(k, v);
            }
            cmd
        };
        let mut serve = with_env(Command::new(env!("CARGO_BIN_EXE_systemvm-core")));
        serve
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--agent-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = serve.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let api = lines.next().unwrap().unwrap();
        let creds = lines.next().unwrap().unwrap();
        assert_eq!(
            creds,
            format!("Credentials: {}", dir.join("credentials.json").display()),
            "{vars:?}"
        );
        let url = api.strip_prefix("API: ").unwrap().to_owned();
        let mut zones = with_env(bare_client());
        zones.args(["zones", "--api-url", &url]);
        let r = finish(zones);
        assert!(r.ok && r.out.contains("default-zone"), "{vars:?}: {}", r.err);
        let mut register = with_env(bare_client());
        register.args(["register-systemvm", "--role", "consoleproxy"]);
        let r = finish(register);
        assert!(r.ok, "{vars:?}: {}", r.err);
        assert!(
            r.out.contains(&format!("ca: {}", dir.join("ca.pem").display())),
            "{}",
            r.out
        );
        child.kill().unwrap();
        let _ = child.wait();
    }
}

#[test]
fn client_image_stores_templates_capacity_and_delete() {
    let core = start_core();
    let store_url = format!("file://{}/store", core.dir.path().display());
    let added = client_ok(
        &core,
        &["add-image-store", "--url", &store_url, "--name", "cli-store"],
    );
    assert!(added.starts_with("ID "), "{added}");
    assert!(added.lines().nth(1).unwrap().contains("cli-store"), "{added}");
    let stores = json_of(&client_ok(&core, &["image-stores", "--json"]));
    assert_eq!(stores["imagestore"][0]["url"], store_url.as_str());
    assert_eq!(stores["imagestore"][0]["providername"], "Local");
    let table = client_ok(&core, &["image-stores"]);
    assert!(table.lines().nth(1).unwrap().contains(&store_url), "{table}");

    let capacity = client_ok(&core, &["capacity"]);
    assert!(capacity.starts_with("TYPE"), "{capacity}");
    assert!(
        capacity
            .lines()
            .any(|l| l.contains("SECONDARY_STORAGE") && l.contains("default-zone")),
        "{capacity}"
    );

    // Nothing lists yet: the header alone.
    assert_eq!(client_ok(&core, &["templates"]).lines().count(), 1);
    let registered = client_ok(
        &core,
        &[
            "register-template",
            "--name",
            "cli-tmpl",
            "--url",
            "http://192.0.2.1/t.qcow2",
            "--format",
            "QCOW2",
            "--no-wait",
        ],
    );
    let row = registered
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("no row: {registered}"));
    let id = row.split_whitespace().next().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{registered}");
    assert!(row.contains("cli-tmpl") && row.contains("QCOW2"), "{registered}");
    let listed = json_of(&client_ok(&core, &["templates", "--json"]));
    assert_eq!(listed["template"][0]["id"], id.as_str());
    assert_eq!(listed["template"][0]["hypervisor"], "KVM");
    assert_eq!(listed["template"][0]["displaytext"], "cli-tmpl");
    assert_eq!(client_ok(&core, &["templates", "--iso"]).lines().count(), 1);

    // An async job that fails (no storage VM can delete the files), then a forced delete.
    let failed = client(&core, &["delete-template", &id]);
    assert!(!failed.ok);
    assert!(failed.err.starts_with("error 530: "), "{}", failed.err);
    let deleted = client_ok(&core, &["delete-template", &id, "--forced"]);
    assert!(deleted.contains("removed"), "{deleted}");
    assert_eq!(client_ok(&core, &["templates"]).lines().count(), 1);
}

/// A fake API on loopback: answers `registerTemplate` with template `T1`, and each
/// `listTemplates` with the next of `progress` (the last one repeats).
fn fake_api(progress: Vec<serde_json::Value>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/client/api", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut polls = 0;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
            }
            let body = if request_line.contains("command=registerTemplate") {
                serde_json::json!({"registertemplateresponse": {"count": 1, "template": [progress[0].clone()]}})
            } else if request_line.contains("command=listTemplates") && request_line.contains("id=T1") {
                let t = progress[polls.min(progress.len() - 1)].clone();
                polls += 1;
                serde_json::json!({"listtemplatesresponse": {"count": 1, "template": [t]}})
            } else {
                serde_json::json!({"errorresponse": {"errorcode": 432, "errortext": "unexpected"}})
            };
            let body = body.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

fn template(percent: &str, state: &str, status: &str, ready: bool) -> serde_json::Value {
    serde_json::json!({
        "id": "T1", "name": "t", "format": "QCOW2", "isready": ready, "status": status, "zonename": "z",
        "downloaddetails": [{"datastore": "s", "downloadState": state, "downloadPercent": percent}],
    })
}

fn register_against(url: &str) -> Run {
    let mut cmd = bare_client();
    cmd.args([
        "register-template",
        "--name",
        "t",
        "--url",
        "http://192.0.2.1/t.qcow2",
        "--format",
        "QCOW2",
        "--api-key",
        "k",
        "--secret-key",
        "s",
        "--api-url",
        url,
    ]);
    finish(cmd)
}

#[test]
fn register_template_follows_the_download_until_ready() {
    let url = fake_api(vec![
        template("0", "NOT_DOWNLOADED", "Waiting for a storage VM", false),
        template("40", "DOWNLOAD_IN_PROGRESS", "40% Downloaded", false),
        template("40", "DOWNLOAD_IN_PROGRESS", "40% Downloaded", false),
        template("100", "DOWNLOADED", "Download Complete", true),
    ]);
    let r = register_against(&url);
    assert!(r.ok, "{}", r.err);
    // Not a terminal: one plain line per change on stderr (the rate and time left, known from
    // the second poll, depend on timing); the result on stdout.
    let lines: Vec<&str> = r.err.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.err);
    assert_eq!(lines[0], "  0% Waiting for a storage VM");
    assert!(
        lines[1] == " 40%" || (lines[1].starts_with(" 40% ") && lines[1].contains("%/s, ETA ")),
        "{}",
        r.err
    );
    assert_eq!(lines[2], "100% Download Complete");
    assert!(r.out.starts_with("ID "), "{}", r.out);
    assert_eq!(r.out.lines().last(), Some("Ready"), "{}", r.out);
}

#[test]
fn register_template_fails_when_the_download_fails() {
    let url = fake_api(vec![
        template("0", "NOT_DOWNLOADED", "Waiting for a storage VM", false),
        template(
            "12",
            "DOWNLOAD_ERROR",
            "Download failed: HTTP 404 from the origin",
            false,
        ),
    ]);
    let r = register_against(&url);
    assert!(!r.ok);
    assert!(!r.out.contains("Ready"), "{}", r.out);
    assert!(
        r.err
            .ends_with("download failed: Download failed: HTTP 404 from the origin\n"),
        "{}",
        r.err
    );
}

#[test]
fn serve_refuses_an_image_driver_without_an_image() {
    let dir = tempfile::tempdir().unwrap();
    for driver in ["qemu", "libvirt"] {
        let out = Command::new(env!("CARGO_BIN_EXE_systemvm-core"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--agent-listen",
                "127.0.0.1:0",
                "--driver",
                driver,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "--driver {driver} needs --vm-image, or --vm-kernel with --vm-initrd"
            )),
            "{err}"
        );
    }
}
