//! `branch_seq`: per merchant+branch, every number from 1 to the latest belongs to exactly one event, an event
//! keeps its number on every redelivery, and numbers follow the order of publication, across a SIGKILL of the
//! leader and a failover to another replica, under concurrent writers on several branches; dead letters get
//! no number until they are published, and keep the one they had.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{lock_holder, metric, BridgeProcess, Env, Received, Subscriber};
use delta_harness::loadgen::{self, LoadOptions};
use tokio_util::sync::CancellationToken;

/// (merchant, branch) from `{env}/{merchant}/{branch}/{stream}/updates`.
fn branch_of(topic: &str) -> Branch {
    let levels: Vec<&str> = topic.split('/').collect();
    (levels[1].to_string(), levels[2].to_string())
}

/// The row an event is about: its stream and the row's id.
fn row_of(m: &Received) -> (String, i64) {
    let stream = m.topic.split('/').nth(3).unwrap_or_default().to_string();
    let key = match stream.as_str() {
        "product" => "product_id",
        "inventory" => "inventory_id",
        _ => "transaction_id",
    };
    (stream, m.payload["data"][key].as_i64().expect("row id"))
}

/// (merchant, branch).
type Branch = (String, String);
/// Per branch: event_id -> its number, and number -> event_id.
type Numbers = (HashMap<String, i64>, BTreeMap<i64, String>);
/// (merchant, branch, stream, row id).
type Row = (String, String, String, i64);
/// A change log row: merchant, branch, branch_seq, seq, topic, payload.
type Logged = (String, String, i64, i64, String, Vec<u8>);

fn number(m: &Received) -> i64 {
    m.payload["branch_seq"].as_i64().expect("branch_seq")
}

/// Waits until a backend other than `old` holds the leader lock and one of `replicas` says it leads.
async fn wait_leader(db: &tokio_postgres::Client, old: Option<i32>, replicas: &[&BridgeProcess]) -> usize {
    let since = Instant::now();
    loop {
        let holder = lock_holder(db).await;
        if holder.is_some() && holder != old {
            for (i, r) in replicas.iter().enumerate() {
                if metric(&r.http, "delta_bridge_leader ").await == Some(1.0) {
                    return i;
                }
            }
        }
        assert!(since.elapsed() < Duration::from_secs(10), "no replica took the lead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Numbers given out so far, over every branch (the sum of the counters).
async fn numbers_given(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(last_seq), 0)::bigint FROM delta_bridge.branch_counter",
        &[],
    )
    .await
    .expect("counters")
    .get(0)
}

/// What every branch's numbers must be, from the messages a device received (duplicates included), checked
/// against the counters in the database. Returns (branches, distinct events, first receipts that came after
/// a higher number of their branch, and when each of those arrived).
async fn check_numbers(db: &tokio_postgres::Client, msgs: &[Received]) -> (usize, usize, Vec<Instant>) {
    // Per branch: event_id -> its number (the same on every delivery), number -> event_id (one each).
    let mut by_branch: BTreeMap<Branch, Numbers> = BTreeMap::new();
    // First receipts, in arrival order, that were below the highest number already received in their branch.
    let mut late = Vec::new();
    let mut highest: HashMap<Branch, i64> = HashMap::new();
    // Per row: (seq, branch_seq) of its events; numbers must grow with seq.
    let mut rows: HashMap<Row, Vec<(i64, i64)>> = HashMap::new();
    let mut events = 0;
    for m in msgs {
        let branch = branch_of(&m.topic);
        let id = m.payload["event_id"].as_str().expect("event_id").to_string();
        let n = number(m);
        assert!(n >= 1, "branch_seq from 1: {}", m.payload);
        let (ids, numbers) = by_branch.entry(branch.clone()).or_default();
        match ids.get(&id) {
            Some(&earlier) => assert_eq!(earlier, n, "event {id} redelivered with another branch_seq"),
            None => {
                events += 1;
                ids.insert(id.clone(), n);
                if let Some(other) = numbers.insert(n, id.clone()) {
                    panic!("branch {branch:?}: branch_seq {n} given to two events, {other} and {id}");
                }
                let top = highest.entry(branch.clone()).or_insert(0);
                if n < *top {
                    late.push(m.at);
                }
                *top = (*top).max(n);
                let (stream, row) = row_of(m);
                rows.entry((branch.0.clone(), branch.1.clone(), stream, row))
                    .or_default()
                    .push((m.payload["seq"].as_i64().expect("seq"), n));
            }
        }
    }
    for ((merchant, branch), (_, numbers)) in &by_branch {
        let n = numbers.len() as i64;
        let expected: Vec<i64> = (1..=n).collect();
        let got: Vec<i64> = numbers.keys().copied().collect();
        assert!(
            got == expected,
            "{merchant}/{branch}: numbers are not 1..={n}: first missing {:?}",
            expected.iter().find(|k| !numbers.contains_key(k))
        );
        let last: i64 = db
            .query_one(
                "SELECT last_seq FROM delta_bridge.branch_counter WHERE merchant_code = $1 AND branch_code = $2",
                &[merchant, branch],
            )
            .await
            .expect("counter")
            .get(0);
        assert_eq!(last, n, "{merchant}/{branch}: every number given out was published");
    }
    let counters: i64 = db
        .query_one("SELECT count(*) FROM delta_bridge.branch_counter", &[])
        .await
        .expect("counters")
        .get(0);
    assert_eq!(
        counters as usize,
        by_branch.len(),
        "no branch numbered without publishing"
    );
    for (row, mut events) in rows {
        events.sort();
        assert!(
            events.windows(2).all(|w| w[0].1 < w[1].1),
            "row {row:?}: branch_seq does not follow seq: {events:?}"
        );
    }
    (by_branch.len(), events, late)
}

/// The change log holds exactly the events the device received, each once: the same payload bytes, topic,
/// branch, branch_seq, event_id and seq. Returns how many rows it holds.
pub async fn check_log(db: &tokio_postgres::Client, msgs: &[Received]) -> usize {
    let rows = db
        .query(
            "SELECT merchant_code, branch_code, branch_seq, seq, event_id, topic, payload FROM delta_bridge.change_log",
            &[],
        )
        .await
        .expect("change log");
    let mut log: HashMap<String, Logged> = HashMap::new();
    for r in &rows {
        let id: String = r.get(4);
        let prev = log.insert(id.clone(), (r.get(0), r.get(1), r.get(2), r.get(3), r.get(5), r.get(6)));
        assert!(prev.is_none(), "event {id} logged twice");
    }
    let mut carried = HashMap::new();
    for m in msgs {
        let id = m.payload["event_id"].as_str().expect("event_id");
        carried.entry(id).or_insert(m);
    }
    for (id, m) in &carried {
        let (merchant, branch) = branch_of(&m.topic);
        let Some((lm, lb, n, seq, topic, payload)) = log.get(*id) else {
            panic!("event {id} was published but is not in the change log: {}", m.payload)
        };
        assert_eq!((lm, lb), (&merchant, &branch), "event {id}: branch");
        assert_eq!(*n, number(m), "event {id}: branch_seq");
        assert_eq!(Some(*seq), m.payload["seq"].as_i64(), "event {id}: seq");
        assert_eq!(topic, &m.topic, "event {id}: topic");
        assert!(
            payload == &m.raw,
            "event {id}: the log's payload is not the bytes MQTT carried:\nlog:  {}\nmqtt: {}",
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&m.raw)
        );
    }
    assert_eq!(
        log.len(),
        carried.len(),
        "the log holds only events that were published"
    );
    log.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_branch_is_numbered_1_to_n_across_a_sigkill_and_a_failover() {
    let env = Env::start("bseq-ha");
    let db = env.client().await;
    let a = env.bridge_process("a");
    let b = env.bridge_process("b");
    common::wait_ready_at(&a.http, Duration::from_secs(30)).await;
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;
    let first = wait_leader(&db, None, &[&a, &b]).await;
    let mut replicas = [Some(a), Some(b)];
    let device = Subscriber::start(&env.mqtt.url(), "device-bseq", "dev/#").await;

    let target = env.load_target();
    let opts = LoadOptions {
        rate: 120.0,
        duration: Duration::from_secs(24),
        writers: 8,
        merchants: 2,
        branches: 3,
        products_per_branch: 30,
        grace: Duration::from_secs(60),
        progress: false,
        devices: 0,
        offline: 0.0,
    };
    let load = tokio::spawn(async move { loadgen::run(&target, &opts, CancellationToken::new()).await });
    let mut faults = Vec::new();

    // Fault 1: SIGKILL the leader mid-stream; the standby takes over; the killed one comes back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let old = lock_holder(&db).await;
    let mut leader = replicas[first].take().expect("leader");
    faults.push(Instant::now());
    leader.kill();
    let standby = replicas[1 - first].as_ref().expect("standby");
    wait_leader(&db, old, &[standby]).await;
    drop(leader);
    let restarted = env.bridge_process("c");
    common::wait_ready_at(&restarted.http, Duration::from_secs(30)).await;
    replicas[first] = Some(restarted);

    // Fault 2: the new leader loses its database session: failover to the restarted replica (or back).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let old = lock_holder(&db).await.expect("a leader holds the lock");
    faults.push(Instant::now());
    let terminated: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&old])
        .await
        .expect("terminate")
        .get(0);
    assert!(terminated);
    let live: Vec<&BridgeProcess> = replicas.iter().flatten().collect();
    wait_leader(&db, Some(old), &live).await;

    let report = load.await.expect("load task").expect("load runs");
    eprintln!("{}", report.render());
    assert!(
        report.ops_committed > 1500,
        "the load really ran: {}",
        report.ops_committed
    );
    common::assert_nothing_lost_or_invented(&report);
    common::wait_outbox_empty(&db, Duration::from_secs(30)).await;
    assert_eq!(
        common::bridge_rows(&db, "dead_letter").await,
        0,
        "nothing dead-lettered"
    );

    let msgs = device.snapshot();
    common::assert_duplicates_identical(&msgs);
    let (branches, events, late) = check_numbers(&db, &msgs).await;
    assert!(branches >= 6, "several branches: {branches}");
    // A number is first received after a higher one of its branch only when its event was numbered and in
    // flight at a fault, and the next leader published it again after numbering newer rows.
    for at in &late {
        assert!(
            faults.iter().any(|&f| *at >= f && *at <= f + Duration::from_secs(10)),
            "an event was first received after a higher branch_seq of its branch, outside any fault's window"
        );
    }
    eprintln!(
        "{} messages, {events} events in {branches} branches, each numbered 1..=n exactly once; {} first received after a higher number (all within a fault's window)",
        msgs.len(),
        late.len()
    );
    let logged = check_log(&db, &msgs).await;
    let bytes: i64 = db
        .query_one(
            "SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree('delta_bridge.change_log') WHERE isleaf",
            &[],
        )
        .await
        .expect("size")
        .get(0);
    let payload: i64 = db
        .query_one("SELECT sum(length(payload))::bigint FROM delta_bridge.change_log", &[])
        .await
        .expect("payload bytes")
        .get(0);
    eprintln!(
        "change log: {logged} rows, byte for byte what MQTT carried; {bytes} bytes on disk, {} per row ({} of payload)",
        bytes / logged.max(1) as i64,
        payload / logged.max(1) as i64
    );

    // The numbering refuses a session that does not hold the leader lock, and numbers nothing. The replicas
    // are stopped first: a running leader would number the write below itself (and move the counter).
    drop(replicas);
    let counters_before = numbers_given(&db).await;
    db.batch_execute("SET delta_bridge.no_wake = 'on'; UPDATE products SET stock = stock + 1 WHERE id = 1")
        .await
        .expect("write");
    let err = db
        .query(
            "SELECT * FROM delta_bridge.number_events(ARRAY(SELECT id FROM delta_bridge.outbox))",
            &[],
        )
        .await
        .expect_err("not the leader");
    assert!(
        err.to_string().contains("leader lock") || format!("{err:?}").contains("leader lock"),
        "{err:?}"
    );
    let counters_after = numbers_given(&db).await;
    assert_eq!(counters_after, counters_before, "a refused numbering moves no counter");
    device.stop().await;
}

/// A row that cannot be converted goes to the dead letters without a number (no hole in its branch) and is
/// numbered when it is replayed and published; a dead letter that has a number (an event the broker refused)
/// is published again with that number, byte for byte, and the counter does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_numbered_when_published_and_keep_their_number() {
    let env = Env::start("bseq-dead");
    let db = env.client().await;
    let device = Subscriber::start(
        &env.mqtt.url(),
        "device-bseq-dead",
        "dev/MCH-MST-001/BRN-MST-OSK00002/#",
    )
    .await;
    // The k-th product of branch 2 (MCH-MST-001/BRN-MST-OSK00002, see SAMPLE_DATA).
    let stock = |k: i64| {
        format!(
            "UPDATE products SET stock = stock - 1
              WHERE id = (SELECT id FROM products WHERE branch_id = 2 ORDER BY id OFFSET {k} LIMIT 1)"
        )
    };
    // Installed by a first run; then, with no bridge running, one change stays in the outbox: kept aside to
    // play a refused event later.
    env.bridge().await.stop().await;
    db.batch_execute(&stock(0)).await.expect("write");
    db.batch_execute("CREATE TABLE kept AS SELECT * FROM delta_bridge.outbox")
        .await
        .expect("keep");

    let bridge = env.bridge().await;
    db.batch_execute(&stock(1)).await.expect("write");
    device
        .wait_for(Duration::from_secs(20), "2 events", |m| m.len() >= 2)
        .await;
    // A row the bridge cannot convert (an unknown kind) on the same branch.
    db.batch_execute(
        "INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, ctx)
         VALUES ('nonsense', 'UPDATE', 'MCH-MST-001', 'BRN-MST-OSK00002',
                 json_build_object('id', 23, 'name', 'Product 2-3', 'price', 13, 'stock', 7), '{}'::json)",
    )
    .await
    .expect("bad row");
    common::wait_outbox_empty(&db, Duration::from_secs(20)).await;
    let dead: Option<i64> = db
        .query_one("SELECT branch_seq FROM delta_bridge.dead_letter", &[])
        .await
        .expect("one dead letter")
        .get(0);
    assert_eq!(dead, None, "an unconvertible row gets no number");
    db.batch_execute(&stock(3)).await.expect("write");
    let msgs = device
        .wait_for(Duration::from_secs(20), "3 events", |m| m.len() >= 3)
        .await;
    assert_eq!(
        msgs.iter().map(number).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "no hole for the dead letter"
    );

    // Repaired and replayed: published with the next number.
    db.batch_execute("UPDATE delta_bridge.dead_letter SET kind = 'product'; SELECT delta_bridge.replay()")
        .await
        .expect("replay");
    let msgs = device
        .wait_for(Duration::from_secs(20), "4 events", |m| m.len() >= 4)
        .await;
    assert_eq!(msgs[3].payload["event_type"], "product_updated");
    assert_eq!(number(&msgs[3]), 4, "numbered when published");

    // A dead letter with a number, as the bridge leaves an event the broker refused: the first event, with
    // its number 1. Replayed, it goes out again with 1, byte for byte, and the counter stays at 4.
    db.batch_execute(
        "INSERT INTO delta_bridge.dead_letter (id, captured_at, kind, op, merchant_code, branch_code, product_name,
                                               old_row, new_row, items, ctx, reason, detail, branch_seq)
         SELECT id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx,
                'rejected', 'refused by the broker (played by the test)', 1 FROM kept;
         SELECT delta_bridge.replay()",
    )
    .await
    .expect("replay the refused one");
    let msgs = device
        .wait_for(Duration::from_secs(20), "5 messages", |m| m.len() >= 5)
        .await;
    assert_eq!(
        msgs[4].raw, msgs[0].raw,
        "the same event, the same bytes, the same number"
    );
    common::wait_outbox_empty(&db, Duration::from_secs(20)).await;
    let last: i64 = db
        .query_one(
            "SELECT last_seq FROM delta_bridge.branch_counter WHERE branch_code = 'BRN-MST-OSK00002'",
            &[],
        )
        .await
        .expect("counter")
        .get(0);
    assert_eq!(last, 4);
    assert_eq!(
        check_log(&db, &msgs).await,
        4,
        "four events in the log; the replayed one once"
    );
    bridge.stop().await;
    device.stop().await;
}
