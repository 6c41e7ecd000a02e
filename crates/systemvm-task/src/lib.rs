//! Named long-lived tasks and one shutdown path, shared by core and the agents (after Devolutions
//! Gateway's `Task`/`ChildTask`/`ShutdownSignal`).
//!
//! A service spawns each long-lived loop with [`Tasks::spawn`] under a name and hands it a
//! [`ShutdownSignal`]. [`Tasks::shutdown`] is the one way to stop: it signals every task, waits for
//! them to end on their own (logging which are still running every [`WARN_EVERY`]), and aborts
//! what is left at the deadline.
//!
//! Invariants: every task is named and awaited or aborted, never forgotten (dropping [`Tasks`]
//! aborts them); the signal is level-triggered (a task that subscribes after shutdown began sees
//! it at once); shutdown never waits past its deadline.
#![forbid(unsafe_code)]

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often shutdown logs the tasks it still waits for.
pub const WARN_EVERY: Duration = Duration::from_secs(2);

/// Resolves when the process is asked to stop: Ctrl-C (SIGINT) or SIGTERM (what a driver or an
/// init system sends); returns which.
pub async fn stop_requested() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot watch for SIGTERM; only Ctrl-C stops this process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if let Err(error) = r {
                tracing::warn!(%error, "Cannot watch for Ctrl-C");
                std::future::pending::<()>().await;
            }
            "SIGINT"
        }
        () = term => "SIGTERM",
    }
}

/// Runs a service's ordered stop (`what`: for the log) for at most `deadline`, logging every
/// [`WARN_EVERY`] while it waits; true when it finished in time.
pub async fn stop_within(what: &str, deadline: Duration, stop: impl Future<Output = ()>) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    tokio::pin!(stop);
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            tracing::warn!(
                what,
                deadline_secs = deadline.as_secs(),
                "Stop deadline reached; exiting anyway"
            );
            return false;
        }
        match tokio::time::timeout(WARN_EVERY.min(until - now), &mut stop).await {
            Ok(()) => return true,
            Err(_) => tracing::warn!(what, "Still stopping"),
        }
    }
}

/// Told to every task: whether the service is stopping.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether shutdown has begun.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// The underlying receiver (for code written against `watch::Receiver<bool>`).
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}

/// The service's named tasks and their shutdown signal.
#[derive(Debug)]
pub struct Tasks {
    stop: watch::Sender<bool>,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            running: Vec::new(),
        }
    }

    /// A signal for a task or connection started outside [`Tasks::spawn`].
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.stop.subscribe())
    }

    /// Spawns the task `name`, built from the shutdown signal.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(ShutdownSignal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(self.signal()));
        self.running.push((name, handle));
    }

    /// The names of the tasks still running.
    pub fn running(&self) -> Vec<&'static str> {
        self.running
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .map(|(n, _)| *n)
            .collect()
    }

    /// Signals every task, waits for them up to `deadline`, then aborts the rest; returns the
    /// names of the tasks that had to be aborted.
    pub async fn shutdown(mut self, deadline: Duration) -> Vec<&'static str> {
        let _ = self.stop.send(true);
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = self.running();
            if left.is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                tracing::warn!(tasks = ?left, "Shutdown deadline reached; aborting the tasks still running");
                for (_, h) in &self.running {
                    h.abort();
                }
                for (_, h) in self.running.drain(..) {
                    let _ = h.await;
                }
                return left;
            }
            let wait = WARN_EVERY.min(until - now);
            let all = futures_join(&mut self.running);
            if tokio::time::timeout(wait, all).await.is_err() {
                tracing::warn!(tasks = ?self.running(), "Waiting for tasks to stop");
            }
        }
        self.running.clear();
        Vec::new()
    }

    /// Aborts every task at once (a crash, in tests), without signalling.
    pub async fn abort(mut self) {
        for (_, h) in &self.running {
            h.abort();
        }
        for (_, h) in self.running.drain(..) {
            let _ = h.await;
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, h) in &self.running {
            h.abort();
        }
    }
}

/// Waits until every handle has finished (without consuming them).
async fn futures_join(running: &mut [(&'static str, JoinHandle<()>)]) {
    for (_, h) in running.iter_mut() {
        if !h.is_finished() {
            let _ = h.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_stop_on_the_signal() {
        let mut tasks = Tasks::new();
        tasks.spawn("waiter", |mut s| async move { s.wait().await });
        assert_eq!(tasks.running(), vec!["waiter"]);
        let aborted = tasks.shutdown(Duration::from_secs(5)).await;
        assert!(aborted.is_empty());
    }

    #[tokio::test]
    async fn a_stuck_task_is_aborted_at_the_deadline() {
        let mut tasks = Tasks::new();
        tasks.spawn("stuck", |_| async move { std::future::pending::<()>().await });
        tasks.spawn("polite", |mut s| async move { s.wait().await });
        let started = tokio::time::Instant::now();
        let aborted = tasks.shutdown(Duration::from_millis(300)).await;
        assert_eq!(aborted, vec!["stuck"]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited past the deadline"
        );
    }

    #[tokio::test]
    async fn a_stop_that_hangs_is_cut_at_the_deadline() {
        assert!(stop_within("quick", Duration::from_secs(1), async {}).await);
        let started = tokio::time::Instant::now();
        assert!(!stop_within("stuck", Duration::from_millis(200), std::future::pending()).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_late_subscriber_sees_the_signal() {
        let tasks = Tasks::new();
        let mut early = tasks.signal();
        let _ = tasks.stop.send(true);
        let mut late = tasks.signal();
        early.wait().await;
        late.wait().await;
        assert!(late.is_set());
    }
}
