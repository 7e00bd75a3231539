//! The bridge's advisory locks and its own tasks, when something else goes wrong: a session that is not a live
//! bridge replica holds the leader lock (reported, with who holds it, within 10 s; a live leader is not
//! reported), a session holds the migration lock (`migrate` and `run` wait a bounded time, say who holds it,
//! and fail), and an internal task dies (the process exits non-zero and a standby takes over). Bridges run as
//! real processes: their logs and exit codes are what an operator sees.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::{metric, BridgeProcess, Env, Subscriber};
use delta_bridge::{LEADER_LOCK, MIGRATE_LOCK};

/// A session of some other program, as user `user` with `application_name` `app`.
struct Squatter {
    client: tokio_postgres::Client,
    pid: i32,
}

async fn squatter(env: &Env, user: &str, app: &str) -> Squatter {
    let url = env
        .pg_url()
        .replacen("postgres://postgres@", &format!("postgres://{user}@"), 1);
    let client = common::connect(&format!("{url}?application_name={app}")).await;
    let pid = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    Squatter { client, pid }
}

impl Squatter {
    async fn try_lock(&self, key: i64) -> bool {
        self.client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .expect("lock")
            .get(0)
    }
    async fn unlock(&self, key: i64) {
        let released: bool = self
            .client
            .query_one("SELECT pg_advisory_unlock($1)", &[&key])
            .await
            .expect("unlock")
            .get(0);
        assert!(released, "the lock was held");
    }
}

/// The backend holding the leader lock, from PostgreSQL's own lock table.
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

/// Waits until `cond` holds; panics naming `what` after `limit`. Returns how long it took.
async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the process to exit; returns its exit code and how long that took (panics after `limit`).
async fn wait_exit(p: &mut BridgeProcess, limit: Duration, what: &str) -> (Option<i32>, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().expect("try_wait") {
            return (status.code(), start.elapsed());
        }
        assert!(start.elapsed() < limit, "{what}: still running after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `delta_bridge_lock_squatter{lock="..."}` on the replica at `http`.
async fn squatted(http: &str, lock: &str) -> Option<f64> {
    metric(http, &format!("delta_bridge_lock_squatter{{lock=\"{lock}\"}} ")).await
}

async fn leader(http: &str) -> Option<f64> {
    metric(http, "delta_bridge_leader ").await
}

/// A log line that names the session: its pid, user and application_name (text or JSON logs).
fn names_holder(log: &str, pid: i32, user: &str, app: &str) -> bool {
    log.lines().any(|l| {
        [format!("\"pid\":{pid}"), format!("pid={pid}"), format!("pid {pid}")]
            .iter()
            .any(|p| l.contains(p.as_str()))
            && l.contains(user)
            && l.contains(app)
    })
}

fn signal(p: &BridgeProcess, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_squatting_the_leader_lock_is_reported_within_10s_and_a_live_leader_is_not() {
    let env = Env::start("squat");
    env.pg
        .psql(&env.db, "CREATE ROLE ops_alice LOGIN; CREATE ROLE ops_bob LOGIN")
        .expect("roles");
    let db = env.client().await;

    // Someone's psql session takes the leader lock before any replica runs.
    let s1 = squatter(&env, "ops_alice", "psql-ops").await;
    assert!(s1.try_lock(LEADER_LOCK).await);
    let a = env.bridge_process("a");
    // A connected standby is ready (the API serves), even though it cannot lead: the alert is the signal.
    common::wait_ready_at(&a.http, Duration::from_secs(30)).await;
    let took = wait_for(Duration::from_secs(10), "replica a reports the squatter", || async {
        squatted(&a.http, "leader").await == Some(1.0) && names_holder(&env.log("a"), s1.pid, "ops_alice", "psql-ops")
    })
    .await;
    eprintln!("squatter reported {took:?} after the replica was ready");
    assert_eq!(leader(&a.http).await, Some(0.0));
    assert_eq!(lock_holder(&db).await, Some(s1.pid));

    // A second one, calling itself "delta-bridge" (the bridge's own application_name), queues for the lock and
    // gets it when the first lets go: it is a squatter too, since it is not the replica that heartbeats.
    let s2 = squatter(&env, "ops_bob", "delta-bridge").await;
    let s2_pid = s2.pid;
    let queued = tokio::spawn(async move {
        s2.client
            .execute("SELECT pg_advisory_lock($1)", &[&LEADER_LOCK])
            .await
            .expect("lock");
        s2
    });
    wait_for(
        Duration::from_secs(5),
        "the second squatter waits for the lock",
        || async {
            db.query_one(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted",
                &[&s2_pid],
            )
            .await
            .expect("pg_locks")
            .get::<_, i64>(0)
                == 1
        },
    )
    .await;
    s1.unlock(LEADER_LOCK).await;
    let s2 = queued.await.expect("second squatter");
    assert_eq!(lock_holder(&db).await, Some(s2_pid));
    let took = wait_for(
        Duration::from_secs(10),
        "replica a reports the second squatter",
        || async { names_holder(&env.log("a"), s2_pid, "ops_bob", "delta-bridge") },
    )
    .await;
    eprintln!("second squatter reported after {took:?}");
    assert_eq!(squatted(&a.http, "leader").await, Some(1.0));

    // Once it lets go, the replica leads and no longer reports a squatter.
    s2.unlock(LEADER_LOCK).await;
    wait_for(Duration::from_secs(5), "replica a leads", || async {
        leader(&a.http).await == Some(1.0) && squatted(&a.http, "leader").await == Some(0.0)
    })
    .await;

    // A live leader replica is not a squatter: a standby beside it reports nothing.
    let b = env.bridge_process("b");
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            squatted(&b.http, "leader").await,
            Some(0.0),
            "a live leader reported as squatter"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!env.log("b").contains("squatter"), "{}", env.log("b"));

    // A leader replica that hangs (SIGSTOP: its session stays, it no longer heartbeats) is a squatter.
    let a_backend = lock_holder(&db).await.expect("a holds the leader lock");
    signal(&a, "-STOP");
    let took = wait_for(Duration::from_secs(10), "replica b reports the hung leader", || async {
        squatted(&b.http, "leader").await == Some(1.0)
            && names_holder(&env.log("b"), a_backend, "postgres", "delta-bridge")
    })
    .await;
    eprintln!("hung leader reported {took:?} after SIGSTOP");
    assert_eq!(leader(&b.http).await, Some(0.0));
    signal(&a, "-CONT");
    wait_for(
        Duration::from_secs(10),
        "the resumed leader is no longer reported",
        || async { squatted(&b.http, "leader").await == Some(0.0) },
    )
    .await;
    // SIGTERM is still a clean stop (exit 0), for a standby as for the leader.
    let (mut a, mut b) = (a, b);
    assert_eq!(b.terminate(), Some(0), "{}", env.log("b"));
    assert_eq!(a.terminate(), Some(0), "{}", env.log("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_migration_lock_is_reported_while_waiting_and_ends_migrate_and_run_with_an_error() {
    const LIMIT: &str = "DELTA_BRIDGE__POSTGRES__MIGRATE_LOCK_TIMEOUT";
    let env = Env::start("migrate-lock");
    env.pg.psql(&env.db, "CREATE ROLE ops_carol LOGIN").expect("role");
    let s = squatter(&env, "ops_carol", "reindex-job").await;
    assert!(s.try_lock(MIGRATE_LOCK).await);

    // With the default limit (60 s), `migrate` says who holds the lock while it waits.
    let mut m = env.bridge_command("m1", "migrate", &[]);
    let took = wait_for(
        Duration::from_secs(10),
        "migrate names the holder while waiting",
        || async { names_holder(&env.log("m1"), s.pid, "ops_carol", "reindex-job") },
    )
    .await;
    eprintln!("migrate named the holder after {took:?}");
    assert!(m.child.try_wait().expect("try_wait").is_none(), "still waiting");
    m.kill();

    // With a limit of 3 s it gives up: exit 1, with a message naming the holder.
    let mut m = env.bridge_command("m2", "migrate", &[(LIMIT, "3s")]);
    let (code, took) = wait_exit(&mut m, Duration::from_secs(15), "migrate with a 3 s limit").await;
    let log = env.log("m2");
    assert_eq!(code, Some(1), "{log}");
    assert!(took >= Duration::from_secs(3), "gave up after {took:?}");
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("delta-bridge: "))
        .unwrap_or_default();
    eprintln!("migrate: {last}");
    assert!(names_holder(last, s.pid, "ops_carol", "reindex-job"), "{log}");

    // `run` migrates first: the same limit, the holder on /metrics while it waits, then a final error (exit 1),
    // not a retry.
    let mut r = env.bridge_command("r", "run", &[(LIMIT, "6s")]);
    wait_for(
        Duration::from_secs(10),
        "run reports the migration lock's squatter",
        || async { squatted(&r.http, "migrate").await == Some(1.0) },
    )
    .await;
    let (code, _) = wait_exit(&mut r, Duration::from_secs(20), "run with a 6 s limit").await;
    let log = env.log("r");
    assert_eq!(code, Some(1), "{log}");
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("delta-bridge: "))
        .unwrap_or_default();
    assert!(names_holder(last, s.pid, "ops_carol", "reindex-job"), "{log}");

    // Once the holder lets go, migrating works.
    s.unlock(MIGRATE_LOCK).await;
    let mut m = env.bridge_command("m3", "migrate", &[(LIMIT, "3s")]);
    let (code, _) = wait_exit(&mut m, Duration::from_secs(30), "migrate").await;
    assert_eq!(code, Some(0), "{}", env.log("m3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_task_that_dies_ends_the_process_non_zero_and_a_standby_takes_over() {
    let env = Env::start("supervise");
    let db = env.client().await;
    let device = Subscriber::start(&env.mqtt.url(), "device-supervise", "dev/#").await;
    let name_is = |name: &'static str| {
        move |msgs: &[common::Received]| msgs.iter().any(|m| m.payload["data"]["product_name"] == name)
    };

    // Replica a leads; its pipeline task will panic (test-only fault injection, src/fault.rs).
    let mut a = env.bridge_command("a", "run", &[("DELTA_BRIDGE_FAULT", "pipeline:FAULT-IN-PIPELINE")]);
    common::wait_ready_at(&a.http, Duration::from_secs(30)).await;
    wait_for(Duration::from_secs(5), "replica a leads", || async {
        leader(&a.http).await == Some(1.0)
    })
    .await;
    let mut b = env.bridge_command("b", "run", &[("DELTA_BRIDGE_FAULT", "publisher:FAULT-IN-PUBLISHER")]);
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;

    db.execute("UPDATE products SET name = 'FAULT-IN-PIPELINE' WHERE id = 1", &[])
        .await
        .expect("update");
    let (code, took) = wait_exit(
        &mut a,
        Duration::from_secs(10),
        "replica a after its pipeline task died",
    )
    .await;
    eprintln!("replica a exited with {code:?} {took:?} after the fault");
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}\n{}", env.log("a"));
    let last = env
        .log("a")
        .lines()
        .rev()
        .find(|l| l.starts_with("delta-bridge: "))
        .map(str::to_string);
    eprintln!("replica a: {last:?}");
    assert!(env.log("a").contains("pipeline task died"), "{}", env.log("a"));
    wait_for(Duration::from_secs(10), "replica b leads", || async {
        leader(&b.http).await == Some(1.0)
    })
    .await;
    device
        .wait_for(
            Duration::from_secs(10),
            "the event the first leader died on",
            name_is("FAULT-IN-PIPELINE"),
        )
        .await;

    // Now the publisher task of the new leader panics.
    let c = env.bridge_process("c");
    common::wait_ready_at(&c.http, Duration::from_secs(30)).await;
    db.execute("UPDATE products SET name = 'FAULT-IN-PUBLISHER' WHERE id = 2", &[])
        .await
        .expect("update");
    let (code, took) = wait_exit(
        &mut b,
        Duration::from_secs(10),
        "replica b after its publisher task died",
    )
    .await;
    eprintln!("replica b exited with {code:?} {took:?} after the fault");
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}\n{}", env.log("b"));
    let last = env
        .log("b")
        .lines()
        .rev()
        .find(|l| l.starts_with("delta-bridge: "))
        .map(str::to_string)
        .unwrap_or_default();
    eprintln!("replica b: {last}");
    assert!(last.contains("publisher"), "{}", env.log("b"));
    wait_for(Duration::from_secs(10), "replica c leads", || async {
        leader(&c.http).await == Some(1.0)
    })
    .await;
    device
        .wait_for(
            Duration::from_secs(10),
            "the event the second leader died on",
            name_is("FAULT-IN-PUBLISHER"),
        )
        .await;
    db.execute("UPDATE products SET name = 'after the faults' WHERE id = 3", &[])
        .await
        .expect("update");
    device
        .wait_for(
            Duration::from_secs(10),
            "an event after the faults",
            name_is("after the faults"),
        )
        .await;
    let mut c = c;
    assert_eq!(c.terminate(), Some(0), "a clean stop still exits 0\n{}", env.log("c"));
    device.stop().await;
}
