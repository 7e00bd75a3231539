//! No row stops the stream. A business table may carry any extra column of any type (capture copies the whole
//! row as json), so a value the bridge cannot read — JSON nested deeper than the decoder's recursion limit, a
//! number beyond a 64-bit float, text that is not UTF-8 — must become a dead letter with a reason an operator
//! can read, and the next change, on another branch, must be published within seconds by the same, still
//! ready, bridge. Values of unusual types that the bridge can read are simply published: the extra column is
//! not part of the event.

mod common;

use std::time::{Duration, Instant};

use common::{metric, Env, Subscriber};

/// "Within seconds": the time a change behind a poison row may take to arrive.
const NEXT_EVENT: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(20);

const DEAD_LETTERS: &str = "delta_bridge_dead_letters ";
const UNCONVERTIBLE: &str = "delta_bridge_publish_failures_total{reason=\"unconvertible\"} ";

/// What must become of the poison row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Published as usual (the extra column is not part of the event).
    Published,
    /// Moved to the dead letters, `reason = 'unconvertible'`, with a detail containing this text.
    DeadLetter(&'static str),
}

/// One extra column of `products` and the value written into it.
struct Case {
    name: &'static str,
    /// Column type (after `ADD COLUMN name`).
    ty: &'static str,
    /// SQL expression for the value.
    value: &'static str,
    expect: Expect,
}

/// A bridge, a subscriber and a session on one stack; `db` names the database the bridge watches.
struct Rig {
    bridge: common::InProcessBridge,
    sub: Subscriber,
    db: tokio_postgres::Client,
    /// Product ids of branch 1 (poison) and branch 2 (normal changes) not used yet.
    next_poison: i64,
    next_normal: i64,
}

impl Rig {
    async fn start(env: &Env, database: &str) -> Rig {
        let toml = env
            .config_toml("")
            .replace(&format!("/{}\"", env.db), &format!("/{database}\""));
        let cfg = delta_bridge::config::Config::parse(&toml, std::path::Path::new("test.toml"), &[]).expect("config");
        let bridge = env.bridge_with(cfg).await;
        let sub = Subscriber::start(&env.mqtt.url(), &format!("device-{database}"), "dev/#").await;
        let db = common::connect(&env.pg.url(database)).await;
        Rig {
            bridge,
            sub,
            db,
            next_poison: 1,
            next_normal: 21,
        }
    }

    /// Writes the case's value into a new column on one product of branch 1 (with a stock change, so that it
    /// is captured), then a normal stock change on a product of branch 2; checks both outcomes.
    async fn check(&mut self, case: &Case) {
        let (poison, normal) = (self.next_poison, self.next_normal);
        self.next_poison += 1;
        self.next_normal += 1;
        self.db
            .batch_execute(&format!(
                "ALTER TABLE products ADD COLUMN {name} {ty};
                 UPDATE products SET {name} = {value}, stock = 1000 + id WHERE id = {poison};",
                name = case.name,
                ty = case.ty,
                value = case.value,
            ))
            .await
            .unwrap_or_else(|e| panic!("{}: the business write commits: {e:?}", case.name));
        self.normal_change(normal, case.name).await;
        self.poison_outcome(poison, case).await;
        let ready = reqwest::get(format!("{}/readyz", self.bridge.http))
            .await
            .expect("GET /readyz")
            .status();
        assert_eq!(ready, 200, "{}: the bridge is still ready", case.name);
    }

    /// A stock change on `product` arrives within [`NEXT_EVENT`].
    async fn normal_change(&self, product: i64, after: &str) {
        self.db
            .batch_execute(&format!("UPDATE products SET stock = 2000 + id WHERE id = {product}"))
            .await
            .expect("normal write");
        self.sub
            .wait_for(
                NEXT_EVENT,
                &format!("the normal change on product {product} after the {after} row"),
                |m| {
                    m.iter().any(|x| {
                        x.payload["data"]["product_id"] == product && x.payload["data"]["new_stock"] == 2000 + product
                    })
                },
            )
            .await;
    }

    async fn poison_outcome(&self, poison: i64, case: &Case) {
        match case.expect {
            Expect::Published => {
                self.sub
                    .wait_for(WAIT, &format!("the {} row published", case.name), |m| {
                        m.iter().any(|x| {
                            x.payload["data"]["product_id"] == poison && x.payload["data"]["new_stock"] == 1000 + poison
                        })
                    })
                    .await;
            }
            Expect::DeadLetter(why) => {
                let (reason, detail) = self.dead_letter(poison, case.name).await;
                assert_eq!(reason, "unconvertible", "{}", case.name);
                assert!(
                    detail.contains(why),
                    "{}: the detail says why ({why:?}): {detail}",
                    case.name
                );
                assert!(
                    !self
                        .sub
                        .snapshot()
                        .iter()
                        .any(|x| x.payload["data"]["product_id"] == poison),
                    "{}: nothing is published for the poison row",
                    case.name
                );
            }
        }
    }

    /// The dead letter of product `product`'s stock change: (reason, detail).
    async fn dead_letter(&self, product: i64, what: &str) -> (String, String) {
        let start = Instant::now();
        loop {
            // Matched as text: the row's json may be more than PostgreSQL's own json operators accept
            // (a lone surrogate), or more than this client can read.
            if let Some(r) = self
                .db
                .query_opt(
                    "SELECT reason, detail FROM delta_bridge.dead_letter
                      WHERE kind = 'stock' AND starts_with(new_row::text, '{\"id\":' || $1::bigint || ',')",
                    &[&product],
                )
                .await
                .expect("dead_letter query")
            {
                return (r.get(0), r.get(1));
            }
            assert!(start.elapsed() < WAIT, "{what}: never dead-lettered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn unconvertible(&self) -> f64 {
        metric(&self.bridge.http, UNCONVERTIBLE).await.expect("metric")
    }

    /// `delta_bridge_dead_letters` shows the waiting dead letter (refreshed every 2 s), keeps showing it
    /// while it waits (unlike a rate of the failures counter), and drops to 0 once it is deleted.
    async fn dead_letters_gauge(&self) {
        self.wait_dead_letters(1.0, "the dead letter waiting").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            metric(&self.bridge.http, DEAD_LETTERS).await,
            Some(1.0),
            "still 1 while the dead letter waits"
        );
        self.db
            .batch_execute("DELETE FROM delta_bridge.dead_letter")
            .await
            .expect("delete the dead letters");
        self.wait_dead_letters(0.0, "the dead letter deleted").await;
    }

    async fn wait_dead_letters(&self, want: f64, what: &str) {
        let start = Instant::now();
        loop {
            let got = metric(&self.bridge.http, DEAD_LETTERS).await;
            if got == Some(want) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{what}: {DEAD_LETTERS}{got:?}, not {want} within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.sub.stop().await;
        self.bridge.stop().await;
    }
}

/// Each in its own stack, so that each shows on its own whether it stops the stream.
async fn dead_letter_case(tag: &str, case: Case) {
    let env = Env::start(tag);
    let mut rig = Rig::start(&env, &env.db).await;
    rig.check(&case).await;
    assert_eq!(rig.unconvertible().await, 1.0, "counted as unconvertible");
    rig.dead_letters_gauge().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonb_nested_200_deep_is_dead_lettered_and_the_stream_goes_on() {
    dead_letter_case(
        "poison-deep",
        Case {
            name: "deep",
            ty: "jsonb",
            value: "(repeat('[', 200) || repeat(']', 200))::jsonb",
            expect: Expect::DeadLetter("recursion limit"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_1e400_is_dead_lettered_and_the_stream_goes_on() {
    dead_letter_case(
        "poison-big",
        Case {
            name: "big",
            ty: "numeric",
            value: "1e400",
            expect: Expect::DeadLetter("number out of range"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_beyond_f64_inside_json_is_dead_lettered_and_the_stream_goes_on() {
    dead_letter_case(
        "poison-jnum",
        Case {
            name: "doc",
            ty: "json",
            value: "'{\"n\": -1e400}'::json",
            expect: Expect::DeadLetter("number out of range"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_utf16_surrogate_in_json_is_dead_lettered_and_the_stream_goes_on() {
    dead_letter_case(
        "poison-surrogate",
        Case {
            name: "doc",
            ty: "json",
            value: "'{\"s\": \"\\ud800\"}'::json",
            expect: Expect::DeadLetter("hex escape"),
        },
    )
    .await;
}

/// Unusual types and sizes the bridge can read: each published, the changes behind them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readable_values_of_any_type_are_published_and_the_stream_goes_on() {
    let env = Env::start("poison-types");
    env.pg
        .psql(
            &env.db,
            "CREATE TYPE pair AS (a int, b text); CREATE TYPE mood AS ENUM ('ok', 'meh');",
        )
        .expect("types");
    let mut rig = Rig::start(&env, &env.db).await;
    let cases = [
        ("nan", "numeric", "'NaN'", Expect::Published),
        ("tiny", "numeric", "1e-400", Expect::Published),
        ("wide", "numeric", "1e300 + 0.5", Expect::Published),
        ("inf", "float8", "'-Infinity'", Expect::Published),
        ("cash", "money", "12.34", Expect::Published),
        (
            "span",
            "interval",
            "'1 year 2 mons 3 days 04:05:06.789'",
            Expect::Published,
        ),
        ("never", "date", "'infinity'", Expect::Published),
        ("dawn", "timestamptz", "'-infinity'", Expect::Published),
        ("ints", "int[]", "ARRAY[1, NULL, 3]", Expect::Published),
        ("grid", "text[]", "ARRAY[['a', 'b'], ['c', NULL]]", Expect::Published),
        ("duo", "pair", "ROW(1, 'x\"y')::pair", Expect::Published),
        ("feel", "mood", "'meh'", Expect::Published),
        ("addr", "inet", "'::1/128'", Expect::Published),
        ("uid", "uuid", "gen_random_uuid()", Expect::Published),
        ("bits", "varbit", "B'10101'", Expect::Published),
        ("rng", "int4range", "'[1,5)'", Expect::Published),
        (
            "nul",
            "json",
            "'{\"s\": \"a\\u0000b\", \"k\": 1, \"k\": 2}'",
            Expect::Published,
        ),
        (
            "nest",
            "jsonb",
            "(repeat('[', 100) || repeat(']', 100))::jsonb",
            Expect::Published,
        ),
        (
            "blob",
            "bytea",
            "decode(repeat('ab', 8 * 1024 * 1024), 'hex')",
            Expect::Published,
        ),
        ("essay", "text", "repeat('x', 5 * 1024 * 1024)", Expect::Published),
    ];
    let before = rig.unconvertible().await;
    for (name, ty, value, expect) in cases {
        rig.check(&Case {
            name,
            ty,
            value,
            expect,
        })
        .await;
    }
    assert_eq!(rig.unconvertible().await, before, "nothing readable is dead-lettered");
    rig.stop().await;
}

/// Text that is not UTF-8, which a SQL_ASCII database stores as given: in a published column of the row
/// (the product's name, in its json), in the outbox's own text columns (the branch code), and in the
/// product name a quantity event reads from the products table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_is_dead_lettered_and_the_stream_goes_on() {
    let env = Env::start("poison-ascii");
    let ascii = "mstore_ascii";
    env.pg
        .psql(
            "postgres",
            &format!("CREATE DATABASE {ascii} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
        )
        .expect("a SQL_ASCII database");
    env.pg
        .psql(ascii, delta_harness::stack::REFERENCE_SCHEMA)
        .expect("schema");
    env.pg.psql(ascii, common::SAMPLE_DATA).expect("sample data");
    let rig = Rig::start(&env, ascii).await;

    // 1. The product's name, inside new_row (json), is Latin-1 "café".
    rig.db
        .batch_execute("UPDATE products SET name = E'caf\\xe9', stock = 1001 WHERE id = 1")
        .await
        .expect("write");
    rig.normal_change(21, "non-UTF-8 name").await;
    let (reason, detail) = rig.dead_letter(1, "non-UTF-8 name").await;
    assert_eq!(reason, "unconvertible");
    assert!(detail.contains("new_row"), "{detail}");

    // 2. Branch 3's code, copied into the outbox's branch_code (text).
    rig.db
        .batch_execute(
            "UPDATE branches SET code = E'BRN-\\xff' WHERE id = 3;
             UPDATE products SET stock = 1041 WHERE id = 41;",
        )
        .await
        .expect("write");
    rig.normal_change(22, "non-UTF-8 branch code").await;
    let (reason, detail) = rig.dead_letter(41, "non-UTF-8 branch code").await;
    assert_eq!(reason, "unconvertible");
    assert!(detail.contains("branch_code"), "{detail}");

    // 3. A quantity change of product 1: its product_name (text) comes from the name written above.
    rig.db
        .batch_execute("UPDATE inventory SET quantity = 77 WHERE product_id = 1")
        .await
        .expect("write");
    rig.normal_change(23, "non-UTF-8 product name").await;
    let start = Instant::now();
    let detail: String = loop {
        if let Some(r) = rig
            .db
            .query_opt(
                "SELECT detail FROM delta_bridge.dead_letter WHERE kind = 'quantity'",
                &[],
            )
            .await
            .expect("q")
        {
            break r.get(0);
        }
        assert!(start.elapsed() < WAIT, "the quantity row never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(detail.contains("product_name"), "{detail}");

    // Product 1's name and stock changed together: a stock and a product row, both unreadable.
    assert_eq!(rig.unconvertible().await, 4.0);
    let dead: i64 = rig
        .db
        .query_one("SELECT count(*) FROM delta_bridge.dead_letter", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(dead, 4);
    let ready = reqwest::get(format!("{}/readyz", rig.bridge.http))
        .await
        .expect("readyz")
        .status();
    assert_eq!(ready, 200);
    rig.stop().await;
}

/// A replay of 50,000 dead letters (below the cursor) that fail again (a branch code that still cannot be a
/// topic level) goes back to the dead letters in bulk: within a minute, each row with its reason, a fresh detail and its
/// content, and the leader's heartbeat never lapses meanwhile (a standby would report a leader silent for
/// 6 s as a squatter). The stream goes on behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_50000_dead_letters_that_fail_again_goes_back_in_bulk_and_the_leader_keeps_its_heartbeat() {
    const N: i64 = 50_000;
    let env = Env::start("replay-dead");
    let bridge = env.bridge().await;
    let sub = Subscriber::start(&env.mqtt.url(), "device-replay-dead", "dev/#").await;
    let db = env.client().await;
    db.batch_execute(&format!(
        "INSERT INTO delta_bridge.dead_letter (id, captured_at, kind, op, merchant_code, branch_code,
                                               product_name, old_row, new_row, items, ctx, reason, detail)
         SELECT nextval('delta_bridge.outbox_id_seq'), now(), 'stock', 'UPDATE', 'MCH-MST-001', 'BAD/CODE', NULL,
                json_build_object('id', 1, 'name', 'Product 1-1', 'stock', g, 'updated_by', 'replay'),
                json_build_object('id', 1, 'name', 'Product 1-1', 'stock', g + 1, 'updated_by', 'replay'),
                NULL, '{{}}'::json, 'rejected', 'before the replay'
           FROM generate_series(1, {N}) g;"
    ))
    .await
    .expect("dead letters");
    // Dead letters are old rows: a change after them moves the cursor past their ids, so that the replay
    // puts them below it, where the leader's sweep finds them.
    db.batch_execute("UPDATE products SET stock = 4241 WHERE id = 21")
        .await
        .expect("write");
    sub.wait_for(WAIT, "the change after the dead letters", |m| {
        m.iter()
            .any(|x| x.payload["data"]["product_id"] == 21 && x.payload["data"]["new_stock"] == 4241)
    })
    .await;
    let heartbeat_age = || async {
        db.query_one(
            "SELECT extract(epoch FROM clock_timestamp() - heartbeat_at)::float8 FROM delta_bridge.leader",
            &[],
        )
        .await
        .expect("heartbeat")
        .get::<_, f64>(0)
    };
    let start = Instant::now();
    db.batch_execute("SELECT delta_bridge.replay()").await.expect("replay");
    let mut oldest_heartbeat = 0f64;
    loop {
        oldest_heartbeat = oldest_heartbeat.max(heartbeat_age().await);
        let back: i64 = db
            .query_one(
                "SELECT count(*) FROM delta_bridge.dead_letter WHERE detail <> 'before the replay'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if back == N {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{back} of {N} back in the dead letters after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{N} replayed dead letters back in {:?}; the leader's heartbeat at most {oldest_heartbeat:.2} s old",
        start.elapsed()
    );
    assert!(
        oldest_heartbeat < 3.0,
        "the leader's heartbeat (due every second) was {oldest_heartbeat:.2} s old while it moved dead letters"
    );
    let (rows, reasons, content): (i64, i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE reason = 'unconvertible' AND detail LIKE '%branch code%'),
                        count(*) FILTER (WHERE branch_code = 'BAD/CODE' AND kind = 'stock'
                                           AND (new_row->>'stock')::int = (old_row->>'stock')::int + 1)
                   FROM delta_bridge.dead_letter",
                &[],
            )
            .await
            .expect("dead letters");
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(
        (rows, reasons, content),
        (N, N, N),
        "each with its reason, detail and content"
    );
    assert_eq!(common::bridge_rows(&db, "outbox").await, 0);
    assert_eq!(
        metric(&bridge.http, UNCONVERTIBLE).await,
        Some(N as f64),
        "each counted once"
    );
    // The stream goes on behind them.
    db.batch_execute("UPDATE products SET stock = 4242 WHERE id = 21")
        .await
        .expect("write");
    sub.wait_for(NEXT_EVENT, "the change after the replay", |m| {
        m.iter()
            .any(|x| x.payload["data"]["product_id"] == 21 && x.payload["data"]["new_stock"] == 4242)
    })
    .await;
    sub.stop().await;
    bridge.stop().await;
}
