//! Memory is bounded in bytes, not only in events: while the broker is down, a backlog of sales of a thousand
//! items each (tens of kilobytes per event) and then a replay of 50,000 dead letters keep the bridge's
//! resident memory under a bound set by `bridge.max_pending_bytes`, and everything is delivered once the
//! broker is back.

mod common;

use std::time::{Duration, Instant};

use common::{Env, Subscriber};

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The highest RSS seen while `f` runs, sampled every 50 ms.
async fn peak_rss_during<F: std::future::Future<Output = ()>>(pid: u32, f: F) -> f64 {
    let peak = std::sync::Arc::new(std::sync::Mutex::new(0f64));
    let p = peak.clone();
    let sampler = tokio::spawn(async move {
        loop {
            let r = rss_mib(pid);
            if let Ok(mut m) = p.lock() {
                *m = m.max(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    f.await;
    sampler.abort();
    let v = *peak.lock().expect("lock");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_with_huge_sales_and_a_large_replay_stays_within_the_byte_bound() {
    const SALES: i64 = 600;
    const ITEMS: i64 = 1000;
    const BOUND_MIB: f64 = 45.0;
    let mut env = Env::start("memory");
    let bridge = env.bridge_process_with("mem", &[("DELTA_BRIDGE__BRIDGE__MAX_PENDING_BYTES", "2MiB")]);
    common::wait_ready_at(&bridge.http, Duration::from_secs(30)).await;
    let pid = bridge.child.id();
    let t0 = Instant::now();
    let baseline = rss_mib(pid);
    let db = env.client().await;

    // The broker goes away; sales of a thousand items each pile up (~45 kB per event, ~27 MB in all).
    tokio::task::block_in_place(|| env.mqtt.stop(true));
    let writes = async {
        for s in 0..SALES {
            db.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO transactions (branch_id, transaction_code, status, grand_total, created_by)
                   VALUES (1, 'BIG-{s}', 'paid', 1000, 'kasir');
                 INSERT INTO transaction_items (transaction_id, product_id, quantity, price)
                   SELECT currval('transactions_id_seq'), 1 + (i % 20), 1, 1.00 FROM generate_series(1, {ITEMS}) i;
                 COMMIT;"
            ))
            .await
            .expect("a sale commits while the broker is down");
        }
        // Let the bridge read what it may.
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let peak_sales = peak_rss_during(pid, writes).await;
    let pending = common::metric(&bridge.http, "delta_bridge_pending_bytes ")
        .await
        .unwrap_or(-1.0);
    eprintln!(
        "bridge RSS: {baseline:.1} MiB at start, {peak_sales:.1} MiB at most with {SALES} sales of {ITEMS} items \
         waiting; delta_bridge_pending_bytes {pending}"
    );
    assert!(
        pending <= (2 << 20) as f64 + 2.0 * 1024.0 * 1024.0,
        "pending bytes over the bound (plus one event): {pending}"
    );
    assert!(peak_sales < BOUND_MIB, "RSS {peak_sales:.1} MiB during the outage");

    // Then 50,000 dead letters are replayed into the outbox, still with the broker down.
    let replay = async {
        db.batch_execute(
            "INSERT INTO delta_bridge.dead_letter (id, captured_at, kind, op, merchant_code, branch_code,
                                                   product_name, old_row, new_row, items, ctx, reason, detail)
             SELECT nextval('delta_bridge.outbox_id_seq'), now(), 'stock', 'UPDATE', 'MCH-MST-001',
                    'BRN-MST-OSK00001', NULL,
                    json_build_object('id', 1, 'name', 'Product 1-1', 'stock', g, 'updated_by', 'replay'),
                    json_build_object('id', 1, 'name', 'Product 1-1', 'stock', g + 1, 'updated_by', 'replay'),
                    NULL, '{}'::json, 'rejected', 'test'
               FROM generate_series(1, 50000) g;
             SELECT delta_bridge.replay();",
        )
        .await
        .expect("replay");
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let peak_replay = peak_rss_during(pid, replay).await;
    eprintln!("bridge RSS: {peak_replay:.1} MiB at most with 50,000 replayed dead letters also waiting");
    assert!(peak_replay < BOUND_MIB, "RSS {peak_replay:.1} MiB during the replay");

    eprintln!("phases so far: {:?}", t0.elapsed());
    // The broker comes back: everything is delivered, nothing is left behind.
    tokio::task::block_in_place(|| env.mqtt.restart()).expect("broker restarts");
    let sub = Subscriber::start(&env.mqtt.url(), "device-memory", "dev/#").await;
    common::wait_outbox_empty(&db, Duration::from_secs(180)).await;
    assert_eq!(
        common::bridge_rows(&db, "dead_letter").await,
        0,
        "nothing dead-lettered"
    );
    eprintln!("all delivered after {:?}", t0.elapsed());
    sub.stop().await;
}
