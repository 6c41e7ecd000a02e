//! Shared service state: the handles every part of core holds (database, settings cache, agent
//! connections, console keys, leadership), and the caller model.
//!
//! Invariants: settings are read from the cache, which is loaded from the database at start,
//! written through on every update and re-read every second (the database is the source of
//! truth; the other core may change it); login sessions live in the database
//! (`model::sessions`); secrets are never logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Mutex, RwLock};
use tokio::task::JoinSet;

use crate::db::Db;

pub use crate::roles::Role;

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User id.
    pub user_id: String,
    /// User name.
    pub username: String,
    /// Account id.
    pub account_id: String,
    /// Account name.
    pub account_name: String,
    /// Role of the account.
    pub role: Role,
    /// The account's domain.
    pub domain_id: String,
    /// The path of the account's domain (`/` for ROOT, `/A/B/` below it).
    pub domain_path: String,
}

impl Caller {
    /// Nobody: the caller of a command answered before login (no account, least privileges).
    pub fn anonymous() -> Self {
        Self {
            user_id: String::new(),
            username: String::new(),
            account_id: String::new(),
            account_name: String::new(),
            role: Role::ReadOnlyUser,
            domain_id: String::new(),
            domain_path: String::new(),
        }
    }
}

/// State shared by every request and job.
#[derive(Debug)]
pub struct Shared {
    /// The database.
    pub db: Db,
    /// Core's CA (it issues the storage VMs' peer certificates).
    pub ca: Arc<crate::ca::Ca>,
    /// Setting values by name (cache of the `configurations` table over the defaults).
    pub settings: RwLock<HashMap<String, String>>,
    /// Wakes the settings follower (a setting was updated on this core).
    pub settings_changed: tokio::sync::Notify,
    /// Wakes the leader's job runner (a job for the lease holder was queued on this core).
    pub jobs_wakeup: tokio::sync::Notify,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Running async jobs (aborted at shutdown).
    pub jobs: Mutex<JoinSet<()>>,
    /// Console-token keys, pushed to console proxies in `Welcome` and `KeysUpdate`; read them
    /// with [`Shared::console_keys`].
    pub console_keys: std::sync::RwLock<systemvm_proto::console::KeySet>,
    /// Transfer keys (upload tickets, download links), pushed to storage VMs in `Welcome` and
    /// `TransferKeysUpdate`; read them with [`Shared::transfer_keys`].
    pub transfer_keys: std::sync::RwLock<systemvm_proto::console::KeySet>,
    /// Serial of the custom certificate this core pushed last (the lease holder pushes newer ones).
    pub cert_serial: std::sync::atomic::AtomicU64,
    /// The secrets key: encrypts the keys stored in the database (`crate::secrets`).
    pub secrets: crate::secrets::SecretsKey,
    /// Current agent connections.
    pub agents: crate::hub::Hub,
    /// Wakes the download dispatcher (a template was registered).
    pub dispatch_wakeup: tokio::sync::Notify,
    /// Downloads handed out: template id → (storage VM id, connection id).
    pub dispatched: std::sync::Mutex<HashMap<String, (String, u64)>>,
    /// This core instance's id (the leader lease's holder).
    pub instance_id: String,
    /// Whether this core holds the leader lease (acts on agents and the fleet).
    pub leader: std::sync::atomic::AtomicBool,
    /// Drivers of the hypervisor hosts whose guest VMs' consoles core resolves
    /// (`addConsoleTarget hypervisorvm=`).
    pub guest_drivers: Vec<Arc<dyn crate::fleet::Driver>>,
    /// The fleet manager, when a driver is configured.
    pub fleet: std::sync::OnceLock<Arc<crate::fleet::Fleet>>,
}

/// Handle on the shared state.
pub type State = Arc<Shared>;

impl Shared {
    /// Whether this core holds the leader lease now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replaces the cached console-token keys.
    pub fn set_console_keys(&self, set: systemvm_proto::console::KeySet) {
        *self
            .console_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
    }

    /// Replaces the cached transfer keys.
    pub fn set_transfer_keys(&self, set: systemvm_proto::console::KeySet) {
        *self
            .transfer_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
    }

    /// The current transfer keys.
    pub fn transfer_keys(&self) -> systemvm_proto::console::KeySet {
        self.transfer_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn dispatched(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, u64)>> {
        self.dispatched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether template `id`'s download went to a connection that is still current.
    pub fn dispatched_live(&self, id: &str) -> bool {
        let Some((vm, conn)) = self.dispatched().get(id).cloned() else {
            return false;
        };
        self.agents.connection(&vm) == Some(conn)
    }

    /// Whether template `id`'s download was dispatched to connection `conn` of `vm_id` (only that
    /// connection may report its progress).
    pub fn dispatched_to(&self, id: &str, vm_id: &str, conn: u64) -> bool {
        self.dispatched()
            .get(id)
            .is_some_and(|(v, c)| v == vm_id && *c == conn)
    }

    /// Records that template `id`'s download went to connection `conn` of `vm_id`.
    pub fn dispatched_set(&self, id: &str, vm_id: &str, conn: u64) {
        self.dispatched().insert(id.to_owned(), (vm_id.to_owned(), conn));
    }

    /// Forgets template `id`'s dispatch (ended or deleted).
    pub fn dispatched_forget(&self, id: &str) {
        self.dispatched().remove(id);
    }

    /// The current console-token keys.
    pub fn console_keys(&self) -> systemvm_proto::console::KeySet {
        self.console_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
