//! Installs and upgrades the bridge's database objects: versioned SQL files under `sql/`, each applied once,
//! in one transaction, under an advisory lock so that replicas starting together do not race. Never drops or
//! rewrites business data; the only change to a business table is the capture triggers (and an index on
//! `transaction_items(transaction_id)` if none exists).

use std::time::{Duration, Instant};

use tokio_postgres::Client;

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
];

/// The business tables the capture triggers attach to.
pub(crate) const BUSINESS_TABLES: [&str; 6] = [
    "merchants",
    "branches",
    "products",
    "inventory",
    "transactions",
    "transaction_items",
];

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("table {schema}.{table} does not exist: delta-bridge attaches to the reference schema (sql/reference_schema.sql)")]
    MissingTable { schema: String, table: String },
    /// Another session held the migration lock for longer than `postgres.migrate_lock_timeout`.
    #[error("gave up after waiting {waited:?} (postgres.migrate_lock_timeout) for the migration lock (advisory lock {MIGRATE_LOCK}), held by {holders}: a migration of another replica that takes this long, or a session that squats the bridge's lock (end it, e.g. SELECT pg_terminate_backend(<pid>), or raise the limit)")]
    LockTimeout { waited: Duration, holders: String },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl MigrateError {
    /// A database that cannot be reached or answered with an error may work on the next attempt; a missing
    /// business table, a migration that failed or a migration lock held past the limit will not (the last is
    /// final so that `run` exits, naming the holder, instead of waiting forever).
    pub fn is_transient(&self) -> bool {
        matches!(self, MigrateError::Pg(_))
    }
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Pg(PgError::Query(e))
    }
}

/// Quotes an identifier for SQL text.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted identifier as it goes inside a string literal (`'"my""schema".products'::regclass`).
fn quote_ident_in_literal(s: &str) -> String {
    quote_ident(s).replace('\'', "''")
}

/// Applies every migration not yet applied. Returns the versions applied now (empty when up to date).
///
/// Waits at most `lock_timeout` for the migration lock. While another session holds it, `waiting` is called
/// with the holders at every try (every 250 ms) and they are logged (pid, user, application_name); with an
/// empty slice once the lock is taken.
pub(crate) async fn migrate(
    client: &mut Client,
    schema: &str,
    lock_timeout: Duration,
    waiting: &mut (dyn FnMut(&[Holder]) + Send),
) -> Result<Vec<i32>, MigrateError> {
    let tx = client.transaction().await?;
    // Names in the migrations resolve in pg_catalog (and the schemas they name): an operator or function that
    // someone created in public cannot bind into a trigger's WHEN clause, a default or an index.
    tx.batch_execute("SET LOCAL search_path = pg_catalog, pg_temp").await?;
    let started = Instant::now();
    let mut reported: Option<(Vec<Holder>, Instant)> = None;
    loop {
        let taken: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await?
            .try_get(0)?;
        if taken {
            break;
        }
        let holders = locks::holders(&tx, MIGRATE_LOCK).await?;
        waiting(&holders);
        let waited = started.elapsed();
        if waited >= lock_timeout {
            waiting(&[]);
            let list: Vec<String> = holders.iter().map(Holder::to_string).collect();
            return Err(MigrateError::LockTimeout {
                waited: lock_timeout,
                holders: if list.is_empty() {
                    "a session that has just let go of it".to_string()
                } else {
                    list.join(", ")
                },
            });
        }
        if reported
            .as_ref()
            .is_none_or(|(seen, at)| *seen != holders || at.elapsed() >= LOCK_REPORT_EVERY)
        {
            report_wait(&holders, waited, lock_timeout);
            reported = Some((holders, Instant::now()));
        }
        tokio::time::sleep(LOCK_POLL.min(lock_timeout - waited)).await;
    }
    waiting(&[]);
    for table in BUSINESS_TABLES {
        let found: bool = tx
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
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS delta_bridge;
         CREATE TABLE IF NOT EXISTS delta_bridge.schema_migrations (
             version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM delta_bridge.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut now = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let sql = sql
            .replace("@schema_literal@", &quote_ident_in_literal(schema))
            .replace("@schema@", &quote_ident(schema));
        tx.batch_execute(&sql).await.map_err(|source| MigrateError::Failed {
            version: *version,
            name,
            source,
        })?;
        tx.execute(
            "INSERT INTO delta_bridge.schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        now.push(*version);
    }
    tx.commit().await?;
    Ok(now)
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
}
