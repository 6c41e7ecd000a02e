//! The connection registry of the agent channel: each system VM's current connection, commands
//! waiting for answers, and sends to one agent or to every agent of a role. The agent endpoint
//! (`crate::agent`) fills it; the domain layer and the background parts send through it.
//!
//! Invariants: one current connection per system VM (a newer one replaces, and closes, the
//! older); an answer reaches only the command that waits for its id; sends never block (a full
//! queue is a failed send).

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

/// The current connection of each system VM, and the commands waiting for answers.
#[derive(Debug, Default)]
pub struct Hub {
    conns: std::sync::Mutex<HashMap<String, Conn>>,
    pending: std::sync::Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    next: AtomicU64,
}

impl Hub {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Answer>>> {
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
        if let Some(old) = self.conns().insert(vm_id.to_owned(), conn) {
            let _ = old.close.send(());
        }
        (id, closed, rx)
    }

    /// Forgets connection `id` of `vm_id`; false when a newer connection replaced it.
    pub(crate) fn unregister(&self, vm_id: &str, id: u64) -> bool {
        let mut conns = self.conns();
        if conns.get(vm_id).is_some_and(|c| c.id == id) {
            conns.remove(vm_id);
            true
        } else {
            false
        }
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

    /// Sends a command to `vm_id` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        vm_id: &str,
        body: &AgentCommand,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let id = format!("cmd-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id.clone(), tx);
        let sent = self.push(vm_id, CoreMessage::Command(Command::new(id.clone(), body)));
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
    }

    pub(crate) fn answered(&self, answer: Answer) {
        match self.pending().remove(&answer.id) {
            Some(w) => {
                let _ = w.send(answer);
            }
            None => tracing::debug!(id = %answer.id, "Answer to no waiting command (late) skipped"),
        }
    }
}
