//! `delta-bridge demo`: the whole path on one machine. Starts a private PostgreSQL and Mosquitto on free
//! loopback ports (from the system's binaries), loads the reference schema with sample data, runs the bridge,
//! connects a demo device to its branch, drives the load harness, then prints the latency and loss report.
//! Touches nothing outside its own directory; stops everything it started on exit (also on Ctrl-C).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::loadgen::{self, LoadOptions, LOAD_MERCHANT_PREFIX};
use crate::localenv::{Mosquitto, Postgres, REFERENCE_SCHEMA};
use crate::mqtt::mqtt_options;
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
}

const SAMPLE: &str = "
INSERT INTO merchants (code, name) VALUES ('MCH-MST-001', 'Toko Maju Sejahtera');
INSERT INTO branches (merchant_id, code, name) VALUES (1, 'BRN-MST-OSK00001', 'Osaka Namba'), (1, 'BRN-MST-OSK00002', 'Osaka Umeda');
INSERT INTO products (branch_id, name, price, stock) VALUES
  (1, 'Kopi Susu 250ml', 18000, 120), (1, 'Roti Tawar', 15500, 40), (2, 'Teh Botol', 6000, 300);
INSERT INTO inventory (branch_id, product_id, quantity) SELECT branch_id, id, stock FROM products;
";

fn step(n: u32, text: &str) {
    println!("\n[{n}/6] {text}");
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("delta-bridge-demo-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cancel = CancellationToken::new();
    {
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c.cancel();
        });
    }
    let result = tour(&args, &dir, cancel).await;
    if args.keep || result.is_err() {
        println!("\nworking directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn tour(args: &DemoArgs, dir: &std::path::Path, cancel: CancellationToken) -> anyhow::Result<()> {
    // Throwaway secrets for this run only.
    let secret = || format!("{:032x}", rand::random::<u128>());
    let (admin_pw, bridge_pw, load_pw, admin_token) = (secret(), secret(), secret(), secret());

    step(
        1,
        "starting a private PostgreSQL and Mosquitto (dynamic security) on free loopback ports",
    );
    let (pg, mqtt) = {
        let (d1, d2, admin_pw) = (dir.join("postgres"), dir.join("mosquitto"), admin_pw.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Postgres, Mosquitto)> {
            Ok((
                Postgres::start(&d1, false)?,
                Mosquitto::start_dynsec(&d2, "admin", &admin_pw, "")?,
            ))
        })
        .await??
    };
    // The bridge publishes under dev/#; the load harness listens to dev/#; devices get their own rules.
    for args in [
        vec!["createRole", "bridge-publisher"],
        vec!["addRoleACL", "bridge-publisher", "publishClientSend", "dev/#", "allow"],
        vec!["createClient", "bridge", "-p", bridge_pw.as_str()],
        vec!["addClientRole", "bridge", "bridge-publisher"],
        vec!["createRole", "load-listener"],
        vec!["addRoleACL", "load-listener", "subscribePattern", "dev/#", "allow"],
        vec!["createClient", "loadgen", "-p", load_pw.as_str()],
        vec!["addClientRole", "loadgen", "load-listener"],
    ] {
        mqtt.dynsec("admin", &admin_pw, &args)?;
    }
    println!(
        "      PostgreSQL on 127.0.0.1:{} (fsync off: a demo, not a durability test)",
        pg.port
    );
    println!(
        "      Mosquitto  on 127.0.0.1:{} (no anonymous access; accounts: bridge, loadgen)",
        mqtt.port
    );

    step(2, "creating the reference schema with sample data");
    pg.psql("postgres", "CREATE DATABASE mstore")?;
    pg.psql("mstore", REFERENCE_SCHEMA)?;
    pg.psql("mstore", SAMPLE)?;

    step(3, "starting the bridge (installs its outbox and capture triggers)");
    let key_path = dir.join("device-signing-key.pem");
    std::fs::write(&key_path, crate::provision::credentials::generate_es256_pem()?)?;
    // Secrets in owner-only files beside the config (the way a deployment mounts them), so that the same
    // file drives `delta-load --config` from another terminal while `--stay` keeps the demo up.
    let secrets_dir = dir.join("secrets");
    std::fs::create_dir_all(&secrets_dir)?;
    let secret_file = |name: &str, value: &str| -> std::io::Result<String> {
        let path = secrets_dir.join(name);
        write_private(&path, value)?;
        Ok(path.display().to_string())
    };
    let toml = format!(
        "env = \"dev\"\n[postgres]\nurl = \"{}\"\n\
         [mqtt]\nurl = \"{}\"\nusername = \"bridge\"\npassword_file = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n\
         [credentials]\nsigning_key_file = \"{}\"\n\
         [broker]\nkind = \"mosquitto\"\nadmin_username = \"admin\"\nadmin_password_file = \"{}\"\n\
         [load]\nusername = \"loadgen\"\npassword_file = \"{}\"\n",
        pg.url("mstore"),
        mqtt.url(),
        secret_file("mqtt-password", &bridge_pw)?,
        secret_file("http-admin-token", &admin_token)?,
        key_path.display(),
        secret_file("broker-admin-password", &admin_pw)?,
        secret_file("load-password", &load_pw)?,
    );
    let config_path = dir.join("delta-bridge.toml");
    std::fs::write(&config_path, &toml)?;
    let cfg = Config::parse(&toml, &config_path, &[])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bridge_cancel = cancel.child_token();
    let running = crate::service::start(cfg.clone(), true, listener, bridge_cancel.clone()).await?;
    let http = format!("http://{}", running.http_addr);
    wait_ready(&http).await?;
    println!("      bridge ready: {http}/readyz, {http}/metrics");

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
    match demo_device(&cfg, user, pass, other).await {
        Err(_) => println!("      subscribing to {other}: refused by the broker, as it must be"),
        Ok((probe, _)) => {
            probe.stop().await;
            anyhow::bail!("the broker let the device subscribe to another branch");
        }
    }
    let own = "dev/MCH-MST-001/BRN-MST-OSK00001/#";
    let (device, mut device_rx) = demo_device(&cfg, user, pass, own).await?;
    println!("      subscribed to {own}");
    pg.psql(
        "mstore",
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
            shown += 1;
        }
    }
    if shown < 3 {
        anyhow::bail!("the demo device did not receive the sale's three events");
    }

    step(
        5,
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
    };
    let report = loadgen::run(&cfg, &opts, cancel.clone()).await?;
    let mut foreign = 0usize;
    while device_rx.try_recv().is_ok() {
        foreign += 1;
    }
    device.stop().await;

    step(
        6,
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
            "\nthe demo stays up (Ctrl-C to stop): bridge {http}, PostgreSQL 127.0.0.1:{}, Mosquitto 127.0.0.1:{}\n\
             run the load harness against it from another terminal:\n  \
             target/release/delta-load --config {} --rate 100 --duration 60s",
            pg.port,
            mqtt.port,
            config_path.display()
        );
        cancel.cancelled().await;
    }
    bridge_cancel.cancel();
    running.wait().await;
    drop(mqtt);
    drop(pg);
    if report.lost() > 0 || report.phantom > 0 || foreign > 0 {
        anyhow::bail!(
            "{} events lost, {} phantom, {foreign} foreign",
            report.lost(),
            report.phantom
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

/// An MQTT 5 device session subscribed to `filter`; an error if the broker refuses the subscription.
async fn demo_device(cfg: &Config, user: &str, pass: &str, filter: &str) -> anyhow::Result<(Subscription, DeviceRx)> {
    let mut opts = mqtt_options(&cfg.mqtt, user, Some(user), Some(pass)).map_err(anyhow::Error::msg)?;
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

async fn wait_ready(http: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
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
