//! A minimal stand-in for core's agent endpoint, for smoke tests of the agents' `--core` mode:
//! its own CA (written to `ca.pem`), a TLS WebSocket listener on loopback with a certificate for
//! `127.0.0.1` and `localhost`, and helpers to accept an agent and exchange messages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use systemvm_proto::agent::{AgentMessage, CoreMessage, Hello};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Io = std::io::Error;

fn other(e: impl std::fmt::Display) -> Io {
    Io::other(e.to_string())
}

/// The listening stand-in.
pub struct StandinCore {
    /// Its address.
    pub addr: SocketAddr,
    /// The CA file to give the agent (`--ca`).
    pub ca_pem: PathBuf,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// One agent connected to the stand-in.
pub struct AgentConn {
    ws: WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>,
}

impl StandinCore {
    /// Makes a CA in `dir` and listens on 127.0.0.1.
    pub async fn start(dir: &Path) -> Result<StandinCore, Io> {
        let ca_key = rcgen::KeyPair::generate().map_err(other)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).map_err(other)?;
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let leaf_key = rcgen::KeyPair::generate().map_err(other)?;
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .map_err(other)?
            .signed_by(&leaf_key, &issuer)
            .map_err(other)?;
        std::fs::create_dir_all(dir)?;
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem())?;
        let tls =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(other)?
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .map_err(other)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(StandinCore {
            addr: listener.local_addr()?,
            ca_pem,
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        })
    }

    /// The `--core` URL, with `host` as the name (`127.0.0.1` or `localhost`).
    pub fn url(&self, host: &str) -> String {
        format!("wss://{host}:{}/agent", self.addr.port())
    }

    /// Waits for an agent to dial in and say Hello.
    pub async fn accept(&self, within: Duration) -> Result<(AgentConn, Hello), Io> {
        let (tcp, _) = tokio::time::timeout(within, self.listener.accept())
            .await
            .map_err(|_| other("no agent dialled in"))??;
        let tls = self.acceptor.accept(tcp).await?;
        let ws = tokio_tungstenite::accept_async(tls).await.map_err(other)?;
        let mut conn = AgentConn { ws };
        match conn.recv(within).await? {
            AgentMessage::Hello(hello) => Ok((conn, hello)),
            other_message => Err(other(format!("first message is not Hello: {other_message:?}"))),
        }
    }
}

impl AgentConn {
    /// Sends a message to the agent.
    pub async fn send(&mut self, msg: &CoreMessage) -> Result<(), Io> {
        let text = serde_json::to_string(msg).map_err(other)?;
        self.ws.send(Message::text(text)).await.map_err(other)
    }

    /// The agent's next message (pings and pongs skipped).
    pub async fn recv(&mut self, within: Duration) -> Result<AgentMessage, Io> {
        loop {
            let msg = tokio::time::timeout(within, self.ws.next())
                .await
                .map_err(|_| other("agent sent nothing"))?
                .ok_or_else(|| other("agent closed the connection"))?
                .map_err(other)?;
            if let Message::Text(text) = msg {
                return serde_json::from_str(&text).map_err(other);
            }
        }
    }
}
