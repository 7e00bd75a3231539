//! Installing on a live point-of-sale database: writers keep going at full rate (single-row updates of
//! products, sales with their items) while `delta-bridge migrate` installs everything, and no writer
//! statement waits long behind it, also while another transaction holds a row of `products` for 8 s. The
//! migration still completes (trying again until the long transaction is over), and capture works after it.
//! A concurrent index build that fails leaves no invalid index behind.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Env;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// A writer statement: when it started and how long it took.
type Timed = (Instant, Duration);

/// Far below the 8 s a holder keeps its row: a writer may queue behind one try of a migration step (at most
/// `postgres.ddl_lock_timeout`, 1 s), never behind the holder.
const WRITER_WAIT_LIMIT: Duration = Duration::from_secs(3);

/// The config file `migrate` runs with.
fn config_file(env: &Env) -> PathBuf {
    let path = env.dir.join("migrate.toml");
    std::fs::write(&path, env.config_toml("")).expect("config");
    path
}

fn migrate_cmd(config: &PathBuf, vars: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_delta-bridge"));
    c.arg("--config")
        .arg(config)
        .arg("migrate")
        .env("RUST_LOG", "info")
        .envs(vars.iter().copied())
        .stdin(Stdio::null());
    c
}

/// Runs `migrate` to its end on a blocking thread (the writers keep the runtime busy meanwhile).
async fn migrate(config: &PathBuf, vars: &[(&str, &str)]) -> (Output, Duration) {
    let mut c = migrate_cmd(config, vars);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || c.output().expect("migrate"))
        .await
        .expect("join");
    (out, started.elapsed())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writers at full rate: `updaters` connections updating single products (ids 2..=60: row 1 is the
/// holder's), `sellers` connections inserting sales with two items each. Every statement is timed.
struct Writers {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Vec<Timed>>>,
}

impl Writers {
    async fn start(env: &Env, updaters: usize, sellers: usize) -> Writers {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for w in 0..updaters {
            let (db, stop) = (env.client().await, stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut timed = Vec::new();
                let mut n = w as i64;
                while !stop.is_cancelled() {
                    let id = 2 + n % 59;
                    n += 1;
                    let at = Instant::now();
                    db.execute("UPDATE products SET stock = stock + 1 WHERE id = $1", &[&id])
                        .await
                        .expect("a writer's update never fails");
                    timed.push((at, at.elapsed()));
                }
                timed
            }));
        }
        for w in 0..sellers {
            let (mut db, stop) = (env.client().await, stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut timed = Vec::new();
                let mut n = 0i64;
                while !stop.is_cancelled() {
                    n += 1;
                    sell(&mut db, &format!("LIVE-{w}-{n}"), 2 + n % 59, &mut timed).await;
                }
                timed
            }));
        }
        Writers { stop, tasks }
    }

    async fn stop(self) -> Vec<Timed> {
        self.stop.cancel();
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("writer"));
        }
        all
    }
}

/// One sale with two items, each statement timed (the commit runs the capture triggers, once attached).
async fn sell(db: &mut Client, code: &str, product: i64, timed: &mut Vec<Timed>) {
    let at = Instant::now();
    let tx = db.transaction().await.expect("begin");
    let id: i64 = tx
        .query_one(
            "INSERT INTO transactions (branch_id, transaction_code, status, grand_total)
             VALUES (1, $1, 'paid', 20) RETURNING id",
            &[&code],
        )
        .await
        .expect("sale")
        .get(0);
    timed.push((at, at.elapsed()));
    let at = Instant::now();
    tx.execute(
        "INSERT INTO transaction_items (transaction_id, product_id, quantity, price)
         VALUES ($1, $2, 1, 10), ($1, $2, 1, 10)",
        &[&id, &product],
    )
    .await
    .expect("items");
    timed.push((at, at.elapsed()));
    let at = Instant::now();
    tx.commit().await.expect("commit");
    timed.push((at, at.elapsed()));
}

/// The longest statement that overlapped `[from, to]`, and how many did.
fn longest_during(timed: &[Timed], from: Instant, to: Instant) -> (Duration, usize) {
    let during: Vec<Duration> = timed
        .iter()
        .filter(|(at, took)| *at <= to && *at + *took >= from)
        .map(|(_, took)| *took)
        .collect();
    (during.iter().copied().max().unwrap_or_default(), during.len())
}

/// Capture is complete and works: every trigger, the index valid, every migration, and an update lands
/// in the outbox.
async fn assert_capture_works(db: &Client) {
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'delta_bridge_%'",
            &[],
        )
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, common::CAPTURE_TRIGGERS, "every capture trigger attached");
    let valid: bool = db
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.delta_bridge_items_by_sale'::regclass",
            &[],
        )
        .await
        .expect("index")
        .get(0);
    assert!(valid, "the index is valid");
    let versions: Vec<i32> = db
        .query("SELECT version FROM delta_bridge.schema_migrations ORDER BY 1", &[])
        .await
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, common::migrations());
    db.execute("UPDATE products SET stock = 424242 WHERE id = 7", &[])
        .await
        .expect("update");
    let captured: i64 = db
        .query_one(
            "SELECT count(*) FROM delta_bridge.outbox WHERE kind = 'stock' AND (new_row->>'stock')::int = 424242",
            &[],
        )
        .await
        .expect("outbox")
        .get(0);
    assert_eq!(captured, 1, "the update is captured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_at_full_rate_barely_wait_while_two_replicas_migrate() {
    let env = Env::start("mig-live");
    let db = env.client().await;
    let config = config_file(&env);
    let writers = Writers::start(&env, 4, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Two replicas migrate at once: one installs, the other waits for the migration lock and finds it done.
    let from = Instant::now();
    let (a, b) = tokio::join!(migrate(&config, &[]), migrate(&config, &[]));
    let to = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let timed = writers.stop().await;
    for (out, _) in [&a, &b] {
        assert_eq!(out.status.code(), Some(0), "{}", text(out));
    }
    let outputs = format!("{}{}", text(&a.0), text(&b.0));
    assert_eq!(
        outputs
            .matches(&format!("applied migrations {:?}", common::migrations()))
            .count(),
        1,
        "{outputs}"
    );
    assert!(outputs.contains("database objects are up to date"), "{outputs}");

    let (longest, n) = longest_during(&timed, from, to);
    eprintln!(
        "migrate took {:?} / {:?}; {n} writer statements during it, the longest {longest:?}",
        a.1, b.1
    );
    assert!(n > 20, "the writers ran during the migration: {n} statements");
    assert!(longest < WRITER_WAIT_LIMIT, "a writer waited {longest:?}");
    assert_capture_works(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_held_for_8s_makes_migrate_retry_not_the_writers_wait() {
    let env = Env::start("mig-held");
    let db = env.client().await;
    let config = config_file(&env);
    let writers = Writers::start(&env, 4, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // An ordinary transaction holds a row of products for 8 s.
    let holder = env.client().await;
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    holder
        .batch_execute("BEGIN; UPDATE products SET updated_by = 'long report' WHERE id = 1")
        .await
        .expect("holder");
    let held_from = Instant::now();
    let holder = Arc::new(holder);
    let release = {
        let holder = holder.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            holder.batch_execute("COMMIT").await.expect("commit");
            Instant::now()
        })
    };

    // With a 3 s deadline migrate gives up, naming the table and the holder.
    let from = Instant::now();
    let (out, took) = migrate(&config, &[("DELTA_BRIDGE__POSTGRES__DDL_DEADLINE", "3s")]).await;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("delta-bridge: "))
        .unwrap_or_default();
    eprintln!("migrate with a 3 s deadline gave up after {took:?}: {last}");
    assert!(last.contains("public.products"), "{log}");
    assert!(last.contains(&format!("pid {holder_pid} (user \"postgres\"")), "{log}");
    assert!(
        held_from.elapsed() < Duration::from_secs(8),
        "gave up while the row was still held"
    );

    // With the default deadline it tries again until the holder is done, and completes.
    let (out, took) = migrate(&config, &[]).await;
    let to = Instant::now();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let released = release.await.expect("holder");
    assert!(to > released, "completed only once the row was released");
    let retries = log
        .lines()
        .filter(|l| l.contains("could not lock the table") && l.contains(&format!("pid {holder_pid}")))
        .count();
    eprintln!("migrate completed after {took:?}, {retries} tries given up naming the holder");
    assert!(retries >= 1, "{log}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let timed = writers.stop().await;

    let (longest, n) = longest_during(&timed, from, to);
    eprintln!(
        "during both migrations ({:?}): {n} writer statements, the longest {longest:?} (the holder kept its row 8 s)",
        to - from
    );
    assert!(n > 20, "the writers ran during the migration: {n} statements");
    assert!(longest < WRITER_WAIT_LIMIT, "a writer waited {longest:?}");
    assert_capture_works(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_cut_short_leaves_no_invalid_index() {
    let env = Env::start("mig-index");
    let db = env.client().await;
    let config = config_file(&env);
    // A sale whose items are still being written: the concurrent build waits for it and times out, leaving
    // an invalid index.
    let holder = env.client().await;
    holder
        .batch_execute(
            "BEGIN;
             INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (500, 1, 'OPEN', 'open', 0);
             INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (500, 2, 1, 1);",
        )
        .await
        .expect("holder");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        holder.batch_execute("COMMIT").await.expect("commit");
    });
    let (out, took) = migrate(&config, &[]).await;
    release.await.expect("holder");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    eprintln!("migrate took {took:?}");
    assert!(log.contains("dropping the invalid index"), "{log}");
    assert_capture_works(&db).await;
}
