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

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::convert::Event;
use crate::deliver::{Outcome, Publisher};
use crate::health::Health;
use crate::metrics::{FailureReason, Metrics};
use crate::pg::PgError;

use leadership::Heartbeat;
use tracker::Tracker;

/// A leader without a broker connection this long gives up the lead.
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
    let publisher = Publisher::new(
        cfg.mqtt.clone(),
        metrics.clone(),
        health.mqtt.clone(),
        Duration::from_secs(5),
        cfg.bridge.max_pending,
    );
    let publishing = publisher.run(event_rx, outcome_tx, cancel.clone());
    (run(cfg, metrics, health, cancel, event_tx, outcome_rx), publishing)
}

/// Runs the pipeline until `cancel`, reconnecting to PostgreSQL with backoff.
async fn run(
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
    event_tx: mpsc::Sender<Event>,
    mut outcome_rx: mpsc::UnboundedReceiver<Outcome>,
) -> Result<(), PublisherGone> {
    let mut pipeline = Pipeline::new(cfg.clone(), metrics.clone());
    let mut backoff = Backoff::new();
    loop {
        let result = pipeline
            .session(&event_tx, &mut outcome_rx, &health, &cancel, &mut backoff)
            .await;
        health.postgres.store(false, Ordering::SeqCst);
        metrics.postgres_connected.set(0);
        metrics.leader.set(0);
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

struct Pipeline {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    /// The cursor, the skipped ids, and the ids read and not yet deleted or dead-lettered.
    tracker: Tracker,
    /// Converted, waiting for room in the publisher's channel.
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
    /// The leader's heartbeat (delta_bridge.leader), by which standbys tell it from a squatter.
    heartbeat: Heartbeat,
}

impl Pipeline {
    fn new(cfg: Arc<Config>, metrics: Arc<Metrics>) -> Pipeline {
        let now = Instant::now();
        Pipeline {
            heartbeat: Heartbeat::new(cfg.mqtt.client_id.clone()),
            cfg,
            metrics,
            tracker: Tracker::new(),
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
}
