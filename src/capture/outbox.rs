//! Queries on the outbox and the dead-letter table. Every function is one statement, bounded by
//! [`crate::pg::QUERY_TIMEOUT`]; the pipeline decides what to read when.

use tokio_postgres::{Client, Row, Statement};

use crate::convert::Captured;
use crate::pg::{timed, PgError};

const COLUMNS: &str =
    "id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx";
const COLUMN_COUNT: usize = 11;

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

/// What a read knew of the transactions around it (64-bit transaction ids): in its snapshot, every
/// transaction below `xmin` had ended; and no transaction had been given an id at or above `next_xid` when
/// it ran (PostgreSQL's next transaction id, read after the snapshot was taken). The snapshot's own `xmax`
/// would not do for the latter: it is the latest *completed* id + 1, and a younger transaction may be
/// running above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) xmin: i64,
    pub(crate) next_xid: i64,
}

/// The statements the leader runs on every loop, prepared once per session so that each is a single round
/// trip, and so that several can be pipelined on the session (the wake-lock and the fetch behind it).
pub(crate) struct Statements {
    fetch_next: Statement,
    fetch_ids: Statement,
    delete: Statement,
    try_lock: Statement,
    unlock: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Statements, PgError> {
        Ok(Statements {
            // One statement, so one snapshot: the open gaps and the rows after the cursor, in id order, with
            // the snapshot's xmin and the next transaction id last (NULL row columns when nothing matched).
            // `age(xid)` is the next transaction id minus xid (for a statement that has no id of its own).
            fetch_next: timed(client.prepare(&format!(
                "WITH x AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
                      s AS (SELECT xmin::text::bigint AS xmin,
                                   xmin::text::bigint + age(xid(xmin)) AS next_xid FROM x),
                      r AS ((SELECT {COLUMNS} FROM delta_bridge.outbox WHERE id = ANY($2))
                            UNION ALL
                            (SELECT {COLUMNS} FROM delta_bridge.outbox WHERE id > $1 ORDER BY id LIMIT $3))
                 SELECT r.*, s.xmin, s.next_xid FROM s LEFT JOIN r ON true ORDER BY r.id"
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

    /// In one snapshot: the rows of `gaps` that are there, and up to `limit` rows with id > `after`, all in
    /// id order; and the snapshot they were read in.
    pub(crate) async fn fetch_next(
        &self,
        client: &Client,
        after: i64,
        gaps: &[i64],
        limit: i64,
    ) -> Result<(Vec<Captured>, Snapshot), PgError> {
        let rows = timed(client.query(&self.fetch_next, &[&after, &gaps, &limit])).await?;
        let snapshot_at = COLUMN_COUNT;
        let snap = match rows.first() {
            Some(r) => Snapshot {
                xmin: r.try_get(snapshot_at)?,
                next_xid: r.try_get(snapshot_at + 1)?,
            },
            None => return Err(PgError::Protocol("the outbox read returned no snapshot row".into())),
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            if r.try_get::<_, Option<i64>>(0)?.is_some() {
                out.push(captured(r));
            }
        }
        Ok((out, snap))
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
