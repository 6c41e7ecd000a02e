//! The storage agent's link to systemvm-core (`serve --core …`): dials core's agent endpoint with
//! `systemvm-agent-client` and reports jobs and store health/capacity in heartbeats.
//!
//! Invariant: a heartbeat never waits on the store: the load is refreshed by its own task (every
//! [`REFRESH`]) and heartbeats send the latest copy, so a hung NFS server cannot silence the agent
//! (core would then mark a live agent Disconnected).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use systemvm_agent_client::{AgentClient, ClientConfig, Hooks};
use systemvm_proto::agent::{AgentRole, Load, StorageLoad};

use crate::service::Agent;

/// How often the reported load is refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);

pub use systemvm_agent_client::CoreLink;

/// The running link.
#[derive(Debug)]
pub struct RunningLink {
    client: AgentClient,
    refresher: tokio::task::JoinHandle<()>,
}

impl RunningLink {
    /// The client (status).
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Stops the link.
    pub async fn shutdown(self) {
        self.refresher.abort();
        self.client.shutdown().await;
    }
}

/// Starts the link.
pub fn connect(agent: Arc<Agent>, link: &CoreLink) -> anyhow::Result<RunningLink> {
    let mut config = ClientConfig::new(
        &link.urls,
        &link.ca,
        AgentRole::SecStorage,
        link.vm_id.clone(),
        link.secret.clone(),
    )?;
    config.capabilities = vec!["download".into()];
    config.software_version = env!("CARGO_PKG_VERSION").into();
    let latest = Arc::new(Mutex::new(StorageLoad {
        store_health: "unknown".into(),
        ..Default::default()
    }));
    let writer = latest.clone();
    let refresher = tokio::spawn(async move {
        loop {
            let load = agent.storage_load().await;
            *writer.lock().unwrap_or_else(PoisonError::into_inner) = load;
            tokio::time::sleep(REFRESH).await;
        }
    });
    let hooks = Hooks {
        load: Arc::new(move || Load {
            console: None,
            storage: Some(latest.lock().unwrap_or_else(PoisonError::into_inner).clone()),
        }),
        keys: Arc::new(|_| {}),
    };
    Ok(RunningLink {
        client: AgentClient::spawn(config, hooks),
        refresher,
    })
}
