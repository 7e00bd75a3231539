//! The bridge's own MQTT client id and usernames are never a device id (docs/api.md, docs/provisioning.md): a
//! device is its client id and username, and one named like the publisher would take over its session. The
//! API answers 400 with a JSON message naming the setting, `device issue` exits 2 saying the same; ids that
//! differ in a single character or in case are ordinary devices (the brokers compare exactly).

mod common;

use std::path::Path;
use std::process::Command;

use common::Env;
use delta_bridge::config::Config;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "reserved-ids-admin-token-0123";

/// Settings given through the environment (the `[mqtt]` and `[http]` sections are the environment's file's).
fn vars() -> Vec<(String, String)> {
    [
        ("DELTA_BRIDGE__MQTT__USERNAME", "bridge-user"),
        ("DELTA_BRIDGE__MQTT__CLIENT_ID", "rsv-{hostname}-{pid}"),
        ("DELTA_BRIDGE__HTTP__ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn config_text(env: &Env) -> String {
    let out = Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let key = env.dir.join("signing-key.pem");
    std::fs::write(&key, out.stdout).expect("key");
    env.config_toml(&format!(
        "[credentials]\nsigning_key_file = {}\n\
         [broker]\nkind = \"none\"\nadmin_username = \"broker-admin\"\n\
         [load]\nusername = \"loader\"\n",
        toml::Value::String(key.to_str().expect("utf8").into())
    ))
}

async fn issue(http: &str, device_id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{http}/api/v1/devices"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"device_id": device_id, "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001"}))
        .send()
        .await
        .expect("POST /api/v1/devices");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridges_own_ids_cannot_be_issued_through_the_api_or_the_cli() {
    let env = Env::start("reserved-ids");
    let text = config_text(&env);
    let cfg = Config::parse(&text, Path::new("test.toml"), &vars()).expect("config");
    let own_client_id = cfg.mqtt.client_id.clone();
    assert!(own_client_id.starts_with("rsv-") && own_client_id != "rsv-{hostname}-{pid}");
    let bridge = env.bridge_with(cfg).await;

    // Each reserved id, with the setting the message must name.
    let reserved = [
        ("bridge-user", "mqtt.username"),
        ("loader", "load.username"),
        ("broker-admin", "broker.admin_username"),
        (own_client_id.as_str(), "mqtt.client_id"),
        // Another replica's client id, from the same template.
        ("rsv-replica-2.example-4242", "mqtt.client_id"),
    ];
    for (id, setting) in reserved {
        let (status, body) = issue(&bridge.http, id).await;
        assert_eq!(status, 400, "{id}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("reserved") && message.contains(setting) && message.contains(id),
            "{id}: {body}"
        );
    }
    let revoke = reqwest::Client::new()
        .delete(format!("{}/api/v1/devices/loader", bridge.http))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(revoke.status().as_u16(), 400, "revoking a reserved id");

    // Exact comparison: other case, one more character, a template's placeholder left empty or not a number.
    for id in [
        "Bridge-user",
        "LOADER",
        "loader2",
        "broker-admin-1",
        "rsv-replica",
        "rsv-replica-12x",
    ] {
        let (status, body) = issue(&bridge.http, id).await;
        assert_eq!(status, 201, "{id} is an ordinary device id: {body}");
    }
    bridge.stop().await;

    // The CLI, in a process of its own (another pid: the template, not this expansion, is what counts).
    let cfg_path = env.dir.join("cli.toml");
    std::fs::write(&cfg_path, &text).expect("config file");
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_delta-bridge"))
            .arg("--config")
            .arg(&cfg_path)
            .args(["device", "issue", "--device-id", id])
            .args(["--merchant", "MCH-MST-001", "--branch", "BRN-MST-OSK00001"])
            .envs(vars())
            .output()
            .expect("run delta-bridge")
    };
    for (id, setting) in reserved {
        let out = run(id);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{id}: {stderr}");
        assert!(out.stdout.is_empty(), "{id}: nothing issued");
        assert!(
            stderr.contains("reserved") && stderr.contains(setting),
            "{id}: {stderr}"
        );
    }
    let out = run("Loader");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
