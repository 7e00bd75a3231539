//! `delta-bridge demo`: the whole path on one machine. Starts a private PostgreSQL and Mosquitto on free
//! loopback ports (from the system's binaries), loads the reference schema with sample data, runs the bridge
//! binary as a child process (exactly as it is deployed: a config file and secret files), provisions a demo
//! device through the API, drives the load engine, then prints the latency and loss report.
//! Deletes only what it created: in a `--dir` of the user's, its own files and nothing else.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::MqttOptions;
use tokio_util::sync::CancellationToken;

use crate::devices::{branch_rows, Api, Catchup, DeviceState, Stats, Step};
use crate::loadgen::{self, LoadOptions, Target, LOAD_MERCHANT_PREFIX};
use crate::servers::{free_port, stop_child, Mosquitto};
use crate::stack::{Stack, StackOptions, DATABASE};
use crate::subscriber::{self, Subscription};

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Database transactions per second during the load phase.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Length of the load phase.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Working directory for the private servers (default: a new one under the system's temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the working directory (logs, data) after the demo.
    #[arg(long)]
    pub keep: bool,
    /// After the report, keep PostgreSQL, Mosquitto and the bridge running until Ctrl-C (for delta-load).
    #[arg(long)]
    pub stay: bool,
    /// Mosquitto's `max_queued_messages` per offline session (0: no limit). A small one makes devices that
    /// are offline for a while miss messages there, which `delta-load --devices` must then fetch from the API.
    #[arg(long, default_value_t = 0)]
    pub broker_queue: u32,
}

const SAMPLE: &str = "
INSERT INTO merchants (code, name) VALUES ('MCH-MST-001', 'Toko Maju Sejahtera');
INSERT INTO branches (merchant_id, code, name) VALUES (1, 'BRN-MST-OSK00001', 'Osaka Namba'), (1, 'BRN-MST-OSK00002', 'Osaka Umeda');
INSERT INTO products (branch_id, name, price, stock) VALUES
  (1, 'Kopi Susu 250ml', 18000, 120), (1, 'Roti Tawar', 15500, 40), (2, 'Teh Botol', 6000, 300);
INSERT INTO inventory (branch_id, product_id, quantity) SELECT branch_id, id, stock FROM products;
";

fn step(n: u32, text: &str) {
    println!("\n[{n}/7] {text}");
}

/// What the demo writes into its directory, besides the stack's own `pg/` and `mqtt/`: removed at exit.
const OWN_FILES: [&str; 4] = ["secrets", "device-signing-key.pem", "delta-bridge.toml", "bridge.log"];

/// Runs the tour. `bridge` is the `delta-bridge` binary to start (the running one, for `delta-bridge demo`).
pub async fn run(args: DemoArgs, bridge: PathBuf) -> anyhow::Result<()> {
    // A directory of the user's is used only when it is new or empty, so that removing what the demo
    // created can never touch anything else.
    let (dir, created) = match &args.dir {
        Some(d) if d.exists() => {
            if std::fs::read_dir(d)?.next().is_some() {
                anyhow::bail!(
                    "--dir {}: not empty; give a new or empty directory (the demo removes what it creates there)",
                    d.display()
                );
            }
            (d.clone(), false)
        }
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), true)
        }
        None => (crate::stack::temp_dir("demo")?, true),
    };
    let cancel = CancellationToken::new();
    {
        let c = cancel.clone();
        tokio::spawn(async move {
            // Ctrl-C, or SIGTERM (a terminal closed, a process manager): stop everything the demo started.
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            c.cancel();
        });
    }
    let result = tour(&args, &dir, &bridge, cancel).await;
    let keep = args.keep || result.is_err();
    if keep {
        println!("\nworking directory kept: {}", dir.display());
    } else {
        for name in OWN_FILES {
            let path = dir.join(name);
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
        if created {
            // Empty by now unless someone else wrote into it meanwhile: then it stays.
            let _ = std::fs::remove_dir(&dir);
        }
    }
    result
}

/// The bridge as a child process; stopped with SIGTERM (graceful) when dropped.
struct BridgeChild(Option<Child>);

impl Drop for BridgeChild {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            stop_child(child, "TERM", Duration::from_secs(15));
        }
    }
}

async fn tour(args: &DemoArgs, dir: &Path, bridge: &Path, cancel: CancellationToken) -> anyhow::Result<()> {
    // Throwaway secrets for this run only.
    let secret = || format!("{:032x}", rand::random::<u128>());
    let (admin_pw, bridge_pw, load_pw, admin_token) = (secret(), secret(), secret(), secret());

    step(
        1,
        "starting a private PostgreSQL and Mosquitto (dynamic security) on free loopback ports",
    );
    let mut stack = {
        let (dir, admin_pw) = (dir.to_path_buf(), admin_pw.clone());
        let queue = format!("max_queued_messages {}\n", args.broker_queue);
        tokio::task::spawn_blocking(move || {
            Stack::start(StackOptions {
                seed: Some(SAMPLE),
                mqtt: Some(Box::new(move |d: &Path| {
                    Mosquitto::start_dynsec(d, "admin", &admin_pw, &queue)
                })),
                dir: Some(dir),
                ..StackOptions::new("demo")
            })
        })
        .await??
    };
    // Kept for inspection if anything below fails; removed at the end unless --keep.
    stack.keep = true;
    // The bridge publishes under dev/#; the load harness listens to dev/#; devices get their own rules.
    crate::stack::dynsec_accounts(&stack.mqtt, &admin_pw, &bridge_pw, &load_pw)?;
    let (pg_port, mqtt_port) = (stack.pg.port, stack.mqtt.port);
    println!("      PostgreSQL on 127.0.0.1:{pg_port} (fsync off: a demo, not a durability test)");
    println!("      Mosquitto  on 127.0.0.1:{mqtt_port} (no anonymous access; accounts: bridge, loadgen)");

    step(2, "created the reference schema with sample data");

    step(3, "starting the bridge (installs its outbox and capture triggers)");
    let key_path = dir.join("device-signing-key.pem");
    write_private(&key_path, &es256_pem()?)?;
    // Secrets in owner-only files beside the config (the way a deployment mounts them), so that the same
    // file drives `delta-load --config` from another terminal while `--stay` keeps the demo up.
    let secrets_dir = dir.join("secrets");
    std::fs::create_dir_all(&secrets_dir)?;
    std::fs::set_permissions(&secrets_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let secret_file = |name: &str, value: &str| -> std::io::Result<String> {
        let path = secrets_dir.join(name);
        write_private(&path, value)?;
        Ok(path.display().to_string())
    };
    let http_port = free_port()?;
    let toml = format!(
        "env = \"dev\"\n[postgres]\nurl = \"{}\"\n\
         [mqtt]\nurl = \"{}\"\nusername = \"bridge\"\npassword_file = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:{http_port}\"\nadmin_token_file = \"{}\"\n\
         [credentials]\nsigning_key_file = \"{}\"\n\
         [broker]\nkind = \"mosquitto\"\nadmin_username = \"admin\"\nadmin_password_file = \"{}\"\n\
         [load]\nusername = \"loadgen\"\npassword_file = \"{}\"\n\
         [log]\nformat = \"text\"\n",
        stack.pg_url(),
        stack.mqtt.url(),
        secret_file("mqtt-password", &bridge_pw)?,
        secret_file("http-admin-token", &admin_token)?,
        key_path.display(),
        secret_file("broker-admin-password", &admin_pw)?,
        secret_file("load-password", &load_pw)?,
    );
    let config_path = dir.join("delta-bridge.toml");
    std::fs::write(&config_path, &toml)?;
    let log = std::fs::File::create(dir.join("bridge.log"))?;
    let mut cmd = Command::new(bridge);
    // The demo's bridge runs on the demo's config alone: a DELTA_BRIDGE__* variable exported in the user's
    // shell (for a real deployment) must not point it at a real database or broker.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DELTA_BRIDGE") {
            cmd.env_remove(&name);
        }
    }
    let child = cmd
        .arg("--config")
        .arg(&config_path)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bridge.display()))?;
    let mut running = BridgeChild(Some(child));
    let http = format!("http://127.0.0.1:{http_port}");
    wait_ready(&http, &mut running).await?;
    println!(
        "      bridge ready: {http}/readyz, {http}/metrics (log: {})",
        dir.join("bridge.log").display()
    );

    step(
        4,
        "provisioning demo device tablet-osaka-01 through the API, then one sale by hand",
    );
    let issued: serde_json::Value = reqwest::Client::new()
        .post(format!("{http}/api/v1/devices"))
        .bearer_auth(&admin_token)
        .json(
            &serde_json::json!({"device_id": "tablet-osaka-01", "merchant_code": "MCH-MST-001",
                                   "branch_code": "BRN-MST-OSK00001", "ttl_seconds": 3600}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "      POST /api/v1/devices -> username {}, expires {}, may subscribe {}",
        issued["username"], issued["expires_at"], issued["topics"]["subscribe"]
    );
    let (user, pass) = (
        issued["username"].as_str().unwrap_or_default(),
        issued["password"].as_str().unwrap_or_default(),
    );
    // First a session that tries another branch (the broker must refuse), then the device's real session:
    // one at a time, since the broker binds the client id to the device.
    let other = "dev/MCH-MST-001/BRN-MST-OSK00002/#";
    match demo_device(mqtt_port, user, pass, other, false).await {
        Err(_) => println!("      subscribing to {other}: refused by the broker, as it must be"),
        Ok((probe, _)) => {
            probe.stop().await;
            anyhow::bail!("the broker let the device subscribe to another branch");
        }
    }
    let own = "dev/MCH-MST-001/BRN-MST-OSK00001/#";
    let (device, mut device_rx) = demo_device(mqtt_port, user, pass, own, true).await?;
    println!("      subscribed to {own} (persistent session)");
    // The device's own store starts from the snapshot, taken after subscribing so that the two overlap.
    let api = Api::new(&http, &admin_token);
    let stats = Stats::default();
    let catchup = Catchup {
        api: &api,
        token: pass,
        stats: &stats,
    };
    let mut store = DeviceState::default();
    catchup.snapshot(&mut store).await?;
    catchup.catch_up(&mut store).await?;
    let (np, ni) = store.counts();
    println!(
        "      GET /api/v1/snapshot -> {np} products, {ni} inventory rows, as of branch_seq {}",
        store.last_branch_seq
    );
    stack.pg.psql(
        DATABASE,
        "BEGIN;
         INSERT INTO transactions (branch_id, transaction_code, offline_id, status, grand_total, created_by, device_id)
           VALUES (1, 'TX-DEMO-0001', gen_random_uuid(), 'paid', 36000, 'kasir-demo', 'tablet-osaka-01');
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price)
           VALUES (currval('transactions_id_seq'), 1, 2, 18000);
         UPDATE products SET stock = stock - 2, updated_by = 'kasir-demo' WHERE id = 1;
         UPDATE inventory SET quantity = quantity - 2, updated_by = 'kasir-demo' WHERE product_id = 1;
         COMMIT;",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut shown = 0;
    while shown < 3 && Instant::now() < deadline {
        if let Ok(Some((topic, payload))) = tokio::time::timeout(Duration::from_millis(200), device_rx.recv()).await {
            println!("      {topic}\n        {payload}");
            if let Ok(ev) = serde_json::from_str::<serde_json::Value>(&payload) {
                store.offer(&ev);
            }
            shown += 1;
        }
    }
    if shown < 3 {
        anyhow::bail!("the demo device did not receive the sale's three events");
    }

    step(
        5,
        "the device goes offline, three sales happen, it comes back and catches up through the API",
    );
    device.stop().await;
    let last = store.last_branch_seq;
    for (n, product) in [(2, 1), (3, 2), (4, 1)] {
        stack.pg.psql(
            DATABASE,
            &format!(
                "BEGIN;
                 INSERT INTO transactions (branch_id, transaction_code, offline_id, status, grand_total, created_by, device_id)
                   VALUES (1, 'TX-DEMO-000{n}', gen_random_uuid(), 'paid', 18000, 'kasir-2', 'tablet-osaka-02');
                 INSERT INTO transaction_items (transaction_id, product_id, quantity, price)
                   VALUES (currval('transactions_id_seq'), {product}, 1, 18000);
                 UPDATE products SET stock = stock - 1, updated_by = 'kasir-2' WHERE id = {product};
                 UPDATE inventory SET quantity = quantity - 1, updated_by = 'kasir-2' WHERE product_id = {product};
                 COMMIT;"
            ),
        )?;
    }
    println!("      offline after branch_seq {last}; meanwhile another till sold TX-DEMO-0002..0004");
    let (device, mut device_rx) = demo_device(mqtt_port, user, pass, own, true).await?;
    // The three sales make nine events; the bridge may still be publishing the last ones, so ask again (as a
    // device would on the next jump) until all nine are in, for at most ten seconds.
    let mut missed = catchup.catch_up(&mut store).await?;
    let until = Instant::now() + Duration::from_secs(10);
    while store.last_branch_seq < last + 9 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        missed.extend(catchup.catch_up(&mut store).await?);
    }
    println!(
        "      back online: GET /api/v1/changes?after={last} -> {} missed events:",
        missed.len()
    );
    for ev in &missed {
        let d = &ev["data"];
        let what = match ev["event_type"].as_str() {
            Some("transaction_created") => format!(
                "{} total {}",
                d["transaction_code"].as_str().unwrap_or("?"),
                d["grand_total"]
            ),
            Some("stock_updated") => format!(
                "product {} stock {} -> {}",
                d["product_id"], d["old_stock"], d["new_stock"]
            ),
            Some("quantity_updated") => format!(
                "inventory {} quantity {} -> {}",
                d["inventory_id"], d["old_quantity"], d["new_quantity"]
            ),
            _ => String::new(),
        };
        println!(
            "        branch_seq {:>3}  {:<20} {what}",
            ev["branch_seq"].as_i64().unwrap_or_default(),
            ev["event_type"].as_str().unwrap_or("?")
        );
    }
    // What the broker kept for the session arrives too; the device skips it by branch_seq.
    let mut redelivered = 0;
    while let Ok(Some((_, payload))) = tokio::time::timeout(Duration::from_millis(500), device_rx.recv()).await {
        if let Ok(ev) = serde_json::from_str::<serde_json::Value>(&payload) {
            if store.offer(&ev) == Step::Duplicate {
                redelivered += 1;
            }
        }
    }
    let db = Target::plain_postgres(stack.pg_url(), Duration::from_secs(10))().await?;
    let (products, inventory) = branch_rows(&db, 1).await?;
    let differ = store.compare(&products, &inventory);
    if missed.len() < 9 || differ > 0 {
        anyhow::bail!(
            "the device caught up {} events (9 expected) and {differ} rows differ from the database",
            missed.len()
        );
    }
    println!(
        "      {redelivered} events the broker had queued for the session arrived as well, skipped as duplicates\n      \
         the device's store now equals the database: {} products, {} inventory rows, last branch_seq {}",
        products.len(),
        inventory.len(),
        store.last_branch_seq
    );

    step(
        6,
        &format!(
            "load: {} writes/s for {:?} on merchant {LOAD_MERCHANT_PREFIX}000 (sales, restocks, price changes, voids, aborted sales)",
            args.rate, args.duration
        ),
    );
    let opts = LoadOptions {
        rate: args.rate,
        duration: args.duration,
        writers: 8,
        merchants: 1,
        branches: 4,
        products_per_branch: 50,
        grace: Duration::from_secs(30),
        progress: true,
        devices: 0,
        offline: 0.0,
    };
    let mut load_mqtt = MqttOptions::new("delta-load", "127.0.0.1", mqtt_port);
    load_mqtt.set_keep_alive(Duration::from_secs(5));
    load_mqtt.set_credentials("loadgen", load_pw.as_str());
    let target = Target::new(
        "dev",
        load_mqtt,
        Target::plain_postgres(stack.pg_url(), Duration::from_secs(10)),
    );
    let report = loadgen::run(&target, &opts, cancel.clone()).await?;
    let mut foreign = 0usize;
    while device_rx.try_recv().is_ok() {
        foreign += 1;
    }
    device.stop().await;

    step(
        7,
        "report (latency from each COMMIT's scheduled time to the subscriber's receipt)",
    );
    print!("{}", report.render());
    println!("tablet-osaka-01 received {foreign} events during the load of another merchant (must be 0)");
    let metrics = match reqwest::get(format!("{http}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    for line in metrics.lines().filter(|l| {
        l.starts_with("delta_bridge_events_published_total")
            || l.starts_with("delta_bridge_outbox_backlog")
            || l.starts_with("delta_bridge_devices_issued_total")
    }) {
        println!("      {line}");
    }
    if args.stay && !cancel.is_cancelled() {
        println!(
            "\nthe demo stays up (Ctrl-C to stop): bridge {http}, PostgreSQL 127.0.0.1:{pg_port}, Mosquitto 127.0.0.1:{mqtt_port}\n\
             run the load harness against it from another terminal:\n  \
             target/release/delta-load --config {} --rate 100 --duration 60s",
            config_path.display()
        );
        cancel.cancelled().await;
    }
    drop(running); // SIGTERM, and wait for the bridge's graceful exit
    stack.keep = args.keep;
    drop(stack);
    if report.lost() > 0 || report.phantom > 0 || foreign > 0 || report.schema_violations > 0 {
        anyhow::bail!(
            "{} events lost, {} phantom, {foreign} foreign, {} not matching their schema",
            report.lost(),
            report.phantom,
            report.schema_violations
        );
    }
    println!("\nno event lost, none phantom, no foreign traffic on the device. Done.");
    Ok(())
}

fn write_private(path: &std::path::Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(path)?.write_all(value.as_bytes())
}

type DeviceRx = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;

/// An MQTT 5 device session subscribed to `filter`; an error if the broker refuses the subscription. A
/// persistent one survives a disconnect on the broker (clean start off, an hour's session expiry).
async fn demo_device(
    port: u16,
    user: &str,
    pass: &str,
    filter: &str,
    persistent: bool,
) -> anyhow::Result<(Subscription, DeviceRx)> {
    let mut opts = MqttOptions::new(user, "127.0.0.1", port);
    if persistent {
        // The broker keeps the session (and queues for it) while the device is away.
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
    }
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_credentials(user, pass);
    opts.set_max_packet_size(Some(16 * 1024 * 1024));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let device = subscriber::subscribe(opts, filter, Duration::from_secs(10), move |p| {
        let _ = tx.send((
            String::from_utf8_lossy(&p.topic).into_owned(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        ));
    })
    .await?;
    Ok((device, rx))
}

/// Waits for /readyz; fails at once if the bridge exits (its log says why).
async fn wait_ready(http: &str, bridge: &mut BridgeChild) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = bridge.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bridge.0 = None; // reaped: nothing left to stop
            anyhow::bail!("the bridge exited ({status}) before it was ready; see bridge.log");
        }
        if reqwest::get(format!("{http}/readyz"))
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("bridge not ready after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new EC P-256 private key (PKCS#8 PEM) to sign the demo's device tokens.
pub fn es256_pem() -> anyhow::Result<String> {
    use p256::pkcs8::EncodePrivateKey;
    use rand::RngCore;
    // A uniformly random 32-byte string is a valid scalar except with probability ~2^-32; retry then.
    for _ in 0..8 {
        let mut bytes = p256::FieldBytes::default();
        rand::rng().fill_bytes(&mut bytes);
        if let Ok(sk) = p256::SecretKey::from_bytes(&bytes) {
            let pem = sk
                .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("cannot encode the key: {e}"))?;
            return Ok(pem.to_string());
        }
    }
    anyhow::bail!("no valid P-256 scalar drawn")
}
