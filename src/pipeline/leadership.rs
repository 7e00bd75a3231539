//! Leadership beside the data path: the leader's heartbeat, and a standby's watch for a squatter, a session
//! that holds the leader lock without being a live leader replica (see [`crate::locks`]). Nothing publishes
//! while one does: every replica that cannot take the lock reports it, within seconds, on
//! `delta_bridge_lock_squatter{lock="leader"}` and in its log (the holder's pid, user and application_name).
//! A standby stays ready all the same (it is connected and serves the API); the alert is the signal.

use std::mem::{discriminant, Discriminant};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::capture::outbox::LEADER_LOCK;
use crate::locks::{self, Beat, Squat, HEARTBEAT_EVERY};
use crate::metrics::{Metrics, LOCK_LEADER};
use crate::pg::PgError;

/// How often a standby looks at who holds the leader lock.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A holder that calls itself a replica but does not heartbeat is reported once this has passed: a replica
/// that has just taken the lock writes its first heartbeat a moment later.
const NO_HEARTBEAT_GRACE: Duration = Duration::from_secs(3);
/// While the same squatter stays, it is logged again this often.
const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The leader's side: writes `delta_bridge.leader` every [`HEARTBEAT_EVERY`] while it leads.
pub(super) struct Heartbeat {
    replica: String,
    last: Option<Instant>,
    /// The last beat this replica wrote, as the database has it (None: none, or its answer was lost).
    written: Option<Beat>,
    /// False once the table turned out to be missing (a database not migrated by this version).
    enabled: bool,
}

impl Heartbeat {
    pub(super) fn new(replica: String) -> Heartbeat {
        Heartbeat {
            replica,
            last: None,
            written: None,
            enabled: true,
        }
    }

    /// Starting to lead: the next [`Heartbeat::beat_if_due`] writes at once.
    pub(super) fn reset(&mut self) {
        self.last = None;
        self.enabled = true;
    }

    pub(super) async fn beat_if_due(&mut self, client: &Client) -> Result<(), PgError> {
        if !self.enabled || self.last.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
            return Ok(());
        }
        // Forgotten first: if the write's answer is lost, what the row holds is unknown.
        self.written = None;
        self.written = locks::heartbeat(client, &self.replica).await?;
        if self.written.is_none() {
            self.enabled = false;
            tracing::warn!(
                "table delta_bridge.leader does not exist (run `delta-bridge migrate`): leading without a heartbeat, \
                 so standbys cannot tell a hung leader from a live one"
            );
        }
        self.last = Some(Instant::now());
        Ok(())
    }

    /// Whether no other replica has led since this one's last beat: asked having just taken the leader lock,
    /// before the first beat of the new lead. Then this replica goes on where its last lead stopped (the
    /// pipeline keeps its tracker, the publisher sends again what it set aside); else a new term starts.
    ///
    /// The rule: the heartbeat row must still be exactly the last beat this replica wrote (its backend pid,
    /// its name, and the database's timestamp of that write). A replica that takes the lock writes its first
    /// beat before it reads or publishes anything, and every beat writes a new timestamp into the one row; so
    /// a row unchanged since our last beat means that no replica has led and published since (one whose
    /// session ended between taking the lock and its first beat published nothing). Where it cannot be told
    /// (no beat of ours known, the answer to our last write lost, no heartbeat table) the answer is no: a new
    /// term is always safe, since the outbox holds every row not acknowledged. A wrong yes costs duplicates,
    /// not events: a leader of an earlier version writes no heartbeat (a rolling update) and may have led
    /// meanwhile; this replica then sends again events the broker had or the outbox still holds, and its
    /// cursor misses nothing, since the sweep that starts every lead finds rows left below it.
    pub(super) async fn nobody_led_since(&self, client: &Client) -> Result<bool, PgError> {
        let Some(mine) = &self.written else {
            return Ok(false);
        };
        Ok(locks::last_beat(client).await?.as_ref() == Some(mine))
    }

    /// Until the next heartbeat is due (the leader's waits are bounded by it).
    pub(super) fn due_in(&self) -> Duration {
        match self.last {
            _ if !self.enabled => Duration::from_secs(3600),
            Some(t) => HEARTBEAT_EVERY.saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        }
    }
}

/// A standby's side: who holds the leader lock, checked every [`CHECK_EVERY`] while it cannot take it.
/// Dropped when the session leads or ends; the gauge then goes back to 0.
pub(super) struct SquatterWatch {
    metrics: Arc<Metrics>,
    last_check: Option<Instant>,
    /// A holder that calls itself a replica without heartbeating, and since when.
    unheard: Option<(Option<i32>, Instant)>,
    /// The squatter last logged: its pid, the kind of squat, and when.
    reported: Option<(Option<i32>, Discriminant<Squat>, Instant)>,
}

impl SquatterWatch {
    pub(super) fn new(metrics: Arc<Metrics>) -> SquatterWatch {
        SquatterWatch {
            metrics,
            last_check: None,
            unheard: None,
            reported: None,
        }
    }

    pub(super) async fn check(&mut self, client: &Client) -> Result<(), PgError> {
        if self.last_check.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
            return Ok(());
        }
        self.last_check = Some(Instant::now());
        let (holders, heartbeats) = locks::leader_holders(client, LEADER_LOCK).await?;
        let now = Instant::now();
        let mut unheard = None;
        let mut squatter = None;
        for h in &holders {
            let squat = match h.leader_squat(heartbeats) {
                None => continue,
                Some(Squat::NoHeartbeat) => {
                    let since = match self.unheard {
                        Some((pid, since)) if pid == h.pid => since,
                        _ => now,
                    };
                    unheard = Some((h.pid, since));
                    if now.duration_since(since) < NO_HEARTBEAT_GRACE {
                        continue;
                    }
                    Squat::NoHeartbeat
                }
                Some(s) => s,
            };
            squatter = Some((h, squat));
            break;
        }
        self.unheard = unheard;

        let gauge = self.metrics.lock_squatter.with_label_values(&[LOCK_LEADER]);
        let Some((h, squat)) = squatter else {
            gauge.set(0);
            if let Some((pid, _, _)) = self.reported.take() {
                tracing::info!(
                    lock = LOCK_LEADER,
                    pid,
                    "the leader lock is no longer held by a squatter"
                );
            }
            return Ok(());
        };
        gauge.set(1);
        let kind = discriminant(&squat);
        let due = self
            .reported
            .is_none_or(|(pid, k, at)| pid != h.pid || k != kind || at.elapsed() >= REPEAT_EVERY);
        if due {
            tracing::warn!(
                lock = LOCK_LEADER,
                pid = h.pid,
                user = h.user.as_deref(),
                application_name = h.application_name.as_deref(),
                why = %squat,
                "advisory lock squatter: a session that is not a live delta-bridge replica holds the leader lock, \
                 so no replica publishes; end it (SELECT pg_terminate_backend(pid)) unless it must finish first"
            );
            self.reported = Some((h.pid, kind, now));
        }
        Ok(())
    }
}

impl Drop for SquatterWatch {
    fn drop(&mut self) {
        self.metrics.lock_squatter.with_label_values(&[LOCK_LEADER]).set(0);
    }
}
