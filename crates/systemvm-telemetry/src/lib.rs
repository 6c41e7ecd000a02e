//! Logging set-up shared by the suite's binaries: `tracing` to standard error, filtered by `RUST_LOG`
//! (default `info`), as text or as JSON lines.
#![forbid(unsafe_code)]

/// Installs the global subscriber. Call once, at the start of `main`.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
