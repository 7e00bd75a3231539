//! Checks of docs/openapi.json that need no server and no Python: what the contract must say beyond being
//! well-formed OpenAPI (openapi-spec-validator checks that), and what no validator knows: every route of the
//! bridge is there, every error answer is the JSON `Error`, every example matches its schema.

use std::collections::BTreeSet;

use delta_harness::schemas::{schema_errors, validate_in};
use serde_json::Value;

/// Every route the bridge serves, as `METHOD path`.
pub const ROUTES: [&str; 11] = [
    "POST /api/v1/devices",
    "GET /api/v1/changes",
    "GET /api/v1/snapshot",
    "GET /api/v1/devices/{device_id}",
    "DELETE /api/v1/devices/{device_id}",
    "POST /api/v1/broker/authn",
    "GET /.well-known/jwks.json",
    "GET /api/v1/openapi.json",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
];

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// A JSON Pointer token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Every problem found, empty when none.
pub fn problems(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let version = doc["openapi"].as_str().unwrap_or("");
    let minor_patch = version.strip_prefix("3.1.");
    if !minor_patch.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        out.push(format!("openapi is {version:?}, not 3.1.x"));
    }
    refs(doc, doc, "", &mut out);
    schemas_and_examples(doc, doc, "", &mut out);
    operations(doc, &mut out);
    out
}

/// Every `$ref` names a part of this document.
fn refs(doc: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == "$ref" {
                    match child.as_str().and_then(|r| r.strip_prefix('#')) {
                        Some(p) if doc.pointer(p).is_some() => {}
                        _ => out.push(format!("{at}: $ref {child} resolves nowhere")),
                    }
                } else {
                    refs(doc, child, &format!("{at}/{}", escape(k)), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                refs(doc, child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Every Schema Object (under `components/schemas`, and every `schema` member elsewhere) is valid JSON
/// Schema 2020-12, and every `example` / `examples` beside a `schema` (media types, parameters) matches it.
fn schemas_and_examples(doc: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    let Value::Object(m) = v else {
        if let Value::Array(a) = v {
            for (i, child) in a.iter().enumerate() {
                schemas_and_examples(doc, child, &format!("{at}/{i}"), out);
            }
        }
        return;
    };
    if at == "/components/schemas" {
        for (name, s) in m {
            if let Err(e) = schema_errors(s) {
                out.push(format!("{at}/{name}: not a valid JSON Schema: {e}"));
            }
        }
        return;
    }
    if let Some(schema) = m.get("schema") {
        let pointer = format!("{at}/schema");
        if let Err(e) = schema_errors(schema) {
            out.push(format!("{pointer}: not a valid JSON Schema: {e}"));
        }
        let mut examples: Vec<(String, &Value)> = Vec::new();
        if let Some(e) = m.get("example") {
            examples.push((format!("{at}/example"), e));
        }
        if let Some(Value::Object(named)) = m.get("examples") {
            for (name, e) in named {
                match e.get("value") {
                    Some(value) => examples.push((format!("{at}/examples/{name}"), value)),
                    None => out.push(format!("{at}/examples/{name}: no value")),
                }
            }
        }
        for (where_, example) in examples {
            if let Err(e) = validate_in(doc, &pointer, example) {
                out.push(format!("{where_} does not match its schema: {e}"));
            }
        }
    }
    for (k, child) in m {
        if k != "schema" {
            schemas_and_examples(doc, child, &format!("{at}/{}", escape(k)), out);
        }
    }
}

/// `$ref`s to `#/components/...` followed, once.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    v.get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|p| doc.pointer(p))
        .unwrap_or(v)
}

/// The operations are exactly [`ROUTES`]; each has a unique operationId and declares its path's
/// parameters; every 4xx and 5xx answer is `application/json` with the `Error` schema; links name
/// operations that exist.
fn operations(doc: &Value, out: &mut Vec<String>) {
    let mut found = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut links = Vec::new();
    let Some(paths) = doc["paths"].as_object() else {
        out.push("no paths".into());
        return;
    };
    for (path, item) in paths {
        let templated: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let route = format!("{} {path}", method.to_uppercase());
            found.insert(route.clone());
            match op["operationId"].as_str() {
                Some(id) if ids.insert(id.to_string()) => {}
                other => out.push(format!("{route}: operationId {other:?} missing or repeated")),
            }
            let declared: BTreeSet<&str> = [&item["parameters"], &op["parameters"]]
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
                .map(|p| resolve(doc, p))
                .filter(|p| p["in"] == "path" && p["required"] == true)
                .filter_map(|p| p["name"].as_str())
                .collect();
            if declared != templated {
                out.push(format!(
                    "{route}: path parameters {declared:?}, template has {templated:?}"
                ));
            }
            let Some(responses) = op["responses"].as_object() else {
                out.push(format!("{route}: no responses"));
                continue;
            };
            for (status, response) in responses {
                let response = resolve(doc, response);
                if status.starts_with('4') || status.starts_with('5') {
                    let content = response["content"].as_object();
                    let only_json = content.is_some_and(|c| c.len() == 1 && c.contains_key("application/json"));
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    let is_error = schema == "#/components/schemas/Error";
                    // /readyz's 503 is its readiness body, not an error message.
                    if !only_json || !(is_error || route == "GET /readyz") {
                        out.push(format!("{route} {status}: not application/json with the Error schema"));
                    }
                }
                if let Some(l) = response["links"].as_object() {
                    links.extend(l.values().map(|l| (route.clone(), l["operationId"].clone())));
                }
            }
        }
    }
    let expected: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    if found != expected {
        out.push(format!(
            "operations: missing {:?}, not served {:?}",
            expected.difference(&found).collect::<Vec<_>>(),
            found.difference(&expected).collect::<Vec<_>>()
        ));
    }
    for (route, target) in links {
        if !target.as_str().is_some_and(|t| ids.contains(t)) {
            out.push(format!("{route}: link to operation {target} that does not exist"));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_checks_find_what_they_look_for() {
        let text = std::fs::read_to_string(crate::DOCUMENT).expect("docs/openapi.json");
        let good: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(problems(&good), Vec::<String>::new());
        let broken = |f: &dyn Fn(&mut Value)| {
            let mut d = good.clone();
            f(&mut d);
            problems(&d)
        };
        assert!(!broken(&|d| d["openapi"] = json!("3.0.3")).is_empty());
        assert!(!broken(&|d| d["components"]["schemas"]["Id"]["minLength"] = json!(-1)).is_empty());
        assert!(!broken(&|d| d["components"]["schemas"]["Nowhere"] = json!({"$ref": "#/x"})).is_empty());
        assert!(!broken(&|d| {
            d["components"]["responses"]["NotFound"]["content"]["application/json"]["example"] = json!({"e": 1})
        })
        .is_empty());
        assert!(
            !broken(&|d| d["paths"]["/healthz"]["get"]["responses"]["500"] = json!({"description": "x"})).is_empty()
        );
        assert!(!broken(&|d| d["paths"]
            .as_object_mut()
            .map(|p| p.remove("/metrics"))
            .map_or((), |_| ()))
        .is_empty());
        assert!(!broken(&|d| d["paths"]["/api/v1/devices/{device_id}"]["parameters"] = json!([])).is_empty());
    }
}
