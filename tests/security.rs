//! A writer role with DML rights on the six business tables and nothing else must not be able to forge, alter,
//! suppress or delay the event of any other change, whatever session settings it sets and whatever function of
//! the bridge's schema it tries; no function of the bridge may run code the writer planted; and one statement
//! touching many sales must cost the business write time linear in their number.
//!
//! Each test collects every violation it finds and fails once with the whole list, so that a run against a
//! vulnerable schema shows each attack that worked.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Env, Received, Subscriber};
use serde_json::{json, Value};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);
const OTHER_MERCHANT: &str = "MCH-OTHER-002";
/// The other merchant's sale, written by the other merchant's own POS (here: the superuser).
const VICTIM_SALE: i64 = 100;
/// The writer's own sale.
const OWN_SALE: i64 = 700;

const BUSINESS_TABLES: [&str; 6] = [
    "merchants",
    "branches",
    "products",
    "inventory",
    "transactions",
    "transaction_items",
];

/// Tables of the bridge that legitimately keep rows between transactions. Any other table in the bridge's
/// schema holds per-transaction bookkeeping and must be empty once the writes are over.
const PERSISTENT_TABLES: [&str; 11] = [
    "outbox",
    "dead_letter",
    "meta",
    "schema_migrations",
    "devices",
    "device_events",
    // The leader's heartbeat row (migration 3).
    "leader",
    // The branches' event counters (migration 6) and the change log with its partitions (migration 7; the
    // partitions' rows are counted through the partitioned table).
    "branch_counter",
    "change_log",
    // Each products and inventory row's latest published seq, for the catch-up snapshot (migration 9).
    "row_seq",
    "change_log_partitions",
];

/// A login role with SELECT, INSERT, UPDATE, DELETE on the business tables, USAGE on their sequences, and
/// nothing on the bridge's schema.
async fn create_writer(db: &Client, role: &str) {
    db.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};",
        BUSINESS_TABLES.join(", ")
    ))
    .await
    .expect("writer role");
}

async fn connect_as(env: &Env, role: &str) -> Client {
    common::connect(
        &env.pg_url()
            .replace("postgres://postgres@", &format!("postgres://{role}@")),
    )
    .await
}

async fn migrate(env: &Env) {
    delta_bridge::service::migrate_once(&env.config())
        .await
        .expect("migrations apply");
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{} {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

fn is_permission_denied(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| d.code().code() == "42501")
}

/// Every `delta_bridge.*` setting name that the bridge's SQL reads or writes, found in the migrations
/// themselves, so that a setting added later is attacked too.
fn setting_names() -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("sql/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("sql") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read migration");
        for (at, _) in text.match_indices("'delta_bridge.") {
            let before = text[..at].trim_end();
            if !(before.ends_with("current_setting(") || before.ends_with("set_config(")) {
                continue;
            }
            let rest = &text[at + 1..];
            let end = rest
                .char_indices()
                .skip("delta_bridge.".len())
                .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
                .map(|(i, _)| i)
                .unwrap_or(rest.len());
            if rest[..end].len() > "delta_bridge.".len() {
                names.insert(rest[..end].to_string());
            }
        }
    }
    for documented in [
        "delta_bridge.reason",
        "delta_bridge.transaction_id",
        "delta_bridge.actor",
    ] {
        assert!(names.contains(documented), "{documented} is read by the SQL: {names:?}");
    }
    names
}

/// Rows in the bridge's tables other than the persistent ones: per-transaction state left behind.
async fn leftover_bookkeeping(db: &Client) -> Vec<String> {
    let tables: Vec<String> = db
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_class c
              WHERE c.relnamespace = 'delta_bridge'::pg_catalog.regnamespace AND c.relkind IN ('r', 'p')
                AND NOT c.relispartition",
            &[],
        )
        .await
        .expect("bridge tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut left = Vec::new();
    for t in tables.iter().filter(|t| !PERSISTENT_TABLES.contains(&t.as_str())) {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM delta_bridge.{t}"), &[])
            .await
            .expect("count")
            .get(0);
        if n != 0 {
            left.push(format!("delta_bridge.{t} keeps {n} rows after the transactions ended"));
        }
    }
    left
}

/// The outbox as text, one line per row, for comparing before and after an attack.
async fn outbox_rows(db: &Client) -> Vec<(i64, String)> {
    db.query(
        "SELECT id, concat_ws(' | ', kind, op, merchant_code, branch_code, product_name, old_row::text, new_row::text,
                              items::text, ctx::text)
           FROM delta_bridge.outbox ORDER BY id",
        &[],
    )
    .await
    .expect("outbox")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn fail_with(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} violation(s):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

/// Waits for the sentinel (product 9 with stock 4242, written last), then a little longer so that anything
/// queued before it has arrived too.
async fn received_until_sentinel(sub: &Subscriber) -> Vec<Received> {
    sub.wait_for(WAIT, "the sentinel", |m| {
        m.iter().any(|x| {
            x.payload["event_type"] == "stock_updated"
                && x.payload["data"]["product_id"] == 9
                && x.payload["data"]["new_stock"] == 4242
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sub.snapshot()
}

fn shown(m: &Received) -> String {
    format!("{} {}", m.topic, m.payload)
}

/// Settings: every `delta_bridge.*` name the SQL reads, set by the writer to values aimed at another merchant's
/// pending events and sale (and, all at once, in one transaction). The other merchant's outbox rows must stay
/// byte for byte what its own transactions wrote, no event may appear for its sale or topics beyond its own
/// changes, and the writer's own events must still be right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_cannot_forge_alter_or_suppress_other_events() {
    let env = Env::start("sec-settings");
    let db = env.client().await;
    create_writer(&db, "writer").await;
    migrate(&env).await;
    let victim_product: i64 = db
        .query_one("SELECT min(id) FROM products WHERE branch_id = 3", &[])
        .await
        .expect("q")
        .get(0);

    // The other merchant's changes, still in the outbox (no bridge running yet).
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total, created_by)
           VALUES ({VICTIM_SALE}, 3, 'VICTIM-{VICTIM_SALE}', 'paid', 50, 'other-pos');
         INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES ({VICTIM_SALE}, {victim_product}, 5, 10);
         COMMIT;
         UPDATE products SET stock = 90 WHERE id = {victim_product};"
    ))
    .await
    .expect("the other merchant's writes");
    let victim_rows = outbox_rows(&db).await;
    assert_eq!(victim_rows.len(), 2, "one sale and one stock row: {victim_rows:?}");
    let (victim_sale_row, victim_stock_row) = (victim_rows[0].0, victim_rows[1].0);

    // The writer's own sale, created legitimately.
    let mut w = connect_as(&env, "writer").await;
    w.batch_execute(&format!(
        "INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total)
           VALUES ({OWN_SALE}, 1, 'OWN-{OWN_SALE}', 's-init', 1)"
    ))
    .await
    .expect("the writer's own sale");

    let names = setting_names();
    println!("settings read by the bridge's SQL: {names:?}");
    let hostile = [
        format!(",{VICTIM_SALE},"),
        format!(",{OWN_SALE}:{victim_sale_row},"),
        format!(",{OWN_SALE}:{victim_stock_row},"),
        format!("{VICTIM_SALE}"),
        "on".to_string(),
        "x'\"}{,".to_string(),
    ];
    let legit = [
        "delta_bridge.reason",
        "delta_bridge.transaction_id",
        "delta_bridge.actor",
    ];
    let mut failures = Vec::new();
    // (status written to the own sale, stock written to the own product, setting was a legit one)
    let mut expected_own: Vec<(String, i64, bool)> = Vec::new();
    let mut k = 0_i64;
    let mut attempts: Vec<Vec<(String, String)>> = Vec::new();
    for name in &names {
        for value in &hostile {
            attempts.push(vec![(name.clone(), value.clone())]);
        }
    }
    // Everything at once, coherently: another merchant's sale as "new", its pending row as "flushed".
    attempts.push(
        names
            .iter()
            .map(|n| {
                let v = match n.as_str() {
                    "delta_bridge._flushed" => format!(",{OWN_SALE}:{victim_sale_row},"),
                    "delta_bridge._sales" | "delta_bridge._new_sales" => format!(",{VICTIM_SALE},"),
                    _ => format!("{VICTIM_SALE}"),
                };
                (n.clone(), v)
            })
            .collect(),
    );
    for settings in &attempts {
        k += 1;
        let status = format!("s-{k}");
        let stock = 1000 + k;
        let is_legit = settings.iter().any(|(n, _)| legit.contains(&n.as_str()));
        // The sale is touched first and the settings set afterwards, so that they win over anything the
        // bridge recorded for the sale.
        let tx = w.transaction().await.expect("begin");
        tx.execute(
            "UPDATE transactions SET status = $1 WHERE id = $2",
            &[&status, &OWN_SALE],
        )
        .await
        .expect("own sale update");
        for (n, v) in settings {
            tx.execute("SELECT set_config($1, $2, true)", &[n, v])
                .await
                .expect("set_config");
        }
        tx.execute("UPDATE products SET stock = $1 WHERE id = 1", &[&(stock as i32)])
            .await
            .expect("own stock update");
        if let Err(e) = tx.commit().await {
            failures.push(format!(
                "{settings:?}: the writer's own commit failed: {}",
                sqlstate(&e)
            ));
            continue;
        }
        expected_own.push((status, stock, is_legit));
    }
    // Session-level settings (not transaction-local) are the writer's session's only.
    w.batch_execute(&format!(
        "SELECT set_config('delta_bridge.reason', 'session-reason', false),
                set_config('delta_bridge.transaction_id', '{VICTIM_SALE}', false),
                set_config('delta_bridge.actor', 'session-actor', false)"
    ))
    .await
    .expect("session settings");

    // The outbox as the bridge will read it: the other merchant's rows untouched, nothing new for it.
    let now = outbox_rows(&db).await;
    for (id, text) in &victim_rows {
        match now.iter().find(|(i, _)| i == id) {
            None => failures.push(format!("the other merchant's outbox row {id} disappeared")),
            Some((_, t)) if t != text => failures.push(format!(
                "the other merchant's outbox row {id} was altered:\n  was {text}\n  now {t}"
            )),
            _ => {}
        }
    }
    for (id, text) in &now {
        if !victim_rows.iter().any(|(i, _)| i == id) && text.contains(OTHER_MERCHANT) {
            failures.push(format!("a forged outbox row {id} for the other merchant: {text}"));
        }
    }
    failures.extend(leftover_bookkeeping(&db).await);

    // Then what devices receive.
    // Subscribed first: the bridge publishes what is already in the outbox as soon as it starts.
    let sub = Subscriber::start(&env.mqtt.url(), "device-sec-settings", "dev/#").await;
    let bridge = env.bridge().await;
    // The other merchant writes again while the writer's session settings are in place.
    db.batch_execute("UPDATE products SET stock = 77 WHERE id = 2; UPDATE products SET stock = 4242 WHERE id = 9;")
        .await
        .expect("sentinel");
    let msgs = received_until_sentinel(&sub).await;

    let other: Vec<&Received> = msgs.iter().filter(|m| m.topic.contains(OTHER_MERCHANT)).collect();
    let sales: Vec<&&Received> = other
        .iter()
        .filter(|m| m.topic.ends_with("/transaction/updates"))
        .collect();
    if sales.len() != 1
        || sales[0].payload["event_type"] != "transaction_created"
        || sales[0].payload["data"]["transaction_code"] != format!("VICTIM-{VICTIM_SALE}")
        || sales[0].payload["data"]["status"] != "paid"
        || sales[0].payload["data"]["items"].as_array().map(Vec::len) != Some(1)
    {
        failures.push(format!(
            "the other merchant's sale: expected exactly its own transaction_created, got {:#?}",
            sales.iter().map(|m| shown(m)).collect::<Vec<_>>()
        ));
    }
    let stock: Vec<&&Received> = other
        .iter()
        .filter(|m| m.payload["event_type"] == "stock_updated")
        .collect();
    if stock.len() != 1 || stock[0].payload["data"]["new_stock"] != 90 {
        failures.push(format!(
            "the other merchant's stock: expected its one change to 90, got {:#?}",
            stock.iter().map(|m| shown(m)).collect::<Vec<_>>()
        ));
    }
    if other.len() != 2 {
        failures.push(format!(
            "events on the other merchant's topics beyond its two changes: {:#?}",
            other.iter().map(|m| shown(m)).collect::<Vec<_>>()
        ));
    }
    // Another writer's change is not described by the writer's settings.
    match msgs
        .iter()
        .find(|m| m.payload["event_type"] == "stock_updated" && m.payload["data"]["product_id"] == 2)
    {
        Some(m) => {
            let d = &m.payload["data"];
            if d["reason"] != "adjustment" || !d["transaction_id"].is_null() || d["updated_by"] != "postgres" {
                failures.push(format!(
                    "another session's change carries the writer's settings: {}",
                    shown(m)
                ));
            }
        }
        None => failures.push("another session's change was not published".into()),
    }

    // The writer's own events: one sale event per transaction with that transaction's status, one stock
    // event per transaction; without a legit setting, the stock change names the writer's own sale.
    let own_sales: Vec<&Received> = msgs
        .iter()
        .filter(|m| m.payload["data"]["transaction_id"] == OWN_SALE && m.topic.ends_with("/transaction/updates"))
        .collect();
    for (status, stock, is_legit) in &expected_own {
        let n = own_sales
            .iter()
            .filter(|m| m.payload["data"]["status"] == *status)
            .count();
        if n != 1 {
            failures.push(format!(
                "the writer's own sale with status {status}: {n} events, expected 1"
            ));
        }
        let s: Vec<&Received> = msgs
            .iter()
            .filter(|m| {
                m.payload["event_type"] == "stock_updated"
                    && m.payload["data"]["product_id"] == 1
                    && m.payload["data"]["new_stock"] == *stock
            })
            .collect();
        if s.len() != 1 {
            failures.push(format!(
                "the writer's own stock change to {stock}: {} events, expected 1",
                s.len()
            ));
        } else if !is_legit
            && (s[0].payload["data"]["reason"] != "transaction" || s[0].payload["data"]["transaction_id"] != OWN_SALE)
        {
            failures.push(format!(
                "the writer's own stock change to {stock} does not name its own sale: {}",
                shown(s[0])
            ));
        }
    }
    if own_sales
        .iter()
        .any(|m| m.payload["data"]["transaction_code"] != format!("OWN-{OWN_SALE}"))
    {
        failures.push("an event for the writer's sale carries another sale's data".into());
    }
    let left: i64 = db
        .query_one("SELECT count(*) FROM delta_bridge.dead_letter", &[])
        .await
        .expect("q")
        .get(0);
    if left != 0 {
        failures.push(format!("{left} of the writer's events were dead-lettered"));
    }
    sub.stop().await;
    bridge.stop().await;
    fail_with(&failures);
}

/// The columns of every business table, in one table: whatever a bridge trigger function reads exists.
const DECOY_COLUMNS: &str = "id bigint, branch_id bigint, product_id bigint, transaction_id bigint, name text,
    price numeric, stock integer, quantity integer, updated_by text, updated_at timestamptz, transaction_code text,
    offline_id uuid, status text, grand_total numeric, created_by text, device_id text, created_at timestamptz";

struct BridgeFunction {
    signature: String,
    name: String,
    arg_types: Vec<String>,
    is_trigger: bool,
}

async fn bridge_functions(db: &Client) -> Vec<BridgeFunction> {
    db.query(
        "SELECT p.oid::pg_catalog.regprocedure::text, p.proname::text,
                coalesce((SELECT array_agg(pg_catalog.format_type(t, NULL) ORDER BY o)
                            FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, o)), '{}'),
                p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype
           FROM pg_catalog.pg_proc p
          WHERE p.pronamespace = 'delta_bridge'::pg_catalog.regnamespace
          ORDER BY 1",
        &[],
    )
    .await
    .expect("pg_proc")
    .iter()
    .map(|r| BridgeFunction {
        signature: r.get(0),
        name: r.get(1),
        arg_types: r.get(2),
        is_trigger: r.get(3),
    })
    .collect()
}

/// A direct call with NULL arguments of the declared types; crafted arguments for a function known to take
/// sale ids.
fn calls(f: &BridgeFunction) -> Vec<String> {
    let nulls: Vec<String> = f.arg_types.iter().map(|t| format!("NULL::{t}")).collect();
    let mut v = vec![format!("SELECT delta_bridge.{}({})", f.name, nulls.join(", "))];
    if f.name == "enqueue_sales" && f.arg_types.len() == 2 {
        v.push(format!("SELECT delta_bridge.enqueue_sales(',{VICTIM_SALE},', ',')"));
    }
    v
}

/// Functions: every function in the bridge's schema (read from pg_proc now, so a new one is covered) is refused
/// to the writer, called directly or from a trigger of its own; none can be attached to a table of its own;
/// and a bridge trigger function that someone with the right to attach it puts on a table other than the
/// business table it was written for does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_functions_are_refused_to_the_writer_and_inert_elsewhere() {
    let env = Env::start("sec-functions");
    let db = env.client().await;
    create_writer(&db, "writer").await;
    migrate(&env).await;
    db.batch_execute(&format!(
        "INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total)
           VALUES ({VICTIM_SALE}, 3, 'VICTIM-{VICTIM_SALE}', 'paid', 50)"
    ))
    .await
    .expect("the other merchant's sale");
    // (Its own statement: capture runs at commit, after every statement of a transaction.)
    db.batch_execute("DELETE FROM delta_bridge.outbox")
        .await
        .expect("clear");
    let functions = bridge_functions(&db).await;
    assert!(functions.len() >= 5, "the bridge's functions: {}", functions.len());
    println!(
        "bridge functions: {:?}",
        functions.iter().map(|f| f.signature.as_str()).collect::<Vec<_>>()
    );
    let w = connect_as(&env, "writer").await;
    let mut failures = Vec::new();

    // 1. Direct calls.
    for f in &functions {
        for call in calls(f) {
            match w.batch_execute(&call).await {
                Err(e) if is_permission_denied(&e) => {}
                Err(e) => failures.push(format!(
                    "{call}: not refused for lack of privilege but: {}",
                    sqlstate(&e)
                )),
                Ok(()) => failures.push(format!("{call}: the writer ran it")),
            }
        }
    }

    // 2. Calls from inside a trigger of the writer's own (pg_trigger_depth() >= 1).
    w.batch_execute(
        "CREATE TEMP TABLE calls (sql text);
         CREATE FUNCTION pg_temp.run_call() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN EXECUTE NEW.sql; RETURN NULL; END $$;
         CREATE TRIGGER run AFTER INSERT ON pg_temp.calls FOR EACH ROW EXECUTE FUNCTION pg_temp.run_call();",
    )
    .await
    .expect("the writer's own trigger");
    for f in functions.iter().filter(|f| !f.is_trigger) {
        for call in calls(f) {
            match w.execute("INSERT INTO pg_temp.calls VALUES ($1)", &[&call]).await {
                Err(e) if is_permission_denied(&e) => {}
                Err(e) => failures.push(format!(
                    "{call} from a trigger: not refused for lack of privilege but: {}",
                    sqlstate(&e)
                )),
                Ok(_) => failures.push(format!("{call} from the writer's trigger: it ran")),
            }
        }
    }

    // 3. Bridge trigger functions attached to the writer's own TEMP tables named like the business tables.
    for table in ["products", "inventory", "transactions", "transaction_items"] {
        w.batch_execute(&format!("CREATE TEMP TABLE {table} ({DECOY_COLUMNS})"))
            .await
            .expect("temp table");
        let mut attached = 0;
        for f in functions.iter().filter(|f| f.is_trigger) {
            for (kind, timing) in [("CONSTRAINT TRIGGER", "DEFERRABLE INITIALLY DEFERRED"), ("TRIGGER", "")] {
                let ddl = format!(
                    "CREATE {kind} z_{name}_{n} AFTER INSERT OR UPDATE OR DELETE ON pg_temp.{table} {timing}
                       FOR EACH ROW EXECUTE FUNCTION delta_bridge.{name}()",
                    name = f.name,
                    n = timing.len()
                );
                match w.batch_execute(&ddl).await {
                    Err(e) if is_permission_denied(&e) => {}
                    Err(e) => failures.push(format!(
                        "attaching {} to pg_temp.{table}: refused, but not for lack of privilege: {}",
                        f.signature,
                        sqlstate(&e)
                    )),
                    Ok(()) => {
                        attached += 1;
                        failures.push(format!("the writer attached {} to pg_temp.{table}", f.signature));
                    }
                }
            }
        }
        if attached > 0 {
            // Rows aimed at the other merchant: its branch, its products, its sale.
            let r = w
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO pg_temp.{table} (id, branch_id, product_id, transaction_id, name, price, stock,
                                                  quantity, transaction_code, status, grand_total)
                       VALUES ({VICTIM_SALE}, 3, 41, {VICTIM_SALE}, 'Forged', 1, 5, 5, 'FORGED', 'forged', 1);
                     UPDATE pg_temp.{table} SET stock = 6, quantity = 6, price = 2, status = 'forged-2';
                     COMMIT;"
                ))
                .await;
            if let Err(e) = r {
                let _ = w.batch_execute("ROLLBACK").await;
                println!("writes to pg_temp.{table} failed: {}", sqlstate(&e));
            }
        }
    }

    for (id, text) in &outbox_rows(&db).await {
        failures.push(format!("outbox row {id} forged by the writer: {text}"));
    }
    db.batch_execute("DELETE FROM delta_bridge.outbox")
        .await
        .expect("clear");

    // 4. Attached by someone allowed to (the owner, by mistake) to tables that are not the business tables:
    //    a copy in another schema and a TEMP table, both named like the business tables. Nothing is captured.
    db.batch_execute("CREATE SCHEMA decoy").await.expect("schema");
    for table in ["products", "inventory", "transactions", "transaction_items"] {
        for schema in ["decoy", "pg_temp"] {
            db.batch_execute(&format!("CREATE TABLE {schema}.{table} ({DECOY_COLUMNS})"))
                .await
                .expect("decoy");
            for f in functions.iter().filter(|f| f.is_trigger) {
                db.batch_execute(&format!(
                    "CREATE CONSTRAINT TRIGGER z_{name} AFTER INSERT OR UPDATE OR DELETE ON {schema}.{table}
                       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.{name}();
                     CREATE TRIGGER a_{name} AFTER INSERT OR UPDATE OR DELETE ON {schema}.{table}
                       FOR EACH ROW EXECUTE FUNCTION delta_bridge.{name}();",
                    name = f.name
                ))
                .await
                .expect("the owner attaches");
            }
            if let Err(e) = db
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO {schema}.{table} (id, branch_id, product_id, transaction_id, name, price, stock,
                                                   quantity, transaction_code, status, grand_total)
                       VALUES ({VICTIM_SALE}, 3, 41, {VICTIM_SALE}, 'Decoy', 1, 5, 5, 'DECOY', 'decoy', 1);
                     UPDATE {schema}.{table} SET stock = 6, quantity = 6, price = 2, status = 'decoy-2';
                     DELETE FROM {schema}.{table};
                     COMMIT;"
                ))
                .await
            {
                let _ = db.batch_execute("ROLLBACK").await;
                failures.push(format!(
                    "a write to {schema}.{table} failed because of a bridge trigger: {}",
                    sqlstate(&e)
                ));
            }
        }
    }

    db.batch_execute("DISCARD TEMP").await.expect("drop the TEMP decoys");
    let rows = outbox_rows(&db).await;
    for (id, text) in &rows {
        failures.push(format!(
            "outbox row {id} from a table that is not a business table: {text}"
        ));
    }
    failures.extend(leftover_bookkeeping(&db).await);

    let sub = Subscriber::start(&env.mqtt.url(), "device-sec-functions", "dev/#").await;
    let bridge = env.bridge().await;
    db.batch_execute("UPDATE products SET stock = 4242 WHERE id = 9")
        .await
        .expect("sentinel");
    let msgs = received_until_sentinel(&sub).await;
    for m in msgs.iter().filter(|m| m.payload["data"]["product_id"] != 9) {
        failures.push(format!("published without a business change: {}", shown(m)));
    }
    sub.stop().await;
    bridge.stop().await;
    fail_with(&failures);
}

/// Operators (and a few functions) the bridge's functions use, planted in `public` by the writer, recording
/// who ran them. Ordinary sales by the writer and by the superuser must never run them, and are captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_planted_by_the_writer_never_run() {
    let env = Env::start("sec-operators");
    let db = env.client().await;
    create_writer(&db, "writer").await;
    // PostgreSQL 15 no longer lets everyone create in public; 13 and 14 do.
    db.batch_execute("GRANT CREATE ON SCHEMA public TO writer")
        .await
        .expect("grant");
    let w = connect_as(&env, "writer").await;
    w.batch_execute(
        "CREATE TABLE public.attack_log (who text, what text);
         GRANT SELECT, INSERT ON public.attack_log TO PUBLIC;",
    )
    .await
    .expect("log table");
    // (operator, left, right, result): each records current_user and then does what pg_catalog's would.
    let ops: &[(&str, &str, &str, &str)] = &[
        ("||", "text", "bigint", "text"),
        ("||", "bigint", "text", "text"),
        ("||", "text", "text", "text"),
        ("||", "text", "integer", "text"),
        ("=", "bigint", "bigint", "boolean"),
        ("=", "text", "text", "boolean"),
        ("=", "oid", "oid", "boolean"),
        ("=", "integer", "integer", "boolean"),
        ("=", "boolean", "boolean", "boolean"),
        ("=", "xid8", "xid8", "boolean"),
        ("=", "oid", "regclass", "boolean"),
        ("<>", "text", "text", "boolean"),
        ("<>", "bigint", "bigint", "boolean"),
        ("<>", "oid", "oid", "boolean"),
        ("<>", "oid", "regclass", "boolean"),
        ("<", "integer", "integer", "boolean"),
        ("<", "bigint", "bigint", "boolean"),
        (">", "bigint", "bigint", "boolean"),
        ("~", "text", "text", "boolean"),
    ];
    for (i, (op, l, r, res)) in ops.iter().enumerate() {
        w.batch_execute(&format!(
            "CREATE FUNCTION public.evil_{i}(a {l}, b {r}) RETURNS {res} LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.attack_log VALUES (current_user::text, '{l} {op} {r}');
                 RETURN a OPERATOR(pg_catalog.{op}) b;
             END $$;
             CREATE OPERATOR public.{op} (LEFTARG = {l}, RIGHTARG = {r}, FUNCTION = public.evil_{i});"
        ))
        .await
        .unwrap_or_else(|e| panic!("planting {l} {op} {r}: {}", sqlstate(&e)));
    }
    // A function with a better match than pg_catalog's variadic one.
    w.batch_execute(
        "CREATE FUNCTION public.json_build_object(text, text, text, text, text, text, text, text, text, text)
           RETURNS json LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO public.attack_log VALUES (current_user::text, 'json_build_object'); RETURN '{}'; END $$;",
    )
    .await
    .expect("functions");
    // Planted before the migration runs, too: the migration must not bind them either.
    migrate(&env).await;
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-sec-ops", "dev/#").await;

    // A sale with its stock and inventory changes in one transaction, then two later transactions on its items
    // (each statement its own transaction: several statements in one simple query would share one).
    let sale = |id: i64, code: &str, immediate: bool| {
        vec![
            format!(
                "BEGIN; {}
                 SELECT set_config('delta_bridge.actor', 'kasir', true);
                 UPDATE products SET stock = stock - 1 WHERE id = 4;
                 UPDATE inventory SET quantity = quantity - 1 WHERE product_id = 4;
                 INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total)
                   VALUES ({id}, 1, '{code}', 'paid', 3);
                 INSERT INTO transaction_items (transaction_id, product_id, quantity, price) VALUES ({id}, 4, 1, 3);
                 UPDATE transactions SET status = 'completed' WHERE id = {id};
                 COMMIT;",
                if immediate {
                    "SET CONSTRAINTS ALL IMMEDIATE;"
                } else {
                    ""
                }
            ),
            format!("UPDATE transaction_items SET quantity = 2 WHERE transaction_id = {id}"),
            format!("DELETE FROM transaction_items WHERE transaction_id = {id}"),
        ]
    };
    for stmt in sale(801, "SU-801", false) {
        db.batch_execute(&stmt).await.expect("the superuser's sale");
    }
    for stmt in sale(802, "W-802", false) {
        w.batch_execute(&stmt).await.expect("the writer's sale");
    }
    // SET CONSTRAINTS ... IMMEDIATE: capture per statement.
    for stmt in sale(803, "SU-803", true) {
        db.batch_execute(&stmt).await.expect("immediate sale");
    }
    db.batch_execute("UPDATE products SET stock = 4242 WHERE id = 9")
        .await
        .expect("sentinel");
    let msgs = received_until_sentinel(&sub).await;

    let mut failures = Vec::new();
    let log: Vec<(String, String)> = db
        .query("SELECT who, what FROM public.attack_log", &[])
        .await
        .expect("log")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if !log.is_empty() {
        failures.push(format!("the writer's code ran {} time(s) as: {log:?}", log.len()));
    }
    for (id, code) in [(801, "SU-801"), (802, "W-802"), (803, "SU-803")] {
        let events: Vec<&Received> = msgs
            .iter()
            .filter(|m| m.payload["data"]["transaction_code"] == code)
            .collect();
        let kinds: Vec<&str> = events.iter().filter_map(|m| m.payload["event_type"].as_str()).collect();
        if kinds != ["transaction_created", "transaction_updated", "transaction_updated"] {
            failures.push(format!("sale {id}: events {kinds:?}"));
            continue;
        }
        let items: Vec<usize> = events
            .iter()
            .filter_map(|m| m.payload["data"]["items"].as_array().map(Vec::len))
            .collect();
        if items != [1, 1, 0] || events[0].payload["data"]["status"] != "completed" {
            failures.push(format!(
                "sale {id}: {:#?}",
                events.iter().map(|m| shown(m)).collect::<Vec<_>>()
            ));
        }
    }
    let stock: Vec<&Received> = msgs
        .iter()
        .filter(|m| m.payload["event_type"] == "stock_updated" && m.payload["data"]["product_id"] == 4)
        .collect();
    // In immediate mode the stock change is captured at the end of its own statement, before the sale exists.
    let named: Vec<(Value, Value)> = stock
        .iter()
        .map(|m| {
            (
                m.payload["data"]["reason"].clone(),
                m.payload["data"]["transaction_id"].clone(),
            )
        })
        .collect();
    let expected = [
        (json!("transaction"), json!(801)),
        (json!("transaction"), json!(802)),
        (json!("adjustment"), Value::Null),
    ];
    if named != expected {
        failures.push(format!(
            "stock changes made with the sales: {:#?}",
            stock.iter().map(|m| shown(m)).collect::<Vec<_>>()
        ));
    }
    failures.extend(leftover_bookkeeping(&db).await);
    sub.stop().await;
    bridge.stop().await;
    fail_with(&failures);
}

/// Times one autocommit statement as the writer; None if it hit `statement_timeout`.
async fn timed_statement(w: &Client, sql: &str, timeout: Duration) -> Option<Duration> {
    w.batch_execute(&format!("SET statement_timeout = {}", timeout.as_millis()))
        .await
        .expect("timeout");
    let start = Instant::now();
    let r = w.batch_execute(sql).await;
    let took = start.elapsed();
    match r {
        Ok(()) => Some(took),
        Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "57014") => None,
        Err(e) => panic!("{sql}: {}", sqlstate(&e)),
    }
}

/// One statement touching 100,000 sales costs about ten times one touching 10,000 (linear), not a hundred times
/// (quadratic). Compared within the run, so a slow machine does not fail it; the large statement runs under a
/// statement_timeout of 20 times the small one, so a quadratic schema fails in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_over_many_sales_costs_linear_time() {
    const SMALL: i64 = 10_000;
    const LARGE: i64 = 100_000;
    let env = Env::start("sec-linear");
    let db = env.client().await;
    create_writer(&db, "writer").await;
    migrate(&env).await;
    // The sales exist already (loaded without triggers: this is about the statement that touches them).
    db.batch_execute(&format!(
        "SET session_replication_role = replica;
         INSERT INTO transactions (id, branch_id, transaction_code, status, grand_total)
           SELECT g, 1 + g % 2, 'BULK-' || g, 'paid', 1 FROM generate_series(1, {}) g;
         RESET session_replication_role;
         ANALYZE transactions;",
        LARGE + 3 * SMALL
    ))
    .await
    .expect("sales");
    let w = connect_as(&env, "writer").await;

    // Warm-up, then the small statement three times (median), each on sales not touched before.
    let mut small = Vec::new();
    for run in 0..3 {
        let (lo, hi) = (LARGE + run * SMALL + 1, LARGE + (run + 1) * SMALL);
        let t = timed_statement(
            &w,
            &format!("UPDATE transactions SET status = 'void' WHERE id BETWEEN {lo} AND {hi}"),
            Duration::from_secs(600),
        )
        .await
        .expect("no timeout for the small statement");
        small.push(t);
        db.batch_execute("TRUNCATE delta_bridge.outbox").await.expect("clear");
    }
    small.sort();
    let small = small[1];
    let limit = (small * 20).max(Duration::from_secs(2));
    let large = timed_statement(
        &w,
        &format!("UPDATE transactions SET status = 'void' WHERE id BETWEEN 1 AND {LARGE}"),
        limit,
    )
    .await;
    println!(
        "one UPDATE of {SMALL} sales: {small:?}; of {LARGE} sales: {}",
        large.map_or(format!("over {limit:?} (cancelled)"), |l| format!("{l:?}"))
    );
    let large = large.unwrap_or_else(|| {
        panic!(
            "{LARGE} sales took over 20x the time of {SMALL} ({limit:?} vs {small:?}): not linear; \
             the business write hit its statement_timeout"
        )
    });
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    println!("ratio {ratio:.1} for 10x the rows");
    assert!(ratio < 20.0, "ratio {ratio:.1}: not linear");
    let (n, sales): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), count(DISTINCT new_row->>'id') FROM delta_bridge.outbox WHERE kind = 'sale'",
                &[],
            )
            .await
            .expect("q");
        (r.get(0), r.get(1))
    };
    assert_eq!((n, sales), (LARGE, LARGE), "one event per sale");
    fail_with(&leftover_bookkeeping(&db).await);
}
