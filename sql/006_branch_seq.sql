-- delta-bridge migration 6: branch_seq, every event's number in its merchant+branch (1, 2, 3, ... no gaps).
--
-- * The writers' capture triggers are not touched: a per-branch counter taken at the writer's commit would
--   make a branch's tills commit one at a time. The leader numbers events instead, after converting a read
--   and before handing its events to the publisher, in one transaction of its own (number_events below):
--   the branch's counter goes up by the events that have no number yet, in the order the leader will publish
--   them, and each number is stored on its outbox row. Only once that has committed is any of them
--   published, so a number is durable before anyone sees it.
-- * A row that already has a number (read again after a restart, a failover, a refusal and a replay) keeps it:
--   conversion is deterministic, so the event is rebuilt byte for byte. Rows that cannot be converted, or
--   that publish nothing, never get a number: the numbers of a branch stay contiguous.
-- * Only the leader numbers: number_events refuses to run on a session that does not hold the leader lock
--   (advisory lock 7234298723002), so a replica that lost the lead cannot commit a number.
-- * A dead letter keeps its number (the broker refused an event that was numbered and logged); replay() puts
--   it back with it.

CREATE TABLE delta_bridge.branch_counter (
    merchant_code text   NOT NULL,
    branch_code   text   NOT NULL,
    last_seq      bigint NOT NULL CHECK (last_seq >= 1),   -- the highest branch_seq given out
    PRIMARY KEY (merchant_code, branch_code)
);

-- No default, nullable: adding the columns rewrites nothing (a short lock on the outbox).
ALTER TABLE delta_bridge.outbox ADD COLUMN branch_seq bigint;
ALTER TABLE delta_bridge.dead_letter ADD COLUMN branch_seq bigint;

-- Numbers the outbox rows p_ids that have none yet, in the order given, per merchant+branch; returns the rows
-- of p_ids that are in the outbox with a merchant and branch, each with its number and whether it is new. One
-- statement: every row of p_ids that it numbers is read and updated in the same snapshot. Fails (and numbers
-- nothing) unless this session holds the leader lock. The caller checks that every row came back.
CREATE FUNCTION delta_bridge.number_events(p_ids bigint[]) RETURNS TABLE (id bigint, branch_seq bigint, fresh boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_locks l
                    WHERE l.locktype = 'advisory' AND l.granted AND l.pid = pg_backend_pid() AND l.objsubid = 1
                      AND l.mode = 'ExclusiveLock'   -- a shared hold of the key is no lead
                      AND ((l.classid::bigint << 32) | l.objid::bigint) = 7234298723002) THEN
        RAISE EXCEPTION 'delta_bridge.number_events: this session does not hold the leader lock'
            USING ERRCODE = 'lock_not_available';
    END IF;
    RETURN QUERY
    WITH given AS (
            SELECT o.id, o.merchant_code AS m, o.branch_code AS b, g.ord
              FROM (SELECT DISTINCT ON (u.id) u.id, u.ord           -- an id given twice is numbered once
                      FROM unnest(p_ids) WITH ORDINALITY AS u (id, ord) ORDER BY u.id, u.ord) g
              JOIN delta_bridge.outbox o ON o.id = g.id
             WHERE o.branch_seq IS NULL AND o.merchant_code IS NOT NULL AND o.branch_code IS NOT NULL),
         ranked AS (
            SELECT g.id, g.m, g.b, row_number() OVER (PARTITION BY g.m, g.b ORDER BY g.ord) AS k,
                   count(*) OVER (PARTITION BY g.m, g.b) AS n
              FROM given g),
         bumped AS (
            INSERT INTO delta_bridge.branch_counter AS c (merchant_code, branch_code, last_seq)
            SELECT r.m, r.b, max(r.n) FROM ranked r GROUP BY r.m, r.b
            ON CONFLICT (merchant_code, branch_code) DO UPDATE SET last_seq = c.last_seq + EXCLUDED.last_seq
            RETURNING c.merchant_code AS m, c.branch_code AS b, c.last_seq),
         stored AS (
            UPDATE delta_bridge.outbox o SET branch_seq = u.last_seq - r.n + r.k
              FROM ranked r JOIN bumped u ON u.m = r.m AND u.b = r.b
             WHERE o.id = r.id AND o.branch_seq IS NULL             -- never a second number
            RETURNING o.id, o.branch_seq)
    SELECT s.id, s.branch_seq, true FROM stored s
    UNION ALL
    -- Rows numbered earlier keep their number (this snapshot does not see the update above).
    SELECT o.id, o.branch_seq, false FROM delta_bridge.outbox o
     WHERE o.id = ANY (p_ids) AND o.branch_seq IS NOT NULL AND o.merchant_code IS NOT NULL
       AND o.branch_code IS NOT NULL;
END $$;

REVOKE ALL ON FUNCTION delta_bridge.number_events(bigint[]) FROM PUBLIC;

-- As in migration 1 (and SECURITY DEFINER as migration 4 made it), now with the dead letter's number.
CREATE OR REPLACE FUNCTION delta_bridge.replay(p_ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE n bigint;
BEGIN
    WITH moved AS (
        DELETE FROM delta_bridge.dead_letter WHERE p_ids IS NULL OR id = ANY (p_ids)
        RETURNING id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx,
                  branch_seq)
    INSERT INTO delta_bridge.outbox (id, captured_at, kind, op, merchant_code, branch_code, product_name,
                                     old_row, new_row, items, ctx, branch_seq)
    SELECT * FROM moved;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('delta_bridge_wake', 'replay');   -- the leader sweeps below its cursor at once
    RETURN n;
END $$;
