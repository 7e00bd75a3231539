//! The payload JSON Schemas the repository ships (`docs/schemas/`, one per event type), compiled once, so that
//! every message the tests, the load engine and the demo receive is checked against what users were told.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

/// (event_type, schema text), exactly the files under docs/schemas.
const SCHEMAS: [(&str, &str); 5] = [
    (
        "stock_updated",
        include_str!("../../docs/schemas/stock_updated.schema.json"),
    ),
    (
        "product_updated",
        include_str!("../../docs/schemas/product_updated.schema.json"),
    ),
    (
        "quantity_updated",
        include_str!("../../docs/schemas/quantity_updated.schema.json"),
    ),
    (
        "transaction_created",
        include_str!("../../docs/schemas/transaction_created.schema.json"),
    ),
    (
        "transaction_updated",
        include_str!("../../docs/schemas/transaction_updated.schema.json"),
    ),
];

fn validators() -> &'static Result<HashMap<&'static str, jsonschema::Validator>, String> {
    static V: OnceLock<Result<HashMap<&'static str, jsonschema::Validator>, String>> = OnceLock::new();
    V.get_or_init(|| {
        SCHEMAS
            .iter()
            .map(|(name, text)| {
                let schema: Value = serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))?;
                let v = jsonschema::draft202012::new(&schema).map_err(|e| format!("{name}: {e}"))?;
                Ok((*name, v))
            })
            .collect()
    })
}

/// Checks one received payload against the schema of its `event_type`: Err names the type and every
/// violation. A payload whose type has no schema is an error too (the docs would not describe it).
pub fn validate(payload: &Value) -> Result<(), String> {
    let validators = validators()
        .as_ref()
        .map_err(|e| format!("schema does not compile: {e}"))?;
    let t = payload["event_type"].as_str().unwrap_or("(no event_type)");
    let v = validators
        .get(t)
        .ok_or_else(|| format!("no schema in docs/schemas for event_type {t:?}"))?;
    let errors: Vec<String> = v
        .iter_errors(payload)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{t}: {}", errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::validate;

    fn stock() -> serde_json::Value {
        json!({"event_type": "stock_updated", "timestamp": "2025-10-14T21:30:00.123Z", "event_id": "abc-1", "seq": 7,
               "data": {"product_id": 1, "product_name": "Kopi", "old_stock": 10, "new_stock": 8, "delta": -2,
                        "reason": "transaction", "transaction_id": 3, "updated_by": "kasir"}})
    }

    #[test]
    fn every_schema_compiles_and_accepts_a_real_shape() {
        validate(&stock()).expect("valid");
    }

    #[test]
    fn extra_keys_wrong_types_and_unknown_types_are_refused() {
        let mut extra = stock();
        extra["surprise"] = json!(1);
        assert!(validate(&extra).is_err());
        let mut wrong = stock();
        wrong["data"]["product_id"] = json!("1");
        assert!(validate(&wrong).is_err());
        let mut unknown = stock();
        unknown["event_type"] = json!("nonsense");
        assert!(validate(&unknown).is_err());
    }
}
