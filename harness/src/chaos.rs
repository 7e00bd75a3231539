//! Chaos: the load engine's steady load against a stack with several bridge replicas, while crash faults
//! strike on a schedule: SIGKILL of the leader replica (restarted as a standby once another took over, as
//! Kubernetes would), SIGKILL of the broker (restarted; what it had not yet saved is gone), SIGKILL of the
//! PostgreSQL postmaster (restarted; crash recovery), and the leader's database session terminated
//! (`pg_terminate_backend`). Behind `benches/chaos.rs` and `tests/chaos.rs`.
//!
//! Recovery from each fault is measured by a [`Probe`]: a writer that commits a marked change of its own
//! product every 100 ms, and a subscriber to its branch. A fault's recovery time is the time from the fault
//! until the probe receives the first change committed after the fault: when events flow end to end again.
//! The probe's rows are its own (a merchant of their own): the load's accounting and its device model never
//! see them; a committed probe change that never arrives counts as lost all the same.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rumqttc::v5::MqttOptions;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::loadgen::{self, LoadOptions, PgConnect, Report};
use crate::servers::free_port;
use crate::stack::Stack;
use crate::subscriber;

/// What strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of the replica holding the leader lock; it comes back as a standby once another took over.
    LeaderKill,
    /// SIGKILL of Mosquitto, started again after a second.
    BrokerKill,
    /// SIGKILL of the PostgreSQL postmaster alone, started again as soon as its orphans are gone.
    PostgresKill,
    /// `pg_terminate_backend` of the leader's session: the replica lives, its session and lock do not.
    LostSession,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LeaderKill => "leader SIGKILL",
            FaultKind::BrokerKill => "broker SIGKILL",
            FaultKind::PostgresKill => "postgres SIGKILL",
            FaultKind::LostSession => "leader session lost",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long the load writes.
    pub duration: Duration,
    /// Database transactions per second (~6.7 events each on average: 150 tx/s is ~1,000 events/s).
    pub rate: f64,
    pub replicas: usize,
    pub leader_kills: usize,
    pub broker_kills: usize,
    pub postgres_kills: usize,
    pub lost_sessions: usize,
    /// The bridge binary the replicas run.
    pub bridge: PathBuf,
    /// Topic root (`env`) of the replicas and the load.
    pub env: String,
    /// TOML appended to each replica's configuration (after `[http]`: whole sections).
    pub extra_config: String,
    /// How long to wait for stragglers after the last write.
    pub grace: Duration,
    /// Seeds the order of the faults.
    pub seed: u64,
    /// A line on stderr per fault.
    pub verbose: bool,
}

impl ChaosOptions {
    pub fn faults(&self) -> usize {
        self.leader_kills + self.broker_kills + self.postgres_kills + self.lost_sessions
    }
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    pub kind: FaultKind,
    /// Since the start of the load.
    pub at: Duration,
    /// From the fault until the probe received a change committed after it; None if none arrived in time.
    pub recovery: Option<Duration>,
    /// For leader faults: from the fault until another session held the lock and exactly one replica said
    /// it leads.
    pub takeover: Option<Duration>,
    pub note: String,
}

#[derive(Debug, Clone)]
pub struct ChaosReport {
    pub load: Report,
    pub faults: Vec<FaultOutcome>,
    /// Probe changes committed and never received.
    pub probe_lost: usize,
    pub probe_committed: usize,
    /// Probe redeliveries with other bytes than the first delivery.
    pub probe_duplicates_not_identical: usize,
}

fn stats(v: &mut [Duration]) -> Option<(Duration, Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some((v[0], v[v.len() / 2], v[v.len() - 1]))
}

impl ChaosReport {
    /// Per fault kind: count, recovery min/median/max, takeover min/median/max; then the load's report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "fault",
            "count",
            "recov min s",
            "recov med s",
            "recov max s",
            "takeov min s",
            "takeov med s",
            "takeov max s"
        );
        let mut kinds: Vec<FaultKind> = self.faults.iter().map(|f| f.kind).collect();
        kinds.sort();
        kinds.dedup();
        let fmt = |d: Option<Duration>| d.map_or_else(|| "-".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
        for k in kinds {
            let of: Vec<&FaultOutcome> = self.faults.iter().filter(|f| f.kind == k).collect();
            let mut rec: Vec<Duration> = of.iter().filter_map(|f| f.recovery).collect();
            let mut tk: Vec<Duration> = of.iter().filter_map(|f| f.takeover).collect();
            let unrecovered = of.len() - rec.len();
            let r = stats(&mut rec);
            let t = stats(&mut tk);
            let _ = writeln!(
                out,
                "{:<22} {:>5} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}{}",
                k.name(),
                of.len(),
                fmt(r.map(|r| r.0)),
                fmt(r.map(|r| r.1)),
                fmt(r.map(|r| r.2)),
                fmt(t.map(|t| t.0)),
                fmt(t.map(|t| t.1)),
                fmt(t.map(|t| t.2)),
                if unrecovered > 0 {
                    format!("   {unrecovered} NOT RECOVERED")
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            out,
            "probe: {} changes committed, {} lost, {} redeliveries not byte-identical",
            self.probe_committed, self.probe_lost, self.probe_duplicates_not_identical
        );
        let l = &self.load;
        let _ = writeln!(
            out,
            "load: {} events written, {} received first time, lost {}, phantom {}, duplicates {} ({} not byte-identical), \
             out of order {}, device mismatches {}, schema violations {}",
            l.written(),
            l.received(),
            l.lost(),
            l.phantom,
            l.duplicated(),
            l.duplicates_not_identical,
            l.out_of_order(),
            l.device_mismatches,
            l.schema_violations
        );
        out.push_str(&l.render());
        out
    }

    pub fn fault_log(&self) -> String {
        let mut out = String::new();
        for f in &self.faults {
            let _ = writeln!(
                out,
                "+{:>7.2}s {:<20} recovery {:>8} takeover {:>8} {}",
                f.at.as_secs_f64(),
                f.kind.name(),
                f.recovery
                    .map_or_else(|| "-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
                f.takeover
                    .map_or_else(|| "-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
                f.note
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------------------
// Probe

#[derive(Default)]
struct ProbeState {
    /// Committed changes: marker -> when the UPDATE was sent.
    committed: HashMap<u64, Instant>,
    /// First delivery of each marker: when, and its bytes per event_id.
    received: HashMap<u64, Instant>,
    first_bytes: HashMap<String, Vec<u8>>,
    not_identical: usize,
}

/// Commits a marked change of a product of its own every 100 ms and records when each arrives. Each change
/// raises the price by a cent: an update that changes no published column is (rightly) not an event.
pub struct Probe {
    state: Arc<Mutex<ProbeState>>,
    cancel: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    subscription: subscriber::Subscription,
}

const PROBE_MERCHANT: &str = "MCH-PROBE";
const PROBE_BRANCH: &str = "BRN-PROBE";

impl Probe {
    /// Creates the probe's merchant, branch and product (if missing) and starts writing and listening.
    pub async fn start(env: &str, postgres: PgConnect, mqtt: MqttOptions) -> anyhow::Result<Probe> {
        let db = postgres().await?;
        db.batch_execute(&format!(
            "INSERT INTO merchants (code, name) VALUES ('{PROBE_MERCHANT}', 'Chaos probe') ON CONFLICT (code) DO NOTHING;
             INSERT INTO branches (merchant_id, code, name)
               SELECT id, '{PROBE_BRANCH}', 'Chaos probe' FROM merchants WHERE code = '{PROBE_MERCHANT}'
               ON CONFLICT (merchant_id, code) DO NOTHING;
             INSERT INTO products (branch_id, name, price, stock)
               SELECT b.id, 'Probe', 1, 1 FROM branches b JOIN merchants m ON m.id = b.merchant_id
                WHERE m.code = '{PROBE_MERCHANT}' AND b.code = '{PROBE_BRANCH}'
                  AND NOT EXISTS (SELECT 1 FROM products p WHERE p.branch_id = b.id);"
        ))
        .await?;
        let product: i64 = db
            .query_one(
                "SELECT p.id FROM products p JOIN branches b ON b.id = p.branch_id JOIN merchants m ON m.id = b.merchant_id
                  WHERE m.code = $1 AND b.code = $2 ORDER BY p.id LIMIT 1",
                &[&PROBE_MERCHANT, &PROBE_BRANCH],
            )
            .await?
            .get(0);
        drop(db);

        let run: u32 = rand::random::<u32>() % 1_000_000;
        let state = Arc::new(Mutex::new(ProbeState::default()));
        let sink = state.clone();
        let prefix = format!("probe-{run}-");
        let mut opts = mqtt;
        opts.set_client_id(format!("chaos-probe-{run}"));
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        let want = prefix.clone();
        let subscription = subscriber::subscribe(
            opts,
            &format!("{env}/{PROBE_MERCHANT}/#"),
            Duration::from_secs(20),
            move |p| {
                let at = Instant::now();
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                    return;
                };
                let Ok(mut s) = sink.lock() else { return };
                if let Some(id) = v["event_id"].as_str() {
                    match s.first_bytes.get(id) {
                        Some(first) if *first != p.payload.as_ref() => s.not_identical += 1,
                        Some(_) => {}
                        None => {
                            s.first_bytes.insert(id.to_string(), p.payload.to_vec());
                        }
                    }
                }
                let marker = v["data"]["updated_by"]
                    .as_str()
                    .and_then(|m| m.strip_prefix(want.as_str()))
                    .and_then(|k| k.parse::<u64>().ok());
                if let Some(k) = marker {
                    s.received.entry(k).or_insert(at);
                }
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("probe subscription: {e}"))?;

        let cancel = CancellationToken::new();
        let (stop, writes) = (cancel.clone(), state.clone());
        let writer = tokio::spawn(async move {
            let mut session: Option<tokio_postgres::Client> = None;
            let mut k: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if session.as_ref().is_none_or(|s| s.is_closed()) {
                    session = tokio::time::timeout(Duration::from_secs(2), postgres())
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                let Some(s) = session.as_ref() else { continue };
                k += 1;
                let sent = Instant::now();
                let marker = format!("{prefix}{k}");
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    s.execute(
                        "UPDATE products SET price = price + 0.01, updated_by = $1 WHERE id = $2",
                        &[&marker, &product],
                    ),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {
                        if let Ok(mut st) = writes.lock() {
                            st.committed.insert(k, sent);
                        }
                    }
                    // Failed or unknown (the connection broke during the autocommit): not required to arrive.
                    _ => session = None,
                }
            }
        });
        Ok(Probe {
            state,
            cancel,
            writer,
            subscription,
        })
    }

    /// Time from `t` until the first delivery of a change whose UPDATE was sent at or after `t`.
    pub fn recovery_after(&self, t: Instant) -> Option<Duration> {
        let s = self.state.lock().ok()?;
        s.committed
            .iter()
            .filter(|(_, sent)| **sent >= t)
            .filter_map(|(k, _)| s.received.get(k))
            .map(|r| r.saturating_duration_since(t))
            .min()
    }

    /// Waits up to `limit` for [`Probe::recovery_after`].
    pub async fn wait_recovery(&self, t: Instant, limit: Duration) -> Option<Duration> {
        loop {
            if let Some(d) = self.recovery_after(t) {
                return Some(d);
            }
            if t.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops writing; waits up to `grace` for what was committed; returns (committed, lost, redeliveries
    /// not byte-identical).
    pub async fn finish(self, grace: Duration) -> (usize, usize, usize) {
        self.cancel.cancel();
        let _ = self.writer.await;
        let end = Instant::now() + grace;
        loop {
            let missing = self.state.lock().map_or(0, |s| {
                s.committed.keys().filter(|k| !s.received.contains_key(k)).count()
            });
            if missing == 0 || Instant::now() > end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.subscription.stop().await;
        self.state.lock().map_or((0, 0, 0), |s| {
            let lost = s.committed.keys().filter(|k| !s.received.contains_key(k)).count();
            (s.committed.len(), lost, s.not_identical)
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// Replicas

/// One bridge replica: a child process with its own config file, HTTP port and MQTT client id.
pub struct Replica {
    pub name: String,
    pub http: String,
    pub client_id: String,
    child: Child,
}

impl Replica {
    fn spawn(stack: &Stack, opts: &ChaosOptions, name: &str) -> anyhow::Result<Replica> {
        let port = free_port()?;
        let client_id = format!("chaos-{name}-{}", std::process::id());
        let toml = format!(
            "{}{}",
            stack.bridge_toml(&opts.env, &client_id, &format!("127.0.0.1:{port}")),
            opts.extra_config
        );
        let cfg = stack.dir.join(format!("bridge-{name}.toml"));
        std::fs::write(&cfg, toml)?;
        let log = std::fs::File::create(stack.dir.join(format!("bridge-{name}.log")))?;
        let child = Command::new(&opts.bridge)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Replica {
            name: name.to_string(),
            http: format!("http://127.0.0.1:{port}"),
            client_id,
            child,
        })
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_default()
}

/// `delta_bridge_leader` as the replica reports it; None if it does not answer.
async fn reports_leader(http: &reqwest::Client, r: &Replica) -> Option<bool> {
    let text = http
        .get(format!("{}/metrics", r.http))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("delta_bridge_leader "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v == 1.0)
}

async fn wait_ready(http: &reqwest::Client, r: &Replica, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(resp) = http.get(format!("{}/readyz", r.http)).send().await {
            if resp.status() == reqwest::StatusCode::OK {
                return Ok(());
            }
        }
        if start.elapsed() > limit {
            anyhow::bail!("replica {} not ready after {limit:?}", r.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The backend pid holding the leader lock, from PostgreSQL's own lock table, on a fresh session (the
/// database may have restarted). None if no one holds it or the database does not answer.
async fn lock_holder(postgres: &PgConnect, lock: i64) -> Option<i32> {
    let db = tokio::time::timeout(Duration::from_secs(2), postgres())
        .await
        .ok()?
        .ok()?;
    tokio::time::timeout(
        Duration::from_secs(2),
        db.query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
                AND ((classid::bigint << 32) | objid::bigint) = $1 AND objsubid = 1",
            &[&lock],
        ),
    )
    .await
    .ok()?
    .ok()?
    .map(|r| r.get(0))
}

/// Waits until a session other than `old` holds the lock and exactly one live replica reports leading;
/// returns that replica's index.
async fn wait_leader(
    http: &reqwest::Client,
    postgres: &PgConnect,
    lock: i64,
    replicas: &[&Replica],
    old: Option<i32>,
    limit: Duration,
) -> Option<(usize, i32)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(holder) = lock_holder(postgres, lock).await {
            if Some(holder) != old {
                let mut leaders = Vec::new();
                for (i, r) in replicas.iter().enumerate() {
                    if reports_leader(http, r).await == Some(true) {
                        leaders.push(i);
                    }
                }
                if leaders.len() == 1 {
                    return Some((leaders[0], holder));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------------------
// The run

/// The fault schedule: every fault once, in a shuffled order (seeded), evenly spread.
fn schedule(opts: &ChaosOptions) -> Vec<FaultKind> {
    let mut kinds = Vec::new();
    kinds.extend(std::iter::repeat_n(FaultKind::LeaderKill, opts.leader_kills));
    kinds.extend(std::iter::repeat_n(FaultKind::BrokerKill, opts.broker_kills));
    kinds.extend(std::iter::repeat_n(FaultKind::PostgresKill, opts.postgres_kills));
    kinds.extend(std::iter::repeat_n(FaultKind::LostSession, opts.lost_sessions));
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    kinds.shuffle(&mut rng);
    kinds
}

/// Runs the load with `opts.replicas` bridge replicas against `stack` while the faults strike; returns the
/// load's report and each fault's recovery. `lock` is the bridge's leader lock key (`delta_bridge::LEADER_LOCK`).
/// Must run on a multi-threaded runtime (restarting a server blocks).
pub async fn run(stack: &mut Stack, opts: &ChaosOptions, lock: i64) -> anyhow::Result<ChaosReport> {
    let http = http_client();
    let target = stack.load_target(&opts.env);
    let postgres = target.postgres.clone();
    let say = |s: String| {
        if opts.verbose {
            eprintln!("{s}");
        }
    };

    // Replicas: the first becomes the leader (it installs the capture triggers before it is ready).
    let mut replicas: Vec<Replica> = Vec::new();
    let mut incarnation: HashMap<usize, usize> = HashMap::new();
    for i in 0..opts.replicas.max(1) {
        let r = Replica::spawn(stack, opts, &format!("r{i}-0"))?;
        wait_ready(&http, &r, Duration::from_secs(60)).await?;
        replicas.push(r);
        incarnation.insert(i, 0);
    }
    wait_leader(
        &http,
        &postgres,
        lock,
        &replicas.iter().collect::<Vec<_>>(),
        None,
        Duration::from_secs(30),
    )
    .await
    .ok_or_else(|| anyhow::anyhow!("no replica became the leader"))?;

    let probe = Probe::start(&opts.env, postgres.clone(), target.mqtt.clone()).await?;
    let load_opts = LoadOptions {
        rate: opts.rate,
        duration: opts.duration,
        writers: 8,
        merchants: 2,
        branches: 3,
        products_per_branch: 40,
        grace: opts.grace,
        progress: false,
        devices: 0,
        offline: 0.0,
    };
    let load_target = target.clone();
    let load = tokio::spawn(async move { loadgen::run(&load_target, &load_opts, CancellationToken::new()).await });

    let start = Instant::now();
    let kinds = schedule(opts);
    let warmup = (opts.duration / 10).clamp(Duration::from_secs(3), Duration::from_secs(10));
    let usable = opts.duration.saturating_sub(warmup * 2);
    let spacing = usable / (kinds.len().max(1) as u32);
    let mut outcomes = Vec::new();
    for (i, kind) in kinds.iter().copied().enumerate() {
        let due = start + warmup + spacing * (i as u32);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if start.elapsed() >= opts.duration {
            say(format!("chaos: out of time before fault {} ({})", i + 1, kind.name()));
            break;
        }
        let mut note: String;
        let mut takeover = None;
        let at;
        match kind {
            FaultKind::LeaderKill | FaultKind::LostSession => {
                let all: Vec<&Replica> = replicas.iter().collect();
                let Some((leader, holder)) =
                    wait_leader(&http, &postgres, lock, &all, None, Duration::from_secs(15)).await
                else {
                    say(format!("chaos: no single leader before fault {}; skipped", i + 1));
                    continue;
                };
                at = Instant::now();
                if kind == FaultKind::LeaderKill {
                    replicas[leader].kill();
                    note = format!("killed {}", replicas[leader].name);
                } else {
                    let db = postgres().await?;
                    let done: bool = db
                        .query_one("SELECT pg_terminate_backend($1)", &[&holder])
                        .await?
                        .get(0);
                    note = format!("terminated backend {holder} of {} ({done})", replicas[leader].name);
                }
                let live: Vec<usize> = (0..replicas.len())
                    .filter(|&j| kind == FaultKind::LostSession || j != leader)
                    .collect();
                let new = {
                    let view: Vec<&Replica> = live.iter().map(|&j| &replicas[j]).collect();
                    wait_leader(&http, &postgres, lock, &view, Some(holder), Duration::from_secs(20)).await
                };
                match new {
                    Some((j, _)) => {
                        takeover = Some(at.elapsed());
                        let _ = write!(note, "; {} leads", replicas[live[j]].name);
                    }
                    None => note.push_str("; NO TAKEOVER within 20 s"),
                }
                if kind == FaultKind::LeaderKill {
                    // The killed pod comes back, as a standby.
                    let n = incarnation.entry(leader).or_default();
                    *n += 1;
                    let name = format!("r{leader}-{n}");
                    replicas[leader] = Replica::spawn(stack, opts, &name)?;
                    wait_ready(&http, &replicas[leader], Duration::from_secs(60)).await?;
                }
            }
            FaultKind::BrokerKill => {
                at = Instant::now();
                tokio::task::block_in_place(|| stack.mqtt.kill());
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| stack.mqtt.start_again())?;
                note = format!("broker back after {:.2}s", at.elapsed().as_secs_f64());
            }
            FaultKind::PostgresKill => {
                at = Instant::now();
                tokio::task::block_in_place(|| stack.pg.kill());
                let waited = tokio::task::block_in_place(|| stack.pg.start_after_crash(Duration::from_secs(60)))?;
                note = format!(
                    "postgres accepting again after {:.2}s (old processes gone after ~{:.2}s)",
                    at.elapsed().as_secs_f64(),
                    waited.as_secs_f64()
                );
            }
        }
        let recovery = probe.wait_recovery(at, Duration::from_secs(60)).await;
        let outcome = FaultOutcome {
            kind,
            at: at.saturating_duration_since(start),
            recovery,
            takeover,
            note,
        };
        say(format!(
            "chaos: fault {}/{} at +{:.1}s {}: recovery {:?}, takeover {:?}; {}",
            i + 1,
            kinds.len(),
            outcome.at.as_secs_f64(),
            kind.name(),
            outcome.recovery,
            outcome.takeover,
            outcome.note
        ));
        outcomes.push(outcome);
    }

    let load = load.await??;
    let (probe_committed, probe_lost, probe_not_identical) = probe.finish(Duration::from_secs(30)).await;
    Ok(ChaosReport {
        load,
        faults: outcomes,
        probe_lost,
        probe_committed,
        probe_duplicates_not_identical: probe_not_identical,
    })
}
