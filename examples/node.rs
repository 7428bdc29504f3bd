//! An HTTP service node: an axum server that embeds the limiter as a cluster member,
//! behind the rate-limit middleware, with Prometheus metrics and runtime limits.
//!
//! ```sh
//! cargo run --release --example certs -- --out certs n1 n2 n3
//! cargo run --release --example node -- --name n1 --http 127.0.0.1:8081 --gossip 127.0.0.1:7001 \
//!     --peer 127.0.0.1:7002 --peer 127.0.0.1:7003 --certs certs --limit 100 --window-ms 1000
//! curl -i 127.0.0.1:8081/allow/client-42
//! curl -X PUT 127.0.0.1:8081/quota -d '{"limit": 50, "window_ms": 1000}'
//! ```
//!
//! Routes: `GET /allow/{client}` (200 with `{"allowed":true,"remaining":N}`, or 429 with
//! `Retry-After` and the rate-limit headers), `GET /metrics` (Prometheus text),
//! `GET /healthz`, `PUT /quota` (JSON `{"limit":..,"window_ms":..}`: the default quota),
//! `PUT /quota/{client}` (JSON `{"tier":"gold"}` or `{"limit":..,"window_ms":..}`: an
//! override), `PUT /limits` (a whole TOML limits file). `--limits FILE` loads a TOML
//! limits file and reloads it when it changes. Every change is replicated to the whole
//! cluster; an invalid one gets 400 and changes nothing.
//!
//! Every member must hash client ids with the same secret: `--secret` (32 hex digits),
//! or by default one derived from the cluster CA certificate, which every member shares.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use crdt_rate_limiter::{
    ClientOverride, Cluster, ClusterConfig, KeyExtractor, LimitsConfig, Quota, QuotaSpec, RateLimitLayer, RateLimitOutcome, RateLimiter,
    TlsSource,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const USAGE: &str = "usage: node --name NAME --http ADDR --gossip ADDR [--peer ADDR]... --certs DIR \
[--limit N] [--window-ms MS] [--limits FILE] [--secret HEX32]";

struct Args {
    name: String,
    http: SocketAddr,
    gossip: SocketAddr,
    peers: Vec<SocketAddr>,
    certs: PathBuf,
    limit: u64,
    window_ms: u64,
    limits: Option<PathBuf>,
    secret: Option<[u8; 16]>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut name, mut http, mut gossip, mut certs) = (None, None, None, None);
    let (mut peers, mut limit, mut window_ms, mut limits, mut secret) = (Vec::new(), 100, 1000, None, None);
    let addr = |v: Option<String>, flag: &str| -> Result<SocketAddr, String> {
        let v = v.ok_or(format!("{flag} needs a value"))?;
        v.parse().map_err(|e| format!("{flag} {v}: {e}"))
    };
    let num = |v: Option<String>, flag: &str| -> Result<u64, String> {
        let v = v.ok_or(format!("{flag} needs a value"))?;
        v.parse().map_err(|e| format!("{flag} {v}: {e}"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--name" => name = it.next(),
            "--http" => http = Some(addr(it.next(), "--http")?),
            "--gossip" => gossip = Some(addr(it.next(), "--gossip")?),
            "--peer" => peers.push(addr(it.next(), "--peer")?),
            "--certs" => certs = it.next().map(PathBuf::from),
            "--limit" => limit = num(it.next(), "--limit")?,
            "--window-ms" => window_ms = num(it.next(), "--window-ms")?,
            "--limits" => limits = it.next().map(PathBuf::from),
            "--secret" => secret = Some(parse_secret(&it.next().ok_or("--secret needs a value")?)?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        name: name.ok_or("--name is required")?,
        http: http.ok_or("--http is required")?,
        gossip: gossip.ok_or("--gossip is required")?,
        peers,
        certs: certs.ok_or("--certs is required")?,
        limit,
        window_ms,
        limits,
        secret,
    })
}

fn parse_secret(hex: &str) -> Result<[u8; 16], String> {
    if hex.len() != 32 || !hex.is_ascii() {
        return Err("--secret takes 32 hex digits".into());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "--secret takes 32 hex digits")?;
    }
    Ok(out)
}

/// A secret every member derives alike from the cluster CA certificate.
fn secret_from_ca(ca_pem: &[u8]) -> [u8; 16] {
    use std::hash::Hasher;
    let mut out = [0u8; 16];
    for (half, k) in [(0usize, 0x6372_6c2d_6361_2d30u64), (8, 0x6372_6c2d_6361_2d31)] {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(k, !k);
        h.write(ca_pem);
        out[half..half + 8].copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

#[derive(Clone)]
struct App {
    limiter: RateLimiter,
    cluster: Arc<Cluster>,
    prometheus: PrometheusHandle,
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("node: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("node: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber_init();
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(crdt_rate_limiter::metrics::DECISION_LATENCY.into()),
            crdt_rate_limiter::metrics::DECISION_LATENCY_BUCKETS,
        )?
        .build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("metrics recorder: {e}"))?;

    let ca = args.certs.join("ca.pem");
    let secret = match args.secret {
        Some(s) => s,
        None => secret_from_ca(&std::fs::read(&ca).map_err(|e| format!("{}: {e}", ca.display()))?),
    };
    let tls = TlsSource::files(&ca, args.certs.join(format!("{}.pem", args.name)), args.certs.join(format!("{}.key", args.name)));
    let mut config = ClusterConfig::new(tls, args.gossip);
    config.seeds = args.peers.clone();
    let quota = Quota::new(args.limit, Duration::from_millis(args.window_ms))?;
    let (limiter, cluster) = RateLimiter::builder().quota(quota).hash_secret(secret).cluster(config).start().await?;
    let cluster = Arc::new(cluster);
    if let Some(path) = &args.limits {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        limiter.apply_limits(LimitsConfig::from_toml(&text)?)?;
        tokio::spawn(watch_limits(limiter.clone(), path.clone()));
    }

    let app = App { limiter: limiter.clone(), cluster: cluster.clone(), prometheus };
    let limited = Router::new().route("/allow/{client}", get(allow)).layer(RateLimitLayer::new(
        limiter.clone(),
        KeyExtractor::from_fn(|parts| parts.uri.path().strip_prefix("/allow/").filter(|c| !c.is_empty()).map(str::to_owned)),
    ));
    let router = Router::new()
        .merge(limited)
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/quota", put(put_default))
        .route("/quota/{client}", put(put_client))
        .route("/limits", put(put_limits))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.http).await?;
    eprintln!("node {}: http on {}, gossip on {}, {} peer(s)", args.name, listener.local_addr()?, cluster.local_addr(), args.peers.len());
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    // Leave gracefully: peers drop this node at once and keep its counts.
    cluster.shutdown().await;
    Ok(())
}

fn tracing_subscriber_init() {}

async fn allow(Extension(outcome): Extension<RateLimitOutcome>) -> Json<serde_json::Value> {
    let remaining = outcome.decision.map_or(0, |d| d.remaining);
    Json(serde_json::json!({ "allowed": !outcome.denied, "remaining": remaining }))
}

async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    // Every series docs/metrics.md lists: the limiter's, the gossip core's, the refusals.
    crdt_rate_limiter::metrics::record_cluster(&app.cluster);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.prometheus.render())
}

/// 200 `ok`, or 503 `degraded` with one line per refused peer (another hash secret, a
/// certificate refused, another node answering) while any is.
async fn healthz(State(app): State<App>) -> (StatusCode, String) {
    let refused = app.cluster.refusals();
    if refused.is_empty() {
        return (StatusCode::OK, "ok\n".to_owned());
    }
    let mut body = String::from("degraded: peers refused\n");
    for r in refused {
        body.push_str(&format!("{r}\n"));
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

fn bad_request(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, format!("{e}\n"))
}

/// Applies `change` to the limits in force (or to the default ones) and replicates it.
fn change_limits(app: &App, change: impl FnOnce(&mut LimitsConfig)) -> Result<String, (StatusCode, String)> {
    let mut cfg = app.limiter.limits().1.unwrap_or_else(|| LimitsConfig::new(app.limiter.quota()));
    change(&mut cfg);
    let version = app.limiter.apply_limits(cfg).map_err(bad_request)?;
    Ok(format!("limits version {}.{} in force\n", version.at_ms, version.node))
}

async fn put_default(State(app): State<App>, body: String) -> Result<String, (StatusCode, String)> {
    let spec: QuotaSpec = serde_json::from_str(&body).map_err(bad_request)?;
    change_limits(&app, |cfg| cfg.default = spec)
}

async fn put_client(State(app): State<App>, Path(client): Path<String>, body: String) -> Result<String, (StatusCode, String)> {
    let over: ClientOverride = serde_json::from_str(&body).map_err(bad_request)?;
    change_limits(&app, |cfg| {
        cfg.clients.insert(client, over);
    })
}

async fn put_limits(State(app): State<App>, body: String) -> Result<String, (StatusCode, String)> {
    let cfg = LimitsConfig::from_toml(&body).map_err(bad_request)?;
    change_limits(&app, |c| *c = cfg)
}

/// Reloads the limits file whenever its modification time changes; an invalid file is
/// reported and the limits in force stay.
async fn watch_limits(limiter: RateLimiter, path: PathBuf) {
    let mtime = |p: &FsPath| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = mtime(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| LimitsConfig::from_toml(&t).map_err(|e| e.to_string()))
        {
            Ok(cfg) => match limiter.apply_limits(cfg) {
                Ok(v) => eprintln!("limits reloaded from {} (version {}.{})", path.display(), v.at_ms, v.node),
                Err(e) => eprintln!("limits in {} refused, keeping the ones in force: {e}", path.display()),
            },
            Err(e) => eprintln!("limits in {} refused, keeping the ones in force: {e}", path.display()),
        }
    }
}
