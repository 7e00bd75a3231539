//! The HTTP API against clients that break HTTP itself, on a real bridge process: a client that sends
//! requests and never reads the answers holds its connection only until the write deadline (10 s without
//! progress), so a few of them cannot keep the probes out for good; and requests hyper cannot parse (a
//! garbled request line or header, conflicting lengths, another HTTP version, headers over the limit) are
//! answered in JSON like every other error (docs/api.md "Limits").

mod common;

use std::time::{Duration, Instant};

use common::raw_http::{until_closed, Raw};
use common::{BridgeProcess, Env};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

async fn bridge(env: &Env, tag: &str, vars: &[(&str, &str)]) -> BridgeProcess {
    let b = env.bridge_process_with(tag, vars);
    common::wait_ready_at(&b.http, Duration::from_secs(30)).await;
    b
}

fn addr(b: &BridgeProcess) -> std::net::SocketAddr {
    b.http
        .trim_start_matches("http://")
        .parse()
        .expect("the bridge's address")
}

/// `request` (bytes as given) on a new connection; what came back before the bridge closed it, if it did
/// within 10 s.
async fn exchange(b: &BridgeProcess, request: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr(b)).await.expect("connect");
    s.write_all(request).await.ok();
    until_closed(&mut s, Duration::from_secs(10)).await.map(|(_, got)| got)
}

/// `GET /healthz` on a new connection: Some(status) when answered, None when the connection was refused.
async fn healthz(b: &BridgeProcess) -> Option<u16> {
    exchange(b, b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n\r\n")
        .await
        .filter(|got| !got.is_empty())
        .map(|got| Raw::parse(&got).status)
}

async fn open_connections(b: &BridgeProcess) -> f64 {
    let got = exchange(b, b"GET /metrics HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n\r\n")
        .await
        .expect("metrics answered");
    common::sample(&Raw::parse(&got).body, "delta_bridge_http_connections ").expect("gauge")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_do_not_hold_the_slots() {
    const CAP: usize = 8;
    let env = Env::start("http-noread");
    let cap = CAP.to_string();
    let b = bridge(&env, "noread", &[("DELTA_BRIDGE__HTTP__MAX_CONNECTIONS", &cap)]).await;
    let start = Instant::now();
    while open_connections(&b).await != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "earlier connections still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every slot: 300 pipelined requests for the largest answer there is, on a socket with a tiny receive
    // buffer, never read.
    let mut request = Vec::new();
    for _ in 0..300 {
        request.extend_from_slice(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: bridge\r\n\r\n");
    }
    let mut held = Vec::new();
    for _ in 0..CAP {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(1024).expect("SO_RCVBUF");
        let mut s = socket.connect(addr(&b)).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(2), s.write_all(&request))
            .await
            .ok();
        held.push(s);
    }
    let attacked = Instant::now();
    // The attack works: the slots are taken (a probe is refused).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(healthz(&b).await, None, "a probe got a slot while all were held");

    // Within the write deadline (10 s without progress), and a margin, the probe is answered again.
    let answered = loop {
        if healthz(&b).await == Some(200) {
            break attacked.elapsed();
        }
        assert!(
            attacked.elapsed() < Duration::from_secs(16),
            "/healthz still refused {:?} after the attack began",
            attacked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(answered >= Duration::from_secs(9), "answered after only {answered:?}");
    eprintln!("/healthz answered {answered:?} after {CAP} clients stopped reading");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_cannot_parse_are_answered_in_json() {
    let env = Env::start("http-garbled");
    let b = bridge(&env, "garbled", &[]).await;
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: bridge\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    for (what, request, status) in [
        ("malformed request line", &b"GARBAGE\r\n\r\n"[..], 400),
        (
            "malformed header line",
            b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nno colon\r\n\r\n",
            400,
        ),
        (
            "two different lengths",
            b"POST /api/v1/devices HTTP/1.1\r\nHost: bridge\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (
            "HTTP/2.0 request line",
            b"GET /healthz HTTP/2.0\r\nHost: bridge\r\n\r\n",
            400,
        ),
        ("HTTP/0.9 request line", b"GET /healthz\r\n\r\n", 400),
        ("headers over the limit", big_header.as_bytes(), 431),
    ] {
        let got = exchange(&b, request)
            .await
            .unwrap_or_else(|| panic!("{what}: still open after 10 s"));
        let r = Raw::parse(&got);
        let msg = r.json_error(status, what);
        assert!(!msg.is_empty(), "{what}");
        assert_eq!(r.header("connection"), Some("close"), "{what}: {r:?}");
        assert_eq!(
            r.header("content-length").and_then(|n| n.parse().ok()),
            Some(r.body.len()),
            "{what}: {r:?}"
        );
    }
    // The bridge serves on as before.
    assert_eq!(healthz(&b).await, Some(200));
}
