//! What operators rely on: dead letters that do not block and can be replayed, readiness that follows the
//! connections, the metrics, config errors that exit 2 naming the key, idempotent migrations, SIGTERM.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{metric, Env, Subscriber};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_delta-bridge"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconvertible_rows_are_dead_lettered_without_blocking_and_can_be_replayed() {
    let env = Env::start("dead");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-dead", "dev/#").await;
    let db = env.client().await;

    // A branch code with '/' cannot be a topic level (it would let a row write into another topic): the
    // bridge cannot convert that change. The change behind it is published all the same.
    db.batch_execute(
        "UPDATE branches SET code = 'BAD/CODE' WHERE id = 2;
         UPDATE products SET stock = 7 WHERE id = 21;
         UPDATE products SET stock = 8 WHERE id = 2;",
    )
    .await
    .expect("writes commit: the bridge never fails a business write");
    let msgs = sub
        .wait_for(WAIT, "the change behind the bad one", |m| {
            m.iter().any(|x| x.payload["data"]["product_id"] == 2)
        })
        .await;
    assert!(
        !msgs.iter().any(|x| x.payload["data"]["product_id"] == 21),
        "the bad row is not published"
    );

    let start = Instant::now();
    let row = loop {
        if let Some(r) = db
            .query_opt("SELECT id, reason, detail FROM delta_bridge.dead_letter", &[])
            .await
            .expect("q")
        {
            break r;
        }
        assert!(start.elapsed() < WAIT, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (id, reason, detail): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(reason, "unconvertible");
    assert!(detail.contains("branch code"), "the detail says why: {detail}");
    // Nothing stuck in the outbox: the bad row moved out, and the acknowledged one is deleted (in batches,
    // within milliseconds of its PUBACK).
    common::wait_outbox_empty(&db, Duration::from_secs(5)).await;

    // A transaction id that is not an id does not cost the devices their stock change: published with null.
    db.batch_execute(
        "BEGIN; SELECT set_config('delta_bridge.transaction_id', 'TRX-001', true);
         UPDATE products SET stock = 9 WHERE id = 3; COMMIT;",
    )
    .await
    .expect("write");
    let msgs = sub
        .wait_for(WAIT, "product 3", |m| {
            m.iter().any(|x| x.payload["data"]["product_id"] == 3)
        })
        .await;
    let m3 = msgs.iter().find(|x| x.payload["data"]["product_id"] == 3).expect("p3");
    assert_eq!(m3.payload["data"]["transaction_id"], Value::Null);

    // The operator fixes the branch and the captured row, and replays: it arrives with its original seq.
    db.batch_execute(
        "UPDATE branches SET code = 'BRN-MST-OSK00002' WHERE id = 2;
         UPDATE delta_bridge.dead_letter SET branch_code = 'BRN-MST-OSK00002';
         SELECT delta_bridge.replay();",
    )
    .await
    .expect("replay");
    let msgs = sub
        .wait_for(WAIT, "the replayed event", |m| {
            m.iter().any(|x| x.payload["data"]["product_id"] == 21)
        })
        .await;
    let m = msgs
        .iter()
        .find(|x| x.payload["data"]["product_id"] == 21)
        .expect("replayed");
    assert_eq!(m.topic, "dev/MCH-MST-001/BRN-MST-OSK00002/product/updates");
    assert_eq!(m.payload["seq"], json!(id));
    assert_eq!(m.payload["data"]["new_stock"], 7);
    let dead: i64 = db
        .query_one("SELECT count(*) FROM delta_bridge.dead_letter", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(dead, 0);

    let metrics = common::scrape(&bridge.http).await;
    assert!(
        metrics.contains("delta_bridge_publish_failures_total{reason=\"unconvertible\"} 1"),
        "{metrics}"
    );
    sub.stop().await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_is_dead_lettered_and_does_not_block() {
    let dir = common::temp_dir("acl");
    let mqtt_dir = dir.join("mqtt");
    std::fs::create_dir_all(&mqtt_dir).expect("dir");
    // Anonymous clients may publish only under the first merchant: the bridge's publish for merchant 2 gets
    // PUBACK 0x87 (MQTT 5).
    std::fs::write(
        mqtt_dir.join("acl"),
        "topic readwrite dev/MCH-MST-001/#\ntopic read dev/#\n",
    )
    .expect("acl");
    let mut env = Env::start("refused");
    env.mqtt.stop(true);
    env.mqtt = delta_harness::servers::Mosquitto::start_with(
        &mqtt_dir,
        &format!("allow_anonymous true\nacl_file {}/acl\n", mqtt_dir.display()),
    )
    .expect("broker with acl");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-acl", "dev/#").await;
    let db = env.client().await;
    // Product 41 belongs to branch 3, merchant MCH-OTHER-002; product 5 to merchant 1.
    db.batch_execute("UPDATE products SET stock = 1 WHERE id = 41; UPDATE products SET stock = 2 WHERE id = 5;")
        .await
        .expect("writes");
    sub.wait_for(WAIT, "the allowed change", |m| {
        m.iter().any(|x| x.payload["data"]["product_id"] == 5)
    })
    .await;
    let start = Instant::now();
    let (reason, detail): (String, String) = loop {
        if let Some(r) = db
            .query_opt("SELECT reason, detail FROM delta_bridge.dead_letter", &[])
            .await
            .expect("q")
        {
            break (r.get(0), r.get(1));
        }
        assert!(start.elapsed() < WAIT, "refused event never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reason, "rejected");
    assert!(detail.contains("NotAuthorized"), "{detail}");
    assert!(!sub.snapshot().iter().any(|x| x.payload["data"]["product_id"] == 41));
    bridge.stop().await;
    drop(env);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_connections_and_metrics_exist_from_start() {
    let mut env = Env::start("ready");
    let bridge = env.bridge().await;
    let get = |path: &'static str| {
        let url = format!("{}{path}", bridge.http);
        async move { reqwest::get(url).await.expect("http") }
    };
    assert_eq!(get("/healthz").await.status(), 200);
    assert_eq!(get("/readyz").await.status(), 200);
    let text = get("/metrics").await.text().await.expect("body");
    for name in [
        "delta_bridge_events_published_total{stream=\"product\"} 0",
        "delta_bridge_publish_failures_total{reason=\"rejected\"} 0",
        "delta_bridge_end_to_end_latency_seconds_count{stream=\"transaction\"} 0",
        "delta_bridge_outbox_backlog 0",
        "delta_bridge_postgres_connected 1",
        "delta_bridge_mqtt_connected 1",
        "delta_bridge_leader 1",
        "delta_bridge_payload_bytes_count{stream=\"inventory\"} 0",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }

    // One event: counted, its latency and size observed.
    let sub = Subscriber::start(&env.mqtt.url(), "device-m", "dev/#").await;
    env.client()
        .await
        .batch_execute("UPDATE inventory SET quantity = 3 WHERE id = 2")
        .await
        .expect("write");
    sub.wait_for(WAIT, "event", |m| !m.is_empty()).await;
    let start = Instant::now();
    loop {
        let text = get("/metrics").await.text().await.expect("body");
        if text.contains("delta_bridge_events_published_total{stream=\"inventory\"} 1")
            && text.contains("delta_bridge_end_to_end_latency_seconds_count{stream=\"inventory\"} 1")
        {
            break;
        }
        assert!(start.elapsed() < WAIT, "metrics not updated:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sub.stop().await;

    // Broker gone: 503 within 10 s; back: 200 again.
    env.mqtt.stop(true);
    wait_status(&bridge.http, 503, Duration::from_secs(10)).await;
    tokio::task::block_in_place(|| env.mqtt.restart()).expect("broker back");
    wait_status(&bridge.http, 200, Duration::from_secs(15)).await;
    // Database gone: 503 within 10 s; back: 200 again.
    env.pg.stop(true);
    wait_status(&bridge.http, 503, Duration::from_secs(10)).await;
    tokio::task::block_in_place(|| env.pg.restart(false)).expect("postgres back");
    wait_status(&bridge.http, 200, Duration::from_secs(15)).await;
    bridge.stop().await;
}

async fn wait_status(http: &str, want: u16, limit: Duration) {
    let start = Instant::now();
    loop {
        let got = reqwest::get(format!("{http}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "/readyz still {got}, wanted {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_malformed_config_exits_2_naming_the_key() {
    let dir = common::temp_dir("cfg");
    let cases = [
        ("[mqtt]\nurl = \"http://broker\"\n", "mqtt.url"),
        ("[credentials]\nttl = \"a while\"\n", "credentials.ttl"),
        ("[postgress]\nurl = \"postgres://x\"\n", "postgress.url"),
        ("env = \"dev/x\"\n", "env"),
        ("[http\n", "not valid TOML"),
        ("[postgres]\npassword = \"hunter2\n", "line 2, column"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let out = bin()
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        assert!(err.contains(key), "{text:?}: message should name {key}: {err}");
        assert!(!err.contains("hunter2"), "{text:?}: a secret in the message: {err}");
        // `run` refuses the same config the same way, before touching anything.
        let out = bin().arg("run").arg("--config").arg(&path).output().expect("run");
        assert_eq!(out.status.code(), Some(2));
    }
    // An environment override is validated like the file.
    let out = bin()
        .arg("check-config")
        .env("DELTA_BRIDGE__MQTT__MAX_INFLIGHT", "lots")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt.max_inflight"));
    // A valid one prints the effective config with secrets redacted, as a config file: fed back (with the same
    // environment), it prints the same again.
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[postgres]\nurl = \"postgres://bridge:hunter2@db:5432/mstore\"\nconnect_timeout = \"1m30s\"\n\
         [mqtt]\nclient_id = \"bridge-a\"\n[http]\nadmin_token = \"admin-token-0123456789\"\n",
    )
    .expect("write");
    let check = |path: &std::path::Path| {
        let out = bin()
            .arg("--config")
            .arg(path)
            .arg("check-config")
            .env("DELTA_BRIDGE__MQTT__PASSWORD", "mqtt-secret")
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let text = check(&good);
    assert!(text.contains("postgres://bridge:redacted@db:5432/mstore"), "{text}");
    for secret in ["hunter2", "mqtt-secret", "admin-token-0123456789"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    for line in [
        "connect_timeout = \"1m30s\"",
        "# password: set by DELTA_BRIDGE__MQTT__PASSWORD, not printed",
        "# admin_token: set in the config file, not printed",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in {text}");
    }
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, &text).expect("write");
    let again = check(&printed);
    // The admin token was written in the file, so the printed config has none; all else is the same.
    assert_eq!(
        again,
        text.replace(
            "# admin_token: set in the config file, not printed",
            "# admin_token: not set"
        )
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_on_a_database_with_data_and_sigterm_exits_0() {
    let env = Env::start("migrate");
    let cfg = env.dir.join("c.toml");
    std::fs::write(&cfg, env.config_toml("")).expect("cfg");
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("migrate")
        .output()
        .expect("migrate");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let applied = format!("applied migrations {:?}", common::migrations());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&applied),
        "{applied} in {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("migrate")
        .output()
        .expect("migrate again");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
    let db = env.client().await;
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'delta_bridge_%'",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(triggers, common::CAPTURE_TRIGGERS, "capture triggers installed once");
    let products: i64 = db
        .query_one("SELECT count(*) FROM products", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(products, 60, "business data untouched");

    // A database without the reference schema: a clear error, exit 1.
    env.pg.psql("postgres", "CREATE DATABASE empty").expect("db");
    let out = bin()
        .arg("migrate")
        .env("DELTA_BRIDGE__POSTGRES__URL", env.pg.url("empty"))
        .output()
        .expect("migrate");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("public.merchants does not exist"));

    // SIGTERM: graceful shutdown, exit 0.
    let mut p = env.bridge_process("term");
    common::wait_ready_at(&p.http, Duration::from_secs(30)).await;
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publish_each_event_once_and_the_standby_takes_over() {
    let env = Env::start("replicas");
    let a = env.replica("replica-a").await;
    let b = env.replica("replica-b").await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-rep", "dev/#").await;
    let db = env.client().await;

    // Both ready (a connected standby serves the API); exactly one leads.
    let start = Instant::now();
    let (la, lb) = loop {
        let (la, lb) = (
            metric(&a.http, "delta_bridge_leader ").await,
            metric(&b.http, "delta_bridge_leader ").await,
        );
        if la.unwrap_or(0.0) + lb.unwrap_or(0.0) == 1.0 {
            break (la, lb);
        }
        assert!(start.elapsed() < WAIT, "no single leader: {la:?} {lb:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for r in [&a, &b] {
        assert_eq!(
            reqwest::get(format!("{}/readyz", r.http))
                .await
                .expect("readyz")
                .status(),
            200
        );
    }
    for i in 1..=100 {
        db.execute("UPDATE products SET stock = $1 WHERE id = 1 + ($1 % 20)", &[&i])
            .await
            .expect("write");
    }
    sub.wait_for(WAIT, "100 events", |m| m.len() >= 100).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sub.count(), 100, "each event exactly once with two replicas running");

    // Stop the leader: the standby takes over and publishes what comes next.
    let (leader, standby) = if la == Some(1.0) { (a, b) } else { (b, a) };
    let _ = lb;
    leader.stop().await;
    let stopped = Instant::now();
    db.execute("UPDATE products SET price = 99.99 WHERE id = 20", &[])
        .await
        .expect("write");
    sub.wait_for(Duration::from_secs(10), "the event after takeover", |m| m.len() >= 101)
        .await;
    eprintln!(
        "takeover + delivery after a graceful leader stop: {:?}",
        stopped.elapsed()
    );
    assert_eq!(metric(&standby.http, "delta_bridge_leader ").await, Some(1.0));
    sub.stop().await;
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_started_before_its_database_waits_and_then_works() {
    let mut env = Env::start("late-db");
    env.pg.stop(false);
    let bridge = env.bridge_process("early");
    // Alive but not ready while the database is missing.
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{}/healthz", bridge.http)).await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(start.elapsed() < WAIT, "no /healthz while waiting for the database");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ready = reqwest::get(format!("{}/readyz", bridge.http)).await.expect("readyz");
    assert_eq!(ready.status(), 503);

    tokio::task::block_in_place(|| env.pg.restart(false)).expect("postgres comes up");
    common::wait_ready_at(&bridge.http, Duration::from_secs(20)).await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-late", "dev/#").await;
    env.client()
        .await
        .batch_execute("UPDATE products SET stock = 1 WHERE id = 1")
        .await
        .expect("write");
    sub.wait_for(WAIT, "the first event", |m| !m.is_empty()).await;
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_start_up_still_waits_for_the_database_exits_cleanly() {
    let mut env = Env::start("term-early");
    env.pg.stop(false);
    let mut bridge = env.bridge_process("early");
    // Up (serving /healthz) and retrying its migrations against the missing database.
    let start = Instant::now();
    while reqwest::get(format!("{}/healthz", bridge.http)).await.is_err() {
        assert!(start.elapsed() < WAIT, "no /healthz while waiting for the database");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let code = tokio::task::block_in_place(|| bridge.terminate());
    assert_eq!(code, Some(0), "a clean exit, not death by signal");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "exited {:?} after SIGTERM",
        asked.elapsed()
    );
}
