//! The `delta-bridge` binary: parses the command line, sets up logging, and calls into the library.
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use delta_bridge::config::{Config, LogFormat, SecretFiles};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "delta-bridge",
    version,
    about = "PostgreSQL changes to per-branch MQTT topics, at least once"
)]
struct Cli {
    /// Configuration file (TOML). Every key can be overridden by DELTA_BRIDGE__SECTION__KEY.
    #[arg(long, global = true, env = "DELTA_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install/upgrade database objects, then run the bridge, the HTTP API and /metrics until SIGTERM.
    Run {
        /// Do not install or upgrade database objects.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Install/upgrade database objects and capture triggers (idempotent), then exit.
    Migrate,
    /// Remove the capture triggers from the business tables (idempotent); refuses while a replica leads.
    Uninstall {
        /// Also drop the schema delta_bridge: the outbox, dead letters, device records (says what first).
        #[arg(long)]
        drop_schema: bool,
        /// Go on even while a session holds the leader lock.
        #[arg(long)]
        force: bool,
    },
    /// Validate the configuration as start-up does (files it names included) and print it with secrets
    /// redacted; exit 2 naming the key and the reason.
    CheckConfig {
        /// Do not read the files the configuration names (secrets, keys, certificates, CA bundles): check their
        /// paths' form only, e.g. outside the pod where the Secret is mounted.
        #[arg(long)]
        no_secret_files: bool,
    },
    /// Device credentials (the same code path as the HTTP API).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// The one-command tour: private PostgreSQL and Mosquitto, sample data, bridge, load, report.
    #[cfg(feature = "demo")]
    Demo(delta_harness::demo::DemoArgs),
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Issue (or rotate) a device's MQTT credentials and print them as JSON, exactly like POST /api/v1/devices.
    Issue {
        #[arg(long)]
        device_id: String,
        /// Merchant code (merchants.code).
        #[arg(long)]
        merchant: String,
        /// Branch code (branches.code, within the merchant).
        #[arg(long)]
        branch: String,
        /// Lifetime, e.g. 24h (default: credentials.ttl; bounded by credentials.min_ttl and max_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "demo")]
    if let Command::Demo(args) = &cli.command {
        init_logging(LogFormat::Text, "warn,rumqttc=error");
        return run_async(async {
            // The tour starts this very binary as its bridge, the way it is deployed.
            let exe = std::env::current_exe()?;
            delta_harness::demo::run(args.clone(), exe).await
        });
    }
    let files = match cli.command {
        Command::CheckConfig { no_secret_files: true } => SecretFiles::FormOnly,
        _ => SecretFiles::Read,
    };
    let cfg = match Config::load_with(cli.config.as_deref(), files) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("delta-bridge: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // What `run` reads from files before it connects anywhere; check-config checks the same.
    if matches!(cli.command, Command::CheckConfig { .. } | Command::Run { .. }) {
        if let Err(e) = delta_bridge::service::check_files(&cfg, files) {
            eprintln!("delta-bridge: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    }
    match cli.command {
        Command::CheckConfig { no_secret_files } => {
            let how = if no_secret_files {
                "; files not read (--no-secret-files)"
            } else {
                ""
            };
            println!(
                "# configuration is valid{how}; secrets redacted\n{}",
                cfg.redacted_toml()
            );
            ExitCode::SUCCESS
        }
        Command::Migrate => {
            init_logging(cfg.log.format, &cfg.log.level);
            run_async(async move {
                let done = delta_bridge::service::migrate_once(&cfg).await?;
                if done.is_empty() {
                    println!("database objects are up to date");
                }
                if !done.applied.is_empty() {
                    println!("applied migrations {:?}", done.applied);
                }
                for what in &done.attached {
                    println!("attached {what}");
                }
                Ok(())
            })
        }
        Command::Uninstall { drop_schema, force } => {
            init_logging(cfg.log.format, &cfg.log.level);
            run_async(async move {
                let mut say = |line: &str| println!("{line}");
                delta_bridge::service::uninstall(&cfg, drop_schema, force, &mut say).await?;
                if !drop_schema {
                    println!(
                        "schema delta_bridge kept (outbox, dead letters, device records); \
                         `delta-bridge migrate` attaches capture again, `uninstall --drop-schema` removes it"
                    );
                }
                Ok(())
            })
        }
        Command::Run { no_migrate } => {
            init_logging(cfg.log.format, &cfg.log.level);
            run_async(async move {
                let listener = tokio::net::TcpListener::bind(cfg.http.listen).await?;
                let cancel = CancellationToken::new();
                // Listen for SIGTERM/SIGINT before anything starts: a signal while start-up is still retrying
                // migrations must stop the process cleanly too.
                {
                    let cancel = cancel.clone();
                    tokio::spawn(async move {
                        delta_bridge::service::shutdown_signal().await;
                        tracing::info!("shutting down");
                        cancel.cancel();
                    });
                }
                let running = delta_bridge::service::start(cfg, !no_migrate, listener, cancel.clone()).await?;
                if !cancel.is_cancelled() {
                    tracing::info!(http = %running.http_addr, "delta-bridge running");
                }
                // Err when an internal task died: exit 1 (the leader lock went with the process's session).
                running.wait().await?;
                Ok(())
            })
        }
        Command::Device(DeviceCommand::Issue {
            device_id,
            merchant,
            branch,
            ttl,
        }) => {
            init_logging(cfg.log.format, "warn");
            let req = delta_bridge::IssueRequest {
                device_id,
                merchant_code: merchant,
                branch_code: branch,
                ttl_seconds: ttl.map(|d| d.as_secs()),
            };
            device_issue(&cfg, &req)
        }
        #[cfg(feature = "demo")]
        Command::Demo(_) => ExitCode::SUCCESS,
    }
}

/// `device issue`: exit 2 for a request the API would answer 400, 1 for anything else that fails.
fn device_issue(cfg: &Config, req: &delta_bridge::IssueRequest) -> ExitCode {
    use delta_bridge::service::ServiceError;
    use delta_bridge::ProvisionError;
    let mut invalid = false;
    let code = run_async(async {
        match delta_bridge::service::issue_device(cfg, req).await {
            Ok(creds) => {
                println!("{}", serde_json::to_string_pretty(&creds)?);
                Ok(())
            }
            Err(e) => {
                invalid = matches!(e, ServiceError::Provision(ProvisionError::Invalid(_)));
                Err(e.into())
            }
        }
    });
    if invalid {
        ExitCode::from(2)
    } else {
        code
    }
}

fn run_async<F: std::future::Future<Output = anyhow::Result<()>>>(fut: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("delta-bridge: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(fut);
    // Dropping a runtime waits for its blocking threads without limit (a DNS lookup or file read stuck on a
    // dead network): a stopping or failed bridge must be gone in seconds, whatever those threads do.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delta-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
