//! Agents end with the core that started them. Core's process driver sets [`PARENT_PID_ENV`] to
//! its own pid; an agent started so watches its parent process and exits when it changes: the
//! parent died and the agent was re-parented (to init or a subreaper), so nobody would stop it.
//!
//! Invariants:
//! * without the variable (standalone, image drivers) nothing is watched;
//! * the parent is checked at once and then every [`CHECK_INTERVAL`], so an agent whose core died
//!   while it started exits too;
//! * the exit is a clean one (code 0, after a warning): being orphaned is how a core stops its
//!   agents when it dies, not an agent failure.

use std::ffi::OsStr;
use std::future::Future;
use std::time::Duration;

/// The variable naming the pid the agent's parent must keep.
pub const PARENT_PID_ENV: &str = "SYSTEMVM_PARENT_PID";

/// How often the parent is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// [`PARENT_PID_ENV`] is set but names no process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{PARENT_PID_ENV}={0:?} is not a process id")]
pub struct BadParentPid(pub String);

/// The parent pid to keep, from the variable's value: `None` when unset or blank.
pub fn expected_parent(value: Option<&OsStr>) -> Result<Option<u32>, BadParentPid> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<u32>() {
        Ok(pid) if pid > 0 => Ok(Some(pid)),
        _ => Err(BadParentPid(text.to_owned())),
    }
}

/// Resolves with the new parent pid once `current()` (the parent pid now) is not `expected`,
/// looking at once and then every `interval`.
pub async fn orphaned(expected: u32, interval: Duration, current: impl Fn() -> u32) -> u32 {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = current();
        if now != expected {
            return now;
        }
    }
}

/// With [`PARENT_PID_ENV`] set, spawns (on the current tokio runtime) the task that exits the
/// process with code 0 when the parent changes; returns it, or `None` when there is nothing to
/// watch (unset, or not a pid: logged).
pub fn exit_with_parent() -> Option<tokio::task::JoinHandle<()>> {
    let expected = match expected_parent(std::env::var_os(PARENT_PID_ENV).as_deref()) {
        Ok(Some(pid)) => pid,
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%error, "Not watching the parent process");
            return None;
        }
    };
    Some(tokio::spawn(exit_when(orphaned(
        expected,
        CHECK_INTERVAL,
        std::os::unix::process::parent_id,
    ))))
}

async fn exit_when(orphaned: impl Future<Output = u32>) {
    let parent = orphaned.await;
    tracing::warn!(
        parent,
        "The process that started this agent is gone (re-parented); exiting"
    );
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn the_variable_names_a_pid() {
        assert_eq!(expected_parent(None), Ok(None));
        assert_eq!(expected_parent(Some(OsStr::new(""))), Ok(None));
        assert_eq!(expected_parent(Some(OsStr::new(" 4242 "))), Ok(Some(4242)));
        for bad in ["0", "-1", "core", "12a", "99999999999"] {
            let err = expected_parent(Some(OsStr::new(bad))).unwrap_err();
            assert!(err.to_string().contains(PARENT_PID_ENV), "{err}");
        }
    }

    #[tokio::test]
    async fn orphaned_when_the_parent_changes() {
        let every = Duration::from_millis(10);
        let parent = Arc::new(AtomicU32::new(100));
        let (seen, checks) = (parent.clone(), Arc::new(AtomicU32::new(0)));
        let counted = checks.clone();
        let watch = tokio::spawn(orphaned(100, every, move || {
            counted.fetch_add(1, Ordering::Relaxed);
            seen.load(Ordering::Relaxed)
        }));
        while checks.load(Ordering::Relaxed) < 5 {
            tokio::time::sleep(every).await;
        }
        assert!(!watch.is_finished(), "orphaned while the parent lives");
        parent.store(1, Ordering::Relaxed);
        let new_parent = tokio::time::timeout(Duration::from_secs(5), watch).await;
        assert_eq!(new_parent.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_parent_gone_before_the_start_is_seen_at_once() {
        // The first look is immediate: with an hour between checks this still resolves at once.
        let first = orphaned(100, Duration::from_secs(3600), || 1);
        let new_parent = tokio::time::timeout(Duration::from_secs(5), first).await;
        assert_eq!(new_parent.unwrap(), 1);
    }

    #[test]
    fn this_process_has_the_parent_the_os_reports() {
        // The real source of `current`: this test's parent is alive and stays put.
        let parent = std::os::unix::process::parent_id();
        assert!(parent > 0);
        assert_eq!(std::os::unix::process::parent_id(), parent);
    }
}
