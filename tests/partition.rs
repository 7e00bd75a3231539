//! Network partitions of the leader replica, made with network namespaces and veth pairs the test builds
//! itself (tests/common/netns.rs): the leader runs inside a namespace (`ip netns exec`), reaching PostgreSQL
//! over one path and the broker over another, each a /30 in 10.231.0.0/16 that can be unplugged on its own;
//! a third path, never cut, carries the test's scrapes of its /metrics. The standby runs on the host. Both
//! servers also listen on the host ends of those paths.
//!
//! (a) The leader loses PostgreSQL (its broker path stays up): PostgreSQL must drop the vanished leader's
//!     session by itself (the bridge sets tcp_keepalives_* and tcp_user_timeout = 4 s on it), the standby
//!     takes the lock and publishes, and the cut-off ex-leader must not publish once it has been replaced.
//! (b) The leader loses the broker (its database path stays up).
//!
//! Where network namespaces cannot be made (no root, no iproute2) the tests fail, unless
//! `DELTA_BRIDGE_SKIP_NETNS=1` says to skip them (then they print SKIPPED and pass).
//!
//! A replaced ex-leader must not publish events; what it may still publish are the copies of its republish
//! window after it lost the broker (the broker may have lost them, and only it holds them), each counted on
//! its `delta_bridge_republished_copies_total`.
//!
//! Who publishes is read from the broker's own log (`log_type debug`: "Received PUBLISH from CLIENT_ID"),
//! each replica having its own MQTT client id. Each run under load asserts no loss, no phantom, per-row order
//! of first deliveries, byte-identical duplicates and a device state equal to the database.

mod common;

use std::time::{Duration, Instant};

use common::netns::Partitionable;
use common::{lock_holder, metric, BridgeProcess, Env, Placement, PublishLog};
use delta_harness::loadgen::{self, LoadOptions};
use delta_harness::servers::Mosquitto;
use delta_harness::stack::StackOptions;
use tokio_util::sync::CancellationToken;

/// How long after the new leader took over a publish by the ex-leader is still counted as a redelivery in
/// flight (read before the cut) rather than a second publisher.
const REDELIVERY_WINDOW: Duration = Duration::from_secs(1);

struct Setup {
    // Field order is drop order: replicas, then the servers, then the namespaces.
    leader: BridgeProcess,
    standby: BridgeProcess,
    publishes: PublishLog,
    env: Env,
    net: Partitionable,
}

/// The namespace with a `pg` and an `mqtt` path, servers listening on both, the leader inside the namespace
/// (waited for until it holds the lock) and a standby on the host. Where namespaces cannot be made: a
/// failure, or None (test skipped) if `DELTA_BRIDGE_SKIP_NETNS=1`.
async fn setup(tag: &str) -> Option<Setup> {
    let net = match Partitionable::create(&["pg", "mqtt"]) {
        Ok(n) => n,
        Err(why) if std::env::var("DELTA_BRIDGE_SKIP_NETNS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (DELTA_BRIDGE_SKIP_NETNS=1): {}", why.0);
            return None;
        }
        Err(why) => panic!(
            "network namespaces are needed for the partition tests and cannot be made here: {}; run as root \
             with iproute2, or set DELTA_BRIDGE_SKIP_NETNS=1 to skip them",
            why.0
        ),
    };
    let also = net.extra_listen();
    let broker_also = also.clone();
    let env = Env::start_with(StackOptions {
        listen_also: also,
        mqtt: Some(Box::new(move |d: &std::path::Path| {
            Mosquitto::start_on(d, "allow_anonymous true\nlog_type debug\n", &broker_also)
        })),
        ..StackOptions::new(tag)
    });
    let publishes = PublishLog::follow(env.mqtt.dir().join("mosquitto.log"));
    let at = Placement {
        netns: Some(net.ns.clone()),
        postgres: net.link("pg").host.to_string(),
        mqtt: net.link("mqtt").host.to_string(),
        http: net.link("mgmt").far.to_string(),
    };
    let leader = env.bridge_process_at("a", &at);
    common::wait_ready_at(&leader.http, Duration::from_secs(60)).await;
    let db = env.client().await;
    let start = Instant::now();
    while !(lock_holder(&db).await.is_some() && metric(&leader.http, "delta_bridge_leader ").await == Some(1.0)) {
        assert!(start.elapsed() < Duration::from_secs(10), "the first replica leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let standby = env.bridge_process("b");
    common::wait_ready_at(&standby.http, Duration::from_secs(60)).await;
    assert_eq!(metric(&standby.http, "delta_bridge_leader ").await, Some(0.0));
    Some(Setup {
        leader,
        standby,
        publishes,
        env,
        net,
    })
}

fn load_options(duration: Duration) -> LoadOptions {
    LoadOptions {
        rate: 60.0,
        duration,
        writers: 8,
        merchants: 2,
        branches: 2,
        products_per_branch: 40,
        grace: Duration::from_secs(90),
        progress: false,
        devices: 0,
        offline: 0.0,
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_cut_off_from_postgres_is_replaced_and_stops_publishing() {
    let Some(s) = setup("partition-pg").await else { return };
    let db = s.env.client().await;
    let target = s.env.load_target();
    let load = tokio::spawn(async move {
        loadgen::run(
            &target,
            &load_options(Duration::from_secs(30)),
            CancellationToken::new(),
        )
        .await
    });

    tokio::time::sleep(Duration::from_secs(8)).await;
    let backend = lock_holder(&db).await.expect("the leader holds the lock");
    let published_before = common::metric_sum(&s.leader.http, "delta_bridge_events_published_total").await;
    s.net.cut("pg");
    let cut = Instant::now();
    eprintln!("partition: leader <-> PostgreSQL cut (the leader's backend is {backend})");

    let (mut session_gone, mut lock_moved, mut standby_leads, mut standby_publishes, mut ex_demoted) =
        (None, None, None, None, None);
    while cut.elapsed() < Duration::from_secs(15) {
        let now = cut.elapsed();
        if session_gone.is_none() {
            let alive: i64 = db
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&backend])
                .await
                .expect("q")
                .get(0);
            if alive == 0 {
                session_gone = Some(now);
            }
        }
        if lock_moved.is_none() && lock_holder(&db).await.is_some_and(|h| h != backend) {
            lock_moved = Some(now);
        }
        if standby_leads.is_none() && metric(&s.standby.http, "delta_bridge_leader ").await == Some(1.0) {
            standby_leads = Some(now);
        }
        if standby_publishes.is_none()
            && s.publishes
                .snapshot()
                .iter()
                .any(|p| p.client_id == s.standby.client_id && p.at >= cut)
        {
            standby_publishes = Some(now);
        }
        if ex_demoted.is_none() && metric(&s.leader.http, "delta_bridge_leader ").await == Some(0.0) {
            ex_demoted = Some(now);
        }
        if session_gone.is_some()
            && lock_moved.is_some()
            && standby_leads.is_some()
            && standby_publishes.is_some()
            && ex_demoted.is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "after the cut: PostgreSQL dropped the leader's session after {}; the lock moved after {}; the standby \
         reports leading after {} and its first publish reached the broker after {}; the cut-off ex-leader \
         reports not leading after {}",
        secs(session_gone),
        secs(lock_moved),
        secs(standby_leads),
        secs(standby_publishes),
        secs(ex_demoted)
    );
    let took_over = cut
        + lock_moved
            .expect("the lock moved")
            .max(standby_leads.expect("the standby leads"));
    // Keep the partition a while, then heal it.
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(cut.elapsed())).await;
    let published_at_heal = common::metric_sum(&s.leader.http, "delta_bridge_events_published_total").await;
    s.net.heal("pg");
    eprintln!("partition healed after {:.1} s", cut.elapsed().as_secs_f64());

    let report = load.await.expect("load task").expect("load runs");
    eprintln!("{}", report.render());
    // After the heal the ex-leader is a standby: the new leader keeps the lock.
    common::wait_ready_at(&s.leader.http, Duration::from_secs(30)).await;
    assert_eq!(metric(&s.leader.http, "delta_bridge_leader ").await, Some(0.0));
    assert_eq!(metric(&s.standby.http, "delta_bridge_leader ").await, Some(1.0));
    let published_end = common::metric_sum(&s.leader.http, "delta_bridge_events_published_total").await;

    let copies = common::metric_sum(&s.leader.http, "delta_bridge_republished_copies_total").await;
    let publishes = s.publishes.snapshot();
    let by_ex: Vec<_> = publishes
        .iter()
        .filter(|p| p.client_id == s.leader.client_id && p.at > took_over)
        .collect();
    let late: Vec<_> = by_ex.iter().filter(|p| p.at > took_over + REDELIVERY_WINDOW).collect();
    eprintln!(
        "the ex-leader's publishes seen by the broker after the takeover: {} ({} later than {REDELIVERY_WINDOW:?} \
         after it); its events_published_total {published_before:?} before the cut, {published_at_heal:?} at \
         the heal, {published_end:?} at the end; its republished_copies_total {copies:?}",
        by_ex.len(),
        late.len()
    );
    // Its broker connection never broke: it has no copies to send, and nothing else may go.
    assert_eq!(copies, Some(0.0), "no broker connection was lost, so no copies");
    assert!(
        late.is_empty(),
        "the cut-off ex-leader kept publishing after it was replaced: {late:?}"
    );

    let session_gone = session_gone.expect("PostgreSQL drops the vanished leader's session");
    assert!(
        session_gone < Duration::from_secs(8),
        "tcp_user_timeout/keepalives: PostgreSQL drops a vanished leader's session in ~4 s, took {session_gone:?}"
    );
    assert!(
        took_over.duration_since(cut) < Duration::from_secs(9),
        "the standby takes over soon after PostgreSQL drops the session"
    );
    assert!(
        report.ops_committed > 1000,
        "the load really ran: {}",
        report.ops_committed
    );
    common::assert_nothing_lost_or_invented(&report);
}

/// Scenario (b): the leader loses the broker. Returns (takeover after the cut, first publish after the
/// heal); a takeover is required.
async fn leader_cut_off_from_the_broker(tag: &str, partition: Duration) -> Option<(Duration, Duration)> {
    let s = setup(tag).await?;
    let db = s.env.client().await;
    let target = s.env.load_target();
    let load = tokio::spawn(async move {
        loadgen::run(
            &target,
            &load_options(Duration::from_secs(35)),
            CancellationToken::new(),
        )
        .await
    });

    tokio::time::sleep(Duration::from_secs(8)).await;
    let backend = lock_holder(&db).await.expect("the leader holds the lock");
    s.net.cut("mqtt");
    let cut = Instant::now();
    eprintln!("partition: leader <-> broker cut for {partition:?}");
    let (mut mqtt_down, mut takeover, mut standby_publishes) = (None, None, None);
    while cut.elapsed() < partition {
        let now = cut.elapsed();
        if mqtt_down.is_none() && metric(&s.leader.http, "delta_bridge_mqtt_connected ").await == Some(0.0) {
            mqtt_down = Some(now);
        }
        if takeover.is_none()
            && lock_holder(&db).await.is_some_and(|h| h != backend)
            && metric(&s.standby.http, "delta_bridge_leader ").await == Some(1.0)
        {
            takeover = Some(now);
        }
        if standby_publishes.is_none()
            && s.publishes
                .snapshot()
                .iter()
                .any(|p| p.client_id == s.standby.client_id && p.at >= cut)
        {
            standby_publishes = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_before_heal = s
        .publishes
        .snapshot()
        .iter()
        .filter(|p| p.client_id == s.leader.client_id)
        .map(|p| p.at)
        .max();
    // Its events acknowledged so far (copies are not counted there): none may be added once it is replaced.
    let published_at_heal = common::metric_sum(&s.leader.http, "delta_bridge_events_published_total").await;
    s.net.heal("mqtt");
    let healed = Instant::now();
    eprintln!(
        "during the partition: the leader noticed the broker gone after {}; takeover after {}; the standby's \
         first publish after {}; the leader's last publish seen by the broker {} after the cut",
        secs(mqtt_down),
        secs(takeover),
        secs(standby_publishes),
        secs(last_before_heal.map(|t| t.saturating_duration_since(cut)))
    );
    let mut resumed = None;
    while healed.elapsed() < Duration::from_secs(60) {
        if s.publishes.snapshot().iter().any(|p| p.at > healed) {
            resumed = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed.expect("publishing resumes after the heal");
    eprintln!("publishing resumed {:.2} s after the heal", resumed.as_secs_f64());

    let report = load.await.expect("load task").expect("load runs");
    eprintln!("{}", report.render());
    let t = takeover.expect("a standby that reaches the broker takes over while the leader cannot");
    // A replaced ex-leader publishes no event later than the window after the takeover: only the copies of
    // its republish window, which it sends at its first CONNACK after the heal although it does not lead.
    let took_over = cut + t;
    let copies = common::metric_sum(&s.leader.http, "delta_bridge_republished_copies_total").await;
    let late: Vec<_> = s
        .publishes
        .snapshot()
        .into_iter()
        .filter(|p| p.client_id == s.leader.client_id && p.at > took_over + REDELIVERY_WINDOW)
        .collect();
    let after_heal = late.iter().filter(|p| p.at > healed).count();
    eprintln!(
        "the ex-leader's publishes after the takeover: {} ({after_heal} after the heal); its \
         republished_copies_total {copies:?}",
        late.len()
    );
    let copies = copies.expect("the copies counter is exposed");
    assert!(
        copies > 0.0,
        "the ex-leader lost its broker connection under load: the events acknowledged in the window before the \
         cut go again at its next CONNACK, though another replica leads"
    );
    assert!(after_heal > 0, "the broker saw the ex-leader's copies after the heal");
    assert!(
        late.len() as f64 <= copies,
        "the ex-leader published {} times after it was replaced, more than its {copies} copies: it kept \
         publishing events",
        late.len()
    );
    let published_end = common::metric_sum(&s.leader.http, "delta_bridge_events_published_total").await;
    eprintln!(
        "the ex-leader's events_published_total: {published_at_heal:?} at the heal, {published_end:?} at the end"
    );
    assert!(
        published_at_heal.is_some(),
        "the ex-leader's metrics were readable during the partition"
    );
    assert_eq!(
        published_end, published_at_heal,
        "the replaced ex-leader had events acknowledged after the heal: it published events, not only copies"
    );
    assert!(
        report.ops_committed > 1000,
        "the load really ran: {}",
        report.ops_committed
    );
    common::assert_nothing_lost_or_invented(&report);
    Some((t, resumed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_cut_off_from_the_broker_loses_nothing() {
    let Some((takeover, resumed)) = leader_cut_off_from_the_broker("partition-mqtt", Duration::from_secs(15)).await
    else {
        return;
    };
    // A 15 s cut: the leader gives up the lead 10 s after it last heard from the broker, and a standby that
    // reaches the broker takes over; what is printed says when.
    eprintln!(
        "broker partition of 15 s: takeover after {:.2} s, publishing resumed {:.2} s after the heal",
        takeover.as_secs_f64(),
        resumed.as_secs_f64()
    );
}

/// A 20 s cut: the leader gives up the lead 10 s after it last heard from the broker, a standby takes over,
/// and after the heal the ex-leader sends no event (it set aside what it had not had acknowledged when its
/// lead ended, and drops it for good when it sees that another replica led), only its window's copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_when_the_leader_cannot_reach_the_broker() {
    let Some((takeover, _)) = leader_cut_off_from_the_broker("partition-mqtt-takeover", Duration::from_secs(20)).await
    else {
        return;
    };
    assert!(takeover < Duration::from_secs(15), "took {takeover:?}");
}
