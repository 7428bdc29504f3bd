//! An axum server rate-limited per peer IP, with the IETF rate-limit headers.
//!
//! Run: `cargo run --example axum --features tower`, then
//! `curl -i http://127.0.0.1:3000/` a few times (5 requests per 10 s per IP).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::routing::get;
use axum::Router;
use crdt_rate_limiter::middleware::RateLimitOutcome;
use crdt_rate_limiter::{KeyExtractor, RateLimitLayer, RateLimiter};
use tracing_subscriber::filter::LevelFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logs(LevelFilter::INFO);
    let limiter = RateLimiter::new(5, Duration::from_secs(10))?;
    // axum puts the peer address in a `ConnectInfo<SocketAddr>` extension when served
    // with `into_make_service_with_connect_info::<SocketAddr>()` (below).
    let layer = RateLimitLayer::new(limiter, KeyExtractor::peer_ip_from::<ConnectInfo<SocketAddr>>());

    let app = Router::new().route("/", get(hello)).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}

/// Handlers can read what the layer decided.
async fn hello(req: Request) -> String {
    match req.extensions().get::<RateLimitOutcome>().and_then(|o| o.decision) {
        Some(d) => format!("hello; {} of {} left in this window\n", d.remaining, d.limit),
        None => "hello\n".to_owned(),
    }
}
