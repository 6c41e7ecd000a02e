//! The connection registry of the agent channel: each system VM's current connection, commands
//! waiting for answers, and sends to one agent or to every agent of a role. The agent endpoint
//! (`crate::agent`) fills it; the domain layer and the background parts send through it.
//!
//! Invariants: one current connection per system VM (a newer one replaces, and closes, the
//! older); command ids are random (unguessable), and an answer completes a command only when it
//! comes from the very connection the command was sent on (another VM, or a later connection of
//! the same VM, cannot answer it); a command whose connection ends fails at once
//! ([`CallError::Lost`]); sends never block (a full queue is a failed send).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use systemvm_proto::agent::{AgentCommand, AgentRole, Answer, Command, CoreMessage};
use tokio::sync::{mpsc, oneshot};

/// A current agent connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    close: oneshot::Sender<()>,
    tx: mpsc::Sender<CoreMessage>,
    role: AgentRole,
    version: u32,
}

/// A command could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The system VM has no current connection.
    #[error("system VM {0} is not connected")]
    NotConnected(String),
    /// The connection ended before the answer came.
    #[error("system VM {0} disconnected before answering")]
    Lost(String),
    /// No answer in time.
    #[error("system VM {vm_id} did not answer within {secs}s")]
    Timeout {
        /// The VM.
        vm_id: String,
        /// The time allowed.
        secs: u64,
    },
}

/// A command waiting for its answer: where it was sent.
#[derive(Debug)]
struct Pending {
    vm_id: String,
    conn: u64,
    tx: oneshot::Sender<Answer>,
}

/// The current connection of each system VM, and the commands waiting for answers.
#[derive(Debug, Default)]
pub struct Hub {
    conns: std::sync::Mutex<HashMap<String, Conn>>,
    pending: std::sync::Mutex<HashMap<String, Pending>>,
    next: AtomicU64,
}

impl Hub {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a new connection current for `vm_id`, closing the previous one.
    pub(crate) fn register(
        &self,
        vm_id: &str,
        role: AgentRole,
        version: u32,
    ) -> (u64, oneshot::Receiver<()>, mpsc::Receiver<CoreMessage>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        let (tx, rx) = mpsc::channel(64);
        let conn = Conn {
            id,
            close,
            tx,
            role,
            version,
        };
        let old = self.conns().insert(vm_id.to_owned(), conn);
        if let Some(old) = old {
            let _ = old.close.send(());
            self.lose(Some((vm_id, old.id)));
        }
        (id, closed, rx)
    }

    /// Drops the commands waiting on connection `conn` (all of them: `None`): their callers get
    /// [`CallError::Lost`] at once instead of waiting out their timeouts.
    fn lose(&self, conn: Option<(&str, u64)>) {
        self.pending().retain(|_, p| match conn {
            Some((vm, id)) => !(p.vm_id == vm && p.conn == id),
            None => false,
        });
    }

    /// Forgets connection `id` of `vm_id`; false when a newer connection replaced it.
    pub(crate) fn unregister(&self, vm_id: &str, id: u64) -> bool {
        let mut conns = self.conns();
        let current = conns.get(vm_id).is_some_and(|c| c.id == id);
        if current {
            conns.remove(vm_id);
        }
        drop(conns);
        self.lose(Some((vm_id, id)));
        current
    }

    /// The id of `vm_id`'s current connection.
    pub fn connection(&self, vm_id: &str) -> Option<u64> {
        self.conns().get(vm_id).map(|c| c.id)
    }

    /// The protocol version `vm_id`'s current connection speaks.
    pub fn version(&self, vm_id: &str) -> Option<u32> {
        self.conns().get(vm_id).map(|c| c.version)
    }

    /// Queues a message for `vm_id`; false when it is not connected or its queue is full.
    pub fn push(&self, vm_id: &str, message: CoreMessage) -> bool {
        self.conns()
            .get(vm_id)
            .is_some_and(|c| c.tx.try_send(message).is_ok())
    }

    /// Queues a message for every connected agent of `role`; returns how many got it.
    pub fn broadcast(&self, role: AgentRole, message: &CoreMessage) -> usize {
        self.conns()
            .values()
            .filter(|c| c.role == role)
            .filter(|c| c.tx.try_send(message.clone()).is_ok())
            .count()
    }

    /// Sends a command to `vm_id`'s current connection and waits up to `timeout` for its answer
    /// on that connection.
    pub async fn call(
        &self,
        vm_id: &str,
        body: &AgentCommand,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let Ok(token) = crate::util::random_token::<16>() else {
            return Err(CallError::NotConnected(vm_id.to_owned()));
        };
        let id = format!("cmd-{token}");
        let (tx, rx) = oneshot::channel();
        let sent = {
            let conns = self.conns();
            match conns.get(vm_id) {
                Some(c) => {
                    self.pending().insert(
                        id.clone(),
                        Pending {
                            vm_id: vm_id.to_owned(),
                            conn: c.id,
                            tx,
                        },
                    );
                    c.tx.try_send(CoreMessage::Command(Command::new(id.clone(), body)))
                        .is_ok()
                }
                None => false,
            }
        };
        let r = if !sent {
            Err(CallError::NotConnected(vm_id.to_owned()))
        } else {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(_)) => Err(CallError::Lost(vm_id.to_owned())),
                Err(_) => Err(CallError::Timeout {
                    vm_id: vm_id.to_owned(),
                    secs: timeout.as_secs(),
                }),
            }
        };
        self.pending().remove(&id);
        r
    }

    /// The ids and roles of every connected agent.
    pub fn connected(&self) -> Vec<(String, AgentRole)> {
        self.conns().iter().map(|(id, c)| (id.clone(), c.role)).collect()
    }

    /// Closes every connection (this core lost the leader lease).
    pub fn close_all(&self) {
        for (_, c) in self.conns().drain() {
            let _ = c.close.send(());
        }
        self.lose(None);
    }

    /// An answer came on connection `conn` of `vm_id`: it completes the command only when that
    /// command was sent on this connection.
    pub(crate) fn answered(&self, vm_id: &str, conn: u64, answer: Answer) {
        let mut pending = self.pending();
        match pending.get(&answer.id) {
            Some(p) if p.vm_id == vm_id && p.conn == conn => {
                if let Some(p) = pending.remove(&answer.id) {
                    let _ = p.tx.send(answer);
                }
            }
            Some(_) => {
                tracing::warn!(id = %answer.id, "Answer from a connection the command was not sent on, skipped");
            }
            None => tracing::debug!(id = %answer.id, "Answer to no waiting command (late) skipped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_only_count_from_the_connection_a_command_went_to() {
        let hub = std::sync::Arc::new(Hub::default());
        let (conn_a, _closed_a, mut rx_a) = hub.register("vm-a", AgentRole::SecStorage, 2);
        let (conn_b, _closed_b, _rx_b) = hub.register("vm-b", AgentRole::ConsoleProxy, 2);
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.call(
                "vm-a",
                &AgentCommand::CancelJob { job_id: "j".into() },
                Duration::from_secs(5),
            )
            .await
        });
        let Some(CoreMessage::Command(c)) = rx_a.recv().await else {
            panic!("no command sent");
        };
        assert!(c.id.len() > 20, "command ids are random tokens: {}", c.id);
        let answer = |ok| Answer {
            id: c.id.clone(),
            ok,
            body: serde_json::Value::Null,
            error: None,
        };
        // Another VM, and a stale connection of the same VM, cannot answer it.
        hub.answered("vm-b", conn_b, answer(false));
        hub.answered("vm-a", conn_a + 100, answer(false));
        hub.answered("vm-a", conn_a, answer(true));
        let got = call.await.expect("join").expect("answered");
        assert!(got.ok, "the answer of the connection it went to wins");
    }

    #[tokio::test]
    async fn a_command_fails_as_soon_as_its_connection_ends() {
        let hub = std::sync::Arc::new(Hub::default());
        let (conn, _closed, mut rx) = hub.register("vm-a", AgentRole::SecStorage, 2);
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.call(
                "vm-a",
                &AgentCommand::CancelJob { job_id: "j".into() },
                Duration::from_secs(600),
            )
            .await
        });
        assert!(matches!(rx.recv().await, Some(CoreMessage::Command(_))));
        let started = std::time::Instant::now();
        assert!(hub.unregister("vm-a", conn));
        let got = call.await.expect("join");
        assert_eq!(got, Err(CallError::Lost("vm-a".into())));
        assert!(started.elapsed() < Duration::from_secs(5), "not its timeout");

        // A newer connection replacing the VM's ends the older one's commands too.
        let (_old, _c, mut rx_old) = hub.register("vm-b", AgentRole::SecStorage, 2);
        let h = hub.clone();
        let call = tokio::spawn(async move {
            h.call(
                "vm-b",
                &AgentCommand::CancelJob { job_id: "k".into() },
                Duration::from_secs(600),
            )
            .await
        });
        assert!(matches!(rx_old.recv().await, Some(CoreMessage::Command(_))));
        let _new = hub.register("vm-b", AgentRole::SecStorage, 2);
        assert_eq!(call.await.expect("join"), Err(CallError::Lost("vm-b".into())));
    }
}
