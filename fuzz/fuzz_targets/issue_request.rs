//! The body of `POST /api/v1/devices`: deserialised as the handler does (serde_json into IssueRequest), then
//! the request checks, under credential bounds taken from the input's first byte. Never a panic; an accepted
//! request has ids a topic level and an MQTT client id can carry, and a lifetime within the bounds.
#![no_main]

use std::time::Duration;

use delta_bridge::config::CredentialsConfig;
use delta_bridge::IssueRequest;
use libfuzzer_sys::fuzz_target;

fn bounds(b: u8) -> CredentialsConfig {
    let (min, ttl, max) = match b % 4 {
        0 => (60, 86_400, 30 * 86_400), // the defaults
        1 => (1, 1, 1),
        2 => (0, u64::MAX / 2, u64::MAX),
        _ => (3_600, 3_600, i64::MAX as u64 + 1),
    };
    CredentialsConfig {
        signing_key_file: None,
        ttl: Duration::from_secs(ttl),
        min_ttl: Duration::from_secs(min),
        max_ttl: Duration::from_secs(max),
        audience: "mqtt".into(),
        issuer: "delta-bridge".into(),
    }
}

fn valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let Ok(req) = serde_json::from_slice::<IssueRequest>(body) else {
        return;
    };
    let cfg = bounds(first);
    if let Ok(ttl) = delta_bridge::fuzzing::validate_issue_request(&req, &cfg) {
        assert!(
            valid_id(&req.device_id) && valid_id(&req.merchant_code) && valid_id(&req.branch_code),
            "{req:?}"
        );
        let ttl = u64::try_from(ttl).expect("a lifetime is positive");
        assert!(
            cfg.min_ttl.as_secs() <= ttl && ttl <= cfg.max_ttl.as_secs(),
            "{ttl} for {req:?}"
        );
        assert_eq!(req.ttl_seconds.unwrap_or(cfg.ttl.as_secs()), ttl);
    }
});
