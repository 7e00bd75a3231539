//! The pipeline: capture -> conversion -> delivery -> acknowledgement. Reads the outbox on the leader's
//! session, converts rows, hands events to the [`Publisher`], and deletes a row only once its event was
//! acknowledged (or moves it to the dead letters when it cannot be converted or the broker refuses it).
//!
//! Why it cannot lose a committed change: a row leaves the outbox only after a PUBACK (or into dead_letter);
//! a crash anywhere leaves it there for the next leader. Rows may commit out of id order (the id is taken a
//! moment before commit), so besides the cursor the pipeline re-reads the ids it skipped ("gaps") and now
//! and then sweeps every id at or below the cursor that is not outstanding; that bookkeeping is the pure
//! `tracker`, tested against a model of out-of-order commits. It never blocks on a full publisher: converted
//! events wait in `ready` while the session keeps serving acknowledgements and health checks.
//!
//! The parts, each an `impl Pipeline` block on the state below: `session` (stand by, take the lead, and the
//! leader's loop: when to read, sweep, flush and wait), `intake` (how much a read may ask for; converting and
//! queueing its rows; handing events to the publisher), `acks` (acknowledgements, deletes and dead letters),
//! `sweep` (re-reading what lies at or below the cursor), `shutdown` (draining on stop); `tracker` (the cursor
//! and its gaps, pure) and `leadership` (the heartbeat and the squatter watch).
//!
//! Leading goes in terms (see [`Term`]): when the leading session ends, the publisher is told at once and stops
//! sending; when this replica leads again and no other replica led meanwhile (the heartbeat tells), the same
//! term goes on (the tracker is kept, the publisher sends again what it set aside), else a new term starts
//! from a fresh tracker and the outbox.

mod acks;
mod intake;
mod leadership;
mod session;
mod shutdown;
mod sweep;
mod tracker;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::convert::Event;
use crate::deliver::{Lead, Outcome, Publisher, Term};
use crate::health::Health;
use crate::metrics::{FailureReason, Metrics};
use crate::pg::PgError;

use leadership::Heartbeat;
use tracker::Tracker;

/// A leader without a broker connection this long (counted from when the broker was last heard from, which
/// is usually some seconds before the connection is found dead) gives up the lead.
const BROKER_LOST_RELEASE: Duration = Duration::from_secs(10);

/// The publisher task has stopped while the pipeline still runs: nothing handed to it would be published, so
/// the pipeline stops too (and gives up the leader lock) instead of leading without publishing.
#[derive(Debug, thiserror::Error)]
#[error("the publisher task has stopped: events can no longer reach the broker")]
pub(crate) struct PublisherGone;

/// Why a database session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The leader lost the broker for [`BROKER_LOST_RELEASE`]: it lets go of the lead (the session's end
    /// releases the lock) so that a replica that reaches the broker publishes.
    #[error("no broker connection for {0:?}: leadership released")]
    BrokerLost(Duration),
    #[error(transparent)]
    PublisherGone(#[from] PublisherGone),
}

/// The data path as its two tasks, for the caller to spawn and supervise: the pipeline ([`run`]) and the
/// publisher it hands events to. Every replica runs both; the one that holds the leader lock publishes, the
/// others stand by (connected, so that they are ready). Each runs until `cancel`; the pipeline also ends, with
/// an error, when the publisher is gone.
pub(crate) fn tasks(
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> (
    impl Future<Output = Result<(), PublisherGone>> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (event_tx, event_rx) = mpsc::channel(cfg.bridge.batch_size as usize * 2);
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
    let (lead_tx, lead_rx) = watch::channel(Lead::default());
    let publisher = Publisher::new(
        cfg.mqtt.clone(),
        metrics.clone(),
        health.mqtt.clone(),
        health.mqtt_heard.clone(),
        Duration::from_secs(5),
        cfg.bridge.max_pending,
        cfg.bridge.max_pending_bytes,
    );
    let publishing = publisher.run(event_rx, outcome_tx, lead_rx, cancel.clone());
    (
        run(cfg, metrics, health, cancel, event_tx, outcome_rx, lead_tx),
        publishing,
    )
}

/// Runs the pipeline until `cancel`, reconnecting to PostgreSQL with backoff.
async fn run(
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
    event_tx: mpsc::Sender<(Term, Event)>,
    mut outcome_rx: mpsc::UnboundedReceiver<(Term, Outcome)>,
    lead_tx: watch::Sender<Lead>,
) -> Result<(), PublisherGone> {
    let mut pipeline = Pipeline::new(cfg.clone(), metrics.clone(), lead_tx);
    let mut backoff = Backoff::new();
    loop {
        let result = pipeline
            .session(&event_tx, &mut outcome_rx, &health, &cancel, &mut backoff)
            .await;
        health.postgres.store(false, Ordering::SeqCst);
        metrics.postgres_connected.set(0);
        metrics.leader.set(0);
        if result.is_err() {
            pipeline.lead_ended();
        }
        match result {
            Ok(()) => break,
            Err(SessionError::PublisherGone(e)) => return Err(e),
            Err(e @ (SessionError::Pg(_) | SessionError::BrokerLost(_))) => {
                let wait = backoff.next_delay();
                match e {
                    SessionError::BrokerLost(_) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "leadership released: no broker connection")
                    }
                    _ => tracing::warn!(error = %e, retry_in = ?wait, "postgres session ended"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => break,
                }
            }
        }
    }
    Ok(())
}

/// A converted row on its way to `ready`.
enum Staged {
    /// Numbered earlier: its event, rebuilt with that number.
    Ready(Event),
    /// Converts to an event, and has no branch_seq yet.
    Unnumbered(Box<crate::convert::Captured>),
}

struct Pipeline {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    /// The cursor, the skipped ids, and the ids read and not yet deleted or dead-lettered.
    tracker: Tracker,
    /// Converted, in read order, waiting for [`Pipeline::number`] (some without a branch_seq yet).
    staged: VecDeque<Staged>,
    /// Until when the change log has partitions (as this replica's clock reads it), and when they were last
    /// checked; None: check before the next numbering.
    log_covered: Option<Instant>,
    log_maintained: Option<Instant>,
    /// Converted and numbered, waiting for room in the publisher's channel.
    ready: VecDeque<Event>,
    to_delete: Vec<i64>,
    /// Unconvertible or refused rows, in the order they failed, to move to the dead letters.
    to_dead: VecDeque<(i64, FailureReason, String)>,
    /// Consecutive failures to take the wake lock (backoff).
    arm_failures: u32,
    last_sweep: Option<Instant>,
    /// A sweep pass under way (each step reads at most what [`Pipeline::batch`] allows): where it resumes,
    /// and what it found so far.
    sweep_after: Option<i64>,
    sweep_found: usize,
    last_backlog: Instant,
    first_ack_pending: Option<Instant>,
    /// Bytes (payload and topic) of each event dispatched and not yet deleted or dead-lettered, and their
    /// sum: reading stops at `bridge.max_pending_bytes`, so memory is bounded in bytes, not only in events.
    pending_sizes: HashMap<i64, u64>,
    pending_bytes: u64,
    /// Recent events' mean size: a read asks for no more rows than the bytes left would hold.
    mean_event_bytes: f64,
    /// When a read last found rows (for the linger before arming the wake lock).
    last_rows: Option<Instant>,
    /// The leader's heartbeat (delta_bridge.leader), by which standbys tell it from a squatter, and by which
    /// this replica, leading again, tells whether another one led meanwhile.
    heartbeat: Heartbeat,
    /// The term this replica leads in, or led in last (0: it has not led yet), and whether it leads now: what
    /// `lead` tells the publisher.
    term: Term,
    leading: bool,
    lead: watch::Sender<Lead>,
    /// Rows acknowledged in an earlier term: deleted, but not counted against this term's tracker and
    /// pending bytes (this term may have read the same row again, and its own PUBACK settles it).
    stale_acks: Vec<i64>,
}

impl Pipeline {
    fn new(cfg: Arc<Config>, metrics: Arc<Metrics>, lead: watch::Sender<Lead>) -> Pipeline {
        let now = Instant::now();
        Pipeline {
            term: Term::default(),
            leading: false,
            lead,
            stale_acks: Vec::new(),
            heartbeat: Heartbeat::new(cfg.mqtt.client_id.clone()),
            cfg,
            metrics,
            tracker: Tracker::new(),
            staged: VecDeque::new(),
            log_covered: None,
            log_maintained: None,
            ready: VecDeque::new(),
            to_delete: Vec::new(),
            to_dead: VecDeque::new(),
            arm_failures: 0,
            last_sweep: None,
            sweep_after: None,
            sweep_found: 0,
            last_backlog: now,
            first_ack_pending: None,
            pending_sizes: HashMap::new(),
            pending_bytes: 0,
            mean_event_bytes: 512.0,
            last_rows: None,
        }
    }

    /// Nothing converted waits to be numbered or handed over.
    fn queue_empty(&self) -> bool {
        self.staged.is_empty() && self.ready.is_empty()
    }

    /// Leading in `term` from now on: the publisher sends.
    fn lead_started(&mut self) {
        self.leading = true;
        self.lead.send_replace(Lead {
            term: self.term,
            leading: true,
        });
    }

    /// The session that led has ended (lost, or the lead given up): the publisher stops sending at once and
    /// sets aside what it holds of this term.
    fn lead_ended(&mut self) {
        if std::mem::take(&mut self.leading) {
            self.lead.send_replace(Lead {
                term: self.term,
                leading: false,
            });
        }
    }

    /// Another replica may have led since this one did: start over with a new term and a fresh tracker (the
    /// outbox holds every row not acknowledged, and they are read again). Rows acknowledged in the term before
    /// are still deleted; its refusals and unconvertible rows are decided again when read again.
    fn new_term(&mut self) {
        self.term = Term(self.term.0 + 1);
        self.tracker = Tracker::new();
        self.staged.clear();
        self.ready.clear();
        self.pending_sizes.clear();
        self.pending_bytes = 0;
        self.stale_acks.append(&mut self.to_delete);
        self.to_dead.clear();
        self.first_ack_pending = None;
        self.last_sweep = None;
        self.sweep_after = None;
        self.sweep_found = 0;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::convert::Stream;

    pub(super) fn event(seq: i64) -> Event {
        Event {
            seq,
            branch_seq: 1,
            warning: None,
            stream: Stream::Product,
            topic: "dev/m/b/product".into(),
            event_id: format!("i-{seq}"),
            payload: bytes::Bytes::from_static(b"{}"),
            captured_at: chrono::Utc::now(),
        }
    }

    pub(super) fn pipeline() -> Pipeline {
        let cfg = Config::parse("", std::path::Path::new("t.toml"), &[]).expect("config");
        let (lead, _) = watch::channel(Lead::default());
        Pipeline::new(Arc::new(cfg), Arc::new(Metrics::new().expect("metrics")), lead)
    }

    /// Row `id` read and handed over in the current term, `size` bytes pending.
    fn dispatched(p: &mut Pipeline, id: i64, size: u64) {
        assert_eq!(p.tracker.observe_swept([id]), vec![id]);
        p.pending_sizes.insert(id, size);
        p.pending_bytes += size;
    }

    #[test]
    fn the_publisher_hears_at_once_when_the_lead_starts_and_ends() {
        let mut p = pipeline();
        let rx = p.lead.subscribe();
        p.lead_ended();
        assert_eq!(*rx.borrow(), Lead::default(), "not leading: nothing to tell");
        p.new_term();
        p.lead_started();
        assert_eq!(
            *rx.borrow(),
            Lead {
                term: Term(1),
                leading: true
            }
        );
        p.lead_ended();
        assert_eq!(
            *rx.borrow(),
            Lead {
                term: Term(1),
                leading: false
            }
        );
        // Leading again with no other replica in between: the same term.
        p.lead_started();
        assert_eq!(
            *rx.borrow(),
            Lead {
                term: Term(1),
                leading: true
            }
        );
    }

    #[test]
    fn a_new_term_starts_from_a_fresh_tracker_and_still_deletes_what_was_acknowledged() {
        let mut p = pipeline();
        p.new_term();
        dispatched(&mut p, 7, 10);
        dispatched(&mut p, 8, 10);
        p.ready.push_back(event(9));
        p.absorb((Term(1), Outcome::Acked(event(7))));
        p.absorb((
            Term(1),
            Outcome::Rejected {
                event: event(8),
                reason: FailureReason::Rejected,
                detail: "refused".into(),
            },
        ));
        assert_eq!((p.to_delete.len(), p.to_dead.len()), (1, 1));
        p.new_term();
        assert_eq!(p.term, Term(2));
        assert_eq!(p.tracker.outstanding_len(), 0, "read again from the outbox");
        assert_eq!((p.pending_bytes, p.ready.len()), (0, 0));
        assert_eq!(p.stale_acks, vec![7], "acknowledged: still deleted");
        assert!(
            p.to_delete.is_empty() && p.to_dead.is_empty(),
            "the refusal is decided again"
        );
    }

    #[test]
    fn an_outcome_of_an_earlier_term_deletes_its_row_but_leaves_this_terms_accounting_alone() {
        let mut p = pipeline();
        p.new_term();
        p.new_term();
        // Term 2 has read row 7 again, while term 1's publisher still had it.
        dispatched(&mut p, 7, 10);
        p.absorb((Term(1), Outcome::Acked(event(7))));
        p.absorb((
            Term(1),
            Outcome::Rejected {
                event: event(7),
                reason: FailureReason::Rejected,
                detail: "refused".into(),
            },
        ));
        assert_eq!(p.stale_acks, vec![7]);
        assert!(p.to_delete.is_empty() && p.to_dead.is_empty());
        assert_eq!(
            p.tracker.outstanding_len(),
            1,
            "still this term's, until its own PUBACK"
        );
        assert_eq!(p.pending_bytes, 10);
        p.absorb((Term(2), Outcome::Acked(event(7))));
        assert_eq!(p.to_delete, vec![7]);
    }
}
