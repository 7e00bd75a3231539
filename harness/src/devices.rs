//! Simulated offline-first devices for `delta-load --devices N --offline P` and the demo. Each device is
//! provisioned through the bridge's HTTP API, holds a persistent MQTT session (clean start off, a session
//! expiry, QoS 1) on its own branch with its own credentials, starts from a paged snapshot, and keeps a local
//! store of that branch's products and inventory the way the device guide asks:
//!
//! - `last_branch_seq` is the newest branch event applied; an event at or below it is a duplicate (skipped);
//!   one above `last + 1` is a gap, filled from `GET /api/v1/changes?after=last` until `up_to_date`;
//! - per row, an event whose `seq` is not above the row's last `seq` is stale and dropped;
//! - `410 resync_required` means a fresh snapshot, then the changes after the smallest `as_of` of its pages.
//!
//! Devices go offline for random periods (some longer than the broker will queue for them), and on every
//! reconnect first apply what the broker hands over, then ask the API for whatever is still missing. At the
//! end each device's store is compared with the database's rows of its branch. [`DeviceState`] is the pure
//! part (no I/O), so that the comparison and the apply rules are unit-tested on their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rumqttc::v5::MqttOptions;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::subscriber::{self, Subscription};

/// A product as a device stores it: what `product_updated` and `stock_updated` carry. `None` until an event
/// or the snapshot said it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Product {
    pub name: Option<String>,
    /// Two decimals, as the database's `to_char(price, 'FM...0.00')` prints it.
    pub price: Option<String>,
    pub stock: Option<i64>,
}

/// An inventory row as a device stores it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub product_id: Option<i64>,
    pub quantity: Option<i64>,
}

/// One row of the local store: the `seq` of the newest event applied to it, and its fields, or `None` once a
/// delete was applied (kept as a tombstone so that a stale update arriving later cannot bring it back).
#[derive(Clone, Debug)]
struct Row<T> {
    seq: i64,
    fields: Option<T>,
}

/// What [`DeviceState::offer`] made of an event received over MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `branch_seq` at or below the last one applied: already seen (a redelivery, or caught up through the API).
    Duplicate,
    /// The next event of the branch: applied.
    Applied,
    /// The event is further ahead than the next one: the events in between must be fetched first. Nothing
    /// was applied.
    Gap { last: i64, got: i64 },
    /// No integer `branch_seq`: ignored.
    Unnumbered,
    /// The event comes from another installation of the bridge's database objects (the part of `event_id`
    /// before the first `-` changed): numbering started again, so the store needs a snapshot. Nothing applied.
    Reinstalled,
}

/// A device's local store of its branch.
#[derive(Clone, Debug, Default)]
pub struct DeviceState {
    /// The newest `branch_seq` applied (0: none yet).
    pub last_branch_seq: i64,
    products: HashMap<i64, Row<Product>>,
    inventory: HashMap<i64, Row<Inventory>>,
    /// Pages of `changes` whose events did not follow each other (must stay 0; says the API skipped numbers).
    pub pages_not_contiguous: u64,
    /// The installation the numbering belongs to: the part of `event_id` before the first `-`.
    installation: Option<String>,
}

fn installation(ev: &Value) -> Option<&str> {
    ev["event_id"]
        .as_str()
        .and_then(|id| id.split_once('-'))
        .map(|(i, _)| i)
}

fn price_text(v: &Value) -> Option<String> {
    v.as_f64().map(|p| format!("{p:.2}"))
}

impl DeviceState {
    /// An event received over MQTT: skipped, applied, or reported as a gap (then nothing is applied; the
    /// caller fills the gap and offers the event again).
    pub fn offer(&mut self, ev: &Value) -> Step {
        let Some(bs) = ev["branch_seq"].as_i64() else {
            return Step::Unnumbered;
        };
        match (installation(ev), self.installation.as_deref()) {
            (Some(theirs), Some(ours)) if theirs != ours => return Step::Reinstalled,
            (Some(theirs), None) => self.installation = Some(theirs.to_string()),
            _ => {}
        }
        if bs <= self.last_branch_seq {
            return Step::Duplicate;
        }
        if bs > self.last_branch_seq + 1 {
            return Step::Gap {
                last: self.last_branch_seq,
                got: bs,
            };
        }
        self.apply_row(ev);
        self.last_branch_seq = bs;
        Step::Applied
    }

    /// Applies an event even though events before it are missing (a gap that could not be filled): the store
    /// moves on, and the final comparison shows what was lost.
    pub fn force(&mut self, ev: &Value) {
        if let Some(bs) = ev["branch_seq"].as_i64().filter(|bs| *bs > self.last_branch_seq) {
            self.apply_row(ev);
            self.last_branch_seq = bs;
        }
    }

    /// One page of `GET /api/v1/changes`: every event above `last_branch_seq`, in order.
    pub fn apply_changes(&mut self, events: &[Value]) {
        for ev in events {
            let Some(bs) = ev["branch_seq"].as_i64() else { continue };
            if let Some(i) = installation(ev) {
                self.installation = Some(i.to_string());
            }
            if bs <= self.last_branch_seq {
                continue;
            }
            if bs != self.last_branch_seq + 1 {
                self.pages_not_contiguous += 1;
            }
            self.apply_row(ev);
            self.last_branch_seq = bs;
        }
    }

    /// Replaces the store with a snapshot's pages; `last_branch_seq` becomes the smallest `as_of` of them,
    /// so that the changes after it (stale ones dropped per row) bring the store to the database's state.
    pub fn reset_from_snapshot(&mut self, pages: &[Value]) {
        self.products.clear();
        self.inventory.clear();
        // Learnt again from the next event: the snapshot does not say it.
        self.installation = None;
        let mut as_of = i64::MAX;
        for page in pages {
            as_of = as_of.min(page["as_of"].as_i64().unwrap_or(0));
            for p in page["products"].as_array().into_iter().flatten() {
                let Some(id) = p["product_id"].as_i64() else { continue };
                self.put_product(id, p["seq"].as_i64().unwrap_or(i64::MIN), p);
            }
            for i in page["inventory"].as_array().into_iter().flatten() {
                let Some(id) = i["inventory_id"].as_i64() else { continue };
                let row = Inventory {
                    product_id: i["product_id"].as_i64(),
                    quantity: i["quantity"].as_i64(),
                };
                self.newer_inventory(id, i["seq"].as_i64().unwrap_or(i64::MIN), Some(row));
            }
        }
        self.last_branch_seq = if as_of == i64::MAX { 0 } else { as_of };
    }

    fn put_product(&mut self, id: i64, seq: i64, d: &Value) {
        let e = self.products.entry(id).or_insert(Row {
            seq: i64::MIN,
            fields: None,
        });
        if seq <= e.seq && e.seq != i64::MIN {
            return;
        }
        e.seq = seq;
        e.fields = Some(Product {
            name: d["product_name"].as_str().map(str::to_string),
            price: price_text(&d["price"]),
            stock: d["stock"].as_i64(),
        });
    }

    fn newer_inventory(&mut self, id: i64, seq: i64, fields: Option<Inventory>) {
        let e = self.inventory.entry(id).or_insert(Row {
            seq: i64::MIN,
            fields: None,
        });
        if seq <= e.seq && e.seq != i64::MIN {
            return;
        }
        *e = Row { seq, fields };
    }

    /// The per-row rule: an event whose `seq` is not above its row's is stale and dropped.
    fn apply_row(&mut self, ev: &Value) {
        let seq = ev["seq"].as_i64().unwrap_or(i64::MIN);
        let d = &ev["data"];
        match ev["event_type"].as_str() {
            Some("product_updated") => {
                if let Some(id) = d["product_id"].as_i64() {
                    self.put_product(id, seq, d);
                }
            }
            Some("stock_updated") => {
                let Some(id) = d["product_id"].as_i64() else { return };
                let e = self.products.entry(id).or_insert(Row {
                    seq: i64::MIN,
                    fields: None,
                });
                if seq <= e.seq && e.seq != i64::MIN {
                    return;
                }
                e.seq = seq;
                let f = e.fields.get_or_insert_with(Product::default);
                f.stock = d["new_stock"].as_i64();
                if let Some(n) = d["product_name"].as_str() {
                    f.name = Some(n.to_string());
                }
            }
            Some("product_deleted") => {
                if let Some(id) = d["product_id"].as_i64() {
                    let e = self.products.entry(id).or_insert(Row {
                        seq: i64::MIN,
                        fields: None,
                    });
                    if seq > e.seq || e.seq == i64::MIN {
                        *e = Row { seq, fields: None };
                    }
                }
            }
            Some("quantity_updated") => {
                if let Some(id) = d["inventory_id"].as_i64() {
                    let row = Inventory {
                        product_id: d["product_id"].as_i64(),
                        quantity: d["new_quantity"].as_i64(),
                    };
                    self.newer_inventory(id, seq, Some(row));
                }
            }
            Some("inventory_deleted") => {
                if let Some(id) = d["inventory_id"].as_i64() {
                    self.newer_inventory(id, seq, None);
                }
            }
            // Sales and unknown types: the store keeps products and inventory only.
            _ => {}
        }
    }

    /// Rows whose stored value differs from the database's (`db_products` and `db_inventory` are every row
    /// of the device's branch): a row missing on either side counts, as does any field that differs.
    pub fn compare(&self, db_products: &HashMap<i64, Product>, db_inventory: &HashMap<i64, Inventory>) -> u64 {
        fn diff<T: PartialEq>(mine: &HashMap<i64, Row<T>>, db: &HashMap<i64, T>) -> u64 {
            let live = |id: &i64| mine.get(id).and_then(|r| r.fields.as_ref());
            let mut bad = db.iter().filter(|(id, v)| live(id) != Some(*v)).count() as u64;
            bad += mine
                .iter()
                .filter(|(id, r)| r.fields.is_some() && !db.contains_key(id))
                .count() as u64;
            bad
        }
        diff(&self.products, db_products) + diff(&self.inventory, db_inventory)
    }

    /// Live rows (products, inventory).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.products.values().filter(|r| r.fields.is_some()).count(),
            self.inventory.values().filter(|r| r.fields.is_some()).count(),
        )
    }
}

/// One branch's products and inventory by id.
pub type BranchRows = (HashMap<i64, Product>, HashMap<i64, Inventory>);

/// The database's products and inventory of one branch, as [`DeviceState::compare`] takes them.
pub async fn branch_rows(db: &tokio_postgres::Client, branch_id: i64) -> anyhow::Result<BranchRows> {
    let mut products = HashMap::new();
    for r in db
        .query(
            "SELECT id, name, to_char(price, 'FM999999999990.00'), stock::bigint FROM products WHERE branch_id = $1",
            &[&branch_id],
        )
        .await?
    {
        products.insert(
            r.get::<_, i64>(0),
            Product {
                name: r.get(1),
                price: r.get(2),
                stock: r.get(3),
            },
        );
    }
    let mut inventory = HashMap::new();
    for r in db
        .query(
            "SELECT id, product_id, quantity::bigint FROM inventory WHERE branch_id = $1",
            &[&branch_id],
        )
        .await?
    {
        inventory.insert(
            r.get::<_, i64>(0),
            Inventory {
                product_id: r.get(1),
                quantity: r.get(2),
            },
        );
    }
    Ok((products, inventory))
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("410 resync_required: the changes asked for are no longer retained")]
    ResyncRequired,
    #[error("429 or 503: the API is busy")]
    Busy,
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("unexpected answer: {0}")]
    Body(String),
}

/// The bridge's HTTP API as a device (and the admin provisioning it) uses it.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub admin_token: String,
    http: reqwest::Client,
}

/// One page of `GET /api/v1/changes`.
pub struct ChangesPage {
    pub events: Vec<Value>,
    pub next_after: i64,
    pub up_to_date: bool,
}

impl Api {
    pub fn new(base: &str, admin_token: &str) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            admin_token: admin_token.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    /// `POST /api/v1/devices`: the device's MQTT username and password (the JWT, also its API token).
    pub async fn provision(
        &self,
        device_id: &str,
        merchant: &str,
        branch: &str,
        ttl: Duration,
    ) -> Result<(String, String), ApiError> {
        let body = serde_json::json!({"device_id": device_id, "merchant_code": merchant,
                                      "branch_code": branch, "ttl_seconds": ttl.as_secs()});
        let v = self
            .send(
                self.http.post(format!("{}/api/v1/devices", self.base)).json(&body),
                &self.admin_token,
            )
            .await?;
        match (v["username"].as_str(), v["password"].as_str()) {
            (Some(u), Some(p)) => Ok((u.to_string(), p.to_string())),
            _ => Err(ApiError::Body(v.to_string())),
        }
    }

    /// `GET /api/v1/changes?after=N&limit=L` with the device's token.
    pub async fn changes(&self, token: &str, after: i64, limit: u32) -> Result<ChangesPage, ApiError> {
        let url = format!("{}/api/v1/changes?after={after}&limit={limit}", self.base);
        let v = self.send(self.http.get(url), token).await?;
        let (Some(events), Some(next_after), Some(up_to_date)) = (
            v["events"].as_array(),
            v["next_after"].as_i64(),
            v["up_to_date"].as_bool(),
        ) else {
            return Err(ApiError::Body(v.to_string()));
        };
        Ok(ChangesPage {
            events: events.clone(),
            next_after,
            up_to_date,
        })
    }

    /// Every page of `GET /api/v1/snapshot`, following `next_cursor`.
    pub async fn snapshot(&self, token: &str) -> Result<Vec<Value>, ApiError> {
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut req = self.http.get(format!("{}/api/v1/snapshot", self.base));
            req = req.query(&[("limit", "500")]);
            if let Some(c) = &cursor {
                req = req.query(&[("cursor", c.as_str())]);
            }
            let page = self.send(req, token).await?;
            if page.get("as_of").and_then(Value::as_i64).is_none() {
                return Err(ApiError::Body(page.to_string()));
            }
            cursor = page["next_cursor"].as_str().map(str::to_string);
            pages.push(page);
            if cursor.is_none() {
                return Ok(pages);
            }
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, token: &str) -> Result<Value, ApiError> {
        let resp = req.bearer_auth(token).send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        if status == 410 {
            return Err(ApiError::ResyncRequired);
        }
        if status == 503 || status == 429 {
            return Err(ApiError::Busy);
        }
        if !(200..300).contains(&status) {
            return Err(ApiError::Status { status, body: text });
        }
        serde_json::from_str(&text).map_err(|_| ApiError::Body(text))
    }
}

/// Counters shared by all devices of a run.
#[derive(Default)]
pub struct Stats {
    pub gaps_detected: AtomicU64,
    pub gaps_filled: AtomicU64,
    pub offline_periods: AtomicU64,
    pub snapshots: AtomicU64,
    pub resyncs: AtomicU64,
    pub catchup_errors: AtomicU64,
    /// 503 answers (the API bounds its sessions): retried after a pause, not errors.
    pub catchup_busy: AtomicU64,
    pub events_fetched: AtomicU64,
    /// Milliseconds of each `changes` request.
    pub catchup_ms: Mutex<Vec<f64>>,
    /// The first few errors (for diagnosis).
    pub errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, what: String) {
        self.catchup_errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 5 {
                e.push(what);
            }
        }
    }
}

/// A device's handle on the API with its own token, counting what it does.
pub struct Catchup<'a> {
    pub api: &'a Api,
    pub token: &'a str,
    pub stats: &'a Stats,
}

impl Catchup<'_> {
    /// `changes?after=last` until `up_to_date`, applied to `state`; on 410 a snapshot first. Returns the
    /// events fetched.
    pub async fn catch_up(&self, state: &mut DeviceState) -> Result<Vec<Value>, ApiError> {
        let mut fetched = Vec::new();
        let mut resynced = false;
        loop {
            let t = Instant::now();
            let page = self.api.changes(self.token, state.last_branch_seq, 500).await;
            if let Ok(mut l) = self.stats.catchup_ms.lock() {
                l.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            match page {
                Ok(page) => {
                    let empty = page.events.is_empty();
                    self.stats
                        .events_fetched
                        .fetch_add(page.events.len() as u64, Ordering::Relaxed);
                    state.apply_changes(&page.events);
                    fetched.extend(page.events);
                    if page.up_to_date {
                        return Ok(fetched);
                    }
                    if empty || page.next_after < state.last_branch_seq {
                        // Not up to date yet nothing new: asking again would loop.
                        return Err(ApiError::Body(format!(
                            "an empty page that is not up to date (next_after {})",
                            page.next_after
                        )));
                    }
                }
                Err(ApiError::ResyncRequired) if !resynced => {
                    self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
                    self.snapshot(state).await?;
                    resynced = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A fresh snapshot into `state` (then the caller catches up from its `as_of`).
    pub async fn snapshot(&self, state: &mut DeviceState) -> Result<(), ApiError> {
        let pages = self.api.snapshot(self.token).await?;
        self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        state.reset_from_snapshot(&pages);
        Ok(())
    }
}

/// Where a simulated device lives: its branch's codes and id.
#[derive(Clone, Debug)]
pub struct BranchRef {
    pub merchant: String,
    pub code: String,
    pub id: i64,
}

/// What the fleet needs to run.
#[derive(Clone)]
pub struct FleetOptions {
    pub devices: usize,
    /// Fraction of the devices offline at any time, in [0, 1).
    pub offline: f64,
    /// How long the load writes (offline periods scale with it).
    pub duration: Duration,
    /// The topic root (`env`).
    pub env: String,
    /// The broker as the load reaches it (TLS included); client id and credentials are set per device.
    pub mqtt: MqttOptions,
}

/// The devices of a run, running until [`Fleet::finish`].
pub struct Fleet {
    stats: Arc<Stats>,
    done: CancellationToken,
    tasks: Vec<(BranchRef, tokio::task::JoinHandle<DeviceState>)>,
}

/// The fleet's part of the load report.
#[derive(Debug, Default, Serialize, Clone)]
pub struct FleetReport {
    pub devices: u64,
    /// Devices whose final store differs from the database's rows of their branch (the load report adds
    /// it into its own `device_mismatches`).
    #[serde(skip)]
    pub device_mismatches: u64,
    /// Rows that differ, over all devices.
    pub device_mismatched_rows: u64,
    /// Jumps in `branch_seq` seen over MQTT.
    pub gaps_detected: u64,
    /// Of those, filled through `changes` before the event that revealed them was applied.
    pub gaps_filled: u64,
    pub offline_periods: u64,
    pub snapshots: u64,
    /// 410 answers (then a snapshot).
    pub resyncs: u64,
    pub catchup_requests: u64,
    pub catchup_errors: u64,
    /// 503 answers, retried.
    pub catchup_busy: u64,
    /// Events received through `changes` (the ones MQTT did not bring in time).
    pub events_fetched: u64,
    pub pages_not_contiguous: u64,
    /// Latency of each `changes` request.
    pub catchup_latency_ms: CatchupLatency,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct CatchupLatency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Fleet {
    /// Provisions `opts.devices` devices spread over `branches` (device i on branch i mod n) and starts them.
    pub async fn start(api: Api, branches: &[BranchRef], opts: &FleetOptions, run: u32) -> anyhow::Result<Fleet> {
        anyhow::ensure!(!branches.is_empty(), "no branches for the devices");
        let stats = Arc::new(Stats::default());
        let done = CancellationToken::new();
        // Long enough for the run and its wait for stragglers, so that no token expires mid-run.
        let ttl = opts.duration + Duration::from_secs(3600);
        let api = Arc::new(api);
        let mut tasks = Vec::new();
        for i in 0..opts.devices {
            let branch = branches[i % branches.len()].clone();
            let id = format!("load-{run}-{i:03}");
            let (user, token) = api
                .provision(&id, &branch.merchant, &branch.code, ttl)
                .await
                .map_err(|e| anyhow::anyhow!("cannot provision device {id}: {e}"))?;
            let mut mqtt = opts.mqtt.clone();
            mqtt.set_client_id(id.clone());
            mqtt.set_credentials(user, token.clone());
            mqtt.set_clean_start(false);
            mqtt.set_session_expiry_interval(Some(u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)));
            mqtt.set_max_packet_size(Some(16 * 1024 * 1024));
            let sim = SimDevice {
                filter: format!("{}/{}/{}/#", opts.env, branch.merchant, branch.code),
                mqtt,
                token,
                api: api.clone(),
                stats: stats.clone(),
                done: done.clone(),
                offline: opts.offline.clamp(0.0, 0.95),
                duration: opts.duration,
                seed: u64::from(run) * 10_000 + i as u64,
            };
            tasks.push((branch, tokio::spawn(sim.run())));
        }
        Ok(Fleet { stats, done, tasks })
    }

    /// Brings every device online, lets it catch up (call this once the bridge has delivered everything),
    /// and compares each store with the database.
    pub async fn finish(self, db: &tokio_postgres::Client) -> anyhow::Result<FleetReport> {
        self.done.cancel();
        let mut report = FleetReport {
            devices: self.tasks.len() as u64,
            ..Default::default()
        };
        let mut states = Vec::new();
        for (branch, task) in self.tasks {
            states.push((branch.id, task.await?));
        }
        // Read once every device is done: the database no longer changes.
        let mut rows: HashMap<i64, BranchRows> = HashMap::new();
        for (id, _) in &states {
            if let std::collections::hash_map::Entry::Vacant(e) = rows.entry(*id) {
                e.insert(branch_rows(db, *id).await?);
            }
        }
        for (id, state) in states {
            let Some((p, i)) = rows.get(&id) else { continue };
            let bad = state.compare(p, i);
            report.device_mismatched_rows += bad;
            report.device_mismatches += u64::from(bad > 0);
            report.pages_not_contiguous += state.pages_not_contiguous;
        }
        let s = &self.stats;
        report.gaps_detected = s.gaps_detected.load(Ordering::Relaxed);
        report.gaps_filled = s.gaps_filled.load(Ordering::Relaxed);
        report.offline_periods = s.offline_periods.load(Ordering::Relaxed);
        report.snapshots = s.snapshots.load(Ordering::Relaxed);
        report.resyncs = s.resyncs.load(Ordering::Relaxed);
        report.catchup_errors = s.catchup_errors.load(Ordering::Relaxed);
        report.catchup_busy = s.catchup_busy.load(Ordering::Relaxed);
        report.events_fetched = s.events_fetched.load(Ordering::Relaxed);
        report.errors = s.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let mut l = s.catchup_ms.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_by(|a, b| a.total_cmp(b));
        report.catchup_requests = l.len() as u64;
        report.catchup_latency_ms = CatchupLatency {
            p50: crate::loadgen::percentile(&l, 50.0),
            p99: crate::loadgen::percentile(&l, 99.0),
            max: l.last().copied().unwrap_or_default(),
        };
        Ok(report)
    }
}

struct SimDevice {
    filter: String,
    mqtt: MqttOptions,
    token: String,
    api: Arc<Api>,
    stats: Arc<Stats>,
    done: CancellationToken,
    offline: f64,
    duration: Duration,
    seed: u64,
}

impl SimDevice {
    /// A random offline period: most short (1-8 s), one in four long (up to a quarter of the run, at most
    /// two minutes); with any realistic rate both outlast a small broker queue.
    fn offline_period(&self, rng: &mut impl Rng) -> Duration {
        let long_max = (self.duration.as_secs_f64() / 4.0).clamp(2.0, 120.0);
        if rng.random_bool(0.25) {
            Duration::from_secs_f64(rng.random_range(long_max / 2.0..=long_max))
        } else {
            Duration::from_secs_f64(rng.random_range(1.0..8.0_f64.min(long_max).max(1.5)))
        }
    }

    /// The mean offline period of [`SimDevice::offline_period`]; online periods are drawn so that the
    /// fraction offline is `self.offline`.
    fn mean_offline(&self) -> f64 {
        let long_max = (self.duration.as_secs_f64() / 4.0).clamp(2.0, 120.0);
        let short_max = 8.0_f64.min(long_max).max(1.5);
        0.25 * (0.75 * long_max) + 0.75 * (1.0 + short_max) / 2.0
    }

    fn online_period(&self, rng: &mut impl Rng) -> Duration {
        if self.offline <= 0.0 {
            return self.duration * 10;
        }
        let mean = self.mean_offline() * (1.0 - self.offline) / self.offline;
        // Exponential, so that devices do not drift into lockstep.
        let u: f64 = rng.random_range(0.001..1.0);
        Duration::from_secs_f64(-mean * u.ln())
    }

    async fn connect(&self, tx: &mpsc::UnboundedSender<Value>) -> Option<Subscription> {
        for attempt in 0..20 {
            let tx = tx.clone();
            match subscriber::subscribe(self.mqtt.clone(), &self.filter, Duration::from_secs(10), move |p| {
                if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                    let _ = tx.send(v);
                }
            })
            .await
            {
                Ok(s) => return Some(s),
                Err(e) => {
                    if attempt == 19 {
                        self.stats.error(format!("{}: cannot connect: {e}", self.filter));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        None
    }

    fn catchup(&self) -> Catchup<'_> {
        Catchup {
            api: &self.api,
            token: &self.token,
            stats: &self.stats,
        }
    }

    /// Pauses after a failed API call: a 503 (the API's sessions are all busy) is expected under a burst of
    /// reconnects and counted apart; anything else is an error.
    async fn pause_after(&self, what: &str, e: &ApiError) {
        if matches!(e, ApiError::Busy) {
            self.stats.catchup_busy.fetch_add(1, Ordering::Relaxed);
            let ms = rand::rng().random_range(100..400);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else {
            self.stats.error(format!("{what}: {e}"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Catches up, retrying a failed call a few times; false if it did not get to `up_to_date`.
    async fn catch_up(&self, state: &mut DeviceState) -> bool {
        for _ in 0..10 {
            match self.catchup().catch_up(state).await {
                Ok(_) => return true,
                Err(e) => self.pause_after("changes", &e).await,
            }
        }
        false
    }

    async fn snapshot(&self, state: &mut DeviceState) {
        for _ in 0..10 {
            match self.catchup().snapshot(state).await {
                Ok(()) => return,
                Err(e) => self.pause_after("snapshot", &e).await,
            }
        }
    }

    /// An event from MQTT: applied, skipped, or (a jump) the gap filled through the API first.
    async fn handle(&self, state: &mut DeviceState, ev: &Value) {
        let got = match state.offer(ev) {
            Step::Gap { got, .. } => got,
            Step::Reinstalled => {
                // Numbering started again: a fresh snapshot, then the changes after it.
                self.snapshot(state).await;
                self.catch_up(state).await;
                let _ = state.offer(ev);
                return;
            }
            _ => return,
        };
        self.stats.gaps_detected.fetch_add(1, Ordering::Relaxed);
        // The change log holds an event before the broker has it, so one round normally fills the gap; a few
        // more cover a numbering that is committed but not yet readable.
        for _ in 0..30 {
            if !self.catch_up(state).await || state.last_branch_seq >= got - 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if state.last_branch_seq >= got - 1 {
            self.stats.gaps_filled.fetch_add(1, Ordering::Relaxed);
            let _ = state.offer(ev);
        } else {
            self.stats.error(format!(
                "{}: gap before branch_seq {got} not filled (last {})",
                self.filter, state.last_branch_seq
            ));
            state.force(ev);
        }
    }

    /// Applies what the broker hands over right after a (re)connect: until nothing came for 300 ms.
    async fn settle(&self, state: &mut DeviceState, rx: &mut mpsc::UnboundedReceiver<Value>) {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                Ok(Some(ev)) => self.handle(state, &ev).await,
                _ => return,
            }
        }
    }

    async fn run(self) -> DeviceState {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let mut state = DeviceState::default();
        // A share of the devices joins late (offline at the start), as a new tablet joins a branch.
        if rng.random_bool(self.offline.clamp(0.0, 1.0)) {
            let wait = self.offline_period(&mut rng);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.done.cancelled() => {}
            }
        }
        // Subscribe first, so that the snapshot and the stream overlap instead of leaving a hole between them.
        let mut session = self.connect(&tx).await;
        self.snapshot(&mut state).await;
        self.catch_up(&mut state).await;
        loop {
            let online_until = Instant::now() + self.online_period(&mut rng);
            loop {
                tokio::select! {
                    ev = rx.recv() => {
                        if let Some(ev) = ev {
                            self.handle(&mut state, &ev).await;
                        }
                    }
                    _ = tokio::time::sleep_until(online_until.into()) => break,
                    _ = self.done.cancelled() => break,
                }
            }
            if self.done.is_cancelled() {
                break;
            }
            // Offline: the session stays on the broker, which queues for it up to its limit.
            if let Some(s) = session.take() {
                s.stop().await;
            }
            self.stats.offline_periods.fetch_add(1, Ordering::Relaxed);
            let wait = self.offline_period(&mut rng);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.done.cancelled() => {}
            }
            session = self.connect(&tx).await;
            self.settle(&mut state, &mut rx).await;
            self.catch_up(&mut state).await;
        }
        // The end: online, everything the broker still holds applied, then the API asked for the rest.
        if session.is_none() {
            session = self.connect(&tx).await;
        }
        self.settle(&mut state, &mut rx).await;
        self.catch_up(&mut state).await;
        if let Some(s) = session.take() {
            s.stop().await;
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stock(bs: i64, seq: i64, id: i64, new_stock: i64) -> Value {
        json!({"event_type": "stock_updated", "branch_seq": bs, "seq": seq,
               "data": {"product_id": id, "product_name": "A", "new_stock": new_stock}})
    }

    fn snapshot_page(as_of: i64) -> Value {
        json!({"as_of": as_of, "next_cursor": null,
               "products": [{"product_id": 1, "product_name": "A", "price": 5.5, "stock": 10, "updated_by": "x", "seq": 3}],
               "inventory": [{"inventory_id": 7, "product_id": 1, "product_name": "A", "quantity": 10, "updated_by": "x", "seq": 4}]})
    }

    fn db() -> (HashMap<i64, Product>, HashMap<i64, Inventory>) {
        let p = Product {
            name: Some("A".into()),
            price: Some("5.50".into()),
            stock: Some(8),
        };
        let i = Inventory {
            product_id: Some(1),
            quantity: Some(10),
        };
        (HashMap::from([(1, p)]), HashMap::from([(7, i)]))
    }

    #[test]
    fn duplicates_are_skipped_and_jumps_are_gaps() {
        let mut s = DeviceState::default();
        s.reset_from_snapshot(&[snapshot_page(5)]);
        assert_eq!(s.last_branch_seq, 5);
        assert_eq!(s.offer(&stock(5, 9, 1, 1)), Step::Duplicate);
        assert_eq!(s.offer(&stock(8, 9, 1, 1)), Step::Gap { last: 5, got: 8 });
        assert_eq!(s.offer(&stock(6, 9, 1, 9)), Step::Applied);
        // A stale per-row seq moves last_branch_seq but not the row.
        assert_eq!(s.offer(&stock(7, 8, 1, 99)), Step::Applied);
        assert_eq!(s.last_branch_seq, 7);
        let (p, i) = db();
        assert_eq!(s.compare(&p, &i), 1, "stock is 9, the database says 8");
        assert_eq!(s.offer(&stock(8, 10, 1, 8)), Step::Applied);
        assert_eq!(s.compare(&p, &i), 0);
    }

    #[test]
    fn another_installation_asks_for_a_snapshot() {
        let mut s = DeviceState::default();
        let ev = |id: &str, bs: i64| json!({"event_type": "x", "event_id": id, "branch_seq": bs, "seq": bs});
        assert_eq!(s.offer(&ev("aa-1", 1)), Step::Applied);
        assert_eq!(s.offer(&ev("bb-1", 2)), Step::Reinstalled);
        assert_eq!(s.last_branch_seq, 1);
        s.reset_from_snapshot(&[snapshot_page(0)]);
        assert_eq!(s.offer(&ev("bb-1", 1)), Step::Applied);
    }

    #[test]
    fn a_device_that_skips_a_fetched_page_is_a_mismatch() {
        let (p, i) = db();
        let page = vec![stock(6, 9, 1, 9), stock(7, 10, 1, 8)];
        let mut good = DeviceState::default();
        good.reset_from_snapshot(&[snapshot_page(5)]);
        good.apply_changes(&page);
        assert_eq!(good.compare(&p, &i), 0);
        assert_eq!(good.last_branch_seq, 7);

        // The faulty device moves its cursor past the page without applying it.
        let mut faulty = DeviceState::default();
        faulty.reset_from_snapshot(&[snapshot_page(5)]);
        faulty.last_branch_seq = 7;
        assert_eq!(faulty.compare(&p, &i), 1);
    }

    #[test]
    fn deletes_remove_rows_and_stale_updates_do_not_revive_them() {
        let mut s = DeviceState::default();
        s.reset_from_snapshot(&[snapshot_page(5)]);
        let del = json!({"event_type": "inventory_deleted", "branch_seq": 6, "seq": 20,
                         "data": {"inventory_id": 7, "product_id": 1, "updated_by": "x"}});
        let stale = json!({"event_type": "quantity_updated", "branch_seq": 7, "seq": 19,
                           "data": {"inventory_id": 7, "product_id": 1, "new_quantity": 3}});
        let pdel = json!({"event_type": "product_deleted", "branch_seq": 8, "seq": 21,
                          "data": {"product_id": 1, "product_name": "A", "updated_by": "x"}});
        s.apply_changes(&[del, stale, pdel]);
        assert_eq!(s.counts(), (0, 0));
        assert_eq!(s.compare(&HashMap::new(), &HashMap::new()), 0);
        let (p, i) = db();
        assert_eq!(
            s.compare(&p, &i),
            2,
            "rows the database still has are missing on the device"
        );
    }

    #[test]
    fn snapshot_pages_start_from_the_smallest_as_of_and_a_hole_in_a_page_is_counted() {
        let mut s = DeviceState::default();
        s.reset_from_snapshot(&[snapshot_page(9), snapshot_page(4)]);
        assert_eq!(s.last_branch_seq, 4);
        s.apply_changes(&[stock(5, 11, 1, 8), stock(7, 12, 1, 8)]);
        assert_eq!(s.pages_not_contiguous, 1);
    }
}
