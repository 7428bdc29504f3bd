//! crdt-rate-limiter beside three Redis Lua limiters, on one machine, and one table.
//!
//! Started by `benches/redis/run.sh`, which starts `redis-server` on loopback and passes
//! its port and pid. Redis limiters: a fixed window (INCR + PEXPIRE), a sliding log (a
//! ZSET of request times) and GCRA (one theoretical arrival time per client), each one
//! EVALSHA per decision through the `redis` crate (its synchronous connection, default
//! settings). Ours: `RateLimiter::allow` in this process; for accuracy and faults, three
//! in-process members gossiping through the sans-IO core on virtual time (a 1 ms
//! network, the default 20 ms round).
//!
//! The fault runs end with Redis killed: run it last, and only against a Redis started
//! for it.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::{Admission, GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};

const FIXED: &str = r"
local c = redis.call('INCR', KEYS[1])
if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if c > tonumber(ARGV[1]) then return 0 end
return 1";

const SLIDING: &str = r"
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 1
end
return 0";

const GCRA: &str = r"
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > window then return 0 end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(window))
return 1";

const WINDOW_MS: u64 = 1_000;
/// A limit no throughput run reaches: every decision takes the admit path.
const UNLIMITED: u64 = u32::MAX as u64;
const RUN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq)]
enum Algo {
    Fixed,
    Sliding,
    Gcra,
}

const ALGOS: [Algo; 3] = [Algo::Fixed, Algo::Sliding, Algo::Gcra];

struct Redis {
    client: redis::Client,
    shas: [String; 3],
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

impl Redis {
    fn connect(port: u16) -> Self {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("redis url");
        let mut con = client.get_connection().expect("connect to redis");
        let mut load = |src: &str| redis::cmd("SCRIPT").arg("LOAD").arg(src).query::<String>(&mut con).expect("SCRIPT LOAD");
        let shas = [load(FIXED), load(SLIDING), load(GCRA)];
        Redis { client, shas }
    }

    fn con(&self) -> redis::Connection {
        self.client.get_connection().expect("connect to redis")
    }

    /// The EVALSHA command deciding one request of `client` at `now_ms`.
    fn cmd(&self, algo: Algo, client: &str, limit: u64, now_ms: u64, seq: u64) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        match algo {
            Algo::Fixed => {
                c.arg(&self.shas[0]).arg(1).arg(format!("fw:{client}:{}", now_ms / WINDOW_MS)).arg(limit).arg(WINDOW_MS);
            }
            Algo::Sliding => {
                c.arg(&self.shas[1])
                    .arg(1)
                    .arg(format!("sl:{client}"))
                    .arg(now_ms)
                    .arg(WINDOW_MS)
                    .arg(limit)
                    .arg(format!("{now_ms}-{seq}"));
            }
            Algo::Gcra => {
                c.arg(&self.shas[2]).arg(1).arg(format!("gc:{client}")).arg(now_ms).arg(WINDOW_MS).arg(limit);
            }
        }
        c
    }

    fn decide(&self, con: &mut redis::Connection, algo: Algo, client: &str, limit: u64, seq: u64) -> redis::RedisResult<bool> {
        self.cmd(algo, client, limit, unix_ms(), seq).query::<i64>(con).map(|v| v == 1)
    }

    fn flush(&self) {
        let _: () = redis::cmd("FLUSHALL").query(&mut self.con()).expect("FLUSHALL");
    }
}

struct Rate {
    per_s: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

/// Calls `f(seq)` for [`RUN`], timing each call; `f` returns how many decisions it made.
fn timed(mut f: impl FnMut(u64) -> u64) -> Rate {
    let mut lat = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let mut n = 0u64;
    let mut seq = 0u64;
    while start.elapsed() < RUN {
        let t = Instant::now();
        n += f(seq);
        lat.push(t.elapsed());
        seq += 1;
    }
    let per_s = n as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let at = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Rate { per_s, p50: at(0.5), p99: at(0.99), p999: at(0.999) }
}

/// Runs `f(thread, stop)` on `threads` threads for [`RUN`]; each returns its decisions.
fn threaded(threads: usize, f: impl Fn(usize, &AtomicBool) -> u64 + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn({
                    let (f, stop) = (&f, &stop);
                    move || f(t, stop)
                })
            })
            .collect();
        std::thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Our decisions per second on `threads` threads cycling through `keys`.
fn spin_rate(threads: usize, rl: &RateLimiter, keys: &[String]) -> f64 {
    threaded(threads, |t, stop| {
        let mut n = 0u64;
        let mut i = t * keys.len() / threads.max(1);
        while !stop.load(Ordering::Relaxed) {
            let now = rl.now_ms();
            for _ in 0..1024 {
                black_box(rl.allow(&keys[i], now));
                i += 1;
                if i == keys.len() {
                    i = 0;
                }
            }
            n += 1024;
        }
        n
    })
}

fn ours(limit: u64, strategy: Strategy) -> RateLimiter {
    RateLimiter::builder().quota(Quota::new(limit, Duration::from_millis(WINDOW_MS)).unwrap()).strategy(strategy).build().unwrap()
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.1}M", r / 1e6)
    } else {
        format!("{:.1}k", r / 1e3)
    }
}

fn fmt_dur(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns >= 1_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

fn fmt_lat(r: &Rate) -> String {
    format!("{}/s (p50 {}, p99 {}, p99.9 {})", fmt_rate(r.per_s), fmt_dur(r.p50), fmt_dur(r.p99), fmt_dur(r.p999))
}

/// Three members of one cluster on virtual time: a 1 ms network, `stopped` members
/// neither send, receive nor decide after `stop_at`.
struct Members {
    nodes: Vec<GossipNode>,
    clocks: Vec<ManualClock>,
    wire: Vec<(i64, u64, u64, Vec<u8>)>,
    now: i64,
}

impl Members {
    fn new(limit: u64, strategy: Strategy, admission: Admission, t0: i64) -> Self {
        let ids = [1u64, 2, 3];
        let mut nodes = Vec::new();
        let mut clocks = Vec::new();
        for id in ids {
            let clock = ManualClock::new(t0);
            let rl = RateLimiter::builder()
                .quota(Quota::new(limit, Duration::from_millis(WINDOW_MS)).unwrap())
                .strategy(strategy)
                .admission(admission)
                .clock(clock.clone())
                .hash_secret(*b"redis-comparison")
                .build()
                .unwrap();
            let cfg = GossipConfig::new(ReplicaId { node: id, incarnation: 1 });
            nodes.push(GossipNode::new(rl, cfg, ids.into_iter().filter(|&p| p != id), id, t0).unwrap());
            clocks.push(clock);
        }
        Members { nodes, clocks, wire: Vec::new(), now: t0 }
    }

    /// Advances to `t`, delivering messages and timers; member `i` is skipped if `down[i]`.
    fn advance(&mut self, t: i64, down: [bool; 3]) {
        self.now = t;
        for c in &self.clocks {
            c.set_ms(t);
        }
        let due: Vec<_> = {
            let (due, later): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|m| m.0 <= t);
            self.wire = later;
            due
        };
        for (_, from, to, bytes) in due {
            if !down[(to - 1) as usize] {
                let _ = self.nodes[(to - 1) as usize].handle_message(from, &bytes, t);
            }
        }
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if down[i] {
                continue;
            }
            n.handle_timeout(t);
            while let Some(tx) = n.poll_transmit() {
                self.wire.push((t + 1, i as u64 + 1, tx.to, tx.bytes));
            }
        }
    }
}

/// One client offering `offered` requests per window, one every `WINDOW_MS / offered`
/// ms, round-robin over the live members, for `windows` windows. Returns admitted
/// per window.
fn ours_accuracy(strategy: Strategy, limit: u64, offered: u64, windows: u64, down_after: Option<u64>) -> Vec<u64> {
    let t0 = 1_700_000_000_000i64;
    let mut m = Members::new(limit, strategy, Admission::Optimistic, t0);
    // One idle window for the members to meet.
    let start = t0 + WINDOW_MS as i64;
    let mut t = t0;
    while t < start {
        t += 1;
        m.advance(t, [false; 3]);
    }
    let mut out = vec![0; windows as usize];
    let step = WINDOW_MS as f64 / offered as f64;
    let mut k = 0u64;
    for w in 0..windows {
        let down = [false, false, down_after.is_some_and(|d| w >= d)];
        let live: Vec<usize> = (0..3).filter(|&i| !down[i]).collect();
        for r in 0..offered {
            let at = start + (w * WINDOW_MS) as i64 + (r as f64 * step) as i64;
            if at > m.now {
                m.advance(at, down);
            }
            let node = live[(k % live.len() as u64) as usize];
            k += 1;
            if m.nodes[node].limiter().allow("client-7", at) {
                out[w as usize] += 1;
            }
        }
    }
    out
}

/// The same client through three connections of one Redis, paced in real time.
fn redis_accuracy(r: &Redis, algo: Algo, limit: u64, offered: u64, windows: u64) -> Vec<u64> {
    r.flush();
    let mut cons: Vec<_> = (0..3).map(|_| r.con()).collect();
    // Start on a window boundary.
    let first = unix_ms() / WINDOW_MS + 1;
    while unix_ms() < first * WINDOW_MS {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut out = vec![0; windows as usize];
    let step = WINDOW_MS * 1_000 / offered;
    let t0 = Instant::now();
    for k in 0..offered * windows {
        let due = Duration::from_micros(k * step);
        while t0.elapsed() < due {
            std::hint::spin_loop();
        }
        // One reading of the clock for the script's window and for the tally's.
        let now = unix_ms();
        let w = (now / WINDOW_MS).saturating_sub(first);
        if w >= windows {
            break;
        }
        let con = &mut cons[(k % 3) as usize];
        if r.cmd(algo, "client-7", limit, now, k).query::<i64>(con).is_ok_and(|v| v == 1) {
            out[w as usize] += 1;
        }
    }
    out
}

fn summarize(per_window: &[u64], limit: u64) -> String {
    let (lo, hi) = (per_window.iter().min().unwrap(), per_window.iter().max().unwrap());
    let total: u64 = per_window.iter().sum();
    let over: u64 = per_window.iter().map(|&n| n.saturating_sub(limit)).sum();
    let mean = total as f64 / per_window.len() as f64;
    format!("{lo}–{hi} per window (mean {mean:.1}), {:.1} % over", 100.0 * over as f64 / total.max(1) as f64)
}

/// The median of three runs of `f`.
fn med3(mut f: impl FnMut() -> f64) -> f64 {
    let mut v = [f(), f(), f()];
    v.sort_by(f64::total_cmp);
    v[1]
}

/// The run of `f` with the median rate of three.
fn med3_rate(mut f: impl FnMut() -> Rate) -> Rate {
    let mut v = [f(), f(), f()];
    v.sort_by(|a, b| a.per_s.total_cmp(&b.per_s));
    let [_, m, _] = v;
    m
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port = 6379u16;
    let mut pid = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).expect("--port N"),
            "--pid" => pid = args.next().and_then(|p| p.parse::<u32>().ok()),
            other => panic!("unknown argument {other}"),
        }
    }
    let r = Redis::connect(port);
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query::<String>(&mut r.con())
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("redis_version:").map(str::to_string)))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("redis {version} on 127.0.0.1:{port}, {cores} cores; rates are medians of 3 runs of {} s", RUN.as_secs());

    let mut rows: Vec<[String; 5]> = Vec::new();
    let ratio = |o: f64, f: f64| format!("{:.0}×", o / f);

    // Hot client, one thread: latency and rate.
    let rl = ours(UNLIMITED, Strategy::FixedWindow);
    let now = rl.now_ms();
    // Our rate unclocked (timing each ~20 ns call would measure the clock); the
    // percentiles from calls timed one by one (the clock's own cost included).
    let mut o1 = med3_rate(|| {
        timed(|_| {
            black_box(rl.allow("client-42", now));
            1
        })
    });
    o1.per_s = med3(|| spin_rate(1, &rl, &["client-42".to_string()]));
    let mut con = r.con();
    let red1: Vec<Rate> = ALGOS
        .iter()
        .map(|&a| {
            r.flush();
            med3_rate(|| {
                timed(|seq| {
                    black_box(r.decide(&mut con, a, "client-42", UNLIMITED, seq).unwrap());
                    1
                })
            })
        })
        .collect();
    rows.push(["hot client, 1 thread".into(), fmt_lat(&o1), fmt_lat(&red1[0]), fmt_lat(&red1[1]), fmt_lat(&red1[2])]);
    let r1 = ratio(o1.per_s, red1[0].per_s);

    // Two threads, each its own connection.
    let rl = ours(UNLIMITED, Strategy::FixedWindow);
    let o2 = med3(|| spin_rate(2, &rl, &["client-42".to_string()]));
    let red2: Vec<f64> = ALGOS
        .iter()
        .map(|&a| {
            r.flush();
            med3(|| {
                threaded(2, |t, stop| {
                    let mut con = r.con();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        black_box(r.decide(&mut con, a, "client-42", UNLIMITED, n * 2 + t as u64).unwrap());
                        n += 1;
                    }
                    n
                })
            })
        })
        .collect();
    rows.push(["hot client, 2 threads: decisions/s".into(), fmt_rate(o2), fmt_rate(red2[0]), fmt_rate(red2[1]), fmt_rate(red2[2])]);
    let r2 = ratio(o2, red2[0]);

    // Pipelined ×64, one connection.
    let redp: Vec<f64> = ALGOS
        .iter()
        .map(|&a| {
            r.flush();
            let mut con = r.con();
            med3(|| {
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < RUN {
                    let mut p = redis::pipe();
                    let now = unix_ms();
                    for i in 0..64 {
                        p.add_command(r.cmd(a, "client-42", UNLIMITED, now, n + i));
                    }
                    let v: Vec<i64> = p.query(&mut con).unwrap();
                    n += v.len() as u64;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    rows.push([
        "hot client, pipelined ×64, 1 thread: decisions/s".into(),
        "—".into(),
        fmt_rate(redp[0]),
        fmt_rate(redp[1]),
        fmt_rate(redp[2]),
    ]);
    let rp = ratio(o1.per_s, redp[0]);

    // 100k clients, random order, one thread.
    let mut order: Vec<u64> = (0..100_000).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let clients: Vec<String> = order.iter().map(|i| format!("client-{i}")).collect();
    let rl = ours(UNLIMITED, Strategy::FixedWindow);
    let now = rl.now_ms();
    for c in &clients {
        rl.allow(c, now);
    }
    let ok_rate = med3(|| spin_rate(1, &rl, &clients));
    let redk: Vec<f64> = ALGOS
        .iter()
        .map(|&a| {
            r.flush();
            let mut i = 0;
            med3(|| {
                timed(|seq| {
                    black_box(r.decide(&mut con, a, &clients[i], UNLIMITED, seq).unwrap());
                    i = (i + 1) % clients.len();
                    1
                })
                .per_s
            })
        })
        .collect();
    rows.push(["100k clients, 1 thread: decisions/s".into(), fmt_rate(ok_rate), fmt_rate(redk[0]), fmt_rate(redk[1]), fmt_rate(redk[2])]);
    let rk = ratio(ok_rate, redk[0]);

    // Accuracy: one client at 10× its limit of 100 per second over 3 members.
    let (limit, offered, windows) = (100, 1_000, 5);
    let fixed = ours_accuracy(Strategy::FixedWindow, limit, offered, windows, None);
    let sliding = ours_accuracy(Strategy::SlidingWindow, limit, offered, windows, None);
    let reda: Vec<Vec<u64>> = ALGOS.iter().map(|&a| redis_accuracy(&r, a, limit, offered, windows)).collect();
    rows.push([
        format!("accuracy: one client at 10× a limit of {limit}/s over 3 members, {windows} windows"),
        format!("fixed {}; sliding {}", summarize(&fixed, limit), summarize(&sliding, limit)),
        summarize(&reda[0], limit),
        summarize(&reda[1], limit),
        summarize(&reda[2], limit),
    ]);

    // Faults. Ours: the third member stops after window 1.
    let stopped = ours_accuracy(Strategy::FixedWindow, limit, offered, windows, Some(1));
    rows.push([
        "fault: one of ours stopped after window 1 (the others decide on)".into(),
        format!("{} per window, no errors", stopped.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")),
        "—".into(),
        "—".into(),
        "—".into(),
    ]);
    if let Some(pid) = pid {
        let signal = |sig: &str| {
            let ok = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} {pid}");
        };
        // SIGSTOP for 3 s: how long one call blocks (default client settings).
        let mut blocked = Vec::new();
        for &a in &ALGOS {
            let mut con = r.con();
            signal("-STOP");
            let cont = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                let _ = std::process::Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
            });
            let t = Instant::now();
            let res = r.decide(&mut con, a, "client-9", 100, 0);
            blocked.push(format!("blocked {:.2} s, then {}", t.elapsed().as_secs_f64(), if res.is_ok() { "answered" } else { "failed" }));
            cont.join().unwrap();
        }
        rows.push([
            "fault: Redis stopped (SIGSTOP) for 3 s: one call".into(),
            "no call waits on a peer".into(),
            blocked[0].clone(),
            blocked[1].clone(),
            blocked[2].clone(),
        ]);
        // SIGKILL: what calls return.
        let mut cons: Vec<_> = ALGOS.iter().map(|_| r.con()).collect();
        signal("-KILL");
        std::thread::sleep(Duration::from_millis(200));
        let mut killed = Vec::new();
        for (i, &a) in ALGOS.iter().enumerate() {
            let t = Instant::now();
            let results: Vec<_> = (0..1000).map(|k| r.decide(&mut cons[i], a, "client-9", 100, k)).collect();
            let errors = results.iter().filter(|x| x.is_err()).count();
            let first = results.iter().find_map(|x| x.as_ref().err()).map(|e| format!("{:?}", e.kind())).unwrap_or_default();
            killed.push(format!("{errors} of 1000 calls errors ({first}), {:.1} µs each", t.elapsed().as_secs_f64() * 1e6 / 1000.0));
        }
        rows.push(["fault: Redis killed: 1000 calls".into(), "—".into(), killed[0].clone(), killed[1].clone(), killed[2].clone()]);
    }

    println!("| workload | ours | Redis fixed window (INCR+PEXPIRE in Lua) | Redis sliding log (ZSET) | Redis GCRA |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
    }
    println!();
    println!("ours ÷ Redis fixed window: 1 thread {r1}, 2 threads {r2}, pipelined ×64 (ours unpipelined) {rp}, 100k clients {rk}");
    println!("redis {version}, {cores} cores, loopback; rates are medians of 3 runs of {} s", RUN.as_secs());
}
