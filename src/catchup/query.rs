//! The catch-up API's reads (docs/api.md): a page of a branch's change log, and a page of a branch's products
//! and inventory with the `branch_seq` it includes. Each page is read in one `REPEATABLE READ` read-only
//! transaction, so what it shows is one snapshot of the database; nothing here writes, so a standby serves
//! it as well as the leader.

use std::time::Duration;

use tokio_postgres::Client;

use crate::convert::{self, SnapshotProduct};
use crate::pg::{timed, PgError};
use crate::schema::quote_ident;

#[derive(Debug, thiserror::Error)]
pub(crate) enum QueryError {
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A products or inventory row that cannot be shown (a value the converter refuses, as it could not publish
    /// it, or one the driver cannot decode): logged, answered 500. Not a 503: asking again cannot help.
    #[error("{0} row {1} cannot be shown: {2}")]
    Row(&'static str, i64, String),
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(e: tokio_postgres::Error) -> Self {
        QueryError::Pg(PgError::Query(e))
    }
}

/// A page of `GET /api/v1/changes`.
pub(crate) enum Changes {
    /// The payloads, exactly the bytes MQTT carried, in `branch_seq` order, and the branch's newest number.
    Page { events: Vec<(i64, Vec<u8>)>, last_seq: i64 },
    /// The event after `after` is older than the retention, or no longer stored: the client must resync.
    Expired,
}

/// Reads the events of `merchant`/`branch` after `after`, at most `limit`. The retention is decided logically
/// from `logged_at` (the time the event was numbered and logged), whether or not its partition is dropped yet:
/// the first event of the page (`after + 1`) must exist and be younger than `retention`; events after it are
/// younger still (numbered later).
pub(crate) async fn changes(
    client: &mut Client,
    merchant: &str,
    branch: &str,
    after: i64,
    limit: i64,
    page_bytes: usize,
    retention: Duration,
) -> Result<Changes, QueryError> {
    let keep_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX) as f64;
    let tx = timed(
        client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start(),
    )
    .await?;
    let row = timed(tx.query_one(
        "SELECT coalesce((SELECT last_seq FROM delta_bridge.branch_counter
                           WHERE merchant_code = $1 AND branch_code = $2), 0),
                (SELECT logged_at >= now() - make_interval(secs => $4::float8 / 1000)
                   FROM delta_bridge.change_log
                  WHERE merchant_code = $1 AND branch_code = $2 AND branch_seq = $3)",
        // Added here, saturating: `after` may be the largest bigint (then nothing follows it).
        &[&merchant, &branch, &after.saturating_add(1), &keep_ms],
    ))
    .await?;
    let last_seq: i64 = row.try_get(0)?;
    let first_kept: Option<bool> = row.try_get(1)?;
    if after >= last_seq {
        return Ok(Changes::Page {
            events: Vec::new(),
            last_seq,
        });
    }
    // Before the `limit=0` shortcut: an expired `after` is a 410 whatever the page size.
    if first_kept != Some(true) {
        return Ok(Changes::Expired);
    }
    if limit == 0 {
        return Ok(Changes::Page {
            events: Vec::new(),
            last_seq,
        });
    }
    // The running byte sum is taken from the stored sizes (`octet_length` of a bytea does not read it back), so
    // the payloads past the budget are never fetched; the first event is always in, however large.
    let budget = i64::try_from(page_bytes).unwrap_or(i64::MAX);
    let rows = timed(tx.query(
        "SELECT branch_seq, payload
           FROM (SELECT branch_seq, payload,
                        sum(octet_length(payload)) OVER (ORDER BY branch_seq) AS upto
                   FROM delta_bridge.change_log
                  WHERE merchant_code = $1 AND branch_code = $2 AND branch_seq > $3
                  ORDER BY branch_seq LIMIT $4) page
          WHERE branch_seq = $3 + 1 OR upto <= $5
          ORDER BY branch_seq",
        &[&merchant, &branch, &after, &limit, &budget],
    ))
    .await?;
    let events = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, Vec<u8>)>, tokio_postgres::Error>>()?;
    timed(tx.commit()).await?;
    // The log holds every numbered event once, so the page must run after + 1, after + 2, ... A hole (an event
    // lost from the log) must not be skipped silently: the device could never learn what it missed.
    if let Some(missing) = first_gap(after, &events) {
        tracing::error!(
            merchant,
            branch,
            missing,
            "change log: an event is missing; answering resync_required"
        );
        return Ok(Changes::Expired);
    }
    Ok(Changes::Page { events, last_seq })
}

/// The first `branch_seq` missing from a page that must run `after + 1, after + 2, ...` without a break.
fn first_gap(after: i64, events: &[(i64, Vec<u8>)]) -> Option<i64> {
    let mut want = after;
    for (n, _) in events {
        want = want.saturating_add(1);
        if *n != want {
            return Some(want);
        }
    }
    None
}

/// Where a snapshot page starts: products after an id, then inventory after an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cursor {
    Products(i64),
    Inventory(i64),
}

impl Cursor {
    /// Before every row id: ids may be negative. (A row whose id is the smallest bigint itself is not shown.)
    pub(crate) const START: i64 = i64::MIN;

    /// The cursor's text: opaque to clients (docs/api.md), `p.<id>` or `i.<id>` here.
    pub(crate) fn render(self) -> String {
        match self {
            Cursor::Products(id) => format!("p.{id}"),
            Cursor::Inventory(id) => format!("i.{id}"),
        }
    }

    /// None for anything [`Cursor::render`] cannot have produced.
    pub(crate) fn parse(s: &str) -> Option<Cursor> {
        let (tag, id) = s.split_once('.')?;
        // Row ids may be negative (the bridge publishes them like any other), so a cursor may be too.
        let digits = id.strip_prefix('-').unwrap_or(id);
        if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let id: i64 = id.parse().ok()?;
        match tag {
            "p" => Some(Cursor::Products(id)),
            "i" => Some(Cursor::Inventory(id)),
            _ => None,
        }
    }
}

/// An inventory row as the snapshot shows it (the keys of `quantity_updated` that describe the row).
#[derive(Debug, serde::Serialize)]
pub(crate) struct SnapshotInventory {
    inventory_id: i64,
    product_id: i64,
    product_name: String,
    quantity: i64,
    updated_by: Option<String>,
    seq: Option<i64>,
}

/// A page of `GET /api/v1/snapshot`.
pub(crate) struct Snapshot {
    pub as_of: i64,
    pub products: Vec<SnapshotProduct>,
    pub inventory: Vec<SnapshotInventory>,
    pub next: Option<Cursor>,
}

/// Reads up to `limit` rows of the branch from `cursor` on, and the branch's counter, in one snapshot: every
/// event numbered up to `as_of` has its change in these rows (a change is committed before it is numbered),
/// and every change in them that is not numbered yet will be numbered above `as_of`.
pub(crate) async fn snapshot(
    client: &mut Client,
    schema: &str,
    merchant: &str,
    branch: &str,
    cursor: Cursor,
    limit: i64,
) -> Result<Snapshot, QueryError> {
    let s = quote_ident(schema);
    let tx = timed(
        client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start(),
    )
    .await?;
    let as_of: i64 = timed(tx.query_one(
        "SELECT coalesce((SELECT last_seq FROM delta_bridge.branch_counter
                           WHERE merchant_code = $1 AND branch_code = $2), 0)",
        &[&merchant, &branch],
    ))
    .await?
    .try_get(0)?;
    // The branch's id once, so that each page reads `products` and `inventory` by `branch_id` and id (an index
    // on those two columns serves it directly; docs/schema-requirements.md) instead of joining per row.
    let branch_id: Option<i64> = match timed(tx.query_opt(
        &format!(
            "SELECT b.id::bigint FROM {s}.branches b JOIN {s}.merchants m ON m.id = b.merchant_id
              WHERE m.code = $1 AND b.code = $2"
        ),
        &[&merchant, &branch],
    ))
    .await?
    {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    };
    let mut products = Vec::new();
    let mut inventory = Vec::new();
    let mut next = None;
    let Some(branch_id) = branch_id else {
        // Gone since the caller's scope was checked: nothing to show.
        timed(tx.commit()).await?;
        return Ok(Snapshot {
            as_of,
            products,
            inventory,
            next,
        });
    };
    let mut room = limit;
    let inventory_after = match cursor {
        Cursor::Products(after) => {
            // Only the columns the snapshot shows, built as the capture triggers render them (so numbers come
            // out as events carry them): another column of the row (a deep or huge jsonb, say) is never read.
            let rows = timed(tx.query(
                &format!(
                    "SELECT p.id::bigint,
                            json_build_object('id', p.id, 'name', p.name, 'price', p.price, 'stock', p.stock,
                                              'updated_by', coalesce(p.updated_by, rs.updated_by)),
                            rs.seq
                       FROM {s}.products p
                       LEFT JOIN delta_bridge.row_seq rs ON rs.tbl = 'products' AND rs.row_id = p.id
                      WHERE p.branch_id = $1::bigint AND p.id > $2::bigint
                      ORDER BY p.id LIMIT $3"
                ),
                &[&branch_id, &after, &room],
            ))
            .await?;
            for r in &rows {
                let id: i64 = r.try_get(0)?;
                let shown = |e: &dyn std::fmt::Display| QueryError::Row("products", id, e.to_string());
                let row: serde_json::Value = r.try_get(1).map_err(|e| shown(&e))?;
                let seq: Option<i64> = r.try_get(2)?;
                products.push(convert::snapshot_product(&row, seq).map_err(|e| shown(&e.0))?);
                next = Some(Cursor::Products(id));
            }
            room -= i64::try_from(rows.len()).unwrap_or(room);
            if room > 0 {
                next = None;
                Some(Cursor::START)
            } else {
                None
            }
        }
        Cursor::Inventory(after) => Some(after),
    };
    if let Some(after) = inventory_after.filter(|_| room > 0) {
        let rows = timed(tx.query(
            &format!(
                "SELECT i.id::bigint, i.product_id::bigint, pr.name, i.quantity::bigint, coalesce(i.updated_by, rs.updated_by), rs.seq
                   FROM {s}.inventory i
                   JOIN {s}.products pr ON pr.id = i.product_id
                   LEFT JOIN delta_bridge.row_seq rs ON rs.tbl = 'inventory' AND rs.row_id = i.id
                  WHERE i.branch_id = $1::bigint AND i.id > $2::bigint
                  ORDER BY i.id LIMIT $3"
            ),
            &[&branch_id, &after, &room],
        ))
        .await?;
        for r in &rows {
            let inventory_id: i64 = r.try_get(0)?;
            let shown = |e: tokio_postgres::Error| QueryError::Row("inventory", inventory_id, e.to_string());
            inventory.push(SnapshotInventory {
                inventory_id,
                product_id: r.try_get(1).map_err(shown)?,
                product_name: r.try_get(2).map_err(shown)?,
                quantity: r.try_get(3).map_err(shown)?,
                updated_by: r.try_get(4).map_err(shown)?,
                seq: r.try_get(5).map_err(shown)?,
            });
        }
        next = match rows.last() {
            Some(_) if i64::try_from(rows.len()).unwrap_or(0) >= room => {
                inventory.last().map(|i| Cursor::Inventory(i.inventory_id))
            }
            _ => None,
        };
    }
    timed(tx.commit()).await?;
    Ok(Snapshot {
        as_of,
        products,
        inventory,
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn cursors_read_back_and_nothing_else_parses() {
        for c in [
            Cursor::Products(0),
            Cursor::Products(42),
            Cursor::Products(-7),
            Cursor::Products(Cursor::START),
            Cursor::Inventory(i64::MAX / 10),
        ] {
            assert_eq!(Cursor::parse(&c.render()), Some(c));
        }
        for bad in [
            "",
            "p",
            "p.",
            "x.1",
            "p.-",
            "p.--1",
            "p.-99999999999999999999",
            "p.+1",
            "p.1.2",
            "i.abc",
            "p.99999999999999999999",
            " p.1",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }
}
