//! Random fault schedules: loss up to 50 %, duplication, reordering, partitions that
//! heal, crashes and restarts. Once faults heal and traffic stops, every live replica
//! converges to identical state equal to the true per-slot counts; no view ever
//! exceeds the truth; admissions per (client, window) never exceed the policy's bound.
//!
//! The simulator checks all of it itself (`Report::violations`); this test draws the
//! schedules. Windows are 1 s and gossip rounds 20 ms, so anti-entropy (every 10 rounds)
//! passes several times per window: with windows not much longer than the anti-entropy
//! period, a count lost at the end of traffic can fall out of the digests' two-window
//! scope before it is repaired (see `determinism.rs`).
//!
//! Cases come from a fixed seed, so CI is reproducible; set `PROPTEST_RNG_SEED` to explore
//! others, and `PROPTEST_CASES` for more of them.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use sim::{Config, Mode, StrategyArg};

fn schedules() -> impl Strategy<Value = Config> {
    let shape = (2usize..=5, 1usize..=4, 5u64..=60, 1_000u64..=3_000, prop_oneof![Just(0.5), Just(1.0), Just(3.0)], 0.0..=0.9f64);
    let network = (0.0..=0.5f64, 0.0..=0.3f64, 0.0..=0.3f64, 1u64..=10);
    let faults =
        (proptest::option::of((0.0..1.0f64, 0.0..1.0f64)), proptest::collection::vec((any::<usize>(), 0.0..=1.0f64, any::<bool>()), 0..=3));
    let policy = (
        prop_oneof![Just(Mode::Bounded), Just(Mode::Optimistic)],
        prop_oneof![Just(StrategyArg::Fixed), Just(StrategyArg::Sliding), Just(StrategyArg::Token)],
    );
    (shape, network, faults, policy, any::<u64>()).prop_map(
        |(
            (nodes, clients, limit, duration_ms, rate, skew_traffic),
            (loss, duplicate, reorder, latency_max),
            (partition, events),
            (mode, strategy),
            seed,
        )| {
            let at = |f: f64| (f * duration_ms as f64) as u64;
            let mut cfg = Config {
                seed,
                nodes,
                clients,
                limit,
                rate,
                skew_traffic,
                latency_ms: (1, latency_max),
                loss,
                duplicate,
                reorder,
                mode,
                strategy,
                duration_ms,
                ..Config::default()
            };
            if let Some((a, b)) = partition {
                let (start, end) = (at(a.min(b)), at(a.max(b)).max(at(a.min(b)) + 1).min(duration_ms));
                if start < end {
                    cfg.partition.push((start, end));
                }
            }
            for (node, when, restart) in events {
                let e = (node % nodes, at(when));
                if restart {
                    cfg.restart.push(e);
                } else {
                    cfg.crash.push(e);
                }
            }
            cfg
        },
    )
}

fn proptest_config() -> ProptestConfig {
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_F417);
    ProptestConfig { cases: 128, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn after_random_faults_heal_replicas_converge_to_the_truth_and_no_bound_is_broken(cfg in schedules()) {
        let r = sim::run(&cfg);
        prop_assert!(r.ok(), "{}\nreproduce: {}", r.to_text(), cfg.reproduction());
        prop_assert!(r.converged);
        // No clock skew here, so true windows are the windows the nodes counted in: a
        // (client, window) gets at most `limit` per incarnation that served it.
        let incarnations = cfg.nodes + cfg.restart.len();
        prop_assert!(r.max_window_overshoot_ratio <= incarnations as f64, "{}", r.to_text());
        prop_assert!(r.admitted <= r.offered && r.ideal <= r.offered);
    }
}
