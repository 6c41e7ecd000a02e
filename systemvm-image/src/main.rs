//! `systemvm-image`: Builds the bootable system VM appliance.
//!
//! The workspace reserves its place; the service is built in its own milestone (see ARCHITECTURE.md).
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Builds the bootable system VM appliance (not built yet)")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!("systemvm-image {}", env!("CARGO_PKG_VERSION"));
}
