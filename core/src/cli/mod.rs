//! Client subcommands of the `systemvm-core` binary: common operations against a running core's
//! CloudStack API (`/client/api`), signed with an API key pair ([`client`]), printed as aligned
//! tables ([`table`]) or, with `--json`, as the raw inner `<command>response` object.
//!
//! Credentials come from `--api-key` + `--secret-key` or, failing those, from
//! `DATA_DIR/credentials.json` (the file `serve` and `up` write for the root admin), where
//! `DATA_DIR` is `--data-dir` or, without it, [`default_data_dir`] (the directory `serve`, `up`
//! and `register-systemvm` use then too).
//!
//! Invariants: results go to stdout, progress and errors to stderr; every API error is printed as
//! `error N: text` and makes the process exit non-zero (see `main.rs`); a download wait ends only
//! on a ready template, a failed or abandoned download, or an error.

pub mod client;
pub mod progress;
pub mod table;

use std::ffi::OsString;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;

use self::client::{ApiClient, ClientError, read_credentials};
use self::table::{Column, bytes, items, list_table, percent, text};
use crate::Credentials;

/// The API URL when neither `--api-url` nor `SYSTEMVM_CORE_API_URL` is given.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080/client/api";

/// Environment variable naming the data directory (overrides the XDG/HOME default).
pub const DATA_DIR_ENV: &str = "SYSTEMVM_CORE_DATA_DIR";

/// The data directory used when `--data-dir` is absent, by every subcommand (`serve`, `up`,
/// `register-systemvm` and the client subcommands): `$SYSTEMVM_CORE_DATA_DIR`, else
/// `$XDG_DATA_HOME/systemvm-core`, else `$HOME/.local/share/systemvm-core`. Empty values and a
/// relative `XDG_DATA_HOME` (the XDG spec says to ignore it) are skipped.
pub fn default_data_dir() -> Option<PathBuf> {
    default_data_dir_in(|name| std::env::var_os(name))
}

/// [`default_data_dir`] with the environment read through `var`.
pub fn default_data_dir_in(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(DATA_DIR_ENV) {
        return Some(dir);
    }
    if let Some(xdg) = set("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("systemvm-core"));
    }
    set("HOME").map(|home| home.join(".local/share/systemvm-core"))
}

/// `explicit` (a `--data-dir`), else [`default_data_dir`].
pub fn data_dir_or_default(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(dir) => Ok(dir.to_owned()),
        None => default_data_dir().with_context(|| {
            format!("no --data-dir, and none of {DATA_DIR_ENV}, XDG_DATA_HOME or HOME is set")
        }),
    }
}

/// Interval between two polls of a template's download.
pub const DOWNLOAD_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the API is and who calls it; flattened into every client subcommand.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// API endpoint.
    #[arg(long, env = "SYSTEMVM_CORE_API_URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// Core's data directory: the API keys are read from DIR/credentials.json [default:
    /// $SYSTEMVM_CORE_DATA_DIR, else $XDG_DATA_HOME/systemvm-core, else
    /// ~/.local/share/systemvm-core].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// API key (with --secret-key; takes precedence over --data-dir). Keys are base64url and
    /// may begin with `-`, so the value is taken as is.
    #[arg(long, env = "SYSTEMVM_CORE_API_KEY", allow_hyphen_values = true)]
    pub api_key: Option<String>,
    /// Secret key (with --api-key).
    #[arg(
        long,
        env = "SYSTEMVM_CORE_SECRET_KEY",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub secret_key: Option<String>,
    /// PEM bundle of the CA(s) trusted for an https API URL (required for https).
    #[arg(long, value_name = "PEM")]
    pub ca_bundle: Option<PathBuf>,
    /// Print the raw inner response (JSON) instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ConnectArgs {
    /// The API key pair: `--api-key`/`--secret-key`, else `credentials.json` in `--data-dir` or
    /// in the [`default_data_dir`].
    pub fn credentials(&self) -> Result<Credentials, ClientError> {
        match (&self.api_key, &self.secret_key) {
            (Some(apikey), Some(secretkey)) => Ok(Credentials {
                apikey: apikey.clone(),
                secretkey: secretkey.clone(),
                username: None,
                password: None,
            }),
            (Some(_), None) | (None, Some(_)) => Err(ClientError::Credentials(
                "--api-key and --secret-key must be given together".to_owned(),
            )),
            (None, None) => match (&self.data_dir, default_data_dir()) {
                (Some(dir), _) => read_credentials(dir),
                (None, Some(dir)) => read_credentials(&dir).map_err(|e| {
                    ClientError::Credentials(format!(
                        "no API credentials: {e}; start `systemvm-core up` (or `serve`) first, or pass --data-dir DIR or --api-key and --secret-key"
                    ))
                }),
                (None, None) => Err(ClientError::Credentials(format!(
                    "no API credentials: pass --data-dir DIR (reads DIR/credentials.json) or --api-key and --secret-key (none of {DATA_DIR_ENV}, XDG_DATA_HOME or HOME is set)"
                ))),
            },
        }
    }

    /// A client of `--api-url` with these credentials.
    pub fn client(&self) -> Result<ApiClient, ClientError> {
        ApiClient::new(&self.api_url, self.credentials()?, self.ca_bundle.as_deref())
    }
}

/// The client subcommands (flattened into the binary's subcommands).
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Lists zones (listZones).
    Zones {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Lists system VMs with their agent state (listSystemVms).
    SystemVms {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Lists image stores with their capacity (listImageStores).
    ImageStores {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Adds an NFS image store (addImageStore provider=NFS).
    AddImageStore {
        #[command(flatten)]
        conn: ConnectArgs,
        /// nfs://HOST/EXPORT (a port after HOST if not 2049), or file:///PATH.
        #[arg(long)]
        url: String,
        /// Name (default: from the URL).
        #[arg(long)]
        name: Option<String>,
        /// Zone id (default: the oldest zone).
        #[arg(long)]
        zone: Option<String>,
    },
    /// Lists templates (listTemplates templatefilter=all) or ISOs (listIsos isofilter=all).
    Templates {
        #[command(flatten)]
        conn: ConnectArgs,
        /// List ISOs instead of templates.
        #[arg(long)]
        iso: bool,
    },
    /// Registers a template (or ISO) from a URL and, unless --no-wait, shows its download.
    RegisterTemplate {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Name (also the display text).
        #[arg(long)]
        name: String,
        /// http(s) URL of the image.
        #[arg(long)]
        url: String,
        /// QCOW2, RAW, VHD or OVA (templates only).
        #[arg(long, required_unless_present = "iso")]
        format: Option<String>,
        /// Zone id (default: the oldest zone).
        #[arg(long)]
        zone: Option<String>,
        /// Checksum of the download, {ALGO}hex.
        #[arg(long)]
        checksum: Option<String>,
        /// Register an ISO (registerIso).
        #[arg(long)]
        iso: bool,
        /// Return after registering instead of waiting for the download.
        #[arg(long)]
        no_wait: bool,
    },
    /// Deletes a template or ISO and waits for the job (deleteTemplate / deleteIso).
    DeleteTemplate {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Template or ISO id.
        id: String,
        /// Delete an ISO.
        #[arg(long)]
        iso: bool,
        /// Remove the record even when no storage VM can delete the files (they stay on the store).
        #[arg(long)]
        forced: bool,
    },
    /// Fills an NFS staging store again from an object store and waits for it
    /// (rebuildImageStore): every replicated template, ISO and snapshot, verified.
    RebuildStore {
        #[command(flatten)]
        conn: ConnectArgs,
        /// The staging store's id (listImageStores / listSecondaryStagingStores).
        id: String,
        /// The object store to read (default: the zone's one holding most of its artefacts).
        #[arg(long)]
        object_store: Option<String>,
    },
    /// Shows capacity (listCapacity).
    Capacity {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Prints a console URL for a VM (createConsoleEndpoint).
    Console {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Virtual machine id.
        vm_id: String,
    },
    /// Lists settings (listConfigurations).
    Configs {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Only settings whose name contains this.
        #[arg(long)]
        name: Option<String>,
    },
    /// Changes a setting (updateConfiguration).
    SetConfig {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Setting name.
        name: String,
        /// New value.
        value: String,
    },
    /// Runs any API command and prints the JSON answer.
    Api {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Command name, e.g. listZones.
        command: String,
        /// Parameters as NAME=VALUE.
        #[arg(value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// More parameters, one NAME=VALUE per line, from FILE (keeps secrets such as an object
        /// store's secret key off the command line); blank lines and `#` comments are skipped.
        #[arg(long, value_name = "FILE")]
        params_from: Option<std::path::PathBuf>,
    },
}

/// Most characters of a template's status (a failure reason can be long) in the table; `--json`
/// has the whole text.
pub const STATUS_WIDTH: usize = 48;
/// Most characters of a setting's description in the `configs` table.
pub const DESCRIPTION_WIDTH: usize = 72;

const ZONES: &[Column] = &[
    text("ID", "id"),
    text("NAME", "name"),
    text("ALLOCATION", "allocationstate"),
];
const SYSTEM_VMS: &[Column] = &[
    text("ID", "id"),
    text("NAME", "name"),
    text("TYPE", "systemvmtype"),
    text("STATE", "state"),
    text("AGENT", "agentstate"),
    text("ZONE", "zonename"),
    text("SESSIONS", "activeviewersessions"),
    text("VERSION", "version"),
];
const IMAGE_STORES: &[Column] = &[
    text("ID", "id"),
    text("NAME", "name"),
    text("URL", "url"),
    text("PROVIDER", "providername"),
    text("ZONE", "zonename"),
    bytes("TOTAL", "disksizetotal"),
    bytes("USED", "disksizeused"),
];
const TEMPLATES: &[Column] = &[
    text("ID", "id"),
    text("NAME", "name"),
    text("FORMAT", "format"),
    text("STATUS", "status").cut(STATUS_WIDTH),
    text("READY", "isready"),
    bytes("SIZE", "size"),
    text("ZONE", "zonename"),
];
const CAPACITY: &[Column] = &[
    text("TYPE", "type"),
    text("NAME", "name"),
    text("ZONE", "zonename"),
    bytes("TOTAL", "capacitytotal"),
    bytes("USED", "capacityused"),
    percent("USED%", "percentused"),
];
const CONFIGS: &[Column] = &[
    text("NAME", "name"),
    text("VALUE", "value"),
    text("DESCRIPTION", "description").cut(DESCRIPTION_WIDTH),
];

/// Template vs. ISO: the commands, filter and object names of each.
#[derive(Debug, Clone, Copy)]
struct TemplateKind {
    register: &'static str,
    list: &'static str,
    delete: &'static str,
    filter: &'static str,
    object: &'static str,
}

impl TemplateKind {
    fn of(iso: bool) -> Self {
        if iso {
            Self {
                register: "registerIso",
                list: "listIsos",
                delete: "deleteIso",
                filter: "isofilter",
                object: "iso",
            }
        } else {
            Self {
                register: "registerTemplate",
                list: "listTemplates",
                delete: "deleteTemplate",
                filter: "templatefilter",
                object: "template",
            }
        }
    }
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a list answer: raw with `--json`, else a table of `object` items.
fn print_list(json: bool, list: &Value, object: &str, columns: &[Column]) -> anyhow::Result<()> {
    if json {
        return print_json(list);
    }
    print!("{}", list_table(items(list, object), columns));
    Ok(())
}

/// Prints a single-object answer (`{"<object>": {…}}`) as a one-row table, or raw.
fn print_one(json: bool, answer: &Value, object: &str, columns: &[Column]) -> anyhow::Result<()> {
    if json {
        return print_json(answer);
    }
    let item = answer.get(object).cloned().unwrap_or(Value::Null);
    print!("{}", list_table(std::slice::from_ref(&item), columns));
    Ok(())
}

/// Pushes `(name, value)` when `value` is given.
fn push_opt(params: &mut Vec<(String, String)>, name: &str, value: Option<&str>) {
    if let Some(v) = value {
        params.push((name.to_owned(), v.to_owned()));
    }
}

/// Splits `NAME=VALUE` arguments of `api`.
pub fn parse_pairs(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .with_context(|| format!("invalid parameter {a:?}: expected NAME=VALUE"))
        })
        .collect()
}

/// Runs one client subcommand.
pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Zones { conn } => {
            let list = conn.client()?.call("listZones", &[]).await?;
            print_list(conn.json, &list, "zone", ZONES)
        }
        ClientCommand::SystemVms { conn } => {
            let list = conn.client()?.call("listSystemVms", &[]).await?;
            print_list(conn.json, &list, "systemvm", SYSTEM_VMS)
        }
        ClientCommand::ImageStores { conn } => {
            let list = conn.client()?.call("listImageStores", &[]).await?;
            print_list(conn.json, &list, "imagestore", IMAGE_STORES)
        }
        ClientCommand::AddImageStore {
            conn,
            url,
            name,
            zone,
        } => {
            let mut params = vec![("provider".to_owned(), "NFS".to_owned()), ("url".to_owned(), url)];
            push_opt(&mut params, "name", name.as_deref());
            push_opt(&mut params, "zoneid", zone.as_deref());
            let answer = conn.client()?.call_owned("addImageStore", &params).await?;
            print_one(conn.json, &answer, "imagestore", IMAGE_STORES)
        }
        ClientCommand::Templates { conn, iso } => {
            let k = TemplateKind::of(iso);
            let list = conn.client()?.call(k.list, &[(k.filter, "all")]).await?;
            print_list(conn.json, &list, k.object, TEMPLATES)
        }
        ClientCommand::RegisterTemplate {
            conn,
            name,
            url,
            format,
            zone,
            checksum,
            iso,
            no_wait,
        } => {
            let k = TemplateKind::of(iso);
            let mut params = vec![
                ("name".to_owned(), name.clone()),
                ("displaytext".to_owned(), name),
                ("url".to_owned(), url.clone()),
            ];
            if !iso {
                push_opt(&mut params, "format", format.as_deref());
                params.push(("hypervisor".to_owned(), "KVM".to_owned()));
            }
            push_opt(&mut params, "zoneid", zone.as_deref());
            push_opt(&mut params, "checksum", checksum.as_deref());
            let client = conn.client()?;
            let answer = client.call_owned(k.register, &params).await?;
            let id = items(&answer, k.object)
                .first()
                .and_then(|t| t.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ClientError::BadAnswer {
                    command: k.register.to_owned(),
                    detail: format!("no {} id", k.object),
                })?;
            if no_wait || !conn.json {
                print_list(conn.json, &answer, k.object, TEMPLATES)?;
            }
            if no_wait {
                return Ok(());
            }
            let done = wait_download(&client, k, &id, &url).await?;
            if conn.json {
                print_json(&done)
            } else {
                println!("Ready");
                Ok(())
            }
        }
        ClientCommand::DeleteTemplate {
            conn,
            id,
            iso,
            forced,
        } => {
            let k = TemplateKind::of(iso);
            let mut params = vec![("id", id.as_str())];
            if forced {
                params.push(("forced", "true"));
            }
            let result = conn.client()?.call_async(k.delete, &params).await?;
            if conn.json {
                return print_json(&result);
            }
            match result.get("displaytext").and_then(Value::as_str) {
                Some(t) => println!("{t}"),
                None => println!("Deleted {} {id}", k.object),
            }
            Ok(())
        }
        ClientCommand::RebuildStore {
            conn,
            id,
            object_store,
        } => {
            let mut params = vec![("id", id.as_str())];
            if let Some(o) = object_store.as_deref() {
                params.push(("objectstoreid", o));
            }
            let result = conn.client()?.call_async("rebuildImageStore", &params).await?;
            if conn.json {
                return print_json(&result);
            }
            let r = result.get("rebuild").unwrap_or(&Value::Null);
            println!(
                "Restored {} artefact(s), {} bytes, into image store {id}",
                r.get("restored").and_then(Value::as_u64).unwrap_or(0),
                r.get("bytes").and_then(Value::as_u64).unwrap_or(0)
            );
            Ok(())
        }
        ClientCommand::Capacity { conn, zone } => {
            let mut params = Vec::new();
            push_opt(&mut params, "zoneid", zone.as_deref());
            let list = conn.client()?.call_owned("listCapacity", &params).await?;
            print_list(conn.json, &list, "capacity", CAPACITY)
        }
        ClientCommand::Console { conn, vm_id } => {
            let answer = conn
                .client()?
                .call("createConsoleEndpoint", &[("virtualmachineid", &vm_id)])
                .await?;
            if conn.json {
                return print_json(&answer);
            }
            let ep = answer.get("consoleendpoint").unwrap_or(&Value::Null);
            match ep.get("url").and_then(Value::as_str) {
                Some(url) if ep.get("success").and_then(Value::as_bool) != Some(false) => {
                    println!("{url}");
                    Ok(())
                }
                _ => {
                    let details = ep
                        .get("details")
                        .and_then(Value::as_str)
                        .unwrap_or("no URL in the answer");
                    anyhow::bail!("no console for {vm_id}: {details}")
                }
            }
        }
        ClientCommand::Configs { conn, name } => {
            let mut params = Vec::new();
            push_opt(&mut params, "name", name.as_deref());
            let list = conn.client()?.call_owned("listConfigurations", &params).await?;
            print_list(conn.json, &list, "configuration", CONFIGS)
        }
        ClientCommand::SetConfig { conn, name, value } => {
            let answer = conn
                .client()?
                .call("updateConfiguration", &[("name", &name), ("value", &value)])
                .await?;
            if conn.json {
                return print_json(&answer);
            }
            let c = answer.get("configuration").unwrap_or(&Value::Null);
            let cell = |k: &str| table::cell(c.get(k), table::Kind::Text);
            println!("{} = {}", cell("name"), cell("value"));
            Ok(())
        }
        ClientCommand::Api {
            conn,
            command,
            mut params,
            params_from,
        } => {
            if let Some(file) = params_from {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading parameters from {}", file.display()))?;
                params.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                );
            }
            let params = parse_pairs(&params)?;
            let answer = conn.client()?.call_owned(&command, &params).await?;
            print_json(&answer)
        }
    }
}

/// A template's download as `listTemplates` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// `downloaddetails[0].downloadPercent`, clamped to 0–100.
    pub percent: u64,
    /// `downloaddetails[0].downloadState`.
    pub state: String,
    /// `status` text.
    pub status: String,
    /// `isready`.
    pub ready: bool,
}

impl Download {
    /// Reads the download fields of a template object (numbers may come as strings).
    pub fn of(template: &Value) -> Self {
        let details = template.get("downloaddetails").and_then(|d| d.get(0));
        let field = |k: &str| details.and_then(|d| d.get(k));
        let percent = match field("downloadPercent") {
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(v) => v.as_f64(),
            None => None,
        }
        .unwrap_or(0.0)
        .clamp(0.0, 100.0);
        Self {
            // In 0..=100 after the clamp: the cast cannot truncate.
            percent: percent.round() as u64,
            state: field("downloadState")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            status: template
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            ready: template.get("isready").and_then(Value::as_bool) == Some(true),
        }
    }

    /// Whether the download ended without a template (`DOWNLOAD_ERROR` or `ABANDONED`).
    pub fn failed(&self) -> bool {
        matches!(self.state.as_str(), "DOWNLOAD_ERROR" | "ABANDONED")
    }
}

/// Polls the template until it is ready (returns it) or its download failed (an error with its
/// status). A progress bar on a terminal's stderr (bytes done of the total, rate, time left; see
/// [`progress`]), else a line per change of percentage or status. `url` is the image's URL, whose
/// size is asked for once.
async fn wait_download(client: &ApiClient, k: TemplateKind, id: &str, url: &str) -> anyhow::Result<Value> {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos:>3}% {msg}")
                .context("invalid progress bar template")?
                .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    // The size is asked for beside the polls, so an unreachable URL delays nothing.
    let mut size = Some(tokio::spawn(progress::probe_size(url.to_owned())));
    let mut total = None;
    let mut meter = progress::Meter::new();
    let mut last: Option<Download> = None;
    loop {
        if let Some(probe) = size.take_if(|p| p.is_finished()) {
            total = probe.await.ok().flatten();
            // From percent to bytes: the earlier samples are in the other unit.
            meter = progress::Meter::new();
        }
        let list = client.call(k.list, &[(k.filter, "all"), ("id", id)]).await?;
        let Some(t) = items(&list, k.object).first().cloned() else {
            bar.abandon();
            anyhow::bail!("{} {id} is gone", k.object);
        };
        let d = Download::of(&t);
        meter.record(std::time::Instant::now(), progress::done_units(d.percent, total));
        let text = progress::progress_text(d.percent, total, meter.rate(), &d.status, STATUS_WIDTH);
        bar.set_position(d.percent);
        bar.set_message(text.clone());
        if !tty
            && last
                .as_ref()
                .is_none_or(|l| l.percent != d.percent || l.status != d.status)
        {
            eprintln!("{}", format!("{:>3}% {text}", d.percent).trim_end());
        }
        if d.ready {
            bar.finish_and_clear();
            return Ok(t);
        }
        if d.failed() {
            bar.abandon();
            anyhow::bail!("download failed: {}", d.status);
        }
        last = Some(d);
        tokio::time::sleep(DOWNLOAD_POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[derive(Parser)]
    struct TestCli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    #[test]
    fn download_progress_from_template() {
        let t = json!({"isready": false, "status": "42% Downloaded",
            "downloaddetails": [{"downloadState": "DOWNLOAD_IN_PROGRESS", "downloadPercent": "42"}]});
        let d = Download::of(&t);
        assert_eq!(d.percent, 42);
        assert_eq!(d.status, "42% Downloaded");
        assert!(!d.ready && !d.failed());
        let t = json!({"isready": true, "status": "Download Complete",
            "downloaddetails": [{"downloadState": "DOWNLOADED", "downloadPercent": 100}]});
        assert!(Download::of(&t).ready);
        for state in ["DOWNLOAD_ERROR", "ABANDONED"] {
            let t = json!({"status": "x", "downloaddetails": [{"downloadState": state, "downloadPercent": "250"}]});
            let d = Download::of(&t);
            assert!(d.failed(), "{state}");
            assert_eq!(d.percent, 100);
        }
        let d = Download::of(&json!({}));
        assert_eq!((d.percent, d.ready, d.failed()), (0, false, false));
    }

    #[test]
    fn default_data_dir_env_then_xdg_then_home() {
        let dir = |vars: &[(&str, &str)]| {
            default_data_dir_in(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| OsString::from(v))
            })
        };
        let all = [
            ("SYSTEMVM_CORE_DATA_DIR", "/srv/core"),
            ("XDG_DATA_HOME", "/x/data"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(dir(&all), Some(PathBuf::from("/srv/core")));
        assert_eq!(dir(&all[1..]), Some(PathBuf::from("/x/data/systemvm-core")));
        assert_eq!(
            dir(&all[2..]),
            Some(PathBuf::from("/home/u/.local/share/systemvm-core"))
        );
        // Empty values are unset; a relative XDG_DATA_HOME is ignored (XDG base directory spec).
        assert_eq!(
            dir(&[
                ("SYSTEMVM_CORE_DATA_DIR", ""),
                ("XDG_DATA_HOME", "rel"),
                ("HOME", "/h")
            ]),
            Some(PathBuf::from("/h/.local/share/systemvm-core"))
        );
        assert_eq!(dir(&[("HOME", "")]), None);
        assert_eq!(dir(&[]), None);
    }

    #[test]
    fn pairs() {
        assert_eq!(
            parse_pairs(&["a=1".into(), "b=x=y".into(), "c=".into()]).unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x=y".into()),
                ("c".into(), String::new())
            ]
        );
        assert!(parse_pairs(&["novalue".into()]).is_err());
    }

    #[test]
    fn credentials_precedence() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("credentials.json"),
            r#"{"apikey":"file-key","secretkey":"file-secret"}"#,
        )
        .unwrap();
        let d = dir.path().to_str().unwrap();
        let parse = |args: &[&str]| match TestCli::try_parse_from(args).unwrap().cmd {
            ClientCommand::Zones { conn } => conn,
            _ => unreachable!(),
        };
        let conn = parse(&["t", "zones", "--data-dir", d]);
        assert_eq!(conn.credentials().unwrap().apikey, "file-key");
        let conn = parse(&[
            "t",
            "zones",
            "--data-dir",
            d,
            "--api-key",
            "k",
            "--secret-key",
            "s",
        ]);
        assert_eq!(conn.credentials().unwrap().secretkey, "s");
        // Keys are base64url: one may begin with `-` and is still a value, not a flag.
        let conn = parse(&["t", "zones", "--api-key", "-Xk", "--secret-key", "-Xs"]);
        let creds = conn.credentials().unwrap();
        assert_eq!((creds.apikey.as_str(), creds.secretkey.as_str()), ("-Xk", "-Xs"));
        let conn = parse(&["t", "zones", "--api-key", "k"]);
        assert!(conn.credentials().is_err());
        let empty = tempfile::tempdir().unwrap();
        let conn = parse(&["t", "zones", "--data-dir", empty.path().to_str().unwrap()]);
        assert!(
            conn.credentials()
                .unwrap_err()
                .to_string()
                .contains("credentials.json")
        );
    }

    #[test]
    fn register_template_needs_a_format_unless_iso() {
        let base = ["t", "register-template", "--name", "n", "--url", "http://x/y"];
        assert!(TestCli::try_parse_from(base).is_err());
        assert!(TestCli::try_parse_from(base.iter().chain(&["--iso"])).is_ok());
        assert!(TestCli::try_parse_from(base.iter().chain(&["--format", "QCOW2"])).is_ok());
    }
}
