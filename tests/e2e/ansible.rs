//! Ansible's `ngine_io.cloudstack` modules (PyPI `ansible` 9.13.0 in `target/ansible-venv`,
//! installed by `scripts/deps.sh test`) drive a core (SQLite): `cs_account`, `cs_user`,
//! `cs_zone`, `cs_image_store`, `cs_configuration`, `cs_template`, `cs_iso` and
//! `cs_instance_info` tasks succeed, and a second run of the same playbook changes nothing.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::path::PathBuf;

use serde_json::Value;

use crate::core_api::{Backend, Core};
use crate::support::workspace;

const PLAYBOOK: &str = r#"
- hosts: localhost
  gather_facts: false
  tasks:
    - name: account
      ngine_io.cloudstack.cs_account:
        name: ops
        username: ops
        password: "Ops pass 1"
        first_name: Op
        last_name: Erator
        email: ops@example.org
        account_type: user
        domain: ROOT
    - name: second user of the account, with keys
      ngine_io.cloudstack.cs_user:
        username: ops2
        account: ops
        password: "Ops pass 2"
        first_name: Second
        last_name: Op
        email: ops2@example.org
        domain: ROOT
        keys_registered: true
    - name: zone
      ngine_io.cloudstack.cs_zone:
        name: az2
        dns1: 192.0.2.53
        network_type: Advanced
    - name: image store
      ngine_io.cloudstack.cs_image_store:
        name: store-az2
        url: nfs://192.0.2.10/export
        zone: az2
        provider: NFS
    - name: setting
      ngine_io.cloudstack.cs_configuration:
        name: consoleproxy.session.max
        value: 40
    - name: template
      ngine_io.cloudstack.cs_template:
        name: tmpl1
        url: http://192.0.2.20/tmpl1.qcow2
        format: QCOW2
        hypervisor: KVM
        os_type: Ubuntu 22.04 LTS
        zone: az2
    - name: iso
      ngine_io.cloudstack.cs_iso:
        name: iso1
        url: http://192.0.2.20/iso1.iso
        os_type: Other (64-bit)
        zone: az2
    - name: instances
      ngine_io.cloudstack.cs_instance_info:
      register: vms
    - name: the console target is an instance
      ansible.builtin.assert:
        that:
          - vms.instances | length == 1
          - vms.instances[0].name == "web-1"
"#;

fn ansible_playbook() -> PathBuf {
    let bin = workspace().join("target/ansible-venv/bin/ansible-playbook");
    assert!(
        bin.is_file(),
        "{} missing: run scripts/deps.sh test",
        bin.display()
    );
    bin
}

/// Runs the playbook; returns the `stats` of localhost from Ansible's JSON output.
async fn run(core: &Core, playbook: &std::path::Path) -> Value {
    let venv = workspace().join("target/ansible-venv/bin");
    let out = tokio::process::Command::new(ansible_playbook())
        .env_clear()
        .env(
            "PATH",
            format!("{}:{}", venv.display(), std::env::var("PATH").unwrap_or_default()),
        )
        .env("HOME", std::env::temp_dir())
        .env("LANG", "C.UTF-8")
        .env("CLOUDSTACK_ENDPOINT", core.running().api_url())
        .env("CLOUDSTACK_KEY", &core.key)
        .env("CLOUDSTACK_SECRET", &core.secret)
        .env("CLOUDSTACK_TIMEOUT", "30")
        .env("ANSIBLE_PYTHON_INTERPRETER", venv.join("python"))
        .env("ANSIBLE_STDOUT_CALLBACK", "json")
        .env("ANSIBLE_LOCALHOST_WARNING", "false")
        .env("ANSIBLE_INVENTORY_UNPARSED_WARNING", "false")
        .args(["-i", "localhost,", "-c", "local"])
        .arg(playbook)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "ansible-playbook printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // Each failed task with its message, for the assertion below.
    let failed: Vec<String> = v["plays"][0]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["hosts"]["localhost"]["failed"] == true)
        .map(|t| format!("{}: {}", t["task"]["name"], t["hosts"]["localhost"]["msg"]))
        .collect();
    assert!(failed.is_empty(), "failed tasks: {failed:#?}");
    let changed: Vec<String> = v["plays"][0]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["hosts"]["localhost"]["changed"] == true)
        .map(|t| t["task"]["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut stats = v["stats"]["localhost"].clone();
    stats["changed_tasks"] = serde_json::json!(changed);
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbook_applies_and_is_idempotent() {
    let core = Core::start(Backend::Sqlite).await;
    core.ok(&["addConsoleTarget", "name=web-1", "host=192.0.2.30", "port=5901"])
        .await;
    let playbook = core.dir().join("site.yml");
    std::fs::write(&playbook, PLAYBOOK).unwrap();

    let first = run(&core, &playbook).await;
    assert_eq!(first["failures"], 0, "{first}");
    assert!(
        first["changed"].as_u64().unwrap() >= 7,
        "every resource created: {first}"
    );
    // What the playbook made, as core sees it.
    let users = core.ok(&["listUsers", "account=ops"]).await;
    assert_eq!(users["count"], 2, "{users}");
    let t = core
        .ok(&["listTemplates", "templatefilter=self", "name=tmpl1"])
        .await;
    assert_eq!(t["template"][0]["ostypename"], "Ubuntu 22.04 LTS", "{t}");
    let c = core
        .ok(&["listConfigurations", "name=consoleproxy.session.max"])
        .await;
    assert_eq!(c["configuration"][0]["value"], "40");

    let second = run(&core, &playbook).await;
    assert_eq!(second["failures"], 0, "{second}");
    assert_eq!(
        second["changed"], 0,
        "a second run changed: {}",
        second["changed_tasks"]
    );
}
