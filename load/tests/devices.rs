//! `delta-load --devices 6 --offline 0.5` against a real PostgreSQL, a Mosquitto with dynamic security and the
//! bridge: devices provisioned through the API go offline for longer than the broker will queue for them
//! (`max_queued_messages 20`), so jumps in `branch_seq` must appear; every one must be filled through the
//! changes API and every device must end with exactly its branch's rows in the database.

use std::process::Command;

use delta_bridge::config::Config;
use delta_harness::servers::Mosquitto;
use delta_harness::stack::{dynsec_accounts, Stack, StackOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const ADMIN_PASSWORD: &str = "dynsec-admin-secret";
const BRIDGE_PASSWORD: &str = "bridge-publisher-secret";
const LOAD_PASSWORD: &str = "load-listener-secret";
const ADMIN_TOKEN: &str = "load-devices-admin-token-0123";

/// A small queue per offline session, so that a device offline for a second or more loses messages there.
const BROKER_QUEUE: &str = "max_queued_messages 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_devices_fill_every_gap_and_end_equal_to_the_database() {
    let stack = Stack::start(StackOptions {
        mqtt: Some(Box::new(|d: &std::path::Path| {
            Mosquitto::start_dynsec(d, "admin", ADMIN_PASSWORD, BROKER_QUEUE)
        })),
        ..StackOptions::new("load-devices")
    })
    .expect("private servers");
    dynsec_accounts(&stack.mqtt, ADMIN_PASSWORD, BRIDGE_PASSWORD, LOAD_PASSWORD).expect("broker accounts");
    let file = |name: &str, text: &str| {
        let p = stack.dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let key = file(
        "signing-key.pem",
        &delta_harness::demo::es256_pem().expect("signing key"),
    );
    let toml = format!(
        "env = \"dev\"\n[postgres]\nurl = \"{}\"\n\
         [mqtt]\nurl = \"{}\"\nclient_id = \"bridge\"\nusername = \"bridge\"\npassword_file = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n[bridge]\npoll_interval = \"200ms\"\n\
         [credentials]\nsigning_key_file = \"{key}\"\n\
         [broker]\nkind = \"mosquitto\"\nadmin_username = \"admin\"\nadmin_password_file = \"{}\"\n\
         [load]\nusername = \"loadgen\"\npassword_file = \"{}\"\n",
        stack.pg_url(),
        stack.mqtt.url(),
        file("mqtt-password", BRIDGE_PASSWORD),
        file("admin-token", ADMIN_TOKEN),
        file("broker-admin-password", ADMIN_PASSWORD),
        file("load-password", LOAD_PASSWORD),
    );
    let cfg_path = stack.dir.join("c.toml");
    std::fs::write(&cfg_path, &toml).expect("config");
    let cfg = Config::parse(&toml, &cfg_path, &[]).expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api = format!("http://{}", listener.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    let running = delta_bridge::service::start(cfg, true, listener, cancel.clone())
        .await
        .expect("bridge");

    let json = stack.dir.join("report.json");
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_delta-load"))
            .arg("--config")
            .arg(&cfg_path)
            .args([
                "--api",
                &api,
                "--devices",
                "6",
                "--offline",
                "0.5",
                "--rate",
                "15",
                "--duration",
                "40s",
                "--branches",
                "2",
                "--products",
                "20",
                "--writers",
                "4",
                "--json",
                json.to_str().expect("utf8"),
            ])
            .output()
            .expect("run delta-load")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default()).unwrap_or_default();
    eprintln!("{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(report["devices"], 6, "{report}");
    assert_eq!(report["device_mismatches"], 0, "{report}");
    for stream in ["product", "inventory", "transaction"] {
        assert_eq!(report["streams"][stream]["lost"], 0, "{report}");
    }
    assert_eq!(report["catchup_errors"], 0, "{report}");
    assert_eq!(report["pages_not_contiguous"], 0, "{report}");
    let detected = report["gaps_detected"].as_u64().expect("gaps_detected");
    assert!(detected > 0, "a 20-message queue must overflow: {report}");
    assert_eq!(report["gaps_filled"].as_u64(), Some(detected), "{report}");
    assert!(report["offline_periods"].as_u64() > Some(0), "{report}");
    assert!(
        report["snapshots"].as_u64() >= Some(6),
        "each device starts from a snapshot: {report}"
    );
    for key in ["p50", "p99"] {
        assert!(
            report["catchup_latency_ms"][key].as_f64().is_some_and(|v| v > 0.0),
            "{report}"
        );
    }
    assert!(stdout.contains("gaps in branch_seq detected"), "{stdout}");

    cancel.cancel();
    running.wait().await.expect("the bridge stopped cleanly");
    drop(stack);
}
