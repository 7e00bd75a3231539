//! Acknowledgements, deletes and dead letters: a PUBACK makes a row deletable, a refusal or a failed
//! conversion makes it a dead letter; both leave the outbox in bulk statements, and only then stop counting
//! against the bounds on what may be read.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::capture::outbox::{self, Statements};
use crate::deliver::{Outcome, Term};
use crate::metrics::FailureReason;
use crate::pg::PgError;

use super::Pipeline;

/// Acknowledged rows are deleted in batches: at this size, or after this delay.
const DELETE_BATCH: usize = 500;
pub(super) const DELETE_DELAY: Duration = Duration::from_millis(20);
/// Rows are moved to the dead letters in statements of at most this many, with the leader's heartbeat
/// between them: a replay of tens of thousands of rows that fail again is a few hundred round trips, and the
/// leader never looks hung meanwhile.
const DEAD_BATCH: usize = 500;

impl Pipeline {
    /// The row left the outbox (deleted after its PUBACK, or dead-lettered): no longer outstanding, and
    /// its bytes no longer count.
    pub(super) fn complete(&mut self, id: i64) {
        self.tracker.complete(id);
        if let Some(n) = self.pending_sizes.remove(&id) {
            self.pending_bytes = self.pending_bytes.saturating_sub(n);
        }
    }

    /// An outcome from the publisher. One of an earlier term (another replica has led since; the tracker and
    /// the pending bytes are this term's, which may have read the same row again) only deletes its row if it
    /// was acknowledged: a refusal is decided again when the row is read again.
    pub(super) fn absorb(&mut self, (term, outcome): (Term, Outcome)) {
        if term != self.term {
            if let Outcome::Acked(ev) = outcome {
                self.stale_acks.push(ev.seq);
            }
            return;
        }
        match outcome {
            Outcome::Acked(ev) => {
                let stream = ev.stream.as_str();
                self.metrics.events_published.with_label_values(&[stream]).inc();
                let latency = (chrono::Utc::now() - ev.captured_at).to_std().unwrap_or_default();
                self.metrics
                    .end_to_end_latency
                    .with_label_values(&[stream])
                    .observe(latency.as_secs_f64());
                self.metrics
                    .payload_bytes
                    .with_label_values(&[stream])
                    .observe(ev.payload.len() as f64);
                self.to_delete.push(ev.seq);
                self.first_ack_pending.get_or_insert_with(Instant::now);
            }
            Outcome::Rejected { event, reason, detail } => {
                tracing::warn!(seq = event.seq, topic = %event.topic, %detail, "event refused; moved to delta_bridge.dead_letter");
                self.metrics.failure(reason);
                self.to_dead.push_back((event.seq, reason, detail));
            }
        }
    }

    /// Deletes acknowledged rows (batched unless `now`) and moves refused ones to the dead letters.
    pub(super) async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        stmts: &Statements,
        now: bool,
    ) -> Result<(), PgError> {
        let due = now
            || self.to_delete.len() >= DELETE_BATCH
            || self.first_ack_pending.is_some_and(|t| t.elapsed() >= DELETE_DELAY)
            || (!self.to_delete.is_empty() && self.first_ack_pending.is_none());
        if !self.stale_acks.is_empty() {
            stmts.delete(client, &self.stale_acks).await?;
            self.stale_acks.clear();
        }
        if due && !self.to_delete.is_empty() {
            stmts.delete(client, &self.to_delete).await?;
            for id in std::mem::take(&mut self.to_delete) {
                self.complete(id);
            }
            self.first_ack_pending = None;
        }
        while !self.to_dead.is_empty() {
            let n = self.to_dead.len().min(DEAD_BATCH);
            let (ids, reasons, details) = dead_batch(&self.to_dead, n);
            outbox::dead_letters(client, &ids, &reasons, &details).await?;
            for id in ids {
                self.complete(id);
            }
            self.to_dead.drain(..n);
            self.heartbeat.beat_if_due(client).await?;
        }
        Ok(())
    }
}

/// The first `n` rows of `to_dead` as the parallel arrays of one dead-letter statement, each id once (the
/// first failure wins: one statement cannot move a row twice).
fn dead_batch(to_dead: &VecDeque<(i64, FailureReason, String)>, n: usize) -> (Vec<i64>, Vec<&'static str>, Vec<&str>) {
    let mut seen = HashSet::with_capacity(n);
    let mut out = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (id, reason, detail) in to_dead.range(..n) {
        if seen.insert(*id) {
            out.0.push(*id);
            out.1.push(reason.as_str());
            out.2.push(detail.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_go_in_bounded_batches_in_order_each_id_once() {
        let to_dead: VecDeque<_> = (0..1200)
            .map(|i| (i % 1000, FailureReason::Unconvertible, format!("why {i}")))
            .collect();
        let (ids, reasons, details) = dead_batch(&to_dead, DEAD_BATCH);
        assert_eq!(ids, (0..DEAD_BATCH as i64).collect::<Vec<_>>());
        assert_eq!(reasons.len(), DEAD_BATCH);
        assert_eq!((details[0], details[DEAD_BATCH - 1]), ("why 0", "why 499"));
        let all = to_dead.len();
        let (ids, _, details) = dead_batch(&to_dead, all);
        assert_eq!(ids.len(), 1000, "an id failed twice is moved once");
        assert_eq!(details[5], "why 5", "with its first failure's detail");
    }
}
