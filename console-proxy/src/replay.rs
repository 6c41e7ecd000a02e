//! One-time use of console links: the session ids spent on this proxy, kept until their tokens
//! expire, and the attempts that have not been accepted yet.
//!
//! Invariants:
//! * a session id is spent by [`Attempt::spend`] only, which a session calls once it is accepted
//!   (it holds a session slot and the browser finished its RFB handshake); a refusal for the session
//!   limit, an upgrade that fails or a browser that leaves before that leaves the link usable;
//! * a spent id stays spent until its token expires (or [`Spent::undo`], when core could not be
//!   asked to confirm it);
//! * one link has at most one pending attempt: a newer one replaces it and the older is told
//!   through [`Attempt::superseded`], so replaying a link cannot hold more than one session slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Most spent ids held at once; past it, new sessions are refused rather than forgetting ids early.
pub const MAX_SPENT: usize = 1_000_000;

/// Why a session id could not be spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The id was spent before: the token is being replayed.
    #[error("console token already used")]
    AlreadyUsed,
    /// A newer attempt with the same link replaced this one before it was accepted.
    #[error("console link opened again")]
    Superseded,
    /// The store is full of unexpired ids.
    #[error("console proxy is at its session limit")]
    Full,
}

/// Spent session ids with the expiry of their tokens, and pending attempts. Clones share the store.
#[derive(Debug, Default, Clone)]
pub struct ReplayStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    spent: HashMap<String, u64>,
    /// The current attempt per session id: its number and the sender that tells it it was replaced
    /// (dropping the sender does).
    pending: HashMap<String, (u64, oneshot::Sender<()>)>,
    next_attempt: u64,
}

impl ReplayStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `session_id` was spent.
    pub fn is_spent(&self, session_id: &str) -> bool {
        self.lock().spent.contains_key(session_id)
    }

    /// Starts an attempt to use `session_id`, replacing any pending one (which is told through
    /// [`Attempt::superseded`]); refused when the id was spent.
    pub fn begin(&self, session_id: &str) -> Result<Attempt, ClaimError> {
        let mut inner = self.lock();
        if inner.spent.contains_key(session_id) {
            return Err(ClaimError::AlreadyUsed);
        }
        let number = inner.next_attempt;
        inner.next_attempt += 1;
        let (tx, rx) = oneshot::channel();
        // Dropping the replaced sender wakes the older attempt.
        inner.pending.insert(session_id.to_owned(), (number, tx));
        Ok(Attempt {
            store: self.clone(),
            session_id: session_id.to_owned(),
            number,
            replaced: Some(rx),
            spent: false,
        })
    }

    /// Spends `session_id` (valid until `expires`) at once; only the first claim succeeds.
    pub fn claim(&self, session_id: &str, expires: u64, now: u64) -> Result<Spent, ClaimError> {
        self.begin(session_id)?.spend(expires, now)
    }

    /// Number of spent ids held.
    pub fn len(&self) -> usize {
        self.lock().spent.len()
    }

    /// Whether no spent id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attempts begun and neither spent nor ended.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

/// One attempt to open a session with a link, not accepted yet. Dropping it without
/// [`Attempt::spend`] leaves the link usable.
#[derive(Debug)]
pub struct Attempt {
    store: ReplayStore,
    session_id: String,
    number: u64,
    /// Resolves when a newer attempt replaced this one; `None` once it did.
    replaced: Option<oneshot::Receiver<()>>,
    spent: bool,
}

impl Attempt {
    /// The link's session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Completes when a newer attempt with the same link replaced this one (never otherwise).
    pub async fn superseded(&mut self) {
        if let Some(rx) = &mut self.replaced {
            let _ = rx.await;
            self.replaced = None;
        }
    }

    /// Spends the session id (valid until `expires`): the session is accepted.
    pub fn spend(mut self, expires: u64, now: u64) -> Result<Spent, ClaimError> {
        let mut inner = self.store.lock();
        if inner.spent.contains_key(&self.session_id) {
            return Err(ClaimError::AlreadyUsed);
        }
        if inner.pending.get(&self.session_id).map(|(n, _)| *n) != Some(self.number) {
            return Err(ClaimError::Superseded);
        }
        if inner.spent.len() >= MAX_SPENT / 2 {
            inner.spent.retain(|_, exp| *exp > now);
        }
        if inner.spent.len() >= MAX_SPENT {
            return Err(ClaimError::Full);
        }
        inner.pending.remove(&self.session_id);
        inner.spent.insert(self.session_id.clone(), expires);
        drop(inner);
        self.spent = true;
        Ok(Spent {
            store: self.store.clone(),
            session_id: std::mem::take(&mut self.session_id),
        })
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        let mut inner = self.store.lock();
        if inner.pending.get(&self.session_id).map(|(n, _)| *n) == Some(self.number) {
            inner.pending.remove(&self.session_id);
        }
    }
}

/// A spent session id.
#[derive(Debug)]
pub struct Spent {
    store: ReplayStore,
    session_id: String,
}

impl Spent {
    /// Makes the link usable again (its session never started: core could not confirm it).
    pub fn undo(self) {
        self.store.lock().spent.remove(&self.session_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_once() {
        let store = ReplayStore::default();
        assert!(store.claim("a", 100, 10).is_ok());
        assert_eq!(store.claim("a", 100, 10).err(), Some(ClaimError::AlreadyUsed));
        assert!(store.claim("b", 100, 10).is_ok());
        assert_eq!(store.len(), 2);
        assert_eq!(store.pending(), 0);
    }

    #[test]
    fn an_attempt_spends_only_when_told_to() {
        let store = ReplayStore::default();
        let abandoned = store.begin("a").unwrap();
        assert!(!store.is_spent("a"));
        drop(abandoned);
        assert_eq!(store.pending(), 0);
        let attempt = store
            .begin("a")
            .expect("an abandoned attempt leaves the link usable");
        let spent = attempt.spend(100, 10).unwrap();
        assert!(store.is_spent("a"));
        assert_eq!(store.begin("a").err(), Some(ClaimError::AlreadyUsed));
        spent.undo();
        assert!(store.begin("a").is_ok(), "undone: usable again");
    }

    #[tokio::test]
    async fn a_newer_attempt_replaces_a_pending_one() {
        let store = ReplayStore::default();
        let mut older = store.begin("a").unwrap();
        let newer = store.begin("a").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), older.superseded())
            .await
            .expect("the older attempt is told");
        older.superseded().await;
        // The replaced attempt leaving does not end the newer one's claim on the link.
        drop(older);
        assert_eq!(store.pending(), 1);
        assert!(newer.spend(100, 10).is_ok());
        assert_eq!(store.pending(), 0);

        let older = store.begin("b").unwrap();
        let mut newer = store.begin("b").unwrap();
        assert_eq!(older.spend(100, 10).err(), Some(ClaimError::Superseded));
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), newer.superseded());
        assert!(waiting.await.is_err(), "the current attempt is not told anything");
        assert!(newer.spend(100, 10).is_ok());
    }
}
