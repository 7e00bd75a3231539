//! The HTTP API against hostile and broken clients (docs/api.md "Limits"), on a real bridge process: stalled
//! headers and bodies are cut off (10 s, 30 s), bodies over 64 KiB are refused before they are read and
//! before authentication, every error is JSON, connections beyond `http.max_connections` are closed and
//! counted, failed admin authentication is limited per address, and SIGTERM ends the process within 15 s
//! whatever its clients are doing. Stalled clients are raw TCP connections, so that the test controls every
//! byte and sees exactly when the bridge closes.

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::raw_http::{until_closed, Raw};
use common::{BridgeProcess, Env};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "hardening-admin-token-0123456789";

/// A bridge process with the admin token and a signing key (so that a good request can succeed: `broker.kind`
/// is `none`), plus `vars`; ready when this returns.
async fn bridge(env: &Env, tag: &str, vars: &[(&str, &str)]) -> BridgeProcess {
    let key = signing_key(env);
    let key = key.to_str().expect("utf-8 path");
    let mut all = vec![
        ("DELTA_BRIDGE__HTTP__ADMIN_TOKEN", TOKEN),
        ("DELTA_BRIDGE__CREDENTIALS__SIGNING_KEY_FILE", key),
    ];
    all.extend_from_slice(vars);
    let b = env.bridge_process_with(tag, &all);
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;
    b
}

fn signing_key(env: &Env) -> PathBuf {
    let path = env.dir.join("signing-key.pem");
    if !path.exists() {
        let out = Command::new("openssl")
            .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
            .output()
            .expect("openssl");
        assert!(out.status.success());
        std::fs::write(&path, out.stdout).expect("key");
    }
    path
}

fn addr(b: &BridgeProcess) -> String {
    b.http.trim_start_matches("http://").to_string()
}

async fn connect(b: &BridgeProcess) -> TcpStream {
    TcpStream::connect(addr(b)).await.expect("connect")
}

/// A request sent in full over a new connection with `Connection: close`; the whole response.
async fn request(b: &BridgeProcess, head: &str, body: &[u8]) -> Raw {
    let mut s = connect(b).await;
    let mut req = format!("{head}\r\nHost: bridge\r\nConnection: close\r\n").into_bytes();
    if !body.is_empty() {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).await.expect("send");
    let (_, got) = until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("answered and closed");
    Raw::parse(&got)
}

/// One metric from /metrics, fetched over a connection of its own that is closed afterwards (a pooled
/// connection would hold one of the few slots the cap test leaves).
async fn metric(b: &BridgeProcess, name: &str) -> f64 {
    let r = request(b, "GET /metrics HTTP/1.1", b"").await;
    assert_eq!(r.status, 200);
    common::sample(&r.body, &format!("{name} ")).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().expect("ip"))
        .build()
        .expect("client")
}

async fn get_device(client: &reqwest::Client, b: &BridgeProcess, authorization: &str) -> (u16, Option<String>, Value) {
    let r = client
        .get(format!("{}/api/v1/devices/never-issued", b.http))
        .header("Authorization", authorization)
        .send()
        .await
        .expect("http");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ct = r.headers().get("content-type").cloned();
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(ct.as_ref().and_then(|v| v.to_str().ok()), Some("application/json"));
    (status, retry_after, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_headers_and_bodies_are_cut_off() {
    let env = Env::start("http-stall");
    let b = bridge(&env, "stall", &[]).await;

    // Three clients that never finish a request, watched at once so that the test waits ~30 s in all.
    let mut half_headers = connect(&b).await;
    half_headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bri")
        .await
        .expect("send");
    let mut silent = connect(&b).await;
    let mut idle_keep_alive = connect(&b).await;
    idle_keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        .await
        .expect("send");
    let mut first = [0u8; 512];
    let n = idle_keep_alive.read(&mut first).await.expect("first answer");
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    let mut half_body = connect(&b).await;
    half_body
        .write_all(
            format!(
                "POST /api/v1/devices HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"device_id\""
            )
            .as_bytes(),
        )
        .await
        .expect("send");

    let margin = Duration::from_secs(3);
    let (h, s, k, body) = tokio::join!(
        until_closed(&mut half_headers, Duration::from_secs(10) + margin),
        until_closed(&mut silent, Duration::from_secs(10) + margin),
        until_closed(&mut idle_keep_alive, Duration::from_secs(10) + margin),
        until_closed(&mut half_body, Duration::from_secs(30) + margin),
    );
    for (what, closed) in [
        ("half-sent headers", h),
        ("no request at all", s),
        ("idle keep-alive", k),
    ] {
        let (after, got) = closed.unwrap_or_else(|| panic!("{what}: still open after 13 s"));
        assert!(after >= Duration::from_secs(9), "{what}: closed after only {after:?}");
        assert!(
            got.is_empty(),
            "{what}: closed without an answer: {}",
            String::from_utf8_lossy(&got)
        );
    }
    let (after, got) = body.expect("half-sent body: still open after 33 s");
    assert!(
        after >= Duration::from_secs(29),
        "half-sent body: closed after only {after:?}"
    );
    let r = Raw::parse(&got);
    let msg = r.json_error(408, "half-sent body");
    assert!(msg.contains("30s"), "{msg}");
    assert_eq!(r.header("connection"), Some("close"));

    // The bridge serves on as before.
    assert_eq!(request(&b, "GET /healthz HTTP/1.1", b"").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_bodies_are_limited_before_authentication() {
    let env = Env::start("http-errors");
    let b = bridge(&env, "errors", &[]).await;
    let auth = format!("Authorization: Bearer {TOKEN}");

    // 413 for a declared 3 MB body without a token: answered at once, before a byte of the body is sent.
    let mut s = connect(&b).await;
    s.write_all(b"POST /api/v1/devices HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n")
        .await
        .expect("send");
    let (after, got) = until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed without waiting for the body");
    let r = Raw::parse(&got);
    r.json_error(413, "declared 3 MB");
    assert!(after < Duration::from_secs(2), "answered after {after:?}");

    // 413 for a chunked body that goes over 64 KiB (no length declared): cut off at the limit.
    let mut s = connect(&b).await;
    s.write_all(
        format!("POST /api/v1/devices HTTP/1.1\r\nHost: bridge\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    let chunk = vec![b' '; 8192];
    for _ in 0..9 {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(&chunk);
        c.extend_from_slice(b"\r\n");
        if s.write_all(&c).await.is_err() {
            break; // closed by the bridge after its answer
        }
    }
    let (_, got) = until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    Raw::parse(&got).json_error(413, "chunked over 64 KiB");

    // A chunked body under the limit goes through: 201 with the device's credentials.
    let mut s = connect(&b).await;
    let good = br#"{"device_id": "pos-chunked", "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001"}"#;
    let mut req = format!(
        "POST /api/v1/devices HTTP/1.1\r\nHost: bridge\r\n{auth}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        good.len()
    )
    .into_bytes();
    req.extend_from_slice(good);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    s.write_all(&req).await.expect("send");
    let (_, got) = until_closed(&mut s, Duration::from_secs(10)).await.expect("answered");
    let r = Raw::parse(&got);
    assert_eq!(r.status, 201, "{r:?}");

    // 405 with its Allow header, 404, 400 (bad JSON, bad path encoding), 415, 401: all JSON.
    let r = request(&b, "PUT /api/v1/devices HTTP/1.1", b"").await;
    r.json_error(405, "PUT /api/v1/devices");
    assert_eq!(r.header("allow"), Some("POST"));
    request(&b, "GET /nowhere HTTP/1.1", b"")
        .await
        .json_error(404, "unknown route");
    request(&b, "DELETE /healthz HTTP/1.1", b"")
        .await
        .json_error(405, "DELETE /healthz");
    let r = request(
        &b,
        &format!("POST /api/v1/devices HTTP/1.1\r\n{auth}\r\nContent-Type: application/json"),
        b"{not json",
    )
    .await;
    r.json_error(400, "bad JSON");
    let r = request(&b, &format!("GET /api/v1/devices/%FF%FE HTTP/1.1\r\n{auth}"), b"").await;
    r.json_error(400, "bad path encoding");
    let r = request(&b, &format!("POST /api/v1/devices HTTP/1.1\r\n{auth}"), good).await;
    r.json_error(415, "no content type");
    let r = request(
        &b,
        &format!("POST /api/v1/devices HTTP/1.1\r\n{auth}\r\nContent-Type: text/plain"),
        good,
    )
    .await;
    r.json_error(415, "text/plain");
    let r = request(
        &b,
        "GET /api/v1/devices/pos-chunked HTTP/1.1\r\nAuthorization: Bearer wrong-token",
        b"",
    )
    .await;
    r.json_error(401, "wrong token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));

    // The scheme in any case (RFC 7235); the token itself exactly.
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let r = request(
            &b,
            &format!("GET /api/v1/devices/pos-chunked HTTP/1.1\r\nAuthorization: {scheme} {TOKEN}"),
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{scheme}: {r:?}");
    }
    let r = request(
        &b,
        &format!(
            "GET /api/v1/devices/pos-chunked HTTP/1.1\r\nAuthorization: Bearer {}",
            TOKEN.to_uppercase()
        ),
        b"",
    )
    .await;
    r.json_error(401, "token in another case");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_counted() {
    const CAP: usize = 4;
    let env = Env::start("http-cap");
    let cap = CAP.to_string();
    let b = bridge(&env, "cap", &[("DELTA_BRIDGE__HTTP__MAX_CONNECTIONS", &cap)]).await;
    assert_eq!(metric(&b, "delta_bridge_http_connections_refused_total").await, 0.0);
    // The readiness checks' connections are gone: only the scrape's own is open.
    let start = Instant::now();
    while metric(&b, "delta_bridge_http_connections").await != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "earlier connections still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Idle connections fill the cap (they would be closed after 10 s without a request; all of this takes
    // far less).
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(connect(&b).await);
    }
    // The kernel accepts more, and the bridge closes each at once without an answer.
    for i in 0..3 {
        let mut extra = connect(&b).await;
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n").await;
        let (_, got) = until_closed(&mut extra, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("extra connection {i} still open"));
        assert!(
            got.is_empty(),
            "refused without an answer: {}",
            String::from_utf8_lossy(&got)
        );
    }
    // Once one closes, a new connection is served (here: the scrape), and the refusals were counted.
    drop(idle.pop());
    let start = Instant::now();
    let refused = loop {
        let mut s = connect(&b).await;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n\r\n")
            .await
            .ok();
        if let Some((_, got)) = until_closed(&mut s, Duration::from_secs(5)).await {
            if !got.is_empty() {
                let r = Raw::parse(&got);
                assert_eq!(r.status, 200);
                assert_eq!(
                    common::sample(&r.body, "delta_bridge_http_connections "),
                    Some(CAP as f64),
                    "three idle connections and the scrape's own"
                );
                break common::sample(&r.body, "delta_bridge_http_connections_refused_total ");
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no slot after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // 3, plus any attempt of the loop above that came before the bridge saw the close.
    assert!(refused.is_some_and(|n| n >= 3.0), "refused: {refused:?}");
    drop(idle);
    let start = Instant::now();
    while metric(&b, "delta_bridge_http_connections").await != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "closed connections still counted as open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_limited_per_address() {
    let env = Env::start("http-auth");
    let b = bridge(&env, "auth", &[]).await;
    let here = client_from("127.0.0.1");
    let elsewhere = client_from("127.0.0.2");
    let good = format!("Bearer {TOKEN}");

    // Wrong tokens: a burst of 401s, then 429 with Retry-After.
    let start = Instant::now();
    let mut unauthorized = 0;
    let (retry_after, msg) = loop {
        let (status, retry_after, body) = get_device(&here, &b, "Bearer wrong-token-0123456789").await;
        match status {
            401 => unauthorized += 1,
            429 => break (retry_after, body["error"].as_str().unwrap_or_default().to_string()),
            other => panic!("wrong token answered {other}: {body}"),
        }
        assert!(unauthorized <= 60, "no 429 after {unauthorized} failures");
    };
    // 20 in a burst, plus 2 a second for the time the loop took.
    let allowed = 20.0 + 2.0 * start.elapsed().as_secs_f64() + 1.0;
    assert!(
        unauthorized >= 20 && f64::from(unauthorized) <= allowed,
        "{unauthorized} failures before the 429"
    );
    let secs: u64 = retry_after
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    assert!(msg.contains("too many"), "{msg}");

    // While limited, this address gets 429 whatever its token (a right token is not even compared, or the
    // 429 would tell a guesser which tokens are wrong); another address is not limited.
    let (status, _, _) = get_device(&here, &b, &good).await;
    assert_eq!(status, 429, "the limited address");
    let (status, _, body) = get_device(&elsewhere, &b, &good).await;
    assert_eq!(status, 404, "another address with the right token: {body}");
    let (status, _, _) = get_device(&elsewhere, &b, "Bearer wrong-token-0123456789").await;
    assert_eq!(status, 401, "another address's failures are its own");

    // After Retry-After the right token works again, and successes never count against the address.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    for _ in 0..50 {
        let (status, _, body) = get_device(&here, &b, &good).await;
        assert_eq!(status, 404, "the right token after the wait: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_stalled_clients_exits_within_15s() {
    let env = Env::start("http-term");
    let mut b = bridge(&env, "term", &[]).await;

    let mut clients = Vec::new();
    let mut half_headers = connect(&b).await;
    half_headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("send");
    clients.push(half_headers);
    for _ in 0..3 {
        let mut half_body = connect(&b).await;
        half_body
            .write_all(
                format!(
                    "POST /api/v1/devices HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer {TOKEN}\r\n\
                     Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"device_id\""
                )
                .as_bytes(),
            )
            .await
            .expect("send");
        clients.push(half_body);
    }
    let mut keep_alive = connect(&b).await;
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        .await
        .expect("send");
    let mut first = [0u8; 512];
    assert!(keep_alive.read(&mut first).await.expect("answer") > 0);
    clients.push(keep_alive);
    clients.push(connect(&b).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let start = Instant::now();
    let pid = b.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let status = loop {
        if let Some(s) = b.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM:\n{}",
            env.log("term")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0), "{}", env.log("term"));
    eprintln!("exited {took:?} after SIGTERM with {} stalled clients", clients.len());
    drop(clients);
}
