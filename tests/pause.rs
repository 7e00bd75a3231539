//! When the broker refuses the bridge's own account on every topic (an ACL slip: the rule says `dev/#` and
//! `env` no longer matches, or the role lost its publish right), publishing pauses and alerts instead of
//! dead-lettering the backlog one PUBACK 0x87 at a time, and resumes by itself when the rights come back:
//! nothing lost, nothing dead-lettered, each row's events in order. A real Mosquitto with the
//! dynamic-security plugin; the bridge role's ACL is changed with `mosquitto_ctrl` while the bridge runs.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::dynsec::{self, ctrl, BRIDGE_PASSWORD};
use common::{metric, Env, InProcessBridge, Received, Subscriber};
use delta_bridge::config::Config;

const WATCHER_PASSWORD: &str = "watcher-secret";
const PAUSED: &str = "delta_bridge_publishing_paused ";

/// Mosquitto 2.0.11 with `max_queued_messages 0` (the harness's setting) closes an MQTT 5 client's connection
/// right after refusing its QoS 1 publish with PUBACK 0x87 (see tests/provisioning.rs). A large finite bound
/// (the last setting wins) keeps the connection, so the refusals reach the bridge.
const QUEUE_BOUND: &str = "max_queued_messages 1000000\n";

/// PostgreSQL and a Mosquitto that authenticates through dynamic security only; the bridge may publish under
/// `dev/#`, the watcher may subscribe to it.
fn dynsec_env(tag: &str, broker_extra: &'static str) -> Env {
    let env = dynsec::env(tag, broker_extra);
    for args in [
        vec!["createClient", "watcher", "-p", WATCHER_PASSWORD],
        vec!["createRole", "watcher"],
        vec!["addRoleACL", "watcher", "subscribePattern", "dev/#", "allow"],
        vec!["addClientRole", "watcher", "watcher"],
    ] {
        ctrl(&env, &args);
    }
    env
}

async fn dead_letters(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT id, reason, detail FROM delta_bridge.dead_letter ORDER BY id",
        &[],
    )
    .await
    .expect("dead letters")
    .iter()
    .map(|r| {
        format!(
            "{} {} {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2)
        )
    })
    .collect()
}

/// How many times the bridge connected to the broker so far, as the broker logged it.
fn bridge_connections(env: &Env) -> usize {
    std::fs::read_to_string(env.mqtt.dir().join("mosquitto.log"))
        .expect("mosquitto.log")
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(" as bridge-"))
        .count()
}

/// The row an event is about: its stream and id.
fn row(m: &Received) -> (String, i64) {
    let d = &m.payload["data"];
    match m.payload["event_type"].as_str() {
        Some("quantity_updated") => ("inventory".into(), d["inventory_id"].as_i64().expect("inventory_id")),
        Some(t) => (t.into(), d["product_id"].as_i64().expect("product_id")),
        None => panic!("no event_type: {}", m.payload),
    }
}

/// The bridge logged in as its own account, a watcher subscribed to `dev/#`, and a database client.
async fn start(env: &Env) -> (InProcessBridge, Subscriber, tokio_postgres::Client) {
    let secrets: Vec<(String, String)> = [
        ("DELTA_BRIDGE__MQTT__USERNAME", "bridge"),
        ("DELTA_BRIDGE__MQTT__PASSWORD", BRIDGE_PASSWORD),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = Config::parse(&env.config_toml(""), Path::new("test.toml"), &secrets).expect("config");
    let bridge = env.bridge_with(cfg).await;
    let sub = Subscriber::start_as(&env.mqtt.url(), "watcher", "dev/#", Some(("watcher", WATCHER_PASSWORD))).await;
    let db = env.client().await;
    assert_eq!(metric(&bridge.http, PAUSED).await, Some(0.0), "exposed from start-up");
    assert_eq!(
        metric(&bridge.http, "delta_bridge_outbox_oldest_age_seconds ").await,
        Some(0.0),
        "exposed from start-up, 0 with an empty outbox"
    );
    (bridge, sub, db)
}

async fn wait_paused(bridge: &InProcessBridge, paused: bool, limit: Duration, db: &tokio_postgres::Client) {
    let start = Instant::now();
    loop {
        if metric(&bridge.http, PAUSED).await == Some(f64::from(u8::from(paused))) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "delta_bridge_publishing_paused not {} within {limit:?}; dead letters: {:?}",
            u8::from(paused),
            dead_letters(db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scenario(tag: &str, broker_extra: &'static str) {
    let env = dynsec_env(tag, broker_extra);
    let (bridge, sub, db) = start(&env).await;

    // The account works: one change goes through.
    db.batch_execute("UPDATE products SET stock = 1 WHERE id = 1")
        .await
        .expect("write");
    sub.wait_for(Duration::from_secs(20), "the first change", |m| m.len() == 1)
        .await;

    // The bridge's role loses its publish right, then ~20 changes land on four topics: two branches of the
    // first merchant, the product and inventory streams of the second; products 3/4 and 25, 50 and inventory
    // row 45 change several times each; five transactions.
    ctrl(
        &env,
        &["removeRoleACL", "bridge-publisher", "publishClientSend", "dev/#"],
    );
    for round in 0..5 {
        db.batch_execute(&format!(
            "UPDATE products SET stock = stock - 1 WHERE id = {};
             UPDATE products SET stock = stock - 1 WHERE id = 25;
             UPDATE inventory SET quantity = quantity + 1 WHERE id = 45;
             UPDATE products SET stock = stock - 1 WHERE id = 50;",
            3 + round % 2
        ))
        .await
        .expect("writes commit: the bridge never fails a business write");
    }
    let written = Instant::now();

    // Paused within ~10 s of the refusals, and not one event dead-lettered meanwhile.
    loop {
        let dead = dead_letters(&db).await;
        assert!(
            dead.is_empty(),
            "{} of the backlog dead-lettered {:?} after the refusals began (a refusal of the account on every \
             topic must pause, not dead-letter):\n{}",
            dead.len(),
            written.elapsed(),
            dead.join("\n")
        );
        if metric(&bridge.http, PAUSED).await == Some(1.0) {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "delta_bridge_publishing_paused not 1 within 10 s of the refusals"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("paused {:?} after the writes", written.elapsed());

    // While paused: no storm (the broker sees at most one probe per 10 s, held refusals barely move), still
    // nothing dead-lettered, nothing delivered, everything still in the outbox.
    let held = |text: &str| common::sample(text, "delta_bridge_publish_failures_total{reason=\"held\"}");
    let connection = |text: &str| common::sample(text, "delta_bridge_publish_failures_total{reason=\"connection\"}");
    tokio::time::sleep(Duration::from_secs(2)).await; // the refusals of what was in flight at the pause
    let before = common::scrape(&bridge.http).await;
    let connections_before = bridge_connections(&env);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = common::scrape(&bridge.http).await;
    let probes = held(&after).expect("held") - held(&before).expect("held");
    let lost = connection(&after).expect("connection") - connection(&before).expect("connection");
    let reconnects = bridge_connections(&env) - connections_before;
    eprintln!(
        "over 12 s paused: {probes} refusals, {reconnects} reconnects ({lost} with events in flight); \
         held in all: {:?}; connections before: {connections_before}",
        held(&after)
    );
    assert!(
        probes <= 2.0,
        "at most one probe per 10 s while paused: {probes} refusals in 12 s"
    );
    assert!(reconnects <= 2, "no reconnect storm while paused: {reconnects} in 12 s");
    assert_eq!(common::sample(&after, PAUSED), Some(1.0), "still paused");
    // The backlog's age keeps growing while it waits (refreshed every 2 s by the leader, database clock).
    let age = common::sample(&after, "delta_bridge_outbox_oldest_age_seconds ").expect("oldest age exposed");
    let waited = written.elapsed().as_secs_f64();
    eprintln!("oldest outbox row {age:.1} s old after {waited:.1} s paused");
    assert!(
        age >= waited - 3.0 && age <= waited + 30.0,
        "delta_bridge_outbox_oldest_age_seconds {age} while the oldest row has waited about {waited:.1} s"
    );
    assert!(dead_letters(&db).await.is_empty());
    assert_eq!(sub.count(), 1, "nothing delivered while the account may not publish");
    assert_eq!(
        common::bridge_rows(&db, "outbox").await,
        20,
        "the backlog waits in the outbox"
    );

    // The right comes back: every event arrives within 60 s, in order per row, and the pause ends.
    ctrl(
        &env,
        &["addRoleACL", "bridge-publisher", "publishClientSend", "dev/#", "allow"],
    );
    let restored = Instant::now();
    let msgs = sub
        .wait_for(
            Duration::from_secs(60),
            "the whole backlog after the ACL is restored",
            |m| {
                m.iter()
                    .map(|x| x.payload["event_id"].as_str().unwrap_or("").to_string())
                    .collect::<HashSet<_>>()
                    .len()
                    >= 21
            },
        )
        .await;
    eprintln!("backlog delivered {:?} after the ACL was restored", restored.elapsed());
    loop {
        let text = common::scrape(&bridge.http).await;
        if common::sample(&text, PAUSED) == Some(0.0)
            && common::bridge_rows(&db, "outbox").await == 0
            && common::sample(&text, "delta_bridge_outbox_oldest_age_seconds ") == Some(0.0)
        {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(60),
            "not resumed 60 s after the ACL was restored:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dead_letters(&db).await.is_empty(), "nothing dead-lettered");

    // Per-row order: each row's first deliveries in seq order.
    let mut seen = HashSet::new();
    let mut last: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for m in &msgs {
        if !seen.insert(m.payload["event_id"].as_str().expect("event_id").to_string()) {
            continue;
        }
        let seq = m.payload["seq"].as_i64().expect("seq");
        let key = row(m);
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(prev < seq, "{key:?}: seq {seq} arrived after {prev}");
        }
    }
    assert_eq!(seen.len(), 21);
    let rows: Vec<_> = last.keys().collect();
    assert_eq!(rows.len(), 6, "{rows:?}");

    sub.stop().await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_refused_on_every_topic_pauses_and_resumes_when_its_right_returns() {
    scenario("paused", QUEUE_BOUND).await;
}

/// The same with a broker that closes the connection right after each refusal (Mosquitto 2.0.11 with
/// `max_queued_messages 0`, the harness's setting): the refusals are still seen, the pause still comes, and
/// while paused the reconnects send nothing but the probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_when_the_broker_disconnects_after_each_refusal() {
    scenario("paused-dc", "").await;
}

/// A burst of refusals on a topic the broker forbids (the second merchant), with nothing accepted in between,
/// looks like a refused account and pauses publishing; the next probe, a change on another topic, is
/// accepted, which ends the pause, and the burst is dead-lettered (each event refused again after that
/// success) while the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_forbidden_topic_pauses_until_another_topic_is_accepted_then_is_dead_lettered() {
    let env = dynsec_env("burst", QUEUE_BOUND);
    ctrl(
        &env,
        &["removeRoleACL", "bridge-publisher", "publishClientSend", "dev/#"],
    );
    ctrl(
        &env,
        &[
            "addRoleACL",
            "bridge-publisher",
            "publishClientSend",
            "dev/MCH-MST-001/#",
            "allow",
        ],
    );
    let (bridge, sub, db) = start(&env).await;
    for _ in 0..4 {
        db.batch_execute("UPDATE products SET stock = stock - 1 WHERE id = 50")
            .await
            .expect("write");
    }
    wait_paused(&bridge, true, Duration::from_secs(10), &db).await;
    assert!(dead_letters(&db).await.is_empty(), "nothing dead-lettered while paused");
    let paused = Instant::now();

    db.batch_execute("UPDATE products SET stock = 7 WHERE id = 3")
        .await
        .expect("write");
    sub.wait_for(Duration::from_secs(30), "the change on an allowed topic", |m| {
        m.iter().any(|x| x.payload["data"]["product_id"] == 3)
    })
    .await;
    eprintln!("allowed change delivered {:?} after the pause", paused.elapsed());
    wait_paused(&bridge, false, Duration::from_secs(5), &db).await;
    // An event of the burst that was still waiting in the pipeline when the pause began is taken only after the
    // resume: its first refusal then comes after the success, so it is held until the next success (a lone
    // refusal cannot tell a refused topic from a refused account). One more accepted change gives it that.
    db.batch_execute("UPDATE products SET stock = 8 WHERE id = 3")
        .await
        .expect("write");
    let start = Instant::now();
    let dead = loop {
        let dead = dead_letters(&db).await;
        if dead.len() >= 4 {
            break dead;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the burst not dead-lettered: {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.contains(" rejected ") && d.contains("NotAuthorized")),
        "{dead:?}"
    );
    assert!(!sub.snapshot().iter().any(|x| x.payload["data"]["product_id"] == 50));
    sub.stop().await;
    bridge.stop().await;
}
