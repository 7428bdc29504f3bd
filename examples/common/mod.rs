//! What the examples share: their log set-up.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `default` and above (`RUST_LOG` overrides it), in colour on a
/// terminal.
pub fn init_logs(default: LevelFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::builder().with_default_directive(default.into()).from_env_lossy())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
