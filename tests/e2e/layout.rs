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
    for agent in ["console-proxy", "ssvm-agent", "systemvm-agent-client"] {
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
