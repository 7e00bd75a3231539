//! Capture: the database side of the data path. Installs the triggers that record each committed change in
//! `delta_bridge.outbox` (sql/), and reads, deletes and dead-letters outbox rows. Knows nothing of MQTT or of
//! payload formats: it hands [`crate::convert::Captured`] rows to the pipeline and takes back ids.

pub(crate) mod outbox;
