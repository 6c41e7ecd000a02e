//! The proxy's link to systemvm-core (`serve --core …`): dials core's agent endpoint with
//! `systemvm-agent-client`, installs the console-token keys core pushes (`Welcome`, `KeysUpdate`),
//! reports active/max sessions and its public endpoint, and claims each session id from core
//! before opening the console (one session per link across the fleet).
//!
//! Invariants: keys from core replace the proxy's whole key set, so a key core retires stops
//! opening tokens at the next update; keys that fail to parse are logged and ignored (the proxy
//! keeps the set it had). A session whose claim core refuses, or cannot answer, is not opened;
//! only a core too old to know claims (protocol version 1) leaves the proxy's own replay check
//! alone in charge.

use std::sync::Arc;

use systemvm_agent_client::{AgentClient, ClientConfig, Hooks};
use systemvm_proto::agent::{AgentRole, ConsoleLoad, Load};

use crate::server::RunningProxy;

pub use systemvm_agent_client::CoreLink;

/// Starts the link: the returned client runs until [`AgentClient::shutdown`].
pub fn connect(
    proxy: Arc<RunningProxy>,
    max_sessions: usize,
    link: &CoreLink,
    endpoint: Option<String>,
) -> anyhow::Result<AgentClient> {
    let mut config = ClientConfig::new(
        &link.urls,
        &link.ca,
        AgentRole::ConsoleProxy,
        link.vm_id.clone(),
        link.secret.clone(),
    )?;
    config.capabilities = vec!["console".into()];
    config.software_version = env!("CARGO_PKG_VERSION").into();
    config.endpoint = endpoint;
    let for_load = proxy.clone();
    let for_claims = proxy.clone();
    let hooks = Hooks {
        load: Arc::new(move || Load {
            console: Some(ConsoleLoad {
                active_sessions: for_load.active_sessions() as u64,
                max_sessions: max_sessions as u64,
            }),
            storage: None,
        }),
        config: Arc::new(|_| {}),
        keys: Arc::new(move |keys| match keys.to_key_set() {
            Ok(set) => {
                tracing::info!(ids = ?set.ids(), "Installed console-token keys from core");
                proxy.set_keys(set);
            }
            Err(error) => tracing::warn!(%error, "Ignored invalid console-token keys from core"),
        }),
        ..Hooks::default()
    };
    let client = AgentClient::spawn(config, hooks);
    for_claims.set_claimer(client.claimer());
    Ok(client)
}
