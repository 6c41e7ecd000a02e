//! `systemvm-core`: the management service of the suite.
//!
//! The workspace reserves its place: the CloudStack-compatible API, the agent endpoint and the
//! deployer are built in their own milestones (see ARCHITECTURE.md). Until then the binary only
//! reports its version and the wire-format versions it speaks.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Management service of the Mold system-VM suite (API and deployer not built yet)"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!(
        "systemvm-core {} (console token format v{})",
        env!("CARGO_PKG_VERSION"),
        systemvm_proto::console::TOKEN_VERSION
    );
}
