//! What both benchmarks start the same way: the `--bench` gate, BENCH_DURATION, and the harness's private
//! servers (PostgreSQL with durable commits and the reference schema, Mosquitto) with a bridge config file.

use std::path::PathBuf;
use std::time::Duration;

use delta_harness::servers::free_port;
use delta_harness::stack::{Stack, StackOptions};

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

/// The servers (removed with the stack) and a bridge config file for them, topic root `bench`, HTTP on the
/// returned port, warnings only.
pub fn servers(tag: &str) -> anyhow::Result<(Stack, PathBuf, u16)> {
    let stack = Stack::start(StackOptions {
        durable: true,
        ..StackOptions::new(tag)
    })?;
    let port = free_port()?;
    let toml = format!(
        "{}[log]\nlevel = \"warn\"\n",
        stack.bridge_toml("bench", "delta-bridge", &format!("127.0.0.1:{port}"))
    );
    let cfg_path = stack.dir.join("bench.toml");
    std::fs::write(&cfg_path, toml)?;
    Ok((stack, cfg_path, port))
}
