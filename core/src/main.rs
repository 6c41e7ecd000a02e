//! `systemvm-core`: the management service of the suite (CLI entry point).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use systemvm_core::{CoreConfig, start};

#[derive(Parser)]
#[command(version, about = "Management service of the Mold system-VM suite")]
struct Cli {
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves the CloudStack-compatible API.
    Serve {
        /// Data directory (SQLite database, credentials.json).
        #[arg(long, env = "SYSTEMVM_CORE_DATA_DIR")]
        data_dir: PathBuf,
        /// API listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// PostgreSQL URL (postgres://user:pass@host:port/db); SQLite in the data dir when absent.
        #[arg(long, env = "SYSTEMVM_CORE_DATABASE_URL")]
        database_url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    systemvm_telemetry::init_tracing(cli.log_json);
    let Cmd::Serve {
        data_dir,
        listen,
        database_url,
    } = cli.command;
    let mut config = CoreConfig::new(data_dir);
    config.listen = listen;
    config.database_url = database_url;
    let core = start(config).await?;
    println!("API: {}", core.api_url());
    println!("Credentials: {}", core.credentials_path.display());
    tokio::signal::ctrl_c().await?;
    core.shutdown().await;
    Ok(())
}
