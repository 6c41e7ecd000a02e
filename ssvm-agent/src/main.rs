//! `ssvm-agent`: Secondary storage agent of the Mold system-VM suite.
//!
//! The workspace reserves its place; the service is built in its own milestone (see ARCHITECTURE.md).
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Secondary storage agent of the Mold system-VM suite (not built yet)"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!("ssvm-agent {}", env!("CARGO_PKG_VERSION"));
}
