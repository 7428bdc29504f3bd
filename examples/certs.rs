//! Generate a cluster CA and node certificates.
//!
//! ```text
//! cargo run --release --example certs -- --out DIR NAME...
//! cargo run --release --example certs -- --help
//! ```

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use crdt_rate_limiter::transport::certs;
use tracing_subscriber::filter::LevelFilter;

/// Writes a cluster CA and one certificate per node name:
/// DIR/ca.pem, DIR/ca.key (the cluster CA certificate and private key) and
/// DIR/NAME.pem, DIR/NAME.key (a node's certificate and private key) for each NAME.
///
/// DIR is created if missing. Private keys are written with mode 0600 (unix). If
/// DIR/ca.pem and DIR/ca.key already exist, that CA is reused, so more nodes can be
/// added to an existing cluster later; existing NAME.pem/NAME.key files are
/// overwritten. `RUST_LOG` sets the log filter (default `warn`).
#[derive(Parser, Debug)]
#[command(name = "certs", version)]
struct Args {
    /// Directory to write into.
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    /// Node names: DNS-style (e.g. node-a or node-a.cluster), used as certificate CN and
    /// DNS SubjectAltName; "ca" is reserved.
    #[arg(value_name = "NAME", required = true, value_parser = parse_name)]
    names: Vec<String>,
}

fn parse_name(name: &str) -> Result<String, String> {
    if name == "ca" {
        return Err("\"ca\" is reserved (it would overwrite the CA)".into());
    }
    certs::validate_node_name(name).map_err(|e| e.to_string())?;
    Ok(name.to_string())
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(err)?;
    // `mode` only applies to newly created files; tighten existing ones too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents.as_bytes()).map_err(err)
}

fn run(args: Args) -> Result<(), String> {
    fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let ca_pem_path = args.out.join("ca.pem");
    let ca_key_path = args.out.join("ca.key");
    let (ca_pem, ca_key) = match (ca_pem_path.exists(), ca_key_path.exists()) {
        (true, true) => {
            let read = |p: &Path| fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
            eprintln!("reusing existing CA {}", ca_pem_path.display());
            (read(&ca_pem_path)?, read(&ca_key_path)?)
        }
        (false, false) => {
            let (pem, key) = certs::generate_ca().map_err(|e| e.to_string())?;
            write_file(&ca_pem_path, &pem, false)?;
            write_file(&ca_key_path, &key, true)?;
            eprintln!("wrote new CA {}", ca_pem_path.display());
            (pem, key)
        }
        _ => {
            return Err(format!(
                "only one of {} and {} exists; refusing to overwrite a half CA",
                ca_pem_path.display(),
                ca_key_path.display()
            ))
        }
    };
    for name in &args.names {
        let (pem, key) = certs::issue(&ca_pem, &ca_key, name).map_err(|e| format!("cannot issue certificate for {name}: {e}"))?;
        let pem_path = args.out.join(format!("{name}.pem"));
        write_file(&pem_path, &pem, false)?;
        write_file(&args.out.join(format!("{name}.key")), &key, true)?;
        eprintln!("wrote {}", pem_path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    common::init_logs(LevelFilter::WARN);
    let mut seen = std::collections::HashSet::new();
    args.names.retain(|n| seen.insert(n.clone()));
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
