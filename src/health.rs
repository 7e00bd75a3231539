//! What /readyz reports: whether this replica holds its PostgreSQL session and its broker connection. Written
//! only by the tasks that own those connections; read by the HTTP surface (and the broker's, by the leader).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Connection states for /readyz. Written by the tasks that own the connections.
#[derive(Default)]
pub(crate) struct Health {
    pub postgres: AtomicBool,
    pub mqtt: Arc<AtomicBool>,
    /// When the broker was last heard from on this replica's connection.
    pub mqtt_heard: Arc<Heard>,
}

impl Health {
    pub(crate) fn ready(&self) -> bool {
        self.postgres.load(Ordering::SeqCst) && self.mqtt.load(Ordering::SeqCst)
    }
}

/// When the broker last sent anything (a CONNACK, a PUBACK, a ping response). A connection that silently
/// stopped working (a partition) is given up only once the keep-alive runs out, several seconds later; the
/// leader measures how long it has been without the broker from here, not from then.
#[derive(Default)]
pub(crate) struct Heard(Mutex<Option<Instant>>);

impl Heard {
    /// The broker was heard from just now.
    pub(crate) fn now(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// When it last was (None: never).
    pub(crate) fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
