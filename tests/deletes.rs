//! Delete events end to end: product_deleted, inventory_deleted and transaction_deleted from a real
//! PostgreSQL through a real Mosquitto, each payload checked against its schema in docs/schemas (the
//! subscriber validates every message). "Nothing published" is proven with a marker change made afterwards:
//! the bridge publishes in commit order, so once the marker has arrived anything earlier would have too.

mod common;

use std::time::Duration;

use common::{keys, Env, Received, Subscriber};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const TOPIC_PRODUCT: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/product/updates";
const TOPIC_INVENTORY: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/inventory/updates";
const TOPIC_TRANSACTION: &str = "dev/MCH-MST-001/BRN-MST-OSK00001/transaction/updates";
/// Branch 2 of the same merchant: where the moved rows go.
const TOPIC_PRODUCT_2: &str = "dev/MCH-MST-001/BRN-MST-OSK00002/product/updates";
const TOPIC_INVENTORY_2: &str = "dev/MCH-MST-001/BRN-MST-OSK00002/inventory/updates";
/// The marker row: product 20 of branch 1, whose stock each marker sets to a new value.
const MARKER: i64 = 20;

/// Runs `sql`, then a marker change, and returns what arrived after the messages already seen, the marker
/// excluded; fails if the marker is not the last of them.
async fn step(db: &tokio_postgres::Client, sub: &Subscriber, marker: &mut i64, sql: &str) -> Vec<Received> {
    let seen = sub.count();
    db.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    *marker += 1;
    let m = *marker;
    db.batch_execute(&format!("UPDATE products SET stock = {m} WHERE id = {MARKER}"))
        .await
        .expect("marker");
    let is_marker = |x: &Received| {
        x.payload["event_type"] == "stock_updated"
            && x.payload["data"]["product_id"] == MARKER
            && x.payload["data"]["new_stock"] == m
    };
    let msgs = sub
        .wait_for(WAIT, &format!("marker {m}"), |all| {
            all[seen.min(all.len())..].iter().any(is_marker)
        })
        .await;
    let mut after: Vec<Received> = msgs[seen..].to_vec();
    let last = after.pop().expect("the marker");
    assert!(
        is_marker(&last),
        "the marker comes last (commit order): {}",
        last.payload
    );
    after
}

fn shown(msgs: &[Received]) -> Vec<String> {
    msgs.iter().map(|m| format!("{} {}", m.topic, m.payload)).collect()
}

/// The envelope and the data keys, checked on the raw bytes (serde_json's maps do not keep key order).
fn check_envelope(m: &Received, event_type: &str, data_keys: &[&str]) {
    assert_eq!(m.payload["event_type"], event_type, "{}", m.payload);
    assert_eq!(keys(&m.payload).len(), 6, "exactly six top-level keys: {}", m.payload);
    let data = m.payload["data"].as_object().expect("data object");
    assert_eq!(
        data.len(),
        data_keys.len(),
        "data has exactly {data_keys:?}: {}",
        m.payload
    );
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
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
}

async fn bookkeeping_rows(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT (SELECT count(*) FROM delta_bridge.row_born) + (SELECT count(*) FROM delta_bridge.sale_gone)
              + (SELECT count(*) FROM delta_bridge.sale_notes) + (SELECT count(*) FROM delta_bridge.sale_dirty)
              + (SELECT count(*) FROM delta_bridge.row_gone)",
        &[],
    )
    .await
    .expect("bookkeeping")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_publish_once_and_rows_born_in_the_transaction_publish_nothing() {
    let env = Env::start("deletes");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-deletes", "dev/#").await;
    let db = env.client().await;
    let mut marker = 0;

    // 1. An inventory row and its product deleted in one transaction: one event each, on their streams;
    //    updated_by from the row, else the actor.
    db.batch_execute("UPDATE inventory SET updated_by = 'hq' WHERE id = 5")
        .await
        .expect("updated_by");
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN; SELECT set_config('delta_bridge.actor', 'manager-ana', true);
         DELETE FROM inventory WHERE id = 5; DELETE FROM products WHERE id = 5; COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 2, "{:#?}", shown(&got));
    let inv = &got[0];
    assert_eq!(inv.topic, TOPIC_INVENTORY);
    check_envelope(inv, "inventory_deleted", &["inventory_id", "product_id", "updated_by"]);
    assert_eq!(
        inv.payload["data"],
        json!({"inventory_id": 5, "product_id": 5, "updated_by": "hq"})
    );
    let prod = &got[1];
    assert_eq!(prod.topic, TOPIC_PRODUCT);
    check_envelope(prod, "product_deleted", &["product_id", "product_name", "updated_by"]);
    assert_eq!(
        prod.payload["data"],
        json!({"product_id": 5, "product_name": "Product 1-5", "updated_by": "manager-ana"})
    );
    // No actor, no column: the database user.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN; DELETE FROM inventory WHERE id = 4; DELETE FROM products WHERE id = 4; COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 2, "{:#?}", shown(&got));
    assert!(
        got.iter().all(|m| m.payload["data"]["updated_by"] == "postgres"),
        "{:#?}",
        shown(&got)
    );

    // 2. Rows inserted and deleted in one transaction, even after an update there, publish nothing.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         INSERT INTO products (id, branch_id, name, price, stock) VALUES (900, 1, 'Ephemeral', 1, 1);
         INSERT INTO inventory (id, branch_id, product_id, quantity) VALUES (900, 1, 900, 3);
         UPDATE products SET price = 2, stock = 2 WHERE id = 900;
         UPDATE inventory SET quantity = 4 WHERE id = 900;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (900, 1, 'EPH', 'paid', 1);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (900, 900, 1, 1);
         DELETE FROM transactions WHERE id = 900;
         DELETE FROM inventory WHERE id = 900;
         DELETE FROM products WHERE id = 900;
         COMMIT;",
    )
    .await;
    assert!(
        got.is_empty(),
        "inserted and deleted in one transaction: nothing; got {:#?}",
        shown(&got)
    );
    // The same id deleted, inserted again and deleted again: a row that existed before publishes its delete
    // (once), whatever happened to the id in between.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         DELETE FROM inventory WHERE id = 3;
         INSERT INTO inventory (id, branch_id, product_id, quantity) VALUES (3, 1, 3, 9);
         DELETE FROM inventory WHERE id = 3;
         COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 1, "{:#?}", shown(&got));
    assert_eq!(got[0].payload["event_type"], "inventory_deleted");
    assert_eq!(got[0].payload["data"]["inventory_id"], 3);

    // 3. Updated then deleted in one transaction: only the deletes.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         UPDATE products SET stock = 1, price = 3, name = 'Renamed' WHERE id = 6;
         UPDATE inventory SET quantity = 1 WHERE id = 6;
         DELETE FROM inventory WHERE id = 6;
         DELETE FROM products WHERE id = 6;
         COMMIT;",
    )
    .await;
    let types: Vec<&Value> = got.iter().map(|m| &m.payload["event_type"]).collect();
    assert_eq!(
        types,
        [&json!("inventory_deleted"), &json!("product_deleted")],
        "{:#?}",
        shown(&got)
    );
    // The row as it was when deleted: the name of this transaction's update.
    assert_eq!(got[1].payload["data"]["product_name"], "Renamed");

    // 4. A sale that existed: deleted with its items (ON DELETE CASCADE), exactly one transaction_deleted.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         INSERT INTO transactions (id, branch_id, transaction_code, offline_id, status, grand_total)
              VALUES (701, 1, 'TX-DEL-1', '6f1c2b1e-0000-4000-8000-0000000000aa', 'paid', 3);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (701, 1, 1, 1), (701, 2, 1, 2);
         COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 1, "{:#?}", shown(&got));
    let created_seq = got[0].payload["seq"].as_i64().expect("seq");
    let got = step(&db, &sub, &mut marker, "DELETE FROM transactions WHERE id = 701").await;
    assert_eq!(got.len(), 1, "one event for the sale and its items: {:#?}", shown(&got));
    let m = &got[0];
    assert_eq!(m.topic, TOPIC_TRANSACTION);
    check_envelope(
        m,
        "transaction_deleted",
        &["transaction_id", "transaction_code", "offline_id"],
    );
    assert_eq!(
        m.payload["data"],
        json!({"transaction_id": 701, "transaction_code": "TX-DEL-1",
               "offline_id": "6f1c2b1e-0000-4000-8000-0000000000aa"})
    );
    assert!(
        m.payload["seq"].as_i64() > Some(created_seq),
        "for one row, seq increases"
    );

    // A sale updated (and its items changed) then deleted in one transaction, also with the captures run
    // early (SET CONSTRAINTS ... IMMEDIATE): still exactly one event, the delete.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (702, 1, 'TX-DEL-2', 'open', 1), (703, 1, 'TX-DEL-3', 'open', 1);
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES (702, 1, 1, 1), (703, 1, 1, 1);",
    )
    .await;
    assert_eq!(got.len(), 2, "{:#?}", shown(&got));
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         UPDATE transactions SET status = 'void' WHERE id = 702;
         DELETE FROM transaction_items WHERE transaction_id = 702;
         DELETE FROM transactions WHERE id = 702;
         UPDATE transactions SET status = 'void' WHERE id = 703;
         SET CONSTRAINTS ALL IMMEDIATE;
         DELETE FROM transactions WHERE id = 703;
         COMMIT;",
    )
    .await;
    let codes: Vec<(&Value, &Value)> = got
        .iter()
        .filter(|m| m.topic == TOPIC_TRANSACTION)
        .map(|m| (&m.payload["event_type"], &m.payload["data"]["transaction_code"]))
        .collect();
    assert_eq!(
        codes,
        [
            (&json!("transaction_deleted"), &json!("TX-DEL-2")),
            (&json!("transaction_deleted"), &json!("TX-DEL-3"))
        ],
        "{:#?}",
        shown(&got)
    );
    // A sale inserted and published early in its transaction (immediate mode), then deleted: nothing.
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (704, 1, 'TX-DEL-4', 'open', 1);
         SET CONSTRAINTS ALL IMMEDIATE;
         DELETE FROM transactions WHERE id = 704;
         COMMIT;",
    )
    .await;
    assert!(got.is_empty(), "{:#?}", shown(&got));
    // A sale that existed, deleted, inserted again under its id and deleted again, its captures run between
    // the statements: still its delete, once.
    step(
        &db,
        &sub,
        &mut marker,
        "INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (707, 1, 'TX-DEL-7', 'paid', 1)",
    )
    .await;
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         SET CONSTRAINTS ALL IMMEDIATE;
         DELETE FROM transactions WHERE id = 707;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (707, 1, 'TX-DEL-7b', 'paid', 1);
         DELETE FROM transactions WHERE id = 707;
         COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 1, "{:#?}", shown(&got));
    assert_eq!(got[0].payload["event_type"], "transaction_deleted");
    assert_eq!(got[0].payload["data"]["transaction_id"], 707);

    // A stock change in the transaction that deleted a sale is not "a transaction" of that sale.
    step(
        &db,
        &sub,
        &mut marker,
        "INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (705, 1, 'TX-DEL-5', 'paid', 1)",
    )
    .await;
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN; DELETE FROM transactions WHERE id = 705; UPDATE products SET stock = stock + 1 WHERE id = 1; COMMIT;",
    )
    .await;
    let stock = got
        .iter()
        .find(|m| m.payload["event_type"] == "stock_updated")
        .unwrap_or_else(|| panic!("{:#?}", shown(&got)));
    assert_eq!(stock.payload["data"]["reason"], "adjustment");
    assert_eq!(stock.payload["data"]["transaction_id"], Value::Null);

    // 5. A writer with DML rights only: its deletes are captured, as itself; the settings it can set do not
    //    suppress its delete events, and it cannot reach the new bookkeeping.
    db.batch_execute(
        "CREATE ROLE cashier LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO cashier;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO cashier;",
    )
    .await
    .expect("role");
    let cashier = common::connect(&env.pg_url().replace("postgres://postgres@", "postgres://cashier@")).await;
    for probe in [
        "SELECT * FROM delta_bridge.row_born",
        "SELECT * FROM delta_bridge.sale_gone",
        "INSERT INTO delta_bridge.row_born VALUES (pg_current_xact_id(), 'products', 8, 1)",
        "INSERT INTO delta_bridge.sale_gone VALUES (pg_current_xact_id(), 702, '{}')",
        "SELECT delta_bridge.note_sale_gone()",
        "SELECT delta_bridge.flush_sales(pg_current_xact_id())",
    ] {
        let e = cashier.batch_execute(probe).await.expect_err(probe);
        assert_eq!(
            e.as_db_error().map(|d| d.code().code()),
            Some("42501"),
            "{probe}: permission denied, got {e}"
        );
    }
    let got = step(
        &cashier,
        &sub,
        &mut marker,
        "BEGIN; DELETE FROM inventory WHERE id = 7; DELETE FROM products WHERE id = 7; COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 2, "{:#?}", shown(&got));
    assert!(
        got.iter().all(|m| m.payload["data"]["updated_by"] == "cashier"),
        "{:#?}",
        shown(&got)
    );
    let got = step(
        &cashier,
        &sub,
        &mut marker,
        "BEGIN;
         SELECT set_config('delta_bridge.' || s, v, true)
           FROM unnest(ARRAY['_sales', '_new_sales', '_sale_id', '_flushed', 'reason', 'transaction_id', 'no_wake'],
                       ARRAY[',8,', ',8,', '8', ',8:1,', 'x', '8', 'on']) AS t (s, v);
         DELETE FROM inventory WHERE id = 8; DELETE FROM products WHERE id = 8;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (706, 1, 'TX-DEL-6', 'paid', 1);
         COMMIT;
         BEGIN; DELETE FROM transactions WHERE id = 706; COMMIT;",
    )
    .await;
    let types: Vec<(&Value, &Value)> = got
        .iter()
        .map(|m| (&m.payload["event_type"], &m.payload["seq"]))
        .collect();
    let of = |t: &str| got.iter().filter(|m| m.payload["event_type"] == t).count();
    assert_eq!(
        (
            of("inventory_deleted"),
            of("product_deleted"),
            of("transaction_created"),
            of("transaction_deleted")
        ),
        (1, 1, 1, 1),
        "{types:?} {:#?}",
        shown(&got)
    );
    assert_eq!(got.len(), 4, "{:#?}", shown(&got));

    // No per-transaction bookkeeping outlives its transaction.
    assert_eq!(bookkeeping_rows(&db).await, 0);
    let all = sub.snapshot();
    assert_eq!(
        common::by_event_id(&all).len(),
        all.len(),
        "no duplicates without faults"
    );
    sub.stop().await;
    bridge.stop().await;
}

/// `(event_type, topic, data)` of each message, in order.
fn events(msgs: &[Received]) -> Vec<(String, String, Value)> {
    msgs.iter()
        .map(|m| {
            (
                m.payload["event_type"].as_str().unwrap_or_default().to_string(),
                m.topic.clone(),
                m.payload["data"].clone(),
            )
        })
        .collect()
}

/// Only a delete noted in the same transaction makes an INSERT or UPDATE capture look for its row: a row whose
/// id changes later still publishes what happened before; a sale that existed before, deleted, inserted again,
/// flushed and deleted again publishes its delete with the row devices knew; rows that move to another branch
/// leave the old branch's devices with a delete. After each, no per-transaction bookkeeping is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_changes_redeleted_sales_and_moves_keep_devices_equal_to_the_database() {
    let env = Env::start("deletes-fixes");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-deletes-fixes", "dev/#").await;
    let db = env.client().await;
    let mut marker = 0;
    let new_product = |id: i64| {
        format!("INSERT INTO products (id, branch_id, name, price, stock) VALUES ({id}, 1, 'New {id}', 1, 1)")
    };

    // 1. A stock change, then the id changes: the stock change is told (the id change is not, a known limit).
    step(&db, &sub, &mut marker, &new_product(950)).await;
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN; UPDATE products SET stock = 77 WHERE id = 950; UPDATE products SET id = 1950 WHERE id = 950; COMMIT;",
    )
    .await;
    let got = events(&got);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), &got[0].2["product_id"], &got[0].2["new_stock"]),
        ("stock_updated", &json!(950), &json!(77))
    );
    assert_eq!(bookkeeping_rows(&db).await, 0);
    // An insert whose id changes in the same transaction is told (product_updated), and leaves no note behind.
    let got = step(
        &db,
        &sub,
        &mut marker,
        &format!(
            "BEGIN; {}; UPDATE products SET id = 1951 WHERE id = 951; COMMIT;",
            new_product(951)
        ),
    )
    .await;
    let got = events(&got);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), &got[0].2["product_id"]),
        ("product_updated", &json!(951))
    );
    assert_eq!(bookkeeping_rows(&db).await, 0);
    // Born twice and deleted twice under one id: still nothing; deleted, born again and kept: delete, then the new row.
    let got = step(
        &db,
        &sub,
        &mut marker,
        &format!(
            "BEGIN; {p}; DELETE FROM products WHERE id = 952; {p}; UPDATE products SET stock = 9 WHERE id = 952;
             DELETE FROM products WHERE id = 952; COMMIT;",
            p = new_product(952)
        ),
    )
    .await;
    assert!(got.is_empty(), "{:#?}", shown(&got));
    let got = step(
        &db,
        &sub,
        &mut marker,
        &format!(
            "BEGIN; DELETE FROM products WHERE id = 1950; {}; COMMIT;",
            new_product(1950)
        ),
    )
    .await;
    let types: Vec<String> = events(&got).into_iter().map(|e| e.0).collect();
    assert_eq!(types, ["product_deleted", "product_updated"], "{:#?}", shown(&got));
    assert_eq!(bookkeeping_rows(&db).await, 0);

    // 2. A sale that existed, deleted, inserted again under its id (another code), flushed, deleted again: one
    //    transaction_deleted, with the code devices know.
    step(
        &db,
        &sub,
        &mut marker,
        "INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (30001, 1, 'TX-RE-A', 'paid', 1)",
    )
    .await;
    let got = step(
        &db,
        &sub,
        &mut marker,
        "BEGIN;
         DELETE FROM transactions WHERE id = 30001;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total) VALUES (30001, 1, 'TX-RE-B', 'paid', 1);
         SET CONSTRAINTS ALL IMMEDIATE;
         DELETE FROM transactions WHERE id = 30001;
         COMMIT;",
    )
    .await;
    assert_eq!(got.len(), 1, "{:#?}", shown(&got));
    assert_eq!(got[0].topic, TOPIC_TRANSACTION);
    assert_eq!(got[0].payload["event_type"], "transaction_deleted");
    assert_eq!(
        (
            &got[0].payload["data"]["transaction_id"],
            &got[0].payload["data"]["transaction_code"]
        ),
        (&json!(30001), &json!("TX-RE-A"))
    );
    assert_eq!(bookkeeping_rows(&db).await, 0);

    // 5. Moves. A product to branch 2: deleted for branch 1, the whole product for branch 2.
    let got = events(
        &step(
            &db,
            &sub,
            &mut marker,
            "UPDATE products SET branch_id = 2 WHERE id = 11",
        )
        .await,
    );
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_str(), &got[0].2["product_id"]),
        ("product_deleted", TOPIC_PRODUCT, &json!(11))
    );
    assert_eq!(
        (got[1].0.as_str(), got[1].1.as_str()),
        ("product_updated", TOPIC_PRODUCT_2)
    );
    assert_eq!((&got[1].2["product_id"], &got[1].2["stock"]), (&json!(11), &json!(100)));
    // With its stock changed in the same statement: the same two events, and no stock_updated.
    let got = events(
        &step(
            &db,
            &sub,
            &mut marker,
            "UPDATE products SET branch_id = 2, stock = 5 WHERE id = 12",
        )
        .await,
    );
    let seen: Vec<(&str, &str)> = got.iter().map(|e| (e.0.as_str(), e.1.as_str())).collect();
    assert_eq!(
        seen,
        [("product_deleted", TOPIC_PRODUCT), ("product_updated", TOPIC_PRODUCT_2)]
    );
    assert_eq!(got[1].2["stock"], 5);
    // Moved, then deleted in the same transaction: both branches hear the delete.
    let got = events(
        &step(
            &db,
            &sub,
            &mut marker,
            "BEGIN; UPDATE products SET branch_id = 2 WHERE id = 13; DELETE FROM inventory WHERE product_id = 13;
             DELETE FROM products WHERE id = 13; COMMIT;",
        )
        .await,
    );
    let seen: Vec<(&str, &str)> = got.iter().map(|e| (e.0.as_str(), e.1.as_str())).collect();
    assert_eq!(
        seen,
        [
            ("product_deleted", TOPIC_PRODUCT),
            ("inventory_deleted", TOPIC_INVENTORY),
            ("product_deleted", TOPIC_PRODUCT_2)
        ]
    );
    // An inventory row to branch 2: deleted for branch 1, new (old_quantity 0) for branch 2.
    let got = events(
        &step(
            &db,
            &sub,
            &mut marker,
            "UPDATE inventory SET branch_id = 2 WHERE id = 14",
        )
        .await,
    );
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_str(), &got[0].2["inventory_id"]),
        ("inventory_deleted", TOPIC_INVENTORY, &json!(14))
    );
    assert_eq!(
        (got[1].0.as_str(), got[1].1.as_str()),
        ("quantity_updated", TOPIC_INVENTORY_2)
    );
    assert_eq!(
        (&got[1].2["old_quantity"], &got[1].2["new_quantity"], &got[1].2["delta"]),
        (&json!(0), &json!(50), &json!(50))
    );
    // Its product changed, quantity the same: quantity_updated names the new product.
    let got = events(
        &step(
            &db,
            &sub,
            &mut marker,
            "UPDATE inventory SET product_id = 16 WHERE id = 15",
        )
        .await,
    );
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_str()),
        ("quantity_updated", TOPIC_INVENTORY)
    );
    assert_eq!(
        (
            &got[0].2["inventory_id"],
            &got[0].2["product_id"],
            &got[0].2["product_name"],
            &got[0].2["delta"]
        ),
        (&json!(15), &json!(16), &json!("Product 1-16"), &json!(0))
    );
    assert_eq!(bookkeeping_rows(&db).await, 0);

    // 3. Notes that outlived their transaction (written by hand here) are removed by the leader's upkeep,
    //    which a new leader runs before numbering its first events.
    db.batch_execute(
        "INSERT INTO delta_bridge.row_born VALUES (pg_current_xact_id(), 'products', 1, 1);
         INSERT INTO delta_bridge.row_gone VALUES (pg_current_xact_id(), 'inventory', 1, 1);
         INSERT INTO delta_bridge.sale_gone VALUES (pg_current_xact_id(), 1, '{}');",
    )
    .await
    .expect("leftovers");
    assert_eq!(bookkeeping_rows(&db).await, 3);
    bridge.stop().await;
    let bridge = env.bridge().await;
    step(&db, &sub, &mut marker, "SELECT 1").await;
    assert_eq!(bookkeeping_rows(&db).await, 0, "leftover notes removed");

    let all = sub.snapshot();
    assert_eq!(
        common::by_event_id(&all).len(),
        all.len(),
        "no duplicates without faults"
    );
    sub.stop().await;
    bridge.stop().await;
}
