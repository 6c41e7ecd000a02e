//! The hypervisor driver interface: what core asks of whatever runs its system VMs.
//!
//! Invariants: drivers are stateless between calls as far as core is concerned: everything core
//! needs to find a VM again (its id, the driver's handle such as a process id) is in the database,
//! so a restarted core, or the other core of an HA pair, manages VMs the first one started; a
//! driver never learns a VM's secret except to hand it to that VM at start.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use systemvm_proto::Secret;
use systemvm_proto::agent::AgentRole;

/// A boxed future borrowing the driver.
pub type DriverFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a system VM needs at boot (the process driver passes it as flags and environment; an
/// image-based driver as boot parameters).
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// System VM id (`--vm-id`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: AgentRole,
    /// Zone.
    pub zone_id: String,
    /// Secret issued for this boot (`--secret`).
    pub secret: Secret,
    /// Core agent endpoints, tried in turn (`--core`).
    pub core_urls: Vec<String>,
    /// Core's CA certificate (`--ca`).
    pub ca: PathBuf,
    /// Storage VMs: the image store they serve.
    pub store_url: Option<String>,
    /// Storage VMs: internal networks downloads may reach (`secstorage.allowed.internal.sites`).
    pub allow_internal: Vec<String>,
    /// Console proxies: most sessions (`consoleproxy.session.max`).
    pub max_sessions: u64,
}

/// What a driver knows of a VM it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Process id (process driver).
    pub pid: Option<u32>,
}

/// A VM as the driver sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Running.
    Running,
    /// Not running; why, when known.
    Stopped(String),
}

/// Where a guest VM's console is, as its hypervisor reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct VncEndpoint {
    /// Host (address or name) of the VNC server.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// VNC password, when one is set.
    pub password: Option<Secret>,
}

impl std::fmt::Debug for VncEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VncEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The VM's program or image is missing or unusable.
    #[error("{0}")]
    Unavailable(String),
    /// Starting or stopping failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A disk of a guest VM, as its hypervisor describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// The disk's target (`vda`).
    pub device: String,
    /// The image file on the host.
    pub path: String,
    /// `QCOW2` or `RAW`.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
}

/// A guest's disks and whether it runs; `None` when the driver has no such guest.
pub type GuestDisks = Option<(Vec<GuestDisk>, bool)>;

/// A pull-mode backup to begin on a guest's host.
#[derive(Debug, Clone)]
pub struct BackupRequest<'a> {
    /// The guest (domain name).
    pub guest: &'a str,
    /// The disk's target.
    pub device: &'a str,
    /// Scratch file for the point-in-time view (must not exist).
    pub scratch: &'a str,
    /// TCP port the export listens on.
    pub port: u16,
    /// The checkpoint this backup creates.
    pub checkpoint: &'a str,
    /// The checkpoint an incremental backup starts from; `None`: full.
    pub incremental_from: Option<&'a str>,
}

/// Where a backup's export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    /// `host:port`, as the storage VM reaches it.
    pub address: String,
    /// The export name.
    pub export: String,
    /// The dirty-bitmap metadata context of an incremental backup.
    pub dirty_context: Option<String>,
}

fn unsupported(what: &str) -> DriverError {
    DriverError::Unavailable(format!("{what} is not supported by this driver"))
}

/// One way of running system VMs.
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// `process` | `qemu` | `libvirt`.
    fn name(&self) -> &'static str;

    /// Starts the VM; returns how to find it again.
    fn start<'a>(&'a self, spec: &'a VmSpec) -> DriverFuture<'a, Result<Placement, DriverError>>;

    /// Stops the VM (gracefully, or at once when `force`); stopping a stopped VM is not an error.
    fn stop<'a>(
        &'a self,
        id: &'a str,
        placement: &'a Placement,
        force: bool,
    ) -> DriverFuture<'a, Result<(), DriverError>>;

    /// Whether the VM runs.
    fn state<'a>(&'a self, id: &'a str, placement: &'a Placement) -> DriverFuture<'a, VmState>;

    /// Removes what the driver keeps for a destroyed VM (its files); the VM is stopped.
    fn destroy<'a>(&'a self, id: &'a str) -> DriverFuture<'a, Result<(), DriverError>>;

    /// The VNC console of a guest VM this driver's hosts run (`guest`: the hypervisor's name or
    /// id of the VM), so `createConsoleEndpoint` works for it; `Ok(None)` when the driver has no
    /// such VM or cannot tell.
    fn console_of<'a>(
        &'a self,
        guest: &'a str,
    ) -> DriverFuture<'a, Result<Option<VncEndpoint>, DriverError>> {
        let _ = guest;
        Box::pin(async { Ok(None) })
    }

    /// The disks of a guest VM and whether it runs; `Ok(None)` when this driver has no such VM.
    fn guest_disks<'a>(&'a self, guest: &'a str) -> DriverFuture<'a, Result<GuestDisks, DriverError>> {
        let _ = guest;
        Box::pin(async { Ok(None) })
    }

    /// Begins a pull-mode backup of a running guest's disk (a point-in-time NBD export and a new
    /// checkpoint).
    fn backup_begin<'a>(
        &'a self,
        req: &'a BackupRequest<'a>,
    ) -> DriverFuture<'a, Result<NbdExport, DriverError>> {
        let _ = req;
        Box::pin(async { Err(unsupported("a guest backup")) })
    }

    /// Ends the guest's backup job (also one that failed); ending none is not an error.
    fn backup_end<'a>(&'a self, guest: &'a str) -> DriverFuture<'a, Result<(), DriverError>> {
        let _ = guest;
        Box::pin(async { Err(unsupported("a guest backup")) })
    }

    /// The guest's checkpoints, by name.
    fn checkpoints<'a>(&'a self, guest: &'a str) -> DriverFuture<'a, Result<Vec<String>, DriverError>> {
        let _ = guest;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Deletes a checkpoint of the guest (its changes merge into the one before).
    fn delete_checkpoint<'a>(
        &'a self,
        guest: &'a str,
        name: &'a str,
    ) -> DriverFuture<'a, Result<(), DriverError>> {
        let _ = (guest, name);
        Box::pin(async { Err(unsupported("a checkpoint")) })
    }
}
