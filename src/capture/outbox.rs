//! Queries on the outbox and the dead-letter table. Every function is one statement, bounded by
//! [`crate::pg::QUERY_TIMEOUT`]; the pipeline decides what to read when.

use std::collections::HashMap;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, Row, Statement};

use super::change_log;
use crate::convert::{Captured, ConvertError};
use crate::pg::{timed, PgError};

/// The per-transaction notes of capture (sql/008_delete_events.sql, sql/010_capture_fixes.sql): each is
/// removed by the transaction that wrote it, so any row of a transaction that has ended (below the oldest
/// running one) is a leftover of a path that missed it, e.g. a writer that made one capture trigger immediate.
/// They would only grow the tables: removed here, one statement.
const SWEEP_NOTES: &str = "WITH h AS (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()) AS x),
      a AS (DELETE FROM delta_bridge.row_born  WHERE xact < (SELECT x FROM h) RETURNING 1),
      b AS (DELETE FROM delta_bridge.row_gone  WHERE xact < (SELECT x FROM h) RETURNING 1),
      c AS (DELETE FROM delta_bridge.sale_gone WHERE xact < (SELECT x FROM h) RETURNING 1)
    SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b) + (SELECT count(*) FROM c)";

/// Removes the capture notes of ended transactions; returns how many there were (normally none).
pub(crate) async fn sweep_notes(client: &Client) -> Result<i64, PgError> {
    Ok(timed(client.query_one(SWEEP_NOTES, &[])).await?.try_get(0)?)
}

const COLUMNS: &str =
    "id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx, branch_seq";
const COLUMN_COUNT: usize = 12;

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

/// The rows one read selects: of the open gaps that are there and the rows after the cursor `$1`, the `$3`
/// lowest ids, in id order, with the snapshot's xmin and the next transaction id as the last two columns (NULL
/// row columns when nothing matched). One statement, so one snapshot (see the pipeline's tracker for why that
/// matters). A read cut at `$3` rows returns every such row below its last one: the rows it leaves are all
/// above what it returns, and gaps it leaves stay gaps for the next read. `age(xid)` is the next transaction
/// id minus xid, for a statement without an id of its own.
fn next_rows(columns: &str) -> String {
    format!(
        "WITH x AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
              s AS (SELECT xmin::text::bigint AS xmin, xmin::text::bigint + age(xid(xmin)) AS next_xid FROM x),
              r AS (SELECT * FROM ((SELECT {columns} FROM delta_bridge.outbox WHERE id = ANY($2) ORDER BY id LIMIT $3)
                                   UNION ALL
                                   (SELECT {columns} FROM delta_bridge.outbox WHERE id > $1 ORDER BY id LIMIT $3)) u
                     ORDER BY id LIMIT $3)
         SELECT r.*, s.xmin, s.next_xid FROM s LEFT JOIN r ON true ORDER BY r.id"
    )
}

fn snapshot_of(rows: &[Row], at: usize) -> Result<Snapshot, PgError> {
    match rows.first() {
        Some(r) => Ok(Snapshot {
            xmin: r.try_get(at)?,
            next_xid: r.try_get(at + 1)?,
        }),
        None => Err(PgError::Protocol("the outbox read returned no snapshot row".into())),
    }
}

/// Session-level advisory lock held by the publishing replica.
pub const LEADER_LOCK: i64 = 7_234_298_723_002;
/// Held exclusively by the leader while it idles: writers then NOTIFY (see sql/001_capture.sql).
pub(crate) const WAKE_LOCK: i64 = 7_234_298_723_001;
/// The NOTIFY channel writers use to wake the leader.
pub(crate) const WAKE_CHANNEL: &str = "delta_bridge_wake";

/// What the bridge reads without trouble; said in every [`Undecodable`] detail, since the value itself
/// may be any column of any type in a business table (capture copies whole rows).
const READABLE: &str = "the bridge reads JSON nested at most 128 levels deep, numbers within the range of a \
                        64-bit float, and text in UTF-8 without unpaired surrogate escapes (\\ud800-\\udfff)";

/// An outbox row whose id was read but whose content was not: a value nested too deep, a number beyond f64,
/// text that is not UTF-8 (or that PostgreSQL cannot send as UTF-8). The pipeline dead-letters it like a
/// row that cannot be converted; the dead-letter function copies the row server-side, so nothing more of it
/// needs reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read column {column} of the captured row: {cause} ({READABLE})")]
pub(crate) struct Undecodable {
    pub id: i64,
    /// The outbox column (`new_row`, `branch_code`, ...).
    pub column: String,
    /// The decoder's (or PostgreSQL's) reason.
    pub cause: String,
}

impl From<Undecodable> for ConvertError {
    fn from(u: Undecodable) -> ConvertError {
        ConvertError(u.to_string())
    }
}

/// One outbox row as read: its content, or why it could not be read.
pub(crate) type Fetched = Result<Captured, Undecodable>;

/// The outbox id of a fetched row, read or not.
pub(crate) fn fetched_id(f: &Fetched) -> i64 {
    match f {
        Ok(c) => c.id,
        Err(u) => u.id,
    }
}

/// Decodes one outbox row without panicking on its content. `Err` only when the id itself cannot be read:
/// impossible while `id` is the table's bigint primary key, and then nothing can be done with the row (it can
/// be neither dead-lettered nor passed over by the cursor), so the read fails like a lost session.
fn captured(row: &Row) -> Result<Fetched, PgError> {
    let id: i64 = row.try_get(0)?;
    Ok(read_row(row, id))
}

fn read_row(row: &Row, id: i64) -> Fetched {
    fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize, id: i64) -> Result<T, Undecodable> {
        row.try_get(idx).map_err(|e| {
            let column = row
                .columns()
                .get(idx)
                .map_or_else(|| format!("#{idx}"), |c| c.name().to_string());
            // tokio-postgres says "error deserializing column N"; the decoder's own reason is its source.
            let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            Undecodable { id, column, cause }
        })
    }
    Ok(Captured {
        id,
        captured_at: get(row, 1, id)?,
        kind: get(row, 2, id)?,
        op: get(row, 3, id)?,
        merchant_code: get(row, 4, id)?,
        branch_code: get(row, 5, id)?,
        product_name: get(row, 6, id)?,
        old_row: get(row, 7, id)?,
        new_row: get(row, 8, id)?,
        items: get(row, 9, id)?,
        ctx: get(row, 10, id)?,
        branch_seq: get(row, 11, id)?,
    })
}

fn decode_all(rows: &[Row]) -> Result<Vec<Fetched>, PgError> {
    rows.iter().map(captured).collect()
}

/// PostgreSQL refused to send a value in the session's encoding (UTF-8): text that is not valid in a
/// SQL_ASCII database, or a character with no UTF-8 equivalent. The whole statement fails, for every row
/// it would have returned.
fn unsendable(e: &PgError) -> bool {
    match e {
        PgError::Query(e) => matches!(
            e.code(),
            Some(c) if *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE || *c == SqlState::UNTRANSLATABLE_CHARACTER
        ),
        _ => false,
    }
}

/// The statements the leader runs on every loop, prepared once per session so that each is a single round
/// trip, and so that several can be pipelined on the session (the wake-lock and the fetch behind it).
pub(crate) struct Statements {
    fetch_next: Statement,
    list_next: Statement,
    fetch_ids: Statement,
    delete: Statement,
    number: Statement,
    log: Statement,
    try_lock: Statement,
    unlock: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Statements, PgError> {
        Ok(Statements {
            // One statement, so one snapshot: see `next_rows`.
            fetch_next: timed(client.prepare(&next_rows(COLUMNS))).await?,
            list_next: timed(client.prepare(&next_rows("id"))).await?,
            fetch_ids: timed(client.prepare(&format!(
                "SELECT {COLUMNS} FROM delta_bridge.outbox WHERE id = ANY($1) ORDER BY id"
            )))
            .await?,
            delete: timed(client.prepare("DELETE FROM delta_bridge.outbox WHERE id = ANY($1)")).await?,
            number: timed(client.prepare("SELECT id, branch_seq, fresh FROM delta_bridge.number_events($1)")).await?,
            log: timed(client.prepare(change_log::INSERT)).await?,
            try_lock: timed(client.prepare("SELECT pg_try_advisory_lock($1)")).await?,
            unlock: timed(client.prepare("SELECT pg_advisory_unlock($1)")).await?,
        })
    }

    /// In one snapshot: of the rows of `gaps` that are there and the rows with id > `after`, the `limit`
    /// lowest, in id order; and the snapshot they were read in. When PostgreSQL refuses to send one of them, the ids are
    /// listed in one snapshot instead and the rows read apart (the listed rows stay: only the leader deletes).
    pub(crate) async fn fetch_next(
        &self,
        client: &Client,
        after: i64,
        gaps: &[i64],
        limit: i64,
    ) -> Result<(Vec<Fetched>, Snapshot), PgError> {
        match timed(client.query(&self.fetch_next, &[&after, &gaps, &limit])).await {
            Ok(rows) => {
                let snap = snapshot_of(&rows, COLUMN_COUNT)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    if r.try_get::<_, Option<i64>>(0)?.is_some() {
                        out.push(captured(r)?);
                    }
                }
                Ok((out, snap))
            }
            Err(e) if unsendable(&e) => {
                let listed = timed(client.query(&self.list_next, &[&after, &gaps, &limit])).await?;
                let snap = snapshot_of(&listed, 1)?;
                let mut ids = Vec::with_capacity(listed.len());
                for r in &listed {
                    if let Some(id) = r.try_get::<_, Option<i64>>(0)? {
                        ids.push(id);
                    }
                }
                Ok((self.fetch_apart(client, &ids).await?, snap))
            }
            Err(e) => Err(e),
        }
    }

    /// Rows with id in `ids` (gaps that may have committed late), in id order.
    pub(crate) async fn fetch_ids(&self, client: &Client, ids: &[i64]) -> Result<Vec<Fetched>, PgError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        match timed(client.query(&self.fetch_ids, &[&ids])).await {
            Ok(rows) => decode_all(&rows),
            Err(e) if unsendable(&e) => self.fetch_apart(client, ids).await,
            Err(e) => Err(e),
        }
    }

    /// Reads `ids` (ascending) after PostgreSQL refused to send them together: halves every part it refuses,
    /// down to the single rows it cannot send, which come back as [`Undecodable`]; returned in id order. A few
    /// round trips per such row; none at all while every row can be sent.
    async fn fetch_apart(&self, client: &Client, ids: &[i64]) -> Result<Vec<Fetched>, PgError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut parts = vec![ids];
        while let Some(part) = parts.pop() {
            match timed(client.query(&self.fetch_ids, &[&part])).await {
                Ok(rows) => out.extend(decode_all(&rows)?),
                Err(e) if unsendable(&e) => match part {
                    [] => {}
                    [id] => out.push(Err(unsendable_row(client, *id, &e).await?)),
                    _ => {
                        let (first, second) = part.split_at(part.len() / 2);
                        parts.push(second);
                        parts.push(first);
                    }
                },
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Deletes delivered (or deliberately skipped) rows.
    pub(crate) async fn delete(&self, client: &Client, ids: &[i64]) -> Result<u64, PgError> {
        timed(client.execute(&self.delete, &[&ids])).await
    }

    /// Opens the numbering transaction: gives the rows `ids` (in the order they will be published) their
    /// branch_seq, those that have none yet (see sql/006_branch_seq.sql). Returns each row's number and whether
    /// it is new (given now, rather than earlier); a row missing from the answer is no longer in the outbox. Fails, numbering nothing, unless this
    /// session holds the leader lock. The transaction stays open for [`Statements::log_and_commit`]; on an
    /// error it is rolled back.
    pub(crate) async fn number(&self, client: &Client, ids: &[i64]) -> Result<HashMap<i64, (i64, bool)>, PgError> {
        let params: [&(dyn ToSql + Sync); 1] = [&ids];
        let (began, numbered) = tokio::join!(
            // Durable at COMMIT whatever the role's or database's default: a number lost after its event was
            // published would be given again to another event.
            timed(client.batch_execute("BEGIN; SET LOCAL synchronous_commit = on")),
            timed(client.query(&self.number, &params))
        );
        let answer = began.and(numbered).and_then(|rows| {
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get::<_, i64>(0)?,
                        (r.try_get::<_, i64>(1)?, r.try_get::<_, bool>(2)?),
                    ))
                })
                .collect::<Result<HashMap<_, _>, PgError>>()
        });
        if answer.is_err() {
            rollback(client).await;
        }
        answer
    }

    /// Writes the numbered events to the change log and commits the numbering transaction: their numbers and
    /// their log rows become durable together, or neither does.
    pub(crate) async fn log_and_commit(&self, client: &Client, rows: &change_log::Rows<'_>) -> Result<(), PgError> {
        let logged = if rows.is_empty() {
            Ok(0)
        } else {
            let params: [&(dyn ToSql + Sync); 7] = [
                &rows.merchants,
                &rows.branches,
                &rows.branch_seqs,
                &rows.seqs,
                &rows.event_ids,
                &rows.topics,
                &rows.payloads,
            ];
            timed(client.execute(&self.log, &params)).await
        };
        let committed = match logged {
            Ok(_) => timed(client.batch_execute("COMMIT")).await,
            Err(e) => Err(e),
        };
        if committed.is_err() {
            rollback(client).await;
        }
        committed
    }

    pub(crate) async fn try_lock(&self, client: &Client, key: i64) -> Result<bool, PgError> {
        Ok(timed(client.query_one(&self.try_lock, &[&key])).await?.try_get(0)?)
    }

    pub(crate) async fn unlock(&self, client: &Client, key: i64) -> Result<bool, PgError> {
        Ok(timed(client.query_one(&self.unlock, &[&key])).await?.try_get(0)?)
    }
}

/// Ends an open transaction after a failure; the session may be gone already, and then this fails too (and
/// PostgreSQL has rolled it back).
async fn rollback(client: &Client) {
    let _ = timed(client.batch_execute("ROLLBACK")).await;
}

/// Ids in (after, upto], in id order: the sweep for anything the cursor passed by.
pub(crate) async fn ids_between(client: &Client, after: i64, upto: i64, limit: i64) -> Result<Vec<i64>, PgError> {
    let rows = timed(client.query(
        "SELECT id FROM delta_bridge.outbox WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
        &[&after, &upto, &limit],
    ))
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// The row PostgreSQL cannot send, with the first column it cannot send (one probe per column).
async fn unsendable_row(client: &Client, id: i64, refusal: &PgError) -> Result<Undecodable, PgError> {
    let cause = match refusal {
        PgError::Query(e) => e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        other => other.to_string(),
    };
    for column in COLUMNS.split(", ") {
        let probe = timed(client.query_opt(
            &format!("SELECT {column} FROM delta_bridge.outbox WHERE id = $1"),
            &[&id],
        ))
        .await;
        match probe {
            Err(e) if unsendable(&e) => {
                return Ok(Undecodable {
                    id,
                    column: column.to_string(),
                    cause: format!("PostgreSQL cannot send it as UTF-8: {cause}"),
                })
            }
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
    Ok(Undecodable {
        id,
        column: "(any)".to_string(),
        cause: format!("PostgreSQL cannot send the row as UTF-8: {cause}"),
    })
}

/// Moves rows to the dead-letter table, each with the reason and detail an operator will read, in one
/// statement (one round trip, a join on the arrays: linear in the rows). `ids`, `reasons` and `details` are
/// parallel, and `ids` holds each id once (a row moved twice in one statement would be an error). A row no
/// longer in the outbox is passed over. The row's content is copied server-side, whether or not the bridge
/// could read it.
pub(crate) async fn dead_letters(
    client: &Client,
    ids: &[i64],
    reasons: &[&str],
    details: &[&str],
) -> Result<u64, PgError> {
    timed(client.execute(
        "WITH d AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS d (id, reason, detail)),
              moved AS (DELETE FROM delta_bridge.outbox o USING d WHERE o.id = d.id
                        RETURNING o.id, o.captured_at, o.kind, o.op, o.merchant_code, o.branch_code,
                                  o.product_name, o.old_row, o.new_row, o.items, o.ctx, d.reason, d.detail,
                                  o.branch_seq)
         INSERT INTO delta_bridge.dead_letter (id, captured_at, kind, op, merchant_code, branch_code, product_name,
                                               old_row, new_row, items, ctx, reason, detail, branch_seq)
         SELECT * FROM moved
         ON CONFLICT (id) DO UPDATE SET failed_at = now(), reason = EXCLUDED.reason, detail = EXCLUDED.detail,
                                        branch_seq = coalesce(EXCLUDED.branch_seq, dead_letter.branch_seq)",
        &[&ids, &reasons, &details],
    ))
    .await
}

/// What the leader reports every few seconds: the outbox and the dead letters, read in one statement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backlog {
    /// Rows waiting in the outbox (captured, not yet acknowledged).
    pub rows: i64,
    /// Seconds since the oldest of them was captured (database clock); 0 when the outbox is empty.
    pub oldest_age: f64,
    /// Rows waiting in delta_bridge.dead_letter (until replayed or deleted).
    pub dead_letters: i64,
}

/// The count is what it always was (an index-only scan when the visibility map allows); the oldest row is
/// one probe of the primary key: ids and `captured_at` both follow the order rows were captured in, and a
/// replayed dead letter comes back with its original id and `captured_at`, so it counts as the oldest.
pub(crate) async fn backlog(client: &Client) -> Result<Backlog, PgError> {
    let row = timed(client.query_one(
        "SELECT (SELECT count(*) FROM delta_bridge.outbox),
                coalesce((SELECT greatest(extract(epoch FROM now() - captured_at), 0)::float8
                            FROM delta_bridge.outbox ORDER BY id LIMIT 1), 0),
                (SELECT count(*) FROM delta_bridge.dead_letter)",
        &[],
    ))
    .await?;
    Ok(Backlog {
        rows: row.try_get(0)?,
        oldest_age: row.try_get(1)?,
        dead_letters: row.try_get(2)?,
    })
}

pub(crate) async fn install_id(client: &Client) -> Result<String, PgError> {
    Ok(timed(client.query_one("SELECT install_id FROM delta_bridge.meta", &[]))
        .await?
        .try_get(0)?)
}
