//! Nothing committed is lost, nothing uncommitted is sent — under a steady 120 writes/s (~800 events/s) while,
//! in one run, the bridge is SIGKILLed and restarted, the broker restarts and PostgreSQL restarts. A device
//! that drops stale `seq` ends with exactly the database's values.

mod common;

use std::time::Duration;

use common::Env;
use delta_harness::loadgen::{self, LoadOptions};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_loss_and_no_phantoms_through_bridge_broker_and_database_restarts() {
    let mut env = Env::start("faults");
    // The postmaster's start time, to prove below that the database really restarted.
    let started_before = env
        .pg
        .psql(&env.db, "SELECT pg_postmaster_start_time()")
        .expect("start time");
    // The bridge installs the capture triggers before it is ready: every change the load makes is captured.
    let mut bridge = env.bridge_process("a");
    common::wait_ready_at(&bridge.http, Duration::from_secs(30)).await;

    let target = env.load_target();
    let opts = LoadOptions {
        rate: 120.0,
        duration: Duration::from_secs(36),
        writers: 8,
        merchants: 2,
        branches: 3,
        products_per_branch: 40,
        grace: Duration::from_secs(60),
        progress: false,
        devices: 0,
        offline: 0.0,
    };
    let cancel = CancellationToken::new();
    let load = tokio::spawn(async move { loadgen::run(&target, &opts, cancel).await });

    tokio::time::sleep(Duration::from_secs(6)).await;
    eprintln!("fault 1: SIGKILL the bridge, restart it 2 s later");
    bridge.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bridge = env.bridge_process("b");

    tokio::time::sleep(Duration::from_secs(8)).await;
    eprintln!("fault 2: restart the broker");
    tokio::task::block_in_place(|| env.mqtt.restart()).expect("broker restarts");

    tokio::time::sleep(Duration::from_secs(8)).await;
    eprintln!("fault 3: restart PostgreSQL");
    tokio::task::block_in_place(|| env.pg.restart(false)).expect("postgres restarts");

    let report = load.await.expect("load task").expect("load runs");
    eprintln!("{}", report.render());
    common::wait_ready_at(&bridge.http, Duration::from_secs(30)).await;

    assert!(
        report.ops_committed > 2500,
        "the load really ran: {} committed",
        report.ops_committed
    );
    assert!(
        report.ops_failed > 0,
        "deliberate rollbacks (and the database restart) produced uncommitted writes"
    );
    common::assert_nothing_lost_or_invented(&report);
    let started_after = env
        .pg
        .psql(&env.db, "SELECT pg_postmaster_start_time()")
        .expect("start time");
    assert_ne!(started_before, started_after, "PostgreSQL really restarted");
    let log = std::fs::read_to_string(env.dir.join("bridge-b.log")).unwrap_or_default();
    assert!(
        log.contains("postgres session ended"),
        "the bridge saw the database go away"
    );
    assert!(
        log.contains("mqtt connection lost"),
        "the bridge saw the broker go away"
    );
    let db = env.client().await;
    let left = common::bridge_rows(&db, "outbox").await;
    let dead = common::bridge_rows(&db, "dead_letter").await;
    assert_eq!((left, dead), (0, 0), "everything delivered, nothing dead-lettered");
    drop(bridge);
}
