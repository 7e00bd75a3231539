//! The change log (sql/007_change_log.sql): every numbered event as MQTT carries it, written in the
//! transaction that numbers it, in partitions of `catchup.partition_span` that the leader creates ahead of time
//! and drops whole once older than `catchup.retention`.

use std::time::Duration;

use tokio_postgres::Client;

use crate::convert::Event;
use crate::pg::{timed, PgError};

/// Partitions the leader keeps ready: the current span and the next two, and at least two minutes' worth (for
/// the short spans of tests), so that a read of the log that holds its lock for a while (partitions cannot be
/// created meanwhile) does not leave the numbering without a partition.
fn ahead(span_s: i64) -> i32 {
    i32::try_from((120 + span_s - 1) / span_s).unwrap_or(3).max(3)
}

/// What one maintenance call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Maintained {
    pub created: i32,
    pub dropped: i32,
    /// From now (the database's clock), how long partitions exist without a break.
    pub covered_for: Duration,
}

/// Creates the missing partitions ahead and drops the expired ones (one call, its own transaction).
pub(crate) async fn maintain(client: &Client, span: Duration, retention: Duration) -> Result<Maintained, PgError> {
    let span_s = i64::try_from(span.as_secs().max(1)).unwrap_or(86_400);
    let keep_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let row = timed(client.query_one(
        "SELECT created, dropped, extract(epoch FROM covered_until - clock_timestamp())::float8
           FROM delta_bridge.change_log_maintain($1, make_interval(secs => $2::float8 / 1000), $3)",
        &[&span_s, &(keep_ms as f64), &ahead(span_s)],
    ))
    .await?;
    let covered: f64 = row.try_get(2)?;
    Ok(Maintained {
        created: row.try_get(0)?,
        dropped: row.try_get(1)?,
        covered_for: Duration::try_from_secs_f64(covered).unwrap_or_default(),
    })
}

/// The oldest event's age in seconds (0 when the log is empty), and the log's bytes on disk.
pub(crate) async fn stats(client: &Client) -> Result<(f64, i64), PgError> {
    let row = timed(client.query_one(
        "SELECT coalesce(extract(epoch FROM now() - (SELECT min(logged_at) FROM delta_bridge.change_log)), 0)::float8,
                coalesce((SELECT sum(pg_total_relation_size(relid))
                            FROM pg_partition_tree('delta_bridge.change_log'::regclass) WHERE isleaf), 0)::bigint",
        &[],
    ))
    .await?;
    Ok((row.try_get::<_, f64>(0)?.max(0.0), row.try_get(1)?))
}

/// The parallel arrays of one insert into the log: merchant, branch, branch_seq, seq, event_id, topic, payload.
#[derive(Default)]
pub(crate) struct Rows<'a> {
    pub merchants: Vec<&'a str>,
    pub branches: Vec<&'a str>,
    pub branch_seqs: Vec<i64>,
    pub seqs: Vec<i64>,
    pub event_ids: Vec<&'a str>,
    pub topics: Vec<&'a str>,
    pub payloads: Vec<&'a [u8]>,
}

impl<'a> Rows<'a> {
    pub(crate) fn push(&mut self, merchant: &'a str, branch: &'a str, e: &'a Event) {
        self.merchants.push(merchant);
        self.branches.push(branch);
        self.branch_seqs.push(e.branch_seq);
        self.seqs.push(e.seq);
        self.event_ids.push(&e.event_id);
        self.topics.push(&e.topic);
        self.payloads.push(&e.payload);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// The insert, for [`crate::capture::outbox::Statements`]: logged at the transaction's time.
pub(crate) const INSERT: &str = "INSERT INTO delta_bridge.change_log
        (logged_at, merchant_code, branch_code, branch_seq, seq, event_id, topic, payload)
    SELECT now(), r.* FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[],
                                  $7::bytea[]) AS r";

#[cfg(test)]
mod tests {
    #[test]
    fn three_spans_ahead_and_at_least_two_minutes() {
        assert_eq!(super::ahead(86_400), 3);
        assert_eq!(super::ahead(60), 3);
        assert_eq!(super::ahead(2), 60);
        assert_eq!(super::ahead(1), 120);
    }
}
