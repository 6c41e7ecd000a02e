//! Connection limits shared by core's listeners (API, agent endpoint): a global cap and a cap per
//! client address, taken at accept and given back when the connection ends.
//!
//! Invariants: a connection counts from accept to close; the per-address count never exceeds its
//! cap, so one client (one address) cannot take the slots every other client needs; refusal is
//! immediate (the socket is closed at once), so a flood costs the process no lasting descriptor.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Caps on concurrent connections.
#[derive(Debug)]
pub struct ConnLimiter {
    global: usize,
    per_client: usize,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A slot held by one connection; released when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Global,
    /// This address holds its share.
    PerClient,
}

impl ConnLimiter {
    /// At most `global` connections, and `per_client` from one address.
    pub fn new(global: usize, per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            global,
            per_client,
            counts: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a slot for a connection from `ip`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let mut guard = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *guard;
        if *total >= self.global {
            return Err(Refusal::Global);
        }
        let mine = per.entry(ip).or_insert(0);
        if *mine >= self.per_client {
            return Err(Refusal::PerClient);
        }
        *mine += 1;
        *total += 1;
        Ok(ConnSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections held now (total, from `ip`).
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        let guard = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        (guard.0, guard.1.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut guard = self.limiter.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_client_and_globally_and_gives_slots_back() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = l.try_acquire(a).unwrap();
        let _a2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refusal::PerClient);
        let _b1 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(c).unwrap_err(), Refusal::Global);
        drop(a1);
        assert_eq!(l.held(a), (2, 1));
        let _c1 = l.try_acquire(c).unwrap();
        assert_eq!(l.held(c), (3, 1));
    }
}
