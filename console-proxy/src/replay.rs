//! One-time use of console tokens: the set of spent session ids, kept until their tokens expire.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Most spent ids held at once; past it, new sessions are refused rather than forgetting ids early.
pub const MAX_SPENT: usize = 1_000_000;

/// Why a session id could not be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The id was claimed before: the token is being replayed.
    #[error("console token already used")]
    AlreadyUsed,
    /// The store is full of unexpired ids.
    #[error("console proxy is at its session limit")]
    Full,
}

/// Spent session ids with the expiry of their tokens.
#[derive(Debug, Default)]
pub struct ReplayStore {
    spent: Mutex<HashMap<String, u64>>,
}

impl ReplayStore {
    /// Claims `session_id` (valid until `expires`); only the first claim succeeds.
    pub fn claim(&self, session_id: &str, expires: u64, now: u64) -> Result<(), ClaimError> {
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        if spent.contains_key(session_id) {
            return Err(ClaimError::AlreadyUsed);
        }
        if spent.len() >= MAX_SPENT / 2 {
            spent.retain(|_, exp| *exp > now);
        }
        if spent.len() >= MAX_SPENT {
            return Err(ClaimError::Full);
        }
        spent.insert(session_id.to_owned(), expires);
        Ok(())
    }

    /// Number of ids held.
    pub fn len(&self) -> usize {
        self.spent.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_once() {
        let store = ReplayStore::default();
        assert_eq!(store.claim("a", 100, 10), Ok(()));
        assert_eq!(store.claim("a", 100, 10), Err(ClaimError::AlreadyUsed));
        assert_eq!(store.claim("b", 100, 10), Ok(()));
        assert_eq!(store.len(), 2);
    }
}
