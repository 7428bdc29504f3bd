//! The QUIC cluster on real sockets (127.0.0.1, port 0): admissions within the bound,
//! refusal of foreign certificates, crash and restart, partitions healing, leaves,
//! simultaneous dials. Every test is bounded by `tokio::time::timeout`.
#![cfg(feature = "quic")]

mod common;
use common::Ca;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::StateEntry;
use crdt_rate_limiter::transport::faults::FaultHooks as _;
use crdt_rate_limiter::transport::RefusalReason;
use crdt_rate_limiter::transport::{certs, node_id, tls, Cluster, ClusterConfig, ClusterError, TlsIdentity, TlsSource};
use crdt_rate_limiter::{Quota, RateLimiter, Strategy};

const SECRET: [u8; 16] = *b"cluster-test-key";

// ----- harness -----

/// Every log line at INFO or above, from every test of this binary.
fn logs() -> &'static Mutex<Vec<String>> {
    static LOGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let logs = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    static INSTALL: OnceLock<()> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let _ = tracing::subscriber::set_global_default(Capture);
    });
    logs
}

/// Whether a captured log line satisfies `pred`.
fn logged(pred: impl Fn(&str) -> bool) -> bool {
    logs().lock().unwrap().iter().any(|l| pred(l))
}

/// A minimal `tracing` subscriber that keeps events as text.
struct Capture;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        let max = if std::env::var_os("CLUSTER_TEST_DEBUG").is_some() { tracing::Level::DEBUG } else { tracing::Level::INFO };
        *m.level() <= max && m.target().starts_with("crdt_rate_limiter")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(format!("{} ", e.metadata().level()));
        e.record(&mut f);
        if std::env::var_os("CLUSTER_TEST_LOG").is_some() {
            eprintln!("{} {}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 100_000, f.0);
        }
        logs().lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn limiter(limit: u64, window: Duration) -> RateLimiter {
    RateLimiter::builder().quota(Quota::new(limit, window).unwrap()).strategy(Strategy::FixedWindow).hash_secret(SECRET).build().unwrap()
}

/// Test timings: quick reconnection, short idle timeout.
fn config(id: TlsIdentity, seeds: &[&Cluster]) -> ClusterConfig {
    ClusterConfig {
        seeds: seeds.iter().map(|c| c.local_addr()).collect(),
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_millis(1500),
        keep_alive: Duration::from_millis(250),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(400),
        join_timeout: Duration::from_secs(2),
        ..ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap())
    }
}

async fn start(ca: &Ca, name: &str, limiter: RateLimiter, seeds: &[&Cluster]) -> Cluster {
    logs();
    Cluster::start(limiter, config(ca.identity(name), seeds)).await.unwrap()
}

/// Waits until `cond` holds, polling; panics with `what` after `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts a request for `marker` on `from` and waits until every node in `to` holds
/// that count: gossip has made at least one round on each link since the call. Checks
/// that something does *not* happen wait for this instead of a fixed time.
async fn a_round_later(from: &Cluster, to: &[&Cluster], marker: &str) {
    from.limiter().allow(marker, from.limiter().now_ms());
    let (key, replica) = (from.limiter().key_hash(marker), from.replica());
    eventually("a gossip round", Duration::from_secs(10), || {
        to.iter().all(|n| n.state().iter().any(|e| e.key == key && e.replica == replica))
    })
    .await;
}

/// Starts node-a, node-b and node-c from one limiter each (made by `make`), each seeded
/// with the ones before, and waits for the full mesh.
async fn three(ca: &Ca, make: impl Fn() -> RateLimiter) -> (Cluster, Cluster, Cluster) {
    let a = start(ca, "node-a", make(), &[]).await;
    let b = start(ca, "node-b", make(), &[&a]).await;
    let c = start(ca, "node-c", make(), &[&a, &b]).await;
    full_mesh(&[&a, &b, &c]).await;
    (a, b, c)
}

async fn full_mesh(nodes: &[&Cluster]) {
    let n = nodes.len();
    eventually("a full mesh", Duration::from_secs(10), || nodes.iter().all(|c| c.live_peers().len() == n - 1)).await;
}

async fn bounded<F: std::future::Future>(limit_s: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(limit_s), f).await.expect("test timed out")
}

/// Offered and admitted requests per (client, window), across every node.
#[derive(Default)]
struct Ledger(Mutex<HashMap<(usize, i64), (u64, u64)>>);

impl Ledger {
    /// What a perfect global limiter would have admitted so far: per (client, window),
    /// the offered requests up to `limit`.
    fn ideal(&self, limit: u64) -> u64 {
        self.snapshot().values().map(|&(offered, _)| offered.min(limit)).sum()
    }

    fn record(&self, client: usize, window: i64, admitted: bool) {
        let mut m = self.0.lock().unwrap();
        let e = m.entry((client, window)).or_default();
        e.0 += 1;
        e.1 += u64::from(admitted);
    }

    fn snapshot(&self) -> HashMap<(usize, i64), (u64, u64)> {
        self.0.lock().unwrap().clone()
    }
}

/// Sends `per_client_rate` requests per second for each of `clients` clients to
/// `limiter`, evenly over time, until `stop`; records them in `ledger`.
fn drive(
    limiter: RateLimiter,
    clients: usize,
    per_client_rate: f64,
    ledger: Arc<Ledger>,
    admitted_by: Arc<Mutex<u64>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let window_ms = limiter.quota().window_ms() as i64;
        let start = tokio::time::Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * per_client_rate) as u64;
            while sent < due {
                for c in 0..clients {
                    let now = limiter.now_ms();
                    let ok = limiter.allow(&format!("client-{c}"), now);
                    ledger.record(c, now.div_euclid(window_ms), ok);
                    if ok {
                        *admitted_by.lock().unwrap() += 1;
                    }
                }
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

struct Load {
    stops: Vec<Arc<AtomicBool>>,
    tasks: Vec<Option<tokio::task::JoinHandle<()>>>,
    admitted: Vec<Arc<Mutex<u64>>>,
}

impl Load {
    fn start(limiters: &[RateLimiter], clients: usize, per_client_rate: f64, ledger: &Arc<Ledger>) -> Self {
        let stops: Vec<Arc<AtomicBool>> = limiters.iter().map(|_| Arc::new(AtomicBool::new(false))).collect();
        let admitted: Vec<Arc<Mutex<u64>>> = limiters.iter().map(|_| Arc::new(Mutex::new(0))).collect();
        let tasks = limiters
            .iter()
            .zip(&admitted)
            .zip(&stops)
            .map(|((l, a), s)| {
                Some(drive(l.clone(), clients, per_client_rate / limiters.len() as f64, ledger.clone(), a.clone(), s.clone()))
            })
            .collect();
        Load { stops, tasks, admitted }
    }

    fn admitted(&self, i: usize) -> u64 {
        *self.admitted[i].lock().unwrap()
    }

    /// Stops the requests to node `i` only.
    async fn stop_node(&mut self, i: usize) {
        self.stops[i].store(true, Ordering::Relaxed);
        if let Some(t) = self.tasks[i].take() {
            let _ = t.await;
        }
    }

    async fn stop(mut self) {
        for i in 0..self.tasks.len() {
            self.stop_node(i).await;
        }
    }
}

/// The counts of one replica, by (key, window).
fn counts_of(state: &[StateEntry], replica: ReplicaId) -> BTreeMap<(u64, i64), u64> {
    state.iter().filter(|e| e.replica == replica).map(|e| ((e.key, e.window), e.count)).collect()
}

/// Sleeps into a window of `window_ms` with at least `need_ms` left in it.
async fn align(window_ms: i64, need_ms: i64) {
    let now = crdt_rate_limiter::SystemClock.now_ms();
    let left = window_ms - now.rem_euclid(window_ms);
    if left < need_ms {
        tokio::time::sleep(Duration::from_millis(left as u64 + 50)).await;
    }
}

use crdt_rate_limiter::Clock as _;

// ----- tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_load_stay_within_the_bound() {
    bounded(60, async {
        let ca = Ca::new();
        let (limit, window) = (50u64, Duration::from_secs(1));
        let (a, b, c) = three(&ca, || limiter(limit, window)).await;
        let ledger = Arc::new(Ledger::default());
        // 12 clients, each offered 80 requests per second spread over the three nodes,
        // against 50 per one-second window.
        let load = Load::start(&[a.limiter().clone(), b.limiter().clone(), c.limiter().clone()], 12, 80.0, &ledger);
        // About four windows of load: 12 clients x 50 per window is 600 a window.
        eventually("four windows of load", Duration::from_secs(30), || ledger.ideal(limit) >= 2_000).await;
        load.stop().await;

        let (mut ideal, mut admitted, mut over) = (0u64, 0u64, 0u64);
        for (&(client, window), &(offered, adm)) in &ledger.snapshot() {
            assert!(adm <= 3 * limit, "client {client} window {window}: {adm} admitted, above N x limit");
            ideal += offered.min(limit);
            admitted += adm;
            over += adm.saturating_sub(limit);
        }
        let ratio = over as f64 / ideal as f64;
        eprintln!("ideal {ideal}, admitted {admitted}, over-admitted {over} ({:.2}%)", 100.0 * ratio);
        assert!(ideal > 1000, "too little load: {ideal}");
        assert!(ratio <= 0.10, "over-admission {over} is {:.1}% of the ideal {ideal}", 100.0 * ratio);
        assert!(admitted as f64 >= 0.8 * ideal as f64, "under-admission: {admitted} of {ideal}");

        let s = a.stats();
        assert!(s.datagrams_sent > 0 && s.datagrams_received > 0, "{s:?}");
        assert_eq!(s.protocol_errors + s.handshake_failures + s.oversized_to_stream + s.frames_dropped_queue_full, 0, "{s:?}");
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_a_certificate_from_another_ca_is_refused_and_never_merged() {
    bounded(30, async {
        logs();
        let ca = Ca::new();
        let rogue_ca = Ca::new();
        let (limit, window) = (1000u64, Duration::from_secs(60));
        let a = start(&ca, "node-a", limiter(limit, window), &[]).await;
        let b = start(&ca, "node-b", limiter(limit, window), &[&a]).await;
        full_mesh(&[&a, &b]).await;

        // A certificate for a plausible name, signed by another CA. It trusts our CA, so
        // it accepts our servers; our servers must refuse it.
        let (cert, key) = certs::issue(&rogue_ca.pem, &rogue_ca.key, "node-c").unwrap();
        let rogue_id = TlsIdentity::from_pem(ca.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
        let rogue_limiter = limiter(limit, window);
        for _ in 0..100 {
            rogue_limiter.allow("victim", rogue_limiter.now_ms());
        }
        // It returns at once (no join wait), so it stays up for our node to dial.
        let rogue = Cluster::start(rogue_limiter.clone(), ClusterConfig { join_timeout: Duration::ZERO, ..config(rogue_id, &[&a, &b]) })
            .await
            .unwrap();
        // And our node dials it: the rogue's server certificate must be refused too.
        a.add_seed(rogue.local_addr());
        // A node of a whole other cluster, dialing us: its only seed refuses its
        // certificate, so it does not start, and says why.
        let foreign = Cluster::start(
            limiter(limit, window),
            ClusterConfig { join_timeout: Duration::from_secs(2), ..config(rogue_ca.identity("node-x"), &[&a]) },
        )
        .await;
        match foreign {
            Err(ClusterError::SeedsRefused(list)) => {
                assert_eq!(list.len(), 1, "{list:?}");
                assert_eq!((list[0].addr, list[0].reason), (a.local_addr(), RefusalReason::Certificate), "{list:?}");
            }
            other => panic!("a node no seed accepts must not start: {other:?}"),
        }

        eventually("the refusals", Duration::from_secs(10), || {
            a.stats().handshake_failures >= 1
                && a.stats().dial_failures >= 1
                && b.stats().handshake_failures >= 1
                && a.stats().refused_certificate >= 1
                && b.stats().refused_certificate >= 1
                && a.refusals().iter().any(|r| r.addr == rogue.local_addr())
        })
        .await;
        // Gossip went on between the members meanwhile, and merged nothing foreign.
        a_round_later(&a, &[&b], "marker-a").await;
        a_round_later(&b, &[&a], "marker-b").await;

        let victim = a.limiter().key_hash("victim");
        let rogue_node = node_id("node-c");
        for n in [&a, &b] {
            let state = n.state();
            assert!(
                state.iter().all(|e| e.key != victim && e.replica.node != rogue_node && e.replica.node != node_id("node-x")),
                "{} merged foreign counts",
                n.node_name()
            );
            assert!(n.members().iter().all(|m| m.id != rogue_node && m.id != node_id("node-x")), "{:?}", n.members());
            assert_eq!(n.live_peers().len(), 1);
        }
        assert!(rogue.live_peers().is_empty());
        // Our node dialed the rogue (a seed added at run time) and refused its certificate.
        assert!(a.stats().refused_certificate >= 1 && b.stats().refused_certificate >= 1);
        let refused = a.refusals();
        assert!(refused.iter().any(|r| r.addr == rogue.local_addr() && r.seed && r.reason == RefusalReason::Certificate), "{refused:?}");
        let logs = logs().lock().unwrap().clone();
        assert!(
            logs.iter()
                .any(|l| l.starts_with("WARN") && l.contains("refused connection: TLS handshake failed") && l.contains("certificate")),
            "no refusal logged:\n{}",
            logs.join("\n")
        );
        rogue.abort();
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_keeps_its_counts_and_restarts_without_a_second_quota() {
    bounded(50, async {
        let ca = Ca::new();
        let (limit, window) = (300u64, Duration::from_secs(60));
        align(60_000, 10_000).await;
        let (a, b, c) = three(&ca, || limiter(limit, window)).await;
        let old_c = c.replica();
        let ledger = Arc::new(Ledger::default());
        let clients = 5;

        // 60 requests per second per client over three nodes: about 120 of 300 in 2 s.
        let mut load = Load::start(&[a.limiter().clone(), b.limiter().clone(), c.limiter().clone()], clients, 60.0, &ledger);
        eventually("two seconds' worth of load on every node", Duration::from_secs(15), || {
            (0..3).all(|i| load.admitted(i) >= 40 * clients as u64)
        })
        .await;
        // A crash: it decides nothing more, and not even a connection close leaves it.
        load.stop_node(2).await;
        c.abort();
        let c_admitted = load.admitted(2);
        let before = (load.admitted(0), load.admitted(1));
        eventually("the survivors to suspect the dead node", Duration::from_secs(5), || {
            a.live_peers().len() == 1 && b.live_peers().len() == 1
        })
        .await;
        // The survivors keep deciding, and keep the dead node's counts.
        eventually("the survivors to keep admitting and agree on the dead node's counts", Duration::from_secs(10), || {
            load.admitted(0) > before.0 && load.admitted(1) > before.1 && counts_of(&a.state(), old_c) == counts_of(&b.state(), old_c)
        })
        .await;
        assert!(load.admitted(0) > before.0 && load.admitted(1) > before.1, "survivors stopped admitting");
        let held = counts_of(&a.state(), old_c);
        assert_eq!(held, counts_of(&b.state(), old_c), "survivors disagree on the dead node's counts");
        let held_total: u64 = held.values().sum();
        // What it admitted but never told anyone (its last round): the catch-up bound.
        let lost = c_admitted.saturating_sub(held_total);
        eprintln!("dead node admitted {c_admitted}, survivors hold {held_total}, lost {lost}");
        assert!(held_total > 0 && lost <= 2 * clients as u64, "admitted {c_admitted}, held {held_total}");
        load.stop().await;

        // Restart: a fresh process state, same name, new incarnation.
        let c = start(&ca, "node-c", limiter(limit, window), &[&a, &b]).await;
        assert_eq!(c.replica().node, old_c.node);
        assert!(c.replica().incarnation > old_c.incarnation);
        // By the time start returns it has the cluster's counts: no regression.
        let caught_up = counts_of(&c.state(), old_c);
        for (k, v) in &held {
            assert!(caught_up.get(k).is_some_and(|c| c >= v), "restarted node lacks {k:?}: {:?} < {v}", caught_up.get(k));
        }
        full_mesh(&[&a, &b, &c]).await;

        // Now exhaust the quota: 600 requests per second per client for 2 s.
        let load = Load::start(&[a.limiter().clone(), b.limiter().clone(), c.limiter().clone()], clients, 600.0, &ledger);
        eventually("every client's quota spent, and offered well past it", Duration::from_secs(20), || {
            let seen = ledger.snapshot();
            seen.len() >= clients && seen.values().all(|&(offered, admitted)| admitted >= limit && offered > 2 * limit)
        })
        .await;
        load.stop().await;
        let slack = limit / 10;
        let worst = ledger.snapshot().values().map(|v| v.1).max().unwrap_or(0);
        eprintln!("after the restart: busiest client admitted {worst} of {limit} in the window");
        for ((client, w), (offered, admitted)) in ledger.snapshot() {
            assert!(offered > limit, "client {client}: only {offered} offered");
            assert!(admitted <= limit + lost + slack, "client {client} window {w}: {admitted} admitted, limit {limit}, lost {lost}");
        }
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

/// Two members that learned of each other through a third, cut off from each other
/// longer than `forget_after`, forget each other; the third stays connected to both and
/// never reconnects, so only membership anti-entropy can introduce them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_forgot_each_other_meet_again_through_the_member_exchange() {
    bounded(40, async {
        logs();
        let ca = Ca::new();
        let (limit, window) = (1000u64, Duration::from_secs(60));
        let cfg = |name: &str, seeds: &[&Cluster]| ClusterConfig {
            forget_after: Duration::from_millis(800),
            member_exchange: Duration::from_millis(300),
            ..config(ca.identity(name), seeds)
        };
        // Names no other test of this binary uses: the check reads the shared log.
        let a = Cluster::start(limiter(limit, window), cfg("forget-a", &[])).await.unwrap();
        let b = Cluster::start(limiter(limit, window), cfg("forget-b", &[&a])).await.unwrap();
        let c = Cluster::start(limiter(limit, window), cfg("forget-c", &[&a])).await.unwrap();
        full_mesh(&[&a, &b, &c]).await;
        assert!(b.block_peer(c.node_id()) && c.block_peer(b.node_id()));
        // While they are cut off the exchange keeps reintroducing them, and each forgets
        // the other again: wait until each has forgotten the other once.
        let forgot = |name: &str| {
            let peer = format!("peer={name} ");
            logged(|l| l.contains("forgot a member") && l.contains(&peer))
        };
        eventually("b and c to forget each other", Duration::from_secs(15), || forgot("forget-b") && forgot("forget-c")).await;
        assert_eq!(a.live_peers().len(), 2, "a stays connected to both");
        b.heal();
        c.heal();
        full_mesh(&[&a, &b, &c]).await;
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal_converges_every_replica() {
    bounded(45, async {
        let ca = Ca::new();
        let (limit, window) = (100_000u64, Duration::from_secs(60));
        let (a, b, c) = three(&ca, || limiter(limit, window)).await;
        let ledger = Arc::new(Ledger::default());
        let load = Load::start(&[a.limiter().clone(), b.limiter().clone(), c.limiter().clone()], 20, 90.0, &ledger);
        eventually("load on every node", Duration::from_secs(10), || (0..3).all(|i| load.admitted(i) > 0)).await;

        // Cut C off from A and B, longer than the idle timeout: connections die.
        assert!(c.block_peer(a.node_id()) && c.block_peer(b.node_id()));
        eventually("both sides to see the partition", Duration::from_secs(5), || {
            a.live_peers() == vec![b.node_id()] && c.live_peers().is_empty()
        })
        .await;
        eventually("the connections to C to die and the sides to diverge", Duration::from_secs(15), || {
            a.members().iter().chain(&b.members()).all(|m| m.id != c.node_id() || !m.connected)
                && c.members().iter().all(|m| !m.connected)
                && c.stats().packets_dropped_by_faults > 0
                && a.state() != c.state()
        })
        .await;
        assert!(c.stats().packets_dropped_by_faults > 0);
        assert_ne!(a.state(), c.state());

        c.heal();
        load.stop().await;
        full_mesh(&[&a, &b, &c]).await;
        eventually("every replica to converge", Duration::from_secs(15), || {
            let (sa, sb, sc) = (a.state(), b.state(), c.state());
            !sa.is_empty() && sa == sb && sb == sc
        })
        .await;
        // Every replica's counts are all there: the sum is what was admitted.
        let admitted: u64 = ledger.snapshot().values().map(|v| v.1).sum();
        let held: u64 = a.state().iter().map(|e| e.count).sum();
        assert_eq!(held, admitted);
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_removes_the_peer_at_once_and_keeps_its_counts() {
    bounded(20, async {
        let ca = Ca::new();
        let (limit, window) = (1000u64, Duration::from_secs(60));
        let a = start(&ca, "node-a", limiter(limit, window), &[]).await;
        let b = start(&ca, "node-b", limiter(limit, window), &[&a]).await;
        full_mesh(&[&a, &b]).await;
        for _ in 0..7 {
            assert!(b.limiter().allow("client-1", b.limiter().now_ms()));
        }
        let b_replica = b.replica();
        // Counted just before leaving: the last round carries it.
        b.shutdown().await;
        eventually("the leave", Duration::from_secs(3), || a.live_peers().is_empty() && a.members().iter().all(|m| m.left)).await;
        let held: u64 = counts_of(&a.state(), b_replica).values().sum();
        assert_eq!(held, 7);
        a.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_dial_each_other_at_once_keep_one_connection() {
    bounded(20, async {
        let ca = Ca::new();
        let (limit, window) = (1000u64, Duration::from_secs(60));
        let cfg = |name: &str| ClusterConfig { join_timeout: Duration::ZERO, ..config(ca.identity(name), &[]) };
        // Bind both first, then point each at the other: both dial at once.
        let a = Cluster::start(limiter(limit, window), cfg("node-a")).await.unwrap();
        let b = Cluster::start(limiter(limit, window), cfg("node-b")).await.unwrap();
        a.add_seed(b.local_addr());
        b.add_seed(a.local_addr());
        full_mesh(&[&a, &b]).await;
        // One connection each, held for 600 ms: on a loaded machine one of the two dials
        // can complete well after the other, and a single look could fall before it.
        let mut held = 0;
        eventually("one connection each, held for 600 ms", Duration::from_secs(8), || {
            let one = a.stats().connections == 1 && b.stats().connections == 1 && a.stats().dials >= 1 && b.stats().dials >= 1;
            held = if one { held + 1 } else { 0 };
            held >= 30
        })
        .await;
        // Still one after gossip has gone both ways over it.
        a_round_later(&a, &[&b], "marker-a").await;
        a_round_later(&b, &[&a], "marker-b").await;
        assert_eq!((a.stats().connections, b.stats().connections), (1, 1));
        assert!(a.members()[0].connected && b.members()[0].connected);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_with_another_hash_secret_is_refused_and_pem_files_load() {
    bounded(20, async {
        logs();
        let ca = Ca::new();
        let (limit, window) = (1000u64, Duration::from_secs(60));
        // node-a's identity from PEM files, through ClusterConfig's paths.
        let dir = std::env::temp_dir().join(format!("crl-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = certs::issue(&ca.pem, &ca.key, "node-a").unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.join("node-a.pem"), cert).unwrap();
        std::fs::write(dir.join("node-a.key"), key).unwrap();
        let files = TlsSource::files(dir.join("ca.pem"), dir.join("node-a.pem"), dir.join("node-a.key"));
        let (_, a) = RateLimiter::builder()
            .quota(Quota::new(limit, window).unwrap())
            .hash_secret(SECRET)
            .cluster(ClusterConfig { tls: files, ..config(ca.identity("unused"), &[]) })
            .start()
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(a.node_name(), "node-a");

        let other = RateLimiter::builder().quota(Quota::new(limit, window).unwrap()).hash_secret(*b"another secret!!").build().unwrap();
        other.allow("client-1", other.now_ms());
        // node-b's only seed hashes with another secret: it does not start, and says so,
        // long before the join timeout.
        let started = tokio::time::Instant::now();
        let b =
            Cluster::start(other, ClusterConfig { join_timeout: Duration::from_secs(10), ..config(ca.identity("node-b"), &[&a]) }).await;
        match b {
            Err(ClusterError::SeedsRefused(list)) => {
                assert_eq!(list.len(), 1, "{list:?}");
                let r = &list[0];
                assert_eq!(
                    (r.addr, r.peer.as_deref(), r.seed, r.reason),
                    (a.local_addr(), Some("node-a"), true, RefusalReason::HashSecret)
                );
                let message = ClusterError::SeedsRefused(list.clone()).to_string();
                assert!(message.contains("node-a") && message.contains("another hash secret"), "{message}");
            }
            other => panic!("a member with another secret must not start: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "start waited for the whole join timeout");
        // node-a saw it too: counted, listed (what a health check reports), logged.
        eventually("node-a's refusal", Duration::from_secs(5), || a.stats().refused_hash_secret >= 1).await;
        let refused = a.refusals();
        assert!(refused.iter().any(|r| r.peer.as_deref() == Some("node-b") && r.reason == RefusalReason::HashSecret), "{refused:?}");
        assert!(a.live_peers().is_empty() && a.state().is_empty());
        assert!(logged(|l| l.starts_with("ERROR") && l.contains("another secret")));
        a.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_an_authenticated_peer_is_dropped_without_harm() {
    bounded(20, async {
        let ca = Ca::new();
        let (limit, window) = (1000u64, Duration::from_secs(60));
        let a = start(&ca, "node-a", limiter(limit, window), &[]).await;
        let b = start(&ca, "node-b", limiter(limit, window), &[&a]).await;
        full_mesh(&[&a, &b]).await;

        // A raw QUIC client with a valid cluster certificate.
        let id = ca.identity("node-z");
        let transport = Arc::new(tls::default_transport_config());
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(tls::member_client_config(&id, transport).unwrap());
        let dial = || async { ep.connect(a.local_addr(), "node-a").unwrap().await.unwrap() };

        // 1. A datagram before the first frame, then a frame header claiming 4 GiB.
        let conn = dial().await;
        conn.send_datagram(vec![0xAB; 300].into()).unwrap();
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&[1, 0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
        assert!(
            matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(4)),
            "{reason}"
        );

        // 2. A valid first frame, then garbage as gossip, on the stream and as datagrams.
        let conn = dial().await;
        let mut hello = vec![1u8, 1];
        hello.extend_from_slice(&42u64.to_le_bytes()); // incarnation
        hello.extend_from_slice(&1u64.to_le_bytes()); // dial sequence
        hello.extend_from_slice(&a.limiter().key_hash("crdt-rate-limiter/hash-secret-probe").to_le_bytes());
        hello.extend_from_slice(&[4, 127, 0, 0, 1, 9, 0]); // 127.0.0.1:9
        let len = (hello.len() - 1) as u32;
        hello.splice(1..1, len.to_le_bytes());
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&hello).await.unwrap();
        eventually("node-z's first frame", Duration::from_secs(5), || a.members().iter().any(|m| m.name == "node-z" && m.connected)).await;
        let errors = a.stats().gossip.decode_errors;
        let mut frame = vec![2u8];
        frame.extend_from_slice(&100u32.to_le_bytes());
        frame.extend_from_slice(&[0x5A; 100]);
        s.write_all(&frame).await.unwrap();
        for n in [0usize, 1, 7, 500] {
            conn.send_datagram(vec![0xC3; n].into()).unwrap();
        }
        eventually("the garbage to be counted", Duration::from_secs(5), || a.stats().gossip.decode_errors >= errors + 2).await;
        assert!(a.state().iter().all(|e| e.replica.node != node_id("node-z")));

        // The node still works: it still gossips with node-b.
        assert!(b.limiter().allow("client-1", b.limiter().now_ms()));
        eventually("node-b's count", Duration::from_secs(5), || a.state().iter().any(|e| e.replica == b.replica())).await;
        conn.close(0u32.into(), b"bye");
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limits_change_on_one_node_takes_effect_on_all_three() {
    use crdt_rate_limiter::LimitsConfig;
    bounded(30, async {
        let ca = Ca::new();
        let (a, b, c) = three(&ca, || limiter(5, Duration::from_secs(1))).await;
        let cfg = LimitsConfig::from_toml(
            "[default]\nlimit = 40\nwindow_ms = 1000\n[tiers.gold]\nlimit = 400\nwindow_ms = 1000\n[clients]\n\"acme\" = { tier = \"gold\" }\n",
        )
        .unwrap();
        let version = b.limiter().apply_limits(cfg.clone()).unwrap();
        eventually("every node to put the new limits in force", Duration::from_secs(5), || {
            [&a, &b, &c].iter().all(|n| n.limiter().limits() == (version, Some(cfg.clone())))
        })
        .await;
        for node in [&a, &b, &c] {
            let now = node.limiter().now_ms();
            assert_eq!(node.limiter().check("someone", now).unwrap().limit, 40);
            assert_eq!(node.limiter().check("acme", now).unwrap().limit, 400);
        }
        // An invalid change is refused where it is made and reaches no one.
        let mut bad = cfg.clone();
        bad.default.window_ms = 0;
        assert!(c.limiter().apply_limits(bad).is_err());
        a_round_later(&c, &[&a, &b], "marker-c").await;
        assert!([&a, &b, &c].iter().all(|n| n.limiter().limits().0 == version));
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_without_a_hash_secret_cannot_join_a_cluster() {
    bounded(10, async {
        let ca = Ca::new();
        let no_secret = RateLimiter::builder().quota(Quota::new(10, Duration::from_secs(1)).unwrap()).build().unwrap();
        let err = Cluster::start(no_secret, config(ca.identity("node-a"), &[])).await.unwrap_err();
        assert!(matches!(err, ClusterError::MissingHashSecret), "{err:?}");
        assert!(err.to_string().contains("hash_secret"), "{err}");
        // Through the builder too.
        let err = RateLimiter::builder()
            .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
            .cluster(config(ca.identity("node-a"), &[]))
            .start()
            .await
            .unwrap_err();
        assert!(matches!(err, ClusterError::MissingHashSecret), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_seed_is_named_in_a_warning_and_does_not_fail_the_start() {
    bounded(20, async {
        logs();
        let ca = Ca::new();
        // A bound UDP port nobody answers on.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let cfg = ClusterConfig { seeds: vec![addr], join_timeout: Duration::from_millis(300), ..config(ca.identity("node-a"), &[]) };
        let a = Cluster::start(limiter(10, Duration::from_secs(1)), cfg).await.unwrap();
        let seed = addr.to_string();
        assert!(
            logged(|l| l.starts_with("WARN") && l.contains("no full sync from seed") && l.contains(&seed)),
            "the unreachable seed {seed} was not named"
        );
        assert!(a.refusals().is_empty(), "silence is not a refusal");
        // A shared handle can shut down, more than once.
        let a = Arc::new(a);
        let again = a.clone();
        a.shutdown().await;
        again.shutdown().await;
    })
    .await;
}

/// A node joins through a `host:port` name resolved by the system resolver (as a headless
/// service's name is), and names that are not `host:port` are refused as configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_a_seed_name_and_bad_names_are_refused() {
    bounded(30, async {
        let ca = Ca::new();
        let a = start(&ca, "node-a", limiter(10, Duration::from_secs(1)), &[]).await;
        let name = format!("localhost:{}", a.local_addr().port());
        let cfg = ClusterConfig { seed_names: vec![name], seed_refresh: Duration::from_millis(200), ..config(ca.identity("node-b"), &[]) };
        let b = Cluster::start(limiter(10, Duration::from_secs(1)), cfg).await.unwrap();
        full_mesh(&[&a, &b]).await;
        assert!(b.members().iter().any(|m| m.id == a.node_id() && m.seed), "{:?}", b.members());
        for bad in ["no-port", "localhost:99999", ":7000"] {
            let cfg = ClusterConfig { seed_names: vec![bad.to_string()], ..config(ca.identity("node-c"), &[]) };
            let e = Cluster::start(limiter(10, Duration::from_secs(1)), cfg).await.err();
            assert!(matches!(e, Some(ClusterError::Config { field: "seed_names", .. })), "{bad}: {e:?}");
        }
        for n in [a, b] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A node given more seeds than its dial budget allows in a second (as a headless
/// service's name resolves to every pod) dials each of them at once and joins: every seed
/// sends its full sync long before the budget could have paid for the dials (one a
/// second: the sixth would start five seconds in). Retries pay (the next test), and so
/// do members learned from lists (`transport::driver::tests`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_more_seeds_than_its_dial_budget_joins_through_all_of_them_at_once() {
    bounded(60, async {
        logs();
        let ca = Ca::new();
        let first = start(&ca, "seed-0", limiter(10, Duration::from_secs(1)), &[]).await;
        let mut seeds = vec![first];
        for i in 1..6 {
            let node = start(&ca, &format!("seed-{i}"), limiter(10, Duration::from_secs(1)), &[&seeds[0]]).await;
            seeds.push(node);
        }
        let all: Vec<&Cluster> = seeds.iter().collect();
        full_mesh(&all).await;
        let cfg = ClusterConfig { max_dials_per_sec: 1, join_timeout: Duration::from_secs(30), ..config(ca.identity("many-seeds"), &all) };
        let began = std::time::Instant::now();
        let n = Cluster::start(limiter(10, Duration::from_secs(1)), cfg).await.unwrap();
        let took = began.elapsed();
        assert!(took < Duration::from_secs(5), "joined after {took:?}: the seeds were dialled within the budget");
        assert!(!logged(|l| l.contains("many-seeds") && l.contains("join timeout")), "the join timed out");
        for s in &seeds {
            assert!(n.members().iter().any(|m| m.id == s.node_id() && m.seed), "{:?}", n.members());
        }
        for c in seeds.into_iter().chain([n]) {
            c.shutdown().await;
        }
    })
    .await;
}

/// Seeds that do not answer are dialled once each at start, outside the dial budget, and
/// retried within it: at one dial a second, five silent seeds cost at most about one
/// dial a second after their first, where their own backoff (50 to 400 ms here) would
/// redial each several times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_seeds_are_dialled_once_at_start_then_retried_within_the_dial_budget() {
    bounded(30, async {
        logs();
        let ca = Ca::new();
        // Bound UDP ports nobody answers on.
        let silent: Vec<std::net::UdpSocket> = (0..5).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let cfg = ClusterConfig {
            seeds: silent.iter().map(|s| s.local_addr().unwrap()).collect(),
            max_dials_per_sec: 1,
            handshake_timeout: Duration::from_millis(200),
            join_timeout: Duration::from_secs(5),
            ..config(ca.identity("silent-seeds"), &[])
        };
        let n = Cluster::start(limiter(10, Duration::from_secs(1)), cfg).await.unwrap();
        let first = n.stats().dials;
        assert!(first >= 5, "{first} dials: every seed is dialled at start");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let retries = n.stats().dials - first;
        // One token a second, and the bucket holds one: at most 3 in 3 s, one more at an edge.
        assert!((1..=4).contains(&retries), "{retries} retries in 3 s at one dial a second");
        n.shutdown().await;
    })
    .await;
}

/// Beyond the aggregator pool, the keys' totals are held by the pool: a member that joins
/// through a seed outside it gets none from that seed's full sync. The join also waits
/// for the pool members it learns of, whose full syncs begin with the totals they publish
/// of the keys it does not aggregate: when `start()` returns, the newcomer decides every
/// key on the same totals as the members that counted them, whether it ranks into the
/// pool (and aggregates some keys) or not. (The pool's free dials are tested in
/// `transport::driver::tests`: here the pool's members also dial the newcomer when the
/// seed announces it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_joins_through_a_seed_outside_the_pool_has_the_pools_totals_when_start_returns() {
    bounded(60, async {
        logs();
        let ca = Ca::new();
        let window = Duration::from_secs(10);
        let pooled = |name: &str, seeds: &[&Cluster]| {
            let mut cfg = config(ca.identity(name), seeds);
            // Aggregated beyond two peers; three members aggregate, two per key (so a pool
            // member aggregates two keys in three, not every key).
            (cfg.gossip.full_mesh_max_peers, cfg.gossip.aggregate_above_peers, cfg.gossip.aggregator_pool) = (2, 2, 3);
            cfg
        };
        let mut nodes: Vec<Cluster> = Vec::new();
        for i in 0..5 {
            let seeds: Vec<&Cluster> = nodes.iter().take(1).collect();
            let cfg = pooled(&format!("pooled-{i}"), &seeds);
            nodes.push(Cluster::start(limiter(1_000, window), cfg).await.unwrap());
        }
        let all: Vec<&Cluster> = nodes.iter().collect();
        full_mesh(&all).await;
        align(10_000, 6_000).await;
        let clients: Vec<String> = (0..300).map(|i| format!("client-{i}")).collect();
        for (i, client) in clients.iter().enumerate() {
            for n in all.iter().cycle().skip(i).take(3) {
                assert!(n.limiter().allow(client, n.limiter().now_ms()));
            }
        }
        let keys: Vec<u64> = clients.iter().map(|c| nodes[0].limiter().key_hash(c)).collect();
        let totals = |n: &Cluster| -> BTreeMap<u64, u64> {
            n.views().into_iter().filter(|v| keys.contains(&v.key)).map(|v| (v.key, v.total)).collect()
        };
        eventually("every member's view of every client", Duration::from_secs(10), || {
            all.iter().all(|n| totals(n).len() == keys.len() && totals(n).values().all(|&t| t == 3))
        })
        .await;
        // The pool: the members that hold others' counts.
        let in_pool = |n: &Cluster| n.state().iter().any(|e| e.replica != n.replica());
        // Two newcomers, one that ranks outside the pool and one that ranks into it
        // (node ids are hashes of the names), each through a seed outside the pool.
        for (name, ranks_in) in [("pooled-z", false), ("pooled-new", true)] {
            let members = nodes.len();
            let outside: Vec<&Cluster> = nodes.iter().filter(|n| !in_pool(n)).collect();
            assert_eq!(outside.len(), members - 3, "three of {members} members aggregate");
            let cfg = ClusterConfig { max_dials_per_sec: 1, join_timeout: Duration::from_secs(20), ..pooled(name, &[outside[0]]) };
            let began = std::time::Instant::now();
            let newcomer = Cluster::start(limiter(1_000, window), cfg).await.unwrap();
            let (took, seen) = (began.elapsed(), totals(&newcomer));
            assert!(!logged(|l| l.contains(name) && l.contains("join timeout")), "{name}: the join timed out after {took:?}");
            assert_eq!(seen.len(), keys.len(), "{name}: keys with totals when start() returned ({took:?})");
            assert!(seen.values().all(|&t| t == 3), "{name}: the totals when start() returned: {seen:?}");
            eventually("the newcomer's place in the pool", Duration::from_secs(5), || in_pool(&newcomer) == ranks_in).await;
            nodes.push(newcomer);
        }
        for c in nodes {
            c.shutdown().await;
        }
    })
    .await;
}

/// A full sync that lost frames on the sender's full stream queue is not announced
/// complete: the joining node either has every count when `start()` returns, or its
/// join times out and says so. (Before, the sync-done marker followed whatever frames
/// were left, and `start()` returned early without the dropped counts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_that_lost_frames_on_a_full_queue_is_not_announced_complete() {
    bounded(60, async {
        logs();
        let ca = Ca::new();
        let window = Duration::from_secs(10);
        // A stream queue of 16 frames: each round of the sync (4,096 counts, about 45
        // frames) overflows it, and the last (100 counts) leaves room for the marker.
        let cfg = ClusterConfig { stream_queue: 16, ..config(ca.identity("small-queue"), &[]) };
        let a = Cluster::start(limiter(1_000, window), cfg).await.unwrap();
        align(10_000, 6_000).await;
        let clients = 3 * 4_096 + 100;
        for i in 0..clients {
            assert!(a.limiter().allow(&format!("client-{i}"), a.limiter().now_ms()));
        }
        let cfg = ClusterConfig { join_timeout: Duration::from_secs(2), ..config(ca.identity("behind-small-queue"), &[&a]) };
        let b = Cluster::start(limiter(1_000, window), cfg).await.unwrap();
        let held = b.state().iter().filter(|e| e.replica == a.replica()).count();
        let timed_out = logged(|l| l.contains("behind-small-queue") && l.contains("join timeout"));
        assert!(a.stats().frames_dropped_queue_full > 0, "the queue overflowed");
        assert!(held == clients || timed_out, "start() returned without a join timeout holding {held} of {clients} counts");
        let withheld = logged(|l| l.contains("behind-small-queue") && l.contains("full sync not marked complete"));
        assert!(held == clients || withheld, "the seed announced the sync complete");
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}
