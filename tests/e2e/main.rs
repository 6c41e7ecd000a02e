//! End-to-end tests across the suite's crates, against real components (QEMU, Chromium, …).
//! One test binary, so real servers start once per run.

mod agents;
mod ansible;
mod appliance;
mod browser_uploads;
mod certificates;
mod console;
mod copies;
mod core_api;
mod deploy;
mod directory;
mod fleet;
mod floods;
mod ha;
mod layout;
mod libvirt;
mod nfs;
mod replicas;
mod resources;
mod snapshots;
mod storage;
mod support;
mod uploads;
mod volumes;
