-- delta-bridge migration 7: the change log, every numbered event as MQTT carries it, kept for
-- `catchup.retention` so that a device back from offline can fetch what it missed.
--
-- * The leader inserts an event's row in the same transaction that gives it its branch_seq (see migration 6):
--   the log holds exactly the numbered events, each once, with the payload's exact bytes.
-- * Partitioned by range on logged_at (the numbering transaction's time), one partition per
--   `catchup.partition_span` (a day): storage is reclaimed by dropping whole partitions once all of their rows
--   are older than the retention, never by deleting rows. The leader creates partitions ahead of time and drops
--   expired ones (change_log_maintain); change_log_partitions lists them with their bounds.
-- * Only the bridge's role (the owner) reads or writes it.

CREATE TABLE delta_bridge.change_log (
    logged_at     timestamptz NOT NULL,
    merchant_code text        NOT NULL,
    branch_code   text        NOT NULL,
    branch_seq    bigint      NOT NULL,
    seq           bigint      NOT NULL,
    event_id      text        NOT NULL,
    topic         text        NOT NULL,
    payload       bytea       NOT NULL      -- exactly the bytes MQTT carried
) PARTITION BY RANGE (logged_at);
-- A branch's events in order (what a device asks for), and the oldest row (what the age metric reads).
CREATE INDEX change_log_by_branch ON delta_bridge.change_log (merchant_code, branch_code, branch_seq);
CREATE INDEX change_log_by_time ON delta_bridge.change_log (logged_at);

CREATE TABLE delta_bridge.change_log_partitions (
    name        text PRIMARY KEY,
    lower_bound timestamptz NOT NULL,
    upper_bound timestamptz NOT NULL
);

-- Creates the partitions covering [now, now + p_ahead spans) that are missing, and drops the partitions whose
-- upper bound is at least p_keep old. Spans are aligned on the Unix epoch (UTC midnight for a day). What
-- cannot get its lock within 100 ms (a long read of the log holds it) is left for the next call: the
-- partitions to drop from there on, or to create from there on (they are created days ahead). So a call
-- waits 200 ms at most.
-- Returns how many partitions it created and dropped, and until when partitions now exist without a break.
-- The span is fixed for a database (a partition of another span would overlap, and creating it fails).
CREATE FUNCTION delta_bridge.change_log_maintain(p_span_seconds bigint, p_keep interval, p_ahead integer)
RETURNS TABLE (created integer, dropped integer, covered_until timestamptz)
-- Bounds are rendered as text for CREATE TABLE: TimeZone and DateStyle are pinned so that the session's own
-- settings cannot shift them.
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    now_s  double precision := extract(epoch FROM clock_timestamp());
    first  bigint := floor(now_s / p_span_seconds)::bigint * p_span_seconds;
    lo timestamptz; hi timestamptz; part text; p record;
    covered timestamptz := to_timestamp(first);
    n_created integer := 0; n_dropped integer := 0;
BEGIN
    IF p_span_seconds < 1 OR p_ahead < 1 THEN
        RAISE EXCEPTION 'change_log_maintain: span % s, % ahead', p_span_seconds, p_ahead;
    END IF;
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR i IN 0 .. p_ahead - 1 LOOP
        lo := to_timestamp(first + i * p_span_seconds);
        hi := to_timestamp(first + (i + 1) * p_span_seconds);
        part := 'change_log_' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS');
        -- The catalog says whether it exists (a partition dropped by hand is made again).
        IF to_regclass(format('delta_bridge.%I', part)) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE delta_bridge.%I PARTITION OF delta_bridge.change_log FOR VALUES FROM (%L) TO (%L)',
                               part, lo, hi);
            EXCEPTION WHEN lock_not_available THEN
                EXIT;   -- busy: the next call creates it
            END;
            n_created := n_created + 1;
        END IF;
        INSERT INTO delta_bridge.change_log_partitions (name, lower_bound, upper_bound) VALUES (part, lo, hi)
            ON CONFLICT (name) DO NOTHING;
        covered := hi;
    END LOOP;
    FOR p IN SELECT c.name FROM delta_bridge.change_log_partitions c
              WHERE c.upper_bound <= clock_timestamp() - p_keep ORDER BY c.lower_bound
    LOOP
        BEGIN
            EXECUTE format('DROP TABLE IF EXISTS delta_bridge.%I', p.name);
            DELETE FROM delta_bridge.change_log_partitions c WHERE c.name = p.name;
            n_dropped := n_dropped + 1;
        EXCEPTION WHEN lock_not_available THEN
            EXIT;   -- busy: the next call drops it, and the ones after it
        END;
    END LOOP;
    RETURN QUERY SELECT n_created, n_dropped, covered;
END $$;
REVOKE ALL ON FUNCTION delta_bridge.change_log_maintain(bigint, interval, integer) FROM PUBLIC;
