//! Who holds the bridge's advisory locks, read from PostgreSQL itself (`pg_locks` joined with
//! `pg_stat_activity`).
//!
//! Any login can take an advisory lock, so a session of some other program (a psql session, a job that happens
//! to use the same key) can hold the migration lock. A squatter is a session that holds a lock the bridge needs
//! and is not a bridge doing its job: for the migration lock, anything but another bridge's migration.
//! Plumbing: imports only `pg`.

use std::fmt;

use tokio_postgres::GenericClient;

use crate::pg::{timed, PgError};

/// The application_name of the session that applies migrations (`migrate`, and `run` before it starts).
pub(crate) const MIGRATE_APP: &str = "delta-bridge-migrate";

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

impl Holder {
    /// For a holder of the migration lock: is it something other than another bridge's migration?
    pub(crate) fn migrate_squat(&self) -> bool {
        self.application_name.as_deref() != Some(MIGRATE_APP)
    }
}

/// The holders of the advisory lock `key` in this database (other than this session).
const HOLDERS: &str = "
SELECT l.pid, a.usename::text, a.application_name, NULL::float8
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
   AND l.pid IS DISTINCT FROM pg_backend_pid()
 ORDER BY l.pid";

fn holder(row: &tokio_postgres::Row) -> Holder {
    Holder {
        pid: row.get(0),
        user: row.get(1),
        application_name: row.get(2),
        heartbeat_age: row.get(3),
    }
}

/// Who holds the advisory lock `key` (no heartbeat).
pub(crate) async fn holders<C: GenericClient>(client: &C, key: i64) -> Result<Vec<Holder>, PgError> {
    Ok(timed(client.query(HOLDERS, &[&key]))
        .await?
        .iter()
        .map(holder)
        .collect())
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
    fn only_another_bridge_migration_may_hold_the_migration_lock() {
        assert!(!holder(MIGRATE_APP, None).migrate_squat());
        assert!(holder("delta-bridge", None).migrate_squat());
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
