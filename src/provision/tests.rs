use super::*;

fn cfg() -> CredentialsConfig {
    CredentialsConfig {
        signing_key_file: None,
        ttl: Duration::from_secs(86400),
        min_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(30 * 86400),
        audience: "mqtt".into(),
        issuer: "delta-bridge".into(),
    }
}

fn req(ttl: Option<u64>) -> IssueRequest {
    IssueRequest {
        device_id: "pos-01".into(),
        merchant_code: "MCH-MST-001".into(),
        branch_code: "BRN-MST-OSK00001".into(),
        ttl_seconds: ttl,
    }
}

#[test]
fn ttl_defaults_and_bounds() {
    assert_eq!(validate(&req(None), &cfg()).ok(), Some(86400));
    assert_eq!(validate(&req(Some(60)), &cfg()).ok(), Some(60));
    assert_eq!(validate(&req(Some(30 * 86400)), &cfg()).ok(), Some(30 * 86400));
    for bad in [0, 59, 30 * 86400 + 1, u64::MAX] {
        assert!(
            matches!(validate(&req(Some(bad)), &cfg()), Err(ProvisionError::Invalid(_))),
            "{bad}"
        );
    }
}

#[test]
fn ids_are_checked_before_anything_else() {
    for (field, bad) in [("device_id", "a/b"), ("merchant_code", "+"), ("branch_code", "#")] {
        let mut r = req(None);
        match field {
            "device_id" => r.device_id = bad.into(),
            "merchant_code" => r.merchant_code = bad.into(),
            _ => r.branch_code = bad.into(),
        }
        match validate(&r, &cfg()) {
            Err(ProvisionError::Invalid(m)) => assert!(m.starts_with(field), "{m}"),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn ttl_seconds_is_any_whole_json_number_and_nothing_else() {
    let parse = |ttl: &str| -> Result<Option<u64>, String> {
        serde_json::from_str::<IssueRequest>(&format!(
            r#"{{"device_id":"a","merchant_code":"m","branch_code":"b"{ttl}}}"#
        ))
        .map(|r| r.ttl_seconds)
        .map_err(|e| e.to_string())
    };
    assert_eq!(parse(""), Ok(None));
    for (json, secs) in [
        ("3600", 3600),
        ("3600.0", 3600),
        ("3.6e3", 3600),
        ("0", 0),
        ("1e30", u64::MAX),
    ] {
        assert_eq!(parse(&format!(r#","ttl_seconds":{json}"#)), Ok(Some(secs)), "{json}");
    }
    for bad in ["null", "1.5", "-5", "-5.0", "\"60\"", "true", "[60]", "{}"] {
        assert!(parse(&format!(r#","ttl_seconds":{bad}"#)).is_err(), "{bad}");
    }
    // Out of the bounds, a saturated value is refused like any too-large one.
    let mut r = req(Some(u64::MAX));
    r.ttl_seconds = parse(r#","ttl_seconds":1e30"#).expect("parses");
    assert!(matches!(validate(&r, &cfg()), Err(ProvisionError::Invalid(_))));
}

#[test]
fn unknown_fields_are_refused() {
    let r: Result<IssueRequest, _> =
        serde_json::from_str(r#"{"device_id":"a","merchant_code":"m","branch_code":"b","ttl":5}"#);
    assert!(r.is_err());
}
