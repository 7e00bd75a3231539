//! Per-row order under concurrent writers: for every row, the first delivery of each of its events arrives in
//! commit order (the order of `seq`), with many writers racing on few rows so that commits interleave and
//! outbox ids commit out of id order all the time.

mod common;

use std::time::Duration;

use common::Env;
use delta_harness::loadgen::{self, LoadOptions};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_deliveries_of_each_row_arrive_in_commit_order_under_concurrent_writers() {
    let env = Env::start("order");
    // A process of its own, with its log kept beside the servers' if the test fails.
    let bridge = env.bridge_process("order");
    common::wait_ready_at(&bridge.http, Duration::from_secs(30)).await;
    let opts = LoadOptions {
        rate: 150.0,
        duration: Duration::from_secs(20),
        writers: 8,
        merchants: 1,
        branches: 1,
        // Few rows, many writers: sales, restocks and price changes of the same products commit back to back.
        products_per_branch: 6,
        grace: Duration::from_secs(30),
        progress: false,
        devices: 0,
        offline: 0.0,
    };
    let report = loadgen::run(&env.load_target(), &opts, CancellationToken::new())
        .await
        .expect("load runs");
    eprintln!("{}", report.render());
    common::assert_nothing_lost_or_invented(&report);
    drop(bridge);
}
