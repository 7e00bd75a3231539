//! What both benchmarks start the same way: the `--bench` gate, BENCH_DURATION, and a private PostgreSQL
//! (durable) with the reference schema in database `mstore`, plus Mosquitto, in a fresh directory.

use std::path::PathBuf;
use std::time::Duration;

use delta_bridge::localenv::{Mosquitto, Postgres, REFERENCE_SCHEMA};

/// `cargo bench` passes --bench; `cargo test --benches` passes nothing: run only when benchmarking.
pub fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// BENCH_DURATION (e.g. `30s`), else `default`.
pub fn duration(default: Duration) -> Duration {
    std::env::var("BENCH_DURATION")
        .ok()
        .and_then(|d| humantime::parse_duration(&d).ok())
        .unwrap_or(default)
}

/// The servers under `{temp}/delta-bridge-{tag}-{pid}`; the caller removes the directory when done.
pub fn servers(tag: &str) -> anyhow::Result<(PathBuf, Postgres, Mosquitto)> {
    let dir = std::env::temp_dir().join(format!("delta-bridge-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = Postgres::start(&dir.join("pg"), true)?;
    let mqtt = Mosquitto::start(&dir.join("mqtt"))?;
    pg.psql("postgres", "CREATE DATABASE mstore")?;
    pg.psql("mstore", REFERENCE_SCHEMA)?;
    Ok((dir, pg, mqtt))
}
