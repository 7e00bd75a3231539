//! Chaos benchmark (not a test): the release bridge as two replicas against private PostgreSQL (durable
//! commits) and Mosquitto, the load engine at ~150 transactions/s (~1,000 events/s), while crash faults
//! strike on a shuffled, evenly spread schedule: SIGKILL of the leader (restarted as a standby), SIGKILL of
//! the broker, SIGKILL of the PostgreSQL postmaster, and the leader's database session terminated. Prints
//! lost, phantom, duplicates (and whether each is byte-identical to its first delivery), per-row order
//! violations, device/database mismatches, and per fault kind the recovery time (fault until the probe
//! receives a change committed after it) and the takeover time, min/median/max.
//!
//! ```sh
//! cargo bench --bench chaos                                  # 10 min: 20 leader, 10 broker, 5 postgres kills, 2 lost sessions
//! BENCH_DURATION=3m cargo bench --bench chaos                # the same density of faults, scaled to 3 min
//! BENCH_DURATION=3m BENCH_FAULT_SCALE=0.5 cargo bench --bench chaos   # half of the full counts
//! BENCH_RATE=100 cargo bench --bench chaos                    # transactions per second
//! ```
//!
//! BENCH_FAULT_SCALE multiplies the 10-minute counts (each kind at least once); by default it is the
//! duration over 10 minutes. Exits 1 on loss, phantoms, order violations, differing duplicates or mismatches.

mod common;

use std::time::Duration;

use delta_harness::chaos::{self, ChaosOptions};

fn main() -> anyhow::Result<()> {
    if !common::benchmarking() {
        return Ok(());
    }
    let duration = common::duration(Duration::from_secs(600));
    let scale: f64 = std::env::var("BENCH_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(duration.as_secs_f64() / 600.0);
    let rate: f64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150.0);
    let count = |full: usize| ((full as f64 * scale).round() as usize).max(1);
    // The benchmarks' servers (durable commits); the replicas get config files of their own.
    let (mut stack, _, _) = common::servers("chaos")?;
    let opts = ChaosOptions {
        duration,
        rate,
        replicas: 2,
        leader_kills: count(20),
        broker_kills: count(10),
        postgres_kills: count(5),
        lost_sessions: count(2),
        bridge: env!("CARGO_BIN_EXE_delta-bridge").into(),
        env: "bench".into(),
        extra_config: "[log]\nlevel = \"info\"\n".into(),
        grace: Duration::from_secs(120),
        seed: std::env::var("BENCH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
        verbose: true,
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "chaos: {duration:?} at {rate} tx/s, {} replicas, faults: {} leader SIGKILL, {} broker SIGKILL, {} postgres \
         SIGKILL, {} lost leader sessions; {cpus} cores; PostgreSQL fsync on; bridge release build",
        opts.replicas, opts.leader_kills, opts.broker_kills, opts.postgres_kills, opts.lost_sessions
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(chaos::run(&mut stack, &opts, delta_bridge::LEADER_LOCK));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            stack.keep = true;
            eprintln!(
                "chaos run failed: {e:#} (servers' files kept in {})",
                stack.dir.display()
            );
            std::process::exit(1);
        }
    };
    println!("{}", report.fault_log());
    println!("{}", report.render());
    let l = &report.load;
    let bad = l.lost() > 0
        || l.phantom > 0
        || l.out_of_order() > 0
        || l.duplicates_not_identical > 0
        || l.device_mismatches > 0
        || l.schema_violations > 0
        || report.probe_lost > 0
        || report.faults.iter().any(|f| f.recovery.is_none());
    if bad {
        stack.keep = true;
        println!(
            "FAILED: see above; servers' files and bridge logs kept in {}",
            stack.dir.display()
        );
        std::process::exit(1);
    }
    Ok(())
}
