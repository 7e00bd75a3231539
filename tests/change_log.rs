//! The change log's retention: partitions are created ahead of the events and dropped whole once all of their
//! rows are older than `catchup.retention`; the age metric follows. With a retention of 3 s and partitions of
//! 2 s (`catchup.partition_span`, a day outside tests) so that this takes seconds, not days.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{metric, Env, Subscriber};
use delta_bridge::config::Config;

const AGE: &str = "delta_bridge_change_log_oldest_age_seconds ";

async fn partitions(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'delta_bridge.change_log'::regclass ORDER BY 1",
        &[],
    )
    .await
    .expect("partitions")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn logged(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM delta_bridge.change_log", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_partitions_are_dropped_whole_and_the_age_metric_follows() {
    let env = Env::start("change-log-retention");
    let toml = env.config_toml("[catchup]\nretention = \"3s\"\npartition_span = \"2s\"\n");
    let cfg = Config::parse(&toml, Path::new("test.toml"), &[]).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let db = env.client().await;
    let device = Subscriber::start(&env.mqtt.url(), "device-change-log", "dev/#").await;
    assert_eq!(metric(&bridge.http, AGE).await, Some(0.0), "0 while the log is empty");

    // Ten events, one every 100 ms.
    for i in 0..10 {
        db.batch_execute(&format!(
            "UPDATE products SET stock = stock - 1 WHERE id = {}",
            1 + i % 3
        ))
        .await
        .expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = Instant::now();
    device
        .wait_for(Duration::from_secs(20), "10 events", |m| m.len() >= 10)
        .await;
    common::wait_outbox_empty(&db, Duration::from_secs(20)).await;
    assert_eq!(logged(&db).await, 10, "every published event is logged");
    let holding: Vec<String> = db
        .query(
            "SELECT DISTINCT tableoid::regclass::text FROM delta_bridge.change_log",
            &[],
        )
        .await
        .expect("holding")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let before = partitions(&db).await;
    eprintln!("partitions {before:?}; the events are in {holding:?}");
    assert!(before.len() >= 3, "created ahead: {before:?}");

    // The age metric shows the events' age (refreshed every couple of seconds).
    let seen = loop {
        let age = metric(&bridge.http, AGE).await.expect("age metric");
        if age > 0.5 {
            break age;
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the age metric stays at {age}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(seen < 3.0 + 2.0 + 3.0, "at most retention + span + refresh: {seen}");

    // Retention 3 s, partitions of 2 s: at most ~5 s after the last event (plus a refresh), the log is empty,
    // the partitions that held it are gone, and no row was deleted one by one (a partition that still
    // exists never lost a row: only whole partitions went).
    loop {
        let n = logged(&db).await;
        let parts = partitions(&db).await;
        if n == 0 && holding.iter().all(|h| !parts.iter().any(|p| h.ends_with(p.as_str()))) {
            eprintln!(
                "log empty and its partitions dropped {:?} after the last event; partitions now {parts:?}",
                written.elapsed()
            );
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(12),
            "{n} rows left, partitions {parts:?}, held in {holding:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deleted: i64 = db
        .query_one(
            "SELECT coalesce(sum(n_tup_del), 0)::bigint FROM pg_stat_user_tables
              WHERE schemaname = 'delta_bridge' AND relname LIKE 'change_log%'
                AND relname <> 'change_log_partitions'",
            &[],
        )
        .await
        .expect("stats")
        .get(0);
    assert_eq!(deleted, 0, "no per-row DELETE on the log");
    let since = Instant::now();
    loop {
        if metric(&bridge.http, AGE).await == Some(0.0) {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "the age metric returns to 0 once the log is empty"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still publishing and logging into the partitions made ahead.
    db.batch_execute("UPDATE products SET stock = stock - 1 WHERE id = 5")
        .await
        .expect("write");
    device
        .wait_for(Duration::from_secs(20), "11 events", |m| m.len() >= 11)
        .await;
    common::wait_outbox_empty(&db, Duration::from_secs(20)).await;
    assert_eq!(logged(&db).await, 1);
    bridge.stop().await;
    device.stop().await;
}
