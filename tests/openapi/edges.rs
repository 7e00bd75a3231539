//! What schemathesis does not send: a request with a body over the limit to every documented operation
//! (including those that take no body), and a method no operation lists to every documented path. Each
//! answer must be one the document lists for that operation (or the path's 405), with the content type it
//! lists and a body that its schema accepts.

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::raw_http::{until_closed, Raw};
use delta_harness::schemas::validate_in;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// A JSON Pointer token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

async fn send(http: &str, request: String) -> Raw {
    let mut s = TcpStream::connect(http.trim_start_matches("http://"))
        .await
        .expect("connect");
    s.write_all(request.as_bytes()).await.expect("send");
    let (_, got) = until_closed(&mut s, std::time::Duration::from_secs(10))
        .await
        .expect("answered and closed");
    Raw::parse(&got)
}

/// The problems with `r` as the answer of the response documented at `at` (a pointer to a Response Object or
/// a `$ref` to one).
fn check(doc: &Value, at: &str, r: &Raw, what: &str) -> Vec<String> {
    let mut at = at.to_string();
    if let Some(target) = doc
        .pointer(&at)
        .and_then(|v| v["$ref"].as_str())
        .and_then(|s| s.strip_prefix('#'))
    {
        at = target.to_string();
    }
    let Some(response) = doc.pointer(&at) else {
        return vec![format!("{what}: {} is not documented ({at})", r.status)];
    };
    let Some(content) = response["content"].as_object() else {
        return vec![format!("{what}: no content documented at {at}")];
    };
    let ct = r.header("content-type").unwrap_or("");
    let Some(media) = content.keys().find(|k| ct.starts_with(k.as_str())) else {
        return vec![format!("{what}: content type {ct:?}, documented {:?}", content.keys())];
    };
    let Ok(body) = serde_json::from_str::<Value>(&r.body) else {
        return vec![format!("{what}: body not JSON: {r:?}")];
    };
    let schema = format!("{at}/content/{}/schema", escape(media));
    match validate_in(doc, &schema, &body) {
        Ok(()) => vec![],
        Err(e) => vec![format!("{what}: {body} does not match {schema}: {e}")],
    }
}

/// Every documented operation with a 70,000-byte body, every documented path with a method it does not list;
/// the problems found.
pub async fn oversized_bodies_and_wrong_methods(doc: &Value, http: &str, token: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        let concrete = path.replace("{device_id}", "tablet-osaka-01");
        let listed: Vec<&str> = METHODS.into_iter().filter(|m| item.get(*m).is_some()).collect();
        for method in &listed {
            let what = format!("{} {path} with a 70,000-byte body", method.to_uppercase());
            let r = send(
                http,
                format!(
                    "{} {concrete} HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer {token}\r\n\
                     Content-Type: application/json\r\nContent-Length: 70000\r\nConnection: close\r\n\r\n",
                    method.to_uppercase()
                ),
            )
            .await;
            if r.status != 413 {
                problems.push(format!("{what}: {} rather than 413", r.status));
            }
            let at = format!("/paths/{}/{method}/responses/{}", escape(path), r.status);
            problems.extend(check(doc, &at, &r, &what));
        }
        let wrong = ["PUT", "PATCH", "GET", "POST"]
            .into_iter()
            .find(|m| !listed.contains(&m.to_ascii_lowercase().as_str()))
            .expect("a method the path does not list");
        let what = format!("{wrong} {path}");
        let r = send(
            http,
            format!("{wrong} {concrete} HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        if r.status != 405 {
            problems.push(format!("{what}: {} rather than 405", r.status));
            continue;
        }
        if !item["description"]
            .as_str()
            .is_some_and(|d| d.contains("#/components/responses/MethodNotAllowed"))
        {
            problems.push(format!("{path}: its description does not name the 405 answer"));
        }
        problems.extend(check(doc, "/components/responses/MethodNotAllowed", &r, &what));
        let mut allowed: Vec<String> = r
            .header("allow")
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_ascii_lowercase())
            .filter(|m| !m.is_empty() && m != "head")
            .collect();
        allowed.sort();
        let mut expected: Vec<String> = listed.iter().map(|m| m.to_string()).collect();
        expected.sort();
        if allowed != expected {
            problems.push(format!(
                "{what}: Allow {:?}, documented {expected:?}",
                r.header("allow")
            ));
        }
    }
    problems
}
