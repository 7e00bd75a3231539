-- delta-bridge migration 11: row_seq (migration 9) for every row id the bridge publishes, and for events
-- numbered before migration 9.
--
-- * number_events took a row id into row_seq only when its text was 1 to 18 digits: a negative id (which the
--   bridge publishes like any other) or a 19-digit one got no entry, so its snapshot row showed seq null. Now
--   any whole number in the bigint range is taken, checked before the cast (never an error: a row id that is
--   not one, put in the outbox by hand, is still left out). Same signature, leader-lock check and answer.
--   A row image whose fields cannot be read as text (row_key_of below) gets no entry instead of failing the
--   numbering.
-- * An install that numbered events before migration 9 has them in the change log but not in row_seq: each
--   products and inventory row gets the greatest seq of its events still in the log (event type and id read
--   from the payload; a payload that does not parse is skipped). An entry already greater stays.
-- * row_seq also keeps the `updated_by` its row's latest event carried (the row's column, else the writer's
--   actor, else its role, as the converter resolves it), so that the snapshot can show what the events show
--   for a row whose column is unset.

ALTER TABLE delta_bridge.row_seq ADD COLUMN IF NOT EXISTS updated_by text;

CREATE OR REPLACE FUNCTION delta_bridge.row_id_of(p_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN p_id ~ '^-?[0-9]{1,40}$'
                 AND p_id::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
                THEN p_id::numeric::bigint END
$$;

REVOKE ALL ON FUNCTION delta_bridge.row_id_of(text) FROM PUBLIC;

-- The id and updated_by of a captured row image, or nulls when they cannot be read: `->>` parses the whole
-- object, and fails on what PostgreSQL's json type stores but cannot turn into text (a \u0000 escape in any
-- field, an escape beyond ASCII in a SQL_ASCII database). Such a row is published (the converter reads it);
-- it must never make the numbering fail, which would stop publishing for every branch.
CREATE OR REPLACE FUNCTION delta_bridge.row_key_of(p_row json, OUT row_id bigint, OUT updated_by text)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    row_id := delta_bridge.row_id_of(p_row ->> 'id');
    updated_by := p_row ->> 'updated_by';
EXCEPTION WHEN OTHERS THEN
    row_id := NULL;
    updated_by := NULL;
END $$;

REVOKE ALL ON FUNCTION delta_bridge.row_key_of(json) FROM PUBLIC;

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
            -- The rows of this read's products and inventory events, each with its latest seq (the outbox id)
            -- and the updated_by that event carries. A row id that is not a whole number in the bigint range
            -- is left out, never an error.
            INSERT INTO delta_bridge.row_seq AS t (tbl, row_id, seq, updated_by)
            SELECT DISTINCT ON (x.tbl, x.row_id) x.tbl, x.row_id, x.id, x.updated_by
              FROM (SELECT g.id, CASE WHEN g.kind IN ('product', 'stock') THEN 'products' ELSE 'inventory' END AS tbl,
                           k.row_id,
                           coalesce(k.updated_by, nullif(o.ctx ->> 'actor', ''), o.ctx ->> 'db_user', '')
                               AS updated_by
                      FROM given g JOIN stored s ON s.id = g.id JOIN delta_bridge.outbox o ON o.id = g.id
                           CROSS JOIN LATERAL delta_bridge.row_key_of(g.r) k
                     WHERE g.kind IN ('product', 'stock', 'quantity')) x
             WHERE x.row_id IS NOT NULL
             ORDER BY x.tbl, x.row_id, x.id DESC
            ON CONFLICT (tbl, row_id) DO UPDATE
               SET seq = greatest(t.seq, EXCLUDED.seq),
                   updated_by = CASE WHEN EXCLUDED.seq >= t.seq THEN EXCLUDED.updated_by ELSE t.updated_by END)
    SELECT s.id, s.branch_seq, true FROM stored s
    UNION ALL
    -- Rows numbered earlier keep their number (this snapshot does not see the update above).
    SELECT o.id, o.branch_seq, false FROM delta_bridge.outbox o
     WHERE o.id = ANY (p_ids) AND o.branch_seq IS NOT NULL AND o.merchant_code IS NOT NULL
       AND o.branch_code IS NOT NULL;
END $$;

REVOKE ALL ON FUNCTION delta_bridge.number_events(bigint[]) FROM PUBLIC;

-- A payload as JSON, or null when it is not (only for the backfill below, then dropped).
CREATE OR REPLACE FUNCTION delta_bridge.backfill_payload(p bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN convert_from(p, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END $$;

INSERT INTO delta_bridge.row_seq AS t (tbl, row_id, seq, updated_by)
SELECT DISTINCT ON (x.tbl, x.row_id) x.tbl, x.row_id, x.seq, x.updated_by
  FROM (SELECT l.seq,
               CASE WHEN j ->> 'event_type' IN ('product_updated', 'stock_updated', 'product_deleted') THEN 'products'
                    ELSE 'inventory' END AS tbl,
               delta_bridge.row_id_of(CASE WHEN j ->> 'event_type' IN ('quantity_updated', 'inventory_deleted')
                                           THEN j -> 'data' ->> 'inventory_id'
                                           ELSE j -> 'data' ->> 'product_id' END) AS row_id,
               j -> 'data' ->> 'updated_by' AS updated_by
          FROM delta_bridge.change_log l, delta_bridge.backfill_payload(l.payload) AS j
         WHERE j ->> 'event_type' IN ('product_updated', 'stock_updated', 'product_deleted',
                                     'quantity_updated', 'inventory_deleted')) x
 WHERE x.row_id IS NOT NULL
 ORDER BY x.tbl, x.row_id, x.seq DESC
ON CONFLICT (tbl, row_id) DO UPDATE
   SET seq = greatest(t.seq, EXCLUDED.seq),
       updated_by = CASE WHEN EXCLUDED.seq >= t.seq THEN EXCLUDED.updated_by ELSE t.updated_by END;

DROP FUNCTION delta_bridge.backfill_payload(bytea);
