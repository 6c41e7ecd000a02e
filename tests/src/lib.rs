//! Fixtures shared by the end-to-end tests (`tests/e2e`) and the crates' own integration tests.
//!
//! - [`http`]: a scriptable HTTP server (Range, ETag, redirects, dropped and stalled bodies, throttling)
//!   standing in for the template mirrors a storage agent downloads from.
//! - [`images`]: deterministic noise and qcow2 images made from it with `qemu-img`.
//! - [`nbd`]: `qemu-nbd` serving a qcow2 image with a dirty bitmap, as libvirt's backup exports do.
//! - [`objects`]: s3s-fs and moto as S3 servers, boto3 as the client that reads objects back;
//!   a single-node Swift with its CLI.
//! - [`orphan`]: an agent binary under a throwaway parent, for the parent-watch tests.
//! - [`qemu`]: a QEMU VM with a password-protected VNC server, for console tests.
//! - [`standin_core`]: a minimal stand-in for core's agent endpoint, for the agents' `--core` smoke tests.
#![forbid(unsafe_code)]

pub mod http;
pub mod images;
pub mod nbd;
pub mod objects;
pub mod orphan;
pub mod qemu;
pub mod standin_core;
