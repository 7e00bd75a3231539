//! Benchmark (not a test): what capture costs the business writes. pgbench runs single-row stock updates
//! (16 clients, durable commits) against a private PostgreSQL, configurations side by side in one run (disk
//! fsync speed on these machines varies between runs, so only compare figures within a run):
//!
//! - `none`: no trigger at all (the ceiling);
//! - `naive notify`: a row trigger calling pg_notify with the row as payload (the usual glue);
//! - `bridge, running`: delta-bridge's capture with the release bridge publishing to Mosquitto meanwhile;
//! - `bridge, stopped`: the same triggers with no bridge (outbox rows only, nobody to wake).
//!
//! ```sh
//! cargo bench --bench capture_cost                 # 15 s per configuration
//! BENCH_DURATION=30s cargo bench --bench capture_cost
//! ```

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use delta_harness::servers::{postgres_bin_dir, Postgres};

const NAIVE: &str = "
CREATE FUNCTION naive_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('naive', row_to_json(NEW)::text); RETURN NULL; END $$;
CREATE TRIGGER naive AFTER UPDATE ON products FOR EACH ROW EXECUTE FUNCTION naive_notify();";
const NAIVE_DROP: &str = "DROP TRIGGER naive ON products; DROP FUNCTION naive_notify();";

fn pgbench(pg: &Postgres, script: &std::path::Path, duration: Duration) -> anyhow::Result<f64> {
    let out = Command::new(postgres_bin_dir()?.join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-n",
            "-c",
            "16",
            "-j",
            "2",
        ])
        .args(["-T", &duration.as_secs().to_string(), "-f"])
        .arg(script)
        .arg("mstore")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("pgbench: {}{}", text, String::from_utf8_lossy(&out.stderr)))
}

fn main() -> anyhow::Result<()> {
    if !common::benchmarking() {
        return Ok(());
    }
    let duration = common::duration(Duration::from_secs(15));
    let (stack, cfg_path, _port) = common::servers("capture-bench")?;
    let (dir, pg) = (&stack.dir, &stack.pg);
    pg.psql(
        "mstore",
        "INSERT INTO merchants (code, name) VALUES ('M', 'M');
         INSERT INTO branches (merchant_id, code, name) SELECT 1, 'B' || g, 'B' FROM generate_series(1, 10) g;
         INSERT INTO products (branch_id, name, price, stock) SELECT 1 + g % 10, 'P' || g, 10, 1000000 FROM generate_series(1, 10000) g;",
    )?;
    let script = dir.join("update.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 10000)\nUPDATE products SET stock = stock - 1 WHERE id = :id;\n",
    )?;
    let bridge = |args: &[&str]| -> anyhow::Result<std::process::Child> {
        Ok(Command::new(env!("CARGO_BIN_EXE_delta-bridge"))
            .arg("--config")
            .arg(&cfg_path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    };
    let backlog = || {
        pg.psql("mstore", "SELECT count(*) FROM delta_bridge.outbox")
            .unwrap_or_default()
            .trim()
            .to_string()
    };

    println!("pgbench: single-row UPDATE of products.stock, 16 clients, durable commits, {duration:?} each\n");
    let mut rows: Vec<(String, f64)> = Vec::new();
    rows.push(("none (no trigger)".into(), pgbench(pg, &script, duration)?));
    pg.psql("mstore", NAIVE)?;
    rows.push(("naive pg_notify trigger".into(), pgbench(pg, &script, duration)?));
    pg.psql("mstore", NAIVE_DROP)?;
    let status = bridge(&["migrate"])?.wait()?;
    anyhow::ensure!(status.success(), "migrate failed");
    let mut running = bridge(&["run"])?;
    std::thread::sleep(Duration::from_secs(2));
    rows.push((
        "delta-bridge capture, bridge running".into(),
        pgbench(pg, &script, duration)?,
    ));
    let mut waited = 0;
    while backlog() != "0" && waited < 600 {
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let drained = backlog();
    let _ = Command::new("kill").args(["-TERM", &running.id().to_string()]).status();
    let _ = running.wait();
    rows.push((
        "delta-bridge capture, bridge stopped".into(),
        pgbench(pg, &script, duration)?,
    ));
    pg.psql("mstore", "TRUNCATE delta_bridge.outbox")?;
    pg.psql(
        "mstore",
        "DROP TRIGGER delta_bridge_capture_upd ON products; DROP TRIGGER delta_bridge_capture_ins ON products;",
    )?;
    rows.push(("none again (drift check)".into(), pgbench(pg, &script, duration)?));

    let base = (rows[0].1 + rows[rows.len() - 1].1) / 2.0;
    println!("{:<40} {:>10} {:>12}", "configuration", "tps", "vs none");
    for (name, tps) in &rows {
        println!("{name:<40} {tps:>10.0} {:>11.0}%", tps / base * 100.0);
    }
    println!("\noutbox rows left after the running bridge caught up: {drained} (every captured change published)");
    drop(stack);
    Ok(())
}
