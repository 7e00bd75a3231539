//! Stopping: the leader reads nothing more, lets the publisher drain what is in flight for a few seconds, and
//! records the acknowledgements that arrive, so that fewer rows are published twice by the next leader.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::capture::outbox::Statements;
use crate::deliver::{Outcome, Term};
use crate::pg::PgError;

use super::Pipeline;

impl Pipeline {
    /// Stop reading; let the publisher drain what is in flight, record its acknowledgements, and return.
    pub(super) async fn shutdown(
        &mut self,
        client: &tokio_postgres::Client,
        stmts: &Statements,
        outcomes: &mut mpsc::UnboundedReceiver<(Term, Outcome)>,
    ) -> Result<(), PgError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        loop {
            // Still the leader, finishing: standbys must not take a drain for a hang. (The flush below reports
            // a lost session; this is best effort.)
            let _ = self.heartbeat.beat_if_due(client).await;
            tokio::select! {
                o = outcomes.recv() => match o {
                    Some(o) => self.absorb(o),
                    None => break, // publisher finished
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep(self.heartbeat.due_in()) => {}
            }
        }
        self.flush(client, stmts, true).await?;
        tracing::info!(unacknowledged = self.tracker.outstanding_len(), "bridge stopped");
        Ok(())
    }
}
