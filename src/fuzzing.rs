//! Entry points for the cargo-fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default; not an API).
//! Each takes what a fuzzer generates, runs one of the service's parsers or pure functions on it, and panics
//! only when an invariant of the result does not hold, which is what the fuzzer reports.
//!
//! The configuration parser needs no entry point: the targets call [`crate::config::Config::parse`].

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;

use crate::config::CredentialsConfig;
use crate::convert::{self, Captured};
use crate::provision::{self, IssueRequest, ProvisionError};

/// Arbitrary bytes as an outbox row, then [`convert::convert`]: the bytes are parsed as JSON (what
/// tokio-postgres does with the row's json columns), each field of the row taken from the member of that
/// name, leniently (a missing or mistyped member is the column's NULL, or a fixed id and time). Checks that
/// an event is valid JSON with the row's seq on a five-level topic, and that a refusal's reason is short.
pub fn convert_row(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let row = captured_from_json(&v);
    match convert::convert(&row, "fuzz", "install", 1) {
        Ok(Some(e)) => {
            let payload: Value = match serde_json::from_slice(&e.payload) {
                Ok(p) => p,
                Err(err) => panic!("payload is not JSON ({err}): {:?}", String::from_utf8_lossy(&e.payload)),
            };
            assert!(row.id >= 1 && e.seq == row.id, "seq {} for row {}", e.seq, row.id);
            assert_eq!(payload["seq"], Value::from(row.id));
            assert_eq!(payload["branch_seq"], Value::from(1));
            assert_eq!(e.topic.split('/').count(), 5, "topic {:?}", e.topic);
        }
        Ok(None) => {}
        Err(e) => assert!(!e.0.is_empty() && e.0.len() < 1_000, "reason: {:?}", e.0),
    }
}

fn captured_from_json(v: &Value) -> Captured {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let captured_at = match v.get("captured_at") {
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc)),
        Some(Value::Number(n)) => n.as_i64().and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
        _ => None,
    };
    Captured {
        id: v.get("id").and_then(Value::as_i64).unwrap_or(1),
        captured_at: captured_at.unwrap_or(DateTime::UNIX_EPOCH),
        kind: text("kind").unwrap_or_default(),
        op: text("op").unwrap_or_default(),
        merchant_code: text("merchant_code"),
        branch_code: text("branch_code"),
        product_name: text("product_name"),
        old_row: v.get("old_row").cloned(),
        new_row: v.get("new_row").cloned(),
        items: v.get("items").cloned(),
        ctx: v.get("ctx").cloned().unwrap_or(Value::Null),
        branch_seq: None,
    }
}

/// The checks `POST /api/v1/devices` (and `delta-bridge device issue`) make on a request before anything
/// touches the database or the broker: ids, and the lifetime (returned, in seconds) within the configured
/// bounds.
pub fn validate_issue_request(req: &IssueRequest, cfg: &CredentialsConfig) -> Result<i64, ProvisionError> {
    provision::validate(req, cfg)
}
