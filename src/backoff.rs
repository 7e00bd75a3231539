//! Retry pacing for every reconnect loop (PostgreSQL sessions, the MQTT publisher, migrations at start-up).
//! Pure: no clock of its own, it only says how long to wait next.

use std::time::Duration;

/// Exponential backoff with jitter, 100 ms to 5 s: a restarted broker or database sees a spread of retries.
/// [`Backoff::between`] paces other retries (a migration's statement that could not get its table's lock).
pub(crate) struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self::between(Duration::from_millis(100), Duration::from_secs(5))
    }
    /// Starts at `first`, doubles up to `max` (each with ±15% jitter).
    pub(crate) fn between(first: Duration, max: Duration) -> Self {
        Backoff {
            next: first,
            first,
            max: max.max(first),
        }
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.3 + 0.85;
        base.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let waits: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(waits[0] < Duration::from_millis(150));
        assert!(waits[9] <= Duration::from_millis(5750) && waits[9] >= Duration::from_millis(4250));
    }
}
