//! [`super`] on a real hyper connection ([`crate::http::server::connection`]) over an in-memory pipe whose
//! buffer is a few bytes, so that every write is partial: hyper's own errors reach the client as JSON whole,
//! and a client that stops reading is let go at the deadline (the clock is tokio's paused one).

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

use super::*;

const HYPER_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 10:23:42 GMT\r\n\r\n";

#[test]
fn hyper_error_heads_are_recognised_and_nothing_else() {
    assert_eq!(bare_error_head(HYPER_400), Some(0));
    let mut after = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
    let at = after.len();
    after.extend_from_slice(HYPER_400);
    assert_eq!(bare_error_head(&after), Some(at));
    let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(bare_error_head(big), Some(0));
    for ours in [
        &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 21\r\n\r\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx",
        // A head whose end is not the end of the buffer: a body follows.
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    ] {
        assert_eq!(bare_error_head(ours), None, "{}", String::from_utf8_lossy(ours));
    }
}

#[test]
fn the_replacement_keeps_the_status_and_the_date() {
    let answer = String::from_utf8(json_answer(HYPER_400)).expect("utf-8");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(head.contains("\r\ndate: Thu, 03 Dec 2026 10:23:42 GMT"), "{head}");
    assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())), "{head}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).expect("json"),
        serde_json::json!({"error": "malformed request"})
    );
}

/// A connection served over a pipe of `pipe` bytes; the client's end.
fn serve(pipe: usize) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let big = "x".repeat(20_000);
    let router = Router::new().route("/big", get(move || std::future::ready(big.clone())));
    let (client, server) = tokio::io::duplex(pipe);
    let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let task = tokio::spawn(crate::http::server::connection(
        server,
        peer,
        router,
        CancellationToken::new(),
    ));
    (client, task)
}

async fn read_all(mut s: DuplexStream) -> String {
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read");
    String::from_utf8(got).expect("utf-8")
}

#[tokio::test]
async fn hyper_parse_errors_are_json_through_partial_writes() {
    for (request, status) in [
        (&b"GARBAGE\r\n\r\n"[..], 400),
        (b"GET /big HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (
            b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"GET /big HTTP/2.0\r\nHost: x\r\n\r\n", 400),
        (b"GET /big\r\n\r\n", 400),
    ] {
        let (mut client, task) = serve(7);
        client.write_all(request).await.expect("send");
        let got = read_all(client).await;
        task.await.expect("connection task");
        let (head, body) = got.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {got:?}"));
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{got}");
        assert!(head.contains("content-type: application/json"), "{got}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {got}"));
        assert!(v["error"].is_string(), "{got}");
    }
    // After a good answer on the same connection (pipelined), the error still comes whole, after it.
    let (mut client, task) = serve(7);
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
        .await
        .expect("send");
    let got = read_all(client).await;
    task.await.expect("connection task");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{}", &got[..40]);
    let last = &got[got.rfind("HTTP/1.1 ").expect("second answer")..];
    assert!(last.starts_with("HTTP/1.1 400 "), "{last}");
    assert!(last.ends_with(r#"{"error":"malformed request"}"#), "{last}");
}

const STALL: Duration = Duration::from_millis(300);
const BEHIND: Duration = Duration::from_millis(1000);

/// Writes through a [`Wire`] over a pipe of 64 bytes until the write fails; how long that took.
async fn write_until_refused(wire: &mut Wire<DuplexStream>) -> Duration {
    let start = Instant::now();
    let chunk = [b'x'; 100];
    loop {
        if wire.write_all(&chunk).await.is_err() {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never refused");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_let_go() {
    let (_client, server) = tokio::io::duplex(64);
    let mut wire = Wire::with_deadlines(server, STALL, BEHIND);
    let took = write_until_refused(&mut wire).await;
    assert!(took >= STALL && took < BEHIND, "refused after {took:?}");
}

#[tokio::test]
async fn a_client_that_reads_a_trickle_is_let_go_too() {
    let (mut client, server) = tokio::io::duplex(64);
    let mut wire = Wire::with_deadlines(server, STALL, BEHIND);
    // 8 bytes every 100 ms: progress within every stall period, far too slow to ever catch up.
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if client.read(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    let took = write_until_refused(&mut wire).await;
    assert!(took >= BEHIND && took < BEHIND * 2, "refused after {took:?}");
    drop(wire);
    reader.await.expect("reader");
}

#[tokio::test]
async fn a_client_that_keeps_up_is_never_cut_off() {
    let (mut client, server) = tokio::io::duplex(64);
    let mut wire = Wire::with_deadlines(server, STALL, BEHIND);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = [0u8; 4096];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    });
    // Slow, with pauses longer than both deadlines between answers: each is taken whole in time.
    for _ in 0..3 {
        wire.write_all(&[b'x'; 5000]).await.expect("write");
        wire.flush().await.expect("flush");
        tokio::time::sleep(BEHIND + STALL).await;
    }
    wire.shutdown().await.expect("shutdown");
    drop(wire);
    assert_eq!(reader.await.expect("reader"), 15_000);
}
