//! The five event types, end to end: writes to a real PostgreSQL, messages read by a real MQTT subscriber
//! from a real Mosquitto, every field checked against docs/events.md.

mod common;

use std::time::Duration;

use common::{keys, of_type, Env, Received, Subscriber};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const TOPIC_PRODUCT: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/product/updates";
const TOPIC_INVENTORY: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/inventory/updates";
const TOPIC_TRANSACTION: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/transaction/updates";

/// The envelope every payload shares, checked on the raw bytes (key order included).
fn check_envelope(m: &Received, event_type: &str, data_keys: &[&str]) {
    let p = &m.payload;
    assert_eq!(keys(p).len(), 6, "exactly six top-level keys: {p}");
    let raw = String::from_utf8(m.raw.clone()).expect("utf8");
    let mut last = 0;
    for k in ["event_type", "timestamp", "event_id", "seq", "branch_seq", "data"]
        .iter()
        .chain(data_keys)
    {
        let at = raw
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("key {k} missing in {raw}"));
        assert!(at >= last, "key {k} out of order in {raw}");
        last = at;
    }
    assert_eq!(p["event_type"], event_type);
    let ts = p["timestamp"].as_str().expect("timestamp is a string");
    assert_eq!(ts.len(), 24, "RFC 3339 UTC with milliseconds: {ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    chrono::DateTime::parse_from_rfc3339(ts).expect("valid RFC 3339");
    let event_id = p["event_id"].as_str().expect("event_id string");
    assert!(!event_id.is_empty());
    assert!(p["seq"].is_i64(), "seq is an integer");
    assert!(
        p["branch_seq"].as_i64() >= Some(1),
        "branch_seq is an integer from 1: {p}"
    );
    let data = p["data"].as_object().expect("data object");
    assert_eq!(data.len(), data_keys.len(), "data has exactly {data_keys:?}: {p}");
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert!(
        m.user_properties.iter().any(|(k, v)| k == "event_id" && v == event_id),
        "user property event_id = payload event_id: {:?}",
        m.user_properties
    );
}

const STOCK_KEYS: &[&str] = &[
    "product_id",
    "product_name",
    "old_stock",
    "new_stock",
    "delta",
    "reason",
    "transaction_id",
    "updated_by",
];
const PRODUCT_KEYS: &[&str] = &["product_id", "product_name", "price", "stock", "updated_by"];
const QUANTITY_KEYS: &[&str] = &[
    "inventory_id",
    "product_id",
    "product_name",
    "old_quantity",
    "new_quantity",
    "delta",
    "reason",
    "transaction_id",
    "updated_by",
];
const SALE_KEYS: &[&str] = &[
    "transaction_id",
    "transaction_code",
    "offline_id",
    "status",
    "grand_total",
    "created_by",
    "device_id",
    "items",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_five_event_types() {
    let env = Env::start("events");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-all", "dev/#").await;
    let db = env.client().await;

    // 1. An adjustment by a named actor: stock_updated, reason adjustment, updated_by = actor.
    db.batch_execute(
        "BEGIN; SELECT set_config('delta_bridge.actor', 'manager-ana', true);
         UPDATE products SET stock = stock - 3 WHERE id = 1; COMMIT;",
    )
    .await
    .expect("adjust");
    let msgs = sub
        .wait_for(WAIT, "stock_updated", |m| !of_type(m, "stock_updated").is_empty())
        .await;
    let m = of_type(&msgs, "stock_updated")[0];
    assert_eq!(m.topic, TOPIC_PRODUCT);
    check_envelope(m, "stock_updated", STOCK_KEYS);
    assert_eq!(
        m.payload["data"],
        json!({"product_id": 1, "product_name": "Product 1-1", "old_stock": 100, "new_stock": 97, "delta": -3,
               "reason": "adjustment", "transaction_id": null, "updated_by": "manager-ana"})
    );

    // 2. Price and name: product_updated; numbers are numbers; updated_by from the row.
    db.batch_execute("UPDATE products SET price = 12345.67, name = 'Kopi Susu', updated_by = 'hq' WHERE id = 2")
        .await
        .expect("price");
    let msgs = sub
        .wait_for(WAIT, "product_updated", |m| !of_type(m, "product_updated").is_empty())
        .await;
    let m = of_type(&msgs, "product_updated")[0];
    assert_eq!(m.topic, TOPIC_PRODUCT);
    check_envelope(m, "product_updated", PRODUCT_KEYS);
    assert_eq!(
        m.payload["data"],
        json!({"product_id": 2, "product_name": "Kopi Susu", "price": 12345.67, "stock": 100, "updated_by": "hq"})
    );

    // 3. Stock and price in one UPDATE: both events, the database user as updated_by.
    db.batch_execute("UPDATE products SET stock = 150, price = 11.5 WHERE id = 3")
        .await
        .expect("both");
    let msgs = sub
        .wait_for(WAIT, "both events of product 3", |m| {
            m.iter().filter(|x| x.payload["data"]["product_id"] == 3).count() == 2
        })
        .await;
    let p3: Vec<&Received> = msgs.iter().filter(|x| x.payload["data"]["product_id"] == 3).collect();
    let stock = p3
        .iter()
        .find(|x| x.payload["event_type"] == "stock_updated")
        .expect("stock_updated");
    let product = p3
        .iter()
        .find(|x| x.payload["event_type"] == "product_updated")
        .expect("product_updated");
    assert_eq!(stock.payload["data"]["updated_by"], "postgres");
    assert_eq!(stock.payload["data"]["delta"], 50);
    assert_eq!(product.payload["data"]["price"], json!(11.5));
    assert_ne!(stock.payload["event_id"], product.payload["event_id"]);
    assert_ne!(stock.payload["seq"], product.payload["seq"]);

    // 4. A restock with an explicit reason and transaction id: quantity_updated.
    db.batch_execute(
        "BEGIN; SELECT set_config('delta_bridge.reason', 'restock', true), set_config('delta_bridge.transaction_id', '777', true);
         UPDATE inventory SET quantity = quantity + 20 WHERE id = 1; COMMIT;",
    )
    .await
    .expect("restock");
    let msgs = sub
        .wait_for(WAIT, "quantity_updated", |m| !of_type(m, "quantity_updated").is_empty())
        .await;
    let m = of_type(&msgs, "quantity_updated")[0];
    assert_eq!(m.topic, TOPIC_INVENTORY);
    check_envelope(m, "quantity_updated", QUANTITY_KEYS);
    assert_eq!(
        m.payload["data"],
        json!({"inventory_id": 1, "product_id": 1, "product_name": "Product 1-1", "old_quantity": 50, "new_quantity": 70,
               "delta": 20, "reason": "restock", "transaction_id": 777, "updated_by": "postgres"})
    );

    // 5. A sale: stock and inventory decremented *before* the sale row exists, items inserted after it.
    //    One transaction_created with every item; stock/quantity events say reason "transaction" with its id.
    db.batch_execute(
        "BEGIN;
         UPDATE products SET stock = stock - 2, updated_by = 'kasir-1' WHERE id = 4;
         UPDATE inventory SET quantity = quantity - 2 WHERE product_id = 4;
         INSERT INTO transactions (id, branch_id, transaction_code, offline_id, status, grand_total, created_by, device_id)
           VALUES (500, 1, 'TX-0001', '6f1c2b1e-0000-4000-8000-000000000001', 'paid', 37.00, 'kasir-1', 'pos-01');
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (500, 4, 2, 14.00);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (500, 5, 1, 9.00);
         UPDATE transactions SET status = 'completed' WHERE id = 500;
         COMMIT;",
    )
    .await
    .expect("sale");
    let msgs = sub
        .wait_for(WAIT, "sale events", |m| {
            !of_type(m, "transaction_created").is_empty()
                && m.iter()
                    .any(|x| x.payload["event_type"] == "stock_updated" && x.payload["data"]["product_id"] == 4)
                && m.iter()
                    .any(|x| x.payload["event_type"] == "quantity_updated" && x.payload["data"]["product_id"] == 4)
        })
        .await;
    let created = of_type(&msgs, "transaction_created");
    assert_eq!(created.len(), 1, "one event per sale per database transaction");
    assert!(
        of_type(&msgs, "transaction_updated").is_empty(),
        "the status update inside the same transaction is folded"
    );
    let m = created[0];
    assert_eq!(m.topic, TOPIC_TRANSACTION);
    check_envelope(m, "transaction_created", SALE_KEYS);
    assert_eq!(
        m.payload["data"],
        json!({"transaction_id": 500, "transaction_code": "TX-0001", "offline_id": "6f1c2b1e-0000-4000-8000-000000000001",
               "status": "completed", "grand_total": 37.0, "created_by": "kasir-1", "device_id": "pos-01",
               "items": [{"product_id": 4, "quantity": 2, "price": 14.0}, {"product_id": 5, "quantity": 1, "price": 9.0}]})
    );
    let s4 = msgs
        .iter()
        .find(|x| x.payload["event_type"] == "stock_updated" && x.payload["data"]["product_id"] == 4)
        .expect("stock 4");
    assert_eq!(s4.payload["data"]["reason"], "transaction");
    assert_eq!(s4.payload["data"]["transaction_id"], 500);
    assert_eq!(s4.payload["data"]["updated_by"], "kasir-1");
    let q4 = msgs
        .iter()
        .find(|x| x.payload["event_type"] == "quantity_updated" && x.payload["data"]["product_id"] == 4)
        .expect("quantity 4");
    assert_eq!(
        (
            q4.payload["data"]["reason"].clone(),
            q4.payload["data"]["transaction_id"].clone()
        ),
        (json!("transaction"), json!(500))
    );

    // 6. Later: an item added to the sale in its own transaction -> transaction_updated with all three items,
    //    and a sale without offline_id / created_by -> nulls.
    db.batch_execute(
        "INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (500, 6, 3, 1.5)",
    )
    .await
    .expect("late item");
    let msgs = sub
        .wait_for(WAIT, "transaction_updated", |m| {
            !of_type(m, "transaction_updated").is_empty()
        })
        .await;
    let m = of_type(&msgs, "transaction_updated")[0];
    check_envelope(m, "transaction_updated", SALE_KEYS);
    assert_eq!(m.payload["data"]["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(m.payload["data"]["status"], "completed");
    assert!(
        m.payload["seq"].as_i64() > created[0].payload["seq"].as_i64(),
        "seq increases per row in commit order"
    );

    db.batch_execute(
        "INSERT INTO transactions (branch_id, transaction_code, status, grand_total) VALUES (2, 'TX-0002', 'paid', 0)",
    )
    .await
    .expect("bare sale");
    let msgs = sub
        .wait_for(WAIT, "bare sale", |m| {
            m.iter().any(|x| x.payload["data"]["transaction_code"] == "TX-0002")
        })
        .await;
    let m = msgs
        .iter()
        .find(|x| x.payload["data"]["transaction_code"] == "TX-0002")
        .expect("bare");
    assert_eq!(m.topic, "dev/MCH-MST-001/BRN-MST-OSK00002/transaction/updates");
    assert_eq!(m.payload["data"]["offline_id"], Value::Null);
    assert_eq!(m.payload["data"]["created_by"], Value::Null);
    assert_eq!(m.payload["data"]["items"], json!([]));

    // 7. A writer role with DML rights only on the business tables: capture works, updated_by is that role.
    db.batch_execute(
        "CREATE ROLE cashier LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO cashier;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO cashier;",
    )
    .await
    .expect("role");
    let cashier = common::connect(&env.pg_url().replace("postgres://postgres@", "postgres://cashier@")).await;
    let denied = cashier.query("SELECT * FROM delta_bridge.outbox", &[]).await;
    assert!(denied.is_err(), "the writer has no rights on the bridge's tables");
    let forged = cashier
        .batch_execute("SELECT delta_bridge.enqueue('stock', 'UPDATE', 1, NULL, '{}', '{}', '{}')")
        .await;
    assert!(
        forged.is_err(),
        "a writer cannot forge events through the bridge's functions"
    );
    let forged = cashier
        .batch_execute("SELECT delta_bridge.enqueue_sales('500', ',')")
        .await;
    assert!(forged.is_err(), "nor snapshot sales outside a capture trigger");
    cashier
        .batch_execute("UPDATE products SET stock = 1 WHERE id = 7")
        .await
        .expect("cashier write");
    let msgs = sub
        .wait_for(WAIT, "cashier's change", |m| {
            m.iter()
                .any(|x| x.payload["event_type"] == "stock_updated" && x.payload["data"]["product_id"] == 7)
        })
        .await;
    let m = msgs.iter().find(|x| x.payload["data"]["product_id"] == 7).expect("p7");
    assert_eq!(m.payload["data"]["updated_by"], "cashier");
    // SET ROLE: the role in effect is the writer.
    db.batch_execute(
        "CREATE ROLE shift_lead; GRANT shift_lead TO cashier; GRANT UPDATE, SELECT ON products TO shift_lead;",
    )
    .await
    .expect("role");
    // (Separate statements: capture runs at commit, so the role in effect at commit is the one reported.)
    for stmt in [
        "SET ROLE shift_lead",
        "UPDATE products SET stock = 2 WHERE id = 8",
        "RESET ROLE",
    ] {
        cashier.batch_execute(stmt).await.expect("set role");
    }
    let msgs = sub
        .wait_for(WAIT, "shift lead's change", |m| {
            m.iter()
                .any(|x| x.payload["event_type"] == "stock_updated" && x.payload["data"]["product_id"] == 8)
        })
        .await;
    let m = msgs.iter().find(|x| x.payload["data"]["product_id"] == 8).expect("p8");
    assert_eq!(m.payload["data"]["updated_by"], "shift_lead");

    // Every event_id distinct, all received once.
    let all = sub.snapshot();
    let ids = common::by_event_id(&all);
    assert_eq!(ids.len(), all.len(), "no duplicates without faults");
    sub.stop().await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_no_op_publish_nothing() {
    let env = Env::start("noop");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-noop", "dev/#").await;
    let db = env.client().await;

    db.batch_execute(
        "BEGIN; UPDATE products SET stock = 0, price = 1 WHERE id = 1;
         INSERT INTO transactions (branch_id, transaction_code, status, grand_total) VALUES (1, 'TX-RB', 'paid', 1);
         ROLLBACK;",
    )
    .await
    .expect("rollback");
    // A savepoint rolled back inside a committed transaction publishes nothing of what it undid.
    db.batch_execute(
        "BEGIN; SAVEPOINT a; UPDATE products SET stock = 5 WHERE id = 2; ROLLBACK TO SAVEPOINT a; COMMIT;",
    )
    .await
    .expect("savepoint");
    db.batch_execute("UPDATE products SET stock = stock, price = price, name = name WHERE id = 1")
        .await
        .expect("no-op");
    db.batch_execute("UPDATE products SET updated_at = now() + interval '1 minute' WHERE id = 1")
        .await
        .expect("unpublished column");
    db.batch_execute("UPDATE inventory SET quantity = quantity WHERE id = 1")
        .await
        .expect("no-op inv");
    db.batch_execute("UPDATE transactions SET updated_at = now() WHERE false")
        .await
        .expect("no rows");
    // A failed statement (constraint violation) aborts its transaction: nothing.
    let _ = db
        .batch_execute("BEGIN; UPDATE products SET stock = 1 WHERE id = 3; INSERT INTO merchants (code, name) VALUES ('MCH-MST-001', 'dup'); COMMIT;")
        .await;
    let _ = db.batch_execute("ROLLBACK").await;

    // The sentinel proves the bridge was running and caught up: anything earlier would have arrived first.
    db.batch_execute("UPDATE products SET stock = 42 WHERE id = 9")
        .await
        .expect("sentinel");
    let msgs = sub
        .wait_for(WAIT, "sentinel", |m| {
            m.iter().any(|x| x.payload["data"]["product_id"] == 9)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs = if sub.count() > msgs.len() { sub.snapshot() } else { msgs };
    let shown: Vec<String> = msgs.iter().map(|m| m.payload.to_string()).collect();
    assert_eq!(msgs.len(), 1, "only the sentinel: {shown:?}");
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM delta_bridge.outbox", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(outbox, 0, "delivered rows leave the outbox");
    sub.stop().await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_with_1000_items_publishes_one_event_with_every_item() {
    let env = Env::start("bigsale");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(
        &env.mqtt.url(),
        "device-big",
        "dev/MCH-MST-001/BRN-MST-OSK00001/transaction/updates",
    )
    .await;
    let db = env.client().await;
    db.batch_execute(
        "BEGIN;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (900, 1, 'TX-BIG', 'paid', 10000);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price)
           SELECT 900, 1 + (i % 20), i, 10.00 FROM generate_series(1, 1000) i;
         COMMIT;",
    )
    .await
    .expect("the business write succeeds");
    let msgs = sub.wait_for(WAIT, "the big sale", |m| !m.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sub.count(), 1, "exactly one event");
    let m = &msgs[0];
    assert_eq!(m.payload["event_type"], "transaction_created");
    let items = m.payload["data"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 1000);
    assert_eq!(
        items[999],
        json!({"product_id": 1, "quantity": 1000, "price": 10.0}),
        "1000 % 20 = 0: product 1"
    );
    assert!(
        m.raw.len() > 40_000,
        "well over NOTIFY's 8000-byte limit: {} bytes",
        m.raw.len()
    );
    sub.stop().await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sale_edge_cases() {
    let env = Env::start("sale-edges");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-edges", "dev/#").await;
    let db = env.client().await;
    let sale_events = |m: &[Received], code: &str| -> Vec<Value> {
        m.iter()
            .filter(|x| x.payload["data"]["transaction_code"] == code)
            .map(|x| x.payload.clone())
            .collect()
    };

    // Two sales in one transaction: one event each; the stock change names the last sale touched.
    db.batch_execute(
        "BEGIN;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (601, 1, 'E-1', 'paid', 1);
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (602, 1, 'E-2', 'paid', 2);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (601, 1, 1, 1), (602, 2, 1, 2);
         UPDATE products SET stock = stock - 1 WHERE id = 2;
         COMMIT;",
    )
    .await
    .expect("two sales");
    let msgs = sub
        .wait_for(WAIT, "two sales and a stock change", |m| {
            !sale_events(m, "E-1").is_empty()
                && !sale_events(m, "E-2").is_empty()
                && m.iter().any(|x| x.payload["event_type"] == "stock_updated")
        })
        .await;
    assert_eq!(sale_events(&msgs, "E-1").len(), 1);
    assert_eq!(sale_events(&msgs, "E-2").len(), 1);
    assert_eq!(
        sale_events(&msgs, "E-2")[0]["data"]["items"],
        json!([{"product_id": 2, "quantity": 1, "price": 2.0}])
    );
    let stock = msgs
        .iter()
        .find(|x| x.payload["event_type"] == "stock_updated")
        .expect("stock");
    assert_eq!(
        (
            stock.payload["data"]["reason"].clone(),
            stock.payload["data"]["transaction_id"].clone()
        ),
        (json!("transaction"), json!(602))
    );

    // An item moved from one sale to another: both sales are updated.
    db.batch_execute("UPDATE transaction_items SET transaction_id = 602 WHERE transaction_id = 601")
        .await
        .expect("move");
    let msgs = sub
        .wait_for(WAIT, "both sales updated", |m| {
            sale_events(m, "E-1")
                .iter()
                .any(|p| p["event_type"] == "transaction_updated")
                && sale_events(m, "E-2")
                    .iter()
                    .any(|p| p["event_type"] == "transaction_updated")
        })
        .await;
    let e1 = sale_events(&msgs, "E-1")
        .into_iter()
        .find(|p| p["event_type"] == "transaction_updated")
        .expect("e1");
    let e2 = sale_events(&msgs, "E-2")
        .into_iter()
        .find(|p| p["event_type"] == "transaction_updated")
        .expect("e2");
    assert_eq!(e1["data"]["items"], json!([]));
    assert_eq!(e2["data"]["items"].as_array().map(Vec::len), Some(2));

    // Inserted and deleted in the same transaction, or inside a rolled-back savepoint: nothing.
    db.batch_execute(
        "BEGIN;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (603, 1, 'E-3', 'paid', 1);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (603, 1, 1, 1);
         DELETE FROM transactions WHERE id = 603;
         SAVEPOINT s;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (604, 1, 'E-4', 'paid', 1);
         ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    )
    .await
    .expect("insert and delete");

    // SET CONSTRAINTS ALL IMMEDIATE: capture runs per statement from then on. A sale inserted by the last
    // statement is still published, and a sale touched by several statements still yields one event.
    db.batch_execute(
        "BEGIN; SET CONSTRAINTS ALL IMMEDIATE;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (605, 1, 'E-5', 'paid', 1);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (605, 3, 1, 1);
         COMMIT;
         BEGIN; SET CONSTRAINTS ALL IMMEDIATE;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (606, 1, 'E-6', 'paid', 1);
         COMMIT;",
    )
    .await
    .expect("immediate");
    db.batch_execute("UPDATE products SET stock = 5 WHERE id = 9")
        .await
        .expect("sentinel");
    let msgs = sub
        .wait_for(WAIT, "sentinel", |m| {
            m.iter().any(|x| x.payload["data"]["product_id"] == 9)
        })
        .await;
    assert!(
        sale_events(&msgs, "E-3").is_empty(),
        "a sale deleted in its own transaction publishes nothing"
    );
    assert!(
        sale_events(&msgs, "E-4").is_empty(),
        "a rolled-back savepoint publishes nothing"
    );
    let e5 = sale_events(&msgs, "E-5");
    let kinds: Vec<&str> = e5.iter().filter_map(|p| p["event_type"].as_str()).collect();
    assert_eq!(
        kinds,
        ["transaction_created"],
        "one event per sale per transaction, also in immediate mode"
    );
    let last = e5.last().expect("e5");
    assert_eq!(
        last["data"]["items"].as_array().map(Vec::len),
        Some(1),
        "the last event carries the final items"
    );
    let e6 = sale_events(&msgs, "E-6");
    assert_eq!(
        e6.len(),
        1,
        "a sale inserted by the last statement in immediate mode is published"
    );
    assert_eq!(e6[0]["event_type"], "transaction_created");
    sub.stop().await;
    bridge.stop().await;
}
