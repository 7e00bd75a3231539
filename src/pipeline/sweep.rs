//! The sweep: now and then (and at once on taking the lead or on a replay) every row at or below the cursor
//! that is not outstanding is read again. It finds what the cursor and the gap tracking cannot: a late commit
//! the tracker gave up on, a dead letter replayed with its old id, rows a previous leader left.

use std::time::Instant;

use crate::capture::outbox::{self, Statements};
use crate::pg::PgError;

use super::Pipeline;

/// The sweep lists the ids below the cursor this many at a time.
const SWEEP_PAGE: i64 = 10_000;

impl Pipeline {
    /// One step of the sweep, which re-reads every row at or below the cursor that is not outstanding, known
    /// gaps included: late commits the gap tracking gave up on, rows replayed from the dead letters, rows a
    /// previous leader left. A step reads at most [`Pipeline::batch`] rows, the lowest ids it has not yet
    /// passed; a pass takes as many steps as it needs, run as soon as there is room. Returns whether the pass
    /// is over.
    pub(super) async fn sweep(
        &mut self,
        client: &tokio_postgres::Client,
        stmts: &Statements,
        install_id: &str,
    ) -> Result<bool, PgError> {
        let limit = usize::try_from(self.batch()).unwrap_or(usize::MAX);
        let mut after = self.sweep_after.unwrap_or(0);
        let mut missing = Vec::new();
        let finished = loop {
            let ids = outbox::ids_between(client, after, self.tracker.cursor(), SWEEP_PAGE).await?;
            missing.extend(self.tracker.sweep_missing(&ids));
            if missing.len() >= limit {
                // Resume after the last row read: what this page holds beyond it is listed again.
                missing.truncate(limit);
                after = missing.last().copied().unwrap_or(after);
                break false;
            }
            match ids.last() {
                Some(last) if ids.len() as i64 == SWEEP_PAGE => after = *last,
                _ => break true,
            }
            // A long listing (an outbox of millions below the cursor): the leader must not look hung.
            self.heartbeat.beat_if_due(client).await?;
        };
        if !missing.is_empty() {
            self.sweep_found += missing.len();
            let rows = stmts.fetch_ids(client, &missing).await?;
            self.take_swept(rows, install_id);
        }
        if finished {
            if self.sweep_found > 0 {
                tracing::info!(count = self.sweep_found, "sweep found rows below the cursor");
            }
            self.sweep_after = None;
            self.sweep_found = 0;
            self.last_sweep = Some(Instant::now());
        } else {
            self.sweep_after = Some(after);
        }
        Ok(finished)
    }
}
