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

mod leadership;
mod tracker;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::capture::outbox::{self, Fetched, Statements, LEADER_LOCK, WAKE_CHANNEL, WAKE_LOCK};
use crate::config::Config;
use crate::convert::{self, ConvertError, Event};
use crate::deliver::{Outcome, Publisher};
use crate::health::Health;
use crate::metrics::{FailureReason, Metrics};
use crate::pg::{self, timed, PgError};

use leadership::{Heartbeat, SquatterWatch};
use tracker::{Snapshot, Tracker, GAP_FAST_EVERY};

const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The sweep lists the ids below the cursor this many at a time.
const SWEEP_PAGE: i64 = 10_000;
/// A leader without a broker connection this long gives up the lead.
const BROKER_LOST_RELEASE: Duration = Duration::from_secs(10);
const BACKLOG_EVERY: Duration = Duration::from_secs(2);
/// Acknowledged rows are deleted in batches: at this size, or after this delay.
const DELETE_BATCH: usize = 500;
const DELETE_DELAY: Duration = Duration::from_millis(20);
/// Rows are moved to the dead letters in statements of at most this many, with the leader's heartbeat
/// between them: a replay of tens of thousands of rows that fail again is a few hundred round trips, and the
/// leader never looks hung meanwhile.
const DEAD_BATCH: usize = 500;
/// After a read that found rows, keep polling (every LINGER_POLL) for this long before asking writers to
/// NOTIFY: under steady load rows keep coming, the bridge never arms the wake lock, and no writer pays for
/// NOTIFY's commit lock. Costs at most LINGER_POLL of latency while it lasts.
const LINGER: Duration = Duration::from_millis(20);
const LINGER_POLL: Duration = Duration::from_millis(1);

/// How often a standby tries the leader lock.
const STANDBY_POLL: Duration = Duration::from_millis(250);

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

    /// One database session: stand by until leader, then publish until cancelled or the session fails.
    async fn session(
        &mut self,
        events: &mpsc::Sender<Event>,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
        health: &Health,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let mut s = pg::connect(
            &self.cfg.postgres_url(),
            self.cfg.postgres.connect_timeout,
            "delta-bridge",
        )
        .await?;
        // If this replica's host vanishes (no FIN, no RST), PostgreSQL must notice soon and release the leader
        // lock so that a standby takes over: ~4 s of silence instead of the kernel's two hours. Ignored on a
        // Unix socket.
        timed(s.client.batch_execute(
            "SET tcp_keepalives_idle = 2; SET tcp_keepalives_interval = 1; SET tcp_keepalives_count = 2;
             SET tcp_user_timeout = 4000",
        ))
        .await?;
        let stmts = Statements::prepare(&s.client).await?;
        let install_id = outbox::install_id(&s.client).await?;
        health.postgres.store(true, Ordering::SeqCst);
        self.metrics.postgres_connected.set(1);
        backoff.reset();

        // Stand by until we hold the leader lock (released by PostgreSQL when a leader's session dies).
        let mut announced = false;
        let mut squatters = SquatterWatch::new(self.metrics.clone());
        // Only a replica connected to the broker takes the lead: one cut off from it could not publish.
        while !(health.mqtt.load(Ordering::SeqCst) && stmts.try_lock(&s.client, LEADER_LOCK).await?) {
            if events.is_closed() && !cancel.is_cancelled() {
                return Err(PublisherGone.into()); // never lead without a publisher
            }
            if !announced {
                if health.mqtt.load(Ordering::SeqCst) {
                    tracing::info!("standing by: another replica is the leader");
                } else {
                    tracing::info!("standing by: no broker connection yet");
                }
                announced = true;
            }
            self.metrics.leader.set(0);
            self.metrics.outbox_backlog.set(0);
            // Acknowledgements of what we sent while we led still arrive: keep them for our next lead.
            while let Ok(o) = outcomes.try_recv() {
                self.absorb(o);
            }
            // Is the holder a live leader replica? If not, say so (metric, log): nothing publishes meanwhile.
            squatters.check(&s.client).await?;
            // A try-lock every 250 ms (not a blocking pg_advisory_lock, which would show up as a lock wait
            // in the operators' monitoring): a standby takes over ~0.25 s after the leader's session ends.
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_POLL) => {}
                _ = cancel.cancelled() => return Ok(()),
                _ = &mut s.closed => return Err(PgError::Closed.into()),
            }
        }
        drop(squatters);
        self.metrics.leader.set(1);
        self.heartbeat.reset();
        self.heartbeat.beat_if_due(&s.client).await?;
        tracing::info!("leader: publishing");
        timed(s.client.batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))).await?;
        // Sweep at once: a previous leader may have left rows below our cursor.
        self.last_sweep = None;
        self.sweep_after = None;

        let mut broker_lost: Option<Instant> = None;
        loop {
            if health.mqtt.load(Ordering::SeqCst) {
                broker_lost = None;
            } else if broker_lost.get_or_insert_with(Instant::now).elapsed() >= BROKER_LOST_RELEASE {
                // A leader cut off from the broker (a partition, its own network) would hold the lock and
                // publish nothing; if the broker is down for everyone, the next leader waits for it too.
                return Err(SessionError::BrokerLost(BROKER_LOST_RELEASE));
            }
            while let Ok(o) = outcomes.try_recv() {
                self.absorb(o);
            }
            self.flush(&s.client, &stmts, false).await?;
            if cancel.is_cancelled() {
                return Ok(self.shutdown(&s.client, &stmts, outcomes).await?);
            }
            self.push_ready(events, cancel)?;

            let mut drained = true;
            self.metrics.pending_bytes.set(self.pending_bytes as i64);
            if self.ready.is_empty() && self.has_room() {
                let t = Instant::now();
                let limit = self.batch();
                let (rows, snap) = stmts
                    .fetch_next(&s.client, self.tracker.cursor(), &self.tracker.gap_ids(), limit)
                    .await?;
                self.metrics.outbox_poll_seconds.observe(t.elapsed().as_secs_f64());
                drained = rows.len() < self.cfg.bridge.batch_size as usize;
                if !rows.is_empty() {
                    self.last_rows = Some(Instant::now());
                }
                self.take(rows, snap, limit, &install_id);
                self.push_ready(events, cancel)?;
            }
            let sweep_due = self.sweep_after.is_some() || self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if sweep_due && self.has_room() {
                if !self.sweep(&s.client, &stmts, &install_id).await? {
                    drained = false; // more below the cursor: the next step as soon as there is room
                }
                self.push_ready(events, cancel)?;
            }
            if self.last_backlog.elapsed() >= BACKLOG_EVERY {
                self.metrics.outbox_backlog.set(outbox::backlog(&s.client).await?);
                self.last_backlog = Instant::now();
            }
            self.heartbeat.beat_if_due(&s.client).await?;
            if !drained && self.ready.is_empty() {
                continue;
            }
            if self.ready.is_empty() && self.last_rows.is_some_and(|t| t.elapsed() < LINGER) {
                // Busy lately: poll again shortly instead of making writers notify us.
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = &mut s.closed => return Err(PgError::Closed.into()),
                    _ = tokio::time::sleep(LINGER_POLL) => {}
                }
                continue;
            }

            // Idle (or waiting for the publisher): ask writers to wake us, then look once more, because a
            // writer that committed just before we took the lock did not notify.
            let tried = if self.ready.is_empty() && self.has_room() {
                let gaps = self.tracker.gap_ids();
                let limit = self.batch();
                let (armed, (rows, snap)) = tokio::try_join!(
                    stmts.try_lock(&s.client, WAKE_LOCK),
                    stmts.fetch_next(&s.client, self.tracker.cursor(), &gaps, limit),
                )?;
                let found = !rows.is_empty();
                self.take(rows, snap, limit, &install_id);
                if found {
                    self.last_rows = Some(Instant::now());
                    if armed {
                        stmts.unlock(&s.client, WAKE_LOCK).await?;
                    }
                    continue;
                }
                if armed {
                    self.arm_failures = 0;
                } else {
                    self.arm_failures = self.arm_failures.saturating_add(1);
                }
                Some(armed)
            } else {
                None
            };
            let armed = tried == Some(true);

            let wait = if !self.ready.is_empty() {
                Duration::from_millis(2)
            } else if tried.is_none() {
                // Full (max_pending events or max_pending_bytes unacknowledged): acknowledgements wake us;
                // poll now and then meanwhile.
                self.cfg.bridge.poll_interval
            } else if !armed {
                // A writer holds the shared wake lock: usually it is committing right now, but a prepared or
                // long-open transaction can hold it for long, so back off (1 ms doubling to 64 ms).
                Duration::from_millis(1 << self.arm_failures.min(7).saturating_sub(1))
            } else if self.tracker.has_young_gaps(Instant::now()) {
                GAP_FAST_EVERY
            } else {
                self.cfg.bridge.poll_interval
            };
            let wait = match self.first_ack_pending {
                Some(t) => wait.min(DELETE_DELAY.saturating_sub(t.elapsed())),
                None => wait,
            }
            .min(self.heartbeat.due_in());
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = &mut s.closed => return Err(PgError::Closed.into()),
                Some(payload) = s.notifications.recv() => {
                    let mut replay = payload == "replay";
                    while let Ok(p) = s.notifications.try_recv() {
                        replay |= p == "replay";
                    }
                    if replay {
                        // Replayed dead letters sit below the cursor: a new pass, from the start.
                        self.last_sweep = None;
                        self.sweep_after = None;
                    }
                }
                o = outcomes.recv(), if self.first_ack_pending.is_none() => {
                    if let Some(o) = o { self.absorb(o); }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if armed {
                stmts.unlock(&s.client, WAKE_LOCK).await?;
            }
        }
    }

    /// Below both bounds of what may be read and not yet acknowledged: events and bytes.
    fn has_room(&self) -> bool {
        self.tracker.outstanding_len() < self.cfg.bridge.max_pending
            && self.pending_bytes < self.cfg.bridge.max_pending_bytes
    }

    /// The row left the outbox (deleted after its PUBACK, or dead-lettered): no longer outstanding, and
    /// its bytes no longer count.
    fn complete(&mut self, id: i64) {
        self.tracker.complete(id);
        if let Some(n) = self.pending_sizes.remove(&id) {
            self.pending_bytes = self.pending_bytes.saturating_sub(n);
        }
    }

    /// Rows to ask for in one read (the cursor's, with the gaps, or a sweep step's): `bridge.batch_size`, or
    /// fewer when fewer events are left under `max_pending`, or when the bytes left under `max_pending_bytes`
    /// would hold fewer events of the recent mean size (at least one: the byte bound may be overshot by one
    /// read's misjudged sizes).
    fn batch(&self) -> i64 {
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
    fn take(&mut self, rows: Vec<Fetched>, snap: Snapshot, limit: i64, install_id: &str) {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let dispatch = self
            .tracker
            .observe(rows.iter().map(outbox::fetched_id), snap, limit, Instant::now());
        self.queue(rows, dispatch, install_id);
    }

    /// Converts the rows the sweep read (at or below the cursor) not already outstanding.
    fn take_swept(&mut self, rows: Vec<Fetched>, install_id: &str) {
        let dispatch = self.tracker.observe_swept(rows.iter().map(outbox::fetched_id));
        self.queue(rows, dispatch, install_id);
    }

    /// A row that could not be read is dead-lettered like one that cannot be converted.
    fn queue(&mut self, rows: Vec<Fetched>, dispatch: Vec<i64>, install_id: &str) {
        let mut dispatch = dispatch.into_iter().peekable();
        for row in rows {
            let id = outbox::fetched_id(&row);
            // `dispatch` is a subsequence of the rows' ids, in their order.
            if dispatch.next_if_eq(&id).is_none() {
                continue;
            }
            let converted = row
                .map_err(ConvertError::from)
                .and_then(|row| convert::convert(&row, &self.cfg.env, install_id));
            match converted {
                Ok(Some(event)) => {
                    if let Some(w) = &event.warning {
                        tracing::warn!(id, warning = %w, "captured row published with a correction");
                    }
                    let size = (event.payload.len() + event.topic.len()) as u64;
                    if let Some(old) = self.pending_sizes.insert(id, size) {
                        self.pending_bytes = self.pending_bytes.saturating_sub(old);
                    }
                    self.pending_bytes += size;
                    self.mean_event_bytes = 0.9 * self.mean_event_bytes + 0.1 * size as f64;
                    self.ready.push_back(event)
                }
                Ok(None) => self.to_delete.push(id),
                Err(e) => {
                    tracing::warn!(id, error = %e, "cannot convert captured row; moved to delta_bridge.dead_letter");
                    self.metrics.failure(FailureReason::Unconvertible);
                    self.to_dead.push_back((id, FailureReason::Unconvertible, e.0));
                }
            }
        }
    }

    /// Hands converted events to the publisher while its channel has room. A closed channel (the publisher
    /// task is gone) ends the session with an error unless the bridge is stopping: a leader must not keep the
    /// lock without publishing.
    fn push_ready(&mut self, events: &mpsc::Sender<Event>, cancel: &CancellationToken) -> Result<(), PublisherGone> {
        if events.is_closed() && !cancel.is_cancelled() {
            return Err(PublisherGone);
        }
        while let Some(ev) = self.ready.pop_front() {
            crate::fault::check(crate::fault::Task::Pipeline, &ev.payload);
            match events.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.ready.push_front(ev);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(ev)) => {
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

    fn absorb(&mut self, outcome: Outcome) {
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
    async fn flush(&mut self, client: &tokio_postgres::Client, stmts: &Statements, now: bool) -> Result<(), PgError> {
        let due = now
            || self.to_delete.len() >= DELETE_BATCH
            || self.first_ack_pending.is_some_and(|t| t.elapsed() >= DELETE_DELAY)
            || (!self.to_delete.is_empty() && self.first_ack_pending.is_none());
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

    /// One step of the sweep, which re-reads every row at or below the cursor that is not outstanding, known
    /// gaps included: late commits the gap tracking gave up on, rows replayed from the dead letters, rows a
    /// previous leader left. A step reads at most [`Pipeline::batch`] rows, the lowest ids it has not yet
    /// passed; a pass takes as many steps as it needs, run as soon as there is room. Returns whether the pass
    /// is over.
    async fn sweep(
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

    /// Stop reading; let the publisher drain what is in flight, record its acknowledgements, and return.
    async fn shutdown(
        &mut self,
        client: &tokio_postgres::Client,
        stmts: &Statements,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
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
    use crate::convert::Stream;

    fn event(seq: i64) -> Event {
        Event {
            seq,
            warning: None,
            stream: Stream::Product,
            topic: "dev/m/b/product".into(),
            event_id: format!("i-{seq}"),
            payload: bytes::Bytes::from_static(b"{}"),
            captured_at: chrono::Utc::now(),
        }
    }

    fn pipeline() -> Pipeline {
        let cfg = Config::parse("", std::path::Path::new("t.toml"), &[]).expect("config");
        Pipeline::new(Arc::new(cfg), Arc::new(Metrics::new().expect("metrics")))
    }

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
