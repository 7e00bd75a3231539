//! The credential lifecycle contract on a real Mosquitto with dynamic security (the same sequences as
//! tests/emqx_backend.rs runs against its EMQX model): after a rotation, a rotation to a shorter lifetime, a
//! move to another branch, or a DELETE and a re-issue, no earlier password of the device connects, the current
//! one does; a DELETE of a device whose token expired is 204. Mosquitto keeps one password per client
//! (`setClientPassword` replaces it), so this holds by construction; the test shows it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Env, InProcessBridge};
use delta_bridge::config::Config;
use delta_harness::servers::Mosquitto;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const DYNSEC_ADMIN: &str = "admin";
const DYNSEC_ADMIN_PASSWORD: &str = "dynsec-admin-secret";
const BRANCH_A: &str = "BRN-MST-OSK00001";
const BRANCH_B: &str = "BRN-MST-OSK00002";

async fn start(tag: &str) -> (Env, InProcessBridge) {
    let env = Env::start_with_mqtt(tag, |dir| {
        Mosquitto::start_dynsec(dir, DYNSEC_ADMIN, DYNSEC_ADMIN_PASSWORD, "").expect("mosquitto with dynamic security")
    });
    env.mqtt
        .dynsec(
            DYNSEC_ADMIN,
            DYNSEC_ADMIN_PASSWORD,
            &["createClient", "bridge", "-p", "bridge-secret"],
        )
        .expect("bridge account");
    let out = std::process::Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let key = env.dir.join("signing-key.pem");
    std::fs::write(&key, out.stdout).expect("key");
    let toml = env.config_toml(&format!(
        "[credentials]\nsigning_key_file = \"{}\"\nmin_ttl = \"1s\"\n\
         [broker]\nkind = \"mosquitto\"\nadmin_username = \"{DYNSEC_ADMIN}\"\n",
        key.display()
    ));
    let secrets: Vec<(String, String)> = [
        ("DELTA_BRIDGE__MQTT__USERNAME", "bridge"),
        ("DELTA_BRIDGE__MQTT__PASSWORD", "bridge-secret"),
        ("DELTA_BRIDGE__HTTP__ADMIN_TOKEN", ADMIN_TOKEN),
        ("DELTA_BRIDGE__BROKER__ADMIN_PASSWORD", DYNSEC_ADMIN_PASSWORD),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = Config::parse(&toml, Path::new("test.toml"), &secrets).expect("config");
    let bridge = env.bridge_with(cfg).await;
    (env, bridge)
}

async fn call(http: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{http}{path}"))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"));
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("text");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn issue(bridge: &InProcessBridge, device: &str, branch: &str, ttl: u64) -> String {
    let body = json!({"device_id": device, "merchant_code": "MCH-MST-001", "branch_code": branch, "ttl_seconds": ttl});
    let (status, creds) = call(&bridge.http, reqwest::Method::POST, "/api/v1/devices", Some(body)).await;
    assert_eq!(status, 201, "{creds}");
    creds["password"].as_str().expect("password").to_string()
}

async fn delete(bridge: &InProcessBridge, device: &str) -> u16 {
    call(
        &bridge.http,
        reqwest::Method::DELETE,
        &format!("/api/v1/devices/{device}"),
        None,
    )
    .await
    .0
}

/// One MQTT 5 CONNECT as the device: Ok on CONNACK success, Err(reason) otherwise.
async fn connect(env: &Env, device: &str, password: &str) -> Result<(), String> {
    let mut opts = MqttOptions::new(device, "127.0.0.1", env.mqtt.port);
    opts.set_credentials(device, password);
    opts.set_clean_start(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => return Ok(()),
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Err(format!("{:?}", ack.code)),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return Err(format!("{code:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no CONNACK".into()));
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    outcome
}

async fn accepted(env: &Env, device: &str, password: &str, what: &str) {
    if let Err(e) = connect(env, device, password).await {
        panic!("{what}: refused ({e}) but must connect");
    }
}

async fn refused(env: &Env, device: &str, password: &str, what: &str) {
    match connect(env, device, password).await {
        Ok(()) => panic!("{what}: connected but must be refused"),
        Err(e) => assert!(
            e.contains("NotAuthorized") || e.contains("BadUserNamePassword"),
            "{what}: refused for the wrong reason: {e}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_earlier_password_connects_again_on_mosquitto() {
    let (env, bridge) = start("mosq-life").await;

    let first = issue(&bridge, "pos-10", BRANCH_A, 3600).await;
    accepted(&env, "pos-10", &first, "first token").await;
    let second = issue(&bridge, "pos-10", BRANCH_A, 3600).await;
    refused(&env, "pos-10", &first, "rotated-away token").await;
    accepted(&env, "pos-10", &second, "current token").await;

    let long = issue(&bridge, "pos-11", BRANCH_A, 86_400).await;
    let short = issue(&bridge, "pos-11", BRANCH_A, 60).await;
    refused(&env, "pos-11", &long, "longer rotated-away token").await;
    accepted(&env, "pos-11", &short, "shorter current token").await;

    let old_branch = issue(&bridge, "pos-12", BRANCH_A, 3600).await;
    let new_branch = issue(&bridge, "pos-12", BRANCH_B, 3600).await;
    refused(&env, "pos-12", &old_branch, "token of the old branch").await;
    accepted(&env, "pos-12", &new_branch, "token of the new branch").await;

    let revoked = issue(&bridge, "pos-13", BRANCH_A, 3600).await;
    assert_eq!(delete(&bridge, "pos-13").await, 204);
    refused(&env, "pos-13", &revoked, "revoked token").await;
    let again = issue(&bridge, "pos-13", BRANCH_A, 3600).await;
    refused(&env, "pos-13", &revoked, "revoked token after a re-issue").await;
    accepted(&env, "pos-13", &again, "re-issued token").await;

    // A device whose token expired (the sweep removed it from Mosquitto): DELETE is 204, nothing connects.
    let expired = issue(&bridge, "pos-20", BRANCH_A, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(delete(&bridge, "pos-20").await, 204);
    refused(&env, "pos-20", &expired, "expired and revoked token").await;

    refused(&env, "pos-10", &first, "rotated-away token, at the end").await;
    refused(&env, "pos-11", &long, "longer token, at the end").await;
    bridge.stop().await;
}
