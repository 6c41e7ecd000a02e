//! The agent a system VM runs for its role, and its command line inside the image. Pure: the
//! init spawns what [`command`] describes.
//!
//! Invariants: the secret goes in the environment (`SYSTEMVM_AGENT_SECRET`), never in an
//! argument (`/proc/PID/cmdline` is world-readable); both agents listen on [`GUEST_PORT`], the
//! port core's drivers forward; the storage VM keeps its job journal on the store (the agent's
//! default), so it outlives the VM.

use std::path::{Path, PathBuf};

use systemvm_proto::agent::AgentRole;
use systemvm_proto::seed::BootConfig;

/// The agent binary of `role`, under [`BIN_DIR`].
pub fn binary(role: AgentRole) -> &'static str {
    match role {
        AgentRole::ConsoleProxy => "console-proxy",
        AgentRole::SecStorage => "ssvm-agent",
    }
}

/// The port a system VM's browser-facing server listens on (CloudStack's console proxy port;
/// the storage VM's transfer server uses the same inside its own VM).
pub const GUEST_PORT: u16 = 8080;
/// Where the image keeps the agents.
pub const BIN_DIR: &str = "/opt/systemvm/bin";
/// The console proxy's web root in the image (console.html, noVNC).
pub const WEB_DIR: &str = "/opt/systemvm/web";

/// A process to start: program, arguments, environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Spawn {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment (the secret among it).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for Spawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawn")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

/// The agent of `c.role`, trusting the CA written at `ca`.
pub fn command(c: &BootConfig, ca: &Path) -> Spawn {
    let listen = format!("0.0.0.0:{GUEST_PORT}");
    let mut args: Vec<String> = vec!["serve".into()];
    match c.role {
        AgentRole::ConsoleProxy => {
            args.extend(["--listen".into(), listen, "--web".into(), WEB_DIR.into()]);
            args.extend(["--max-sessions".into(), c.max_sessions.to_string()]);
            if let Some(u) = &c.public_url {
                args.extend(["--public-url".into(), u.clone()]);
            }
        }
        AgentRole::SecStorage => {
            args.extend([
                "--store".into(),
                c.store_url.clone().unwrap_or_default(),
                "--public-listen".into(),
                listen,
            ]);
            if let Some(u) = &c.store_as {
                args.extend(["--store-as".into(), u.clone()]);
            }
            if let Some(u) = &c.transfer_url {
                args.extend(["--public-url".into(), u.clone()]);
            }
            for cidr in &c.allow_internal {
                args.extend(["--allow-internal".into(), cidr.clone()]);
            }
        }
    }
    args.extend([
        "--core".into(),
        c.core.join(","),
        "--vm-id".into(),
        c.vm_id.clone(),
        "--ca".into(),
        ca.display().to_string(),
    ]);
    Spawn {
        program: Path::new(BIN_DIR).join(binary(c.role)),
        args,
        env: vec![("SYSTEMVM_AGENT_SECRET".into(), c.secret.clone())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(role: AgentRole) -> BootConfig {
        BootConfig {
            role,
            vm_id: "vm1".into(),
            name: "v-1-VM".into(),
            core: vec!["wss://10.0.2.2:8250/agent".into(), "wss://c2:8250/agent".into()],
            secret: "top-secret".into(),
            ca_pem: String::new(),
            store_url: Some("nfs://10.0.2.2/export".into()),
            store_as: Some("nfs://127.0.0.1/export".into()),
            allow_internal: vec!["10.0.2.2/32".into()],
            max_sessions: 7,
            public_url: Some("http://127.0.0.1:41000".into()),
            transfer_url: Some("http://127.0.0.1:41001".into()),
            network: None,
        }
    }

    #[test]
    fn secret_only_in_the_environment() {
        for role in [AgentRole::ConsoleProxy, AgentRole::SecStorage] {
            let s = command(&config(role), Path::new("/run/systemvm/ca.pem"));
            assert!(!s.args.join(" ").contains("top-secret"));
            assert_eq!(
                s.env,
                vec![("SYSTEMVM_AGENT_SECRET".to_owned(), "top-secret".to_owned())]
            );
            assert!(!format!("{s:?}").contains("top-secret"));
            let a = s.args.join(" ");
            assert!(a.contains("--core wss://10.0.2.2:8250/agent,wss://c2:8250/agent --vm-id vm1 --ca /run/systemvm/ca.pem"), "{a}");
        }
    }

    #[test]
    fn role_arguments() {
        let p = command(&config(AgentRole::ConsoleProxy), Path::new("/ca"));
        assert_eq!(p.program, Path::new("/opt/systemvm/bin/console-proxy"));
        let a = p.args.join(" ");
        assert!(a.starts_with("serve --listen 0.0.0.0:8080 --web /opt/systemvm/web --max-sessions 7 --public-url http://127.0.0.1:41000"), "{a}");
        let s = command(&config(AgentRole::SecStorage), Path::new("/ca"));
        assert_eq!(s.program, Path::new("/opt/systemvm/bin/ssvm-agent"));
        let a = s.args.join(" ");
        assert!(a.starts_with("serve --store nfs://10.0.2.2/export --public-listen 0.0.0.0:8080 --store-as nfs://127.0.0.1/export --public-url http://127.0.0.1:41001 --allow-internal 10.0.2.2/32"), "{a}");
    }
}
