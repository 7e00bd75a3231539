-- delta-bridge migration 9: each products and inventory row's latest published seq, for the catch-up
-- snapshot (GET /api/v1/snapshot shows every row with the seq of its latest event, so that a device can drop
-- the stale events it fetches after the snapshot).
--
-- * Kept by number_events, in the statement that numbers the events (one more CTE, nothing in the writers'
--   path): for each freshly numbered products event (kinds 'product' and 'stock') or inventory event (kind
--   'quantity'), of any op, the row's seq becomes the greatest seen. Row ids come from the captured row (new_row,
--   or old_row for a delete). Numbered events are published, so a row's seq here is always an event a device
--   can have received or fetch from the change log.
-- * A row never published has no entry (the snapshot shows seq null). Entries of deleted rows stay (a few
--   bytes each; the snapshot joins on live rows only).
-- * number_events keeps its signature, its leader-lock check and its answer; only the upsert is added.

CREATE TABLE delta_bridge.row_seq (
    tbl    text   NOT NULL,          -- products | inventory
    row_id bigint NOT NULL,
    seq    bigint NOT NULL,
    PRIMARY KEY (tbl, row_id)
);

CREATE OR REPLACE FUNCTION delta_bridge.number_events(p_ids bigint[]) RETURNS TABLE (id bigint, branch_seq bigint, fresh boolean)
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
            SELECT o.id, o.merchant_code AS m, o.branch_code AS b, g.ord, o.kind,
                   coalesce(o.new_row, o.old_row) AS r
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
            RETURNING o.id, o.branch_seq),
         row_seqs AS (
            -- The rows of this read's products and inventory events, each with its latest seq (the outbox id).
            -- A row id that is not a whole number (a row put in the outbox by hand) is left out, never an error.
            INSERT INTO delta_bridge.row_seq AS t (tbl, row_id, seq)
            SELECT x.tbl, x.row_id::bigint, max(x.id)
              FROM (SELECT g.id, CASE WHEN g.kind IN ('product', 'stock') THEN 'products' ELSE 'inventory' END AS tbl,
                           g.r ->> 'id' AS row_id
                      FROM given g JOIN stored s ON s.id = g.id
                     WHERE g.kind IN ('product', 'stock', 'quantity')) x
             WHERE x.row_id ~ '^[0-9]{1,18}$'
             GROUP BY x.tbl, x.row_id::bigint
            ON CONFLICT (tbl, row_id) DO UPDATE SET seq = greatest(t.seq, EXCLUDED.seq))
    SELECT s.id, s.branch_seq, true FROM stored s
    UNION ALL
    -- Rows numbered earlier keep their number (this snapshot does not see the update above).
    SELECT o.id, o.branch_seq, false FROM delta_bridge.outbox o
     WHERE o.id = ANY (p_ids) AND o.branch_seq IS NOT NULL AND o.merchant_code IS NOT NULL
       AND o.branch_code IS NOT NULL;
END $$;

REVOKE ALL ON FUNCTION delta_bridge.number_events(bigint[]) FROM PUBLIC;
