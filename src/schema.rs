//! Installs, upgrades and removes the bridge's database objects without making the writers wait: versioned
//! SQL files under `sql/` for the bridge's own objects, and the capture triggers (and one index) on the busy
//! business tables, each attached on its own with a short lock. Never drops or rewrites business data.
//!
//! **Migrations are history.** `sql/NNN_*.sql` are applied once each, in order, and recorded in
//! `delta_bridge.schema_migrations`; a published file is never edited, whichever binary applied it. What
//! changed is how the runner executes one. It splits a migration into statements ([`split`]) and runs:
//! - the bridge's own objects (tables, functions, grants in the schema `delta_bridge`) in one transaction,
//!   with the row that records the migration;
//! - a `LOCK TABLE` on business tables (migration 4's fence: writers in flight under the old capture functions
//!   commit before the functions are replaced) inside that transaction, but only while capture triggers are
//!   attached: with none, no writer runs a bridge function and there is nothing to fence;
//! - `CREATE INDEX ... ON` a business table as `CREATE INDEX CONCURRENTLY` outside any transaction (it does not
//!   block writers; a build that failed leaves an INVALID index, which is dropped concurrently and built
//!   again);
//! - `CREATE TRIGGER ... ON` a business table after every pending migration's objects exist, one business table
//!   per transaction: "attaching capture". It is checked on every `migrate` (each trigger by name, the index
//!   by validity), so a database installed half-way (a crash between steps, `uninstall` without
//!   `--drop-schema`) gets what is missing and nothing twice.
//!
//! So a new install (migration 1 not applied) is: the objects of every migration, each in a short
//! transaction that touches no business table, the index concurrently, then the triggers of `products`,
//! `inventory`, `transactions` and `transaction_items`, each in a transaction of its own. A database migrated
//! by an earlier version keeps what it has; the pending migrations (e.g. 4 and 5 on a database at 3) run as
//! published, in one transaction each, fence included.
//!
//! **Short locks** ([`ddl`]). The session runs with `lock_timeout = postgres.ddl_lock_timeout` (1 s): a step
//! that waits longer for a table lock gives up, rolls back (the writers queued behind it go on) and is tried
//! again after a pause, until `postgres.ddl_deadline` (5 min) has passed since the migration began; then
//! it fails naming the table and the sessions that held it. The only multi-table transaction is migration
//! 4's fence on a database upgraded from 1–3, whose purpose is exactly to hold both sale tables at once.
//!
//! **Two replicas at once.** Everything runs under the migration lock, a session advisory lock taken by
//! polling (`postgres.migrate_lock_timeout`), so replicas starting together run one after the other; the
//! second finds everything in place. The lock is released at the end, or with the session.
//!
//! **`seq` across reinstalls.** The outbox id is the events' `seq`, and devices drop a `seq` not above the
//! last they applied for a row, so a reinstall (the schema dropped and installed again) must not restart it.
//! A new install starts the sequence at the current time in microseconds since the Unix epoch (about 1.8e15
//! today, below 2^53 until the year 2255, so JSON numbers stay exact): an earlier install used one id per
//! captured change, and no database captures more than a million changes a second, so it cannot have
//! reached the clock's value. An existing install keeps its sequence (migrations never touch it).
//!
//! **Newer schemas.** A binary refuses a database whose recorded migrations go beyond the ones it knows
//! ([`MigrateError::SchemaTooNew`]): `migrate` and `run` exit 1 rather than run old code against new objects.
//! Rolling back is described in docs/deployment.md.
//!
//! Removing capture ([`uninstall`]) takes the same locks the same way.

mod attach;
mod ddl;
mod split;
mod uninstall;

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

pub(crate) use ddl::Limits;
use ddl::{Body, Runner, Step, StepError};
use split::Kind;
pub use uninstall::Uninstalled;
pub(crate) use uninstall::{uninstall, UninstallOptions};

use crate::locks::{self, Holder};
use crate::pg::PgError;

/// How often a migration waiting for the migration lock tries it again.
const LOCK_POLL: Duration = Duration::from_millis(250);
/// While waiting, the holders are logged when they change, and at least this often.
const LOCK_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Advisory lock key serialising migrations (per database).
pub const MIGRATE_LOCK: i64 = 7_234_298_723_003;

/// The migrations, in order. Append only: an applied migration is never edited.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "capture", include_str!("../sql/001_capture.sql")),
    (2, "devices", include_str!("../sql/002_devices.sql")),
    (3, "leader", include_str!("../sql/003_leader.sql")),
    (4, "writer_isolation", include_str!("../sql/004_writer_isolation.sql")),
    (5, "device_max_expiry", include_str!("../sql/005_device_max_expiry.sql")),
    (6, "branch_seq", include_str!("../sql/006_branch_seq.sql")),
    (7, "change_log", include_str!("../sql/007_change_log.sql")),
    (8, "delete_events", include_str!("../sql/008_delete_events.sql")),
    (9, "row_seq", include_str!("../sql/009_row_seq.sql")),
    (10, "capture_fixes", include_str!("../sql/010_capture_fixes.sql")),
    (11, "row_seq_ids", include_str!("../sql/011_row_seq_ids.sql")),
];

/// The newest migration this binary knows.
fn known_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// The business tables the capture triggers attach to.
pub(crate) const BUSINESS_TABLES: [&str; 6] = [
    "merchants",
    "branches",
    "products",
    "inventory",
    "transactions",
    "transaction_items",
];

/// The schema, and the table recording migrations: the one step every `migrate` runs.
const BOOTSTRAP: &str = "CREATE SCHEMA IF NOT EXISTS delta_bridge;
    CREATE TABLE IF NOT EXISTS delta_bridge.schema_migrations (
        version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())";

/// A new install's first `seq`: the clock in microseconds (see the module's doc).
const SEQ_FROM_CLOCK: &str = "SELECT pg_catalog.setval('delta_bridge.outbox_id_seq',
    (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, false)";

/// What a `migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// The migrations applied now.
    pub applied: Vec<i32>,
    /// What was attached to business tables now ("capture triggers on public.products", "index ...").
    pub attached: Vec<String>,
}

impl Migrated {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.attached.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("table {schema}.{table} does not exist: delta-bridge attaches to the reference schema (sql/reference_schema.sql)")]
    MissingTable { schema: String, table: String },
    /// Another session held the migration lock for longer than `postgres.migrate_lock_timeout`.
    #[error("gave up after waiting {waited:?} (postgres.migrate_lock_timeout) for the migration lock (advisory lock {MIGRATE_LOCK}), held by {holders}: a migration of another replica that takes this long, or a session that squats the bridge's lock (end it, e.g. SELECT pg_terminate_backend(<pid>), or raise the limit)")]
    LockTimeout { waited: Duration, holders: String },
    /// A step never got its table lock within `postgres.ddl_lock_timeout` before `postgres.ddl_deadline`.
    #[error("gave up {what} after {waited:?} (postgres.ddl_deadline) and {tries} tries: {tables} stayed locked by {holders}. Each try waited at most postgres.ddl_lock_timeout so that writers never queue behind it for longer; end that transaction (SELECT pg_terminate_backend(<pid>)) or wait until it is over, then run again (it resumes where it stopped)")]
    LockBusy {
        what: String,
        tables: String,
        waited: Duration,
        tries: u32,
        holders: String,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what} failed: {source}")]
    Step {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A migration of this binary that the runner cannot split (caught by the unit tests, never shipped).
    #[error("migration {version}: {reason}")]
    Unsupported { version: i32, reason: String },
    /// The database was migrated by a newer delta-bridge.
    #[error("the database's delta_bridge schema is at migration {found}, newer than this delta-bridge knows (up to {known}): a newer version installed it, and this one does not run against it. Deploy the newer version again, or see docs/deployment.md, \"Rolling back\"")]
    SchemaTooNew { found: i32, known: i32 },
    /// `run --no-migrate` against a schema this binary would still have to migrate.
    #[error("the database's delta_bridge schema is at migration {found}, older than this delta-bridge needs ({known}): run `delta-bridge migrate` with this version first (or start it without --no-migrate)")]
    SchemaTooOld { found: i32, known: i32 },
    /// `uninstall` without `--force` while a replica leads.
    #[error("the leader lock (advisory lock {lock}) is held: {holders}. A leading replica would find capture gone, and one that restarts would attach it again: stop every replica first (e.g. scale the Deployment to 0), or pass --force (also when the holder is no replica)")]
    Leading { lock: i64, holders: String },
}

impl MigrateError {
    /// A database that cannot be reached or answered with an error may work on the next attempt; a missing
    /// business table, a migration that failed, a lock held past its limit or a newer schema will not (the
    /// lock timeouts are final so that `run` exits, naming the holder, instead of waiting forever).
    pub fn is_transient(&self) -> bool {
        matches!(self, MigrateError::Pg(_))
    }

    fn of_step(what: &str, tables: &[String], e: StepError) -> MigrateError {
        match e {
            StepError::Busy { waited, tries, holders } => MigrateError::LockBusy {
                what: what.to_string(),
                tables: tables.join(", "),
                waited,
                tries,
                holders: describe(
                    &holders,
                    "no session that still holds it (only short transactions were ahead)",
                ),
            },
            StepError::Sql(source) => MigrateError::Step {
                what: what.to_string(),
                source,
            },
            StepError::Pg(e) => MigrateError::Pg(e),
        }
    }
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Pg(PgError::Query(e))
    }
}

fn describe(holders: &[Holder], none: &str) -> String {
    if holders.is_empty() {
        return none.to_string();
    }
    holders.iter().map(Holder::to_string).collect::<Vec<_>>().join(", ")
}

/// Quotes an identifier for SQL text.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted identifier as it goes inside a string literal (`'"my""schema".products'::regclass`).
fn quote_ident_in_literal(s: &str) -> String {
    quote_ident(s).replace('\'', "''")
}

fn substitute(sql: &str, schema: &str) -> String {
    sql.replace("@schema_literal@", &quote_ident_in_literal(schema))
        .replace("@schema@", &quote_ident(schema))
}

/// Applies every migration not yet applied and attaches what is missing of capture. Waits at most
/// `limits.migrate_lock` for the migration lock; while another session holds it, `waiting` is called with
/// the holders at every try (every 250 ms) and they are logged; with an empty slice once the lock is taken.
pub(crate) async fn migrate(
    client: &mut Client,
    schema: &str,
    limits: Limits,
    waiting: &mut (dyn FnMut(&[Holder]) + Send),
) -> Result<Migrated, MigrateError> {
    take_migrate_lock(client, limits.migrate_lock, waiting).await?;
    let result = migrate_locked(client, schema, limits).await;
    release(client, MIGRATE_LOCK).await;
    result
}

/// Refuses a schema newer than this binary, or older than it needs (for `run --no-migrate`: without its
/// tables and functions the pipeline would fail on every read, and an older version's capture would publish
/// without what this one adds); a database without the bridge's objects passes (the pipeline says what is
/// missing).
pub(crate) async fn check_version(client: &Client) -> Result<(), MigrateError> {
    let newest = client
        .query_one("SELECT max(version) FROM delta_bridge.schema_migrations", &[])
        .await;
    match newest {
        Ok(row) => {
            let found: Option<i32> = row.try_get(0)?;
            newer_than_known(found)?;
            older_than_known(found)
        }
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn older_than_known(found: Option<i32>) -> Result<(), MigrateError> {
    match found {
        Some(found) if found < known_version() => Err(MigrateError::SchemaTooOld {
            found,
            known: known_version(),
        }),
        _ => Ok(()),
    }
}

fn newer_than_known(found: Option<i32>) -> Result<(), MigrateError> {
    match found {
        Some(found) if found > known_version() => Err(MigrateError::SchemaTooNew {
            found,
            known: known_version(),
        }),
        _ => Ok(()),
    }
}

async fn migrate_locked(client: &mut Client, schema: &str, limits: Limits) -> Result<Migrated, MigrateError> {
    // Names in the migrations resolve in pg_catalog (and the schemas they name): an operator or function that
    // someone created in public cannot bind into a trigger's WHEN clause, a default or an index.
    client.batch_execute("SET search_path = pg_catalog, pg_temp").await?;
    let runner = Runner::start(client, limits).await?;
    for table in BUSINESS_TABLES {
        let found: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = $2)",
                &[&schema, &table],
            )
            .await?
            .try_get(0)?;
        if !found {
            return Err(MigrateError::MissingTable {
                schema: schema.to_string(),
                table: table.to_string(),
            });
        }
    }
    let plans = MIGRATIONS
        .iter()
        .map(|(version, _, sql)| {
            split::statements(sql).map_err(|e| MigrateError::Unsupported {
                version: *version,
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bootstrap = Step {
        what: "creating the schema delta_bridge".into(),
        tables: vec![],
        all: vec![],
        writes: vec![],
        body: Body::Tx(BOOTSTRAP.into()),
    };
    runner
        .run(client, &bootstrap)
        .await
        .map_err(|e| MigrateError::of_step(&bootstrap.what, &bootstrap.tables, e))?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM delta_bridge.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    newer_than_known(applied.iter().copied().max())?;
    let captured = capture_attached(client, schema).await?;
    let qualified = |t: &str| format!("{}.{}", quote_ident(schema), quote_ident(t));
    let mut done = Migrated::default();
    for ((version, name, _), statements) in MIGRATIONS.iter().zip(&plans) {
        if applied.contains(version) {
            continue;
        }
        let mut sql = String::new();
        let mut fenced = Vec::new();
        for s in statements {
            match &s.kind {
                Kind::Bridge => {}
                Kind::Fence { tables } if captured => fenced.extend(tables.iter().map(|t| qualified(t))),
                Kind::Fence { .. } | Kind::Index { .. } | Kind::Trigger { .. } => continue,
            }
            sql.push_str(&substitute(&s.text, schema));
            sql.push_str(";\n");
        }
        if *version == 1 {
            sql.push_str(SEQ_FROM_CLOCK);
            sql.push_str(";\n");
        }
        sql.push_str(&format!(
            "INSERT INTO delta_bridge.schema_migrations (version, name) VALUES ({version}, '{}')",
            name.replace('\'', "''")
        ));
        let step = Step {
            what: format!("applying migration {version} ({name})"),
            tables: fenced.clone(),
            // With capture attached, every writer's commit writes the outbox.
            all: if captured {
                vec!["delta_bridge.outbox".into()]
            } else {
                vec![]
            },
            writes: fenced,
            body: Body::Tx(sql),
        };
        runner.run(client, &step).await.map_err(|e| match e {
            StepError::Sql(source) => MigrateError::Failed {
                version: *version,
                name,
                source,
            },
            e => MigrateError::of_step(&step.what, &step.tables, e),
        })?;
        done.applied.push(*version);
    }
    done.attached = attach::attach(client, schema, &runner, &plans).await?;
    Ok(done)
}

/// Whether any trigger on a business table runs a function of the bridge's schema (so writers may be
/// running the bridge's functions right now).
async fn capture_attached(client: &Client, schema: &str) -> Result<bool, MigrateError> {
    let tables: Vec<String> = BUSINESS_TABLES
        .iter()
        .map(|t| format!("{}.{}", quote_ident(schema), quote_ident(t)))
        .collect();
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
              WHERE p.pronamespace = pg_catalog.to_regnamespace('delta_bridge')::oid
                AND t.tgrelid IN (SELECT pg_catalog.to_regclass(x)::oid FROM unnest($1::text[]) x))",
            &[&tables],
        )
        .await?
        .try_get(0)?)
}

/// Takes the migration lock (a session advisory lock), polling every 250 ms for at most `limit`.
async fn take_migrate_lock(
    client: &Client,
    limit: Duration,
    waiting: &mut (dyn FnMut(&[Holder]) + Send),
) -> Result<(), MigrateError> {
    let started = Instant::now();
    let mut reported: Option<(Vec<Holder>, Instant)> = None;
    loop {
        let taken: bool = client
            .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&MIGRATE_LOCK])
            .await?
            .try_get(0)?;
        if taken {
            waiting(&[]);
            return Ok(());
        }
        let holders = locks::holders(client, MIGRATE_LOCK).await?;
        waiting(&holders);
        let waited = started.elapsed();
        if waited >= limit {
            waiting(&[]);
            return Err(MigrateError::LockTimeout {
                waited: limit,
                holders: describe(&holders, "a session that has just let go of it"),
            });
        }
        if reported
            .as_ref()
            .is_none_or(|(seen, at)| *seen != holders || at.elapsed() >= LOCK_REPORT_EVERY)
        {
            report_wait(&holders, waited, limit);
            reported = Some((holders, Instant::now()));
        }
        tokio::time::sleep(LOCK_POLL.min(limit - waited)).await;
    }
}

/// Lets go of a session advisory lock (it would go with the session anyway).
async fn release(client: &Client, key: i64) {
    if let Err(e) = client
        .query_one("SELECT pg_catalog.pg_advisory_unlock($1)", &[&key])
        .await
    {
        tracing::debug!(error = %e, key, "could not release an advisory lock; it goes with the session");
    }
}

fn report_wait(holders: &[Holder], waited: Duration, limit: Duration) {
    let waited = format!("{}s", waited.as_secs());
    for h in holders {
        let (pid, user, app) = (h.pid, h.user.as_deref(), h.application_name.as_deref());
        if h.migrate_squat() {
            tracing::warn!(lock = "migrate", pid, user, application_name = app, %waited, ?limit,
                "advisory lock squatter: a session that is not a delta-bridge migration holds the migration lock; waiting for it");
        } else {
            tracing::info!(lock = "migrate", pid, user, application_name = app, %waited, ?limit,
                "another replica is migrating the database; waiting for the migration lock");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_identifiers() {
        assert_eq!(super::quote_ident("public"), "\"public\"");
        assert_eq!(super::quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(super::quote_ident_in_literal("o'brien"), "\"o''brien\"");
    }

    #[test]
    fn a_newer_schema_is_refused_naming_both_versions() {
        assert!(super::newer_than_known(None).is_ok());
        assert!(super::newer_than_known(Some(super::known_version())).is_ok());
        assert!(super::older_than_known(Some(super::known_version())).is_ok());
        assert!(super::older_than_known(None).is_ok());
        let old = super::older_than_known(Some(super::known_version() - 1)).expect_err("older");
        assert!(old.to_string().contains("delta-bridge migrate"), "{old}");
        assert!(!old.is_transient());
        let e = super::newer_than_known(Some(99)).expect_err("newer");
        let text = e.to_string();
        let known = format!("up to {}", super::known_version());
        assert!(text.contains("migration 99") && text.contains(&known), "{text}");
        assert!(!e.is_transient());
    }
}
