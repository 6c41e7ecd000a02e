//! The fleet manager: core deploys, watches, restarts and scales its system VMs through a
//! [`Driver`], and records every decision as an event (`listEvents`).
//!
//! Each second, on the core that holds the leader lease ([`lease`]):
//! * **health** — a managed VM core wants Running is restarted when its process/domain is gone,
//!   when its agent stopped heartbeating (`agent.heartbeat.timeout`), or when it did not come Up
//!   within [`START_TIMEOUT`]; after [`MAX_START_FAILURES`] failed starts in a row it is put in
//!   `Error` and retried every [`ERROR_RETRY`];
//! * **policy** — per zone: one storage VM once the zone has an image store, at least one console
//!   proxy at once, and every `consoleproxy.capacityscan.interval` the scale rule: one more
//!   proxy when `proxies × consoleproxy.session.max − sessions ≤
//!   consoleproxy.capacity.standby` (CloudStack's rule, capped by `consoleproxy.launch.max`), and,
//!   unlike CloudStack, one fewer when a proxy has been idle for `consoleproxy.scalein.idle` and
//!   the others still leave more than the standby capacity ([`scale::decide`]).
//!
//! Invariants:
//! * no live session is cut by scale-in: a proxy is drained first (state `Stopping`: no new links
//!   go to it), and destroyed only when it reports no session and has had no session claim for
//!   [`DRAIN_QUIET`]; a session that shows up meanwhile cancels the drain;
//! * no flapping: scaling in leaves capacity strictly above the standby (scaling out starts at or
//!   below it), and scale decisions in a zone are at least `consoleproxy.scale.cooldown` apart;
//! * each (re)start issues the VM a new secret (only its digest is stored), so a stale process
//!   of an earlier start cannot dial in;
//! * one operation per VM at a time (per-VM lock shared by the manager and the lifecycle API),
//!   and only on the core holding the leader lease (lifecycle commands received by the standby
//!   are carried out by the lease holder's job runner), so there are never two instances of one
//!   VM;
//! * a fleet error is a [`FleetError`]; driver and database text goes to the log and to
//!   `listEvents`, never into an API error.
//!
//! Files: [`lifecycle`] (start, stop, create, wait), [`scale`] (the scale rule, a pure
//! function), [`manager`] (the manager loop: health, drain, policy).

pub mod driver;
pub mod lease;
pub mod libvirt;
pub mod libvirt_backup;
pub mod lifecycle;
pub mod manager;
pub mod process;
pub mod qemu;
pub mod scale;
pub mod seed;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use driver::{BackupRequest, Driver, DriverError, GuestDisk, NbdExport, Placement, VmSpec, VncEndpoint};
pub use lifecycle::{create_vm, start_vm, stop_vm, wait_up};
pub use manager::run;

/// How often the manager looks at the fleet.
pub const TICK: Duration = Duration::from_secs(1);
/// Time a started VM has to come Up before it is restarted.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Failed starts in a row before a VM goes to `Error`.
pub const MAX_START_FAILURES: i64 = 3;
/// How often a VM in `Error` is tried again.
pub const ERROR_RETRY: Duration = Duration::from_secs(60);
/// Extra time agents get to reach a core that just took the lease over (ms).
pub const TAKEOVER_GRACE_MS: i64 = 30_000;
/// A draining proxy is destroyed only after this long without sessions or claims.
pub const DRAIN_QUIET: Duration = Duration::from_secs(5);

/// Why a fleet operation failed. The `Display` text is for operators; the causes in `source`
/// (driver and database text) are logged and recorded as events, never sent to a client.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// No such managed VM.
    #[error("system VM {0} not found")]
    NotFound(String),
    /// The zone's driver spec names nothing this core can run.
    #[error("zone {0} has no usable system VM driver")]
    NoDriver(String),
    /// A storage VM needs an image store in its zone.
    #[error("zone {0} has no image store for the storage VM")]
    NoStore(String),
    /// The driver that started a VM is not available any more.
    #[error("the driver that started {0} is not available")]
    DriverGone(String),
    /// The driver failed to start a VM.
    #[error("{name} failed to start (see listEvents)")]
    StartFailed {
        /// The VM.
        name: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// The driver failed to stop or destroy a VM.
    #[error("{name} could not be stopped")]
    StopFailed {
        /// The VM.
        name: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// The VM went to `Error` while waiting for it.
    #[error("system VM {0} failed to start (see listEvents)")]
    WentToError(String),
    /// The agent did not come Up in time.
    #[error("system VM {id} did not come Up within {secs}s (state {state}, agent {agent})")]
    NotUp {
        /// The VM.
        id: String,
        /// The time waited.
        secs: u64,
        /// Its lifecycle state then.
        state: &'static str,
        /// Its agent state then.
        agent: &'static str,
    },
    /// Registering a new VM failed.
    #[error(transparent)]
    Register(#[from] crate::model::DomainError),
    /// A secret could not be generated.
    #[error("random generator failed")]
    Random,
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

/// The fleet manager's fixed inputs.
#[derive(Debug)]
pub struct Fleet {
    /// The driver that runs the VMs.
    pub driver: Arc<dyn Driver>,
    /// Agent endpoint URLs the VMs are given (`--core`).
    pub core_urls: Vec<String>,
    /// Core's CA certificate (`--ca`).
    pub ca: std::path::PathBuf,
    /// What image drivers of zones (`libvirt:URI`) boot, and memory per VM; `None`: zones can't
    /// have their own libvirt host.
    pub zone_boot: Option<(qemu::Boot, u32)>,
    /// Where zone drivers keep per-VM files.
    pub vm_root: std::path::PathBuf,
    zone_drivers: std::sync::Mutex<HashMap<String, Arc<dyn Driver>>>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    last_scale_ms: std::sync::Mutex<HashMap<String, i64>>,
    last_scan_ms: std::sync::Mutex<HashMap<String, i64>>,
    /// When this core last became the leader (ms, database clock): agents get time to move
    /// over before their silence counts against them.
    pub(crate) leader_since_ms: std::sync::atomic::AtomicI64,
}

impl Fleet {
    /// A fleet run by `driver`.
    pub fn new(driver: Arc<dyn Driver>, core_urls: Vec<String>, ca: std::path::PathBuf) -> Self {
        Self {
            driver,
            core_urls,
            ca,
            zone_boot: None,
            vm_root: std::path::PathBuf::new(),
            zone_drivers: std::sync::Mutex::default(),
            locks: std::sync::Mutex::default(),
            last_scale_ms: std::sync::Mutex::default(),
            last_scan_ms: std::sync::Mutex::default(),
            leader_since_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The driver a spec names (`system_vms.driver`, `zones.systemvm_driver`): core's own driver
    /// for its name or an empty/absent spec, a libvirt host for `libvirt:URI` (when image boot is
    /// configured); `None` for `none` or an unusable spec.
    pub fn driver_for(&self, spec: Option<&str>) -> Option<Arc<dyn Driver>> {
        match spec.map(str::trim).filter(|s| !s.is_empty()) {
            None => Some(self.driver.clone()),
            Some(s) if s == self.driver.name() => Some(self.driver.clone()),
            Some(s) => {
                let uri = s.strip_prefix("libvirt:")?;
                let (boot, memory_mib) = self.zone_boot.clone()?;
                let mut cache = self
                    .zone_drivers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let d = cache.entry(s.to_owned()).or_insert_with(|| {
                    Arc::new(libvirt::LibvirtDriver {
                        uri: uri.to_owned(),
                        vm_root: self.vm_root.clone(),
                        boot,
                        memory_mib,
                    })
                });
                Some(d.clone())
            }
        }
    }

    /// The spec stored for a VM started by `driver_for(zone_spec)`.
    pub(crate) fn spec_of(&self, zone_spec: Option<&str>) -> String {
        match zone_spec.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) if s.starts_with("libvirt:") => s.to_owned(),
            _ => self.driver.name().to_owned(),
        }
    }

    /// When the zone last scaled (ms).
    pub(crate) fn last_scale_ms(&self, zone: &str) -> Option<i64> {
        self.last_scale_ms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(zone)
            .copied()
    }

    /// Records a scale decision in the zone at `now` (ms).
    pub(crate) fn scaled(&self, zone: &str, now: i64) {
        self.last_scale_ms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(zone.to_owned(), now);
    }

    /// When the zone's proxies were last held against the scale rule (ms).
    pub(crate) fn last_scan_ms(&self, zone: &str) -> Option<i64> {
        self.last_scan_ms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(zone)
            .copied()
    }

    /// Records a capacity scan of the zone at `now` (ms).
    pub(crate) fn scanned(&self, zone: &str, now: i64) {
        self.last_scan_ms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(zone.to_owned(), now);
    }

    /// The lock serialising operations on one VM.
    pub fn lock(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(vm_id.to_owned())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_driver_specs() {
        let process: Arc<dyn Driver> = Arc::new(process::ProcessDriver {
            bin_dir: "/bin".into(),
            vm_root: "/vms".into(),
        });
        let mut f = Fleet::new(process, vec![], "/ca.pem".into());
        assert_eq!(f.driver_for(None).unwrap().name(), "process");
        assert_eq!(f.driver_for(Some("process")).unwrap().name(), "process");
        assert!(f.driver_for(Some("none")).is_none());
        assert!(
            f.driver_for(Some("libvirt:qemu:///system")).is_none(),
            "no image to boot"
        );
        f.zone_boot = Some((
            qemu::Boot::Disk {
                image: "/svm.qcow2".into(),
            },
            256,
        ));
        let a = f.driver_for(Some("libvirt:qemu+ssh://kvm1/system")).unwrap();
        let b = f.driver_for(Some("libvirt:qemu+ssh://kvm1/system")).unwrap();
        assert_eq!(a.name(), "libvirt");
        assert!(Arc::ptr_eq(&a, &b), "one driver per host");
        assert_eq!(
            f.spec_of(Some("libvirt:qemu+ssh://kvm1/system")),
            "libvirt:qemu+ssh://kvm1/system"
        );
        assert_eq!(f.spec_of(None), "process");
    }
}
