//! The leader's session: connect, stand by until this replica holds the leader lock (watching for a
//! squatter meanwhile), then lead — read, hand events over, record acknowledgements, sweep, heartbeat —
//! until stopped, the session is lost, or the broker is gone for too long. What each step does is in the
//! sibling modules; this is when each runs, and how long the leader waits in between.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::capture::change_log;
use crate::capture::outbox::{self, Statements, LEADER_LOCK, WAKE_CHANNEL, WAKE_LOCK};
use crate::convert::Event;
use crate::deliver::{Outcome, Term};
use crate::health::Health;
use crate::pg::{self, timed, PgError};

use super::acks::DELETE_DELAY;
use super::leadership::SquatterWatch;
use super::tracker::GAP_FAST_EVERY;
use super::{Pipeline, PublisherGone, SessionError, BROKER_LOST_RELEASE};

/// A sweep pass starts this long after the last one ended (at once on taking the lead, or on a replay).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
const BACKLOG_EVERY: Duration = Duration::from_secs(2);
/// After a read that found rows, keep polling (every LINGER_POLL) for this long before asking writers to
/// NOTIFY: under steady load rows keep coming, the bridge never arms the wake lock, and no writer pays for
/// NOTIFY's commit lock. Costs at most LINGER_POLL of latency while it lasts.
const LINGER: Duration = Duration::from_millis(20);
const LINGER_POLL: Duration = Duration::from_millis(1);

/// How often a standby tries the leader lock.
const STANDBY_POLL: Duration = Duration::from_millis(250);

impl Pipeline {
    /// One database session: stand by until leader, then publish until cancelled or the session fails.
    pub(super) async fn session(
        &mut self,
        events: &mpsc::Sender<(Term, Event)>,
        outcomes: &mut mpsc::UnboundedReceiver<(Term, Outcome)>,
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
            // A standby reads none of these: 0, so that a value it kept from an earlier lead cannot keep an
            // alert firing (or hide one) after another replica has taken over; alerts take the max by job.
            self.metrics.outbox_backlog.set(0);
            self.metrics.outbox_oldest_age.set(0.0);
            self.metrics.dead_letters.set(0);
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
        // Read before our own first beat overwrites it: has another replica led since our last beat?
        let resumed = self.heartbeat.nobody_led_since(&s.client).await?;
        if !resumed {
            self.new_term();
        }
        self.metrics.leader.set(1);
        self.heartbeat.reset();
        self.heartbeat.beat_if_due(&s.client).await?;
        self.lead_started();
        if resumed {
            tracing::info!(
                term = self.term.0,
                outstanding = self.tracker.outstanding_len(),
                "leader: publishing; no other replica led since this one did, so it goes on where it stopped"
            );
        } else {
            tracing::info!(term = self.term.0, "leader: publishing");
        }
        timed(s.client.batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))).await?;
        // The change log's partitions are checked before the first numbering.
        self.log_covered = None;
        self.log_maintained = None;
        // Sweep at once: a previous leader may have left rows below our cursor.
        self.last_sweep = None;
        self.sweep_after = None;

        let mut broker_lost: Option<Instant> = None;
        loop {
            if health.mqtt.load(Ordering::SeqCst) {
                broker_lost = None;
            } else if broker_lost
                .get_or_insert_with(|| health.mqtt_heard.last().unwrap_or_else(Instant::now))
                .elapsed()
                >= BROKER_LOST_RELEASE
            {
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
            self.number(&s.client, &stmts, &install_id).await?;
            self.push_ready(events, cancel)?;

            let mut drained = true;
            self.metrics.pending_bytes.set(self.pending_bytes as i64);
            if self.queue_empty() && self.has_room() {
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
                self.number(&s.client, &stmts, &install_id).await?;
                self.push_ready(events, cancel)?;
            }
            let sweep_due = self.sweep_after.is_some() || self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if sweep_due && self.has_room() {
                if !self.sweep(&s.client, &stmts, &install_id).await? {
                    drained = false; // more below the cursor: the next step as soon as there is room
                }
                self.number(&s.client, &stmts, &install_id).await?;
                self.push_ready(events, cancel)?;
            }
            if self.last_backlog.elapsed() >= BACKLOG_EVERY {
                let b = outbox::backlog(&s.client).await?;
                self.metrics.outbox_backlog.set(b.rows);
                self.metrics.outbox_oldest_age.set(b.oldest_age);
                self.metrics.dead_letters.set(b.dead_letters);
                self.log_partitions(&s.client).await?;
                match change_log::stats(&s.client).await {
                    Ok((age, bytes)) => {
                        self.metrics.change_log_oldest_age.set(age);
                        self.metrics.change_log_bytes.set(bytes);
                    }
                    // Only the metrics are missed: never a reason to stop publishing.
                    Err(e) if super::intake::answered_with_error(&e) => {
                        tracing::warn!(error = %e, "change log size and age could not be read");
                    }
                    Err(e) => return Err(e.into()),
                }
                self.last_backlog = Instant::now();
            }
            self.heartbeat.beat_if_due(&s.client).await?;
            if !drained && self.queue_empty() {
                continue;
            }
            if self.queue_empty() && self.last_rows.is_some_and(|t| t.elapsed() < LINGER) {
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
            let tried = if self.queue_empty() && self.has_room() {
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

            let wait = if !self.queue_empty() {
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
}
