//! `delta-load` as users run it: against a private PostgreSQL and Mosquitto with the bridge
//! running it reports zero loss and writes the JSON report with the documented keys; with no bridge to
//! deliver, it reports the loss and exits non-zero.

use std::process::Command;

use delta_bridge::config::Config;
use delta_harness::stack::{Stack, StackOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn delta_load(cfg: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_delta-load"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .expect("run delta-load")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_per_stream_as_documented_and_exits_non_zero_on_loss() {
    let stack = Stack::start(StackOptions::new("load-cli")).expect("private servers");
    let toml = stack.bridge_toml("dev", "load-cli-bridge", "127.0.0.1:0");
    let cfg_path = stack.dir.join("c.toml");
    std::fs::write(&cfg_path, &toml).expect("config");
    let cfg = Config::parse(&toml, &cfg_path, &[]).expect("valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let cancel = CancellationToken::new();
    let running = delta_bridge::service::start(cfg, true, listener, cancel.clone())
        .await
        .expect("bridge");

    let json = stack.dir.join("report.json");
    let out = tokio::task::block_in_place(|| {
        delta_load(
            &cfg_path,
            &[
                "--rate",
                "40",
                "--duration",
                "3s",
                "--json",
                json.to_str().expect("utf8"),
            ],
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    assert_eq!(report["rate"], 40.0);
    assert!(report["duration_s"].as_f64().is_some_and(|d| d >= 2.9));
    for stream in ["product", "inventory", "transaction"] {
        let s = &report["streams"][stream];
        for key in ["written", "received", "lost", "duplicated", "out_of_order"] {
            assert!(s[key].is_u64(), "{stream}.{key} in {s}");
        }
        for key in ["p50", "p90", "p99", "max"] {
            assert!(s["latency_ms"][key].is_number(), "{stream}.latency_ms.{key} in {s}");
        }
        assert!(s["written"].as_u64() > Some(0), "{stream} was written to: {s}");
        assert_eq!(s["lost"], 0, "{stream}: {s}");
        assert_eq!(s["received"], s["written"]);
    }
    assert!(
        stdout.contains("stream") && stdout.contains("p99 ms"),
        "a human summary on stdout: {stdout}"
    );

    // No bridge: nothing is delivered, delta-load says so and exits 1.
    cancel.cancel();
    running.wait().await.expect("the bridge stopped cleanly");
    let out =
        tokio::task::block_in_place(|| delta_load(&cfg_path, &["--rate", "20", "--duration", "1s", "--grace", "1s"]));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lost"));

    // Bad usage is exit 2.
    let out = delta_load(&cfg_path, &["--rate", "0"]);
    assert_eq!(out.status.code(), Some(2));
    drop(stack);
}
