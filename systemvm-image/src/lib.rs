//! The system VM appliance: its builder ([`build`]) and what runs inside it — process 1
//! ([`init`]), reading the config drive (`systemvm_proto::seed`) and starting the role's agent ([`agent`]).
//! Layout and boot sequence: ARCHITECTURE.md ("The system VM image").
#![forbid(unsafe_code)]

pub mod agent;
pub mod build;
pub mod init;
