//! The tower middleware end to end: a real axum server on loopback, a real HTTP/1 client.
//!
//! Time is a `ManualClock` the tests move; nothing sleeps waiting for a window. Every
//! test is bounded by a timeout so a hung connection fails instead of hanging.
#![cfg(feature = "tower")]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request};
use axum::routing::get;
use axum::Router;
use crdt_rate_limiter::limits::ClientOverride;
use crdt_rate_limiter::middleware::MAX_POLICY_NAME_LEN;
use crdt_rate_limiter::middleware::{MissingKey, OnError, RateLimitOutcome};
use crdt_rate_limiter::{Clock, ConfigError, KeyExtractor, LimitsConfig, ManualClock, Quota, RateLimitLayer, RateLimiter, Strategy};
use http::{HeaderMap, HeaderName, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A Unix time on a 10 s boundary, so window arithmetic is easy to read.
const T0: i64 = 1_700_000_000_000;
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Runs a test body under a deadline.
async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(20), test).await.expect("test timed out");
}

/// `limit` per `window_ms`, fixed window (exact, easy to reason about), on `clock`.
fn limiter(limit: u64, window_ms: u64, clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder()
        .quota(Quota::new(limit, Duration::from_millis(window_ms)).unwrap())
        .strategy(Strategy::FixedWindow)
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// Answers 200 with a summary of the outcome the layer attached, and counts its calls.
fn app(layer: RateLimitLayer, calls: Arc<AtomicUsize>) -> Router {
    let handler = move |req: Request| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            match req.extensions().get::<RateLimitOutcome>() {
                None => "no outcome".to_owned(),
                Some(o) => format!(
                    "decided={} remaining={} denied={} shadow={}",
                    o.decision.is_some(),
                    o.decision.map_or(-1, |d| d.remaining as i64),
                    o.denied,
                    o.shadow
                ),
            }
        }
    };
    Router::new().route("/", get(handler.clone())).route("/t/{tenant}", get(handler)).layer(layer)
}

/// Serves `app` on 127.0.0.1:0, with axum's `ConnectInfo<SocketAddr>` if `connect_info`.
async fn serve(app: Router, connect_info: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if connect_info {
            axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
        } else {
            axum::serve(listener, app).await.unwrap();
        }
    });
    addr
}

struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http(), addr }
    }

    async fn get(&self, path: &str, headers: &[(&HeaderName, &str)]) -> Reply {
        let mut req = http::Request::get(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            // `from_bytes` admits non-ASCII (obs-text), which the server must cope with.
            req = req.header(*name, http::HeaderValue::from_bytes(value.as_bytes()).unwrap());
        }
        let res = self.client.request(req.body(Empty::new()).unwrap()).await.unwrap();
        let (parts, body) = res.into_parts();
        let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        Reply { status: parts.status, headers: parts.headers, body }
    }
}

/// A server limiting each peer IP to `limit` per `window_ms`, with its clock and call count.
async fn peer_ip_server(
    limit: u64,
    window_ms: u64,
    configure: impl FnOnce(RateLimitLayer) -> RateLimitLayer,
) -> (Http, ManualClock, Arc<AtomicUsize>, RateLimiter) {
    let clock = ManualClock::new(T0);
    let rl = limiter(limit, window_ms, &clock);
    let layer = configure(RateLimitLayer::new(rl.clone(), KeyExtractor::peer_ip_from::<ConnectInfo<SocketAddr>>()));
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(layer, calls.clone()), true).await;
    (Http::new(addr), clock, calls, rl)
}

#[tokio::test]
async fn requests_past_the_limit_get_429_with_retry_after_and_never_reach_the_service() {
    bounded(async {
        let (http, clock, calls, _) = peer_ip_server(3, 10_000, |l| l).await;
        clock.set_ms(T0 + 2_500); // 7.5 s left in the window
        for _ in 0..3 {
            assert_eq!(http.get("/", &[]).await.status, StatusCode::OK);
        }
        let denied = http.get("/", &[]).await;
        assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denied.header("retry-after"), Some("8"), "7.5 s rounded up");
        assert_eq!(denied.header("ratelimit-policy"), Some(r#""default";q=3;w=10"#));
        assert_eq!(denied.header("ratelimit"), Some(r#""default";r=0;t=8"#));
        assert_eq!(denied.body, "");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the denied request did not reach the handler");
    })
    .await;
}

#[tokio::test]
async fn every_admitted_response_carries_the_policy_and_a_counting_down_remaining() {
    bounded(async {
        let (http, clock, _, _) = peer_ip_server(3, 10_000, |l| l).await;
        clock.set_ms(T0 + 2_500);
        for remaining in [2, 1, 0] {
            let r = http.get("/", &[]).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.header("ratelimit-policy"), Some(r#""default";q=3;w=10"#));
            assert_eq!(r.header("ratelimit"), Some(format!(r#""default";r={remaining};t=8"#).as_str()));
            assert_eq!(r.header("retry-after"), None, "only refusals carry Retry-After");
            assert_eq!(r.body, format!("decided=true remaining={remaining} denied=false shadow=false"));
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_waits_retry_after_succeeds_and_one_that_retries_a_second_early_does_not() {
    bounded(async {
        let (http, clock, _, _) = peer_ip_server(1, 10_000, |l| l).await;
        clock.set_ms(T0 + 2_500);
        assert_eq!(http.get("/", &[]).await.status, StatusCode::OK);
        let denied = http.get("/", &[]).await;
        let secs: i64 = denied.header("retry-after").unwrap().parse().unwrap();
        assert_eq!(secs, 8);
        clock.advance_ms((secs - 1) * 1_000);
        assert_eq!(http.get("/", &[]).await.status, StatusCode::TOO_MANY_REQUESTS);
        clock.advance_ms(1_000);
        let r = http.get("/", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("ratelimit"), Some(r#""default";r=0;t=10"#), "a fresh window");
    })
    .await;
}

#[tokio::test]
async fn sub_second_waits_round_up_to_one_second_never_zero() {
    bounded(async {
        let (http, clock, _, _) = peer_ip_server(1, 300, |l| l).await;
        clock.set_ms(T0 + 50); // at most 300 ms left in the window
        let ok = http.get("/", &[]).await;
        assert_eq!(ok.header("ratelimit-policy"), Some(r#""default";q=1;w=1"#), "w rounds 0.3 s up to 1");
        assert_eq!(ok.header("ratelimit"), Some(r#""default";r=0;t=1"#));
        let denied = http.get("/", &[]).await;
        assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denied.header("retry-after"), Some("1"));
        assert_eq!(denied.header("ratelimit"), Some(r#""default";r=0;t=1"#));
    })
    .await;
}

#[tokio::test]
async fn shadow_mode_counts_and_reports_but_never_denies() {
    bounded(async {
        let (http, clock, calls, rl) = peer_ip_server(2, 10_000, |l| l.shadow(true)).await;
        clock.set_ms(T0 + 2_500);
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let r = http.get("/", &[]).await;
            assert_eq!(r.status, StatusCode::OK, "shadow mode never denies");
            assert_eq!(r.header("retry-after"), None);
            assert!(r.header("ratelimit").is_some() && r.header("ratelimit-policy").is_some());
            bodies.push(r.body);
        }
        assert_eq!(
            bodies,
            [
                "decided=true remaining=1 denied=false shadow=true",
                "decided=true remaining=0 denied=false shadow=true",
                "decided=true remaining=0 denied=true shadow=true",
                "decided=true remaining=0 denied=true shadow=true",
            ]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // The limiter counted the admitted ones, as enforcement would have.
        assert!(!rl.check("127.0.0.1", clock.now_ms()).unwrap().allowed);
    })
    .await;
}

#[tokio::test]
async fn shadow_mode_lets_through_requests_the_missing_key_policy_would_refuse() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let layer = RateLimitLayer::new(limiter(1, 10_000, &clock), KeyExtractor::header(API_KEY)).shadow(true);
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        let r = http.get("/", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("ratelimit"), None, "no key, no decision, no headers");
        assert_eq!(r.body, "decided=false remaining=-1 denied=true shadow=true");
    })
    .await;
}

#[tokio::test]
async fn the_peer_ip_extractor_keys_on_axums_connect_info() {
    bounded(async {
        let (http, clock, _, rl) = peer_ip_server(1, 10_000, |l| l).await;
        assert_eq!(http.get("/", &[]).await.status, StatusCode::OK);
        assert_eq!(http.get("/", &[]).await.status, StatusCode::TOO_MANY_REQUESTS);
        // The key the layer counted under is the peer's IP.
        assert!(!rl.check("127.0.0.1", clock.now_ms()).unwrap().allowed);
        assert!(rl.check("127.0.0.2", clock.now_ms()).unwrap().allowed);
    })
    .await;
}

#[tokio::test]
async fn the_header_extractor_limits_each_api_key_separately() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let layer = RateLimitLayer::new(limiter(2, 10_000, &clock), KeyExtractor::header(API_KEY));
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        for _ in 0..2 {
            assert_eq!(http.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::OK);
        }
        assert_eq!(http.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::TOO_MANY_REQUESTS);
        let bob = http.get("/", &[(&API_KEY, "bob")]).await;
        assert_eq!(bob.status, StatusCode::OK);
        assert_eq!(bob.header("ratelimit"), Some(r#""default";r=1;t=10"#));
    })
    .await;
}

#[tokio::test]
async fn a_closure_extractor_can_key_on_the_path() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let by_tenant = KeyExtractor::from_fn(|parts| parts.uri.path().strip_prefix("/t/").map(str::to_owned));
        let layer = RateLimitLayer::new(limiter(1, 10_000, &clock), by_tenant).missing_key(MissingKey::Skip);
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        assert_eq!(http.get("/t/acme", &[]).await.status, StatusCode::OK);
        assert_eq!(http.get("/t/acme", &[]).await.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http.get("/t/globex", &[]).await.status, StatusCode::OK);
        assert_eq!(http.get("/", &[]).await.status, StatusCode::OK, "no tenant: skipped");
    })
    .await;
}

#[tokio::test]
async fn a_missing_key_is_refused_with_400_by_default() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let layer = RateLimitLayer::new(limiter(5, 10_000, &clock), KeyExtractor::header(API_KEY));
        let calls = Arc::new(AtomicUsize::new(0));
        let http = Http::new(serve(app(layer, calls.clone()), false).await);
        for headers in [&[][..], &[(&API_KEY, "")][..], &[(&API_KEY, "caf\u{e9}")][..]] {
            let r = http.get("/", headers).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "headers {headers:?}");
            assert_eq!(r.header("ratelimit"), None);
            assert_eq!(r.header("retry-after"), None);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(http.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn without_connect_info_the_peer_ip_is_a_missing_key() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let layer = RateLimitLayer::new(limiter(5, 10_000, &clock), KeyExtractor::peer_ip_from::<ConnectInfo<SocketAddr>>());
        // Served without `into_make_service_with_connect_info`: no address to key on.
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        assert_eq!(http.get("/", &[]).await.status, StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn skipped_keyless_requests_pass_uncounted_and_without_headers() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let rl = limiter(1, 10_000, &clock);
        let layer = RateLimitLayer::new(rl.clone(), KeyExtractor::header(API_KEY)).missing_key(MissingKey::Skip);
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        for _ in 0..3 {
            let r = http.get("/", &[]).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.header("ratelimit"), None);
            assert_eq!(r.header("ratelimit-policy"), None);
            assert_eq!(r.body, "decided=false remaining=-1 denied=false shadow=false");
        }
        assert_eq!(rl.active_keys(), 0, "nothing was counted");
    })
    .await;
}

#[tokio::test]
async fn limiter_errors_fail_closed_by_default() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let rl = RateLimiter::builder()
            .quota(Quota::new(5, Duration::from_secs(10)).unwrap())
            .clock(clock.clone())
            .max_key_len(8)
            .max_keys(1)
            .build()
            .unwrap();
        let layer = RateLimitLayer::new(rl, KeyExtractor::header(API_KEY));
        let calls = Arc::new(AtomicUsize::new(0));
        let http = Http::new(serve(app(layer, calls.clone()), false).await);
        let too_long = http.get("/", &[(&API_KEY, "a-key-longer-than-8")]).await;
        assert_eq!(too_long.status, StatusCode::BAD_REQUEST, "an invalid key is the client's doing");
        assert_eq!(http.get("/", &[(&API_KEY, "first")]).await.status, StatusCode::OK);
        let over_cap = http.get("/", &[(&API_KEY, "second")]).await;
        assert_eq!(over_cap.status, StatusCode::SERVICE_UNAVAILABLE, "the key cap is the server's state");
        assert_eq!(over_cap.header("ratelimit"), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn limiter_errors_fail_open_when_configured() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let rl = RateLimiter::builder()
            .quota(Quota::new(5, Duration::from_secs(10)).unwrap())
            .clock(clock.clone())
            .max_key_len(8)
            .build()
            .unwrap();
        let layer = RateLimitLayer::new(rl, KeyExtractor::header(API_KEY)).on_error(OnError::Allow);
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        let r = http.get("/", &[(&API_KEY, "a-key-longer-than-8")]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("ratelimit"), None);
        assert_eq!(r.body, "decided=false remaining=-1 denied=false shadow=false");
    })
    .await;
}

#[tokio::test]
async fn clones_of_a_layer_share_one_limit_across_servers() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let layer = RateLimitLayer::new(limiter(2, 10_000, &clock), KeyExtractor::header(API_KEY));
        let one = Http::new(serve(app(layer.clone(), Arc::default()), false).await);
        let two = Http::new(serve(app(layer, Arc::default()), false).await);
        assert_eq!(one.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::OK);
        assert_eq!(two.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::OK);
        assert_eq!(one.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(two.get("/", &[(&API_KEY, "alice")]).await.status, StatusCode::TOO_MANY_REQUESTS);
    })
    .await;
}

#[tokio::test]
async fn a_custom_policy_name_is_sent_as_an_escaped_structured_field_string() {
    bounded(async {
        let clock = ManualClock::new(T0);
        let layer =
            RateLimitLayer::new(limiter(100, 60_000, &clock), KeyExtractor::header(API_KEY)).policy_name(r#"tier "gold" \ api"#).unwrap();
        let http = Http::new(serve(app(layer, Arc::default()), false).await);
        let r = http.get("/", &[(&API_KEY, "alice")]).await;
        // T0 is 20 s into its minute: 40 s until the window resets.
        assert_eq!(r.header("ratelimit-policy"), Some(r#""tier \"gold\" \\ api";q=100;w=60"#));
        assert_eq!(r.header("ratelimit"), Some(r#""tier \"gold\" \\ api";r=99;t=40"#));
    })
    .await;
}

#[test]
fn policy_names_outside_printable_ascii_or_too_long_are_refused() {
    let clock = ManualClock::new(T0);
    let layer = || RateLimitLayer::new(limiter(1, 1_000, &clock), KeyExtractor::peer_ip());
    for bad in [String::new(), "caf\u{e9}".to_owned(), "tab\there".to_owned(), "x".repeat(MAX_POLICY_NAME_LEN + 1)] {
        assert!(matches!(layer().policy_name(&bad), Err(ConfigError::Invalid { field: "policy_name", .. })), "{bad:?}");
    }
    assert!(layer().policy_name(&"x".repeat(MAX_POLICY_NAME_LEN)).is_ok());
}

#[tokio::test]
async fn an_overridden_client_is_advertised_its_own_quota_and_window() {
    bounded(async {
        // Default 100 per 10 s; the client `vip` has 5 per 60 s.
        let clock = ManualClock::new(T0);
        let rl = limiter(100, 10_000, &clock);
        let mut cfg = LimitsConfig::new(rl.quota());
        cfg.clients.insert("vip".into(), ClientOverride { tier: None, limit: Some(5), window_ms: Some(60_000), burst: None });
        rl.apply_limits(cfg).unwrap();
        let layer = RateLimitLayer::new(rl.clone(), KeyExtractor::header(API_KEY));
        let http = Http::new(serve(app(layer, Arc::new(AtomicUsize::new(0))), false).await);
        let vip = http.get("/", &[(&API_KEY, "vip")]).await;
        assert_eq!(vip.status, StatusCode::OK);
        assert_eq!(vip.header("ratelimit-policy"), Some(r#""default";q=5;w=60"#));
        // T0 is 20 s into a 60 s window: the fixed window resets in 40 s.
        assert_eq!(vip.header("ratelimit"), Some(r#""default";r=4;t=40"#));
        let other = http.get("/", &[(&API_KEY, "someone")]).await;
        assert_eq!(other.header("ratelimit-policy"), Some(r#""default";q=100;w=10"#));
        // The decision names the quota that decided.
        let d = rl.check_now("vip").unwrap();
        assert_eq!((d.quota.limit(), d.quota.window()), (5, Duration::from_secs(60)));
        assert_eq!(rl.check_now("someone").unwrap().quota, rl.quota());
    })
    .await;
}
