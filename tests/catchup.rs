//! The catch-up API end to end (docs/api.md, `GET /api/v1/changes` and `GET /api/v1/snapshot`) against a real
//! PostgreSQL, a real Mosquitto and the bridge: the events it returns are key for key what MQTT carried, of
//! the caller's branch only; every refused token is refused; malformed parameters are 400; past the retention
//! the answer is 410 `resync_required`; and a snapshot taken under concurrent writes plus the changes after it
//! give exactly the database's products and inventory (through the reference client in
//! tests/common/catchup_client.rs).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::catchup_client::{Inventory, Product, ReferenceClient};
use common::{Env, InProcessBridge, Subscriber};
use delta_bridge::config::Config;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "catchup-admin-token-0123456789";
const MERCHANT: &str = "MCH-MST-001";
const BRANCH: &str = "BRN-MST-OSK00001";
const OTHER_BRANCH: &str = "BRN-MST-OSK00002";
const WAIT: Duration = Duration::from_secs(30);

/// A fresh EC P-256 key in PKCS#8 PEM (readable by the bridge and by jsonwebtoken), at `path`.
fn ec_key(path: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl genpkey");
    std::fs::write(path, &out.stdout).expect("key");
    out.stdout
}

/// The bridge's configuration: a signing key (made once per test directory), the admin token, no broker-side
/// provisioning, and `extra` TOML; `name` is the replica's MQTT client id prefix.
fn config(env: &Env, name: &str, extra: &str) -> Config {
    config_with_admin(env, name, extra, ADMIN_TOKEN)
}

fn config_with_admin(env: &Env, name: &str, extra: &str, admin_token: &str) -> Config {
    let key = env.dir.join("device-signing-key.pem");
    if !key.exists() {
        ec_key(&key);
    }
    let toml = env
        .config_toml(&format!(
            "{extra}[credentials]\nsigning_key_file = \"{}\"\nmin_ttl = \"1s\"\n[broker]\nkind = \"none\"\n",
            key.display()
        ))
        .replace("client_id = \"bridge-", &format!("client_id = \"{name}-"));
    let secrets = vec![("DELTA_BRIDGE__HTTP__ADMIN_TOKEN".to_string(), admin_token.to_string())];
    Config::parse(&toml, Path::new("test.toml"), &secrets).expect("config")
}

async fn start(tag: &str, extra: &str) -> (Env, InProcessBridge) {
    let env = Env::start(tag);
    let bridge = env.bridge_with(config(&env, "bridge", extra)).await;
    (env, bridge)
}

struct Api {
    http: String,
    client: reqwest::Client,
}

impl Api {
    fn new(bridge: &InProcessBridge) -> Api {
        Api {
            http: bridge.http.clone(),
            client: reqwest::Client::new(),
        }
    }

    /// GET with an optional bearer token: the status and the body, which must be JSON.
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{path}", self.http));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("http");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body expected ({status}): {text}"));
        (status, v)
    }

    async fn issue(&self, device: &str, branch: &str, ttl: Option<u64>) -> String {
        let mut body = json!({"device_id": device, "merchant_code": MERCHANT, "branch_code": branch});
        if let Some(t) = ttl {
            body["ttl_seconds"] = json!(t);
        }
        let resp = self
            .client
            .post(format!("{}/api/v1/devices", self.http))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status().as_u16(), 201);
        let v: Value = resp.json().await.expect("json");
        v["password"].as_str().expect("password").to_string()
    }

    async fn revoke(&self, device: &str) {
        let resp = self
            .client
            .delete(format!("{}/api/v1/devices/{device}", self.http))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("http");
        assert_eq!(resp.status().as_u16(), 204);
    }

    /// Every event after `after`, paged by `limit`, until up to date; asserts the paging fields on the way.
    async fn all_changes(&self, token: &str, scope: &str, after: i64, limit: u32) -> Vec<Value> {
        let mut events = Vec::new();
        let mut after = after;
        loop {
            let (status, page) = self
                .get(
                    &format!("/api/v1/changes?after={after}&limit={limit}{scope}"),
                    Some(token),
                )
                .await;
            assert_eq!(status, 200, "{page}");
            let got = page["events"].as_array().expect("events").clone();
            assert!(got.len() <= limit as usize);
            let next = page["next_after"].as_i64().expect("next_after");
            assert_eq!(
                next,
                got.last()
                    .map_or(after, |e| e["branch_seq"].as_i64().expect("branch_seq"))
            );
            let done = page["up_to_date"].as_bool().expect("up_to_date");
            let bytes: usize = got.iter().map(|e| e.to_string().len()).sum();
            // A page holds at most 4 MiB of payload past its first event.
            let first = got.first().map_or(0, |e| e.to_string().len());
            assert!(bytes <= (4 << 20) + first, "page of {bytes} bytes");
            if !done && got.len() < limit as usize {
                assert!(
                    bytes > 3 << 20,
                    "a short page that is not up to date nor cut by size: {page}"
                );
            }
            events.extend(got);
            after = next;
            if done {
                return events;
            }
        }
    }
}

async fn last_seq(db: &tokio_postgres::Client, branch: &str) -> i64 {
    db.query_one(
        "SELECT coalesce((SELECT last_seq FROM delta_bridge.branch_counter
                           WHERE merchant_code = $1 AND branch_code = $2), 0)",
        &[&MERCHANT, &branch],
    )
    .await
    .expect("counter")
    .get(0)
}

/// Changes to both branches of the merchant, four events of each a round: the price of two products, the
/// stock of a third, the quantity of an inventory row.
async fn write_some(db: &tokio_postgres::Client, rounds: i32) {
    for r in 0..rounds {
        db.batch_execute(&format!(
            "UPDATE products SET price = price + 0.25, updated_by = 'w{r}'
              WHERE id IN (SELECT id FROM products WHERE branch_id = 1 ORDER BY id LIMIT 2)
                 OR id IN (SELECT id FROM products WHERE branch_id = 2 ORDER BY id LIMIT 2);
             UPDATE products SET stock = stock - 1, updated_by = 's{r}'
              WHERE id IN ((SELECT max(id) FROM products WHERE branch_id = 1), (SELECT max(id) FROM products WHERE branch_id = 2));
             UPDATE inventory SET quantity = quantity + {r} + 1, updated_by = 'q{r}'
              WHERE id IN ((SELECT min(id) FROM inventory WHERE branch_id = 1), (SELECT min(id) FROM inventory WHERE branch_id = 2));"
        ))
        .await
        .expect("write");
    }
}

/// The ids of a branch's products (branch 1 is MCH-MST-001/BRN-MST-OSK00001, 2 its OSK00002).
async fn product_ids(db: &tokio_postgres::Client, branch_id: i64) -> Vec<i64> {
    db.query(
        "SELECT id FROM products WHERE branch_id = $1 ORDER BY id",
        &[&branch_id],
    )
    .await
    .expect("products")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_what_mqtt_carried_for_the_callers_branch_only() {
    let (env, bridge) = start("catchup-keys", "").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    let sub = Subscriber::start(
        &env.mqtt.url(),
        "catchup-keys-sub",
        &format!("dev/{MERCHANT}/{BRANCH}/#"),
    )
    .await;
    write_some(&db, 6).await;
    common::wait_outbox_empty(&db, WAIT).await;
    let last = last_seq(&db, BRANCH).await;
    assert_eq!(last, 6 * 4, "four events of this branch a round");
    let got = sub
        .wait_for(WAIT, "every event of the branch", |m| {
            m.iter()
                .map(|r| r.payload["event_id"].clone())
                .collect::<HashSet<_>>()
                .len() as i64
                >= last
        })
        .await;
    // What MQTT carried, once per event, in branch_seq order.
    let mut carried: BTreeMap<i64, Value> = BTreeMap::new();
    for m in &got {
        carried.insert(m.payload["branch_seq"].as_i64().expect("branch_seq"), m.payload.clone());
    }
    let carried: Vec<Value> = carried.into_values().collect();
    assert_eq!(carried.len() as i64, last);

    let token = api.issue("tab-keys", BRANCH, None).await;
    let fetched = api.all_changes(&token, "", 0, 7).await;
    assert_eq!(fetched.len(), carried.len(), "none missing, none extra");
    for (f, c) in fetched.iter().zip(&carried) {
        assert_eq!(f, c, "the same event, value for value");
        assert_eq!(common::keys(f), common::keys(c), "the same keys in the same order");
    }
    // The raw bytes too: the API writes the logged payload as it is.
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/changes?after=0&limit=1", bridge.http))
        .bearer_auth(&token)
        .send()
        .await
        .expect("http");
    let text = resp.text().await.expect("body");
    let first = got
        .iter()
        .find(|m| m.payload["branch_seq"] == 1)
        .expect("branch_seq 1 received");
    assert!(
        text.contains(std::str::from_utf8(&first.raw).expect("utf-8")),
        "the page carries the MQTT payload byte for byte: {text}"
    );
    // From the middle, and past the newest.
    let tail = api.all_changes(&token, "", last - 3, 500).await;
    assert_eq!(tail, carried[(last - 3) as usize..].to_vec());
    let (status, page) = api
        .get(&format!("/api/v1/changes?after={}", last + 100), Some(&token))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        page,
        json!({"events": [], "next_after": last + 100, "up_to_date": true})
    );
    let (status, page) = api
        .get(&format!("/api/v1/changes?after={}", i64::MAX), Some(&token))
        .await;
    assert_eq!(status, 200, "the largest after: {page}");
    assert_eq!(page, json!({"events": [], "next_after": i64::MAX, "up_to_date": true}));

    // The other branch's events, through the admin token, are its own: none of this branch's.
    let other_last = last_seq(&db, OTHER_BRANCH).await;
    assert!(other_last > 0);
    let scope = format!("&merchant_code={MERCHANT}&branch_code={OTHER_BRANCH}");
    let other = api.all_changes(ADMIN_TOKEN, &scope, 0, 1000).await;
    assert_eq!(other.len() as i64, other_last);
    let ours: HashSet<&Value> = carried.iter().map(|e| &e["event_id"]).collect();
    assert!(
        other.iter().all(|e| !ours.contains(&e["event_id"])),
        "no event of another branch"
    );
    // A device token ignores merchant/branch parameters: still its own branch.
    let forced = api.all_changes(&token, &scope, 0, 1000).await;
    assert_eq!(forced, carried, "a device cannot read another branch");
    // A standby (not the leader) serves the same events.
    let standby = env.bridge_with(config(&env, "standby", "")).await;
    assert_eq!(common::metric(&standby.http, "delta_bridge_leader").await, Some(0.0));
    let via_standby = Api::new(&standby).all_changes(&token, "", 0, 9).await;
    assert_eq!(via_standby, carried, "the standby serves the same events");
    standby.stop().await;
    let n = common::metric(
        &bridge.http,
        "delta_bridge_catchup_requests_total{endpoint=\"changes\",outcome=\"ok\"}",
    )
    .await;
    assert!(n.is_some_and(|n| n >= 5.0), "ok calls counted: {n:?}");
    sub.stop().await;
    bridge.stop().await;
}

/// A token with the claims of `token` (and its `kid`), signed by another key: what another bridge, or an
/// attacker with a key of their own, would present.
fn foreign_token(token: &str, key_pem: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let header: Value = serde_json::from_slice(&b64.decode(parts.next().expect("header")).expect("b64")).expect("json");
    let claims: Value = serde_json::from_slice(&b64.decode(parts.next().expect("claims")).expect("b64")).expect("json");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = header["kid"].as_str().map(str::to_string);
    // The PEM's body is the PKCS#8 DER.
    let body: String = String::from_utf8_lossy(key_pem)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("pem body");
    let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
    jsonwebtoken::encode(&h, &claims, &key).expect("signed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_and_malformed_parameters() {
    let (env, bridge) = start("catchup-auth", "").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    write_some(&db, 1).await;
    common::wait_outbox_empty(&db, WAIT).await;
    let page = "/api/v1/changes?after=0";
    let assert_401 = |(status, body): (u16, Value), what: &str| {
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    };

    assert_401(api.get(page, None).await, "no token");
    assert_401(api.get(page, Some("garbage")).await, "garbage");
    assert_401(api.get(page, Some("aaa.bbb.ccc")).await, "garbage with a JWT's shape");
    let token = api.issue("tab-auth", BRANCH, None).await;
    assert_eq!(api.get(page, Some(&token)).await.0, 200);
    let other_key = ec_key(&env.dir.join("other-key.pem"));
    assert_401(
        api.get(page, Some(&foreign_token(&token, &other_key))).await,
        "another bridge's key",
    );

    // Rotated away: the old token stops, the new one works.
    let rotated = api.issue("tab-auth", BRANCH, None).await;
    assert_401(api.get(page, Some(&token)).await, "rotated away");
    assert_eq!(api.get(page, Some(&rotated)).await.0, 200);
    // Moved to another branch: it reads that branch now, and the old token is dead.
    let moved = api.issue("tab-auth", OTHER_BRANCH, None).await;
    assert_401(api.get(page, Some(&rotated)).await, "moved away");
    let (status, body) = api.get("/api/v1/changes?after=0&limit=1000", Some(&moved)).await;
    assert_eq!(status, 200);
    let seqs: Vec<i64> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["branch_seq"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(
        seqs.len() as i64,
        last_seq(&db, OTHER_BRANCH).await,
        "the other branch's events: {body}"
    );
    // Revoked.
    api.revoke("tab-auth").await;
    assert_401(api.get(page, Some(&moved)).await, "revoked");
    // Expired: a 1 s token works at once, and not once 5 s of leeway have passed.
    let short = api.issue("tab-short", BRANCH, Some(1)).await;
    assert_eq!(api.get(page, Some(&short)).await.0, 200);
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_401(api.get(page, Some(&short)).await, "expired");

    // The admin token: the branch is required, and must exist.
    let (status, body) = api.get(page, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    for bad in ["NO%00PE", "a%2Fb", "%2B"] {
        let (status, body) = api
            .get(
                &format!("{page}&merchant_code={MERCHANT}&branch_code={bad}"),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = api
        .get(
            &format!("{page}&merchant_code={MERCHANT}&branch_code=NOPE"),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = api
        .get(
            &format!("{page}&merchant_code={MERCHANT}&branch_code={BRANCH}"),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200);
    assert_401(
        api.get(
            &format!("{page}&merchant_code={MERCHANT}&branch_code={BRANCH}"),
            Some("not-the-admin-token"),
        )
        .await,
        "wrong admin token",
    );

    // Malformed parameters: 400, JSON.
    let device = api.issue("tab-params", BRANCH, None).await;
    for q in [
        "/api/v1/changes",
        "/api/v1/changes?after=",
        "/api/v1/changes?after=-1",
        "/api/v1/changes?after=1.5",
        "/api/v1/changes?after=abc",
        "/api/v1/changes?after=%2B1",
        "/api/v1/changes?after=9223372036854775808",
        "/api/v1/changes?after=0&limit=-1",
        "/api/v1/changes?after=0&limit=1001",
        "/api/v1/changes?after=0&limit=x",
        "/api/v1/snapshot?cursor=",
        "/api/v1/snapshot?cursor=garbage",
        "/api/v1/snapshot?cursor=p.--1",
        "/api/v1/snapshot?cursor=p.1.2",
        "/api/v1/snapshot?limit=0",
        "/api/v1/snapshot?limit=1001",
    ] {
        let (status, body) = api.get(q, Some(&device)).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert!(body["error"].is_string(), "{q}: {body}");
    }
    let (status, _) = api.get("/api/v1/changes?after=0&limit=1000", Some(&device)).await;
    assert_eq!(status, 200, "limit 1000 is the maximum, accepted");
    let (status, _) = api.get("/api/v1/changes?after=0&limit=0", Some(&device)).await;
    assert_eq!(status, 200, "limit 0 is a non-negative integer");
    let metrics = common::scrape(&bridge.http).await;
    for outcome in ["unauthorized", "bad_request", "not_found"] {
        let n = common::sample(
            &metrics,
            &format!("delta_bridge_catchup_requests_total{{endpoint=\"changes\",outcome=\"{outcome}\"}}"),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{outcome} counted: {n:?}");
    }
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_retention_the_answer_is_resync_required() {
    let (env, bridge) = start("catchup-410", "[catchup]\nretention = \"2s\"\n").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    let token = api.issue("tab-410", BRANCH, None).await;
    write_some(&db, 2).await;
    common::wait_outbox_empty(&db, WAIT).await;
    let last = last_seq(&db, BRANCH).await;
    assert_eq!(
        api.get("/api/v1/changes?after=0", Some(&token)).await.0,
        200,
        "still retained"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = api.get("/api/v1/changes?after=0", Some(&token)).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"], "resync_required");
    let (status, body) = api.get("/api/v1/changes?after=0&limit=0", Some(&token)).await;
    assert_eq!(
        status, 410,
        "limit=0 with an expired after is a 410 like any other limit: {body}"
    );
    let (status, body) = api
        .get(&format!("/api/v1/changes?after={}", last - 1), Some(&token))
        .await;
    assert_eq!(status, 410, "the newest event is past the retention too: {body}");
    let (status, body) = api.get(&format!("/api/v1/changes?after={last}"), Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"events": [], "next_after": last, "up_to_date": true}));
    // A fresh event is served again after `last`.
    write_some(&db, 1).await;
    common::wait_outbox_empty(&db, WAIT).await;
    let (status, body) = api.get(&format!("/api/v1/changes?after={last}"), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(4));
    assert_eq!(body["up_to_date"], true);
    // The reference client resyncs from a snapshot by itself on the 410.
    let mut client = ReferenceClient::new(&bridge.http, &token, "");
    client.catch_up(100, 10).await.expect("catch up");
    assert_eq!(client.snapshots, 1, "one snapshot, on the 410");
    assert_eq!(client.applied, last_seq(&db, BRANCH).await);
    let n = common::metric(
        &bridge.http,
        "delta_bridge_catchup_requests_total{endpoint=\"changes\",outcome=\"resync_required\"}",
    )
    .await;
    assert!(n.is_some_and(|n| n >= 3.0), "410s counted: {n:?}");
    bridge.stop().await;
}

/// The process ids of the endpoints' open database sessions.
async fn catchup_sessions(db: &tokio_postgres::Client) -> Vec<i32> {
    db.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'delta-bridge-catchup' ORDER BY pid",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_keep_their_database_session() {
    let (env, bridge) = start("catchup-lease", "").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    let token = api.issue("tab-lease", BRANCH, None).await;
    assert_eq!(api.get("/api/v1/changes?after=0", Some(&token)).await.0, 200);
    let before = catchup_sessions(&db).await;
    assert_eq!(before.len(), 1, "one session, kept after the call");
    api.revoke("tab-lease").await;
    for _ in 0..10 {
        assert_eq!(api.get("/api/v1/changes?after=0", Some(&token)).await.0, 401, "revoked");
        let scope = format!("&merchant_code={MERCHANT}&branch_code=NO-SUCH-BRANCH");
        let (status, _) = api
            .get(&format!("/api/v1/snapshot?limit=1{scope}"), Some(ADMIN_TOKEN))
            .await;
        assert_eq!(status, 404, "unknown branch");
    }
    assert_eq!(
        catchup_sessions(&db).await,
        before,
        "refused calls (read from the database) reuse the same session"
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_with_two_dots_is_still_the_admins() {
    let env = Env::start("catchup-dots");
    let admin = "admin.token-with.two-dots-0123456789";
    let bridge = env.bridge_with(config_with_admin(&env, "bridge", "", admin)).await;
    let api = Api::new(&bridge);
    let scope = format!("&merchant_code={MERCHANT}&branch_code={BRANCH}");
    let (status, body) = api.get(&format!("/api/v1/changes?after=0{scope}"), Some(admin)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get(&format!("/api/v1/snapshot?limit=5{scope}"), Some(admin)).await;
    assert_eq!(status, 200, "{body}");
    // Not the admin token, JWT-shaped: still checked as a device token and refused.
    let (status, _) = api
        .get(
            &format!("/api/v1/changes?after=0{scope}"),
            Some("admin.token-with.two-dots-x"),
        )
        .await;
    assert_eq!(status, 401);
    bridge.stop().await;
}

/// Each products and inventory row's greatest `seq` among the branch's events in the change log (read from the
/// payloads, as a device would), with the `updated_by` that event carried, to hold the snapshot against.
type Logged = BTreeMap<i64, (i64, Option<String>)>;

async fn logged_seqs(db: &tokio_postgres::Client) -> (Logged, Logged) {
    let (mut products, mut inventory) = (Logged::new(), Logged::new());
    for r in db
        .query(
            "SELECT payload FROM delta_bridge.change_log WHERE merchant_code = $1 AND branch_code = $2",
            &[&MERCHANT, &BRANCH],
        )
        .await
        .expect("change log")
    {
        let e: Value = serde_json::from_slice(r.get::<_, &[u8]>(0)).expect("payload");
        let seq = e["seq"].as_i64().expect("seq");
        let (map, key) = match e["event_type"].as_str().expect("event_type") {
            "product_updated" | "stock_updated" | "product_deleted" => (&mut products, "product_id"),
            "quantity_updated" | "inventory_deleted" => (&mut inventory, "inventory_id"),
            _ => continue,
        };
        let id = e["data"][key].as_i64().expect("row id");
        let by = e["data"]["updated_by"].as_str().map(str::to_string);
        let at = map.entry(id).or_insert((seq, by.clone()));
        if seq > at.0 {
            *at = (seq, by);
        }
    }
    (products, inventory)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_shows_only_its_columns_and_each_rows_latest_seq() {
    let (env, bridge) = start("catchup-rows", "").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    write_some(&db, 2).await;
    // An insert and a delete of products, an inventory row inserted, all without updated_by.
    let kept: i64 = db
        .query_one(
            "INSERT INTO products (branch_id, name, price, stock) VALUES (1, 'Teh', 3.50, 10) RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let gone: i64 = db
        .query_one(
            "INSERT INTO products (branch_id, name, price, stock) VALUES (1, 'Susu', 4.00, 5) RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let inv: i64 = db
        .query_one(
            "INSERT INTO inventory (branch_id, product_id, quantity) VALUES (1, $1, 7) RETURNING id",
            &[&kept],
        )
        .await
        .expect("insert")
        .get(0);
    db.execute("DELETE FROM products WHERE id = $1", &[&gone])
        .await
        .expect("delete");
    // A negative id: the bridge publishes it like any other, so the snapshot shows its seq.
    db.execute(
        "INSERT INTO products (id, branch_id, name, price, stock) VALUES (-5, 1, 'Minus', 1.00, 1)",
        &[],
    )
    .await
    .expect("negative id");
    common::wait_outbox_empty(&db, WAIT).await;
    // A column the snapshot does not show, nested 200 deep in every row (a default: no row is rewritten, no
    // event captured): reading whole rows would fail on it.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    db.batch_execute(&format!(
        "ALTER TABLE products ADD COLUMN extra jsonb NOT NULL DEFAULT '{deep}'"
    ))
    .await
    .expect("extra column");
    let token = api.issue("tab-rows", BRANCH, None).await;
    let mut client = ReferenceClient::new(&bridge.http, &token, "");
    client
        .snapshot(7, || {})
        .await
        .expect("snapshot despite the deep column");
    let (products, inventory) = database_state(&db).await;
    assert_eq!(client.products.len(), products.len());
    assert!(client.products.contains_key(&kept));
    assert!(
        !client.products.contains_key(&gone),
        "a deleted product is not in the snapshot"
    );

    assert_eq!(client.products[&kept].price, json!(3.5));
    assert_eq!(client.inventory.len(), inventory.len());

    let (p_seqs, i_seqs) = logged_seqs(&db).await;
    assert!(p_seqs.contains_key(&gone), "the delete was logged");
    for (id, p) in &client.products {
        assert_eq!(p.seq, p_seqs.get(id).map(|l| l.0), "seq of products row {id}");
        // The row's column, else (unset) what its latest event carried.
        let by = products[id]
            .updated_by
            .clone()
            .or_else(|| p_seqs.get(id).and_then(|l| l.1.clone()));
        assert_eq!(p.updated_by, by, "updated_by of products row {id}");
    }
    for (id, i) in &client.inventory {
        assert_eq!(i.seq, i_seqs.get(id).map(|l| l.0), "seq of inventory row {id}");
        let by = inventory[id]
            .updated_by
            .clone()
            .or_else(|| i_seqs.get(id).and_then(|l| l.1.clone()));
        assert_eq!(i.updated_by, by, "updated_by of inventory row {id}");
    }
    assert!(
        client.products.values().any(|p| p.seq.is_none()),
        "rows never published show null"
    );
    assert!(client.products[&kept].seq.is_some() && client.inventory[&inv].seq.is_some());
    assert!(client.products[&-5].seq.is_some(), "a negative id has its seq");
    assert!(
        client.products[&kept].updated_by.is_some() && client.inventory[&inv].updated_by.is_some(),
        "rows without updated_by show their events' writer"
    );
    bridge.stop().await;

    // As on an install that numbered its events before row_seq existed: migration 11's backfill from the
    // change log gives back exactly what numbering kept.
    let row_seq = || async {
        db.query("SELECT tbl, row_id, seq FROM delta_bridge.row_seq ORDER BY 1, 2", &[])
            .await
            .expect("row_seq")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
            .collect::<Vec<_>>()
    };
    let kept_seqs = row_seq().await;
    db.batch_execute("DELETE FROM delta_bridge.row_seq; DELETE FROM delta_bridge.schema_migrations WHERE version = 11")
        .await
        .expect("as before");
    delta_bridge::service::migrate_once(&config(&env, "bridge", ""))
        .await
        .expect("migration 11 again");
    assert_eq!(row_seq().await, kept_seqs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_changes_keeps_to_its_byte_budget() {
    let (env, bridge) = start("catchup-bytes", "").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    let token = api.issue("tab-bytes", BRANCH, None).await;
    let before = last_seq(&db, BRANCH).await;
    // 120 product events of about 49 KB each: about 5.7 MB, more than one page's budget.
    let product = product_ids(&db, 1).await[0];
    for r in 0..120 {
        db.execute(
            "UPDATE products SET name = repeat('x', 49000) || $2::text WHERE id = $1",
            &[&product, &r.to_string()],
        )
        .await
        .expect("update");
    }
    common::wait_outbox_empty(&db, WAIT).await;
    let last = last_seq(&db, BRANCH).await;
    assert_eq!(last - before, 120);
    let (status, page) = api
        .get(&format!("/api/v1/changes?after={before}&limit=1000"), Some(&token))
        .await;
    assert_eq!(status, 200);
    let n = page["events"].as_array().map_or(0, Vec::len);
    assert!(n > 0 && n < 120, "the first page is cut by size: {n} events");
    assert_eq!(page["up_to_date"], false);
    // Paging still returns every event, in order (all_changes checks each page's size).
    let events = api.all_changes(&token, "", before, 1000).await;
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["branch_seq"].as_i64().expect("branch_seq"))
        .collect();
    assert_eq!(seqs, (before + 1..=last).collect::<Vec<_>>());

    // An event lost from the log: a page that would step over it is a 410, never a silent gap.
    db.execute(
        "DELETE FROM delta_bridge.change_log WHERE merchant_code = $1 AND branch_code = $2 AND branch_seq = $3",
        &[&MERCHANT, &BRANCH, &(before + 10)],
    )
    .await
    .expect("lose one");
    for (after, limit, want) in [
        (before, 5, 200),
        (before, 20, 410),
        (before + 3, 1000, 410),
        (before + 10, 5, 200),
    ] {
        let (status, body) = api
            .get(&format!("/api/v1/changes?after={after}&limit={limit}"), Some(&token))
            .await;
        assert_eq!(status, want, "after {after} limit {limit}: {body}");
    }
    bridge.stop().await;
}

/// The branch's products and inventory as the database holds them, in the reference client's shape (seq
/// aside).
async fn database_state(db: &tokio_postgres::Client) -> (BTreeMap<i64, Product>, BTreeMap<i64, Inventory>) {
    let branch =
        "(SELECT b.id FROM branches b JOIN merchants m ON m.id = b.merchant_id WHERE m.code = $1 AND b.code = $2)";
    let mut products = BTreeMap::new();
    for r in db
        .query(
            &format!(
                "SELECT p.id, json_build_object('name', p.name, 'price', p.price, 'stock', p.stock,
                                                'updated_by', p.updated_by)
                   FROM products p WHERE p.branch_id = {branch}"
            ),
            &[&MERCHANT, &BRANCH],
        )
        .await
        .expect("products")
    {
        let row: Value = r.get(1);
        products.insert(
            r.get::<_, i64>(0),
            Product {
                name: row["name"].as_str().unwrap_or("").to_string(),
                price: row["price"].clone(),
                stock: row["stock"].as_i64().unwrap_or(0),
                updated_by: row["updated_by"].as_str().map(str::to_string),
                seq: None,
            },
        );
    }
    let mut inventory = BTreeMap::new();
    for r in db
        .query(
            &format!(
                "SELECT i.id, i.product_id, p.name, i.quantity::bigint, i.updated_by
                   FROM inventory i JOIN products p ON p.id = i.product_id WHERE i.branch_id = {branch}"
            ),
            &[&MERCHANT, &BRANCH],
        )
        .await
        .expect("inventory")
    {
        inventory.insert(
            r.get::<_, i64>(0),
            Inventory {
                product_id: r.get(1),
                product_name: r.get(2),
                quantity: r.get(3),
                updated_by: r.get(4),
                seq: None,
            },
        );
    }
    (products, inventory)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_changes_equal_the_database_under_concurrent_writes() {
    let (env, bridge) = start("catchup-snapshot", "").await;
    let api = Api::new(&bridge);
    let db = env.client().await;
    // Some history first, so that rows carry seqs and others none.
    write_some(&db, 2).await;
    common::wait_outbox_empty(&db, WAIT).await;
    let token = api.issue("tab-snap", BRANCH, None).await;

    let ours = product_ids(&db, 1).await;
    let theirs = product_ids(&db, 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2usize {
        let (url, stop, ours, theirs) = (env.pg_url(), stop.clone(), ours.clone(), theirs.clone());
        writers.push(tokio::spawn(async move {
            let db = common::connect(&url).await;
            let mut n = 0usize;
            // One row a statement (and a transaction): two writers never deadlock.
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let pick = |k: usize| ours[(n * 7 + w * 3 + k) % ours.len()];
                let by = format!("writer{w}");
                let statements = [
                    (
                        "UPDATE products SET stock = stock + 1, updated_by = $2 WHERE id = $1",
                        pick(0),
                    ),
                    (
                        "UPDATE products SET price = price + 0.01, updated_by = $2 WHERE id = $1",
                        pick(5),
                    ),
                    (
                        "UPDATE inventory SET quantity = quantity - 1, updated_by = $2 WHERE product_id = $1",
                        pick(11),
                    ),
                    (
                        "UPDATE products SET stock = stock - 1, updated_by = $2 WHERE id = $1",
                        theirs[n % theirs.len()],
                    ),
                ];
                for (sql, id) in statements {
                    db.execute(sql, &[&id, &by]).await.expect("write");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = ReferenceClient::new(&bridge.http, &token, "");
    // Small pages, with a pause after each, so that writes land between them.
    client
        .snapshot(3, || std::thread::sleep(Duration::from_millis(30)))
        .await
        .expect("snapshot");
    let as_of = client.applied;
    assert!(client.pages >= 14, "40 rows in pages of 3: {}", client.pages);
    client.catch_up(50, 3).await.expect("catch up while writing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut written = 0;
    for w in writers {
        written += w.await.expect("writer");
    }
    assert!(written > 20, "writers wrote while the snapshot was taken: {written}");
    common::wait_outbox_empty(&db, WAIT).await;
    client.catch_up(50, 3).await.expect("catch up at the end");
    assert_eq!(client.snapshots, 1, "no resync was needed");
    assert!(client.applied > as_of, "events after the snapshot were applied");
    assert_eq!(client.applied, last_seq(&db, BRANCH).await);

    let (products, inventory) = database_state(&db).await;
    let strip_p = |m: &BTreeMap<i64, Product>| -> BTreeMap<i64, Product> {
        m.iter()
            .map(|(k, v)| (*k, Product { seq: None, ..v.clone() }))
            .collect()
    };
    let strip_i = |m: &BTreeMap<i64, Inventory>| -> BTreeMap<i64, Inventory> {
        m.iter()
            .map(|(k, v)| (*k, Inventory { seq: None, ..v.clone() }))
            .collect()
    };
    assert_eq!(strip_p(&client.products), products, "products equal the database's");
    assert_eq!(strip_i(&client.inventory), inventory, "inventory equals the database's");
    // Every touched row carries the seq of its latest event.
    assert!(client.products.values().any(|p| p.seq.is_some()));

    // A fresh snapshot, with as_of at the newest branch_seq, is the database by itself.
    let mut fresh = ReferenceClient::new(&bridge.http, &token, "");
    fresh.snapshot(1000, || {}).await.expect("snapshot");
    assert_eq!(fresh.applied, last_seq(&db, BRANCH).await);
    assert_eq!(strip_p(&fresh.products), products);
    assert_eq!(strip_i(&fresh.inventory), inventory);
    let (status, page) = api.get("/api/v1/snapshot?limit=1000", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(page["next_cursor"], Value::Null);
    // The objects' keys in the events' order (a JSON value here would sort them: the text is read).
    let text = reqwest::Client::new()
        .get(format!("{}/api/v1/snapshot?limit=1", bridge.http))
        .bearer_auth(&token)
        .send()
        .await
        .expect("http")
        .text()
        .await
        .expect("body");
    let at = |k: &str| {
        text.find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} in {text}"))
    };
    let order = [
        "as_of",
        "products",
        "product_id",
        "product_name",
        "price",
        "stock",
        "updated_by",
        "seq",
        "inventory",
        "next_cursor",
    ];
    assert!(
        order.windows(2).all(|w| at(w[0]) < at(w[1])),
        "key order {order:?}: {text}"
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_the_endpoints_answer_503_at_once_and_recover() {
    let (env, bridge) = start("catchup-busy", "").await;
    let token = Api::new(&bridge).issue("tab-busy", BRANCH, None).await;
    // A writer holds the products table: every snapshot read waits on it, holding its session.
    let mut locker = env.client().await;
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let client = reqwest::Client::new();
    let calls: Vec<_> = (0..48)
        .map(|_| {
            let (client, url, token) = (
                client.clone(),
                format!("{}/api/v1/snapshot", bridge.http),
                token.clone(),
            );
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let resp = client.get(url).bearer_auth(token).send().await.expect("http");
                let status = resp.status().as_u16();
                let retry_after = resp.headers().get("retry-after").is_some();
                let body: Value = resp.json().await.expect("JSON");
                (status, retry_after, body, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.rollback().await.expect("release");
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for c in calls {
        let (status, retry_after, body, took) = c.await.expect("call");
        *by_status.entry(status).or_default() += 1;
        match status {
            200 => assert!(body["as_of"].is_i64(), "{body}"),
            503 => {
                assert!(retry_after && body["error"].is_string(), "{body}");
                assert!(
                    took < Duration::from_secs(3),
                    "a 503 comes within the 2 s wait: {took:?}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Four sessions were held by the blocked reads; the rest waited at most 2 s or were refused at once.
    assert_eq!(by_status.get(&200), Some(&4), "{by_status:?}");
    assert_eq!(by_status.get(&503), Some(&44), "{by_status:?}");
    // Released, the endpoints answer again.
    let (status, _) = Api::new(&bridge).get("/api/v1/snapshot", Some(&token)).await;
    assert_eq!(status, 200);
    let n = common::metric(
        &bridge.http,
        "delta_bridge_catchup_requests_total{endpoint=\"snapshot\",outcome=\"unavailable\"}",
    )
    .await;
    assert_eq!(n, Some(44.0));
    bridge.stop().await;
}
