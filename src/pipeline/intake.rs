//! Reading, converting, queueing: how many rows a read may ask for (the room left under `max_pending` and
//! `max_pending_bytes`), turning the rows a read returned into events (or into rows to delete or to
//! dead-letter), and handing events to the publisher without ever blocking on it.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::capture::change_log;
use crate::capture::outbox::{self, Fetched, Statements};
use crate::convert::{self, ConvertError, Event};
use crate::deliver::Term;
use crate::metrics::FailureReason;
use crate::pg::PgError;

use super::tracker::Snapshot;
use super::{Pipeline, PublisherGone, Staged};

/// The change log's partitions are checked (created ahead, expired ones dropped) at least this often.
const LOG_MAINTAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// When partitions are missing ahead (their creation waited too long for a lock), it is tried again after this.
const LOG_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl Pipeline {
    /// Below both bounds of what may be read and not yet acknowledged: events and bytes.
    pub(super) fn has_room(&self) -> bool {
        self.tracker.outstanding_len() < self.cfg.bridge.max_pending
            && self.pending_bytes < self.cfg.bridge.max_pending_bytes
    }

    /// Rows to ask for in one read (the cursor's, with the gaps, or a sweep step's): `bridge.batch_size`, or
    /// fewer when fewer events are left under `max_pending`, or when the bytes left under `max_pending_bytes`
    /// would hold fewer events of the recent mean size (at least one: the byte bound may be overshot by one
    /// read's misjudged sizes).
    pub(super) fn batch(&self) -> i64 {
        let room = self.cfg.bridge.max_pending_bytes.saturating_sub(self.pending_bytes) as f64;
        let by_bytes = (room / self.mean_event_bytes.max(1.0)).ceil() as i64;
        let by_events = self
            .cfg
            .bridge
            .max_pending
            .saturating_sub(self.tracker.outstanding_len());
        let by_events = i64::try_from(by_events).unwrap_or(i64::MAX);
        by_bytes.min(by_events).clamp(1, i64::from(self.cfg.bridge.batch_size))
    }

    /// Converts the rows of one read of at most `limit` rows (gaps and rows after the cursor, one snapshot)
    /// not already outstanding and queues their events, in id order.
    pub(super) fn take(&mut self, rows: Vec<Fetched>, snap: Snapshot, limit: i64, install_id: &str) {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let dispatch = self
            .tracker
            .observe(rows.iter().map(outbox::fetched_id), snap, limit, Instant::now());
        self.queue(rows, dispatch, install_id);
    }

    /// Converts the rows the sweep read (at or below the cursor) not already outstanding.
    pub(super) fn take_swept(&mut self, rows: Vec<Fetched>, install_id: &str) {
        let dispatch = self.tracker.observe_swept(rows.iter().map(outbox::fetched_id));
        self.queue(rows, dispatch, install_id);
    }

    /// A row that could not be read is dead-lettered like one that cannot be converted. A row already numbered
    /// is rebuilt with its number; one that converts and has no number yet waits in `staged` for
    /// [`Pipeline::number`] (converted again then, with its number: conversion is pure).
    fn queue(&mut self, rows: Vec<Fetched>, dispatch: Vec<i64>, install_id: &str) {
        let mut dispatch = dispatch.into_iter().peekable();
        for row in rows {
            let id = outbox::fetched_id(&row);
            // `dispatch` is a subsequence of the rows' ids, in their order.
            if dispatch.next_if_eq(&id).is_none() {
                continue;
            }
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    self.unconvertible(id, ConvertError::from(e));
                    continue;
                }
            };
            // A row not numbered yet is converted with a stand-in number, to learn whether it publishes.
            match convert::convert(&row, &self.cfg.env, install_id, row.branch_seq.unwrap_or(1)) {
                Ok(Some(event)) => {
                    if let Some(w) = &event.warning {
                        tracing::warn!(id, warning = %w, "captured row published with a correction");
                    }
                    self.account(&event);
                    self.mean_event_bytes =
                        0.9 * self.mean_event_bytes + 0.1 * (event.payload.len() + event.topic.len()) as f64;
                    if row.branch_seq.is_some() {
                        self.staged.push_back(Staged::Ready(event));
                    } else {
                        self.staged.push_back(Staged::Unnumbered(Box::new(row)));
                    }
                }
                Ok(None) => self.to_delete.push(id),
                Err(e) => self.unconvertible(id, e),
            }
        }
    }

    /// Counts an event's bytes as pending (replacing what was counted for its row before).
    fn account(&mut self, event: &Event) {
        let size = (event.payload.len() + event.topic.len()) as u64;
        if let Some(old) = self.pending_sizes.insert(event.seq, size) {
            self.pending_bytes = self.pending_bytes.saturating_sub(old);
        }
        self.pending_bytes += size;
    }

    fn unconvertible(&mut self, id: i64, e: ConvertError) {
        tracing::warn!(id, error = %e, "cannot convert captured row; moved to delta_bridge.dead_letter");
        self.metrics.failure(FailureReason::Unconvertible);
        self.to_dead.push_back((id, FailureReason::Unconvertible, e.0));
    }

    /// Gives the staged events that have no branch_seq yet their numbers and writes them to the change log, in
    /// one committed transaction, then moves every staged event to `ready`, in order: nothing reaches the
    /// publisher before its number (and its log row) is durable. On an error (the session is lost) the staged
    /// events stay for the next try; numbers that were committed nonetheless are found again then.
    pub(super) async fn number(
        &mut self,
        client: &tokio_postgres::Client,
        stmts: &Statements,
        install_id: &str,
    ) -> Result<(), PgError> {
        let ids: Vec<i64> = self
            .staged
            .iter()
            .filter_map(|s| match s {
                Staged::Unnumbered(row) => Some(row.id),
                Staged::Ready(_) => None,
            })
            .collect();
        let mut fresh: HashMap<i64, Result<Event, ConvertError>> = HashMap::with_capacity(ids.len());
        if !ids.is_empty() {
            self.log_partitions(client).await?;
            let t = Instant::now();
            let numbers = stmts.number(client, &ids).await?;
            let mut new_rows = Vec::new();
            for s in &self.staged {
                let Staged::Unnumbered(row) = s else { continue };
                let Some(&(n, new)) = numbers.get(&row.id) else {
                    continue;
                };
                let converted = match convert::convert(row, &self.cfg.env, install_id, n) {
                    Ok(Some(event)) => Ok(event),
                    // Cannot happen (conversion is pure, and the row converted a moment ago); were it to, the
                    // number stays on the dead letter, and the event is published with it on a replay.
                    Ok(None) => Err(ConvertError(format!("converted to nothing once numbered {n}"))),
                    Err(e) => Err(e),
                };
                fresh.insert(row.id, converted);
                // Numbered earlier (a commit whose answer was lost): its log row was written then.
                if new {
                    new_rows.push(row);
                }
            }
            let mut log = change_log::Rows::default();
            for row in new_rows {
                if let (Some(Ok(event)), Some(m), Some(b)) = (
                    fresh.get(&row.id),
                    row.merchant_code.as_deref(),
                    row.branch_code.as_deref(),
                ) {
                    log.push(m, b, event);
                }
            }
            stmts.log_and_commit(client, &log).await?;
            self.metrics.numbering_seconds.observe(t.elapsed().as_secs_f64());
        }
        while let Some(staged) = self.staged.pop_front() {
            let row = match staged {
                Staged::Ready(event) => {
                    self.ready.push_back(event);
                    continue;
                }
                Staged::Unnumbered(row) => row,
            };
            match fresh.remove(&row.id) {
                Some(Ok(event)) => {
                    self.account(&event);
                    self.ready.push_back(event);
                }
                Some(Err(e)) => self.unconvertible(row.id, e),
                None => {
                    // Deleted meanwhile by someone else (only the leader deletes outbox rows): nothing to publish.
                    tracing::warn!(id = row.id, "outbox row vanished before it was numbered; not published");
                    self.complete(row.id);
                }
            }
        }
        Ok(())
    }

    /// Makes sure the change log has a partition for now and the near future, and drops the expired ones, when
    /// due: before numbering once less than half a span is covered (at most once a second, should the
    /// partitions be locked by a long read), and at least every quarter span (every minute at most, every
    /// second at least).
    pub(super) async fn log_partitions(&mut self, client: &tokio_postgres::Client) -> Result<(), PgError> {
        let span = self.cfg.catchup.partition_span;
        let now = Instant::now();
        let due = match (self.log_covered, self.log_maintained) {
            (Some(until), Some(last)) => {
                (until < now + span / 2 && last.elapsed() >= LOG_RETRY_AFTER)
                    || last.elapsed() >= (span / 4).clamp(LOG_RETRY_AFTER, LOG_MAINTAIN_EVERY)
            }
            _ => true,
        };
        if !due {
            return Ok(());
        }
        let done = match change_log::maintain(client, span, self.cfg.catchup.retention).await {
            Ok(done) => done,
            // The server refused (a partition of another span in the way, a lack of locks): publishing goes
            // on while the partitions made earlier cover now; numbering fails only once none does. Tried
            // again a second later, and logged each time, so that it cannot go unseen.
            Err(e) if answered_with_error(&e) => {
                tracing::error!(error = %e, "change log partition upkeep failed; events are numbered and logged while an existing partition covers now");
                self.log_maintained = Some(now);
                self.log_covered = Some(now);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if done.dropped > 0 || done.created > 1 {
            tracing::info!(
                created = done.created,
                dropped = done.dropped,
                "change log partitions created ahead and expired ones dropped"
            );
        }
        self.log_covered = Some(now + done.covered_for);
        self.log_maintained = Some(now);
        // With the same rhythm, and never in the way: a failure only leaves the leftovers for the next time.
        match outbox::sweep_notes(client).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(rows = n, "removed capture notes that outlived their transactions"),
            Err(e) => {
                tracing::error!(error = %e, "removing leftover capture notes failed; tried again at the next change log upkeep")
            }
        }
        Ok(())
    }

    /// Hands converted events to the publisher while its channel has room. A closed channel (the publisher
    /// task is gone) ends the session with an error unless the bridge is stopping: a leader must not keep the
    /// lock without publishing.
    pub(super) fn push_ready(
        &mut self,
        events: &mpsc::Sender<(Term, Event)>,
        cancel: &CancellationToken,
    ) -> Result<(), PublisherGone> {
        if events.is_closed() && !cancel.is_cancelled() {
            return Err(PublisherGone);
        }
        while let Some(ev) = self.ready.pop_front() {
            crate::fault::check(crate::fault::Task::Pipeline, &ev.payload);
            match events.try_send((self.term, ev)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full((_, ev))) => {
                    self.ready.push_front(ev);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed((_, ev))) => {
                    self.ready.push_front(ev);
                    if cancel.is_cancelled() {
                        break; // stopping: what is left stays in the outbox
                    }
                    return Err(PublisherGone);
                }
            }
        }
        Ok(())
    }
}

/// PostgreSQL answered with an error (the session is fine), rather than the session failing.
pub(super) fn answered_with_error(e: &PgError) -> bool {
    matches!(e, PgError::Query(q) if q.as_db_error().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tests::{event, pipeline};

    #[test]
    fn a_full_publisher_channel_keeps_events_waiting() {
        let mut p = pipeline();
        let (tx, _rx) = mpsc::channel(1);
        p.ready.extend([event(1), event(2)]);
        assert!(p.push_ready(&tx, &CancellationToken::new()).is_ok());
        assert_eq!(p.ready.len(), 1, "one handed over, one waits for room");
    }

    #[test]
    fn a_closed_publisher_channel_ends_the_session_unless_stopping() {
        let mut p = pipeline();
        let (tx, rx) = mpsc::channel(8);
        drop(rx); // the publisher task is gone
        p.ready.push_back(event(1));
        assert!(p.push_ready(&tx, &CancellationToken::new()).is_err());
        assert!(
            pipeline().push_ready(&tx, &CancellationToken::new()).is_err(),
            "even with nothing to hand over"
        );
        let stopping = CancellationToken::new();
        stopping.cancel();
        assert!(p.push_ready(&tx, &stopping).is_ok());
        assert_eq!(p.ready.len(), 1, "kept: it stays in the outbox");
    }
}
