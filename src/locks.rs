//! Who holds the bridge's advisory locks, read from PostgreSQL itself (`pg_locks` joined with
//! `pg_stat_activity`), and the leader's heartbeat that tells a publishing leader replica from a squatter; and
//! who held up a migration's statement on a table (the sessions it names when it gives up).
//!
//! Any login can take an advisory lock, so a session of some other program (a psql session, a job that happens
//! to use the same key) can hold the leader lock or the migration lock. A squatter is a session that holds a
//! lock the bridge needs and is not a bridge replica doing its job: for the leader lock, anything but the
//! replica whose heartbeat row (`delta_bridge.leader`, written by the leader every [`HEARTBEAT_EVERY`]) names its
//! backend and is fresh; for the migration lock, anything but another bridge's migration. Plumbing: imports
//! only `pg`.

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

use crate::pg::{timed, PgError};

/// The application_name of a replica's data-path session (the leader's, and each standby's).
pub(crate) const REPLICA_APP: &str = "delta-bridge";
/// The application_name of the session that applies migrations (`migrate`, and `run` before it starts).
pub(crate) const MIGRATE_APP: &str = "delta-bridge-migrate";
/// The application_name of `delta-bridge uninstall`'s session (it holds the migration lock too).
pub(crate) const UNINSTALL_APP: &str = "delta-bridge-uninstall";

/// How often the leader writes its heartbeat.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A leader replica whose heartbeat is older than this holds the lock without publishing (hung, stopped).
pub(crate) const HEARTBEAT_STALE: Duration = Duration::from_secs(6);

/// One session holding an advisory lock.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Holder {
    /// The backend's pid (None for a prepared transaction, which has no session).
    pub pid: Option<i32>,
    /// `pg_stat_activity.usename`.
    pub user: Option<String>,
    pub application_name: Option<String>,
    /// Leader lock only: seconds since this backend last wrote the leader's heartbeat (None: it never did, or
    /// another backend wrote the last one).
    pub heartbeat_age: Option<f64>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => write!(f, "a prepared transaction")?,
        }
        write!(
            f,
            " (user {:?}, application_name {:?})",
            self.user.as_deref().unwrap_or("?"),
            self.application_name.as_deref().unwrap_or("?")
        )
    }
}

/// Why a holder of the leader lock is a squatter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Squat {
    /// Not a bridge replica (by its application_name).
    Foreign,
    /// Calls itself a replica but is not the one that heartbeats as the leader. A replica that has just taken
    /// the lock looks like this until its first heartbeat, a moment later: report it only if it lasts. (So
    /// does the leader of an earlier version, which writes no heartbeat, during a rolling update from it.)
    NoHeartbeat,
    /// The leader replica, but it has not heartbeated for this many seconds: hung or stopped.
    Stale(f64),
}

impl fmt::Display for Squat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Squat::Foreign => write!(f, "not a delta-bridge replica"),
            Squat::NoHeartbeat => write!(
                f,
                "calls itself {REPLICA_APP} but is not the replica that heartbeats as the leader"
            ),
            Squat::Stale(age) => write!(
                f,
                "a delta-bridge leader whose last heartbeat is {age:.0} s old: it holds the lock without publishing"
            ),
        }
    }
}

impl Holder {
    /// For a holder of the leader lock: why it is a squatter, or None for a live leader replica.
    /// `heartbeats`: the heartbeat table exists (in a database not migrated by this version a replica cannot
    /// be told from a squatter by its heartbeat, and is trusted by its name).
    pub(crate) fn leader_squat(&self, heartbeats: bool) -> Option<Squat> {
        if self.application_name.as_deref() != Some(REPLICA_APP) {
            return Some(Squat::Foreign);
        }
        match self.heartbeat_age {
            Some(age) if age > HEARTBEAT_STALE.as_secs_f64() => Some(Squat::Stale(age)),
            Some(_) => None,
            None if heartbeats => Some(Squat::NoHeartbeat),
            None => None,
        }
    }

    /// For a holder of the migration lock: is it something other than another bridge's migration (or
    /// uninstall)?
    pub(crate) fn migrate_squat(&self) -> bool {
        !matches!(self.application_name.as_deref(), Some(MIGRATE_APP | UNINSTALL_APP))
    }
}

/// The holders of the advisory lock `key` in this database (other than this session), with the leader's
/// heartbeat joined in when `heartbeat` (the leader lock). Bounded by [`crate::pg::QUERY_TIMEOUT`].
const HOLDERS: &str = "
SELECT l.pid, a.usename::text, a.application_name, NULL::float8
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
   AND l.pid IS DISTINCT FROM pg_backend_pid()
 ORDER BY l.pid";

const HOLDERS_WITH_HEARTBEAT: &str = "
SELECT l.pid, a.usename::text, a.application_name,
       extract(epoch FROM clock_timestamp() - h.heartbeat_at)::float8
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
  LEFT JOIN delta_bridge.leader h ON h.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
   AND l.pid IS DISTINCT FROM pg_backend_pid()
 ORDER BY l.pid";

/// One row of [`HOLDERS`] or [`HOLDERS_WITH_HEARTBEAT`]: a column of an unexpected type (a catalog changed by
/// a PostgreSQL version) is an error of the query, never a panic.
fn holder(row: &tokio_postgres::Row) -> Result<Holder, PgError> {
    Ok(Holder {
        pid: row.try_get(0)?,
        user: row.try_get(1)?,
        application_name: row.try_get(2)?,
        heartbeat_age: row.try_get(3)?,
    })
}

/// Who holds the advisory lock `key` (no heartbeat).
pub(crate) async fn holders<C: GenericClient>(client: &C, key: i64) -> Result<Vec<Holder>, PgError> {
    timed(client.query(HOLDERS, &[&key]))
        .await?
        .iter()
        .map(holder)
        .collect()
}

/// Who holds the leader lock `key`, each with the age of its heartbeat; and whether there are heartbeats
/// (false when the table does not exist: a database not migrated by this version, `run --no-migrate`).
pub(crate) async fn leader_holders(client: &Client, key: i64) -> Result<(Vec<Holder>, bool), PgError> {
    match timed(client.query(HOLDERS_WITH_HEARTBEAT, &[&key])).await {
        Ok(rows) => Ok((rows.iter().map(holder).collect::<Result<_, _>>()?, true)),
        Err(e) if undefined_table(&e) => Ok((holders(client, key).await?, false)),
        Err(e) => Err(e),
    }
}

/// One heartbeat as written: by which backend, as which replica, and when (the database's clock, to the
/// microsecond). Every beat writes a new time into the one row, so a row still equal to the last beat a
/// replica wrote shows that no one has beaten since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Beat {
    pub pid: i32,
    pub replica: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

fn beat(row: &tokio_postgres::Row) -> Result<Beat, PgError> {
    Ok(Beat {
        pid: row.try_get(0)?,
        replica: row.try_get(1)?,
        at: row.try_get(2)?,
    })
}

/// The leader's heartbeat: this backend leads, as `replica`, now. Returns the beat as written, or None when
/// the table does not exist (the database was not migrated by this version; `run --no-migrate`): the leader
/// then publishes without.
pub(crate) async fn heartbeat(client: &Client, replica: &str) -> Result<Option<Beat>, PgError> {
    let r = timed(client.query_one(
        "INSERT INTO delta_bridge.leader AS l (singleton, pid, replica, since, heartbeat_at)
         VALUES (true, pg_backend_pid(), $1, clock_timestamp(), clock_timestamp())
         ON CONFLICT (singleton) DO UPDATE
            SET pid = EXCLUDED.pid, replica = EXCLUDED.replica, heartbeat_at = EXCLUDED.heartbeat_at,
                since = CASE WHEN l.pid = EXCLUDED.pid THEN l.since ELSE EXCLUDED.since END
         RETURNING l.pid, l.replica, l.heartbeat_at",
        &[&replica],
    ))
    .await;
    match r {
        Ok(row) => Ok(Some(beat(&row)?)),
        Err(e) if undefined_table(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The last heartbeat written by any replica: None when there is none, or no table.
pub(crate) async fn last_beat(client: &Client) -> Result<Option<Beat>, PgError> {
    let r = timed(client.query_opt(
        "SELECT pid, replica, heartbeat_at FROM delta_bridge.leader WHERE singleton",
        &[],
    ))
    .await;
    match r {
        Ok(row) => row.as_ref().map(beat).transpose(),
        Err(e) if undefined_table(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sessions (other than this one) holding a lock on one of `all` (any mode), or a lock that keeps writers
/// out on one of `writes` (any mode but ACCESS SHARE and ROW SHARE), in a transaction that began at least
/// `for_secs` ago: after a statement gave up waiting `for_secs` for its lock, these are who it waited for (a
/// lock granted while it waited was granted to a transaction that began before it, or it would have queued
/// behind the statement). Names that are no relation are ignored. A prepared transaction has no session.
const TABLE_BLOCKERS: &str = "
SELECT DISTINCT l.pid, a.usename::text, a.application_name, NULL::float8
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'relation' AND l.granted
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND l.pid IS DISTINCT FROM pg_backend_pid()
   AND (a.xact_start IS NULL OR a.xact_start <= clock_timestamp() - make_interval(secs => $3))
   AND (l.relation IN (SELECT pg_catalog.to_regclass(x)::oid FROM unnest($1::text[]) x)
        OR (l.relation IN (SELECT pg_catalog.to_regclass(x)::oid FROM unnest($2::text[]) x)
            AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')))
 ORDER BY l.pid";

/// Sessions of this database (other than this one) in a transaction that began at least `$1` seconds ago:
/// what `CREATE INDEX CONCURRENTLY` waits for besides the table's writers (transactions with older snapshots).
const OLDER_TRANSACTIONS: &str = "
SELECT a.pid, a.usename::text, a.application_name, NULL::float8
  FROM pg_catalog.pg_stat_activity a
 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
   AND a.xact_start <= clock_timestamp() - make_interval(secs => $1)
 ORDER BY a.pid";

/// Who held up a statement that waited `waited` for a lock on the relations `all` (any lock conflicts) or
/// `writes` (a writer's lock conflicts); see [`TABLE_BLOCKERS`]. With `older_transactions`, when no lock holder
/// is found, the sessions in transactions older than the wait (see [`OLDER_TRANSACTIONS`]).
pub(crate) async fn table_blockers(
    client: &Client,
    all: &[String],
    writes: &[String],
    waited: Duration,
    older_transactions: bool,
) -> Result<Vec<Holder>, PgError> {
    let secs = waited.as_secs_f64();
    let rows = timed(client.query(TABLE_BLOCKERS, &[&all, &writes, &secs])).await?;
    let found: Vec<Holder> = rows.iter().map(holder).collect::<Result<_, _>>()?;
    if !found.is_empty() || !older_transactions {
        return Ok(found);
    }
    timed(client.query(OLDER_TRANSACTIONS, &[&secs]))
        .await?
        .iter()
        .map(holder)
        .collect()
}

fn undefined_table(e: &PgError) -> bool {
    matches!(e, PgError::Query(q) if q.code() == Some(&SqlState::UNDEFINED_TABLE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(app: &str, age: Option<f64>) -> Holder {
        Holder {
            pid: Some(42),
            user: Some("bridge".into()),
            application_name: Some(app.into()),
            heartbeat_age: age,
        }
    }

    #[test]
    fn a_leader_replica_with_a_fresh_heartbeat_is_no_squatter() {
        assert_eq!(holder(REPLICA_APP, Some(0.5)).leader_squat(true), None);
        assert_eq!(holder(REPLICA_APP, Some(5.9)).leader_squat(true), None);
    }

    #[test]
    fn anything_else_holding_the_leader_lock_is_a_squatter() {
        assert_eq!(holder("psql", Some(0.1)).leader_squat(true), Some(Squat::Foreign));
        assert_eq!(holder("psql", None).leader_squat(false), Some(Squat::Foreign));
        assert_eq!(
            Holder {
                application_name: None,
                ..holder("", None)
            }
            .leader_squat(true),
            Some(Squat::Foreign)
        );
        assert_eq!(holder(REPLICA_APP, None).leader_squat(true), Some(Squat::NoHeartbeat));
        assert_eq!(
            holder(REPLICA_APP, Some(6.5)).leader_squat(true),
            Some(Squat::Stale(6.5))
        );
    }

    #[test]
    fn without_the_heartbeat_table_a_replica_is_trusted_by_its_name() {
        assert_eq!(holder(REPLICA_APP, None).leader_squat(false), None);
    }

    #[test]
    fn only_another_bridge_migration_may_hold_the_migration_lock() {
        assert!(!holder(MIGRATE_APP, None).migrate_squat());
        assert!(!holder(UNINSTALL_APP, None).migrate_squat());
        assert!(holder(REPLICA_APP, None).migrate_squat());
        assert!(holder("psql", None).migrate_squat());
    }

    #[test]
    fn a_holder_prints_its_pid_user_and_application_name() {
        assert_eq!(
            holder("psql", None).to_string(),
            "pid 42 (user \"bridge\", application_name \"psql\")"
        );
    }
}
