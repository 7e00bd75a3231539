-- delta-bridge migration 3: the leader's heartbeat.
--
-- The replica that holds the leader lock (session advisory lock 7234298723002) writes its backend pid here every
-- second while it leads. A replica that cannot take the lock compares the holder in pg_locks with this row: a
-- holder that is not this backend, or whose heartbeat is more than a few seconds old, holds the lock without
-- publishing (some other session squats it, or the leader hangs), and the replica reports it
-- (delta_bridge_lock_squatter; docs/guarantees.md, "Several replicas"). One row; only the bridge's role, which
-- owns the schema, writes it.
CREATE TABLE delta_bridge.leader (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pid          integer NOT NULL,       -- pg_backend_pid() of the leader's session
    replica      text NOT NULL,          -- the leader's MQTT client id (hostname and pid expanded)
    since        timestamptz NOT NULL,   -- when this backend started leading
    heartbeat_at timestamptz NOT NULL
);
