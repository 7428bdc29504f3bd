//! The discrete-event loop: nodes, traffic, network, faults, the oracle and the checkers.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::{Event as GossipEvent, StateEntry, Transmit, ViewEntry};
use crdt_rate_limiter::limits::{DEFAULT_MAX_CLOCK_SKEW, DEFAULT_MAX_TIMESTAMP_AGE};
use crdt_rate_limiter::{Admission, GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};
use rayon::prelude::*;

use crate::config::{limits, BurstTarget, Config, Mode, StrategyArg};
use crate::queue::{Calendar, Scheduled};
use crate::report::{ClusterTimeFigures, Fault, Report, Timeline, TimelineClient};
use crate::rng::{sub_seed, Rng};
use crate::steps::Steps;
use crate::wire;

/// Virtual time starts here (Unix ms), rounded down to a multiple of the window.
pub const START_UNIX_MS: i64 = 1_700_000_000_000;
/// The hash secret every limiter of a run shares: fixed, for reproducible keys.
pub const HASH_SECRET: [u8; 16] = *b"sim: fixed seed!";
/// Store shards per limiter: fixed, so nothing depends on the machine's CPU count.
const SHARDS: usize = 16;
/// A reliable message is retransmitted at most this many times before it is given up.
const MAX_RETRANSMISSIONS: u32 = 8;
/// Violations kept in the report (all are counted).
const VIOLATIONS_KEPT: usize = 20;
/// Clients a timeline follows per window (the busiest).
const TIMELINE_CLIENTS: usize = 3;
/// Most view-lag samples a timeline takes (the interval grows with the run to fit).
const TIMELINE_SAMPLES_MAX: u64 = 2_000;
/// The run advances in steps of this length: in each, every node runs its own events of
/// the step on its own, side by side with the others, and what they sent is delivered
/// from the next step on. No message arrives in the step it was sent in (with a latency
/// of 0 ms it arrives at the step's end); the run's events outside the nodes (traffic,
/// faults, checks) happen at their times between steps.
const STEP_US: i64 = 1_000;
/// From this many nodes, the nodes of a step run on several threads. Fewer run on one
/// (the same events in the same order: the output does not depend on it).
const PARALLEL_FROM: usize = 8;
/// The most steps of a gossip interval whose work [`Sim::run_nodes`] keeps per node.
const FORECAST_PHASES_MAX: u64 = 1_000;
/// The [`Node::work`] of one event, besides its messages' bytes.
const EVENT_WORK: u32 = 16;
/// Bits of an event's sequence number that hold the node that scheduled it
/// ([`NODES_MAX`](crate::config::NODES_MAX) fits).
const NODE_BITS: u32 = 10;
/// The sequence numbers of requests: after any message or timer due at the same µs.
const REQUEST_SEQ: u64 = 1 << 63;

/// A fast, deterministic hasher for the simulator's tables (FxHash's mixing step). Keys
/// are small integers or already-random 64-bit hashes.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
    fn write_i64(&mut self, x: i64) {
        self.write_u64(x as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// The run's events outside the nodes, run one after the other between steps.
enum Event {
    /// The next request of the merged Poisson stream of all clients.
    Arrival,
    /// Burst client `slot` starts a burst.
    BurstStart(u32),
    /// One request of a burst.
    BurstRequest {
        client: u32,
        node: u32,
    },
    /// A timeline sample of how far views lag (only with a timeline).
    Sample,
    Crash(usize),
    Restart(usize),
    Leave(usize),
    ClockStep(usize, i64),
    SafetyCheck,
    EndOfTraffic,
    ConvergenceCheck,
}

/// A node's own events, run by the node within a step.
enum Local {
    /// A request of `client` routed to the node (`burst`: one of a burst's).
    Request {
        client: u32,
        burst: bool,
    },
    Deliver {
        from: usize,
        bytes: Vec<u8>,
    },
    Timer {
        incarnation: u64,
        deadline_ms: i64,
    },
}

/// One request a node decided, for the run's accounting after the step.
struct Decision {
    at_us: i64,
    seq: u64,
    client: u32,
    burst: bool,
    /// The window the node counted it in.
    window: i64,
    replica: ReplicaId,
    admitted: bool,
}

/// What a node reads of the run while nodes run side by side: it changes only between
/// steps.
struct Shared<'a> {
    cfg: &'a Config,
    start_us: i64,
    /// The windows the limiters keep and send (see [`Sim::tick`]).
    tick: (i64, i64),
    /// Read counts off the wire (clocks are skewed).
    tap: bool,
    clients: Vec<String>,
    keys: Vec<u64>,
    /// Per node, the messages sent it in a step, until its next step takes them. Nodes
    /// post to them side by side; the order within one does not matter.
    inboxes: Vec<Mutex<Vec<Scheduled<Local>>>>,
}

/// A lock of one of [`Shared::inboxes`] (a node that panicked mid-step ends the run anyway).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared<'_> {
    fn at(&self, ms_from_start: u64) -> i64 {
        self.start_us + ms_from_start as i64 * 1000
    }

    fn partitioned(&self, a: usize, b: usize, at_us: i64) -> bool {
        let half = self.cfg.nodes.div_ceil(2);
        (a < half) != (b < half) && self.cfg.partition.iter().any(|&(s, e)| self.at(s) <= at_us && at_us < self.at(e))
    }
}

/// One running incarnation of a node.
struct Live {
    gossip: GossipNode,
    incarnation: u64,
    replica: ReplicaId,
    /// The timer event in flight, as the node's deadline.
    timer_ms: Option<i64>,
    /// Its deadline stopped moving (a violation): no more timers, or the loop would spin.
    stalled: bool,
    /// With skewed clocks: each key's newest window in this node's store (see `wire`).
    newest: FxMap<u64, i64>,
}

struct Node {
    /// When it crashed, while it is down (for the time its peers take to notice), and
    /// the live nodes that have marked it down since.
    crashed_at_us: Option<i64>,
    noticed_by: BTreeSet<usize>,
    skew_ms: i64,
    clock: ManualClock,
    incarnations: u64,
    live: Option<Live>,
    /// Its own events: messages to it, its timer, requests routed to it.
    queue: BinaryHeap<Reverse<Scheduled<Local>>>,
    /// Events it scheduled so far: with its index, each one's sequence number.
    scheduled: u64,
    /// Its time, and the end of the step it runs in.
    now_us: i64,
    until_us: i64,
    /// The network's draws for what it sends (a stream per node: nodes run side by side).
    net: Rng,
    /// Messages it sent in the step: (to, message).
    outbox: Vec<(usize, Scheduled<Local>)>,
    /// Its inbox's messages, taken at the start of a step (kept for its capacity).
    inbox: Vec<Scheduled<Local>>,
    /// What it saw in the step, for the run after the step: violations (time, what),
    /// requests decided, peers its core took down (time, peer).
    violations: Vec<(i64, String)>,
    decisions: Vec<Decision>,
    downs: Vec<(i64, u64)>,
    totals: Totals,
    transmits: Vec<Transmit>,
    /// The work of its step so far: an event is 16, a message (in or out) one more per
    /// 8 bytes, about what each costs. Deterministic, and read only to schedule.
    work: u32,
    /// Its steps' work per step of the gossip interval (at most [`FORECAST_PHASES_MAX`]
    /// steps), the last time: the forecast [`Sim::run_nodes`] schedules by.
    forecast: Vec<u32>,
}

impl Node {
    /// Its clock at `at_us` (virtual time plus its skew), also set on its limiter.
    fn ms_at(&self, at_us: i64) -> i64 {
        let ms = at_us.div_euclid(1000) + self.skew_ms;
        self.clock.set_ms(ms);
        ms
    }

    /// Runs its events due before `until_us`, in order of time, then sequence.
    fn run_until(&mut self, n: usize, sh: &Shared, until_us: i64) {
        self.until_us = until_us;
        // What was sent it in the step before (none of it due before this step's end).
        std::mem::swap(&mut self.inbox, &mut *lock(&sh.inboxes[n]));
        for s in self.inbox.drain(..) {
            self.queue.push(Reverse(s));
        }
        while self.queue.peek().is_some_and(|Reverse(s)| s.at_us < until_us) {
            let Some(Reverse(s)) = self.queue.pop() else { break };
            self.now_us = s.at_us;
            self.work = self.work.saturating_add(EVENT_WORK);
            match s.event {
                Local::Request { client, burst } => self.request(s.seq, sh, client, burst),
                Local::Deliver { from, bytes } => self.deliver(n, sh, from, &bytes),
                Local::Timer { incarnation, deadline_ms } => self.timer(n, sh, incarnation, deadline_ms),
            }
        }
        // Into the receivers' inboxes, in whatever order the threads come: each takes
        // its own into its queue, whose order (time, then sequence) is the run's.
        for (to, s) in self.outbox.drain(..) {
            lock(&sh.inboxes[to]).push(s);
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push((self.now_us, what));
    }

    /// The sequence number of its next event: unique over the run, whatever thread runs it.
    fn next_seq(&mut self, n: usize) -> u64 {
        self.scheduled += 1;
        self.scheduled << NODE_BITS | n as u64
    }

    fn schedule(&mut self, n: usize, at_us: i64, event: Local) {
        let seq = self.next_seq(n);
        self.queue.push(Reverse(Scheduled { at_us: at_us.max(self.now_us), seq, event }));
    }

    /// A message to node `to`, due at `at_us` or at the step's end, whichever is later.
    fn post(&mut self, n: usize, to: usize, at_us: i64, bytes: Vec<u8>) {
        let seq = self.next_seq(n);
        self.outbox.push((to, Scheduled { at_us: at_us.max(self.until_us), seq, event: Local::Deliver { from: n, bytes } }));
    }

    /// A request routed to it: its limiter decides.
    fn request(&mut self, seq: u64, sh: &Shared, client: u32, burst: bool) {
        let now_ms = self.ms_at(self.now_us);
        let c = client as usize;
        let key = sh.keys[c];
        let (tap, w) = (sh.tap, sh.tick.0);
        let Some(live) = self.live.as_mut() else { return };
        // The node cuts windows on cluster time: its clock plus its offset.
        let mut window = (now_ms + live.gossip.cluster_offset_ms()).div_euclid(w);
        if tap {
            // A request older than its key's newest window is charged to that window.
            match live.newest.entry(key) {
                Entry::Occupied(mut e) => {
                    window = window.max(*e.get());
                    e.insert(window);
                }
                Entry::Vacant(e) => {
                    e.insert(window);
                }
            }
        }
        let admitted = live.gossip.limiter().allow(&sh.clients[c], now_ms);
        let replica = live.replica;
        self.decisions.push(Decision { at_us: self.now_us, seq, client, burst, window, replica, admitted });
    }

    fn timer(&mut self, n: usize, sh: &Shared, incarnation: u64, deadline_ms: i64) {
        let now_ms = self.ms_at(self.now_us);
        let Some(live) = self.live.as_mut() else { return };
        if live.incarnation != incarnation || live.timer_ms != Some(deadline_ms) {
            return; // a timer of an earlier incarnation, or superseded
        }
        live.timer_ms = None;
        live.gossip.handle_timeout(now_ms);
        if live.gossip.poll_timeout().is_some_and(|d| d <= now_ms) {
            // A deadline that does not move would spin the loop at one instant.
            live.stalled = true;
            self.violation(format!("node {n}'s next deadline did not move past {now_ms} after handle_timeout"));
        }
        self.flush(n, sh);
    }

    /// Sends what it has to send and arms its timer.
    fn flush(&mut self, n: usize, sh: &Shared) {
        let mut out = std::mem::take(&mut self.transmits);
        let mut timer = None;
        if let Some(live) = self.live.as_mut() {
            while let Some(t) = live.gossip.poll_transmit() {
                out.push(t);
            }
            while let Some(e) = live.gossip.poll_event() {
                if let GossipEvent::PeerDown { peer, .. } = e {
                    self.downs.push((self.now_us, peer));
                }
            }
            let deadline = live.gossip.poll_timeout();
            if deadline.is_some() && deadline != live.timer_ms && !live.stalled {
                live.timer_ms = deadline;
                timer = deadline.map(|d| (live.incarnation, d));
            }
        }
        for t in out.drain(..) {
            self.send(n, sh, t);
        }
        self.transmits = out;
        if let Some((incarnation, deadline_ms)) = timer {
            self.schedule(n, (deadline_ms - self.skew_ms) * 1000, Local::Timer { incarnation, deadline_ms });
        }
    }

    fn latency_us(&mut self, cfg: &Config) -> i64 {
        let (lo, hi) = cfg.latency_ms;
        self.net.between(lo as i64 * 1000, hi as i64 * 1000)
    }

    /// Extra delay of a reordered message: up to three maximum latencies.
    fn reorder_us(&mut self, cfg: &Config) -> i64 {
        if self.net.chance(cfg.reorder) {
            self.net.between(0, 3 * cfg.latency_ms.1.max(1) as i64 * 1000)
        } else {
            0
        }
    }

    /// Hands one message to the network. Datagrams may be lost, duplicated, delayed.
    /// Reliable messages (a QUIC stream: full syncs and repairs) are not lost or
    /// duplicated: each loss costs a retransmission timeout of three maximum latencies,
    /// and after `MAX_RETRANSMISSIONS` losses in a row the message is given up. Either
    /// kind is dropped if the sender and receiver are partitioned when it is sent or when
    /// it arrives, or if the receiver is down when it arrives.
    fn send(&mut self, n: usize, sh: &Shared, t: Transmit) {
        let cfg = sh.cfg;
        self.work = self.work.saturating_add(t.bytes.len() as u32 / 8);
        self.totals.messages += 1;
        self.totals.bytes += t.bytes.len() as u64;
        let Some(to) = t.to.checked_sub(1).map(|p| p as usize).filter(|&p| p < cfg.nodes) else {
            self.violation(format!("node {n} sent a message to unknown peer {}", t.to));
            return;
        };
        if sh.partitioned(n, to, self.now_us) {
            self.totals.partitioned += 1;
            return;
        }
        if t.reliable {
            self.totals.reliable_messages += 1;
            self.totals.reliable_bytes += t.bytes.len() as u64;
            let rto_us = 3 * cfg.latency_ms.1.max(1) as i64 * 1000;
            let mut delay = self.latency_us(cfg) + self.reorder_us(cfg);
            let mut losses = 0;
            while self.net.chance(cfg.loss) {
                losses += 1;
                if losses > MAX_RETRANSMISSIONS {
                    self.totals.lost += 1;
                    return;
                }
                delay += rto_us;
            }
            if losses > 0 {
                self.totals.retransmitted += 1;
            }
            self.post(n, to, self.now_us + delay, t.bytes);
            return;
        }
        if self.net.chance(cfg.loss) {
            self.totals.lost += 1;
            return;
        }
        if self.net.chance(cfg.duplicate) {
            self.totals.duplicated += 1;
            let delay = self.latency_us(cfg) + self.reorder_us(cfg);
            self.post(n, to, self.now_us + delay, t.bytes.clone());
        }
        let delay = self.latency_us(cfg) + self.reorder_us(cfg);
        self.post(n, to, self.now_us + delay, t.bytes);
    }

    fn deliver(&mut self, n: usize, sh: &Shared, from: usize, bytes: &[u8]) {
        self.work = self.work.saturating_add(bytes.len() as u32 / 8);
        if self.live.is_none() {
            self.totals.to_down_node += 1;
            return;
        }
        if sh.partitioned(from, n, self.now_us) {
            self.totals.partitioned += 1;
            return;
        }
        let now_ms = self.ms_at(self.now_us);
        let (tap, w, tick) = (sh.tap, sh.cfg.window_ms, sh.tick);
        let Some(live) = self.live.as_mut() else { return };
        let result = live.gossip.handle_message(from as u64 + 1, bytes, now_ms);
        let mut problem = None;
        match result {
            Ok(()) => {
                self.totals.delivered += 1;
                if tap {
                    let newest = &mut live.newest;
                    let cluster_ms = now_ms + live.gossip.cluster_offset_ms();
                    let tapped = wire::for_each_count(bytes, live.replica, w, acceptable_windows(cluster_ms, tick), |key, window| {
                        let e = newest.entry(key).or_insert(window);
                        *e = (*e).max(window);
                    });
                    if let Err(e) = tapped {
                        problem = Some(format!("the wire tap cannot read a message node {n} accepted ({e}): update sim/src/wire.rs"));
                    }
                }
            }
            Err(e) => problem = Some(format!("node {n} refused a message from node {from}: {e}")),
        }
        if let Some(p) = problem {
            self.violation(p);
        }
        self.flush(n, sh);
    }
}

#[derive(Default)]
struct Totals {
    messages: u64,
    bytes: u64,
    reliable_messages: u64,
    reliable_bytes: u64,
    delivered: u64,
    lost: u64,
    partitioned: u64,
    to_down_node: u64,
    duplicated: u64,
    retransmitted: u64,
    entries_sent: u64,
    entries_merged: u64,
    full_syncs: u64,
    digests: u64,
    buckets_repaired: u64,
    peers_down: u64,
    /// `PeerDown` events about a crashed node, and the longest time one took.
    crash_detections: u64,
    detection_ms_max: i64,
    swim_sent: u64,
    safety_checks: u64,
}

impl Totals {
    /// Adds `o`'s figures to these (the longest detection: the larger).
    fn add(&mut self, o: &Totals) {
        let Totals {
            messages,
            bytes,
            reliable_messages,
            reliable_bytes,
            delivered,
            lost,
            partitioned,
            to_down_node,
            duplicated,
            retransmitted,
            entries_sent,
            entries_merged,
            full_syncs,
            digests,
            buckets_repaired,
            peers_down,
            crash_detections,
            detection_ms_max,
            swim_sent,
            safety_checks,
        } = o;
        self.messages += messages;
        self.bytes += bytes;
        self.reliable_messages += reliable_messages;
        self.reliable_bytes += reliable_bytes;
        self.delivered += delivered;
        self.lost += lost;
        self.partitioned += partitioned;
        self.to_down_node += to_down_node;
        self.duplicated += duplicated;
        self.retransmitted += retransmitted;
        self.entries_sent += entries_sent;
        self.entries_merged += entries_merged;
        self.full_syncs += full_syncs;
        self.digests += digests;
        self.buckets_repaired += buckets_repaired;
        self.peers_down += peers_down;
        self.crash_detections += crash_detections;
        self.detection_ms_max = self.detection_ms_max.max(*detection_ms_max);
        self.swim_sent += swim_sent;
        self.safety_checks += safety_checks;
    }
}

struct Sim<'a> {
    /// What the nodes read of the run: the options, the start, the clients.
    sh: Arc<Shared<'a>>,
    steps: Steps<StepContext<'a>, (usize, Box<Node>)>,
    window_ms: i64,
    end_us: i64,
    now_us: i64,
    seq: u64,
    queue: Calendar<Event>,
    /// Boxed: each step moves them to the threads that run them and back (a pointer
    /// each, not the node).
    #[allow(clippy::vec_box)]
    nodes: Vec<Box<Node>>,
    /// Indices of the nodes that are up, ascending.
    up: Vec<usize>,
    /// Requests routed to nodes so far (their sequence numbers).
    requests: u64,
    /// The end of the step being run.
    step_end_us: i64,
    /// What the last step's nodes decided and found wrong, and the requests of this step
    /// so far that the oracle has yet to judge: folded in by [`settle`](Self::settle),
    /// while the nodes run the next step, or before anything that reads what they count.
    decisions: Vec<Decision>,
    found: Vec<(i64, usize, String)>,
    unjudged: Vec<(u32, i64)>,
    traffic: Rng,
    /// Burst moments, targets and offsets: their own stream.
    bursts: Rng,
    /// The client of each burst slot (unused with `burst_fresh`).
    burst_client: Vec<u32>,
    burst_count: u64,
    burst_offered: u64,
    burst_admitted: u64,
    burst_ideal: u64,
    /// Admissions per burst client (fresh bursts: per burst).
    burst_admitted_by: FxMap<u32, u64>,
    /// Requests offered per client (the timeline follows the busiest).
    offered_by: Vec<u64>,
    /// The timeline, when recorded.
    timeline: Option<Timeline>,
    /// Mean gap between two requests of the merged stream, in µs.
    arrival_gap_us: f64,
    /// Offset of the next arrival from the start, in µs (kept fractional: no drift).
    next_arrival_us: f64,
    client_of_key: FxMap<u64, u32>,
    favourite: Vec<usize>,
    oracle: RateLimiter,
    oracle_clock: ManualClock,
    /// With skewed clocks: an exact limiter on the median clock, and admissions per
    /// (client, window of that clock), real and ideal.
    cluster_oracle: Option<(RateLimiter, ManualClock)>,
    /// [`median_skew`] of the nodes' clocks, kept as they step (0 without skew).
    median_skew_ms: i64,
    admitted_cw: FxMap<(u32, i64), u64>,
    ideal_cw: FxMap<(u32, i64), u64>,
    cluster_ideal: u64,
    replicas: Vec<ReplicaId>,
    replica_index: BTreeMap<ReplicaId, u32>,
    replica_live: Vec<bool>,
    /// Admissions per (client, window the node counted them in), per replica index (0
    /// past the end): one small table, rather than an entry per replica in a large one
    /// that every admission missed the cache in.
    truth: FxMap<(u32, i64), Vec<u64>>,
    /// The same per (client, window), all replicas together: what a view's total is
    /// checked against, and the timeline's lag measured from.
    truth_cw: FxMap<(u32, i64), u64>,
    /// Admissions per (client, window of true time).
    admitted_tw: FxMap<(u32, i64), u64>,
    ideal_tw: FxMap<(u32, i64), u64>,
    offered: u64,
    admitted: u64,
    ideal: u64,
    /// The newest window any request was counted in (or would have been).
    newest_window: i64,
    next_checked: usize,
    traffic_over: bool,
    converged: bool,
    convergence_ms: Option<u64>,
    done: bool,
    totals: Totals,
    violations: Vec<String>,
    violation_count: u64,
}

/// The steps of a gossip interval a node's forecast keeps ([`Node::forecast`]).
fn forecast_phases(cfg: &Config) -> usize {
    cfg.gossip_ms.clamp(1, FORECAST_PHASES_MAX) as usize
}

fn strategy_of(s: StrategyArg) -> Strategy {
    match s {
        StrategyArg::Fixed => Strategy::FixedWindow,
        StrategyArg::Sliding => Strategy::SlidingWindow,
        StrategyArg::Token => Strategy::TokenBucket,
        StrategyArg::Log => Strategy::SlidingLog,
    }
}

fn admission_of(m: Mode) -> Admission {
    match m {
        Mode::Bounded => Admission::Bounded,
        Mode::Optimistic => Admission::Optimistic,
        Mode::Shares => Admission::Shares,
    }
}

/// A limiter for the run; `seed` places its keys in its tables (the steps of a full sync
/// follow table order, so the run repeats only with seeds from its own).
fn limiter(cfg: &Config, clock: &ManualClock, seed: u64) -> RateLimiter {
    let quota = Quota::new(cfg.limit, Duration::from_millis(cfg.window_ms)).expect("validated: limit and window in range");
    RateLimiter::builder()
        .quota(quota)
        .strategy(strategy_of(cfg.strategy))
        .admission(admission_of(cfg.mode))
        .clock(clock.clone())
        .hash_secret(HASH_SECRET)
        .table_seed(seed)
        .shards(SHARDS)
        .build()
        .expect("validated: every limiter setting in range")
}

/// Runs one simulation, and records its timeline if asked. The options must be valid
/// ([`Config::validate`]).
/// Its steps run on the calling thread and `helpers` more ([`Steps`]); with none, on
/// rayon's threads from [`PARALLEL_FROM`] nodes (a sweep's runs, which share the cores).
pub(crate) fn simulate(cfg: &Config, record: bool, helpers: usize) -> (Report, Option<Timeline>) {
    std::thread::scope(|s| {
        let helpers = if cfg.nodes < PARALLEL_FROM { 0 } else { helpers };
        let mut sim = Sim::new(cfg, Steps::new(s, helpers, step));
        if record {
            sim.timeline = Some(Timeline::default());
        }
        sim.run();
        sim.report()
    })
}

/// The helpers a run on its own takes: one fewer than rayon's threads (`RAYON_NUM_THREADS`,
/// or the pool it is called in), as the calling thread works too.
pub(crate) fn helpers() -> usize {
    rayon::current_num_threads().saturating_sub(1)
}

/// What every node's part of a step needs besides itself.
#[derive(Clone)]
struct StepContext<'a> {
    sh: Arc<Shared<'a>>,
    until_us: i64,
    /// The step's place in the gossip interval (see [`Sim::run_nodes`]).
    phase: usize,
}

/// One node's part of a step.
fn step(cx: &StepContext<'_>, (n, node): &mut (usize, Box<Node>)) {
    node.work = 0;
    node.run_until(*n, &cx.sh, cx.until_us);
    node.forecast[cx.phase] = node.work;
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a Config, steps: Steps<StepContext<'a>, (usize, Box<Node>)>) -> Self {
        let window_ms = cfg.window_ms as i64;
        let start_ms = START_UNIX_MS.div_euclid(window_ms) * window_ms;
        let start_us = start_ms * 1000;
        let end_us = start_us + cfg.duration_ms as i64 * 1000;
        let mut skews = Rng::new(sub_seed(cfg.seed, "clock-skew", 0));
        let span = cfg.clock_skew_ms as i64;
        let nodes: Vec<Box<Node>> = (0..cfg.nodes)
            .map(|n| {
                let skew_ms = if span > 0 { skews.between(-span, span) } else { 0 };
                Box::new(Node {
                    crashed_at_us: None,
                    noticed_by: BTreeSet::new(),
                    skew_ms,
                    clock: ManualClock::new(start_ms + skew_ms),
                    incarnations: 0,
                    live: None,
                    queue: BinaryHeap::new(),
                    scheduled: 0,
                    now_us: start_us,
                    until_us: start_us + STEP_US,
                    net: Rng::new(sub_seed(cfg.seed, "network", n as u64)),
                    outbox: Vec::new(),
                    inbox: Vec::new(),
                    violations: Vec::new(),
                    decisions: Vec::new(),
                    downs: Vec::new(),
                    totals: Totals::default(),
                    transmits: Vec::new(),
                    work: 0,
                    forecast: vec![0; forecast_phases(cfg)],
                })
            })
            .collect();
        let tap = nodes.iter().any(|n| n.skew_ms != nodes[0].skew_ms) || !cfg.clock_step.is_empty();
        let median_skew_ms = if tap { median_skew(&nodes) } else { 0 };
        let oracle_clock = ManualClock::new(start_ms);
        let oracle = limiter(cfg, &oracle_clock, sub_seed(cfg.seed, "oracle", 0));
        let cluster_oracle = tap.then(|| {
            let clock = ManualClock::new(start_ms);
            (limiter(cfg, &clock, sub_seed(cfg.seed, "oracle", 1)), clock)
        });
        let mut clients: Vec<String> = (0..cfg.clients).map(|c| format!("client-{c}")).collect();
        let burst_client: Vec<u32> = if cfg.burst_fresh {
            Vec::new()
        } else {
            let first = clients.len() as u32;
            clients.extend((0..cfg.burst_clients).map(|b| format!("burst-{b}")));
            (0..cfg.burst_clients as u32).map(|b| first + b).collect()
        };
        let keys: Vec<u64> = clients.iter().map(|c| oracle.key_hash(c)).collect();
        let client_of_key = keys.iter().enumerate().map(|(i, &k)| (k, i as u32)).collect();
        let mut fav = Rng::new(sub_seed(cfg.seed, "favourite", 0));
        let favourite = (0..cfg.clients).map(|_| fav.below(cfg.nodes as u64) as usize).collect();
        let offered_by = vec![0; clients.len()];
        // All clients together offer clients × rate × limit requests per window.
        let per_us = cfg.clients as f64 * cfg.rate * cfg.limit as f64 / (cfg.window_ms as f64 * 1000.0);
        let arrival_gap_us = if per_us > 0.0 { 1.0 / per_us } else { f64::INFINITY };
        let tick = match strategy_of(cfg.strategy) {
            Strategy::SlidingLog => {
                let bucket = (window_ms + Strategy::LOG_BUCKETS as i64 - 1) / Strategy::LOG_BUCKETS as i64;
                (bucket, (window_ms - 1 + bucket - 1) / bucket)
            }
            _ => (window_ms, 1),
        };
        Sim {
            sh: Arc::new(Shared { cfg, start_us, tick, tap, clients, keys, inboxes: (0..cfg.nodes).map(|_| Mutex::default()).collect() }),
            steps,
            window_ms,
            end_us,
            now_us: start_us,
            seq: 0,
            queue: Calendar::new(start_us),
            nodes,
            up: Vec::new(),
            requests: 0,
            step_end_us: start_us + STEP_US,
            decisions: Vec::new(),
            found: Vec::new(),
            unjudged: Vec::new(),
            traffic: Rng::new(sub_seed(cfg.seed, "traffic", 0)),
            bursts: Rng::new(sub_seed(cfg.seed, "burst", 0)),
            burst_client,
            burst_count: 0,
            burst_offered: 0,
            burst_admitted: 0,
            burst_ideal: 0,
            burst_admitted_by: FxMap::default(),
            offered_by,
            timeline: None,
            arrival_gap_us,
            next_arrival_us: 0.0,
            client_of_key,
            favourite,
            oracle,
            oracle_clock,
            median_skew_ms,
            cluster_oracle,
            admitted_cw: FxMap::default(),
            ideal_cw: FxMap::default(),
            cluster_ideal: 0,
            replicas: Vec::new(),
            replica_index: BTreeMap::new(),
            replica_live: Vec::new(),
            truth: FxMap::default(),
            truth_cw: FxMap::default(),
            admitted_tw: FxMap::default(),
            ideal_tw: FxMap::default(),
            offered: 0,
            admitted: 0,
            ideal: 0,
            newest_window: start_ms.div_euclid(tick.0),
            next_checked: 0,
            traffic_over: false,
            converged: false,
            convergence_ms: None,
            done: false,
            totals: Totals::default(),
            violations: Vec::new(),
            violation_count: 0,
        }
    }

    // ----- time -----

    fn true_ms(&self) -> i64 {
        self.now_us.div_euclid(1000)
    }

    /// Node `n`'s clock now (virtual time plus its skew), also set on its limiter.
    fn node_ms(&self, n: usize) -> i64 {
        self.nodes[n].ms_at(self.now_us)
    }

    fn schedule(&mut self, at_us: i64, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled { at_us: at_us.max(self.now_us), seq: self.seq, event });
    }

    fn violation(&mut self, what: String) {
        self.violation_at(self.now_us, what);
    }

    fn violation_at(&mut self, at_us: i64, what: String) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_KEPT {
            let t = (at_us - self.sh.start_us) as f64 / 1000.0;
            self.violations.push(format!("at {t} ms: {what}"));
        }
    }

    // ----- the loop -----

    fn run(&mut self) {
        let cfg = self.sh.cfg;
        // Faults first, so that one at the very end of traffic happens before it ends.
        for &(node, at) in &cfg.crash {
            self.schedule(self.sh.at(at), Event::Crash(node));
        }
        for &(node, at) in &cfg.restart {
            self.schedule(self.sh.at(at), Event::Restart(node));
        }
        for &(node, at) in &cfg.leave {
            self.schedule(self.sh.at(at), Event::Leave(node));
        }
        for &(node, at, delta) in &cfg.clock_step {
            self.schedule(self.sh.at(at), Event::ClockStep(node, delta));
        }
        self.schedule(self.end_us, Event::EndOfTraffic);
        for n in 0..cfg.nodes {
            self.boot(n);
        }
        if cfg.check_ms > 0 {
            self.schedule(self.sh.start_us + cfg.check_ms as i64 * 1000, Event::SafetyCheck);
        }
        self.schedule_next_arrival();
        for slot in 0..cfg.burst_clients as u32 {
            self.schedule_next_burst(slot);
        }
        let sample_us = self.timeline.as_ref().map(|_| self.sample_interval_ms() as i64 * 1000);
        if let Some(us) = sample_us {
            self.schedule(self.sh.start_us + us, Event::Sample);
        }
        loop {
            // The run's own events of the step first: faults and checks (all at whole
            // milliseconds, so at the step's start), then the traffic, routed to nodes.
            while let Some(s) = self.queue.pop_before(self.step_end_us) {
                self.now_us = s.at_us;
                // Only a request can come before what is left to fold in.
                if !matches!(s.event, Event::Arrival) {
                    self.settle();
                }
                self.event(s.event, sample_us);
                if self.done {
                    return;
                }
            }
            self.run_nodes();
            self.after_step();
            let mut nodes = self.nodes.iter().zip(&self.sh.inboxes);
            if self.queue.is_empty() && nodes.all(|(node, inbox)| node.queue.is_empty() && lock(inbox).is_empty()) {
                self.settle();
                return;
            }
            self.now_us = self.step_end_us;
            self.step_end_us += STEP_US;
        }
    }

    fn event(&mut self, event: Event, sample_us: Option<i64>) {
        let cfg = self.sh.cfg;
        match event {
            Event::Arrival => {
                self.request();
                self.schedule_next_arrival();
            }
            Event::BurstStart(slot) => {
                self.burst(slot);
                self.schedule_next_burst(slot);
            }
            Event::BurstRequest { client, node } => self.burst_request(client as usize, node as usize),
            Event::Sample => {
                self.sample();
                if let Some(us) = sample_us {
                    self.schedule(self.now_us + us, Event::Sample);
                }
            }
            Event::Crash(n) => self.crash(n),
            Event::Leave(n) => self.leave(n),
            Event::ClockStep(n, delta) => {
                // The timer in flight fires at its old true time: early or late in
                // the node's new time, which `timer` and `flush` handle.
                // Clock steps make a run tapped, so the median clock is tracked.
                self.nodes[n].skew_ms += delta;
                self.median_skew_ms = median_skew(&self.nodes);
                self.node_ms(n);
            }
            Event::Restart(n) => {
                self.crash(n);
                self.boot(n);
            }
            Event::SafetyCheck => {
                self.safety_check();
                self.schedule(self.now_us + cfg.check_ms as i64 * 1000, Event::SafetyCheck);
            }
            Event::EndOfTraffic => {
                self.traffic_over = true;
                self.schedule(self.now_us + cfg.gossip_ms as i64 * 1000, Event::ConvergenceCheck);
            }
            Event::ConvergenceCheck => self.convergence_check(),
        }
    }

    /// Every node runs its events of the step, on several threads from
    /// [`PARALLEL_FROM`] nodes (the calling thread and the [`Steps`] helpers, or rayon's
    /// threads for a sweep's runs): a node reads only [`Shared`] and writes only itself
    /// (and the inboxes of the nodes it sends to, whose order does not matter), so the
    /// order and the threads change nothing but the time taken.
    ///
    /// A node's work follows the gossip interval (every round timer fires in one step,
    /// the messages arrive in the few after it), so each node keeps, per step of the
    /// interval, the work its step did the last time ([`Node::work`]), as the forecast
    /// for the same step of the next one. The nodes go to the threads one at a time,
    /// the heaviest first, so that no thread is left waiting on one long step at the end.
    fn run_nodes(&mut self) {
        let until_us = self.step_end_us;
        let phase = (until_us / STEP_US).rem_euclid(forecast_phases(self.sh.cfg) as i64) as usize;
        let cx = StepContext { sh: Arc::clone(&self.sh), until_us, phase };
        let mut order: Vec<(usize, Box<Node>)> = std::mem::take(&mut self.nodes).into_iter().enumerate().collect();
        // On this thread alone: a small run, or a run given one thread (`RAYON_NUM_THREADS=1`),
        // where handing each step to rayon's one worker and waiting for it only costs.
        let shared = order.len() >= PARALLEL_FROM && (self.steps.parallel() || rayon::current_num_threads() > 1);
        if !shared {
            self.settle();
            order.iter_mut().for_each(|item| step(&cx, item));
        } else {
            order.sort_unstable_by_key(|(_, node)| Reverse(node.forecast[phase]));
            if self.steps.parallel() {
                // The helpers start on the nodes while this thread folds in what is left
                // of the step before, then joins them.
                self.steps.start(&cx, order.into_iter());
                self.settle();
                let mut back = Vec::with_capacity(self.sh.cfg.nodes);
                self.steps.finish(cx, &mut back);
                order = back;
            } else {
                self.settle();
                order.par_iter_mut().with_max_len(1).for_each(|item| step(&cx, item));
            }
            order.sort_unstable_by_key(|&(n, _)| n);
        }
        self.nodes = order.into_iter().map(|(_, node)| node).collect();
    }

    /// After a step, in node order: what the nodes saw is taken from them, the peers they
    /// took down are noted now (that reads the nodes), and their violations and decisions
    /// wait for [`settle`](Self::settle).
    fn after_step(&mut self) {
        let mut downs = Vec::new();
        for (n, node) in self.nodes.iter_mut().enumerate() {
            self.found.extend(node.violations.drain(..).map(|(at_us, what)| (at_us, n, what)));
            self.decisions.append(&mut node.decisions);
            downs.extend(node.downs.drain(..).map(|(at_us, peer)| (n, peer, at_us)));
        }
        for (n, peer, at_us) in downs {
            self.noticed(n, peer, at_us);
        }
    }

    /// Folds into the run's figures, without the nodes, what [`after_step`](Self::after_step)
    /// took from them (violations by time, then node; requests by time, then sequence),
    /// then has the oracle judge the requests of the step since: the same order as if
    /// each were done as it came, as nothing in between reads what they count. It may run
    /// while a step is under way, when `self.nodes` is empty (the nodes are out on the
    /// step's threads), so it must not read them.
    fn settle(&mut self) {
        // A stable sort: each node's violations stay in its order.
        let mut found = std::mem::take(&mut self.found);
        found.sort_by_key(|&(at_us, n, _)| (at_us, n));
        for (at_us, _, what) in found.drain(..) {
            self.violation_at(at_us, what);
        }
        self.found = found;
        let mut decisions = std::mem::take(&mut self.decisions);
        decisions.sort_unstable_by_key(|d| (d.at_us, d.seq));
        for d in decisions.drain(..) {
            self.account(d);
        }
        self.decisions = decisions;
        let mut unjudged = std::mem::take(&mut self.unjudged);
        for &(client, true_ms) in &unjudged {
            self.judge(client, true_ms);
        }
        unjudged.clear();
        self.unjudged = unjudged;
    }

    // ----- nodes -----

    fn boot(&mut self, n: usize) {
        let cfg = self.sh.cfg;
        let now_ms = self.node_ms(n);
        let node = &mut self.nodes[n];
        node.crashed_at_us = None;
        node.noticed_by.clear();
        node.incarnations += 1;
        let incarnation = node.incarnations;
        let replica = ReplicaId { node: n as u64 + 1, incarnation };
        let mut gcfg = GossipConfig::new(replica);
        gcfg.interval_ms = cfg.gossip_ms;
        if let Some(above) = cfg.aggregate_above {
            gcfg.aggregate_above_peers = above;
        }
        if let Some(above) = cfg.swim_above {
            gcfg.swim_above_peers = above;
        }
        gcfg.partial_view = !cfg.full_view;
        if let Some(k) = cfg.aggregators {
            gcfg.aggregators = k;
        }
        if let Some(n) = cfg.aggregator_pool {
            gcfg.aggregator_pool = n;
        }
        let peers = (1..=cfg.nodes as u64).filter(|&p| p != replica.node);
        let seed = sub_seed(cfg.seed, "node", (n as u64) << 32 | incarnation);
        let rl = limiter(cfg, &node.clock, sub_seed(cfg.seed, "tables", (n as u64) << 32 | incarnation));
        let gossip = GossipNode::new(rl, gcfg, peers, seed, now_ms).expect("validated: gossip settings in range");
        node.live = Some(Live { gossip, incarnation, replica, timer_ms: None, stalled: false, newest: FxMap::default() });
        let index = self.replicas.len() as u32;
        self.replicas.push(replica);
        self.replica_index.insert(replica, index);
        self.replica_live.push(true);
        if let Err(i) = self.up.binary_search(&n) {
            self.up.insert(i, n);
        }
        self.flush(n);
    }

    /// A graceful leave: what the node's core sends as it leaves goes out, then it stops
    /// as a crash does (its detection is measured the same way).
    fn leave(&mut self, n: usize) {
        let now_ms = self.node_ms(n);
        let Some(live) = self.nodes[n].live.as_mut() else { return };
        live.gossip.leave(now_ms);
        self.flush(n);
        self.crash(n);
    }

    fn crash(&mut self, n: usize) {
        let Some(live) = self.nodes[n].live.take() else { return };
        self.nodes[n].crashed_at_us = Some(self.now_us);
        self.add_stats(&live.gossip);
        self.replica_live[self.replica_index[&live.replica] as usize] = false;
        if let Ok(i) = self.up.binary_search(&n) {
            self.up.remove(i);
        }
    }

    fn add_stats(&mut self, gossip: &GossipNode) {
        let s = gossip.stats();
        // An aggregator's totals are counts on the wire too (aggregated dissemination).
        self.totals.entries_sent += s.entries_sent + s.totals_sent;
        self.totals.entries_merged += s.entries_merged + s.totals_merged;
        self.totals.full_syncs += s.full_syncs_sent;
        self.totals.digests += s.digests_sent;
        self.totals.buckets_repaired += s.buckets_repaired;
        self.totals.swim_sent += s.swim_sent;
    }

    /// Sends what node `n` has to send after one of the run's events (a boot, a leave):
    /// at the run's time, due from the step's end on.
    fn flush(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.now_us = self.now_us;
        node.until_us = self.step_end_us;
        node.flush(n, &self.sh);
    }

    /// Node `n`'s core took `peer` down at `at_us`: the first mark of a crash by each
    /// live node is a detection, timed.
    fn noticed(&mut self, n: usize, peer: u64, at_us: i64) {
        self.totals.peers_down += 1;
        // Node `i` is replica `{node: i + 1}`.
        let crashed = peer.checked_sub(1).and_then(|i| self.nodes.get_mut(i as usize));
        let first = crashed.and_then(|p| Some((p.crashed_at_us?, &mut p.noticed_by))).and_then(|(at, by)| by.insert(n).then_some(at));
        if let Some(at) = first {
            self.totals.crash_detections += 1;
            self.totals.detection_ms_max = self.totals.detection_ms_max.max((at_us - at) / 1000);
        }
    }

    // ----- traffic -----

    fn schedule_next_arrival(&mut self) {
        if self.traffic_over || !self.arrival_gap_us.is_finite() {
            return;
        }
        self.next_arrival_us += self.traffic.exponential(self.arrival_gap_us);
        let at = self.sh.start_us + self.next_arrival_us as i64;
        if at < self.end_us {
            self.schedule(at, Event::Arrival);
        }
    }

    /// Picks the node a request of `client` goes to: its favourite with probability
    /// `skew_traffic`, else any node; a node that is down passes it to a live one.
    fn route(&mut self, client: usize) -> Option<usize> {
        let n = self.sh.cfg.nodes as u64;
        let mut node = if self.traffic.chance(self.sh.cfg.skew_traffic) { self.favourite[client] } else { self.traffic.below(n) as usize };
        if self.nodes[node].live.is_none() {
            if self.up.is_empty() {
                return None;
            }
            node = self.up[self.traffic.below(self.up.len() as u64) as usize];
        }
        Some(node)
    }

    fn request(&mut self) {
        let c = self.traffic.below(self.sh.cfg.clients as u64) as usize;
        let node = self.route(c);
        // Judged by the oracle in `settle`, in this order.
        self.unjudged.push((c as u32, self.true_ms()));
        self.hand(c, node, false);
    }

    /// When burst client `slot` starts its next burst: exponential gaps of mean
    /// `burst_every_ms`, so bursts come at random moments. None after the end of traffic.
    fn schedule_next_burst(&mut self, slot: u32) {
        let gap_us = self.bursts.exponential(self.sh.cfg.burst_every_ms as f64 * 1000.0);
        let at = self.now_us.max(self.sh.start_us) + gap_us as i64;
        if at < self.end_us {
            self.schedule(at, Event::BurstStart(slot));
        }
    }

    /// Schedules one burst: `burst_size` requests uniformly within `burst_spread_ms`,
    /// round-robin over the nodes from a drawn one, or all to one drawn node.
    fn burst(&mut self, slot: u32) {
        let cfg = self.sh.cfg;
        let client = if cfg.burst_fresh {
            if self.sh.clients.len() >= limits::CLIENTS_MAX {
                return; // the documented limit on clients: no more fresh ones
            }
            let c = self.sh.clients.len() as u32;
            let name = format!("burst-{}", self.burst_count);
            let key = self.oracle.key_hash(&name);
            let sh = Arc::get_mut(&mut self.sh).expect("no step under way");
            sh.clients.push(name);
            sh.keys.push(key);
            self.client_of_key.insert(key, c);
            self.offered_by.push(0);
            c
        } else {
            self.burst_client[slot as usize]
        };
        self.burst_count += 1;
        let first = self.bursts.below(cfg.nodes as u64);
        let spread_us = cfg.burst_spread_ms as i64 * 1000;
        for i in 0..cfg.burst_size {
            let at = self.now_us + self.bursts.between(0, spread_us);
            let node = match cfg.burst_target {
                BurstTarget::Spread => (first + i) % cfg.nodes as u64,
                BurstTarget::One => first,
            } as u32;
            if at < self.end_us {
                self.schedule(at, Event::BurstRequest { client, node });
            }
        }
    }

    fn burst_request(&mut self, c: usize, mut node: usize) {
        let target = if self.nodes[node].live.is_some() {
            Some(node)
        } else if self.up.is_empty() {
            None
        } else {
            node = self.up[self.bursts.below(self.up.len() as u64) as usize];
            Some(node)
        };
        self.burst_offered += 1;
        let ideal = self.ideal;
        self.offer(c, target, true);
        self.burst_ideal += self.ideal - ideal;
    }

    /// One request of client `c` to `node` (None: no node is up): through the oracle
    /// now, and to the node's limiter with the node's events of the step (then
    /// [`account`](Self::account)).
    fn offer(&mut self, c: usize, node: Option<usize>, burst: bool) {
        self.judge(c as u32, self.true_ms());
        self.hand(c, node, burst);
    }

    /// The oracle's part of a request of `client` at `true_ms`.
    fn judge(&mut self, client: u32, true_ms: i64) {
        let c = client as usize;
        self.offered += 1;
        self.offered_by[c] += 1;
        let true_window = true_ms.div_euclid(self.window_ms);
        self.oracle_clock.set_ms(true_ms);
        if self.oracle.allow(&self.sh.clients[c], true_ms) {
            self.ideal += 1;
            *self.ideal_tw.entry((client, true_window)).or_default() += 1;
        }
        if let Some((oracle, clock)) = &self.cluster_oracle {
            let median_ms = true_ms + self.median_skew_ms;
            clock.set_ms(median_ms);
            if oracle.allow(&self.sh.clients[c], median_ms) {
                self.cluster_ideal += 1;
                *self.ideal_cw.entry((client, median_ms.div_euclid(self.window_ms))).or_default() += 1;
            }
        }
    }

    /// A request of client `c` to `node`'s queue (None: no node is up).
    fn hand(&mut self, c: usize, node: Option<usize>, burst: bool) {
        let Some(n) = node else { return };
        let seq = REQUEST_SEQ | self.requests;
        self.requests += 1;
        self.nodes[n].queue.push(Reverse(Scheduled { at_us: self.now_us, seq, event: Local::Request { client: c as u32, burst } }));
    }

    /// A request a node decided: the truth, the figures and the policy bound's check.
    fn account(&mut self, d: Decision) {
        self.newest_window = self.newest_window.max(d.window);
        if !d.admitted {
            return;
        }
        let (client, window, replica) = (d.client, d.window, d.replica);
        let true_ms = d.at_us.div_euclid(1000);
        let r = self.replica_index[&replica];
        self.admitted += 1;
        if d.burst {
            self.burst_admitted += 1;
            *self.burst_admitted_by.entry(client).or_default() += 1;
        }
        *self.admitted_tw.entry((client, true_ms.div_euclid(self.window_ms))).or_default() += 1;
        if self.cluster_oracle.is_some() {
            let median_ms = true_ms + self.median_skew_ms;
            *self.admitted_cw.entry((client, median_ms.div_euclid(self.window_ms))).or_default() += 1;
        }
        *self.truth_cw.entry((client, window)).or_default() += 1;
        let counts = self.truth.entry((client, window)).or_default();
        if counts.len() <= r as usize {
            counts.resize(r as usize + 1, 0);
        }
        counts[r as usize] += 1;
        let count = counts[r as usize];
        if count > self.sh.cfg.limit {
            self.violation_at(
                d.at_us,
                format!(
                    "policy bound: replica {}:{} admitted {count} requests of client {client} in window {window}, limit {}",
                    replica.node, replica.incarnation, self.sh.cfg.limit
                ),
            );
        }
    }

    // ----- timeline -----

    /// The interval of view-lag samples: a gossip interval, or longer to stay within
    /// `TIMELINE_SAMPLES_MAX` samples over the traffic.
    fn sample_interval_ms(&self) -> u64 {
        self.sh.cfg.gossip_ms.max(self.sh.cfg.duration_ms.div_ceil(TIMELINE_SAMPLES_MAX))
    }

    /// The largest number of one client's admissions in the current window that some
    /// live node has not seen yet (the truth minus that node's view), sampled. Reads
    /// only: a run with a timeline is the same run.
    fn sample(&mut self) {
        if self.timeline.is_none() {
            return;
        }
        let mut worst = 0u64;
        for i in 0..self.up.len() {
            let n = self.up[i];
            let now_ms = self.node_ms(n);
            let Some(live) = self.nodes[n].live.as_ref() else { continue };
            let window = (now_ms + live.gossip.cluster_offset_ms()).div_euclid(self.sh.tick.0);
            let mut view: FxMap<u32, u64> = FxMap::default();
            for e in live.gossip.state(now_ms) {
                if e.window == window {
                    if let Some(&c) = self.client_of_key.get(&e.key) {
                        *view.entry(c).or_default() += e.count;
                    }
                }
            }
            for c in 0..self.sh.keys.len() as u32 {
                let truth = self.truth_cw.get(&(c, window)).copied().unwrap_or(0);
                worst = worst.max(truth.saturating_sub(view.get(&c).copied().unwrap_or(0)));
            }
        }
        let at_ms = ((self.now_us - self.sh.start_us) / 1000) as u64;
        if let Some(t) = self.timeline.as_mut() {
            t.lag.push((at_ms, worst));
        }
    }

    /// The per-window admissions of the busiest clients, and the faults.
    fn finish_timeline(&self, mut t: Timeline) -> Timeline {
        let cfg = self.sh.cfg;
        let start_window = self.sh.start_us.div_euclid(1000).div_euclid(self.window_ms);
        let windows = cfg.duration_ms.div_ceil(cfg.window_ms) as i64;
        let mut busiest: Vec<usize> = (0..self.sh.clients.len()).collect();
        busiest.sort_by_key(|&c| (std::cmp::Reverse(self.offered_by[c]), c));
        busiest.truncate(TIMELINE_CLIENTS);
        t.window_ms = cfg.window_ms;
        t.limit = cfg.limit;
        t.duration_ms = cfg.duration_ms;
        t.convergence_ms = self.convergence_ms;
        t.clients = busiest
            .into_iter()
            .map(|c| {
                let per_window =
                    |m: &FxMap<(u32, i64), u64>| (0..windows).map(|w| m.get(&(c as u32, start_window + w)).copied().unwrap_or(0)).collect();
                TimelineClient {
                    name: self.sh.clients[c].clone(),
                    offered: self.offered_by[c],
                    admitted: per_window(&self.admitted_tw),
                    ideal: per_window(&self.ideal_tw),
                }
            })
            .collect();
        t.faults = cfg
            .partition
            .iter()
            .map(|&(from_ms, to_ms)| Fault::Partition { from_ms, to_ms })
            .chain(cfg.crash.iter().map(|&(node, at_ms)| Fault::Crash { node, at_ms }))
            .chain(cfg.restart.iter().map(|&(node, at_ms)| Fault::Restart { node, at_ms }))
            .chain(cfg.leave.iter().map(|&(node, at_ms)| Fault::Leave { node, at_ms }))
            .chain(cfg.clock_step.iter().map(|&(node, at_ms, delta_ms)| Fault::ClockStep { node, at_ms, delta_ms }))
            .collect();
        t
    }

    // ----- checkers -----

    /// Checks one view against the truth: no count above what its replica really
    /// admitted, and `exact` replicas (a node's own, or any live one once converged)
    /// equal to it. Returns how many counts of `exact` replicas it saw.
    fn check_view(&mut self, who: &str, entries: &[StateEntry], exact: impl Fn(ReplicaId) -> bool) -> usize {
        let mut exact_seen = 0;
        let what = format!("{who} holds a count");
        for e in entries {
            let Some(c) = self.client_of(&what, e.window_ms, e.key) else { continue };
            let Some(&r) = self.replica_index.get(&e.replica) else {
                self.violation(format!("{who} holds a count of replica {:?}, which never ran", e.replica));
                continue;
            };
            let truth = self.truth.get(&(c, e.window)).and_then(|counts| counts.get(r as usize)).copied().unwrap_or(0);
            if e.count > truth {
                self.violation(format!(
                    "{who} sees {} admissions of client {c} in window {} by {}, which made {truth}",
                    e.count,
                    e.window,
                    replica_name(e.replica)
                ));
            } else if exact(e.replica) {
                exact_seen += 1;
                if e.count != truth {
                    self.violation(format!(
                        "{who} holds {} admissions of client {c} in window {} by {}, which made {truth}",
                        e.count,
                        e.window,
                        replica_name(e.replica)
                    ));
                }
            }
        }
        exact_seen
    }

    /// The client `key` (of a store for `window_ms`) belongs to; a violation naming `what`
    /// if the window length or the key is no client's.
    fn client_of(&mut self, what: &str, window_ms: u64, key: u64) -> Option<u32> {
        if window_ms != self.sh.cfg.window_ms {
            self.violation(format!("{what} for an unknown window length {window_ms} ms"));
            return None;
        }
        let c = self.client_of_key.get(&key).copied();
        if c.is_none() {
            self.violation(format!("{what} for key {key:#x}, which is no client's"));
        }
        c
    }

    /// One node's whole view against the truth, nodes in turn.
    fn safety_check(&mut self) {
        if self.up.is_empty() {
            return;
        }
        let n = self.up[self.next_checked % self.up.len()];
        self.next_checked += 1;
        let now_ms = self.node_ms(n);
        let Some(live) = self.nodes[n].live.as_ref() else { return };
        let (state, own) = (live.gossip.state(now_ms), live.replica);
        let views = live.gossip.views(now_ms);
        self.totals.safety_checks += 1;
        self.check_view(&format!("node {n}"), &state, |r| r == own);
        self.check_totals(&format!("node {n}"), &views);
    }

    /// Checks a node's view totals: none above what all replicas admitted, none for a key
    /// or a window length no client has.
    fn check_totals(&mut self, who: &str, views: &[ViewEntry]) {
        let what = format!("{who} decides on a total");
        for v in views {
            let Some(c) = self.client_of(&what, v.window_ms, v.key) else { continue };
            let all = self.truth_cw.get(&(c, v.window)).copied().unwrap_or(0);
            if v.total > all {
                self.violation(format!(
                    "{who} decides client {c} in window {} on {} admissions; all replicas made {all}",
                    v.window, v.total
                ));
            }
        }
    }

    /// Aggregated dissemination's convergence: every live node decides every client, in
    /// every compared window, on at least what the live replicas admitted plus what any
    /// live node still holds of replicas that are gone (and, as the safety check holds, at
    /// most what all did), and holds its own counts exactly. Nodes
    /// hold other replicas' counts only of the keys they aggregate, so their states are
    /// not compared. Returns what is still missing, if anything.
    fn aggregated_disagreement(&mut self, lo: i64) -> Option<String> {
        let mut live_cw: FxMap<(u32, i64), u64> = FxMap::default();
        for (cw, r, n) in self.truth_since(lo) {
            if self.replica_live[r] {
                *live_cw.entry(cw).or_default() += n;
            }
        }
        // Counts of replicas that are gone, as far as some live node still holds them:
        // every total must include those too (a key's new aggregator gets them from
        // whoever held them).
        let mut held: FxMap<(u32, i64, u32), u64> = FxMap::default();
        let gone = self.replica_live.contains(&false);
        for &n in self.up.iter().filter(|_| gone) {
            let Some(live) = self.nodes[n].live.as_ref() else { continue };
            for e in live.gossip.state(self.node_ms(n)) {
                let (Some(&c), Some(&r)) = (self.client_of_key.get(&e.key), self.replica_index.get(&e.replica)) else { continue };
                if e.window >= lo && !self.replica_live[r as usize] {
                    let h = held.entry((c, e.window, r)).or_default();
                    *h = (*h).max(e.count);
                }
            }
        }
        for (&(c, w, _), &n) in &held {
            *live_cw.entry((c, w)).or_default() += n;
        }
        // Client by client, each client's windows in order.
        let mut want: Vec<((u32, i64), u64)> = live_cw.into_iter().collect();
        want.sort_unstable_by_key(|&(cw, _)| cw);
        for i in 0..self.up.len() {
            let n = self.up[i];
            let now_ms = self.node_ms(n);
            let Some(live) = self.nodes[n].live.as_ref() else { continue };
            // Every client's total: its first aggregator sends it to every live member.
            let views: FxMap<(u64, i64), u64> = live.gossip.views(now_ms).into_iter().map(|v| ((v.key, v.window), v.total)).collect();
            for &((c, w), want) in &want {
                let total = views.get(&(self.sh.keys[c as usize], w)).copied().unwrap_or(0);
                if total < want {
                    return Some(format!("node {n} decides client {c} in window {w} on {total} admissions, live replicas made {want}"));
                }
            }
        }
        None
    }

    /// Every replica's admissions of every client in the windows from `lo` on, as
    /// ((client, window), replica index, admissions), where there are any.
    fn truth_since(&self, lo: i64) -> impl Iterator<Item = ((u32, i64), usize, u64)> + '_ {
        let windows = self.truth.iter().filter(move |(&(_, w), _)| w >= lo);
        windows.flat_map(|(&cw, counts)| counts.iter().enumerate().filter(|&(_, &n)| n > 0).map(move |(r, &n)| (cw, r, n)))
    }

    /// The oldest window compared for convergence: the one before the newest window any
    /// request was counted in. Older windows may already be gone from some stores.
    fn oldest_compared_window(&self) -> i64 {
        self.newest_window - 1
    }

    fn convergence_check(&mut self) {
        let lo = self.oldest_compared_window();
        let aggregated = self.up.iter().any(|&n| self.nodes[n].live.as_ref().is_some_and(|l| l.gossip.aggregating()));
        if aggregated {
            let disagreement = self.aggregated_disagreement(lo);
            return self.conclude(disagreement, |sim| {
                // Every live replica's own counts, exactly (the others' are in the totals).
                let mut made = vec![0usize; sim.replica_live.len()];
                for (_, r, _) in sim.truth_since(lo) {
                    made[r] += 1;
                }
                for i in 0..sim.up.len() {
                    let n = sim.up[i];
                    let now_ms = sim.node_ms(n);
                    let Some(live) = sim.nodes[n].live.as_ref() else { continue };
                    let own = live.replica;
                    let mine: Vec<StateEntry> =
                        live.gossip.state(now_ms).into_iter().filter(|e| e.window >= lo && e.replica == own).collect();
                    let seen = sim.check_view(&format!("node {n}'s converged state"), &mine, |_| true);
                    let expected = made[sim.replica_index[&own] as usize];
                    if seen != expected {
                        sim.violation(format!("node {n} holds {seen} of its own counts once converged; it made {expected}"));
                    }
                }
            });
        }
        let mut reference: Option<(usize, Vec<StateEntry>)> = None;
        let mut disagreement = None;
        for i in 0..self.up.len() {
            let n = self.up[i];
            let now_ms = self.node_ms(n);
            let Some(live) = self.nodes[n].live.as_ref() else { continue };
            let state: Vec<StateEntry> = live.gossip.state(now_ms).into_iter().filter(|e| e.window >= lo).collect();
            match &reference {
                None => reference = Some((n, state)),
                Some((m, r)) if *r != state => {
                    disagreement = Some(describe_difference(*m, r, n, &state));
                    break;
                }
                Some(_) => {}
            }
        }
        self.conclude(disagreement, |sim| {
            let state = reference.map(|(_, s)| s).unwrap_or_default();
            // Live replicas' counts must all be there, exactly; dead ones' may lag.
            let live: BTreeSet<ReplicaId> = sim.replicas.iter().zip(&sim.replica_live).filter(|(_, &up)| up).map(|(r, _)| *r).collect();
            let seen = sim.check_view("the converged state", &state, |r| live.contains(&r));
            let expected = sim.truth_since(lo).filter(|&(_, r, _)| sim.replica_live[r]).count();
            if seen != expected {
                sim.violation(format!("the converged state holds {seen} counts of live replicas; they made {expected}"));
            }
        });
    }

    /// Ends the run as converged (after `verify`) if nothing disagrees, or as not
    /// converged once the tail cap is reached; else checks again a round later.
    fn conclude(&mut self, disagreement: Option<String>, verify: impl FnOnce(&mut Self)) {
        let waited_ms = ((self.now_us - self.end_us) / 1000) as u64;
        if disagreement.is_none() {
            self.converged = true;
            self.convergence_ms = Some(waited_ms);
            self.done = true;
            verify(self);
        } else if waited_ms >= self.sh.cfg.tail_cap_ms {
            self.done = true;
            let what = disagreement.unwrap_or_default();
            self.violation(format!("live replicas still disagree {waited_ms} ms after traffic and faults ended: {what}"));
        } else {
            self.schedule(self.now_us + self.sh.cfg.gossip_ms as i64 * 1000, Event::ConvergenceCheck);
        }
    }

    // ----- results -----

    fn report(mut self) -> (Report, Option<Timeline>) {
        let cfg = self.sh.cfg;
        for n in 0..self.nodes.len() {
            if let Some(live) = self.nodes[n].live.take() {
                self.add_stats(&live.gossip);
            }
        }
        let limit = cfg.limit;
        let (mut over, mut max_count) = (0u64, 0u64);
        for &a in self.admitted_tw.values() {
            over += a.saturating_sub(limit);
            max_count = max_count.max(a);
        }
        let short: u64 = self.ideal_tw.iter().map(|(k, &i)| i.saturating_sub(self.admitted_tw.get(k).copied().unwrap_or(0))).sum();
        let ratio = |x: u64| if self.ideal == 0 { 0.0 } else { x as f64 / self.ideal as f64 };
        let cluster_time = self.cluster_oracle.as_ref().map(|_| {
            let (mut over, mut max_count) = (0u64, 0u64);
            for &a in self.admitted_cw.values() {
                over += a.saturating_sub(limit);
                max_count = max_count.max(a);
            }
            let short: u64 = self.ideal_cw.iter().map(|(k, &i)| i.saturating_sub(self.admitted_cw.get(k).copied().unwrap_or(0))).sum();
            let ideal = self.cluster_ideal;
            let ratio = |x: u64| if ideal == 0 { 0.0 } else { x as f64 / ideal as f64 };
            ClusterTimeFigures {
                ideal,
                over_admitted: over,
                over_admission_ratio: ratio(over),
                under_admission_ratio: ratio(short),
                max_window_overshoot_ratio: max_count as f64 / limit as f64,
            }
        });
        let timeline = self.timeline.take().map(|t| self.finish_timeline(t));
        let steady_clients = cfg.clients as u32;
        let burst_max = self.admitted_tw.iter().filter(|((c, _), _)| *c >= steady_clients).map(|(_, &a)| a).max().unwrap_or(0);
        // Fresh bursts are the clients after the steady ones, one per burst.
        let burst_fewest = if cfg.burst_fresh && self.sh.clients.len() > cfg.clients {
            (cfg.clients as u32..self.sh.clients.len() as u32)
                .map(|c| self.burst_admitted_by.get(&c).copied().unwrap_or(0))
                .min()
                .unwrap_or(0)
        } else {
            0
        };
        for node in &self.nodes {
            self.totals.add(&node.totals);
        }
        let t = &self.totals;
        let report = Report {
            config: cfg.clone(),
            offered: self.offered,
            admitted: self.admitted,
            ideal: self.ideal,
            over_admitted: over,
            over_admission_ratio: ratio(over),
            under_admission_ratio: ratio(short),
            max_window_overshoot_ratio: max_count as f64 / limit as f64,
            max_window_over_admitted: max_count.saturating_sub(limit),
            predicted_max_overshoot: crate::predicted_max_overshoot(cfg),
            converged: self.converged,
            convergence_ms: self.convergence_ms,
            messages: t.messages,
            bytes: t.bytes,
            reliable_messages: t.reliable_messages,
            reliable_bytes: t.reliable_bytes,
            bytes_per_count: if t.entries_sent == 0 { 0.0 } else { t.bytes as f64 / t.entries_sent as f64 },
            delivered: t.delivered,
            lost: t.lost,
            partitioned: t.partitioned,
            to_down_node: t.to_down_node,
            duplicated: t.duplicated,
            retransmitted: t.retransmitted,
            entries_sent: t.entries_sent,
            entries_merged: t.entries_merged,
            full_syncs: t.full_syncs,
            digests: t.digests,
            buckets_repaired: t.buckets_repaired,
            peers_down: t.peers_down,
            crash_detections: t.crash_detections,
            detection_ms_max: t.detection_ms_max,
            swim_sent: t.swim_sent,
            safety_checks: t.safety_checks,
            bursts: self.burst_count,
            burst_offered: self.burst_offered,
            burst_admitted: self.burst_admitted,
            burst_ideal: self.burst_ideal,
            burst_max_window_admitted: burst_max,
            burst_fewest_admitted: burst_fewest,
            violations: self.violations,
            violation_count: self.violation_count,
            cluster_time,
        };
        (report, timeline)
    }
}

/// The windows a limiter with the default tolerances accepts counts for at `now_ms` (the
/// store's rule): from the one before the oldest a late request can reach (or the
/// sliding log's buckets before it) to the newest an early one can, in windows of
/// `tick.0` ms.
fn acceptable_windows(now_ms: i64, (w, back): (i64, i64)) -> std::ops::RangeInclusive<i64> {
    let (age, skew) = (DEFAULT_MAX_TIMESTAMP_AGE.as_millis() as i64, DEFAULT_MAX_CLOCK_SKEW.as_millis() as i64);
    (now_ms - age).div_euclid(w) - back..=(now_ms + skew).div_euclid(w)
}

/// A replica as the simulator numbers nodes (from 0).
fn replica_name(r: ReplicaId) -> String {
    match r.node.checked_sub(1) {
        Some(n) => format!("node {n} incarnation {}", r.incarnation),
        None => format!("replica {r:?}"),
    }
}

/// The first count two states disagree on, for the report.
fn describe_difference(a: usize, sa: &[StateEntry], b: usize, sb: &[StateEntry]) -> String {
    let slot = |e: &StateEntry| (e.window_ms, e.key, e.window, e.replica);
    let (mut i, mut j) = (0, 0);
    let show = |e: &StateEntry| format!("key {:#x} window {} {}", e.key, e.window, replica_name(e.replica));
    loop {
        match (sa.get(i), sb.get(j)) {
            (Some(x), Some(y)) if slot(x) == slot(y) => {
                if x.count != y.count {
                    return format!("node {a} holds {} and node {b} holds {} for {}", x.count, y.count, show(x));
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if slot(x) < slot(y) => return format!("node {a} holds {} for {}, node {b} nothing", x.count, show(x)),
            (Some(_), Some(y)) | (None, Some(y)) => return format!("node {b} holds {} for {}, node {a} nothing", y.count, show(y)),
            (Some(x), None) => return format!("node {a} holds {} for {}, node {b} nothing", x.count, show(x)),
            (None, None) => return String::new(),
        }
    }
}

/// The median of the nodes' clock offsets from true time (for an even count, the mean of
/// the middle two): where cluster time converges.
fn median_skew(nodes: &[Box<Node>]) -> i64 {
    let mut k: Vec<i64> = nodes.iter().map(|n| n.skew_ms).collect();
    k.sort_unstable();
    let n = k.len();
    if n % 2 == 1 {
        k[n / 2]
    } else {
        (k[n / 2 - 1] + k[n / 2]).div_euclid(2)
    }
}
