//! Benchmark (not a test): the release bridge as its own process against private PostgreSQL and Mosquitto,
//! driven by the load harness at fixed rates, side by side in one run (these machines are noisy: compare
//! within a run, not across runs). Prints per rate: events/s, loss, p50/p99 commit-to-receive latency, and
//! the bridge's CPU time and peak RSS.
//!
//! ```sh
//! cargo bench --bench throughput                       # 60 s at ~250 and ~1,000 events/s
//! BENCH_DURATION=20s BENCH_RATES=250,500 cargo bench --bench throughput
//! BENCH_PG="wal_writer_delay=10ms" BENCH_COMMIT=async cargo bench --bench throughput
//! BENCH_INFLIGHT=100,500 BENCH_RATES=1000,1250 cargo bench --bench throughput   # mqtt.max_inflight side by side
//! ```
//!
//! Each rate runs with durable commits and with synchronous_commit off (BENCH_COMMIT=durable|async for one).
//! Rates are database transactions per second; the mix averages ~4 events per transaction.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use delta_harness::loadgen::{self, LoadOptions};
use tokio_util::sync::CancellationToken;

fn proc_stats(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, hwm_kb)
}

fn main() -> anyhow::Result<()> {
    if !common::benchmarking() {
        return Ok(());
    }
    let duration = common::duration(Duration::from_secs(60));
    let rates: Vec<f64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "60,250".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    // durable: COMMIT waits for the WAL flush (the latency includes the disk); async: synchronous_commit off,
    // which leaves the bridge's own share of the latency.
    let commits: Vec<&str> = match std::env::var("BENCH_COMMIT").as_deref() {
        Ok("durable") => vec!["on"],
        Ok("async") => vec!["off"],
        _ => vec!["on", "off"],
    };
    let (stack, cfg_path, port) = common::servers("bench")?;
    let (dir, pg) = (&stack.dir, &stack.pg);
    let target = stack.load_target("bench");
    // Extra server settings to compare (e.g. BENCH_PG="wal_writer_delay=10ms"), applied with ALTER SYSTEM.
    if let Ok(extra) = std::env::var("BENCH_PG") {
        for kv in extra.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("BENCH_PG: {kv} is not key=value"))?;
            pg.psql("postgres", &format!("ALTER SYSTEM SET {} = '{}'", k.trim(), v.trim()))?;
        }
        pg.psql("postgres", "SELECT pg_reload_conf()")?;
        println!("server settings: {extra}");
    }
    // Bridge settings to compare side by side on the same servers: the bridge is restarted for each value.
    let inflights: Vec<String> = std::env::var("BENCH_INFLIGHT")
        .unwrap_or_else(|_| "default".into())
        .split(',')
        .map(|v| v.trim().to_string())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: {} cores, {cpus}; PostgreSQL fsync on, Mosquitto 127.0.0.1, bridge release build",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("duration per rate: {duration:?}\n");
    println!(
        "{:>8} {:>8} {:>7} {:>8} {:>9} {:>9} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "tx/s",
        "done/s",
        "commit",
        "inflight",
        "events/s",
        "received",
        "lost",
        "dup",
        "p50 ms",
        "p99 ms",
        "max ms",
        "cpu %",
        "rss MiB"
    );
    let mut failed = false;
    for inflight in &inflights {
        let log = std::fs::File::create(dir.join(format!("bridge-{inflight}.log")))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_delta-bridge"));
        cmd.arg("--config")
            .arg(&cfg_path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log);
        if inflight != "default" {
            cmd.env("DELTA_BRIDGE__MQTT__MAX_INFLIGHT", inflight);
        }
        let mut bridge = cmd.spawn()?;
        let pid = bridge.id();
        rt.block_on(async {
            // Wait for the bridge to be ready (it migrates first).
            for _ in 0..300 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            for (rate, commit) in rates.iter().flat_map(|r| commits.iter().map(move |c| (r, *c))) {
                // synchronous_commit is reloadable: the same server, side by side.
                let _ = pg.psql("postgres", &format!("ALTER SYSTEM SET synchronous_commit = {commit}"));
                let _ = pg.psql("postgres", "SELECT pg_reload_conf()");
                let opts = LoadOptions {
                    rate: *rate,
                    duration,
                    writers: 16,
                    merchants: 2,
                    branches: 4,
                    products_per_branch: 100,
                    grace: Duration::from_secs(30),
                    progress: false,
                    devices: 0,
                    offline: 0.0,
                };
                let (cpu0, _) = proc_stats(pid);
                let report = loadgen::run(&target, &opts, CancellationToken::new()).await;
                let (cpu1, rss) = proc_stats(pid);
                match report {
                    Ok(r) => {
                        let p = |f: fn(&loadgen::Latency) -> f64| {
                            r.streams.values().map(|s| f(&s.latency_ms)).fold(0.0, f64::max)
                        };
                        let dup: u64 = r.streams.values().map(|s| s.duplicated).sum();
                        println!(
                            "{:>8.0} {:>8.0} {:>7} {:>8} {:>9.0} {:>9} {:>6} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>9.1}",
                            rate,
                            (r.ops_committed + r.ops_failed + r.ops_unknown) as f64 / r.duration_s,
                            if commit == "on" { "durable" } else { "async" },
                            inflight,
                            r.events_per_second,
                            r.received(),
                            r.lost(),
                            dup,
                            p(|l| l.p50),
                            p(|l| l.p99),
                            p(|l| l.max),
                            (cpu1 - cpu0) / r.duration_s * 100.0,
                            rss as f64 / 1024.0
                        );
                        failed |= r.lost() > 0 || r.phantom > 0;
                    }
                    Err(e) => {
                        println!("{rate:>8.0} failed: {e:#}");
                        failed = true;
                    }
                }
            }
        });
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let _ = bridge.wait();
    }
    println!(
        "\n(tx/s: the schedule; done/s: transactions the writers finished per second of the run, below the schedule \
         when the database cannot keep up; p50/p99/max: the worst stream's figure, from each write's scheduled time \
         to the subscriber's receipt, so a writer falling behind shows as latency)"
    );
    drop(stack);
    if failed {
        anyhow::bail!("events were lost");
    }
    Ok(())
}
