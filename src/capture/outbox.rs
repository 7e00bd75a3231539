//! Queries on the outbox and the dead-letter table. Every function is one statement, bounded by
//! [`crate::pg::QUERY_TIMEOUT`]; the pipeline decides what to read when.

use tokio_postgres::{Client, Row, Statement};

use crate::convert::Captured;
use crate::pg::{timed, PgError};

const COLUMNS: &str =
    "id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx";

/// Session-level advisory lock held by the publishing replica.
pub const LEADER_LOCK: i64 = 7_234_298_723_002;
/// Held exclusively by the leader while it idles: writers then NOTIFY (see sql/001_capture.sql).
pub(crate) const WAKE_LOCK: i64 = 7_234_298_723_001;
/// The NOTIFY channel writers use to wake the leader.
pub(crate) const WAKE_CHANNEL: &str = "delta_bridge_wake";

fn captured(row: &Row) -> Captured {
    Captured {
        id: row.get(0),
        captured_at: row.get(1),
        kind: row.get(2),
        op: row.get(3),
        merchant_code: row.get(4),
        branch_code: row.get(5),
        product_name: row.get(6),
        old_row: row.get(7),
        new_row: row.get(8),
        items: row.get(9),
        ctx: row.get(10),
    }
}

/// The statements the leader runs on every loop, prepared once per session so that each is a single round
/// trip, and so that several can be pipelined on the session (the wake-lock and the fetch behind it).
pub(crate) struct Statements {
    fetch_after: Statement,
    fetch_ids: Statement,
    delete: Statement,
    try_lock: Statement,
    unlock: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Statements, PgError> {
        Ok(Statements {
            fetch_after: timed(client.prepare(&format!(
                "SELECT {COLUMNS} FROM delta_bridge.outbox WHERE id > $1 ORDER BY id LIMIT $2"
            )))
            .await?,
            fetch_ids: timed(client.prepare(&format!(
                "SELECT {COLUMNS} FROM delta_bridge.outbox WHERE id = ANY($1) ORDER BY id"
            )))
            .await?,
            delete: timed(client.prepare("DELETE FROM delta_bridge.outbox WHERE id = ANY($1)")).await?,
            try_lock: timed(client.prepare("SELECT pg_try_advisory_lock($1)")).await?,
            unlock: timed(client.prepare("SELECT pg_advisory_unlock($1)")).await?,
        })
    }

    /// Rows with id > `after`, in id order.
    pub(crate) async fn fetch_after(&self, client: &Client, after: i64, limit: i64) -> Result<Vec<Captured>, PgError> {
        Ok(timed(client.query(&self.fetch_after, &[&after, &limit]))
            .await?
            .iter()
            .map(captured)
            .collect())
    }

    /// Rows with id in `ids` (gaps that may have committed late), in id order.
    pub(crate) async fn fetch_ids(&self, client: &Client, ids: &[i64]) -> Result<Vec<Captured>, PgError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(timed(client.query(&self.fetch_ids, &[&ids]))
            .await?
            .iter()
            .map(captured)
            .collect())
    }

    /// Deletes delivered (or deliberately skipped) rows.
    pub(crate) async fn delete(&self, client: &Client, ids: &[i64]) -> Result<u64, PgError> {
        timed(client.execute(&self.delete, &[&ids])).await
    }

    pub(crate) async fn try_lock(&self, client: &Client, key: i64) -> Result<bool, PgError> {
        Ok(timed(client.query_one(&self.try_lock, &[&key])).await?.get(0))
    }

    pub(crate) async fn unlock(&self, client: &Client, key: i64) -> Result<bool, PgError> {
        Ok(timed(client.query_one(&self.unlock, &[&key])).await?.get(0))
    }
}

/// Ids in (after, upto], in id order: the sweep for anything the cursor passed by.
pub(crate) async fn ids_between(client: &Client, after: i64, upto: i64, limit: i64) -> Result<Vec<i64>, PgError> {
    let rows = timed(client.query(
        "SELECT id FROM delta_bridge.outbox WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
        &[&after, &upto, &limit],
    ))
    .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Moves one row to the dead-letter table with the reason and detail an operator will read.
pub(crate) async fn dead_letter(client: &Client, id: i64, reason: &str, detail: &str) -> Result<u64, PgError> {
    timed(client.execute(
        "WITH moved AS (DELETE FROM delta_bridge.outbox WHERE id = $1 RETURNING *)
         INSERT INTO delta_bridge.dead_letter (id, captured_at, kind, op, merchant_code, branch_code, product_name,
                                               old_row, new_row, items, ctx, reason, detail)
         SELECT id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx,
                $2, $3
           FROM moved
         ON CONFLICT (id) DO UPDATE SET failed_at = now(), reason = EXCLUDED.reason, detail = EXCLUDED.detail",
        &[&id, &reason, &detail],
    ))
    .await
}

/// Rows waiting in the outbox (captured, not yet acknowledged).
pub(crate) async fn backlog(client: &Client) -> Result<i64, PgError> {
    Ok(timed(client.query_one("SELECT count(*) FROM delta_bridge.outbox", &[]))
        .await?
        .get(0))
}

pub(crate) async fn install_id(client: &Client) -> Result<String, PgError> {
    Ok(timed(client.query_one("SELECT install_id FROM delta_bridge.meta", &[]))
        .await?
        .get(0))
}
