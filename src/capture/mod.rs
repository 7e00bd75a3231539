//! Capture: the database side of the data path. The triggers of `sql/001_capture.sql` (installed by
//! [`crate::schema`]) record each committed change in `delta_bridge.outbox`; this module reads, deletes and
//! dead-letters outbox rows, and owns the advisory-lock keys. Knows nothing of MQTT or of payload formats: it
//! hands [`crate::convert::Captured`] rows to the pipeline and takes back ids.

pub(crate) mod change_log;
pub(crate) mod outbox;
