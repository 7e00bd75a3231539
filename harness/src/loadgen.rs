//! The load harness behind `delta-load`, `delta-bridge demo`, the benchmark and the fault test: writes a
//! realistic retail mix to PostgreSQL at a fixed open-loop rate, subscribes to the broker like a device, and
//! accounts for every event: written, received, lost, duplicated, out of order per row, phantom (from a
//! transaction that did not commit), and commit-to-receive latency. Latency starts at the COMMIT's scheduled
//! time (the operation's due time on the open-loop schedule plus its own statements), so a writer that falls
//! behind shows up as latency instead of silently sending later (no coordinated omission).
//!
//! Every write carries a marker (`L<run>-<op>` in `updated_by` or `transaction_code`) so a received event is
//! matched to the operation that caused it. Operations whose commit outcome is unknown (the connection broke
//! during COMMIT) are neither expected nor phantom. A [`Device`] model applies events the way an
//! offline-first app does (drop anything with a stale `seq` for its row) and is compared with the database.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use futures_util::future::BoxFuture;
use rumqttc::v5::MqttOptions;
use tokio_postgres::Client;

use crate::devices::{Api, BranchRef, Fleet, FleetOptions, FleetReport};
use crate::subscriber;

/// Merchant codes the harness writes to: `MCH-LOAD-000`, `MCH-LOAD-001`, ... Their branches share codes
/// (`BRN-LOAD-0000`, ...) across merchants, as real branch codes may, so topic scoping by merchant is exercised.
pub const LOAD_MERCHANT_PREFIX: &str = "MCH-LOAD-";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Database transactions per second (each a sale, restock, price change, ...).
    pub rate: f64,
    pub duration: Duration,
    /// Concurrent writer connections.
    pub writers: usize,
    pub merchants: usize,
    /// Branches per merchant.
    pub branches: usize,
    pub products_per_branch: usize,
    /// How long to wait for stragglers after the last write.
    pub grace: Duration,
    pub progress: bool,
    /// Simulated devices ([`crate::devices`]), spread over the branches; 0 for none. Needs [`Target::api`].
    pub devices: usize,
    /// Fraction of the simulated devices offline at any time.
    pub offline: f64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            rate: 100.0,
            duration: Duration::from_secs(60),
            writers: 8,
            merchants: 1,
            branches: 4,
            products_per_branch: 50,
            grace: Duration::from_secs(30),
            progress: std::io::stderr().is_terminal(),
            devices: 0,
            offline: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Sale,
    Restock,
    Price,
    Void,
    Aborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed,
    RolledBack,
    Unknown,
}

/// What an event is about, as the harness names it: (event letter, operation, row).
type Key = (char, u64, i64);

#[derive(Default)]
struct Ledger {
    /// Expected events of each operation, filled when the write is sent (outcome recorded after).
    expected: HashMap<u64, Vec<Key>>,
    outcome: HashMap<u64, Outcome>,
    /// When COMMIT was sent, per operation.
    committed_at: HashMap<u64, Instant>,
    /// Committed sales that may be voided later: (sale op).
    sales: Vec<u64>,
    written_ops: u64,
    failed_ops: u64,
}

#[derive(Clone, Debug)]
struct Got {
    key: Option<Key>,
    stream: &'static str,
    event_id: String,
    seq: i64,
    row: (char, i64),
    at: Instant,
    payload: Value,
    /// The payload's bytes as received (duplicates must repeat them exactly).
    raw: Vec<u8>,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct StreamReport {
    pub written: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub latency_ms: Latency,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct Report {
    pub rate: f64,
    pub duration_s: f64,
    pub streams: std::collections::BTreeMap<String, StreamReport>,
    /// Events received from transactions that did not commit (must be 0).
    pub phantom: u64,
    /// Must be 0: the rows where the listener's own device model (drop stale seq) disagrees with the database
    /// at the end, plus the simulated devices (`--devices`) whose final store differs from their branch's rows.
    pub device_mismatches: u64,
    /// Payloads received that do not match their event type's schema in docs/schemas (must be 0).
    pub schema_violations: u64,
    /// Redeliveries whose payload bytes differ from the first delivery of the same event_id (must be 0: a
    /// duplicate is the same event sent again, not a new rendering of it).
    pub duplicates_not_identical: u64,
    /// The first few of those (for diagnosis).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicates_not_identical_examples: Vec<String>,
    /// The first few first deliveries that arrived after a later change of the same row (for diagnosis).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub out_of_order_examples: Vec<String>,
    pub ops_committed: u64,
    pub ops_failed: u64,
    pub ops_unknown: u64,
    pub events_per_second: f64,
    /// The simulated devices (`--devices`): counts, gaps, catch-up latency.
    #[serde(flatten)]
    pub fleet: FleetReport,
}

impl Report {
    pub fn lost(&self) -> u64 {
        self.streams.values().map(|s| s.lost).sum()
    }
    pub fn received(&self) -> u64 {
        self.streams.values().map(|s| s.received).sum()
    }
    pub fn written(&self) -> u64 {
        self.streams.values().map(|s| s.written).sum()
    }
    pub fn duplicated(&self) -> u64 {
        self.streams.values().map(|s| s.duplicated).sum()
    }
    pub fn out_of_order(&self) -> u64 {
        self.streams.values().map(|s| s.out_of_order).sum()
    }

    /// A human summary, one line per stream.
    pub fn render(&self) -> String {
        let mut out = format!(
            "rate {:.0} tx/s for {:.0}s: {} ops committed, {} failed, {} unknown; {:.0} events/s\n",
            self.rate, self.duration_s, self.ops_committed, self.ops_failed, self.ops_unknown, self.events_per_second
        );
        out.push_str("stream       written  received  lost  dup  out_of_order   p50 ms   p90 ms   p99 ms   max ms\n");
        for (name, s) in &self.streams {
            out.push_str(&format!(
                "{name:<12} {:>7} {:>9} {:>5} {:>4} {:>13} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
                s.written,
                s.received,
                s.lost,
                s.duplicated,
                s.out_of_order,
                s.latency_ms.p50,
                s.latency_ms.p90,
                s.latency_ms.p99,
                s.latency_ms.max
            ));
        }
        out.push_str(&format!(
            "phantom events: {}   device/database mismatches: {}   payloads not matching their schema: {}   \
             duplicates not byte-identical to the first delivery: {}\n",
            self.phantom, self.device_mismatches, self.schema_violations, self.duplicates_not_identical
        ));
        if self.fleet.devices > 0 {
            let f = &self.fleet;
            out.push_str(&format!(
                "devices: {} ({} offline periods, {} snapshots, {} resyncs after 410), state differs from the database: {} \
                 devices ({} rows)\n\
                 gaps in branch_seq detected: {}, filled: {}; catch-up requests: {} ({} errors, {} busy, {} events fetched), \
                 p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
                f.devices,
                f.offline_periods,
                f.snapshots,
                f.resyncs,
                f.device_mismatches,
                f.device_mismatched_rows,
                f.gaps_detected,
                f.gaps_filled,
                f.catchup_requests,
                f.catchup_errors,
                f.catchup_busy,
                f.events_fetched,
                f.catchup_latency_ms.p50,
                f.catchup_latency_ms.p99,
                f.catchup_latency_ms.max
            ));
            for e in &f.errors {
                out.push_str(&format!("device error: {e}\n"));
            }
        }
        for e in &self.out_of_order_examples {
            out.push_str(&format!("out of order: {e}\n"));
        }
        for e in &self.duplicates_not_identical_examples {
            out.push_str(&format!("duplicate differs: {e}\n"));
        }
        out
    }
}

/// The rows the harness writes to: `merchants` merchants with `branches` branches each, products with inventory.
#[derive(Clone, Debug)]
struct Fixture {
    /// (branch id, [(product id, inventory id)])
    branches: Vec<(i64, Vec<(i64, i64)>)>,
    /// The same branches by code, for the simulated devices.
    refs: Vec<BranchRef>,
}

async fn fixture(client: &tokio_postgres::Client, opts: &LoadOptions) -> anyhow::Result<Fixture> {
    let mut branches = Vec::new();
    let mut refs = Vec::new();
    for m in 0..opts.merchants {
        let mcode = format!("{LOAD_MERCHANT_PREFIX}{m:03}");
        client
            .execute(
                "INSERT INTO merchants (code, name) VALUES ($1, 'Load test merchant') ON CONFLICT (code) DO NOTHING",
                &[&mcode],
            )
            .await?;
        let merchant: i64 = client
            .query_one("SELECT id FROM merchants WHERE code = $1", &[&mcode])
            .await?
            .get(0);
        for b in 0..opts.branches {
            let code = format!("BRN-LOAD-{b:04}");
            let branch = fixture_branch(client, opts, merchant, &code).await?;
            refs.push(BranchRef {
                merchant: mcode.clone(),
                code,
                id: branch.0,
            });
            branches.push(branch);
        }
    }
    Ok(Fixture { branches, refs })
}

async fn fixture_branch(
    client: &tokio_postgres::Client,
    opts: &LoadOptions,
    merchant: i64,
    code: &str,
) -> anyhow::Result<(i64, Vec<(i64, i64)>)> {
    client
        .execute(
            "INSERT INTO branches (merchant_id, code, name) VALUES ($1, $2, $2) ON CONFLICT (merchant_id, code) DO NOTHING",
            &[&merchant, &code],
        )
        .await?;
    let branch: i64 = client
        .query_one(
            "SELECT id FROM branches WHERE merchant_id = $1 AND code = $2",
            &[&merchant, &code],
        )
        .await?
        .get(0);
    let have: i64 = client
        .query_one("SELECT count(*) FROM products WHERE branch_id = $1", &[&branch])
        .await?
        .get(0);
    let missing = (opts.products_per_branch as i64 - have) as i32;
    if missing > 0 {
        client
            .execute(
                "WITH p AS (INSERT INTO products (branch_id, name, price, stock)
                            SELECT $1, 'Load product ' || g, 5 + g % 50, 1000000 FROM generate_series(1, $2) g
                            RETURNING id, branch_id)
                 INSERT INTO inventory (branch_id, product_id, quantity) SELECT branch_id, id, 1000000 FROM p",
                &[&branch, &missing],
            )
            .await?;
    }
    let rows = client
        .query(
            "SELECT p.id, i.id FROM products p JOIN inventory i ON i.product_id = p.id
              WHERE p.branch_id = $1 ORDER BY p.id LIMIT $2",
            &[&branch, &(opts.products_per_branch as i64)],
        )
        .await?;
    Ok((branch, rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

fn marker(run: u32, op: u64) -> String {
    format!("L{run}-{op}")
}

fn parse_marker(run: u32, s: &str) -> Option<u64> {
    let rest = s.strip_prefix('L')?;
    let (r, op) = rest.split_once('-')?;
    (r.parse::<u32>().ok()? == run).then(|| op.parse().ok()).flatten()
}

/// Opens a PostgreSQL session for the load's writers and checks (the caller decides TLS and the like).
pub type PgConnect = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<Client>> + Send + Sync>;

/// What the load runs against: the topic root (`env`), how to reach the broker (the client id is set per
/// run) and how to open a database session. `delta-load` builds it from the bridge's own configuration.
#[derive(Clone)]
pub struct Target {
    pub env: String,
    pub mqtt: MqttOptions,
    pub postgres: PgConnect,
    /// The bridge's HTTP API with the admin token: needed for simulated devices only.
    pub api: Option<Api>,
}

impl Target {
    pub fn new(env: &str, mqtt: MqttOptions, postgres: PgConnect) -> Target {
        Target {
            env: env.to_string(),
            mqtt,
            postgres,
            api: None,
        }
    }

    /// Plain TCP sessions to `url` (the private servers of [`crate::stack`]).
    pub fn plain_postgres(url: String, timeout: Duration) -> PgConnect {
        Arc::new(move || {
            let url = url.clone();
            Box::pin(async move {
                let mut cfg: tokio_postgres::Config = url.parse()?;
                cfg.application_name("delta-load").connect_timeout(timeout);
                let (client, conn) = tokio::time::timeout(timeout, cfg.connect(tokio_postgres::NoTls))
                    .await
                    .map_err(|_| anyhow::anyhow!("PostgreSQL connection attempt timed out"))??;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(client)
            })
        })
    }
}

/// Runs the load and returns the report. The caller decides what to do with loss (delta-load exits 1).
pub async fn run(target: &Target, opts: &LoadOptions, cancel: CancellationToken) -> anyhow::Result<Report> {
    let run_id: u32 = rand::random::<u32>() % 1_000_000_000;
    let setup = (target.postgres)().await?;
    let fix = fixture(&setup, opts).await?;

    // Subscribe first (and wait for SUBACK) so that nothing written is missed.
    let mut mopts = target.mqtt.clone();
    mopts.set_client_id(format!("delta-load-{run_id}"));
    mopts.set_clean_start(false);
    mopts.set_session_expiry_interval(Some(3600));
    let got: Arc<Mutex<Vec<Got>>> = Arc::new(Mutex::new(Vec::new()));
    let filter = format!("{}/#", target.env);
    let sink = got.clone();
    let violations = Arc::new(AtomicU64::new(0));
    let invalid = violations.clone();
    let subscription = subscriber::subscribe(mopts, &filter, Duration::from_secs(20), move |p| {
        let at = Instant::now();
        let parsed = serde_json::from_slice::<Value>(&p.payload).map_err(|e| format!("not JSON: {e}"));
        if let Err(why) = parsed.as_ref().map_err(Clone::clone).and_then(crate::schemas::validate) {
            if invalid.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(topic = %String::from_utf8_lossy(&p.topic), %why, "payload does not match its schema");
            }
        }
        if let Ok(v) = parsed {
            if let Some(g) = classify(run_id, v, &p.payload, at) {
                if let Ok(mut sink) = sink.lock() {
                    sink.push(g);
                }
            }
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot subscribe to {filter}: {e}"))?;

    let fleet = if opts.devices > 0 {
        let api = target
            .api
            .clone()
            .ok_or_else(|| anyhow::anyhow!("simulated devices need the bridge's HTTP API and admin token"))?;
        let fopts = FleetOptions {
            devices: opts.devices,
            offline: opts.offline,
            duration: opts.duration,
            env: target.env.clone(),
            mqtt: target.mqtt.clone(),
        };
        Some(Fleet::start(api, &fix.refs, &fopts, run_id).await?)
    } else {
        None
    };

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (op_tx, op_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let op_rx = Arc::new(tokio::sync::Mutex::new(op_rx));
    let mut writers = Vec::new();
    for w in 0..opts.writers {
        let (connect, fix, ledger, op_rx, cancel) = (
            target.postgres.clone(),
            fix.clone(),
            ledger.clone(),
            op_rx.clone(),
            cancel.clone(),
        );
        writers.push(tokio::spawn(async move {
            writer(w, run_id, connect, fix, ledger, op_rx, cancel).await
        }));
    }

    // Open loop: operation i is due at start + i/rate, whether or not the writers keep up.
    let start = Instant::now();
    let end = start + opts.duration;
    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
    let mut next_progress = start + Duration::from_secs(1);
    let mut i: u64 = 0;
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= end || cancel.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = cancel.cancelled() => break,
        }
        let _ = op_tx.send((i, due));
        i += 1;
        if opts.progress && Instant::now() >= next_progress {
            progress(start, &ledger, &got, false);
            next_progress += Duration::from_secs(1);
        }
    }
    drop(op_tx);
    for w in writers {
        let _ = w.await;
    }
    let written_for = start.elapsed();

    // Wait for stragglers: until every expected event arrived, or the grace period is over.
    let grace_end = Instant::now() + opts.grace;
    while Instant::now() < grace_end && !cancel.is_cancelled() {
        if missing_count(&ledger, &got) == 0 {
            break;
        }
        if opts.progress {
            progress(start, &ledger, &got, false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer, to see duplicates and phantoms that trail behind.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if opts.progress {
        progress(start, &ledger, &got, true);
    }
    subscription.stop().await;

    let got = got.lock().map(|g| g.clone()).unwrap_or_default();
    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    drop(setup); // the database may have restarted meanwhile: compare on a fresh session
    let check = (target.postgres)().await?;
    let device_mismatches = Device::apply_all(&got).compare(&check).await?;
    let mut report = account(opts.rate, written_for, &ledger, &got, device_mismatches);
    report.schema_violations = violations.load(Ordering::Relaxed);
    if let Some(fleet) = fleet {
        // Everything the bridge will deliver has been delivered: every device now comes online, catches up and
        // is compared with the database.
        let listener_rows = report.device_mismatches;
        report.fleet = fleet.finish(&check).await?;
        report.device_mismatches = listener_rows + report.fleet.device_mismatches;
    }
    Ok(report)
}

fn classify(run: u32, v: Value, raw: &[u8], at: Instant) -> Option<Got> {
    let t = v["event_type"].as_str()?;
    let d = &v["data"];
    let (letter, stream, marker_field, row) = match t {
        "stock_updated" => ('S', "product", "updated_by", ('p', d["product_id"].as_i64()?)),
        "product_updated" => ('P', "product", "updated_by", ('p', d["product_id"].as_i64()?)),
        "quantity_updated" => ('Q', "inventory", "updated_by", ('i', d["inventory_id"].as_i64()?)),
        "transaction_created" => (
            'T',
            "transaction",
            "transaction_code",
            ('t', d["transaction_id"].as_i64()?),
        ),
        "transaction_updated" => (
            'U',
            "transaction",
            "transaction_code",
            ('t', d["transaction_id"].as_i64()?),
        ),
        _ => return None,
    };
    let op = parse_marker(run, d[marker_field].as_str()?)?;
    let key_row = match letter {
        'T' | 'U' => 0,
        _ => row.1,
    };
    Some(Got {
        key: Some((letter, op, key_row)),
        stream,
        event_id: v["event_id"].as_str()?.to_string(),
        seq: v["seq"].as_i64()?,
        row,
        at,
        payload: v,
        raw: raw.to_vec(),
    })
}

async fn writer(
    w: usize,
    run: u32,
    connect: PgConnect,
    fix: Fixture,
    ledger: Arc<Mutex<Ledger>>,
    ops: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(u64, Instant)>>>,
    cancel: CancellationToken,
) {
    let mut session: Option<Client> = None;
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(run) * 1000 + w as u64);
    loop {
        let next = { ops.lock().await.recv().await };
        let Some((op, due)) = next else { return };
        if session.is_none() {
            match connect().await {
                Ok(s) => session = Some(s),
                Err(_) => {
                    record(&ledger, op, Outcome::RolledBack, None);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(s) = session.as_ref() else { continue };
        let kind = pick_kind(&mut rng);
        let (kind, body, expected) = build_op(run, op, kind, &fix, &ledger, &mut rng);
        if let Ok(mut l) = ledger.lock() {
            l.expected.insert(op, expected);
            l.written_ops += 1;
        }
        let result = async {
            let began = Instant::now();
            s.batch_execute(&body).await.map_err(|e| (false, e))?;
            // Latency starts at the moment this COMMIT was *scheduled*: the operation's due time plus the
            // transaction's own statements. A writer that started late (all writers busy, the database slow)
            // adds its lag instead of hiding it (no coordinated omission); on time, it is the COMMIT's send time.
            let t = due + began.elapsed();
            if kind == Kind::Aborted {
                s.batch_execute("ROLLBACK").await.map_err(|e| (false, e))?;
                return Ok(None);
            }
            s.batch_execute("COMMIT").await.map_err(|e| (true, e))?;
            Ok(Some(t))
        }
        .await;
        match result {
            Ok(Some(t)) => {
                record(&ledger, op, Outcome::Committed, Some(t));
                if kind == Kind::Sale {
                    if let Ok(mut l) = ledger.lock() {
                        l.sales.push(op);
                    }
                }
            }
            Ok(None) => record(&ledger, op, Outcome::RolledBack, None),
            Err((during_commit, e)) => {
                let closed = s.is_closed();
                record(
                    &ledger,
                    op,
                    if during_commit && closed {
                        Outcome::Unknown
                    } else {
                        Outcome::RolledBack
                    },
                    None,
                );
                if closed {
                    session = None;
                } else {
                    let _ = s.batch_execute("ROLLBACK").await;
                }
                tracing::debug!(op, error = %e, "load write failed");
                if cancel.is_cancelled() {
                    return;
                }
            }
        }
    }
}

fn record(ledger: &Mutex<Ledger>, op: u64, outcome: Outcome, at: Option<Instant>) {
    if let Ok(mut l) = ledger.lock() {
        l.outcome.insert(op, outcome);
        if outcome != Outcome::Committed {
            l.failed_ops += 1;
        }
        if let Some(t) = at {
            l.committed_at.insert(op, t);
        }
    }
}

use rand::{Rng, SeedableRng};

fn pick_kind(rng: &mut impl Rng) -> Kind {
    match rng.random_range(0..100) {
        0..=49 => Kind::Sale,
        50..=64 => Kind::Restock,
        65..=84 => Kind::Price,
        85..=94 => Kind::Void,
        _ => Kind::Aborted,
    }
}

/// The SQL of one operation (without COMMIT) and the events it must cause if it commits.
fn build_op(
    run: u32,
    op: u64,
    kind: Kind,
    fix: &Fixture,
    ledger: &Mutex<Ledger>,
    rng: &mut impl Rng,
) -> (Kind, String, Vec<Key>) {
    let m = marker(run, op);
    let (branch, products) = &fix.branches[rng.random_range(0..fix.branches.len())];
    // Basket sizes 1-20, most of them small as at a real till (mean ~5.5): 1 + floor(20 u^3).
    let basket = 1 + (rng.random::<f64>().powi(3) * 20.0) as usize;
    let mut pick = |n: usize| -> Vec<(i64, i64)> {
        let mut chosen: Vec<(i64, i64)> = Vec::new();
        while chosen.len() < n.min(products.len()) {
            let p = products[rng.random_range(0..products.len())];
            if !chosen.contains(&p) {
                chosen.push(p);
            }
        }
        // Lock rows in id order, as a careful application does, so writers do not deadlock each other.
        chosen.sort();
        chosen
    };
    match kind {
        Kind::Sale | Kind::Aborted => {
            let items = pick(basket);
            let mut sql = format!(
                "BEGIN; INSERT INTO transactions (branch_id, transaction_code, offline_id, status, grand_total, created_by, device_id)
                 VALUES ({branch}, '{m}', gen_random_uuid(), 'paid', {}, 'load', 'load-device');
                 INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES ",
                10 * items.len()
            );
            let values: Vec<String> = items
                .iter()
                .map(|(p, _)| format!("(currval(pg_get_serial_sequence('transactions', 'id')), {p}, 1, 10.00)"))
                .collect();
            sql.push_str(&values.join(", "));
            sql.push(';');
            let mut expected = vec![('T', op, 0)];
            for (p, i) in &items {
                sql.push_str(&format!(
                    " UPDATE products SET stock = stock - 1, updated_by = '{m}' WHERE id = {p};
                      UPDATE inventory SET quantity = quantity - 1, updated_by = '{m}' WHERE id = {i};"
                ));
                expected.push(('S', op, *p));
                expected.push(('Q', op, *i));
            }
            (kind, sql, if kind == Kind::Aborted { Vec::new() } else { expected })
        }
        Kind::Restock => {
            let (p, i) = pick(1)[0];
            let q = rng.random_range(1..50);
            let sql = format!(
                "BEGIN; SELECT set_config('delta_bridge.reason', 'restock', true);
                 UPDATE products SET stock = stock + {q}, updated_by = '{m}' WHERE id = {p};
                 UPDATE inventory SET quantity = quantity + {q}, updated_by = '{m}' WHERE id = {i};"
            );
            (kind, sql, vec![('S', op, p), ('Q', op, i)])
        }
        Kind::Void => {
            let sale = ledger.lock().ok().and_then(|mut l| {
                let n = l.sales.len();
                (n > 0).then(|| l.sales.swap_remove(rng.random_range(0..n)))
            });
            match sale {
                // The void's event carries the sale's code: expected under the sale's op, letter U.
                Some(s) => (
                    kind,
                    format!("BEGIN; UPDATE transactions SET status = 'void' WHERE transaction_code = '{}' AND status = 'paid';", marker(run, s)),
                    vec![('U', s, 0)],
                ),
                None => build_op(run, op, Kind::Price, fix, ledger, rng),
            }
        }
        Kind::Price => {
            let (p, _) = pick(1)[0];
            let cents = 1 + op % 97;
            let sql =
                format!("BEGIN; UPDATE products SET price = price + 0.{cents:02}, updated_by = '{m}' WHERE id = {p};");
            (kind, sql, vec![('P', op, p)])
        }
    }
}

fn expected_committed(ledger: &Ledger) -> HashMap<Key, u64> {
    // key -> op whose commit makes it expected
    let mut out = HashMap::new();
    for (op, keys) in &ledger.expected {
        if ledger.outcome.get(op) == Some(&Outcome::Committed) {
            for k in keys {
                out.insert(*k, *op);
            }
        }
    }
    out
}

fn missing_count(ledger: &Mutex<Ledger>, got: &Mutex<Vec<Got>>) -> usize {
    let Ok(l) = ledger.lock() else { return 0 };
    let exp = expected_committed(&l);
    let Ok(g) = got.lock() else { return 0 };
    let seen: HashSet<Key> = g.iter().filter_map(|x| x.key).collect();
    exp.keys().filter(|k| !seen.contains(k)).count()
}

fn progress(start: Instant, ledger: &Mutex<Ledger>, got: &Mutex<Vec<Got>>, last: bool) {
    let (ops, expected) = ledger
        .lock()
        .map(|l| (l.written_ops, expected_committed(&l).len()))
        .unwrap_or_default();
    let received = got.lock().map(|g| g.len()).unwrap_or_default();
    let mut err = std::io::stderr();
    // On a terminal one line rewritten in place; in a log, one line per report.
    let tty = err.is_terminal();
    let _ = write!(
        err,
        "{}  t={:>5.1}s  writes={ops:>7}  events expected={expected:>8}  received={received:>8}   {}",
        if tty { "\r" } else { "" },
        start.elapsed().as_secs_f64(),
        if tty { "" } else { "\n" }
    );
    if last && tty {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn account(rate: f64, written_for: Duration, ledger: &Ledger, got: &[Got], device_mismatches: u64) -> Report {
    let expected = expected_committed(ledger);
    // Events of operations whose commit outcome is unknown may or may not arrive: neither lost nor phantom.
    let unknown: HashSet<Key> = ledger
        .expected
        .iter()
        .filter(|(op, _)| ledger.outcome.get(op) == Some(&Outcome::Unknown))
        .flat_map(|(_, keys)| keys.iter().copied())
        .collect();
    let mut report = Report {
        rate,
        duration_s: written_for.as_secs_f64(),
        device_mismatches,
        ..Default::default()
    };
    for s in ["product", "inventory", "transaction"] {
        report.streams.insert(s.to_string(), StreamReport::default());
    }
    let stream_of = |letter: char| match letter {
        'S' | 'P' => "product",
        'Q' => "inventory",
        _ => "transaction",
    };
    for k in expected.keys() {
        if let Some(s) = report.streams.get_mut(stream_of(k.0)) {
            s.written += 1;
        }
    }
    let mut seen_ids: HashMap<&str, &[u8]> = HashMap::new();
    let mut seen_keys: HashSet<Key> = HashSet::new();
    let mut last_seq: HashMap<(char, i64), (i64, &str, Instant)> = HashMap::new();
    let mut latencies: HashMap<&str, Vec<f64>> = HashMap::new();
    for g in got {
        let Some(s) = report.streams.get_mut(g.stream) else {
            continue;
        };
        if let Some(first) = seen_ids.get(g.event_id.as_str()) {
            s.duplicated += 1;
            if *first != g.raw.as_slice() {
                report.duplicates_not_identical += 1;
                if report.duplicates_not_identical_examples.len() < 5 {
                    report.duplicates_not_identical_examples.push(format!(
                        "event {}: first {} then {}",
                        g.event_id,
                        String::from_utf8_lossy(first),
                        String::from_utf8_lossy(&g.raw)
                    ));
                }
            }
            continue;
        }
        seen_ids.insert(g.event_id.as_str(), g.raw.as_slice());
        let Some(key) = g.key else { continue };
        let op = key.1;
        match ledger.outcome.get(&op) {
            Some(Outcome::RolledBack) => {
                report.phantom += 1;
                continue;
            }
            Some(Outcome::Unknown) | None => continue,
            Some(Outcome::Committed) => {}
        }
        if unknown.contains(&key) && !expected.contains_key(&key) {
            continue;
        }
        if !expected.contains_key(&key) {
            report.phantom += 1;
            continue;
        }
        if !seen_keys.insert(key) {
            s.duplicated += 1;
            continue;
        }
        s.received += 1;
        let last = last_seq.entry(g.row).or_insert((i64::MIN, "", g.at));
        if g.seq < last.0 {
            s.out_of_order += 1;
            if report.out_of_order_examples.len() < 5 {
                report.out_of_order_examples.push(format!(
                    "row {:?}: {} seq {} received {:.1} ms after {} seq {}",
                    g.row,
                    g.payload["event_type"].as_str().unwrap_or("?"),
                    g.seq,
                    g.at.saturating_duration_since(last.2).as_secs_f64() * 1000.0,
                    last.1,
                    last.0
                ));
            }
        } else {
            *last = (g.seq, g.payload["event_type"].as_str().unwrap_or("?"), g.at);
        }
        if key.0 != 'U' {
            if let Some(t) = ledger.committed_at.get(&op) {
                latencies
                    .entry(g.stream)
                    .or_default()
                    .push(g.at.saturating_duration_since(*t).as_secs_f64() * 1000.0);
            }
        }
    }
    for (name, s) in report.streams.iter_mut() {
        s.lost = s.written.saturating_sub(s.received);
        if let Some(l) = latencies.get_mut(name.as_str()) {
            l.sort_by(|a, b| a.total_cmp(b));
            s.latency_ms = Latency {
                p50: percentile(l, 50.0),
                p90: percentile(l, 90.0),
                p99: percentile(l, 99.0),
                max: l.last().copied().unwrap_or_default(),
            };
        }
    }
    report.ops_committed = ledger.outcome.values().filter(|o| **o == Outcome::Committed).count() as u64;
    report.ops_failed = ledger.outcome.values().filter(|o| **o == Outcome::RolledBack).count() as u64;
    report.ops_unknown = ledger.outcome.values().filter(|o| **o == Outcome::Unknown).count() as u64;
    report.events_per_second = report.received() as f64 / written_for.as_secs_f64().max(0.001);
    report
}

/// An offline-first device's local store: applies an event only if its `seq` is newer than the last one
/// applied to that row (stale redeliveries are dropped).
#[derive(Default, Debug)]
pub struct Device {
    products: HashMap<i64, (i64, Option<i64>, Option<String>)>,
    inventory: HashMap<i64, (i64, i64)>,
    sales: HashMap<i64, (i64, String)>,
}

impl Device {
    fn apply_all(got: &[Got]) -> Device {
        let mut d = Device::default();
        for g in got {
            d.apply(&g.payload);
        }
        d
    }

    pub fn apply(&mut self, v: &Value) {
        let seq = v["seq"].as_i64().unwrap_or(i64::MIN);
        let data = &v["data"];
        match v["event_type"].as_str() {
            Some("stock_updated") | Some("product_updated") => {
                let Some(id) = data["product_id"].as_i64() else {
                    return;
                };
                let e = self.products.entry(id).or_insert((i64::MIN, None, None));
                if seq > e.0 {
                    e.0 = seq;
                    if let Some(s) = data["new_stock"].as_i64().or(data["stock"].as_i64()) {
                        e.1 = Some(s);
                    }
                    if let Some(p) = data.get("price").filter(|p| p.is_number()) {
                        e.2 = Some(format!("{:.2}", p.as_f64().unwrap_or_default()));
                    }
                }
            }
            Some("quantity_updated") => {
                let Some(id) = data["inventory_id"].as_i64() else {
                    return;
                };
                let e = self.inventory.entry(id).or_insert((i64::MIN, 0));
                if seq > e.0 {
                    *e = (seq, data["new_quantity"].as_i64().unwrap_or_default());
                }
            }
            Some("transaction_created") | Some("transaction_updated") => {
                let Some(id) = data["transaction_id"].as_i64() else {
                    return;
                };
                let e = self.sales.entry(id).or_insert((i64::MIN, String::new()));
                if seq > e.0 {
                    *e = (seq, data["status"].as_str().unwrap_or_default().to_string());
                }
            }
            _ => {}
        }
    }

    /// Rows whose device value differs from the database's now.
    pub async fn compare(&self, db: &tokio_postgres::Client) -> anyhow::Result<u64> {
        let mut bad = 0;
        let ids: Vec<i64> = self.products.keys().copied().collect();
        for r in db
            .query(
                "SELECT id, stock, to_char(price, 'FM999999999990.00') FROM products WHERE id = ANY($1)",
                &[&ids],
            )
            .await?
        {
            let (id, stock, price): (i64, i32, String) = (r.get(0), r.get(1), r.get(2));
            if let Some((_, s, p)) = self.products.get(&id) {
                if s.is_some_and(|s| s != i64::from(stock)) || p.as_ref().is_some_and(|p| *p != price) {
                    bad += 1;
                }
            }
        }
        let ids: Vec<i64> = self.inventory.keys().copied().collect();
        for r in db
            .query("SELECT id, quantity FROM inventory WHERE id = ANY($1)", &[&ids])
            .await?
        {
            let (id, q): (i64, i32) = (r.get(0), r.get(1));
            if self.inventory.get(&id).is_some_and(|(_, dq)| *dq != i64::from(q)) {
                bad += 1;
            }
        }
        let ids: Vec<i64> = self.sales.keys().copied().collect();
        for r in db
            .query("SELECT id, status FROM transactions WHERE id = ANY($1)", &[&ids])
            .await?
        {
            let (id, st): (i64, String) = (r.get(0), r.get(1));
            if self.sales.get(&id).is_some_and(|(_, ds)| *ds != st) {
                bad += 1;
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_reject_other_runs() {
        assert_eq!(parse_marker(7, &marker(7, 12345)), Some(12345));
        assert_eq!(parse_marker(8, &marker(7, 1)), None);
        assert_eq!(parse_marker(7, "kasir-1"), None);
    }

    #[test]
    fn device_drops_stale_seq() {
        let mut d = Device::default();
        let ev = |seq: i64, stock: i64| serde_json::json!({"event_type": "stock_updated", "seq": seq, "data": {"product_id": 1, "new_stock": stock}});
        d.apply(&ev(5, 10));
        d.apply(&ev(3, 99)); // stale redelivery
        d.apply(&ev(5, 10)); // duplicate
        assert_eq!(d.products.get(&1).map(|e| e.1), Some(Some(10)));
        d.apply(&ev(6, 8));
        assert_eq!(d.products.get(&1).map(|e| e.1), Some(Some(8)));
    }

    #[test]
    fn a_redelivery_with_other_bytes_is_counted() {
        let mut ledger = Ledger::default();
        ledger.expected.insert(1, vec![('P', 1, 10)]);
        ledger.outcome.insert(1, Outcome::Committed);
        let at = Instant::now();
        let got = |raw: &str| Got {
            key: Some(('P', 1, 10)),
            stream: "product",
            event_id: "e1".into(),
            seq: 1,
            row: ('p', 10),
            at,
            payload: serde_json::json!({"event_type": "product_updated"}),
            raw: raw.as_bytes().to_vec(),
        };
        let same = account(
            1.0,
            Duration::from_secs(1),
            &ledger,
            &[got("{\"a\":1}"), got("{\"a\":1}")],
            0,
        );
        assert_eq!((same.duplicated(), same.duplicates_not_identical), (1, 0));
        let other = account(
            1.0,
            Duration::from_secs(1),
            &ledger,
            &[got("{\"a\":1}"), got("{\"a\": 1}")],
            0,
        );
        assert_eq!((other.duplicated(), other.duplicates_not_identical), (1, 1));
        assert_eq!(other.lost(), 0);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
