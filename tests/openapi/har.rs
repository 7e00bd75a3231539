//! What a schemathesis run did, read back from its reports: every request and answer from the HAR file (to
//! count them and to check every error answer independently of schemathesis), the failures from the JUnit
//! file.

use std::path::Path;

use serde_json::Value;

/// One request and its answer (status 0: no answer, the connection failed).
#[derive(Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// Every exchange in a HAR file; panics if the file is missing or not HAR.
pub fn read(path: &Path) -> Vec<Exchange> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let har: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    let entries = har["log"]["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no log.entries", path.display()));
    entries
        .iter()
        .map(|e| {
            let url = e["request"]["url"].as_str().unwrap_or("");
            // scheme://host:port/path?query -> /path
            let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
            let path = after_scheme
                .find('/')
                .map_or("/", |i| &after_scheme[i..])
                .split('?')
                .next()
                .unwrap_or("/")
                .to_string();
            Exchange {
                method: e["request"]["method"].as_str().unwrap_or("").to_string(),
                path,
                status: e["response"]["status"]
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(0),
                content_type: e["response"]["content"]["mimeType"].as_str().unwrap_or("").to_string(),
                body: e["response"]["content"]["text"].as_str().unwrap_or("").to_string(),
            }
        })
        .collect()
}

/// The documented operation a request was for, as `METHOD template` (`GET /api/v1/devices/{device_id}`);
/// anything else (another method, an unknown path) as `other methods and paths`.
pub fn operation(method: &str, path: &str) -> String {
    let template = match path.strip_prefix("/api/v1/devices/") {
        Some(rest) if !rest.is_empty() && !rest.contains('/') => "/api/v1/devices/{device_id}",
        _ => path,
    };
    let route = format!("{method} {template}");
    if super::document::ROUTES.contains(&route.as_str()) {
        route
    } else {
        "other methods and paths".into()
    }
}

/// Every error answer (4xx, 5xx, or none at all) that is not `application/json` with a body of exactly
/// `{"error": "<non-empty string>"}`, described. /readyz's 503 is its readiness body and is left out.
pub fn errors_not_json(exchanges: &[Exchange]) -> Vec<String> {
    exchanges
        .iter()
        .filter(|e| e.status == 0 || e.status >= 400)
        .filter(|e| !(e.path == "/readyz" && e.status == 503))
        .filter(|e| {
            let json_type = e
                .content_type
                .split(';')
                .next()
                .is_some_and(|t| t.trim() == "application/json");
            let body: Option<Value> = serde_json::from_str(&e.body).ok();
            let shape = body
                .as_ref()
                .and_then(Value::as_object)
                .is_some_and(|o| o.len() == 1 && o["error"].as_str().is_some_and(|s| !s.is_empty()));
            !(json_type && shape)
        })
        .map(|e| {
            let body: String = e.body.chars().take(200).collect();
            format!("{} {} -> {} {:?} {body:?}", e.method, e.path, e.status, e.content_type)
        })
        .collect()
}

/// Failures plus errors, summed over the `<testsuite>` elements of a JUnit report.
pub fn junit_failures(xml: &str) -> u64 {
    let attr = |tag: &str, name: &str| -> u64 {
        let needle = format!(" {name}=\"");
        tag.find(&needle)
            .map(|i| &tag[i + needle.len()..])
            .and_then(|rest| rest.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    xml.split("<testsuite ")
        .skip(1)
        .map(|chunk| chunk.split('>').next().unwrap_or(""))
        .map(|tag| attr(tag, "failures") + attr(tag, "errors"))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_errors_and_counts_are_read_right() {
        assert_eq!(
            operation("GET", "/api/v1/devices/a.b"),
            "GET /api/v1/devices/{device_id}"
        );
        assert_eq!(operation("POST", "/api/v1/devices"), "POST /api/v1/devices");
        assert_eq!(operation("GET", "/api/v1/devices/a/b"), "other methods and paths");
        assert_eq!(operation("PUT", "/healthz"), "other methods and paths");
        let ex = |status, ct: &str, body: &str| Exchange {
            method: "GET".into(),
            path: "/x".into(),
            status,
            content_type: ct.into(),
            body: body.into(),
        };
        let all = [
            ex(404, "application/json", r#"{"error":"not found"}"#),
            ex(200, "text/plain", "fine"),
            ex(405, "", ""),
            ex(413, "text/plain; charset=utf-8", "length limit exceeded"),
            ex(400, "application/json", r#"{"error":"x","detail":1}"#),
            ex(0, "", ""),
        ];
        assert_eq!(errors_not_json(&all).len(), 4);
        let xml = r#"<testsuites><testsuite name="a" tests="3" failures="1" errors="0"><testcase/></testsuite>
                     <testsuite name="b" tests="2" failures="0" errors="1"></testsuite></testsuites>"#;
        assert_eq!(junit_failures(xml), 2);
    }
}
