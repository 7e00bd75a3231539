//! The payload JSON Schemas the repository ships (`docs/schemas/`, one per event type), compiled once, so that
//! every message the tests, the load engine and the demo receive is checked against what users were told.
//! Also the JSON Schema checks of the API's OpenAPI document (docs/openapi.json), whose Schema Objects are
//! JSON Schema 2020-12: [`schema_errors`] and [`validate_in`].

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

/// (event_type, schema text), exactly the files under docs/schemas.
const SCHEMAS: [(&str, &str); 8] = [
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
    (
        "product_deleted",
        include_str!("../../docs/schemas/product_deleted.schema.json"),
    ),
    (
        "inventory_deleted",
        include_str!("../../docs/schemas/inventory_deleted.schema.json"),
    ),
    (
        "transaction_deleted",
        include_str!("../../docs/schemas/transaction_deleted.schema.json"),
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

/// Whether `schema` is a valid JSON Schema 2020-12 (against the draft's meta-schema); Err says where not.
pub fn schema_errors(schema: &Value) -> Result<(), String> {
    jsonschema::draft202012::meta::validate(schema).map_err(|e| format!("{e} at {}", e.instance_path()))
}

/// Checks `instance` against the schema found at the JSON Pointer `pointer` (e.g.
/// `/components/schemas/Error`) of `document`, where schemas refer to each other by `#/...` pointers into
/// the same document (as an OpenAPI 3.1 document's do). Err lists every violation, or says the schema does
/// not compile (a `$ref` that resolves nowhere, say).
pub fn validate_in(document: &Value, pointer: &str, instance: &Value) -> Result<(), String> {
    if document.pointer(pointer).is_none() {
        return Err(format!("no schema at {pointer}"));
    }
    // The document itself as the root schema, reduced to a `$ref` to the wanted part: its other members
    // (`openapi`, `paths`, ...) are not keywords, and every `#/...` reference resolves against it.
    let mut root = document.clone();
    let Some(obj) = root.as_object_mut() else {
        return Err("the document is not an object".into());
    };
    obj.insert("$ref".into(), Value::String(format!("#{}", fragment(pointer))));
    let v = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&root)
        .map_err(|e| format!("{pointer} does not compile: {e}"))?;
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// A JSON Pointer as a URI fragment (RFC 6901 §6): what a fragment may not hold (`{`, `}`, `%`, spaces,
/// non-ASCII) percent-encoded.
fn fragment(pointer: &str) -> String {
    let mut out = String::with_capacity(pointer.len());
    for b in pointer.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{schema_errors, validate, validate_in};

    fn stock() -> serde_json::Value {
        json!({"event_type": "stock_updated", "timestamp": "2025-10-14T21:30:00.123Z", "event_id": "abc-1", "seq": 7,
               "branch_seq": 3, "data": {"product_id": 1, "product_name": "Kopi", "old_stock": 10, "new_stock": 8, "delta": -2,
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
        let mut missing = stock();
        missing.as_object_mut().expect("object").remove("branch_seq");
        assert!(validate(&missing).is_err(), "branch_seq is required");
        let mut zero = stock();
        zero["branch_seq"] = json!(0);
        assert!(validate(&zero).is_err(), "branch_seq starts at 1");
        let mut unknown = stock();
        unknown["event_type"] = json!("nonsense");
        assert!(validate(&unknown).is_err());
    }

    #[test]
    fn a_schema_inside_a_document_follows_its_references() {
        let doc = json!({"openapi": "3.1.0", "components": {"schemas": {
            "Id": {"type": "string", "pattern": "^[a-z]+$"},
            "Box": {"type": "object", "required": ["id"], "additionalProperties": false,
                    "properties": {"id": {"$ref": "#/components/schemas/Id"}, "at": {"type": "string", "format": "date-time"}}},
            "Broken": {"$ref": "#/components/schemas/Nowhere"}}}});
        validate_in(
            &doc,
            "/components/schemas/Box",
            &json!({"id": "abc", "at": "2026-01-01T00:00:00Z"}),
        )
        .expect("valid");
        let templated = json!({"paths": {"/a/{id}": {"schema": {"$ref": "#/components/schemas/Id"}}},
                               "components": doc["components"].clone()});
        validate_in(&templated, "/paths/~1a~1{id}/schema", &json!("abc")).expect("a pointer with braces");
        assert!(validate_in(&templated, "/paths/~1a~1{id}/schema", &json!("A")).is_err());
        for bad in [
            json!({"id": "ABC"}),
            json!({"id": "a", "x": 1}),
            json!({}),
            json!({"id": "a", "at": "yesterday"}),
        ] {
            assert!(validate_in(&doc, "/components/schemas/Box", &bad).is_err(), "{bad}");
        }
        assert!(validate_in(&doc, "/components/schemas/Broken", &json!(1)).is_err());
        assert!(validate_in(&doc, "/components/schemas/Missing", &json!(1)).is_err());
        schema_errors(&doc["components"]["schemas"]["Box"]).expect("a valid schema");
        assert!(schema_errors(&json!({"type": "strin"})).is_err());
        assert!(schema_errors(&json!({"minLength": -1})).is_err());
    }
}
