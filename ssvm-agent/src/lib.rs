//! Secondary storage agent: the NFS staging store, and templates/ISOs registered from URLs.
//!
//! Code map:
//! - [`checksum`]: CloudStack's `{ALGO}hex` checksums and streaming hashers.
//! - [`inspect`]: image format inspection in the download stream (qcow2, raw, ISO 9660, VHD, OVA).
//! - [`properties`]: `template.properties`, byte-compatible with CloudStack secondary storage.
//! - [`store`]: one interface over a local directory and an NFSv3 export (userspace client, no mount).
#![forbid(unsafe_code)]

pub mod checksum;
pub mod inspect;
pub mod properties;
pub mod store;
