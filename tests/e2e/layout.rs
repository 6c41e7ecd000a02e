//! Workspace policy checked with `cargo metadata`: the dependency direction of DESIGN.md.

use std::process::Command;

use crate::support::workspace;

fn metadata() -> serde_json::Value {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("metadata json")
}

fn deps_of<'a>(meta: &'a serde_json::Value, package: &str) -> Vec<&'a str> {
    let pkg = meta["packages"]
        .as_array()
        .expect("packages list")
        .iter()
        .find(|p| p["name"] == package)
        .unwrap_or_else(|| panic!("package {package} not in the workspace"));
    pkg["dependencies"]
        .as_array()
        .expect("dependency list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect()
}

#[test]
fn agents_never_depend_on_core() {
    let meta = metadata();
    for agent in [
        "console-proxy",
        "ssvm-agent",
        "systemvm-agent-client",
        "systemvm-image",
    ] {
        assert!(
            !deps_of(&meta, agent).contains(&"systemvm-core"),
            "{agent} depends on systemvm-core"
        );
    }
}

#[test]
fn wire_types_do_no_io() {
    let meta = metadata();
    let deps = deps_of(&meta, "systemvm-proto");
    for banned in [
        "tokio",
        "hyper",
        "sqlx",
        "rusqlite",
        "aws-sdk-s3",
        "systemvm-core",
    ] {
        assert!(!deps.contains(&banned), "systemvm-proto depends on {banned}");
    }
}

#[test]
fn agent_client_speaks_only_the_wire_types() {
    let meta = metadata();
    let deps = deps_of(&meta, "systemvm-agent-client");
    assert!(deps.contains(&"systemvm-proto"));
    for banned in ["systemvm-core", "sqlx", "console-proxy", "ssvm-agent"] {
        assert!(
            !deps.contains(&banned),
            "systemvm-agent-client depends on {banned}"
        );
    }
}

/// The image's process 1 is plain std: no runtime, no agent code (it starts the agents' binaries).
#[test]
fn the_image_init_runs_no_runtime() {
    let meta = metadata();
    let deps = deps_of(&meta, "systemvm-image");
    assert!(deps.contains(&"systemvm-proto"));
    for banned in [
        "tokio",
        "hyper",
        "console-proxy",
        "ssvm-agent",
        "systemvm-agent-client",
    ] {
        assert!(!deps.contains(&banned), "systemvm-image depends on {banned}");
    }
}

// === core's layers ===

/// A layer of core, by the module a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// HTTP handlers and the API edge: `api/`, `server`, `command`, `params`, `paging`, `error`.
    Handlers,
    /// The domain layer: `model/`.
    Domain,
    /// Background parts: the agent endpoint, the fleet, the dispatcher, the follower, the
    /// snapshot runner, the replicator.
    Background,
    /// Shared infrastructure and entry points (database, state, hub, CLI, `up`, `lib`): not checked.
    Shared,
}

/// The layer of a top-level module of core.
fn layer_of_module(module: &str) -> Layer {
    match module {
        "api" | "server" | "command" | "params" | "paging" | "error" => Layer::Handlers,
        "model" => Layer::Domain,
        "agent" | "dispatch" | "follow" | "fleet" | "backup" | "replicate" => Layer::Background,
        _ => Layer::Shared,
    }
}

/// The layer of a file, by its path under `core/src`.
fn layer_of_file(rel: &str) -> Layer {
    let first = rel.split('/').next().unwrap_or(rel);
    layer_of_module(first.trim_end_matches(".rs"))
}

/// Every `crate::MODULE` a source text names (in `use` lines and paths, including
/// `use crate::{a, b::c}` groups); comments are skipped.
fn modules_named(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// The layering rule of ARCHITECTURE.md: handlers → domain ← background parts. The domain layer
/// names neither handlers nor background parts; background parts never name the handlers.
fn layer_violations(rel: &str, text: &str) -> Vec<String> {
    let from = layer_of_file(rel);
    modules_named(text)
        .into_iter()
        .filter_map(|m| {
            let to = layer_of_module(&m);
            let bad = matches!(
                (from, to),
                (Layer::Domain, Layer::Handlers | Layer::Background) | (Layer::Background, Layer::Handlers)
            );
            bad.then(|| format!("{rel} ({from:?}) uses crate::{m} ({to:?})"))
        })
        .collect()
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read core/src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn core_layers() {
    let src = workspace().join("core/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "core/src looks empty: {files:?}");
    let mut violations = Vec::new();
    let mut seen = [false; 3];
    for path in &files {
        let rel = path
            .strip_prefix(&src)
            .expect("under core/src")
            .to_string_lossy()
            .into_owned();
        match layer_of_file(&rel) {
            Layer::Handlers => seen[0] = true,
            Layer::Domain => seen[1] = true,
            Layer::Background => seen[2] = true,
            Layer::Shared => {}
        }
        let text = std::fs::read_to_string(path).expect("read source");
        violations.extend(layer_violations(&rel, &text));
        if layer_of_file(&rel) == Layer::Domain {
            for http in ["hyper::", "ApiError", "Params", "StatusCode"] {
                assert!(
                    !text
                        .lines()
                        .any(|l| !l.trim_start().starts_with("//") && l.contains(http)),
                    "the domain layer knows no HTTP, but {rel} names {http}"
                );
            }
        }
    }
    assert_eq!(seen, [true; 3], "every layer has files");
    assert!(
        violations.is_empty(),
        "layering broken:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_layer_check_catches_a_handler_import_from_a_background_module() {
    assert_eq!(
        layer_violations("fleet/manager.rs", "use crate::api::systemvms;\n").len(),
        1
    );
    assert_eq!(
        layer_violations("agent.rs", "use crate::{model::settings, server::serve};\n").len(),
        1
    );
    assert_eq!(
        layer_violations("model/settings.rs", "let f = crate::fleet::TICK;\n").len(),
        1
    );
    assert!(layer_violations("api/templates.rs", "use crate::model::templates;\n").is_empty());
    assert!(
        layer_violations(
            "fleet/lifecycle.rs",
            "use crate::model::events; // crate::api::x\n"
        )
        .is_empty()
    );
}
