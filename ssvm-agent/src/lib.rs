//! Secondary storage agent: the NFS staging store, and templates/ISOs registered from URLs.
//!
//! Code map:
//! - [`checksum`]: CloudStack's `{ALGO}hex` checksums and streaming hashers.
//! - [`inspect`]: image format inspection in the download stream (qcow2, raw, ISO 9660, VHD, OVA).
//! - [`properties`]: `template.properties`, byte-compatible with CloudStack secondary storage.
//! - [`store`]: one interface over a local directory and an NFSv3 export (userspace client, no mount).
//! - [`fetch`]: the HTTP(S) client with its SSRF guard.
//! - [`job`]: download jobs, their states and the journal that outlives the process.
//! - [`fence`]: install fencing by epoch (a stale run or a delete never undone).
//! - [`download`]: the download → decompress → inspect → hash → store pipeline and the install step.
//! - [`inventory`]: what an existing store holds, read back from `template.properties`.
//! - [`service`]: `ssvm-agent serve`: background jobs and the local JSON job API.
//! - [`transfer`]: the transfer server browsers reach: signed uploads (multipart and tus) and
//!   download links.
//! - [`nbd`]: an NBD client (libvirt's pull-mode backup exports) over the no-I/O `systemvm-nbd`.
//! - [`snapshot`]: snapshot backups from an NBD export into the store as sparse qcow2 images
//!   (full: the allocated extents; incremental: the dirty ones over the previous image).
//! - [`peer`]: the mutual-TLS channel between storage VMs (cross-zone copies).
//! - [`replica`]: replicas of store artefacts in object stores (S3), checksummed and resumable.
//! - [`settings`]: core's settings for this agent (internal sites, size cap) over the command line.
//! - [`core_link`]: the link to systemvm-core: heartbeats, commands, settings.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod core_link;
pub mod download;
pub mod fence;
pub mod fetch;
pub use systemvm_inspect as inspect;
pub mod inventory;
pub mod job;
pub mod nbd;
pub mod peer;
pub mod properties;
pub mod replica;
pub mod service;
pub mod settings;
pub mod snapshot;
pub mod store;
pub mod transfer;
