//! The driver against a member that announces made-up members, on real QUIC sockets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::super::wire::{Frame, FrameDecoder, Hello, MemberEntry, MAX_MEMBERS_PER_FRAME};
use super::super::{certs, node_id, tls, Cluster, ClusterConfig, TlsIdentity};
use super::{get, member_frames, Target};
use crate::{Quota, RateLimiter};

fn identity(ca: &(String, String), name: &str) -> TlsIdentity {
    let (cert, key) = certs::issue(&ca.0, &ca.1, name).unwrap();
    TlsIdentity::from_pem(ca.0.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
}

fn config(id: TlsIdentity, seeds: &[&Cluster]) -> ClusterConfig {
    ClusterConfig {
        seeds: seeds.iter().map(|c| c.local_addr()).collect(),
        handshake_timeout: Duration::from_millis(500),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(400),
        join_timeout: Duration::from_secs(2),
        forget_after: Duration::from_secs(2),
        max_dials_per_sec: 10,
        ..ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap())
    }
}

fn limiter() -> RateLimiter {
    limiter_with(Duration::from_secs(1), [3; 16])
}

/// 10 requests per `window`, client ids hashed with `secret`.
fn limiter_with(window: Duration, secret: [u8; 16]) -> RateLimiter {
    RateLimiter::builder().quota(Quota::new(10, window).unwrap()).hash_secret(secret).build().unwrap()
}

/// Waits until `done` holds, looking every 20 ms; fails with `what` after `within`.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A UDP socket that never answers; counts the packets it receives.
async fn sink() -> (SocketAddr, Arc<AtomicU64>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let packets = Arc::new(AtomicU64::new(0));
    let count = packets.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while socket.recv_from(&mut buf).await.is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    (addr, packets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_made_up_members_costs_a_budget_of_dials_then_is_forgotten() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = certs::generate_ca().unwrap();
        let a = Cluster::start(limiter(), config(identity(&ca, "node-a"), &[])).await.unwrap();
        let b = Cluster::start(limiter(), config(identity(&ca, "node-b"), &[&a])).await.unwrap();
        eventually(Duration::from_secs(10), "a and b connect", || a.live_peers().len() == 1).await;
        // Member b (it holds a valid certificate) says "node-x" is at b's own address:
        // whoever answers there is b, not node-x, so the connection is refused after the
        // handshake, and the redials back off.
        let refused_before = get(&a.shared.counters.protocol_errors);
        {
            let mut st = a.shared.state.lock();
            let x = MemberEntry { name: "node-x".into(), incarnation: 1, addr: b.local_addr() };
            st.members_in(&a.shared, node_id("node-b"), vec![x]);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let refused = get(&a.shared.counters.protocol_errors) - refused_before;
        assert!((1..=8).contains(&refused), "{refused} refusals in 1.5 s: backing off from 50 ms to 400 ms");
        assert!(!a.members().iter().any(|m| m.name == "node-x" && m.connected));
        assert_eq!(a.live_peers().len(), 1, "b is untouched");

        let (target, packets) = sink().await;
        // Then it lists 256 members at one address that never answers.
        let list: Vec<MemberEntry> = (0..256).map(|i| MemberEntry { name: format!("fake-{i}"), incarnation: 1, addr: target }).collect();
        let dials_before = get(&a.shared.counters.dials);
        let start = tokio::time::Instant::now();
        {
            let mut st = a.shared.state.lock();
            st.members_in(&a.shared, node_id("node-b"), list);
        }
        // For the first second and a half: within the budget (10 per second, one second's
        // worth at once).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let dials = get(&a.shared.counters.dials) - dials_before;
        let seconds = start.elapsed().as_secs_f64().ceil() as u64;
        assert!(dials <= 10 * (seconds + 1), "{dials} dials in {seconds} s with a budget of 10 per second");
        assert!(dials >= 5, "the budget is used: {dials}");
        // After forget_after (2 s) every made-up member is forgotten and no dial follows.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let members = a.members();
        assert!(!members.iter().any(|m| m.name.starts_with("fake-") || m.name == "node-x"), "{members:?}");
        assert_eq!(members.len(), 1, "b stays");
        let settled = get(&a.shared.counters.dials);
        let seen = packets.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(get(&a.shared.counters.dials), settled, "no dial once forgotten");
        assert!(seen > 0, "the made-up address was dialed");
        assert_eq!(a.live_peers().len(), 1, "the real member is untouched");
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A member listed after made-up ones whose ids are all lower than its own, and whose
/// dials fail and come due again faster than the budget allows: it is dialled after one
/// pass over them. Before, the due members were taken in id order, so those made-up
/// members took every token, every second, and it was never dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_listed_after_made_up_ones_with_lower_ids_is_dialled_after_one_pass_over_them() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = certs::generate_ca().unwrap();
        let slow_forget = |id| ClusterConfig { forget_after: Duration::from_secs(60), ..config(id, &[]) };
        let a = Cluster::start(limiter(), slow_forget(identity(&ca, "node-a"))).await.unwrap();
        let b = Cluster::start(limiter(), config(identity(&ca, "node-b"), &[&a])).await.unwrap();
        eventually(Duration::from_secs(10), "a and b connect", || a.live_peers().len() == 1).await;
        // A member with a high id, which knows nobody (only a's dial can connect them).
        let c_name = (0..).map(|i| format!("node-c{i}")).find(|n| node_id(n) > u64::MAX / 10 * 9).unwrap();
        let c = Cluster::start(limiter(), config(identity(&ca, &c_name), &[])).await.unwrap();
        // Member b lists 40 made-up members with lower ids at an address that never answers
        // (each dial fails after the 500 ms handshake timeout and is due again within
        // 400 ms: about 45 due a second against a budget of 10), then c.
        let (target, _) = sink().await;
        let fakes: Vec<MemberEntry> = (0..)
            .map(|i| format!("fake-{i}"))
            .filter(|n| node_id(n) < node_id(&c_name))
            .take(40)
            .map(|name| MemberEntry { name, incarnation: 1, addr: target })
            .collect();
        a.shared.state.lock().members_in(&a.shared, node_id("node-b"), fakes);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listed = MemberEntry { name: c_name.clone(), incarnation: 1, addr: c.local_addr() };
        a.shared.state.lock().members_in(&a.shared, node_id("node-b"), vec![listed]);
        eventually(Duration::from_secs(12), "c never dialled", || a.members().iter().any(|m| m.name == c_name && m.connected)).await;
        for n in [&a, &b, &c] {
            n.shutdown().await;
        }
    })
    .await
    .unwrap();
}

/// A full sync under way when its connection is replaced (the seed dials the newcomer
/// again, and its dial wins the tie-break) reaches the newcomer whole before `start()`
/// returns: nothing the seed sent on the retired connection is lost to its close, and the
/// sync-done marker, on the new connection, is not taken before the old one's frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_across_a_connection_replaced_midway_arrives_whole() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = certs::generate_ca().unwrap();
        let minute = || limiter_with(Duration::from_secs(60), [3; 16]);
        // The seed has the lower id: of two connections between them, the one it dialled wins.
        let s_name = (0..).map(|i| format!("seed-{i}")).find(|n| node_id(n) < u64::MAX / 4).unwrap();
        let n_name = (0..).map(|i| format!("newcomer-{i}")).find(|n| node_id(n) > u64::MAX / 4 * 3).unwrap();
        let s = Cluster::start(minute(), config(identity(&ca, &s_name), &[])).await.unwrap();
        let keys = 20_000;
        for i in 0..keys {
            assert!(s.limiter().allow(&format!("client-{i}"), s.limiter().now_ms()));
        }
        let n_id = node_id(&n_name);
        let joining = tokio::spawn(Cluster::start(minute(), config(identity(&ca, &n_name), &[&s])));
        eventually(Duration::from_secs(5), "the newcomer connects", || {
            s.shared.state.lock().peers.get(&n_id).is_some_and(|p| p.active.is_some())
        })
        .await;
        {
            let mut st = s.shared.state.lock();
            let addr = st.peers[&n_id].addr.unwrap();
            st.dial(&s.shared, Target::Peer(n_id), addr, Some(n_name.clone()));
        }
        let n = joining.await.unwrap().unwrap();
        let held = n.state().iter().filter(|e| e.replica == s.replica()).count();
        let replaced = get(&s.shared.counters.dials) >= 1;
        assert!(replaced, "the seed dialled again");
        assert_eq!(held, keys, "start() returned with {held} of the seed's {keys} counts");
        n.shutdown().await;
        s.shutdown().await;
    })
    .await
    .unwrap();
}

/// A member that grants no stream (so the writer of a connection to it can never open
/// its stream) and connects twice: the connection that loses the tie-break is retired,
/// and closed within `RETIRED_FOR` although its writer never gets to finish. Before, it
/// stayed open (and held an incoming slot) for as long as the member answered
/// keep-alives: `max_incoming` such connections refused every honest newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_connection_is_closed_even_when_its_peer_grants_no_stream() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = certs::generate_ca().unwrap();
        let a = Cluster::start(limiter(), config(identity(&ca, "node-a"), &[])).await.unwrap();
        let mut transport = tls::default_transport_config();
        transport.max_concurrent_uni_streams(0u32.into());
        let client = tls::member_client_config(&identity(&ca, "node-h"), Arc::new(transport)).unwrap();
        let mut h = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        h.set_default_client_config(client);
        let (addr, incarnation, key_probe) = (a.local_addr(), 1, a.shared.me.key_probe);
        let mut conns = Vec::new();
        for dial_seq in [1, 2] {
            let conn = h.connect(addr, "node-a").unwrap().await.unwrap();
            let mut send = conn.open_uni().await.unwrap();
            send.write_all(&Frame::Hello(Hello { addr: h.local_addr().unwrap(), incarnation, dial_seq, key_probe }).encode())
                .await
                .unwrap();
            conns.push((conn, send));
        }
        let count = || a.shared.state.lock().conns.values().filter(|c| c.peer == node_id("node-h")).count();
        let greeted = || a.shared.state.lock().conns.values().filter(|c| c.peer == node_id("node-h") && c.hello.is_some()).count();
        eventually(Duration::from_secs(2), "node-h said hello on both", || greeted() >= 2).await;
        assert_eq!(count(), 2, "both connections open, one of them retired");
        eventually(Duration::from_secs(6), "the retired connection is still open", || count() <= 1).await;
        assert!(conns[0].0.close_reason().is_some(), "the first (the one that lost the tie-break) was closed");
        a.shutdown().await;
    })
    .await
    .unwrap();
}

/// Frames dropped on a full queue to a member's previous incarnation do not withhold the
/// sync-done marker of the full sync to its restart (whose join would wait for its
/// timeout, with a warning that frames of its sync were lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_to_a_previous_incarnation_do_not_withhold_the_marker_from_its_restart() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = certs::generate_ca().unwrap();
        let s = Cluster::start(limiter(), config(identity(&ca, "node-s"), &[])).await.unwrap();
        let n1 = Cluster::start(limiter(), config(identity(&ca, "node-n"), &[&s])).await.unwrap();
        let n = node_id("node-n");
        // Frames to it were dropped on a full queue (as to a member that stopped reading).
        {
            let st = s.shared.state.lock();
            let c = st.conns.values().find(|c| c.peer == n).expect("a connection to node-n");
            c.queue_full.fetch_add(5, Ordering::Relaxed);
        }
        n1.shutdown().await;
        drop(n1);
        eventually(Duration::from_secs(10), "node-n's leave is seen", || !s.live_peers().contains(&n)).await;
        // It restarts (a later incarnation) and joins through s.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n2 = Cluster::start(limiter(), config(identity(&ca, "node-n"), &[&s])).await.unwrap();
        let synced = || n2.shared.state.lock().peers.get(&node_id("node-s")).is_some_and(|p| p.synced);
        eventually(Duration::from_secs(2), "s withheld the marker of its sync to the restart", synced).await;
        for c in [&n2, &s] {
            c.shutdown().await;
        }
    })
    .await
    .unwrap();
}

/// A seed whose first connection closed before its hello was used (here: it hashed with
/// another secret, and was refused) is redialled with backoff, so that it joins once it
/// is fixed and restarted at its address. Before, the seed's entry had no address until
/// a hello gave one, and nothing dialled it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_refused_before_its_hello_was_used_is_redialled_once_it_is_fixed() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = certs::generate_ca().unwrap();
        let other_secret = || limiter_with(Duration::from_secs(1), [9; 16]);
        let t = Cluster::start(limiter(), config(identity(&ca, "node-t"), &[])).await.unwrap();
        let s = Cluster::start(other_secret(), config(identity(&ca, "node-s"), &[])).await.unwrap();
        let s_addr = s.local_addr();
        // N joins through both: t answers, s is refused (another hash secret).
        let n = Cluster::start(limiter(), config(identity(&ca, "node-n"), &[&t, &s])).await.unwrap();
        assert!(n.refusals().iter().any(|r| r.addr == s_addr), "{:?}", n.refusals());
        // s is fixed and restarted at the same address, with no seeds of its own: only n's
        // redial can bring them together.
        s.shutdown().await;
        drop(s);
        // Its socket is released once the endpoint's tasks have wound down.
        let s = loop {
            let fixed = ClusterConfig { listen: s_addr, ..config(identity(&ca, "node-s"), &[]) };
            match Cluster::start(limiter(), fixed).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(e.to_string().contains("in use"), "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        eventually(Duration::from_secs(10), "n never redialled its seed", || n.live_peers().contains(&node_id("node-s"))).await;
        for c in [&n, &s, &t] {
            c.shutdown().await;
        }
    })
    .await
    .unwrap();
}

/// While a node joins (before `start()` returns) the members of the aggregator pool it
/// learns of are dialled once each outside the dial budget: at most `aggregator_pool` of
/// them, however many lists name members that outrank the last ones. Once `start()` has
/// returned, members learned pay the budget like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_members_are_dialled_outside_the_budget_while_joining_at_most_a_pool_of_them() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let ca = certs::generate_ca().unwrap();
        let mut cfg = ClusterConfig { max_dials_per_sec: 1, ..config(identity(&ca, "node-a"), &[]) };
        (cfg.gossip.full_mesh_max_peers, cfg.gossip.aggregate_above_peers, cfg.gossip.aggregator_pool) = (2, 2, 4);
        let a = Cluster::start(limiter(), cfg).await.unwrap();
        assert!(!a.shared.state.lock().joining, "start() has returned");
        let (target, _) = sink().await;
        let list = |prefix: &str| -> Vec<MemberEntry> {
            (0..64).map(|i| MemberEntry { name: format!("{prefix}-{i}"), incarnation: 1, addr: target }).collect()
        };
        let learn = |prefix: &str, joining: bool| {
            let mut st = a.shared.state.lock();
            st.joining = joining;
            st.members_in(&a.shared, node_id("node-b"), list(prefix));
            st.maintain(&a.shared);
        };
        let start = tokio::time::Instant::now();
        let budget = |extra: u64| extra + start.elapsed().as_secs_f64().ceil() as u64 + 1;
        let before = get(&a.shared.counters.dials);
        // As while `start()` waits: 64 members, a pool of 4 among them. Those with a lower
        // id than node-a are dialled 3 × `reconnect_min` later (the lower id dials first).
        learn("fake", true);
        eventually(Duration::from_secs(3), "the pool is dialled", || a.shared.state.lock().pool_dialled.len() >= 4).await;
        let dials = get(&a.shared.counters.dials) - before;
        assert!((4..=budget(4)).contains(&dials), "{dials} dials: the pool's 4 and the budget's");
        // Lists naming more members, some of which outrank the pool dialled: no more free dials.
        learn("more", true);
        learn("again", true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dials = get(&a.shared.counters.dials) - before;
        assert_eq!(a.shared.state.lock().pool_dialled.len(), 4, "at most a pool of free dials per start");
        assert!(dials <= budget(4), "{dials} dials in {:?}", start.elapsed());
        // After the join (the set of free dials is cleared when `start()` returns), a
        // member that would rank into the pool pays.
        a.shared.state.lock().pool_dialled.clear();
        learn("late", false);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dials = get(&a.shared.counters.dials) - before;
        assert!(a.shared.state.lock().pool_dialled.is_empty(), "no free dial once joined");
        assert!(dials <= budget(4), "{dials} dials in {:?}", start.elapsed());
        a.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A member list longer than one frame goes out whole, in frames the reader accepts (it
/// refuses a frame of more than 256 members, and the encoder once cut the list there).
#[test]
fn a_member_list_of_any_length_is_sent_whole_in_frames_the_reader_accepts() {
    let addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    for n in [0, 1, MAX_MEMBERS_PER_FRAME, MAX_MEMBERS_PER_FRAME + 1, 1000] {
        let list: Vec<MemberEntry> = (0..n).map(|i| MemberEntry { name: format!("node-{i}"), incarnation: i as u64, addr }).collect();
        let frames = member_frames(list.clone());
        assert_eq!(frames.len(), n.div_ceil(MAX_MEMBERS_PER_FRAME), "{n} members");
        let mut reader = FrameDecoder::default();
        for f in &frames {
            reader.push(&f.encode());
        }
        let mut got = Vec::new();
        while let Some(frame) = reader.next_frame().unwrap() {
            let Frame::Members(part) = frame else { panic!("not a member list") };
            assert!(!part.is_empty() && part.len() <= MAX_MEMBERS_PER_FRAME);
            got.extend(part);
        }
        assert_eq!(got, list, "{n} members");
    }
}

/// A member of a cluster with the thresholds lowered for 8 members: SWIM beyond 3 peers,
/// a pool of 2, connections outside the pool closed once unused for 300 ms.
fn pooled_config(ca: &(String, String), name: &str, seeds: &[&Cluster]) -> ClusterConfig {
    let mut cfg =
        ClusterConfig { close_unused_after: Duration::from_millis(300), max_dials_per_sec: 200, ..config(identity(ca, name), seeds) };
    let g = &mut cfg.gossip;
    (g.full_mesh_max_peers, g.aggregate_above_peers, g.swim_above_peers, g.aggregator_pool) = (2, 2, 3, 2);
    cfg
}

/// Eight members named `prefix-0` to `prefix-7`, started in turn, each joining through
/// the first, configured by `cfg(name, seeds)`, with a one-minute window.
async fn start_eight(prefix: &str, cfg: impl Fn(&str, &[&Cluster]) -> ClusterConfig) -> Vec<Cluster> {
    let mut nodes: Vec<Cluster> = Vec::new();
    for i in 0..8 {
        let seeds: Vec<&Cluster> = nodes.iter().take(1).collect();
        let c = Cluster::start(limiter_with(Duration::from_secs(60), [3; 16]), cfg(&format!("{prefix}-{i}"), &seeds)).await.unwrap();
        nodes.push(c);
    }
    nodes
}

/// A partial view beyond `swim_above_peers` (here 3, in a cluster of 8 with a pool of 2):
/// a member outside the pool keeps its connections to the pool open and no others. It
/// dials the other members when its core has something for them (SWIM's probes, its
/// answers) and closes those connections once unused. Every member still counts every
/// other live, totals still reach everyone, and a member cut off is taken down by every
/// other, those that hold no connection to it included (by SWIM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_swim_above_peers_a_member_outside_the_pool_keeps_connections_to_the_pool_only() {
    use super::super::faults::FaultHooks as _;
    tokio::time::timeout(Duration::from_secs(90), async {
        let ca = certs::generate_ca().unwrap();
        let nodes = start_eight("view", |name, seeds| pooled_config(&ca, name, seeds)).await;
        eventually(Duration::from_secs(20), "every member counts every other live", || nodes.iter().all(|n| n.live_peers().len() == 7))
            .await;
        // Outside the pool: the members whose core keeps only some peers connected.
        let kept = |n: &Cluster| -> Vec<u64> {
            let st = n.shared.state.lock();
            st.peers.keys().copied().filter(|&p| st.node.keeps_connected(p)).collect()
        };
        let outside: Vec<&Cluster> = nodes.iter().filter(|n| kept(n).len() < 7).collect();
        assert_eq!(outside.len(), 6, "a pool of 2 in 8: {:?}", nodes.iter().map(|n| kept(n).len()).collect::<Vec<_>>());
        for n in &outside {
            assert_eq!(kept(n).len(), 2, "a member outside the pool keeps the pool");
        }
        // Connections that said hello, by peer, and whether they are the active one.
        let active = |n: &Cluster| -> Vec<u64> {
            let st = n.shared.state.lock();
            st.peers.iter().filter(|(_, p)| p.active.is_some()).map(|(id, _)| *id).collect()
        };
        let mut fewest = vec![7; outside.len()];
        let began = tokio::time::Instant::now();
        while began.elapsed() < Duration::from_secs(4) {
            for (i, n) in outside.iter().enumerate() {
                let (a, k) = (active(n), kept(n));
                fewest[i] = fewest[i].min(a.len());
                assert!(k.iter().all(|p| a.contains(p)), "a member outside the pool lost a connection to the pool: {a:?} {k:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fewest.iter().all(|&f| f < 7), "members outside the pool held every connection open: fewest {fewest:?}");
        for n in &outside {
            let s = n.stats();
            assert!(s.connections_closed_unused > 0 && s.frames_held > 0, "{s:?}");
        }
        assert!(nodes.iter().all(|n| n.live_peers().len() == 7), "a member was taken down while all were live");
        // Totals still reach every member: each member admits one request of a client.
        let client = "partial-view-client";
        for n in &nodes {
            assert!(n.limiter().allow(client, n.limiter().now_ms()));
        }
        let key = nodes[0].limiter().key_hash(client);
        eventually(Duration::from_secs(10), "every member's view of the client", || {
            nodes.iter().all(|n| n.views().iter().any(|v| v.key == key && v.total == 8))
        })
        .await;
        // Cut one member outside the pool off: every other takes it down.
        // Not the seed (node 0), which the others keep dialling for good.
        let cut_off = outside.iter().find(|n| n.node_id() != nodes[0].node_id()).unwrap();
        let cut = cut_off.node_id();
        for n in &nodes {
            if n.node_id() != cut {
                assert!(cut_off.block_peer(n.node_id()));
            }
        }
        eventually(Duration::from_secs(15), "every member takes the member cut off down", || {
            nodes.iter().filter(|n| n.node_id() != cut).all(|n| !n.live_peers().contains(&cut))
        })
        .await;
        // And forgets it `forget_after` (2 s here) later, connected to it or not: a member
        // whose connection closed unused is not kept forever once it is down.
        eventually(Duration::from_secs(15), "every member forgets the member cut off", || {
            nodes.iter().filter(|n| n.node_id() != cut).all(|n| !n.shared.state.lock().peers.contains_key(&cut))
        })
        .await;
        for n in nodes {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

/// Membership by infection (`membership_by_swim`): beyond `swim_above_peers` (3 here; 8
/// members with a pool of 2, connections outside the pool closed once unused; no member
/// lists exchanged, `member_exchange` zero), a newcomer joins through a seed outside the
/// pool, and may dial one member a second. No member announces it to the others with a
/// member list; they learn of it, and where it is, through SWIM, and dial it. Every member
/// counts it live; once it leaves, every member takes it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_swim_above_peers_members_learn_of_a_newcomer_through_swim() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let ca = certs::generate_ca().unwrap();
        let cfg = |name: &str, seeds: &[&Cluster], dials: u32| ClusterConfig {
            max_dials_per_sec: dials,
            member_exchange: Duration::ZERO,
            ..pooled_config(&ca, name, seeds)
        };
        let nodes = start_eight("infect", |name, seeds| cfg(name, seeds, 200)).await;
        eventually(Duration::from_secs(20), "every member counts every other live", || nodes.iter().all(|n| n.live_peers().len() == 7))
            .await;
        let outside = |n: &Cluster| {
            let st = n.shared.state.lock();
            st.peers.keys().filter(|&&p| st.node.keeps_connected(p)).count() < 7
        };
        eventually(Duration::from_secs(10), "members outside the pool close unused connections", || {
            nodes.iter().filter(|n| outside(n)).all(|n| n.stats().connections_closed_unused > 0)
        })
        .await;
        let learned = |nodes: &[Cluster]| -> Vec<u64> { nodes.iter().map(|n| n.stats().members_learned_by_swim).collect() };
        let before = learned(&nodes);
        let seed = nodes.iter().find(|n| outside(n)).unwrap();
        let newcomer = Cluster::start(limiter_with(Duration::from_secs(60), [3; 16]), cfg("infect-new", &[seed], 1)).await.unwrap();
        let id = newcomer.node_id();
        eventually(Duration::from_secs(20), "every member counts the newcomer live", || nodes.iter().all(|n| n.live_peers().contains(&id)))
            .await;
        let after = learned(&nodes);
        assert!(
            after.iter().sum::<u64>() > before.iter().sum::<u64>(),
            "no member learned of the newcomer through SWIM: {before:?} {after:?}"
        );
        newcomer.shutdown().await;
        eventually(Duration::from_secs(15), "every member takes the newcomer down", || nodes.iter().all(|n| !n.live_peers().contains(&id)))
            .await;
        for n in nodes {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}
