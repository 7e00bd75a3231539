//! Test harness: a private PostgreSQL and Mosquitto per test (free loopback ports, own directory), the
//! reference schema with sample data, a bridge in-process or as a real process, and an MQTT 5 subscriber
//! that records what a device would receive. Waits for SUBACK and readiness instead of sleeping.
#![allow(dead_code)]

pub mod catchup_client;
pub mod certs;
pub mod dynsec;
pub mod netns;
pub mod raw_http;

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use delta_bridge::config::Config;
use delta_harness::loadgen::{Report, Target};
use delta_harness::servers::{LocalEnvError, Mosquitto};
use delta_harness::stack::{Stack, StackOptions, DATABASE};
use delta_harness::subscriber::{self, Subscription};
use rumqttc::v5::MqttOptions;
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// A new, empty directory for a test's own files.
pub fn temp_dir(tag: &str) -> PathBuf {
    delta_harness::stack::temp_dir(&format!("test-{tag}")).expect("temp dir")
}

pub const SAMPLE_DATA: &str = "
INSERT INTO merchants (code, name) VALUES ('MCH-MST-001', 'Toko Maju'), ('MCH-OTHER-002', 'Other Mart');
INSERT INTO branches (merchant_id, code, name) VALUES
  (1, 'BRN-MST-OSK00001', 'Osaka 1'), (1, 'BRN-MST-OSK00002', 'Osaka 2'), (2, 'BRN-MST-OSK00001', 'Same code, other merchant');
INSERT INTO products (branch_id, name, price, stock)
  SELECT b, 'Product ' || b || '-' || i, 10 + i, 100 FROM generate_series(1, 3) b, generate_series(1, 20) i;
INSERT INTO inventory (branch_id, product_id, quantity) SELECT branch_id, id, 50 FROM products;
";

/// A test's private servers (the harness's [`Stack`] with the sample data), plus the ways a test starts
/// bridges against them. Dereferences to the stack: `env.pg`, `env.mqtt`, `env.dir`.
pub struct Env {
    stack: Stack,
    /// The database name, for `env.pg.psql(&env.db, ..)`.
    pub db: String,
}

impl Deref for Env {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.stack
    }
}

impl DerefMut for Env {
    fn deref_mut(&mut self) -> &mut Stack {
        &mut self.stack
    }
}

impl Env {
    /// PostgreSQL with the reference schema and sample data, and Mosquitto.
    pub fn start(tag: &str) -> Env {
        Self::start_with(StackOptions::new(tag))
    }

    /// Like [`Env::start`], with the broker started by `start_mqtt` in the given directory.
    pub fn start_with_mqtt(tag: &str, start_mqtt: impl FnOnce(&Path) -> Mosquitto + 'static) -> Env {
        let start = move |d: &Path| -> Result<Mosquitto, LocalEnvError> { Ok(start_mqtt(d)) };
        Self::start_with(StackOptions {
            mqtt: Some(Box::new(start)),
            ..StackOptions::new(tag)
        })
    }

    /// Like [`Env::start`], with the stack's options (extra listen addresses, a broker of one's own).
    pub fn start_with(opts: StackOptions<'_>) -> Env {
        let stack = Stack::start(StackOptions {
            tag: &format!("test-{}", opts.tag),
            seed: Some(SAMPLE_DATA),
            ..opts
        })
        .expect("private PostgreSQL and Mosquitto");
        Env {
            stack,
            db: DATABASE.to_string(),
        }
    }

    /// Config pointing at this environment; `extra` is TOML appended (sections after the defaults).
    pub fn config_toml(&self, extra: &str) -> String {
        let client_id = format!(
            "bridge-{}",
            self.dir.file_name().and_then(|s| s.to_str()).unwrap_or("x")
        );
        format!(
            "{}[bridge]\npoll_interval = \"200ms\"\n{extra}",
            self.bridge_toml("dev", &client_id, "127.0.0.1:0")
        )
    }

    pub fn config(&self) -> Config {
        Config::parse(&self.config_toml(""), Path::new("test.toml"), &[]).expect("config")
    }

    /// What the load engine drives: this environment, topic root `dev`.
    pub fn load_target(&self) -> Target {
        self.stack.load_target("dev")
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.pg_url()).await
    }

    /// Starts the bridge in this process, on a free port; waits until /readyz says ready.
    pub async fn bridge(&self) -> InProcessBridge {
        self.replica("bridge").await
    }

    /// Like [`Env::bridge`], with its own MQTT client id (several replicas in one test).
    pub async fn replica(&self, name: &str) -> InProcessBridge {
        let toml = self
            .config_toml("")
            .replace("client_id = \"bridge-", &format!("client_id = \"{name}-"));
        let cfg = Config::parse(&toml, Path::new("test.toml"), &[]).expect("config");
        self.bridge_with(cfg).await
    }

    /// Starts the bridge in this process with the given configuration; waits until /readyz says ready.
    pub async fn bridge_with(&self, cfg: Config) -> InProcessBridge {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cancel = CancellationToken::new();
        let running = delta_bridge::service::start(cfg, true, listener, cancel.clone())
            .await
            .expect("bridge starts");
        let b = InProcessBridge {
            http: format!("http://{}", running.http_addr),
            cancel,
            running: Some(running),
        };
        b.wait_ready().await;
        b
    }

    /// Starts the bridge binary as a child process with this environment's config file.
    pub fn bridge_process(&self, tag: &str) -> BridgeProcess {
        self.bridge_command(tag, "run", &[])
    }

    /// Like [`Env::bridge_process`], with extra environment variables (configuration overrides).
    pub fn bridge_process_with(&self, tag: &str, vars: &[(&str, &str)]) -> BridgeProcess {
        self.bridge_command(tag, "run", vars)
    }

    /// Starts the bridge binary as a child process, placed as `at` says (e.g. inside a network namespace,
    /// reaching the servers at other addresses).
    pub fn bridge_process_at(&self, tag: &str, at: &Placement) -> BridgeProcess {
        self.bridge_spawn(tag, "run", &[], at)
    }

    /// Runs `delta-bridge --config <this environment's config> <command>` as a child process with the extra
    /// environment variables `vars`; its stdout and stderr go to `bridge-{tag}.log` in the environment's
    /// directory (see [`Env::log`]).
    pub fn bridge_command(&self, tag: &str, command: &str, vars: &[(&str, &str)]) -> BridgeProcess {
        self.bridge_spawn(tag, command, vars, &Placement::default())
    }

    fn bridge_spawn(&self, tag: &str, command: &str, vars: &[(&str, &str)], at: &Placement) -> BridgeProcess {
        let cfg_path = self.dir.join(format!("bridge-{tag}.toml"));
        let port = delta_harness::servers::free_port().expect("port");
        // Each process its own MQTT client id: replicas sharing one would take each other's connection.
        let pg = format!("127.0.0.1:{}", self.pg.port);
        let mqtt = format!("127.0.0.1:{}", self.mqtt.port);
        let toml = self
            .config_toml("")
            .replace("127.0.0.1:0", &format!("{}:{port}", at.http))
            .replace(&pg, &format!("{}:{}", at.postgres, self.pg.port))
            .replace(&mqtt, &format!("{}:{}", at.mqtt, self.mqtt.port))
            .replace("client_id = \"bridge-", &format!("client_id = \"bridge-{tag}-"));
        let client_id = toml
            .lines()
            .find_map(|l| l.strip_prefix("client_id = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("client_id")
            .to_string();
        std::fs::write(&cfg_path, toml).expect("write config");
        let log = std::fs::File::create(self.dir.join(format!("bridge-{tag}.log"))).expect("log");
        let mut cmd = match &at.netns {
            // `ip netns exec` execs the program in place: the child's pid is the bridge's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_delta-bridge")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_delta-bridge")),
        };
        let child = cmd
            .args(["--config"])
            .arg(&cfg_path)
            .arg(command)
            .env("RUST_LOG", "info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bridge");
        BridgeProcess {
            child,
            http: format!("http://{}:{port}", at.http),
            client_id,
        }
    }
}

impl Env {
    /// What a bridge started by [`Env::bridge_command`] with this tag has logged so far.
    pub fn log(&self, tag: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("bridge-{tag}.log"))).unwrap_or_default()
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Rows in the bridge's table `delta_bridge.{table}` (`outbox`, `dead_letter`).
pub async fn bridge_rows(db: &tokio_postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM delta_bridge.{table}"), &[])
        .await
        .expect("count rows")
        .get(0)
}

/// Waits until the outbox is empty (everything delivered or dead-lettered); panics after `limit`.
pub async fn wait_outbox_empty(db: &tokio_postgres::Client, limit: Duration) {
    let start = Instant::now();
    loop {
        let left = bridge_rows(db, "outbox").await;
        if left == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{left} rows still in the outbox after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_ready_at(http: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{http}/readyz")).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(start.elapsed() < limit, "bridge at {http} not ready after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a load run (under faults or not) must show: every committed change received, nothing uncommitted, each
/// row's first deliveries in commit order, every duplicate byte for byte the first delivery of its event,
/// every payload matching its schema, and a device that drops stale `seq` ending with the database's values.
pub fn assert_nothing_lost_or_invented(report: &Report) {
    assert_eq!(report.lost(), 0, "every committed change arrives");
    assert_eq!(report.phantom, 0, "nothing that was not committed arrives");
    assert_eq!(
        report.duplicates_not_identical, 0,
        "every redelivery repeats the first delivery's bytes: {:#?}",
        report.duplicates_not_identical_examples
    );
    assert_eq!(
        report.schema_violations, 0,
        "every payload matches its schema in docs/schemas"
    );
    assert_eq!(
        report.device_mismatches, 0,
        "a device dropping stale seq ends with the database's values"
    );
    for (name, s) in &report.streams {
        assert!(s.written > 0 && s.received == s.written, "{name}: {s:?}");
        assert_eq!(
            s.out_of_order, 0,
            "{name}: first deliveries of each row in commit order: {s:?}"
        );
    }
}

/// The bridge's /metrics text; panics if the bridge does not answer.
pub async fn scrape(http: &str) -> String {
    reqwest::get(format!("{http}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("/metrics body")
}

/// The value of the first sample in a /metrics text whose line starts with `name` (include the space or `{`
/// to pin a series).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Like [`sample`] on a fresh scrape, or None when the bridge does not answer (a killed replica).
pub async fn metric(http: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{http}/metrics")).await.ok()?.text().await.ok()?;
    sample(&text, name)
}

pub struct InProcessBridge {
    pub http: String,
    cancel: CancellationToken,
    running: Option<delta_bridge::service::Running>,
}

impl InProcessBridge {
    pub async fn wait_ready(&self) {
        wait_ready_at(&self.http, Duration::from_secs(30)).await;
    }
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await.expect("the bridge stopped cleanly");
        }
    }
}

impl Drop for InProcessBridge {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Where a bridge process runs and the addresses it uses: by default on the host, everything on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct Placement {
    /// A network namespace to run in (`ip netns exec`).
    pub netns: Option<String>,
    /// The address it reaches PostgreSQL at (the servers' port).
    pub postgres: String,
    /// The address it reaches the broker at.
    pub mqtt: String,
    /// The address its HTTP port listens on (and the test scrapes).
    pub http: String,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            netns: None,
            postgres: "127.0.0.1".into(),
            mqtt: "127.0.0.1".into(),
            http: "127.0.0.1".into(),
        }
    }
}

pub struct BridgeProcess {
    pub child: Child,
    pub http: String,
    /// Its MQTT client id (what the broker's log names it by).
    pub client_id: String,
}

impl BridgeProcess {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A message as a device receives it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Value,
    pub raw: Vec<u8>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub at: Instant,
}

/// An MQTT 5 subscriber that records every message; clean_start = false with a session expiry so a broker
/// restart (persistence on) does not lose what was queued for it.
pub struct Subscriber {
    pub messages: Arc<Mutex<Vec<Received>>>,
    /// Payloads that did not match their schema in docs/schemas: every read of the messages asserts none.
    invalid: Arc<Mutex<Vec<String>>>,
    subscription: Subscription,
}

impl Subscriber {
    pub async fn start(broker_url: &str, client_id: &str, filter: &str) -> Subscriber {
        Self::start_as(broker_url, client_id, filter, None).await
    }

    /// Like [`Subscriber::start`], logged in as `(username, password)` (a broker without anonymous access).
    pub async fn start_as(
        broker_url: &str,
        client_id: &str,
        filter: &str,
        credentials: Option<(&str, &str)>,
    ) -> Subscriber {
        let port: u16 = broker_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        opts.set_max_packet_size(Some(64 * 1024 * 1024));
        if let Some((username, password)) = credentials {
            opts.set_credentials(username, password);
        }
        let messages = Arc::new(Mutex::new(Vec::new()));
        let invalid = Arc::new(Mutex::new(Vec::new()));
        let (sink, bad) = (messages.clone(), invalid.clone());
        let subscription = subscriber::subscribe(opts, filter, Duration::from_secs(15), move |p| {
            let props = p.properties.clone().unwrap_or_default();
            let raw = p.payload.to_vec();
            let payload = serde_json::from_slice(&raw).unwrap_or(Value::Null);
            if let Err(why) = delta_harness::schemas::validate(&payload) {
                bad.lock().expect("lock").push(why);
            }
            sink.lock().expect("lock").push(Received {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload,
                raw,
                content_type: props.content_type,
                user_properties: props.user_properties,
                at: Instant::now(),
            });
        })
        .await
        .expect("subscribed (SUBACK granted in time)");
        Subscriber {
            messages,
            invalid,
            subscription,
        }
    }

    pub fn snapshot(&self) -> Vec<Received> {
        let invalid = self.invalid.lock().expect("lock").clone();
        assert!(invalid.is_empty(), "payloads not matching docs/schemas: {invalid:#?}");
        self.messages.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.messages.lock().expect("lock").len()
    }

    /// Waits until `pred` holds over the messages received so far.
    pub async fn wait_for(&self, limit: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let snap = self.snapshot();
            if pred(&snap) {
                return snap;
            }
            if start.elapsed() > limit {
                let shown: Vec<String> = snap.iter().map(|m| format!("{} {}", m.topic, m.payload)).collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}; received {}:\n{}",
                    snap.len(),
                    shown.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the subscription, and checks every payload received (also those after the last read) against
    /// its schema.
    pub async fn stop(self) {
        self.subscription.stop().await;
        let invalid = self.invalid.lock().expect("lock").clone();
        assert!(invalid.is_empty(), "payloads not matching docs/schemas: {invalid:#?}");
    }
}

/// Messages of one event type.
pub fn of_type<'a>(msgs: &'a [Received], t: &str) -> Vec<&'a Received> {
    msgs.iter().filter(|m| m.payload["event_type"] == t).collect()
}

/// Object keys in document order.
pub fn keys(v: &Value) -> Vec<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Every message received more than once (same event_id) carries exactly the bytes of its first delivery: a
/// redelivery is the same event sent again, never a new rendering of it. Returns the number of duplicates.
pub fn assert_duplicates_identical(msgs: &[Received]) -> usize {
    let mut first: HashMap<&str, &[u8]> = HashMap::new();
    let mut duplicates = 0;
    for m in msgs {
        let id = m.payload["event_id"].as_str().expect("every event has an event_id");
        match first.get(id) {
            None => {
                first.insert(id, &m.raw);
            }
            Some(bytes) => {
                duplicates += 1;
                assert!(
                    *bytes == m.raw.as_slice(),
                    "event {id} redelivered with other bytes:\nfirst: {}\nagain: {}",
                    String::from_utf8_lossy(bytes),
                    String::from_utf8_lossy(&m.raw)
                );
            }
        }
    }
    duplicates
}

pub fn by_event_id(msgs: &[Received]) -> HashMap<String, Vec<&Received>> {
    let mut m: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in msgs {
        m.entry(r.payload["event_id"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(r);
    }
    m
}

/// Verifies a device token against the bridge's /.well-known/jwks.json with jsonwebtoken, a JWT implementation
/// independent of the bridge's own signer (audience "mqtt", issuer "delta-bridge", nbf checked, no leeway);
/// returns the claims.
pub async fn verify_with_jwks(http: &str, token: &str, alg: jsonwebtoken::Algorithm) -> Value {
    use jsonwebtoken::{decode, decode_header, jwk::JwkSet, DecodingKey, Validation};
    let jwks: JwkSet = reqwest::get(format!("{http}/.well-known/jwks.json"))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks json");
    let header = decode_header(token).expect("header");
    assert_eq!(header.alg, alg, "signing algorithm");
    let kid = header.kid.expect("kid in the header");
    let jwk = jwks.find(&kid).expect("the kid is published");
    let mut v = Validation::new(alg);
    v.set_audience(&["mqtt"]);
    v.set_issuer(&["delta-bridge"]);
    v.validate_nbf = true;
    v.leeway = 0;
    decode::<Value>(token, &DecodingKey::from_jwk(jwk).expect("decoding key"), &v)
        .expect("the token verifies")
        .claims
}

/// Who published what, as the broker saw it: follows a Mosquitto log written with `log_type debug` and
/// records, for every `Received PUBLISH from CLIENT (d0, q1, ...)` line, the client id, whether the DUP flag
/// was set, and when the test read the line (a few ms after the broker wrote it: the log is read every 5 ms).
pub struct PublishLog {
    pub entries: Arc<Mutex<Vec<Published>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Clone)]
pub struct Published {
    pub client_id: String,
    pub dup: bool,
    pub topic: String,
    pub at: Instant,
}

impl PublishLog {
    pub fn follow(path: PathBuf) -> PublishLog {
        use std::io::{BufRead, BufReader, Seek, SeekFrom};
        use std::sync::atomic::Ordering;
        let entries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, done) = (entries.clone(), stop.clone());
        // Only what is written from now on.
        let start = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let thread = std::thread::spawn(move || {
            let mut pos = start;
            let mut partial = String::new();
            while !done.load(Ordering::SeqCst) {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if len < pos {
                        pos = 0; // truncated
                    }
                    if len > pos && f.seek(SeekFrom::Start(pos)).is_ok() {
                        let mut reader = BufReader::new(f);
                        let mut line = String::new();
                        while let Ok(n) = reader.read_line(&mut line) {
                            if n == 0 {
                                break;
                            }
                            pos += n as u64;
                            if !line.ends_with('\n') {
                                partial.push_str(&line);
                                line.clear();
                                continue;
                            }
                            let full = std::mem::take(&mut partial) + &line;
                            line.clear();
                            if let Some(p) = parse_publish_line(&full) {
                                sink.lock().expect("lock").push(p);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PublishLog {
            entries,
            stop,
            thread: Some(thread),
        }
    }

    pub fn snapshot(&self) -> Vec<Published> {
        self.entries.lock().expect("lock").clone()
    }
}

fn parse_publish_line(line: &str) -> Option<Published> {
    let rest = line.split_once("Received PUBLISH from ")?.1;
    let (client, rest) = rest.split_once(" (")?;
    let dup = rest.starts_with("d1");
    let topic = rest.split('\'').nth(1).unwrap_or_default().to_string();
    Some(Published {
        client_id: client.to_string(),
        dup,
        topic,
        at: Instant::now(),
    })
}

impl Drop for PublishLog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The backend holding the leader lock, from PostgreSQL's own lock table (the truth, not a replica's view).
pub async fn lock_holder(db: &tokio_postgres::Client) -> Option<i32> {
    db.query_opt(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
            AND ((classid::bigint << 32) | objid::bigint) = $1 AND objsubid = 1",
        &[&delta_bridge::LEADER_LOCK],
    )
    .await
    .expect("pg_locks")
    .map(|r| r.get(0))
}

/// The sum of every series of a metric (all label sets) on a fresh scrape; None if the bridge does not answer.
pub async fn metric_sum(http: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{http}/metrics")).await.ok()?.text().await.ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next())
            .filter_map(|v| v.parse::<f64>().ok())
            .sum(),
    )
}

/// The capture triggers a complete install attaches (named `delta_bridge_*`): ten from migration 1 (inserts and
/// updates of products and inventory, the sale notes and captures), four from migration 8 (the deletes of
/// products, inventory and transactions), four from migration 10 (the delete notes and the moves of products
/// and inventory).
pub const CAPTURE_TRIGGERS: i64 = 18;

/// The migrations this version ships: `sql/NNN_*.sql`.
pub fn migrations() -> Vec<i32> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut v: Vec<i32> = std::fs::read_dir(dir)
        .expect("sql/")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.split_once('_')?.0.parse().ok()
        })
        .collect();
    v.sort();
    v
}
