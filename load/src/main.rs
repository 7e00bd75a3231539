//! `delta-load`: the load harness (see the README, "Commands" and "The demo"). Writes a realistic retail mix at a fixed open-loop rate,
//! subscribes like a device, and reports per stream: written, received, lost, duplicated, out of order,
//! commit-to-receive latency. With `--devices N --offline P` it also runs simulated devices that go offline and
//! catch up through the bridge's API, and compares each one's state with the database at the end. Exit codes:
//! 0 no loss, 1 loss (or phantom events, payloads that do not match their schema, a device whose state differs
//! from the database), 2 bad usage or config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use delta_bridge::config::Config;
use delta_harness::devices::Api;
use delta_harness::loadgen::{self, LoadOptions, Target};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "delta-load", version, about = "Open-loop load harness for delta-bridge")]
struct Cli {
    /// The bridge's configuration file (same keys and DELTA_BRIDGE__* environment overrides).
    #[arg(long, env = "DELTA_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Database transactions per second (sales, restocks, price changes, voids).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to write, e.g. 60s, 5m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Merchants to spread the load over (codes MCH-LOAD-000, ...).
    #[arg(long, default_value_t = 1)]
    merchants: usize,
    /// Branches per merchant (the same branch codes under every merchant, as real chains may have).
    #[arg(long, default_value_t = 4)]
    branches: usize,
    /// Products (each with an inventory row) per branch.
    #[arg(long, default_value_t = 50)]
    products: usize,
    /// How long to wait for late events after the last write.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Simulated devices, spread over the branches, each provisioned through the bridge's API (needs
    /// `http.admin_token` and device credentials configured) and catching up through it after being offline.
    #[arg(long, default_value_t = 0)]
    devices: usize,
    /// Fraction of the simulated devices offline at any time, in [0, 0.95].
    #[arg(long, default_value_t = 0.0)]
    offline: f64,
    /// The bridge's HTTP API for the simulated devices (default: http:// on `http.listen`, 0.0.0.0 read as
    /// 127.0.0.1).
    #[arg(long)]
    api: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.rate.is_finite()
        || cli.rate <= 0.0
        || cli.writers == 0
        || cli.merchants == 0
        || cli.branches == 0
        || cli.products == 0
        || !(0.0..=0.95).contains(&cli.offline)
    {
        eprintln!(
            "delta-load: --rate, --writers, --merchants, --branches and --products must be positive, --offline in [0, 0.95]"
        );
        return ExitCode::from(2);
    }
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("delta-load: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let mut target = match target(&cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("delta-load: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.devices > 0 {
        let Some(token) = cfg.http.admin_token.as_ref() else {
            eprintln!("delta-load: --devices needs http.admin_token in the configuration (devices are provisioned through the API)");
            return ExitCode::from(2);
        };
        let base = match &cli.api {
            Some(url) => url.clone(),
            None if cfg.http.tls_cert_file.is_some() => {
                eprintln!("delta-load: the bridge's API is https; delta-load speaks plain HTTP only: give --api http://... of a plain listener");
                return ExitCode::from(2);
            }
            None => {
                let mut addr = cfg.http.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
        };
        target.api = Some(Api::new(&base, token.expose()));
    }
    let opts = LoadOptions {
        rate: cli.rate,
        duration: cli.duration,
        writers: cli.writers,
        merchants: cli.merchants,
        branches: cli.branches,
        products_per_branch: cli.products,
        grace: cli.grace,
        devices: cli.devices,
        offline: cli.offline,
        ..LoadOptions::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("delta-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cancel = CancellationToken::new();
    let result = rt.block_on(async {
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c.cancel();
        });
        loadgen::run(&target, &opts, cancel).await
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("delta-load: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.render());
    if let Some(path) = cli.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("delta-load: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                eprintln!("delta-load: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if report.lost() > 0 || report.phantom > 0 || report.schema_violations > 0 || report.duplicates_not_identical > 0 {
        eprintln!(
            "delta-load: {} events lost, {} phantom, {} not matching their schema, {} redelivered with other bytes",
            report.lost(),
            report.phantom,
            report.schema_violations,
            report.duplicates_not_identical
        );
        return ExitCode::FAILURE;
    }
    if report.device_mismatches > 0 {
        eprintln!(
            "delta-load: {} device mismatches ({} simulated devices whose state differs from the database)",
            report.device_mismatches, report.fleet.device_mismatches
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The broker and database as the bridge's own configuration reaches them (TLS included). The load listens
/// with the `[load]` account when there is one, else with the bridge's.
fn target(cfg: &Config) -> Result<Target, delta_bridge::mqtt::MqttSetupError> {
    let (user, pass) = match &cfg.load.username {
        Some(u) => (Some(u.as_str()), cfg.load.password.as_ref().map(|s| s.expose())),
        None => (
            cfg.mqtt.username.as_deref(),
            cfg.mqtt.password.as_ref().map(|s| s.expose()),
        ),
    };
    let mqtt = delta_bridge::mqtt::mqtt_options(&cfg.mqtt, "delta-load", user, pass)?;
    let (url, timeout) = (cfg.postgres_url(), cfg.postgres.connect_timeout);
    let postgres: loadgen::PgConnect = std::sync::Arc::new(move || {
        let url = url.clone();
        Box::pin(async move { Ok(delta_bridge::pg::connect(&url, timeout, "delta-load").await?.client) })
    });
    Ok(Target::new(&cfg.env, mqtt, postgres))
}
