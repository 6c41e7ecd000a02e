//! The operator's certificate for the browser-facing servers of console proxies and storage VMs
//! (`uploadCustomCertificate`), and the public URLs built with it.
//!
//! CloudStack's flow: chain certificates are uploaded first with `id` 2, 3, … (and a `name`), then
//! the server certificate with `id` 1 (or none) and its `privatekey`; the server certificate is
//! installed with the chain parts uploaded for the same `domainsuffix`, in `id` order.
//!
//! Invariants:
//! * a certificate is stored only when it parses and its key matches (a bad upload changes
//!   nothing); the stored record (row `certificate` of `core_keys`) is sealed with core's secrets
//!   key, and its key never reaches a log, an answer or a command line;
//! * each upload gets a higher serial; every core follows the stored serial each second and the
//!   lease holder pushes a new one to every connected system VM (`CertificateUpdate`), and each
//!   agent gets the current one in `Welcome`;
//! * with a certificate, links and upload URLs name the system VM as CloudStack does
//!   (`https://a-b-c-d.<domain>:<port>`, the domain from `consoleproxy.url.domain` /
//!   `secstorage.ssl.cert.domain`, else the certificate's suffix); without one, the agent's own
//!   URL. `use.https.to.upload=false` keeps storage VM URLs on plain HTTP.

use serde::{Deserialize, Serialize};
use systemvm_proto::Secret;
use systemvm_proto::agent::{AgentRole, CertificateUpdate, CoreMessage, ServerCertificate};

use crate::model::{DomainError, DomainResult, settings};
use crate::secrets::Opened;
use crate::state::State;
use crate::util::now_cs;

const ROW: &str = "certificate";
const PARTS: &str = "certificate_parts";

/// A chain part waiting for its server certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Part {
    id: u32,
    name: String,
    domain_suffix: String,
    pem: String,
}

/// What `uploadCustomCertificate` sends.
#[derive(Debug, Clone)]
pub struct Upload<'a> {
    /// `certificate`: PEM (a server certificate may carry its chain after it).
    pub certificate: &'a str,
    /// `privatekey`: PEM (the server certificate's).
    pub private_key: Option<&'a str>,
    /// `domainsuffix`: `example.org` or `*.example.org`.
    pub domain_suffix: &'a str,
    /// `id`: 1 (or none) for the server certificate, 2… for chain certificates.
    pub id: Option<u32>,
    /// `name`: a chain certificate's alias.
    pub name: Option<&'a str>,
}

fn suffix(s: &str) -> String {
    s.trim()
        .trim_start_matches("*.")
        .trim_matches('.')
        .to_ascii_lowercase()
}

async fn read_row(state: &State, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM core_keys WHERE name = $1")
        .bind(name.to_owned())
        .fetch_optional(&state.db.pool)
        .await
}

async fn write_row(state: &State, name: &str, value: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO core_keys (name, value, created) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET value = $2, created = $3",
    )
    .bind(name.to_owned())
    .bind(value.to_owned())
    .bind(now_cs())
    .execute(&state.db.pool)
    .await
    .map(|_| ())
}

/// The stored certificate, if any.
pub async fn current(state: &State) -> DomainResult<Option<ServerCertificate>> {
    let Some(text) = read_row(state, ROW).await? else {
        return Ok(None);
    };
    let json = match state
        .secrets
        .open(ROW, &text)
        .map_err(|e| DomainError::Internal(e.to_string()))?
    {
        Opened::Sealed(j) | Opened::Plain(j) => j,
    };
    serde_json::from_str(&json)
        .map(Some)
        .map_err(|e| DomainError::Internal(format!("stored certificate unreadable: {e}")))
}

/// Records one `uploadCustomCertificate`; returns CloudStack's message.
pub async fn upload(state: &State, u: &Upload<'_>) -> DomainResult<String> {
    let domain = suffix(u.domain_suffix);
    if domain.is_empty() || domain.contains(['/', ' ', ':']) {
        return Err(DomainError::Invalid(format!(
            "Invalid domain suffix {:?}",
            u.domain_suffix
        )));
    }
    let id = u.id.unwrap_or(1);
    let mut parts: Vec<Part> = match read_row(state, PARTS).await? {
        Some(t) => serde_json::from_str(&t).unwrap_or_default(),
        None => Vec::new(),
    };
    let Some(key) = u.private_key.filter(|_| id == 1) else {
        if id == 1 {
            return Err(DomainError::Invalid(
                "The server certificate (id 1) needs its privatekey".into(),
            ));
        }
        // A chain certificate: checked, kept for the server certificate of this domain.
        systemvm_agent_client::tls::parse_chain(u.certificate)
            .map_err(|e| DomainError::Invalid(format!("Invalid certificate: {e}")))?;
        parts.retain(|p| !(p.id == id && p.domain_suffix == domain));
        parts.push(Part {
            id,
            name: u.name.unwrap_or_default().to_owned(),
            domain_suffix: domain,
            pem: u.certificate.trim().to_owned(),
        });
        let text = serde_json::to_string(&parts).map_err(|e| DomainError::Internal(e.to_string()))?;
        write_row(state, PARTS, &text).await?;
        return Ok(format!(
            "Certificate {id} of the chain for {} recorded",
            u.domain_suffix
        ));
    };
    let mut chain: Vec<&Part> = parts.iter().filter(|p| p.domain_suffix == domain).collect();
    chain.sort_by_key(|p| p.id);
    let mut chain_pem = u.certificate.trim().to_owned();
    for p in chain {
        chain_pem.push('\n');
        chain_pem.push_str(&p.pem);
    }
    chain_pem.push('\n');
    systemvm_agent_client::tls::certified_key(&chain_pem, key)
        .map_err(|e| DomainError::Invalid(format!("Invalid certificate: {e}")))?;
    let serial = current(state).await?.map_or(0, |c| c.serial) + 1;
    let cert = ServerCertificate {
        chain_pem,
        key_pem: Secret(key.trim().to_owned() + "\n"),
        domain_suffix: domain.clone(),
        serial,
    };
    let json = serde_json::to_string(&cert).map_err(|e| DomainError::Internal(e.to_string()))?;
    let sealed = state
        .secrets
        .seal(ROW, &json)
        .map_err(|e| DomainError::Internal(e.to_string()))?;
    write_row(state, ROW, &sealed).await?;
    parts.retain(|p| p.domain_suffix != domain);
    let text = serde_json::to_string(&parts).map_err(|e| DomainError::Internal(e.to_string()))?;
    write_row(state, PARTS, &text).await?;
    tracing::info!(domain = %domain, serial, "Custom certificate stored; system VMs get it within a second");
    state.settings_changed.notify_one();
    Ok("Certificate has been successfully updated, it will be applied to the console proxies and storage VMs within a second".into())
}

/// Every core, every second: the lease holder pushes a certificate it has not pushed yet to
/// every connected system VM. Returns whether it pushed.
pub async fn follow(state: &State) -> DomainResult<bool> {
    let Some(cert) = current(state).await? else {
        return Ok(false);
    };
    let known = state.cert_serial.load(std::sync::atomic::Ordering::Relaxed);
    if cert.serial == known || !state.is_leader() {
        return Ok(false);
    }
    let msg = CoreMessage::CertificateUpdate(CertificateUpdate {
        certificate: cert.clone(),
    });
    let n = state.agents.broadcast(AgentRole::ConsoleProxy, &msg)
        + state.agents.broadcast(AgentRole::SecStorage, &msg);
    state
        .cert_serial
        .store(cert.serial, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(serial = cert.serial, agents = n, "Pushed the custom certificate");
    Ok(true)
}

/// The URL browsers reach a system VM at: its reported `endpoint`, or with a certificate
/// `https://a-b-c-d.<domain>:<port>` (CloudStack's naming; a host name stays as it is).
pub async fn public_url(state: &State, role: AgentRole, endpoint: &str) -> String {
    let Ok(Some(cert)) = current(state).await else {
        return endpoint.to_owned();
    };
    let (domain_setting, https) = match role {
        AgentRole::ConsoleProxy => (&settings::PROXY_URL_DOMAIN, true),
        AgentRole::SecStorage => (
            &settings::SSVM_CERT_DOMAIN,
            settings::text(state, &settings::USE_HTTPS_TO_UPLOAD)
                .await
                .eq_ignore_ascii_case("true"),
        ),
    };
    if !https {
        return endpoint.to_owned();
    }
    let configured = suffix(&settings::text(state, domain_setting).await);
    let domain = if configured.is_empty() {
        cert.domain_suffix
    } else {
        configured
    };
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return endpoint.to_owned();
    };
    let host = uri.host().unwrap_or_default();
    let name = match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => format!("{}.{domain}", ip.to_string().replace('.', "-")),
        Err(_) => host.to_owned(),
    };
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("https://{name}{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(suffix("*.Example.org"), "example.org");
        assert_eq!(suffix(" example.org. "), "example.org");
    }
}
