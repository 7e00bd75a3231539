//! Several replicas, one publisher: two bridge processes against one database under a steady 120 writes/s
//! (~800 events/s). First the leader is SIGKILLed (and restarted, as Kubernetes would), then the new leader's database session
//! is terminated. Each time a standby takes over within 5 s, nothing committed is lost, nothing uncommitted
//! arrives, a device that drops stale `seq` ends with the database's values, and every duplicate is an
//! at-least-once redelivery of an event that was in flight when a fault struck.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{metric, BridgeProcess, Env, Subscriber};
use delta_bridge::LEADER_LOCK;
use delta_harness::loadgen::{self, LoadOptions};
use tokio_util::sync::CancellationToken;

/// The backend holding the leader lock, from PostgreSQL's own lock table (the truth, not a replica's view).
async fn lock_holder(db: &tokio_postgres::Client) -> Option<i32> {
    db.query_opt(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
            AND ((classid::bigint << 32) | objid::bigint) = $1 AND objsubid = 1",
        &[&LEADER_LOCK],
    )
    .await
    .expect("pg_locks")
    .map(|r| r.get(0))
}

/// Waits until a backend other than `old` holds the leader lock and exactly one live replica reports
/// `delta_bridge_leader 1`; returns that replica's index and the time since `since`.
async fn wait_takeover(
    db: &tokio_postgres::Client,
    old: Option<i32>,
    replicas: &[&BridgeProcess],
    since: Instant,
) -> (usize, Duration) {
    loop {
        let holder = lock_holder(db).await;
        if holder.is_some() && holder != old {
            let mut leaders = Vec::new();
            for (i, r) in replicas.iter().enumerate() {
                if metric(&r.http, "delta_bridge_leader ").await == Some(1.0) {
                    leaders.push(i);
                }
            }
            if leaders.len() == 1 {
                return (leaders[0], since.elapsed());
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "no replica took over within 5 s (lock holder {holder:?}, was {old:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_within_5s_of_a_sigkill_or_a_lost_session_without_loss() {
    let env = Env::start("ha");
    let db = env.client().await;
    let a = env.bridge_process("a");
    let b = env.bridge_process("b");
    common::wait_ready_at(&a.http, Duration::from_secs(30)).await;
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;
    let (first, _) = wait_takeover(&db, None, &[&a, &b], Instant::now()).await;
    let mut replicas = [Some(a), Some(b)];
    let device = Subscriber::start(&env.mqtt.url(), "device-ha", "dev/#").await;

    let target = env.load_target();
    let opts = LoadOptions {
        rate: 120.0,
        duration: Duration::from_secs(26),
        writers: 8,
        merchants: 2,
        branches: 2,
        products_per_branch: 40,
        grace: Duration::from_secs(60),
        progress: false,
        devices: 0,
        offline: 0.0,
    };
    let load = tokio::spawn(async move { loadgen::run(&target, &opts, CancellationToken::new()).await });
    let mut faults = Vec::new();

    // Fault 1: SIGKILL the leader.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let old = lock_holder(&db).await;
    let mut leader = replicas[first].take().expect("leader");
    let killed_at = Instant::now();
    leader.kill();
    faults.push(killed_at);
    let standby = replicas[1 - first].as_ref().expect("standby");
    let (_, took) = wait_takeover(&db, old, &[standby], killed_at).await;
    eprintln!("takeover after SIGKILL of the leader: {took:?}");
    drop(leader);
    // The killed pod comes back as a standby.
    let restarted = env.bridge_process("c");
    common::wait_ready_at(&restarted.http, Duration::from_secs(30)).await;
    replicas[first] = Some(restarted);

    // Fault 2: the (new) leader loses its database session.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let old = lock_holder(&db).await;
    let lost_at = Instant::now();
    let terminated: bool = db
        .query_one(
            "SELECT pg_terminate_backend($1)",
            &[&old.expect("a leader holds the lock")],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(terminated, "the leader's session was terminated");
    faults.push(lost_at);
    let live: Vec<&BridgeProcess> = replicas.iter().flatten().collect();
    let (_, took) = wait_takeover(&db, old, &live, lost_at).await;
    eprintln!("takeover after the leader lost its database session: {took:?}");

    let report = load.await.expect("load task").expect("load runs");
    eprintln!("{}", report.render());
    assert!(
        report.ops_committed > 2000,
        "the load really ran: {}",
        report.ops_committed
    );
    common::assert_nothing_lost_or_invented(&report);

    // Duplicates only inside the at-least-once window: an event seen twice was first received before a fault
    // (or just after it, still in flight from the old leader) and again after it, by the next leader's
    // republish of what had not been deleted.
    let msgs = device.snapshot();
    common::assert_duplicates_identical(&msgs);
    let mut seen: HashMap<&str, Vec<Instant>> = HashMap::new();
    for m in &msgs {
        seen.entry(m.payload["event_id"].as_str().unwrap_or_default())
            .or_default()
            .push(m.at);
    }
    let mut duplicates = 0;
    for (id, times) in &seen {
        for pair in times.windows(2) {
            duplicates += 1;
            let in_window = faults.iter().any(|&f| {
                pair[0] <= f + Duration::from_secs(1) && pair[1] >= f && pair[1] <= f + Duration::from_secs(10)
            });
            assert!(
                in_window,
                "event {id} redelivered outside any fault's window: first at +{:?}, again at +{:?} after the first fault",
                pair[0].saturating_duration_since(faults[0]),
                pair[1].saturating_duration_since(faults[0])
            );
        }
    }
    eprintln!(
        "device received {} events, {} distinct, {duplicates} duplicates, all within a fault's window",
        msgs.len(),
        seen.len()
    );
    assert_eq!(common::bridge_rows(&db, "outbox").await, 0, "the outbox drained");
    device.stop().await;
}
