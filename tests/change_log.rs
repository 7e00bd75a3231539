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
    eprintln!(
        "{} partitions, from {:?}; the events are in {holding:?}",
        before.len(),
        before.first()
    );
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
                "log empty and its partitions dropped {:?} after the last event; {} partitions now, from {:?}",
                written.elapsed(),
                parts.len(),
                parts.first()
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

/// A long read of the change log (a transaction holding it for seconds) does not stop publishing: the
/// partitions that cannot be created or dropped meanwhile are handled after it, and the leader keeps its
/// session throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_read_of_the_log_does_not_stop_publishing() {
    let env = Env::start("change-log-reader");
    let bridge = env.bridge_process_with(
        "a",
        &[
            ("DELTA_BRIDGE__CATCHUP__RETENTION", "1s"),
            ("DELTA_BRIDGE__CATCHUP__PARTITION_SPAN", "1s"),
        ],
    );
    common::wait_ready_at(&bridge.http, Duration::from_secs(30)).await;
    let db = env.client().await;
    let device = Subscriber::start(&env.mqtt.url(), "device-change-log-reader", "dev/#").await;
    db.batch_execute("UPDATE products SET stock = stock - 1 WHERE id = 1")
        .await
        .expect("write");
    device
        .wait_for(Duration::from_secs(20), "1 event", |m| !m.is_empty())
        .await;

    // A reader holds the log (and every partition it has) for 5 s: partitions expire and new ones are due.
    let mut reader = env.client().await;
    let tx = reader.transaction().await.expect("begin");
    tx.query("SELECT count(*) FROM delta_bridge.change_log", &[])
        .await
        .expect("read the log");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let before = device.count();
        let t = Instant::now();
        db.batch_execute(&format!("UPDATE products SET stock = stock - 1 WHERE id = {}", 2 + i))
            .await
            .expect("write");
        device
            .wait_for(Duration::from_secs(5), "the event", |m| m.len() > before)
            .await;
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the writes spanned the read"
    );
    tx.rollback().await.expect("end the read");
    eprintln!("slowest event while the log was held: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(1500),
        "published on, {slowest:?} at worst"
    );
    let log = env.log("a");
    assert!(log.contains("leader: publishing"), "the log is this bridge's:\n{log}");
    assert!(
        !log.contains("postgres session ended"),
        "the leader kept its session:\n{log}"
    );

    // Once the read is over, expired partitions go.
    let since = Instant::now();
    loop {
        let expired: i64 = db
            .query_one(
                "SELECT count(*) FROM delta_bridge.change_log_partitions WHERE upper_bound <= now() - interval '3 s'",
                &[],
            )
            .await
            .expect("expired")
            .get(0);
        if expired == 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{expired} expired partitions stay"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&bridge.http, "delta_bridge_leader ").await == Some(1.0));
    drop(bridge);
    device.stop().await;
}

/// Partition bounds do not depend on the session that runs the upkeep: with a DateStyle and TimeZone that
/// render timestamps ambiguously (`IST`), each partition still holds exactly [lower_bound, upper_bound) of its
/// bookkeeping, in UTC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_bounds_ignore_the_sessions_datestyle_and_timezone() {
    let env = Env::start("change-log-datestyle");
    let bridge = env.bridge().await; // installs the schema and the first partitions
    bridge.stop().await;
    let db = env.client().await;
    db.batch_execute(
        "DO $$ DECLARE p record; BEGIN
           FOR p IN SELECT name FROM delta_bridge.change_log_partitions LOOP
             EXECUTE format('DROP TABLE delta_bridge.%I', p.name);
           END LOOP;
         END $$;
         DELETE FROM delta_bridge.change_log_partitions;
         SET datestyle = 'Postgres'; SET timezone = 'Asia/Kolkata';
         SELECT * FROM delta_bridge.change_log_maintain(86400, '7 days', 3);
         RESET datestyle; SET timezone = 'UTC';",
    )
    .await
    .expect("upkeep in an odd session");
    let parts = db
        .query(
            "SELECT name, lower_bound, upper_bound FROM delta_bridge.change_log_partitions ORDER BY lower_bound",
            &[],
        )
        .await
        .expect("partitions");
    assert_eq!(parts.len(), 3);
    for p in &parts {
        let name: String = p.get(0);
        for bound in ["lower_bound", "upper_bound - interval '1 microsecond'"] {
            let holder: String = db
                .query_one(
                    &format!(
                        "WITH ins AS (INSERT INTO delta_bridge.change_log SELECT {bound}, 'M', 'B', 1, 1, 'e', 't', ''::bytea
                                        FROM delta_bridge.change_log_partitions WHERE name = $1
                                      RETURNING tableoid::regclass::text AS t)
                         SELECT t FROM ins"
                    ),
                    &[&name],
                )
                .await
                .expect("insert at the bound")
                .get(0);
            assert!(holder.ends_with(&name), "a row at {name}'s {bound} went to {holder}");
        }
        let midnight: bool = db
            .query_one(
                "SELECT lower_bound = date_trunc('day', lower_bound AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                   FROM delta_bridge.change_log_partitions WHERE name = $1",
                &[&name],
            )
            .await
            .expect("midnight")
            .get(0);
        assert!(midnight, "{name} starts at UTC midnight");
    }
}
