//! Chaos in a minute: the load engine at ~150 transactions/s (~1,000 events/s) with two bridge replicas for
//! 60 s while faults strike one after another: the leader SIGKILLed twice (restarted as a standby), the
//! broker SIGKILLed, the PostgreSQL postmaster SIGKILLed, and the leader's database session terminated. The
//! same scenario as `cargo bench --bench chaos` (10 minutes, 37 faults), shortened.
//!
//! Asserts what every fault test does: nothing committed lost (the probe's changes included), nothing
//! uncommitted received, per-row order of first deliveries, duplicates byte-identical to the first delivery,
//! payloads matching their schemas, a device that drops stale `seq` ending with the database's values; and
//! that events flowed again after every fault.

mod common;

use std::time::Duration;

use common::Env;
use delta_harness::chaos::{self, ChaosOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_seconds_of_crashes_lose_nothing() {
    let mut env = Env::start("chaos");
    let opts = ChaosOptions {
        duration: Duration::from_secs(60),
        rate: 150.0,
        replicas: 2,
        leader_kills: 2,
        broker_kills: 1,
        postgres_kills: 1,
        lost_sessions: 1,
        bridge: env!("CARGO_BIN_EXE_delta-bridge").into(),
        env: "dev".into(),
        extra_config: "[bridge]\npoll_interval = \"200ms\"\n".into(),
        grace: Duration::from_secs(90),
        seed: 7,
        verbose: true,
    };
    let report = chaos::run(&mut env, &opts, delta_bridge::LEADER_LOCK)
        .await
        .expect("chaos run");
    eprintln!("{}\n{}", report.fault_log(), report.render());

    assert_eq!(report.faults.len(), opts.faults(), "every fault struck");
    for f in &report.faults {
        assert!(f.recovery.is_some(), "events flowed again after {f:?}");
        if matches!(f.kind, chaos::FaultKind::LeaderKill | chaos::FaultKind::LostSession) {
            assert!(f.takeover.is_some(), "a replica took over after {f:?}");
        }
    }
    assert!(
        report.load.ops_committed > 6000,
        "the load really ran: {}",
        report.load.ops_committed
    );
    assert_eq!(report.probe_lost, 0, "every committed probe change arrived");
    assert_eq!(report.probe_duplicates_not_identical, 0);
    common::assert_nothing_lost_or_invented(&report.load);
}
