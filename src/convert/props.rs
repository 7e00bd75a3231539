//! Property-based tests of [`convert`]: it is total (any captured row gives an event, nothing or a
//! [`ConvertError`], never a panic), and every event it gives matches its schema in docs/schemas. Two
//! generators: rows of random json in every field (mostly refused; they probe every error path), and rows
//! shaped like the capture triggers' (mostly converted; they probe the payloads), both carrying extra columns
//! of any json, as capture copies whole rows.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Number, Value};

use super::*;

const ENV: &str = "dev";
const INSTALL: &str = "abc123";
/// Any number works: the event carries it as given.
const BRANCH_SEQ: i64 = 17;

/// Keys the conversion reads, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "id",
            "stock",
            "name",
            "price",
            "quantity",
            "product_id",
            "updated_by",
            "transaction_code",
            "offline_id",
            "status",
            "grand_total",
            "created_by",
            "device_id",
            "reason",
            "transaction_id",
            "actor",
            "db_user",
            "sale_id",
        ])
        .prop_map(String::from),
        ".{0,6}",
    ]
}

/// Any json value serde_json can hold (finite numbers), a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        ".{0,12}".prop_map(Value::String),
        "-?[0-9 ]{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Any instant chrono can hold in milliseconds of a few thousand years either side of the contract's range.
fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    (-400_000_000_000_000i64..400_000_000_000_000i64)
        .prop_filter_map("representable", |ms| Utc.timestamp_millis_opt(ms).single())
}

/// What the database's clock gives: years 1970..9999.
fn db_time() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..253_402_300_799_999).prop_filter_map("representable", |ms| Utc.timestamp_millis_opt(ms).single())
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,16}", "[A-Za-z0-9_.-]{1,16}", Just(String::new())]
}

prop_compose! {
    /// A row of random json in every field, random kinds, ops and codes.
    fn any_captured()(
        id in any::<i64>(),
        captured_at in db_time(),
        kind in prop_oneof![
            prop::sample::select(vec!["stock", "product", "quantity", "sale"]).prop_map(String::from),
            ".{0,8}",
        ],
        op in prop_oneof![Just("INSERT".to_string()), Just("UPDATE".to_string()), Just("DELETE".to_string()), ".{0,8}"],
        merchant_code in prop::option::of(any_text()),
        branch_code in prop::option::of(any_text()),
        product_name in prop::option::of(any_text()),
        old_row in prop::option::of(any_json()),
        new_row in prop::option::of(any_json()),
        items in prop::option::of(any_json()),
        ctx in any_json(),
    ) -> Captured {
        Captured {
            id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx,
            branch_seq: None,
        }
    }
}

/// Stock and quantity values: small ones (no-ops likely) and any (overflowing deltas likely).
fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![-3i64..3, any::<i64>()]
}

fn price() -> impl Strategy<Value = f64> {
    prop_oneof![
        (0i64..10_000_000).prop_map(|c| c as f64 / 100.0),
        any::<f64>().prop_filter("finite", |f| f.is_finite())
    ]
}

/// An extra column of the business table, with any value.
fn extra() -> impl Strategy<Value = (String, Value)> {
    ("x_[a-z]{1,6}", any_json())
}

fn with_extra(mut row: Value, (k, v): (String, Value)) -> Value {
    if let Value::Object(m) = &mut row {
        m.insert(k, v);
    }
    row
}

prop_compose! {
    /// The writer's settings as `delta_bridge.ctx()` renders them: text or null; the transaction id may be
    /// anything a writer typed, the internal sale id is always an integer.
    fn ctx_json()(
        reason in prop::option::of(".{0,10}"),
        transaction_id in prop::option::of(prop_oneof!["-?[0-9]{1,18}", ".{0,10}"]),
        actor in prop::option::of(".{0,10}"),
        db_user in "[a-z_]{1,10}",
        sale_id in prop::option::of(1i64..i64::MAX),
    ) -> Value {
        json!({"reason": reason, "transaction_id": transaction_id, "actor": actor, "db_user": db_user,
               "sale_id": sale_id.map(|s| s.to_string())})
    }
}

prop_compose! {
    fn product(stock: i64)(id in any::<i64>(), name in ".{0,16}", price in price(),
                           updated_by in prop::option::of(".{0,8}"), extra in extra()) -> Value {
        with_extra(json!({"id": id, "branch_id": 1, "name": name, "price": price, "stock": stock,
                          "updated_by": updated_by, "updated_at": "2025-10-14T21:30:00+00:00"}), extra)
    }
}

prop_compose! {
    fn inventory(quantity: i64)(id in any::<i64>(), product_id in any::<i64>(),
                                updated_by in prop::option::of(".{0,8}"), extra in extra()) -> Value {
        with_extra(json!({"id": id, "branch_id": 1, "product_id": product_id, "quantity": quantity,
                          "updated_by": updated_by}), extra)
    }
}

fn uuid_text() -> impl Strategy<Value = String> {
    "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
}

prop_compose! {
    fn sale()(id in any::<i64>(), code in ".{0,12}", offline_id in prop::option::of(uuid_text()),
              status in prop::sample::select(vec!["open", "paid", "void"]), total in price(),
              created_by in prop::option::of(".{0,8}"), device_id in prop::option::of(".{0,8}"),
              extra in extra()) -> Value {
        with_extra(json!({"id": id, "branch_id": 1, "transaction_code": code, "offline_id": offline_id,
                          "status": status, "grand_total": total, "created_by": created_by,
                          "device_id": device_id, "created_at": "x", "updated_at": "y"}), extra)
    }
}

prop_compose! {
    fn items()(items in prop::collection::vec((any::<i64>(), any::<i64>(), price()), 0..6)) -> Value {
        Value::Array(items.into_iter().map(|(p, q, pr)| json!({"product_id": p, "quantity": q, "price": pr})).collect())
    }
}

/// Old and new rows of one kind, as the triggers write them.
/// A delete carries the row as it was in old_row and no new row.
fn rows() -> impl Strategy<Value = (&'static str, &'static str, Option<Value>, Option<Value>, Option<Value>)> {
    prop_oneof![
        (amount(), amount()).prop_flat_map(|(a, b)| (product(a), product(b)).prop_map(|(old, new)| (
            "stock",
            "UPDATE",
            Some(old),
            Some(new),
            None
        ))),
        (amount(), amount(), any::<bool>()).prop_flat_map(|(a, b, insert)| (product(a), product(b)).prop_map(
            move |(old, new)| (
                "product",
                if insert { "INSERT" } else { "UPDATE" },
                (!insert).then_some(old),
                Some(new),
                None
            )
        )),
        (amount(), amount(), any::<bool>()).prop_flat_map(|(a, b, insert)| (inventory(a), inventory(b)).prop_map(
            move |(old, new)| (
                "quantity",
                if insert { "INSERT" } else { "UPDATE" },
                (!insert).then_some(old),
                Some(new),
                None
            )
        )),
        (sale(), items(), any::<bool>()).prop_map(|(new, items, insert)| (
            "sale",
            if insert { "INSERT" } else { "UPDATE" },
            None,
            Some(new),
            Some(items)
        )),
        amount()
            .prop_flat_map(product)
            .prop_map(|old| ("product", "DELETE", Some(old), None, None)),
        amount()
            .prop_flat_map(inventory)
            .prop_map(|old| ("quantity", "DELETE", Some(old), None, None)),
        sale().prop_map(|old| ("sale", "DELETE", Some(old), None, None)),
    ]
}

prop_compose! {
    /// A row as the capture triggers write it (any values where the schema allows any), with an extra column.
    fn shaped_captured()(
        id in 1i64..=i64::MAX,
        captured_at in prop_oneof![9 => db_time(), 1 => any_time()],
        (kind, op, old_row, new_row, items) in rows(),
        merchant_code in "[A-Za-z0-9_.-]{1,20}",
        branch_code in "[A-Za-z0-9_.-]{1,20}",
        product_name in ".{0,16}",
        ctx in ctx_json(),
    ) -> Captured {
        Captured {
            id, captured_at, kind: kind.into(), op: op.into(), merchant_code: Some(merchant_code),
            branch_code: Some(branch_code), product_name: Some(product_name), old_row, new_row, items,
            ctx, branch_seq: None,
        }
    }
}

/// What every event must be: its schema's payload, on its row's topic, with the row's seq.
fn check_event(c: &Captured, e: &Event) -> Result<(), TestCaseError> {
    let payload: Value = serde_json::from_slice(&e.payload).map_err(|err| TestCaseError::fail(err.to_string()))?;
    delta_harness::schemas::validate(&payload).map_err(TestCaseError::fail)?;
    prop_assert_eq!(e.seq, c.id);
    prop_assert_eq!(&payload["seq"], &json!(c.id));
    prop_assert_eq!(e.branch_seq, BRANCH_SEQ);
    prop_assert_eq!(&payload["branch_seq"], &json!(BRANCH_SEQ));
    prop_assert_eq!(&e.event_id, &event_id(INSTALL, c.id));
    let m = c.merchant_code.as_deref().unwrap_or_default();
    let b = c.branch_code.as_deref().unwrap_or_default();
    prop_assert_eq!(&e.topic, &format!("{ENV}/{m}/{b}/{}/updates", e.stream.as_str()));
    Ok(())
}

/// A row shaped as the triggers write it is refused only for a capture time the contract cannot express or
/// a delta beyond i64.
fn refusable(c: &Captured, why: &str) -> bool {
    use chrono::Datelike;
    (why.contains("captured_at") && !(0..=9999).contains(&c.captured_at.year()))
        || (why.contains("delta") && overflows(c))
}

fn overflows(c: &Captured) -> bool {
    let field = match c.kind.as_str() {
        "stock" => "stock",
        "quantity" => "quantity",
        _ => return false,
    };
    let get = |r: &Option<Value>| r.as_ref().and_then(|v| v[field].as_i64()).unwrap_or(0);
    get(&c.new_row).checked_sub(get(&c.old_row)).is_none()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_row_converts_or_is_refused_never_panics(c in any_captured()) {
        match convert(&c, ENV, INSTALL, BRANCH_SEQ) {
            Ok(Some(e)) => check_event(&c, &e)?,
            Ok(None) => {}
            Err(e) => prop_assert!(!e.0.is_empty() && e.0.len() < 1_000, "a short reason: {}", e.0),
        }
    }

    #[test]
    fn rows_as_captured_convert_to_events_that_match_their_schema(c in shaped_captured()) {
        match convert(&c, ENV, INSTALL, BRANCH_SEQ) {
            Ok(Some(e)) => check_event(&c, &e)?,
            Ok(None) => prop_assert!(c.old_row.is_some(), "only an UPDATE can be a no-op"),
            Err(e) => prop_assert!(refusable(&c, &e.0), "refused: {}", e.0),
        }
    }
}
