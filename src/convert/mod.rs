//! Conversion: one captured outbox row -> at most one device event (topic + JSON payload), exactly as
//! docs/events.md describes. Pure: no I/O, no clock; the capture time comes from the database.
//!
//! What the triggers decided (which kind of change this is) arrives in `kind`; what the devices see (keys, their
//! order, number types, the reason / transaction_id / updated_by rules) is decided here. A row that cannot be
//! converted yields a [`ConvertError`] whose text goes to the dead-letter table for an operator.

#[cfg(test)]
mod props;
pub(crate) mod topic;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Number, Value};

/// The three device streams; the label of the per-stream metrics and a topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Stream {
    Product,
    Inventory,
    Transaction,
}

impl Stream {
    pub(crate) const ALL: [Stream; 3] = [Stream::Product, Stream::Inventory, Stream::Transaction];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Stream::Product => "product",
            Stream::Inventory => "inventory",
            Stream::Transaction => "transaction",
        }
    }
}

/// One row of `delta_bridge.outbox`, as the capture triggers wrote it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Captured {
    pub id: i64,
    pub captured_at: DateTime<Utc>,
    /// stock | product | quantity | sale
    pub kind: String,
    /// INSERT | UPDATE | DELETE (a deleted row: `old_row` only, no `new_row`)
    pub op: String,
    pub merchant_code: Option<String>,
    pub branch_code: Option<String>,
    pub product_name: Option<String>,
    pub old_row: Option<Value>,
    pub new_row: Option<Value>,
    pub items: Option<Value>,
    /// {reason, transaction_id, actor, db_user, sale_id} as the writer's session had them at commit.
    pub ctx: Value,
    /// The event's number in its branch, once the leader has given it one (durably, before publishing it);
    /// None for a row not yet numbered.
    pub branch_seq: Option<i64>,
}

/// A device event ready to publish. `seq` is the outbox id: unique, and increasing in commit order per row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub seq: i64,
    /// Per merchant+branch, contiguous from 1 (see docs/events.md).
    pub branch_seq: i64,
    /// Something the writer got wrong that did not stop the event (e.g. a non-integer
    /// `delta_bridge.transaction_id`, published as null); the pipeline logs it.
    pub warning: Option<String>,
    pub stream: Stream,
    pub topic: String,
    pub event_id: String,
    /// Shared, not copied, with the MQTT client's queue.
    pub payload: bytes::Bytes,
    pub captured_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConvertError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConvertError> {
    Err(ConvertError(msg.into()))
}

/// The event id: the same on every redelivery of this outbox row, unique across reinstalls of the schema.
pub(crate) fn event_id(install_id: &str, seq: i64) -> String {
    format!("{install_id}-{seq}")
}

/// RFC 3339, UTC, milliseconds: `2025-10-14T21:30:00.123Z`.
pub(crate) fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    event_type: &'static str,
    timestamp: &'a str,
    event_id: &'a str,
    seq: i64,
    branch_seq: i64,
    data: D,
}

/// The envelope's fixed part; `encode` adds the data in the contract's key order.
struct Head<'a> {
    event_type: &'static str,
    timestamp: &'a str,
    event_id: &'a str,
    seq: i64,
    branch_seq: i64,
}

impl Head<'_> {
    fn encode<D: Serialize>(&self, data: D) -> Result<Vec<u8>, ConvertError> {
        to_vec(&Envelope {
            event_type: self.event_type,
            timestamp: self.timestamp,
            event_id: self.event_id,
            seq: self.seq,
            branch_seq: self.branch_seq,
            data,
        })
    }
}

#[derive(Serialize)]
struct StockData {
    product_id: i64,
    product_name: String,
    old_stock: i64,
    new_stock: i64,
    delta: i64,
    reason: String,
    transaction_id: Option<i64>,
    updated_by: String,
}

#[derive(Serialize)]
struct ProductData {
    product_id: i64,
    product_name: String,
    price: Number,
    stock: i64,
    updated_by: String,
}

#[derive(Serialize)]
struct QuantityData {
    inventory_id: i64,
    product_id: i64,
    product_name: String,
    old_quantity: i64,
    new_quantity: i64,
    delta: i64,
    reason: String,
    transaction_id: Option<i64>,
    updated_by: String,
}

#[derive(Serialize)]
struct SaleData {
    transaction_id: i64,
    transaction_code: String,
    offline_id: Option<String>,
    status: String,
    grand_total: Number,
    created_by: Option<String>,
    device_id: Option<String>,
    items: Vec<ItemData>,
}

#[derive(Serialize)]
struct ProductDeletedData {
    product_id: i64,
    product_name: String,
    updated_by: String,
}

#[derive(Serialize)]
struct InventoryDeletedData {
    inventory_id: i64,
    product_id: i64,
    updated_by: String,
}

#[derive(Serialize)]
struct SaleDeletedData {
    transaction_id: i64,
    transaction_code: String,
    offline_id: Option<String>,
}

#[derive(Serialize)]
struct ItemData {
    product_id: i64,
    quantity: i64,
    price: Number,
}

/// Converts one captured row, numbered `branch_seq` in its branch. `Ok(None)` means the change alters no
/// published column: nothing to send. Deterministic: the same row and number give the same bytes, so an event
/// rebuilt after a restart or a failover is byte for byte the one published before.
///
/// Total: any row, whatever its json holds, yields an event, nothing, or a [`ConvertError`]; never a panic
/// (property-tested below, fuzzed in fuzz/). An event it returns matches its schema in docs/schemas.
pub(crate) fn convert(
    c: &Captured,
    env: &str,
    install_id: &str,
    branch_seq: i64,
) -> Result<Option<Event>, ConvertError> {
    // A delete's event is built from the row as it was; every other change's from the row as committed.
    let deleted = c.op == "DELETE";
    let new = if deleted {
        match &c.old_row {
            Some(v @ Value::Object(_)) => v,
            _ => return err("deleted row captured without its old row"),
        }
    } else {
        match &c.new_row {
            Some(v @ Value::Object(_)) => v,
            _ => return err("captured row has no new row"),
        }
    };
    // The contract's seq is a positive integer and its timestamp has a four-digit year; the outbox's
    // sequence and clock give both, a row put there by hand may not.
    if c.id < 1 {
        return err(format!("outbox id {} cannot be a seq (they start at 1)", c.id));
    }
    if branch_seq < 1 {
        return err(format!(
            "branch_seq {branch_seq} is not a branch's event number (they start at 1)"
        ));
    }
    if !(0..=9999).contains(&c.captured_at.year()) {
        return err(format!("captured_at {} is outside the years 0000-9999", c.captured_at));
    }
    let (stream, event_type) = match c.kind.as_str() {
        "product" if deleted => (Stream::Product, "product_deleted"),
        "quantity" if deleted => (Stream::Inventory, "inventory_deleted"),
        "sale" if deleted => (Stream::Transaction, "transaction_deleted"),
        "stock" if deleted => return err("a stock change cannot be a delete (a deleted product is kind product)"),
        "stock" => (Stream::Product, "stock_updated"),
        "product" => (Stream::Product, "product_updated"),
        "quantity" => (Stream::Inventory, "quantity_updated"),
        "sale" if c.op == "INSERT" => (Stream::Transaction, "transaction_created"),
        "sale" => (Stream::Transaction, "transaction_updated"),
        other => {
            return err(format!(
                "unknown capture kind {}",
                shown(&Value::String(other.to_string()))
            ))
        }
    };
    let merchant = c.merchant_code.as_deref().unwrap_or("");
    let branch = c.branch_code.as_deref().unwrap_or("");
    if c.merchant_code.is_none() || c.branch_code.is_none() {
        return err("the row's branch or merchant was not found at commit");
    }
    let topic = topic::update_topic(env, merchant, branch, stream).map_err(ConvertError)?;
    let event_id = event_id(install_id, c.id);
    let ctx = Context::read(&c.ctx)?;

    let timestamp = format_timestamp(c.captured_at);
    let head = Head {
        event_type,
        timestamp: &timestamp,
        event_id: &event_id,
        seq: c.id,
        branch_seq,
    };
    let payload = match c.kind.as_str() {
        "product" if deleted => head.encode(ProductDeletedData {
            product_id: int(new, "id")?,
            product_name: text(new, "name")?,
            updated_by: ctx.updated_by(new)?,
        })?,
        "quantity" if deleted => head.encode(InventoryDeletedData {
            inventory_id: int(new, "id")?,
            product_id: int(new, "product_id")?,
            updated_by: ctx.updated_by(new)?,
        })?,
        "sale" if deleted => head.encode(SaleDeletedData {
            transaction_id: int(new, "id")?,
            transaction_code: text(new, "transaction_code")?,
            offline_id: opt_text(new, "offline_id")?.map(uuid).transpose()?,
        })?,
        "stock" => {
            let old = old_row(c)?;
            let (old_stock, new_stock) = (int(old, "stock")?, int(new, "stock")?);
            if old_stock == new_stock {
                return Ok(None);
            }
            head.encode(StockData {
                product_id: int(new, "id")?,
                product_name: text(new, "name")?,
                old_stock,
                new_stock,
                delta: delta("stock", old_stock, new_stock)?,
                reason: ctx.reason(),
                transaction_id: ctx.transaction_id,
                updated_by: ctx.updated_by(new)?,
            })?
        }
        "product" => {
            if let Some(old) = &c.old_row {
                if old.get("name") == new.get("name") && old.get("price") == new.get("price") {
                    return Ok(None);
                }
            }
            head.encode(ProductData {
                product_id: int(new, "id")?,
                product_name: text(new, "name")?,
                price: number(new, "price")?,
                stock: int(new, "stock")?,
                updated_by: ctx.updated_by(new)?,
            })?
        }
        "quantity" => {
            let new_quantity = int(new, "quantity")?;
            // A new inventory row starts from nothing: old_quantity 0, delta = its quantity.
            let old_quantity = match &c.old_row {
                Some(old) => int(old, "quantity")?,
                None => 0,
            };
            // An unchanged quantity is news only when the row now stands for another product.
            let same_product = c.old_row.as_ref().map(|old| old.get("product_id")) == Some(new.get("product_id"));
            if same_product && old_quantity == new_quantity {
                return Ok(None);
            }
            let Some(product_name) = c.product_name.clone() else {
                return err("the inventory row's product was not found at commit");
            };
            head.encode(QuantityData {
                inventory_id: int(new, "id")?,
                product_id: int(new, "product_id")?,
                product_name,
                old_quantity,
                new_quantity,
                delta: delta("quantity", old_quantity, new_quantity)?,
                reason: ctx.reason(),
                transaction_id: ctx.transaction_id,
                updated_by: ctx.updated_by(new)?,
            })?
        }
        _ => {
            let items = match &c.items {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        Ok(ItemData {
                            product_id: int(i, "product_id")?,
                            quantity: int(i, "quantity")?,
                            price: number(i, "price")?,
                        })
                    })
                    .collect::<Result<Vec<_>, ConvertError>>()?,
                _ => return err("sale captured without its items"),
            };
            head.encode(SaleData {
                transaction_id: int(new, "id")?,
                transaction_code: text(new, "transaction_code")?,
                offline_id: opt_text(new, "offline_id")?.map(uuid).transpose()?,
                status: text(new, "status")?,
                grand_total: number(new, "grand_total")?,
                created_by: opt_text(new, "created_by")?,
                device_id: opt_text(new, "device_id")?,
                items,
            })?
        }
    };
    Ok(Some(Event {
        seq: c.id,
        branch_seq,
        warning: ctx.warning,
        stream,
        topic,
        event_id,
        payload: payload.into(),
        captured_at: c.captured_at,
    }))
}

/// The writer's settings as captured at commit.
struct Context {
    reason: Option<String>,
    transaction_id: Option<i64>,
    actor: Option<String>,
    db_user: String,
    in_sale: bool,
    warning: Option<String>,
}

impl Context {
    fn read(ctx: &Value) -> Result<Context, ConvertError> {
        let sale_id = parse_id(ctx, "sale_id", "internal sale id")?;
        // A writer's non-integer transaction id cannot be published as one; the stock change itself still
        // matters to the devices, so it goes out with transaction_id null and a warning in the log.
        let (explicit, warning) = match parse_id(ctx, "transaction_id", "setting delta_bridge.transaction_id") {
            Ok(id) => (id, None),
            Err(e) => (None, Some(format!("{e}; published with transaction_id null"))),
        };
        Ok(Context {
            reason: opt_text(ctx, "reason")?.filter(|s| !s.is_empty()),
            transaction_id: explicit.or(sale_id),
            actor: opt_text(ctx, "actor")?.filter(|s| !s.is_empty()),
            db_user: opt_text(ctx, "db_user")?.unwrap_or_default(),
            in_sale: sale_id.is_some(),
            warning,
        })
    }

    /// The writer's reason, else "transaction" when this database transaction wrote a sale, else "adjustment".
    fn reason(&self) -> String {
        match &self.reason {
            Some(r) => r.clone(),
            None if self.in_sale => "transaction".to_string(),
            None => "adjustment".to_string(),
        }
    }

    /// The row's `updated_by`, else the session's `delta_bridge.actor`, else the writing role.
    fn updated_by(&self, row: &Value) -> Result<String, ConvertError> {
        Ok(opt_text(row, "updated_by")?
            .or_else(|| self.actor.clone())
            .unwrap_or_else(|| self.db_user.clone()))
    }
}

/// Reads an id that the session stored as text (settings are text); `None` when unset.
/// A products row as the catch-up snapshot shows it: the data object of `product_updated`, with the row's
/// latest published `seq` (None for a row never published).
#[derive(Debug, Serialize)]
pub(crate) struct SnapshotProduct {
    product_id: i64,
    product_name: String,
    price: Number,
    stock: i64,
    /// The row's `updated_by` column, or when unset what its latest published event carried (the writer's actor
    /// or role, kept in `delta_bridge.row_seq`); null when neither is known.
    updated_by: Option<String>,
    seq: Option<i64>,
}

/// `row` is the products row as `row_to_json` renders it, as the capture triggers store it: read with the same
/// helpers as a `product_updated` event, so that ids, names and prices come out exactly as events carry them.
pub(crate) fn snapshot_product(row: &Value, seq: Option<i64>) -> Result<SnapshotProduct, ConvertError> {
    Ok(SnapshotProduct {
        product_id: int(row, "id")?,
        product_name: text(row, "name")?,
        price: number(row, "price")?,
        stock: int(row, "stock")?,
        updated_by: opt_text(row, "updated_by")?,
        seq,
    })
}

fn parse_id(v: &Value, key: &str, what: &str) -> Result<Option<i64>, ConvertError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Ok(Some(i)),
            Err(_) => err(format!(
                "{what} is {}, not an integer id",
                shown(&Value::String(s.clone()))
            )),
        },
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| ConvertError(format!("{what} is {n}, not an integer id"))),
        Some(other) => err(format!("{what} is {}, not an integer id", shown(other))),
    }
}

/// `new - old`, or why it does not fit the event's 64-bit integer.
fn delta(what: &str, old: i64, new: i64) -> Result<i64, ConvertError> {
    new.checked_sub(old)
        .ok_or_else(|| ConvertError(format!("{what} delta {new} - {old} does not fit a 64-bit integer")))
}

/// A UUID in the contract's lower-case canonical form (a text column may hold upper case); anything else
/// is refused.
fn uuid(s: String) -> Result<String, ConvertError> {
    let canonical = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if canonical {
        Ok(s.to_ascii_lowercase())
    } else {
        err(format!("offline_id is {}, not a UUID", shown(&Value::String(s))))
    }
}

/// A value as an operator reads it in a dead letter's detail: its JSON, cut short when long (a row's column
/// may hold megabytes).
fn shown(v: &Value) -> String {
    const MAX: usize = 120;
    let text = v.to_string();
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn old_row(c: &Captured) -> Result<&Value, ConvertError> {
    c.old_row
        .as_ref()
        .ok_or_else(|| ConvertError(format!("{} change captured without its old row", c.kind)))
}

fn int(v: &Value, key: &str) -> Result<i64, ConvertError> {
    match v.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ConvertError(format!("{key} is {n}, not an integer"))),
        Some(other) => err(format!("{key} is {}, not an integer", shown(other))),
        None => err(format!("{key} is missing")),
    }
}

/// A numeric column as a JSON number (never a string). NaN and infinities, which the database renders as
/// strings, are refused: a device cannot store them as a price.
fn number(v: &Value, key: &str) -> Result<Number, ConvertError> {
    match v.get(key) {
        Some(Value::Number(n)) => Ok(n.clone()),
        Some(other) => err(format!("{key} is {}, not a finite number", shown(other))),
        None => err(format!("{key} is missing")),
    }
}

fn text(v: &Value, key: &str) -> Result<String, ConvertError> {
    opt_text(v, key)?.ok_or_else(|| ConvertError(format!("{key} is missing or null")))
}

fn opt_text(v: &Value, key: &str) -> Result<Option<String>, ConvertError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => err(format!("{key} is {}, not text", shown(other))),
    }
}

fn to_vec<T: Serialize>(v: &T) -> Result<Vec<u8>, ConvertError> {
    serde_json::to_vec(v).map_err(|e| ConvertError(format!("cannot serialise payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 10, 14, 21, 30, 0).single().expect("valid") + chrono::Duration::milliseconds(123)
    }

    fn captured(kind: &str, op: &str, old: Option<Value>, new: Value, ctx: Value) -> Captured {
        Captured {
            id: 42,
            captured_at: at(),
            kind: kind.into(),
            op: op.into(),
            merchant_code: Some("MCH-MST-001".into()),
            branch_code: Some("BRN-MST-OSK00001".into()),
            product_name: Some("Kopi".into()),
            old_row: old,
            new_row: Some(new),
            items: None,
            ctx,
            branch_seq: None,
        }
    }

    fn product(stock: i64, price: f64, updated_by: Value) -> Value {
        json!({"id": 7, "branch_id": 1, "name": "Kopi", "price": price, "stock": stock, "updated_by": updated_by,
               "updated_at": "2025-10-14T21:30:00+00:00"})
    }

    fn ctx(reason: Option<&str>, tx: Option<&str>, actor: Option<&str>, sale: Option<&str>) -> Value {
        json!({"reason": reason, "transaction_id": tx, "actor": actor, "db_user": "cashier", "sale_id": sale})
    }

    fn payload(e: &Event) -> String {
        String::from_utf8(e.payload.to_vec()).expect("utf8")
    }

    #[test]
    fn stock_updated_exact_payload() {
        let c = captured(
            "stock",
            "UPDATE",
            Some(product(10, 5.5, Value::Null)),
            product(7, 5.5, Value::Null),
            ctx(None, None, None, Some("99")),
        );
        let e = convert(&c, "dev", "abc", 3).expect("converts").expect("an event");
        assert_eq!(e.topic, "dev/MCH-MST-001/BRN-MST-OSK00001/product/updates");
        assert_eq!(e.stream, Stream::Product);
        assert_eq!(e.event_id, "abc-42");
        assert_eq!(
            payload(&e),
            r#"{"event_type":"stock_updated","timestamp":"2025-10-14T21:30:00.123Z","event_id":"abc-42","seq":42,"branch_seq":3,"data":{"product_id":7,"product_name":"Kopi","old_stock":10,"new_stock":7,"delta":-3,"reason":"transaction","transaction_id":99,"updated_by":"cashier"}}"#
        );
    }

    #[test]
    fn reason_and_transaction_id_rules() {
        let old = Some(product(1, 1.0, Value::Null));
        let new = product(5, 1.0, json!("alice"));
        let data = |c: Value| -> Value {
            let e = convert(&captured("stock", "UPDATE", old.clone(), new.clone(), c), "dev", "i", 3)
                .expect("ok")
                .expect("event");
            serde_json::from_slice::<Value>(&e.payload).expect("json")["data"].clone()
        };
        let d = data(ctx(None, None, None, None));
        assert_eq!(
            (d["reason"].clone(), d["transaction_id"].clone()),
            (json!("adjustment"), Value::Null)
        );
        let d = data(ctx(Some("restock"), None, None, None));
        assert_eq!(d["reason"], json!("restock"));
        let d = data(ctx(Some("restock"), Some("5"), None, Some("9")));
        assert_eq!(
            (d["reason"].clone(), d["transaction_id"].clone()),
            (json!("restock"), json!(5))
        );
        let d = data(ctx(None, None, None, Some("9")));
        assert_eq!(
            (d["reason"].clone(), d["transaction_id"].clone()),
            (json!("transaction"), json!(9))
        );
        assert_eq!(d["updated_by"], json!("alice"), "row's updated_by wins");
        assert_eq!(d["delta"], json!(4));
    }

    #[test]
    fn updated_by_falls_back_to_actor_then_role() {
        let old = Some(product(1, 1.0, Value::Null));
        let new = product(2, 1.0, Value::Null);
        let by = |c: Value| {
            let e = convert(&captured("stock", "UPDATE", old.clone(), new.clone(), c), "dev", "i", 3)
                .expect("ok")
                .expect("event");
            serde_json::from_slice::<Value>(&e.payload).expect("json")["data"]["updated_by"].clone()
        };
        assert_eq!(by(ctx(None, None, Some("bob"), None)), json!("bob"));
        assert_eq!(by(ctx(None, None, None, None)), json!("cashier"));
    }

    #[test]
    fn product_updated_keys_in_order_and_numbers() {
        let c = captured(
            "product",
            "UPDATE",
            Some(product(3, 1.0, Value::Null)),
            product(3, 12345678901.25, json!("ops")),
            ctx(None, None, None, None),
        );
        let e = convert(&c, "prod", "i", 3).expect("ok").expect("event");
        assert_eq!(
            payload(&e),
            r#"{"event_type":"product_updated","timestamp":"2025-10-14T21:30:00.123Z","event_id":"i-42","seq":42,"branch_seq":3,"data":{"product_id":7,"product_name":"Kopi","price":12345678901.25,"stock":3,"updated_by":"ops"}}"#
        );
    }

    #[test]
    fn no_op_changes_publish_nothing() {
        let same = product(3, 1.0, Value::Null);
        let c = captured(
            "stock",
            "UPDATE",
            Some(same.clone()),
            same.clone(),
            ctx(None, None, None, None),
        );
        assert_eq!(convert(&c, "dev", "i", 3), Ok(None));
        let c = captured(
            "product",
            "UPDATE",
            Some(same.clone()),
            same.clone(),
            ctx(None, None, None, None),
        );
        assert_eq!(convert(&c, "dev", "i", 3), Ok(None));
        let inv = json!({"id": 1, "branch_id": 1, "product_id": 7, "quantity": 4, "updated_by": null});
        let c = captured(
            "quantity",
            "UPDATE",
            Some(inv.clone()),
            inv,
            ctx(None, None, None, None),
        );
        assert_eq!(convert(&c, "dev", "i", 3), Ok(None));
    }

    #[test]
    fn quantity_updated_and_new_inventory_row() {
        let old = json!({"id": 3, "branch_id": 1, "product_id": 7, "quantity": 10, "updated_by": null});
        let new = json!({"id": 3, "branch_id": 1, "product_id": 7, "quantity": 8, "updated_by": null});
        let e = convert(
            &captured(
                "quantity",
                "UPDATE",
                Some(old),
                new.clone(),
                ctx(Some("sale"), Some("77"), Some("pos-1"), None),
            ),
            "dev",
            "i",
            3,
        )
        .expect("ok")
        .expect("event");
        assert_eq!(e.topic, "dev/MCH-MST-001/BRN-MST-OSK00001/inventory/updates");
        assert_eq!(
            payload(&e),
            r#"{"event_type":"quantity_updated","timestamp":"2025-10-14T21:30:00.123Z","event_id":"i-42","seq":42,"branch_seq":3,"data":{"inventory_id":3,"product_id":7,"product_name":"Kopi","old_quantity":10,"new_quantity":8,"delta":-2,"reason":"sale","transaction_id":77,"updated_by":"pos-1"}}"#
        );
        let e = convert(
            &captured("quantity", "INSERT", None, new, ctx(None, None, None, None)),
            "dev",
            "i",
            3,
        )
        .expect("ok")
        .expect("event");
        let d = &serde_json::from_slice::<Value>(&e.payload).expect("json")["data"];
        assert_eq!((d["old_quantity"].clone(), d["delta"].clone()), (json!(0), json!(8)));
    }

    #[test]
    fn sale_created_and_updated() {
        let row = json!({"id": 5, "branch_id": 1, "transaction_code": "TX-1", "offline_id": "6f1c2b1e-0000-4000-8000-000000000001",
                         "status": "paid", "grand_total": 30.5, "created_by": "kasir", "device_id": "pos-1",
                         "created_at": "x", "updated_at": "y"});
        let mut c = captured("sale", "INSERT", None, row, ctx(None, None, None, Some("5")));
        c.items = Some(
            json!([{"product_id": 7, "quantity": 2, "price": 10.25}, {"product_id": 8, "quantity": 1, "price": 10}]),
        );
        let e = convert(&c, "dev", "i", 3).expect("ok").expect("event");
        assert_eq!(e.topic, "dev/MCH-MST-001/BRN-MST-OSK00001/transaction/updates");
        assert_eq!(
            payload(&e),
            r#"{"event_type":"transaction_created","timestamp":"2025-10-14T21:30:00.123Z","event_id":"i-42","seq":42,"branch_seq":3,"data":{"transaction_id":5,"transaction_code":"TX-1","offline_id":"6f1c2b1e-0000-4000-8000-000000000001","status":"paid","grand_total":30.5,"created_by":"kasir","device_id":"pos-1","items":[{"product_id":7,"quantity":2,"price":10.25},{"product_id":8,"quantity":1,"price":10}]}}"#
        );
        c.op = "UPDATE".into();
        let e = convert(&c, "dev", "i", 3).expect("ok").expect("event");
        assert!(payload(&e).starts_with(r#"{"event_type":"transaction_updated""#));
    }

    #[test]
    fn unconvertible_rows_say_why() {
        let mut c = captured(
            "product",
            "INSERT",
            None,
            json!({"id": 1, "name": "x", "price": "NaN", "stock": 0}),
            ctx(None, None, None, None),
        );
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("price"));
        c.new_row = Some(product(1, 1.0, Value::Null));
        c.branch_code = Some("A/B".into());
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("branch code"));
        c.branch_code = None;
        assert!(convert(&c, "dev", "i", 3).is_err());
        let c = captured(
            "stock",
            "UPDATE",
            Some(product(1, 1.0, Value::Null)),
            product(2, 1.0, Value::Null),
            ctx(None, Some("not-a-number"), None, None),
        );
        let e = convert(&c, "dev", "i", 3).expect("still converts").expect("an event");
        let d = serde_json::from_slice::<Value>(&e.payload).expect("json")["data"].clone();
        assert_eq!(d["transaction_id"], Value::Null);
        assert!(e
            .warning
            .as_deref()
            .is_some_and(|w| w.contains("delta_bridge.transaction_id")));
    }

    #[test]
    fn deltas_beyond_i64_are_refused_not_wrapped() {
        let c = captured(
            "stock",
            "UPDATE",
            Some(product(i64::MIN, 1.0, Value::Null)),
            product(1, 1.0, Value::Null),
            ctx(None, None, None, None),
        );
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("stock delta"));
        let inv = |q: i64| json!({"id": 1, "branch_id": 1, "product_id": 7, "quantity": q, "updated_by": null});
        let c = captured(
            "quantity",
            "UPDATE",
            Some(inv(-1)),
            inv(i64::MAX),
            ctx(None, None, None, None),
        );
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("quantity delta"));
        let c = captured("quantity", "INSERT", None, inv(i64::MIN), ctx(None, None, None, None));
        let e = convert(&c, "dev", "i", 3).expect("ok").expect("event");
        let d = &serde_json::from_slice::<Value>(&e.payload).expect("json")["data"];
        assert_eq!(d["delta"], json!(i64::MIN), "a new row's delta is its quantity");
    }

    #[test]
    fn rows_put_in_the_outbox_by_hand_cannot_break_the_contract() {
        let mut c = captured(
            "product",
            "INSERT",
            None,
            product(1, 1.0, Value::Null),
            ctx(None, None, None, None),
        );
        c.id = 0;
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("seq"));
        c.id = 1;
        c.captured_at = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single().expect("valid");
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("captured_at"));
        c.captured_at = at();
        assert!(convert(&c, "dev", "i", 0).unwrap_err().0.contains("branch_seq"));
    }

    #[test]
    fn offline_id_is_published_in_canonical_form_or_refused() {
        let row = |offline: &str| {
            json!({"id": 5, "transaction_code": "TX-1", "offline_id": offline, "status": "paid",
                   "grand_total": 1, "created_by": null, "device_id": null})
        };
        let mut c = captured(
            "sale",
            "INSERT",
            None,
            row("6F1C2B1E-0000-4000-8000-00000000000A"),
            ctx(None, None, None, None),
        );
        c.items = Some(json!([]));
        let e = convert(&c, "dev", "i", 3).expect("ok").expect("event");
        let d = &serde_json::from_slice::<Value>(&e.payload).expect("json")["data"];
        assert_eq!(d["offline_id"], json!("6f1c2b1e-0000-4000-8000-00000000000a"));
        c.new_row = Some(row("not-a-uuid"));
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("not a UUID"));
    }

    #[test]
    fn a_huge_value_is_cut_short_in_the_reason() {
        let big = "x".repeat(5 << 20);
        let c = captured(
            "product",
            "INSERT",
            None,
            json!({"id": 1, "name": "x", "price": big, "stock": 0}),
            ctx(None, None, None, None),
        );
        let why = convert(&c, "dev", "i", 3).unwrap_err().0;
        assert!(
            why.len() < 300 && why.contains("price") && why.contains("bytes"),
            "{why}"
        );
        let mut c = captured(
            "product",
            "INSERT",
            None,
            product(1, 1.0, Value::Null),
            ctx(None, None, None, None),
        );
        c.branch_code = Some("é/".repeat(1000));
        let why = convert(&c, "dev", "i", 3).unwrap_err().0;
        assert!(why.len() < 400 && why.contains("branch code"), "{why}");
    }

    /// A deleted row as the DELETE captures write it: the row as it was in old_row, no new row.
    fn deleted(kind: &str, old: Value, ctx: Value) -> Captured {
        let mut c = captured(kind, "DELETE", Some(old), Value::Null, ctx);
        c.new_row = None;
        c
    }

    #[test]
    fn deletes_of_the_three_tables() {
        // products: updated_by from the row, else actor, else the writing role; the product stream.
        let e = convert(
            &deleted(
                "product",
                product(5, 9.5, json!("hq")),
                ctx(Some("r"), Some("9"), Some("pos-1"), Some("4")),
            ),
            "dev",
            "i",
            3,
        )
        .expect("ok")
        .expect("event");
        assert_eq!(e.stream, Stream::Product);
        assert_eq!(e.topic, "dev/MCH-MST-001/BRN-MST-OSK00001/product/updates");
        assert_eq!(
            payload(&e),
            r#"{"event_type":"product_deleted","timestamp":"2025-10-14T21:30:00.123Z","event_id":"i-42","seq":42,"branch_seq":3,"data":{"product_id":7,"product_name":"Kopi","updated_by":"hq"}}"#
        );
        let c = deleted(
            "product",
            product(5, 9.5, Value::Null),
            ctx(None, None, Some("pos-1"), None),
        );
        let d = serde_json::from_slice::<Value>(&convert(&c, "dev", "i", 3).expect("ok").expect("event").payload)
            .expect("json");
        assert_eq!(d["data"]["updated_by"], "pos-1");

        // inventory: no product name needed (the product may be gone with it).
        let inv = json!({"id": 3, "branch_id": 1, "product_id": 7, "quantity": 8, "updated_by": null});
        let mut c = deleted("quantity", inv, ctx(None, None, None, None));
        c.product_name = None;
        let e = convert(&c, "dev", "i", 4).expect("ok").expect("event");
        assert_eq!(e.stream, Stream::Inventory);
        assert_eq!(
            payload(&e),
            r#"{"event_type":"inventory_deleted","timestamp":"2025-10-14T21:30:00.123Z","event_id":"i-42","seq":42,"branch_seq":4,"data":{"inventory_id":3,"product_id":7,"updated_by":"cashier"}}"#
        );

        // A sale: id, code and offline id (canonical lower case, or null); no items needed.
        let row = json!({"id": 5, "branch_id": 1, "transaction_code": "TX-1",
                         "offline_id": "6F1C2B1E-0000-4000-8000-000000000001", "status": "paid", "grand_total": 1});
        let e = convert(&deleted("sale", row, ctx(None, None, None, None)), "dev", "i", 5)
            .expect("ok")
            .expect("event");
        assert_eq!(e.stream, Stream::Transaction);
        assert_eq!(
            payload(&e),
            r#"{"event_type":"transaction_deleted","timestamp":"2025-10-14T21:30:00.123Z","event_id":"i-42","seq":42,"branch_seq":5,"data":{"transaction_id":5,"transaction_code":"TX-1","offline_id":"6f1c2b1e-0000-4000-8000-000000000001"}}"#
        );
        let row = json!({"id": 6, "branch_id": 1, "transaction_code": "TX-2", "offline_id": null});
        let d = serde_json::from_slice::<Value>(
            &convert(&deleted("sale", row, ctx(None, None, None, None)), "dev", "i", 5)
                .expect("ok")
                .expect("event")
                .payload,
        )
        .expect("json");
        assert_eq!(
            d["data"],
            json!({"transaction_id": 6, "transaction_code": "TX-2", "offline_id": null})
        );
    }

    #[test]
    fn a_delete_without_its_old_row_or_of_stock_is_refused() {
        let mut c = deleted("product", product(1, 1.0, Value::Null), ctx(None, None, None, None));
        c.old_row = None;
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("old row"));
        let c = deleted("stock", product(1, 1.0, Value::Null), ctx(None, None, None, None));
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("stock"));
        let mut c = deleted(
            "sale",
            json!({"id": 5, "offline_id": null}),
            ctx(None, None, None, None),
        );
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("transaction_code"));
        c.old_row = Some(json!({"id": 5, "transaction_code": "T", "offline_id": "nope"}));
        assert!(convert(&c, "dev", "i", 3).unwrap_err().0.contains("not a UUID"));
    }
}
