//! Statements that lock tables writers use, each bounded so that writers never queue behind it for long.
//!
//! A statement that waits for a table lock holds up everyone who asks for a conflicting lock after it: a
//! `CREATE TRIGGER` waiting behind one long transaction on `products` stops every till's update of
//! `products` until that transaction ends. So the migration session runs with a short `lock_timeout`
//! (`postgres.ddl_lock_timeout`): a step that does not get its lock within it gives up, its transaction rolls
//! back and releases whatever it held, the writers queued behind it go on, and the step is tried again after
//! a pause (growing from the lock timeout up to ten times it, at least 10 s), until `postgres.ddl_deadline`
//! has passed since the migration began; then it fails naming the table and the sessions that held it. A
//! writer statement therefore waits at most about one lock timeout for a migration step, however long the
//! lock it wanted is held by someone else.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::locks::{self, Holder};
use crate::pg::PgError;

/// The bounds of a migration (or an uninstall): how long it waits for the migration lock, how long each
/// statement may wait for a table lock, and how long it keeps trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `postgres.migrate_lock_timeout`.
    pub(crate) migrate_lock: Duration,
    /// `postgres.ddl_lock_timeout`.
    pub(crate) ddl_lock: Duration,
    /// `postgres.ddl_deadline`.
    pub(crate) ddl_deadline: Duration,
}

/// What a step runs.
pub(super) enum Body {
    /// Statements in one transaction.
    Tx(String),
    /// `CREATE INDEX CONCURRENTLY` (no transaction: it does not block writers, it waits for them), after
    /// dropping, also concurrently, an INVALID index of that name that a failed build left behind.
    Index {
        /// The index's quoted, qualified name.
        index: String,
        create: String,
    },
}

/// One step: a transaction (or a concurrent index build) that touches at most one business table.
pub(super) struct Step {
    /// What it does, for logs and errors ("capture triggers on public.products").
    pub(super) what: String,
    /// The tables it locks, as named in errors.
    pub(super) tables: Vec<String>,
    /// Relations (qualified, quoted) on which any lock holds the step up, and on which a writer's lock does.
    pub(super) all: Vec<String>,
    pub(super) writes: Vec<String>,
    pub(super) body: Body,
}

/// Why a step did not complete.
#[derive(Debug)]
pub(super) enum StepError {
    /// Its lock was not granted within the lock timeout, again and again until the deadline.
    Busy {
        waited: Duration,
        tries: u32,
        holders: Vec<Holder>,
    },
    Sql(tokio_postgres::Error),
    Pg(PgError),
}

impl From<tokio_postgres::Error> for StepError {
    fn from(e: tokio_postgres::Error) -> Self {
        StepError::Sql(e)
    }
}

impl From<PgError> for StepError {
    fn from(e: PgError) -> Self {
        StepError::Pg(e)
    }
}

/// Runs steps on one session, within one deadline.
pub(super) struct Runner {
    limits: Limits,
    started: Instant,
}

impl Runner {
    /// Sets the session's `lock_timeout` (every statement of the migration, in a transaction or not, is
    /// bounded by it) and starts the deadline.
    pub(super) async fn start(client: &Client, limits: Limits) -> Result<Runner, PgError> {
        let ms = limits.ddl_lock.as_millis().max(1);
        client.batch_execute(&format!("SET lock_timeout = '{ms}ms'")).await?;
        Ok(Runner {
            limits,
            started: Instant::now(),
        })
    }

    /// Runs `step`, again after each lock timeout (or deadlock) until the deadline.
    pub(super) async fn run(&self, client: &mut Client, step: &Step) -> Result<(), StepError> {
        let until = self.started + self.limits.ddl_deadline;
        let mut pause = Backoff::between(
            self.limits.ddl_lock,
            (self.limits.ddl_lock * 10).max(Duration::from_secs(10)),
        );
        let mut tries = 0u32;
        loop {
            tries += 1;
            let attempt = Instant::now();
            let failed = match attempt_step(client, step).await {
                Ok(true) => return Ok(()),
                Ok(false) => None,
                Err(e) if is_lock_contention(&e) => Some(e),
                Err(e) => return Err(e.into()),
            };
            let holders = locks::table_blockers(
                client,
                &step.all,
                &step.writes,
                attempt.elapsed(),
                matches!(step.body, Body::Index { .. }),
            )
            .await?;
            let wait = pause.next_delay();
            if Instant::now() + wait > until {
                return Err(StepError::Busy {
                    waited: self.started.elapsed(),
                    tries,
                    holders,
                });
            }
            let list: Vec<String> = holders.iter().map(Holder::to_string).collect();
            tracing::warn!(
                step = %step.what,
                tables = %step.tables.join(", "),
                held_by = %if list.is_empty() { "(gone)".to_string() } else { list.join(", ") },
                tries,
                retry_in = ?wait,
                error = %failed.map_or_else(|| "index still invalid".to_string(), |e| reason(&e)),
                "could not lock the table within postgres.ddl_lock_timeout; gave way to the writers and will try again"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// One try. Ok(false): done nothing final, try again (an index build that left its index invalid).
async fn attempt_step(client: &mut Client, step: &Step) -> Result<bool, tokio_postgres::Error> {
    match &step.body {
        Body::Tx(sql) => {
            // Dropped without commit on an error: rolled back, its locks released.
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await?;
            tx.commit().await?;
            Ok(true)
        }
        Body::Index { index, create } => {
            if index_valid(client, index).await? == Some(false) {
                tracing::warn!(index = %index, "dropping the invalid index a failed concurrent build left, to build it again");
                client
                    .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
                    .await?;
            }
            client.batch_execute(create).await?;
            // Some(true): built. None: the name is taken by a relation that is no index, as before this
            // runner (IF NOT EXISTS) -- nothing to build.
            Ok(index_valid(client, index).await? != Some(false))
        }
    }
}

/// Whether the index exists and is valid (None: no index of that name).
pub(super) async fn index_valid(client: &Client, index: &str) -> Result<Option<bool>, tokio_postgres::Error> {
    client
        .query_opt(
            "SELECT indisvalid FROM pg_catalog.pg_index WHERE indexrelid = pg_catalog.to_regclass($1)::oid",
            &[&index],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()
}

/// The server's message ("canceling statement due to lock timeout"), not tokio-postgres's bare "db error".
fn reason(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// Lock timeout (55P03), or chosen as a deadlock's victim: the table is busy, try later.
fn is_lock_contention(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}
