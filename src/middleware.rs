//! Tower middleware: [`RateLimitLayer`] puts a [`RateLimiter`] in front of any service
//! of `http::Request<B>` (axum, hyper, tonic, ...). Enabled by the cargo feature `tower`.
//!
//! For each request the layer extracts a client key ([`KeyExtractor`]), asks
//! [`RateLimiter::check_now`] (the limiter's own clock), and then (the default quota, the
//! per-client overrides and the per-window stores are read without a lock: each thread
//! keeps its own copy of the override map and store list, refreshed when they change):
//!
//! * **admitted**: calls the inner service and adds the rate-limit headers to its response;
//! * **denied**: answers `429 Too Many Requests` itself, with `Retry-After` and the
//!   rate-limit headers; the inner service is not called;
//! * **no key** ([`MissingKey`]) or **limiter error** ([`OnError`]): passes through without
//!   headers, or answers `400`/`503` (fail closed, the default);
//! * **shadow mode** ([`RateLimitLayer::shadow`]): decides and counts exactly as above,
//!   adds the same headers, but always calls the inner service.
//!
//! # Headers
//!
//! Every decided response (admitted, denied, or shadow) carries the two fields of
//! [draft-ietf-httpapi-ratelimit-headers-10] (Structured Fields; the policy name is a
//! quoted String):
//!
//! ```text
//! RateLimit-Policy: "default";q=100;w=60
//! RateLimit: "default";r=42;t=17
//! ```
//!
//! * `q` is the limit of the quota that decided ([`Decision::quota`]: the client's
//!   override if it has one, else the default), `w` that quota's window in seconds
//!   (rounded **up** to a whole second, at least 1: a client pacing itself on it never
//!   exceeds the limit);
//! * `r` is [`Decision::remaining`];
//! * `t` is seconds, rounded **up**: when admitted, [`Decision::reset_after`] (the time
//!   until the full quota is back; with the sliding window or token bucket some quota may
//!   return sooner, so it is an upper bound); when denied, the same value as `Retry-After`.
//!
//! A denied response carries `Retry-After` in whole seconds: [`Decision::retry_after`]
//! rounded **up**, at least 1, so a client that waits as told is never refused for
//! retrying early (if no other traffic arrives). The policy name (`"default"`) is set with
//! [`RateLimitLayer::policy_name`]. Headers of the same names set by the inner service are
//! replaced.
//!
//! # Outcome
//!
//! Each request that goes through carries a [`RateLimitOutcome`] in its extensions (a
//! handler can read the remaining quota), and each response carries it too (an outer
//! layer can log or count shadow denials).
//!
//! [draft-ietf-httpapi-ratelimit-headers-10]: https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/10/

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{Extensions, Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::{ConfigError, Decision, Error, RateLimiter};

/// The `RateLimit-Policy` header field (the quota: limit and window).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header field (the client's remaining quota and time to reset).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// Longest policy name accepted by [`RateLimitLayer::policy_name`], in bytes.
pub const MAX_POLICY_NAME_LEN: usize = 64;

/// How the layer finds the client a request is counted against.
///
/// Cheap to clone. An extracted key that is empty counts as no key ([`MissingKey`]).
///
/// Behind a reverse proxy, the peer address is the proxy's: key on a header the proxy
/// sets (and strips from client requests) with [`header`](Self::header) or
/// [`from_fn`](Self::from_fn). Each IPv6 address is its own key; a client holding a
/// `/64` can rotate addresses, so key on a prefix with [`from_fn`](Self::from_fn) if
/// that matters.
#[derive(Clone)]
pub struct KeyExtractor(Extract);

type KeyFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Extract {
    Peer(fn(&Extensions) -> Option<IpAddr>),
    Header(HeaderName),
    Fn(Arc<KeyFn>),
}

impl KeyExtractor {
    /// The peer's IP address, from a [`SocketAddr`] (or an [`IpAddr`]) in the request's
    /// extensions, such as a hyper server loop or a tower layer puts there.
    ///
    /// axum wraps the address in its `ConnectInfo`; use
    /// [`peer_ip_from::<ConnectInfo<SocketAddr>>()`](Self::peer_ip_from) there.
    /// IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn peer_ip() -> Self {
        fn get(ext: &Extensions) -> Option<IpAddr> {
            ext.get::<SocketAddr>().map(SocketAddr::ip).or_else(|| ext.get::<IpAddr>().copied())
        }
        Self(Extract::Peer(get))
    }

    /// The peer's IP address, from an extension of type `T` that dereferences to a
    /// [`SocketAddr`]. With axum, serve the app with
    /// `into_make_service_with_connect_info::<SocketAddr>()` and use
    /// `KeyExtractor::peer_ip_from::<axum::extract::ConnectInfo<SocketAddr>>()`.
    pub fn peer_ip_from<T>() -> Self
    where
        T: Deref<Target = SocketAddr> + Send + Sync + 'static,
    {
        fn get<T: Deref<Target = SocketAddr> + Send + Sync + 'static>(ext: &Extensions) -> Option<IpAddr> {
            ext.get::<T>().map(|addr| addr.ip())
        }
        Self(Extract::Peer(get::<T>))
    }

    /// The value of a request header, such as an API key (the first value if it repeats).
    /// A value that is not visible ASCII counts as no key.
    pub fn header(name: HeaderName) -> Self {
        Self(Extract::Header(name))
    }

    /// A closure over the request's head (method, URI, headers, extensions); `None` means
    /// no key.
    ///
    /// ```
    /// # use crdt_rate_limiter::KeyExtractor;
    /// // One quota per tenant, from the first path segment: /{tenant}/...
    /// let by_tenant = KeyExtractor::from_fn(|parts| {
    ///     parts.uri.path().split('/').nth(1).filter(|s| !s.is_empty()).map(str::to_owned)
    /// });
    /// ```
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self(Extract::Fn(Arc::new(f)))
    }

    fn extract<'a>(&self, parts: &'a Parts) -> Option<Cow<'a, str>> {
        let key = match &self.0 {
            Extract::Peer(get) => Cow::Owned(get(&parts.extensions)?.to_canonical().to_string()),
            Extract::Header(name) => Cow::Borrowed(parts.headers.get(name)?.to_str().ok()?),
            Extract::Fn(f) => Cow::Owned(f(parts)?),
        };
        (!key.is_empty()).then_some(key)
    }
}

impl fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Extract::Peer(_) => f.write_str("KeyExtractor::PeerIp"),
            Extract::Header(name) => write!(f, "KeyExtractor::Header({name})"),
            Extract::Fn(_) => f.write_str("KeyExtractor::Fn"),
        }
    }
}

/// What to do with a request from which no key can be extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Fail open: pass the request through unlimited, uncounted and without rate-limit
    /// headers (for routes where anonymous traffic is acceptable).
    Skip,
    /// Fail closed: answer `400 Bad Request` (the request lacks what clients are told
    /// apart by; retrying it unchanged cannot succeed). The default.
    #[default]
    Deny,
}

/// What to do when the limiter cannot decide ([`RateLimiter::check`] returns an error).
///
/// The errors a layer can meet are [`Error::KeyTooLong`] (a key longer than
/// [`Builder::max_key_len`](crate::Builder::max_key_len)) and [`Error::KeyCapacity`]
/// (the limiter already tracks [`Builder::max_keys`](crate::Builder::max_keys) keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnError {
    /// Fail open: pass the request through, uncounted and without rate-limit headers.
    Allow,
    /// Fail closed: answer `400 Bad Request` for an invalid key (the client's doing) and
    /// `503 Service Unavailable` otherwise (the limiter's state, such as the key cap;
    /// admitting untracked clients would let a flood of new keys bypass the limit). The
    /// default.
    #[default]
    Deny,
}

/// What the layer did with a request. Inserted into the extensions of the request passed
/// on (when it is passed on) and of the response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitOutcome {
    /// The limiter's decision; `None` when no key was found or the limiter failed.
    pub decision: Option<Decision>,
    /// The limiter's error, when it could not decide.
    pub error: Option<Error>,
    /// Whether the layer refused the request (over the limit, or by the [`MissingKey`] or
    /// [`OnError`] policy) or, in shadow mode, would have refused it.
    pub denied: bool,
    /// Whether the layer is in shadow mode (then the request was passed on regardless).
    pub shadow: bool,
}

#[derive(Clone)]
struct Shared {
    limiter: RateLimiter,
    extractor: KeyExtractor,
    missing_key: MissingKey,
    on_error: OnError,
    shadow: bool,
    /// The policy name, serialized as a structured-field String (quoted, escaped).
    policy: String,
}

/// A tower [`Layer`] that rate-limits requests with a [`RateLimiter`].
///
/// `Clone`; clones (and the services they make) share one configuration and one limiter
/// behind an `Arc`, so the same limit applies across every route or server they wrap.
///
/// ```
/// use crdt_rate_limiter::middleware::MissingKey;
/// use crdt_rate_limiter::{KeyExtractor, RateLimitLayer, RateLimiter};
/// use http::HeaderName;
/// use std::time::Duration;
///
/// let limiter = RateLimiter::new(100, Duration::from_secs(60))?;
/// let layer = RateLimitLayer::new(limiter, KeyExtractor::header(HeaderName::from_static("x-api-key")))
///     .missing_key(MissingKey::Skip) // anonymous requests are not limited
///     .policy_name("per-api-key")?
///     .shadow(true); // count and report, but never deny (for a safe rollout)
/// // With axum: `Router::new().route(..).layer(layer)`.
/// # Ok::<(), crdt_rate_limiter::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer deciding with `limiter` on the key `extractor` finds, with the defaults:
    /// [`MissingKey::Deny`], [`OnError::Deny`], enforcing (not shadow), policy `"default"`.
    pub fn new(limiter: RateLimiter, extractor: KeyExtractor) -> Self {
        Self {
            shared: Arc::new(Shared {
                limiter,
                extractor,
                missing_key: MissingKey::default(),
                on_error: OnError::default(),
                shadow: false,
                policy: String::from("\"default\""),
            }),
        }
    }

    /// What to do when no key can be extracted. Default: [`MissingKey::Deny`].
    pub fn missing_key(mut self, policy: MissingKey) -> Self {
        Arc::make_mut(&mut self.shared).missing_key = policy;
        self
    }

    /// What to do when the limiter returns an error. Default: [`OnError::Deny`].
    pub fn on_error(mut self, policy: OnError) -> Self {
        Arc::make_mut(&mut self.shared).on_error = policy;
        self
    }

    /// Shadow mode: decide and count as when enforcing (a request that would be denied is
    /// not counted, as when enforcing, so the counts match what enforcement would see),
    /// add the same rate-limit headers, but pass every request on, including those the
    /// [`MissingKey`] and [`OnError`] policies would refuse. No `Retry-After` is sent.
    /// [`RateLimitOutcome::denied`] tells which requests would have been refused.
    /// Default: off.
    pub fn shadow(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.shared).shadow = on;
        self
    }

    /// The policy name in the `RateLimit-Policy` and `RateLimit` fields. Default `default`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] unless it is 1 to [`MAX_POLICY_NAME_LEN`] printable ASCII
    /// characters (space to `~`); `"` and `\` are allowed and escaped.
    pub fn policy_name(mut self, name: &str) -> Result<Self, ConfigError> {
        if name.is_empty() || name.len() > MAX_POLICY_NAME_LEN || !name.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(ConfigError::Invalid { field: "policy_name", reason: "must be 1 to 64 printable ASCII characters" });
        }
        let mut quoted = String::with_capacity(name.len() + 2);
        quoted.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        Arc::make_mut(&mut self.shared).policy = quoted;
        Ok(self)
    }

    /// The limiter this layer decides with.
    pub fn limiter(&self) -> &RateLimiter {
        &self.shared.limiter
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.shared;
        f.debug_struct("RateLimitLayer")
            .field("limiter", &s.limiter)
            .field("extractor", &s.extractor)
            .field("missing_key", &s.missing_key)
            .field("on_error", &s.on_error)
            .field("shadow", &s.shadow)
            .field("policy", &s.policy)
            .finish()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService { inner, shared: self.shared.clone() }
    }
}

/// The service made by [`RateLimitLayer`]; see there and the [module docs](self).
///
/// The inner service's response body must implement `Default`: a refusal's body is
/// `B::default()` (empty for axum's `Body`, `String`, `Full`, `Empty`).
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for RateLimitService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .field("layer", &RateLimitLayer { shared: self.shared.clone() })
            .finish()
    }
}

/// The `RateLimit-Policy` and `RateLimit` values of one decision.
struct Headers {
    policy: HeaderValue,
    state: HeaderValue,
}

impl Shared {
    /// The header values for `d`; `t` is the seconds value `RateLimit` reports.
    fn headers(&self, d: &Decision, t: u64) -> Option<Headers> {
        // Both from the quota that decided: a client's override names its own window.
        let w = ceil_secs(d.quota.window()).max(1);
        let policy = HeaderValue::try_from(format!("{};q={};w={}", self.policy, d.quota.limit(), w)).ok()?;
        let state = HeaderValue::try_from(format!("{};r={};t={}", self.policy, d.remaining, t)).ok()?;
        Some(Headers { policy, state })
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

fn refusal<B: Default>(status: StatusCode) -> Response<B> {
    let mut res = Response::new(B::default());
    *res.status_mut() = status;
    res
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let (mut parts, body) = req.into_parts();
        let checked = shared.extractor.extract(&parts).map(|key| shared.limiter.check_now(&key));

        let mut outcome = RateLimitOutcome { decision: None, error: None, denied: false, shadow: shared.shadow };
        let mut headers = None;
        let mut retry_after_secs = None;
        let refusal_status = match checked {
            None => {
                outcome.denied = shared.missing_key == MissingKey::Deny;
                StatusCode::BAD_REQUEST
            }
            Some(Err(e)) => {
                outcome.denied = shared.on_error == OnError::Deny;
                let status = match e {
                    Error::EmptyKey | Error::KeyTooLong { .. } => StatusCode::BAD_REQUEST,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                outcome.error = Some(e);
                status
            }
            Some(Ok(d)) => {
                outcome.decision = Some(d);
                outcome.denied = !d.allowed;
                let t = if d.allowed {
                    ceil_secs(d.reset_after)
                } else {
                    // `t` and `Retry-After` agree: rounded up, at least 1 s, never early.
                    let secs = ceil_secs(d.retry_after.unwrap_or(d.reset_after)).max(1);
                    retry_after_secs = Some(secs);
                    secs
                };
                headers = shared.headers(&d, t);
                StatusCode::TOO_MANY_REQUESTS
            }
        };

        if outcome.denied && !outcome.shadow {
            let mut res = refusal(refusal_status);
            if let Some(secs) = retry_after_secs {
                res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            finish(&mut res, headers, outcome);
            return ResponseFuture { state: State::Ready { response: Some(res) } };
        }
        parts.extensions.insert(outcome.clone());
        let future = self.inner.call(Request::from_parts(parts, body));
        ResponseFuture { state: State::Inner { future, extra: Some((headers, outcome)) } }
    }
}

/// Adds the rate-limit headers (replacing the inner service's) and the outcome.
fn finish<B>(res: &mut Response<B>, headers: Option<Headers>, outcome: RateLimitOutcome) {
    if let Some(h) = headers {
        res.headers_mut().insert(RATELIMIT_POLICY, h.policy);
        res.headers_mut().insert(RATELIMIT, h.state);
    }
    res.extensions_mut().insert(outcome);
}

pin_project_lite::pin_project! {
    /// The response future of [`RateLimitService`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        /// Waiting for the inner service; then add the headers and the outcome.
        Inner {
            #[pin]
            future: F,
            extra: Option<(Option<Headers>, RateLimitOutcome)>,
        },
        /// Refused by the layer.
        Ready {
            response: Option<Response<B>>,
        },
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future, extra } => {
                let mut res = match future.poll(cx) {
                    Poll::Ready(Ok(res)) => res,
                    other => return other,
                };
                if let Some((headers, outcome)) = extra.take() {
                    finish(&mut res, headers, outcome);
                }
                Poll::Ready(Ok(res))
            }
            // Polled again after completion: an empty response rather than a panic.
            StateProj::Ready { response } => Poll::Ready(Ok(response.take().unwrap_or_default())),
        }
    }
}
