//! The simulator's command line: `cargo run --release -p sim -- --help`.

use std::io::Write;
use std::process::ExitCode;

// Why not the system allocator: sim/Cargo.toml, beside the dependency.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let out = sim::cli(std::env::args().skip(1));
    // A closed pipe (`sim | head`) is not the simulator's failure.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes()).and_then(|()| stdout.flush());
    let _ = std::io::stderr().lock().write_all(out.stderr.as_bytes());
    ExitCode::from(out.code)
}
