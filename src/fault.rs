//! Fault injection for the crate's own tests: cargo feature `fault-injection`, off by default and in every
//! build of the service (the Dockerfile's `--no-default-features` included); only this package's
//! dev-dependency on itself turns it on, for `cargo test`. It exists because the bridge's tasks have no
//! panic that can be caused from outside, yet the supervision of those tasks must be shown to work.
//!
//! With the feature, `DELTA_BRIDGE_FAULT=<task>:<marker>` (task `pipeline` or `publisher`) makes that task
//! panic when it handles an event whose payload contains `marker`. Without the feature [`check`] does
//! nothing and the variable is not read.

/// The tasks a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Task {
    Pipeline,
    Publisher,
}

#[cfg(feature = "fault-injection")]
impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Pipeline => "pipeline",
            Task::Publisher => "publisher",
        }
    }
}

/// Panics if `DELTA_BRIDGE_FAULT` asks `task` to fail on this payload.
#[cfg(feature = "fault-injection")]
pub(crate) fn check(task: Task, payload: &[u8]) {
    use std::sync::OnceLock;
    static FAULT: OnceLock<Option<(String, String)>> = OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("DELTA_BRIDGE_FAULT").ok()?;
        let (t, marker) = v.split_once(':')?;
        Some((t.to_string(), marker.to_string()))
    });
    if let Some((t, marker)) = fault {
        if t == task.name() && !marker.is_empty() && payload.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            panic!("fault injection: the {t} task fails on an event containing {marker:?}");
        }
    }
}

/// Does nothing: built without the `fault-injection` feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn check(_task: Task, _payload: &[u8]) {}
