//! What /readyz reports: whether this replica holds its PostgreSQL session and its broker connection. Written
//! only by the tasks that own those connections; read by the HTTP surface.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Connection states for /readyz. Written by the tasks that own the connections.
#[derive(Default)]
pub(crate) struct Health {
    pub postgres: AtomicBool,
    pub mqtt: Arc<AtomicBool>,
}

impl Health {
    pub(crate) fn ready(&self) -> bool {
        self.postgres.load(Ordering::SeqCst) && self.mqtt.load(Ordering::SeqCst)
    }
}
