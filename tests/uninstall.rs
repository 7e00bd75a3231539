//! Removing the bridge and installing it again: `uninstall` refuses while a replica leads, takes capture off
//! the business tables (exit 0, again and again), and with `--drop-schema` drops the bridge's schema after
//! saying what is in it; after any reinstall every new event's `seq` is above every `seq` published before.
//! And a binary refuses a schema newer than it knows.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Subscriber};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

/// Runs `delta-bridge --config <env's config> ARGS` to its end (at most `limit`); returns the exit code and
/// what it printed (stdout, then stderr).
async fn cli(env: &Env, tag: &str, args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let config = env.dir.join("cli.toml");
    std::fs::write(&config, env.config_toml("")).expect("config");
    let (out, err) = (env.dir.join(format!("{tag}.out")), env.dir.join(format!("{tag}.err")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_delta-bridge"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::fs::File::create(&err).expect("err"))
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    (code, format!("{}{}", read(&out), read(&err)))
}

async fn count(db: &Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn capture_triggers(db: &Client) -> i64 {
    count(db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'delta_bridge_%'").await
}

/// The `seq` of the event for product `id`'s stock `stock`, once received.
async fn seq_of(sub: &Subscriber, id: i64, stock: i64) -> (i64, String) {
    let msgs = sub
        .wait_for(WAIT, &format!("product {id} stock {stock}"), |m| {
            m.iter()
                .any(|x| x.payload["data"]["product_id"] == id && x.payload["data"]["new_stock"] == stock)
        })
        .await;
    let m = msgs
        .iter()
        .find(|x| x.payload["data"]["product_id"] == id && x.payload["data"]["new_stock"] == stock)
        .expect("received");
    (
        m.payload["seq"].as_i64().expect("seq"),
        m.payload["event_id"].as_str().expect("event_id").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_refuses_while_a_replica_leads_removes_capture_and_a_reinstall_keeps_seq_rising() {
    let env = Env::start("uninstall");
    let db = env.client().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-uninstall", "dev/#").await;
    let mut a = env.bridge_process("a");
    common::wait_ready_at(&a.http, Duration::from_secs(30)).await;
    for (id, stock) in [(3i64, 11i32), (4, 12), (3, 13)] {
        db.execute("UPDATE products SET stock = $2 WHERE id = $1", &[&id, &stock])
            .await
            .expect("update");
    }
    let (old_max, old_event) = seq_of(&sub, 3, 13).await;
    let published_max = sub
        .snapshot()
        .iter()
        .filter_map(|m| m.payload["seq"].as_i64())
        .max()
        .expect("events");
    assert_eq!(published_max, old_max, "the last update has the highest seq");

    // While replica a leads, uninstall refuses and changes nothing.
    let (code, out) = cli(&env, "refused", &["uninstall"], WAIT).await;
    eprintln!("uninstall while a replica leads: {out}");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("leader lock") && out.contains("leading"), "{out}");
    assert_eq!(capture_triggers(&db).await, common::CAPTURE_TRIGGERS);

    // Stopped: uninstall removes every capture trigger, and changes are no longer captured.
    assert_eq!(a.terminate(), Some(0), "{}", env.log("a"));
    let (code, out) = cli(&env, "uninstall", &["uninstall"], WAIT).await;
    eprintln!("uninstall: {out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("removed the capture triggers from public.products"),
        "{out}"
    );
    assert_eq!(capture_triggers(&db).await, 0);
    let before = count(&db, "SELECT count(*) FROM delta_bridge.outbox").await;
    db.execute("UPDATE products SET stock = 99 WHERE id = 5", &[])
        .await
        .expect("update");
    assert_eq!(
        count(&db, "SELECT count(*) FROM delta_bridge.outbox").await,
        before,
        "not captured"
    );
    let (code, out) = cli(&env, "uninstall-again", &["uninstall"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing to remove"), "{out}");

    // Installed again (schema kept): capture is back, and the sequence goes on.
    let (code, out) = cli(&env, "reattach", &["migrate"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("attached capture triggers on public.products"), "{out}");
    assert_eq!(capture_triggers(&db).await, common::CAPTURE_TRIGGERS);
    db.execute("UPDATE products SET stock = 14 WHERE id = 3", &[])
        .await
        .expect("update");
    let kept_seq = count(&db, "SELECT max(id) FROM delta_bridge.outbox").await;
    assert!(kept_seq > old_max, "{kept_seq} > {old_max}");

    // Dropped: it says what goes, then the schema is gone; again, nothing to do.
    let (code, out) = cli(&env, "drop", &["uninstall", "--drop-schema"], WAIT).await;
    eprintln!("uninstall --drop-schema: {out}");
    assert_eq!(code, Some(0), "{out}");
    let said = out.find("dropping schema delta_bridge").expect("says what it drops");
    let dropped = out.find("dropped schema delta_bridge").expect("drops it");
    assert!(said < dropped, "{out}");
    for what in ["outbox: ", "dead_letter", "devices", "device_events"] {
        assert!(out[said..dropped].contains(what), "{what} in {out}");
    }
    assert!(out.contains("removed the capture triggers"), "{out}");
    assert_eq!(capture_triggers(&db).await, 0);
    let schema = count(&db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'delta_bridge'").await;
    assert_eq!(schema, 0, "schema dropped");
    let (code, out) = cli(&env, "drop-again", &["uninstall", "--drop-schema"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing to drop"), "{out}");

    // A new install: every new event's seq is above every seq published before.
    let b = env.bridge_process("b");
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;
    db.execute("UPDATE products SET stock = 15 WHERE id = 3", &[])
        .await
        .expect("update");
    let (new_seq, new_event) = seq_of(&sub, 3, 15).await;
    eprintln!("before the reinstall: seq up to {old_max} ({old_event}); after: {new_seq} ({new_event})");
    assert!(
        new_seq > old_max && new_seq > kept_seq,
        "{new_seq} > {old_max}, {kept_seq}"
    );
    assert!(new_seq < 1 << 53, "a JSON number stays exact");
    assert_ne!(
        new_event.split('-').next(),
        old_event.split('-').next(),
        "a new install_id"
    );
    drop(b);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_migrating_refuses_a_schema_older_than_it_needs() {
    let env = Env::start("older");
    let db = env.client().await;
    let (code, out) = cli(&env, "install", &["migrate"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    // As if an older version had installed it: this version's last migration not applied.
    let all = common::migrations();
    let known = *all.last().expect("migrations");
    // The one before it (numbers may skip: a migration number can be taken by a branch not merged yet).
    let previous = all[all.len() - 2];
    db.execute(
        "DELETE FROM delta_bridge.schema_migrations WHERE version = $1",
        &[&known],
    )
    .await
    .expect("older schema");
    let (code, out) = cli(&env, "run-no-migrate", &["run", "--no-migrate"], WAIT).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("at migration {previous}")) && out.contains("delta-bridge migrate"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_refuses_a_schema_newer_than_it_knows() {
    let env = Env::start("newer");
    let db = env.client().await;
    let (code, out) = cli(&env, "install", &["migrate"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    // As if a newer delta-bridge had applied its next migration, then a rollback deployed this one; and
    // removed a trigger, which this version would attach again if it went ahead.
    let known = *common::migrations().last().expect("migrations");
    db.batch_execute(&format!(
        "INSERT INTO delta_bridge.schema_migrations (version, name) VALUES ({}, 'from a newer version');
         DROP TRIGGER delta_bridge_capture_ins ON products;",
        known + 1
    ))
    .await
    .expect("newer schema");
    for (tag, args) in [
        ("migrate", &["migrate"][..]),
        ("run", &["run"][..]),
        ("run-no-migrate", &["run", "--no-migrate"][..]),
    ] {
        let (code, out) = cli(&env, tag, args, WAIT).await;
        eprintln!("{}: {}", args.join(" "), out.lines().last().unwrap_or_default());
        assert_eq!(code, Some(1), "{tag}: {out}");
        assert!(
            out.contains(&format!("at migration {}", known + 1))
                && out.contains(&format!("(up to {known})"))
                && out.contains("Rolling back"),
            "{tag}: {out}"
        );
    }
    assert_eq!(
        capture_triggers(&db).await,
        common::CAPTURE_TRIGGERS - 1,
        "nothing attached"
    );
    // The way back that docs/deployment.md describes: uninstall --drop-schema, then install this version.
    let (code, out) = cli(&env, "drop", &["uninstall", "--drop-schema"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cli(&env, "reinstall", &["migrate"], WAIT).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("applied migrations {:?}", common::migrations())),
        "{out}"
    );
    assert_eq!(capture_triggers(&db).await, common::CAPTURE_TRIGGERS);
}
