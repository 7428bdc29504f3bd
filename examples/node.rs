//! An HTTP service node: an axum server that embeds the limiter as a cluster member,
//! behind the rate-limit middleware, with Prometheus metrics and runtime limits.
//!
//! ```sh
//! cargo run --release --example certs -- --out certs n1 n2 n3
//! cargo run --release --features tower,metrics --example node -- --name n1 --http 127.0.0.1:8081 \
//!     --gossip 127.0.0.1:7001 --peer 127.0.0.1:7002 --peer 127.0.0.1:7003 --certs certs \
//!     --limit 100 --window-ms 1000 --admin-token 0123456789abcdef0123
//! curl -i 127.0.0.1:8081/allow/client-42
//! curl -X PUT -H 'Authorization: Bearer 0123456789abcdef0123' 127.0.0.1:8081/quota -d '{"limit": 50, "window_ms": 1000}'
//! ```
//!
//! Routes: `GET /allow/{client}` (200 with `{"allowed":true,"remaining":N}`, or 429 with
//! `Retry-After` and the rate-limit headers; 400 with the reason for an invalid id),
//! `GET /metrics` (Prometheus text), `GET /healthz`; the admin routes `PUT /quota`
//! (JSON `{"limit":..,"window_ms":..}`: the default quota), `PUT /quota/{client}` (JSON
//! `{"tier":"gold"}` or `{"limit":..,"window_ms":..}`: an override) and `PUT /limits` (a
//! whole TOML limits file). `--limits FILE` loads a TOML limits file and reloads it when
//! it changes. Every change is replicated to the whole cluster; an invalid one gets 400
//! (quoting at most the first 200 bytes of the reason) and changes nothing.
//!
//! The admin routes need `Authorization: Bearer TOKEN` with the token given by
//! `--admin-token` (or the `CRL_ADMIN_TOKEN` environment variable, which keeps it out of
//! the process list): 401 without it or with another one. Without a token the admin routes
//! are disabled: they answer 403, and limits change only through `--limits FILE`.
//!
//! Every member must hash client ids with the same secret: `--secret` (32 hex digits),
//! or by default one derived from the cluster CA certificate, which every member shares.
//! `RUST_LOG` sets the log filter (default `info`), for example `RUST_LOG=crdt_rate_limiter=debug`.

mod common;

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use clap::builder::RangedU64ValueParser;
use clap::{Parser, ValueEnum};
use crdt_rate_limiter::limits::{ClientOverride, QuotaSpec};
use crdt_rate_limiter::middleware::RateLimitOutcome;
use crdt_rate_limiter::{
    Admission, Cluster, ClusterConfig, Error, KeyExtractor, LimitsConfig, Quota, RateLimitLayer, RateLimiter, TlsSource,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::filter::LevelFilter;

/// An HTTP service node: axum, the rate-limit middleware, a cluster member over QUIC.
#[derive(Parser, Debug)]
#[command(name = "node", version)]
struct Args {
    /// This node's name: its certificate and key are DIR/NAME.pem and DIR/NAME.key.
    #[arg(long)]
    name: String,
    /// HTTP listen address.
    #[arg(long, value_name = "ADDR")]
    http: SocketAddr,
    /// Gossip (QUIC) listen address.
    #[arg(long, value_name = "ADDR")]
    gossip: SocketAddr,
    /// A seed member's gossip address (repeatable).
    #[arg(long = "peer", value_name = "ADDR")]
    peers: Vec<SocketAddr>,
    /// A seed name, `host:port`, resolved now and every 30 s (a headless service's name
    /// resolves to every instance; repeatable).
    #[arg(long = "peer-name", value_name = "HOST:PORT")]
    peer_names: Vec<String>,
    /// Directory written by the certs example (ca.pem, NAME.pem, NAME.key).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
    /// Requests per client per window (the default quota).
    #[arg(long, allow_negative_numbers = true, default_value_t = 100, value_parser = RangedU64ValueParser::<u64>::new().range(1..))]
    limit: u64,
    /// Window length in milliseconds.
    #[arg(long, allow_negative_numbers = true, value_name = "MS", default_value_t = 1000, value_parser = RangedU64ValueParser::<u64>::new().range(1..))]
    window_ms: u64,
    /// How a member spends the remaining quota between gossip rounds (README: "Admission modes").
    #[arg(long, value_enum, default_value_t = AdmissionArg::Bounded)]
    admission: AdmissionArg,
    /// Time between gossip rounds, in milliseconds (1 to 60000).
    #[arg(long, allow_negative_numbers = true, value_name = "MS", default_value_t = 20, value_parser = RangedU64ValueParser::<u64>::new().range(1..=60_000))]
    gossip_interval_ms: u64,
    /// A TOML limits file, loaded at start and reloaded when it changes.
    #[arg(long, value_name = "FILE")]
    limits: Option<PathBuf>,
    /// The hash secret, 32 hex digits; by default derived from the cluster CA certificate.
    #[arg(long, value_name = "HEX32", value_parser = parse_secret)]
    secret: Option<[u8; 16]>,
    /// Bearer token the admin routes (PUT) require; without one they are disabled (403).
    /// At least 16 visible ASCII characters.
    #[arg(long, value_name = "TOKEN", env = "CRL_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token)]
    admin_token: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AdmissionArg {
    /// Admit while the local view of the global count is under the limit.
    Optimistic,
    /// Spend only this node's share of what remains between rounds, and one request more
    /// when the view shows room beyond the key's rate (the default).
    Bounded,
    /// Spend only this node's share: for bursty clients on many nodes.
    Shares,
}

fn parse_secret(hex: &str) -> Result<[u8; 16], String> {
    if hex.len() != 32 || !hex.is_ascii() {
        return Err("expected 32 hex digits".into());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "expected 32 hex digits")?;
    }
    Ok(out)
}

fn parse_token(token: &str) -> Result<String, String> {
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("expected at least 16 visible ASCII characters (no spaces)".into());
    }
    Ok(token.to_owned())
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
    admin_token: Option<Arc<str>>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    common::init_logs(LevelFilter::INFO);
    if let Err(e) = run(args).await {
        eprintln!("node: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
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
    config.seed_names = args.peer_names.clone();
    config.gossip.interval_ms = args.gossip_interval_ms;
    let quota = Quota::new(args.limit, Duration::from_millis(args.window_ms))?;
    let admission = match args.admission {
        AdmissionArg::Optimistic => Admission::Optimistic,
        AdmissionArg::Bounded => Admission::Bounded,
        AdmissionArg::Shares => Admission::Shares,
    };
    let (limiter, cluster) = RateLimiter::builder().quota(quota).admission(admission).hash_secret(secret).cluster(config).start().await?;
    let cluster = Arc::new(cluster);
    if let Some(path) = &args.limits {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        limiter.apply_limits(LimitsConfig::from_toml(&text)?)?;
        tokio::spawn(watch_limits(limiter.clone(), path.clone()));
    }

    if args.admin_token.is_none() {
        tracing::warn!("no --admin-token: the admin routes (PUT /quota, /quota/{{client}}, /limits) are disabled");
    }
    let app = App { limiter: limiter.clone(), cluster: cluster.clone(), prometheus, admin_token: args.admin_token.map(Arc::from) };
    let limited = Router::new()
        .route("/allow/{client}", get(allow))
        .layer(RateLimitLayer::new(
            limiter.clone(),
            KeyExtractor::from_fn(|parts| parts.uri.path().strip_prefix("/allow/").filter(|c| !c.is_empty()).map(str::to_owned)),
        ))
        .layer(axum::middleware::map_response(explain_refusal));
    let admin = Router::new()
        .route("/quota", put(put_default))
        .route("/quota/{client}", put(put_client))
        .route("/limits", put(put_limits))
        .layer(axum::middleware::from_fn_with_state(app.clone(), require_admin));
    let router =
        Router::new().merge(limited).merge(admin).route("/metrics", get(metrics_text)).route("/healthz", get(healthz)).with_state(app);
    let listener = tokio::net::TcpListener::bind(args.http).await?;
    tracing::info!(
        node = %args.name,
        http = %listener.local_addr()?,
        gossip = %cluster.local_addr(),
        peers = args.peers.len(),
        admission = ?args.admission,
        gossip_interval_ms = args.gossip_interval_ms,
        "node serving"
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    // Leave gracefully: peers drop this node at once and keep its counts.
    cluster.shutdown().await;
    Ok(())
}

/// The middleware refuses an invalid client id with an empty 400; say why.
async fn explain_refusal(res: Response) -> Response {
    if res.status() != StatusCode::BAD_REQUEST {
        return res;
    }
    let reason = match res.extensions().get::<RateLimitOutcome>().and_then(|o| o.error.as_ref()) {
        Some(e @ (Error::KeyTooLong { .. } | Error::EmptyKey)) => format!("invalid client id: {e}\n"),
        _ => return res,
    };
    let (mut parts, _) = res.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    Response::from_parts(parts, axum::body::Body::from(reason))
}

/// Admin routes: `Authorization: Bearer TOKEN` must carry the `--admin-token`; without a
/// configured token they are disabled.
async fn require_admin(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(token) = &app.admin_token else {
        return (StatusCode::FORBIDDEN, "admin routes are disabled: start the node with --admin-token\n").into_response();
    };
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "admin routes need Authorization: Bearer <admin token>\n")
            .into_response(),
    }
}

/// Compares without stopping at the first difference, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

/// Longest reason quoted back in a 400: parse errors can quote the input, which may be
/// large.
const MAX_REASON_BYTES: usize = 200;

fn bad_request(e: impl std::fmt::Display) -> (StatusCode, String) {
    let mut reason = e.to_string();
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("... (truncated)");
    }
    (StatusCode::BAD_REQUEST, format!("{reason}\n"))
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
                Ok(v) => tracing::info!(file = %path.display(), version = %format_args!("{}.{}", v.at_ms, v.node), "limits reloaded"),
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "limits refused, keeping the ones in force"),
            },
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "limits refused, keeping the ones in force"),
        }
    }
}
