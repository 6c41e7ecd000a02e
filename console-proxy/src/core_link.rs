//! The proxy's link to systemvm-core (`serve --core …`): dials core's agent endpoint with
//! `systemvm-agent-client`, installs the console-token keys core pushes (`Welcome`, `KeysUpdate`)
//! and the operator's certificate (`CertificateUpdate`: TLS on the same port from then on),
//! reports active/max sessions and its public endpoint, and claims each session id from core
//! before opening the console (one session per link across the fleet).
//!
//! Invariants: keys from core replace the proxy's whole key set, so a key core retires stops
//! opening tokens at the next update; keys that fail to parse are logged and ignored (the proxy
//! keeps the set it had). A session whose claim core refuses, or cannot answer, is not opened;
//! only a core too old to know claims (protocol version 1) leaves the proxy's own replay check
//! alone in charge.
//!
//! Settings: `consoleproxy.session.timeout` (milliseconds, 0 = off) from `Welcome.config` and every
//! `ConfigUpdate` sets the idle timeout of new and running sessions; a map without it brings back
//! the command-line value; a value that is not a whole number is logged and the timeout kept as the
//! command line has it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use systemvm_agent_client::{AgentClient, ClientConfig, Hooks};
use systemvm_proto::agent::{AgentRole, ConsoleLoad, Load, config_keys};

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
    let for_config = proxy.clone();
    let for_cert = proxy.clone();
    let hooks = Hooks {
        certificate: Arc::new(move |c| {
            match for_cert.set_certificate(&c.chain_pem, c.key_pem.expose(), c.serial) {
                Ok(true) => {
                    tracing::info!(serial = c.serial, domain = %c.domain_suffix, "Installed the certificate from core")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "Refused the certificate from core; keeping the current one")
                }
            }
        }),
        load: Arc::new(move || Load {
            console: Some(ConsoleLoad {
                active_sessions: for_load.active_sessions() as u64,
                max_sessions: max_sessions as u64,
            }),
            storage: None,
        }),
        config: Arc::new(move |config| {
            let base = for_config.configured_idle_timeout();
            let limit = idle_timeout(&config, base).unwrap_or_else(|error| {
                tracing::warn!(%error, "Setting from core not applied");
                base
            });
            if for_config.idle_timeout().unwrap_or(Duration::ZERO) != limit {
                tracing::info!(
                    idle_timeout_ms = limit.as_millis() as u64,
                    "Session idle timeout changed"
                );
                for_config.set_idle_timeout(limit);
            }
        }),
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

/// A setting from core the proxy cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {value:?} is not a number of milliseconds; the command-line idle timeout stays")]
pub struct BadSetting {
    /// The setting.
    pub key: &'static str,
    /// Its value.
    pub value: String,
}

/// The idle timeout core's `config` sets (`consoleproxy.session.timeout`, ms, 0 = off), `base`
/// when it lacks the key.
pub fn idle_timeout(config: &BTreeMap<String, String>, base: Duration) -> Result<Duration, BadSetting> {
    let key = config_keys::SESSION_IDLE_TIMEOUT_MS;
    match config.get(key) {
        None => Ok(base),
        Some(value) => value
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| BadSetting {
                key,
                value: value.clone(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn idle_timeout_from_core() {
        let base = Duration::from_secs(60);
        let key = config_keys::SESSION_IDLE_TIMEOUT_MS;
        assert_eq!(idle_timeout(&map(&[]), base), Ok(base));
        assert_eq!(
            idle_timeout(&map(&[("max.template.iso.size", "5")]), base),
            Ok(base)
        );
        assert_eq!(
            idle_timeout(&map(&[(key, "300000")]), base),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(idle_timeout(&map(&[(key, " 0 ")]), base), Ok(Duration::ZERO));
        for bad in ["-1", "5m", "", "1.5"] {
            let err = idle_timeout(&map(&[(key, bad)]), base).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}
