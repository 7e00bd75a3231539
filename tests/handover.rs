//! A replica whose leading session ends and that takes the lead again goes on where it stopped only if no
//! other replica led in between, which it reads from the heartbeat row (`delta_bridge.leader`): still its own
//! last beat, it keeps its term (its tracker, and what its publisher set aside); anything else, a new term.
//! The bridge runs as a real process; between its two leads the test holds the leader lock itself, so that
//! what the row holds when the bridge comes back is decided here: untouched (a session that held the lock
//! without leading, as a squatter would), or rewritten as another replica's heartbeat.

mod common;

use std::time::{Duration, Instant};

use common::{lock_holder, metric, BridgeProcess, Env, Subscriber};
use delta_bridge::LEADER_LOCK;

/// The log lines of the bridge's leads, in order.
fn leads(env: &Env, tag: &str) -> Vec<String> {
    env.log(tag)
        .lines()
        .filter(|l| l.contains("leader: publishing"))
        .map(str::to_string)
        .collect()
}

/// A log line's `term` field, as the text or the JSON format writes it.
fn term_of(line: &str) -> Option<u64> {
    let at = line
        .find("\"term\":")
        .map(|i| i + 7)
        .or_else(|| line.find("term=").map(|i| i + 5))?;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ends the bridge's leading session and takes the leader lock in its place (the bridge comes back after
/// its reconnect backoff and then polls every 250 ms; the test polls faster). Returns the session holding it.
async fn cut_in(env: &Env, db: &tokio_postgres::Client) -> tokio_postgres::Client {
    let mine = env.client().await;
    let leader = lock_holder(db).await.expect("the bridge leads");
    let ended: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&leader])
        .await
        .expect("terminate")
        .get(0);
    assert!(ended, "the leader's session was terminated");
    let start = Instant::now();
    loop {
        let got: bool = mine
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            .await
            .expect("lock")
            .get(0);
        if got {
            return mine;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the bridge took the lock back before the test could"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn release(lock: tokio_postgres::Client) {
    let released: bool = lock
        .query_one("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK])
        .await
        .expect("unlock")
        .get(0);
    assert!(released);
}

async fn delivered(db: &tokio_postgres::Client, sub: &Subscriber, stock: i32) {
    db.execute("UPDATE products SET stock = $1 WHERE id = 1", &[&stock])
        .await
        .expect("write");
    sub.wait_for(Duration::from_secs(15), "the change", |m| {
        m.iter()
            .any(|x| x.payload["data"]["product_id"] == 1 && x.payload["data"]["new_stock"] == stock)
    })
    .await;
}

async fn leads_again(env: &Env, bridge: &BridgeProcess, db: &tokio_postgres::Client, n: usize) -> String {
    wait_until(Duration::from_secs(15), "the bridge leads again", || async {
        leads(env, "a").len() >= n
            && lock_holder(db).await.is_some()
            && metric(&bridge.http, "delta_bridge_leader ").await == Some(1.0)
    })
    .await;
    leads(env, "a").pop().expect("a lead")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leading_again_goes_on_in_the_same_term_only_if_no_other_replica_led_meanwhile() {
    let env = Env::start("handover");
    let bridge = env.bridge_process("a");
    common::wait_ready_at(&bridge.http, Duration::from_secs(30)).await;
    let db = env.client().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-handover", "dev/#").await;
    let first = leads_again(&env, &bridge, &db, 1).await;
    assert_eq!(term_of(&first), Some(1), "{first}");
    delivered(&db, &sub, 101).await;

    // 1. The session ends; something that is not a leader holds the lock a while; the row is untouched.
    let lock = cut_in(&env, &db).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    release(lock).await;
    let second = leads_again(&env, &bridge, &db, 2).await;
    assert_eq!(term_of(&second), Some(1), "the same term: {second}");
    assert!(second.contains("no other replica led since"), "{second}");
    delivered(&db, &sub, 102).await;

    // 2. The session ends, and the row then shows another replica's heartbeat, as one that led leaves it.
    let lock = cut_in(&env, &db).await;
    let rewritten = lock
        .execute(
            "UPDATE delta_bridge.leader
                SET pid = pg_backend_pid(), replica = 'another-replica', since = clock_timestamp(),
                    heartbeat_at = clock_timestamp()",
            &[],
        )
        .await
        .expect("heartbeat as another replica");
    assert_eq!(rewritten, 1);
    release(lock).await;
    let third = leads_again(&env, &bridge, &db, 3).await;
    assert_eq!(term_of(&third), Some(2), "a new term: {third}");
    assert!(!third.contains("no other replica led since"), "{third}");
    delivered(&db, &sub, 103).await;

    common::wait_outbox_empty(&db, Duration::from_secs(10)).await;
    sub.stop().await;
    drop(bridge);
}
