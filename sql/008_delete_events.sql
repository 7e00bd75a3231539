-- delta-bridge migration 8: delete events. Deleting a products row publishes product_deleted, an inventory row
-- inventory_deleted, a sale transaction_deleted; a row inserted and deleted in one database transaction
-- publishes nothing at all. Replaces the capture functions of migration 4 and adds DELETE triggers; everything
-- migration 4 promises (writers cannot reach the bookkeeping, pinned search_path, SECURITY DEFINER, the
-- TG_RELID check, partitions) holds for the new parts too.
--
-- * Outbox rows keep their kind (product = products rows, quantity = inventory rows, sale = transactions rows)
--   with op = 'DELETE', old_row = the deleted row and new_row NULL.
-- * products and inventory: the DELETE capture is a deferred constraint trigger like the INSERT and UPDATE
--   ones, so it runs at commit, after the row's earlier events (deferred triggers fire in the order their
--   events were queued, and a row is inserted before it is deleted). At commit:
--     - the INSERT and UPDATE captures look the row up by id first; a row that is gone is skipped (its delete
--       says all there is to say, or nothing if it was born here). An INSERT capture that finds its row gone
--       notes (this transaction, table, id) in row_born;
--     - the DELETE capture consumes that note: a row born in this transaction publishes nothing; any other
--       publishes its delete.
--   row_born is keyed by pg_current_xact_id() and written only by these SECURITY DEFINER functions (writers
--   have no right on it, so no setting and no write of theirs can suppress or fake a delete). Its rows are
--   deleted by the transaction that wrote them: none ever commits. UNLOGGED, like sale_notes. A row only gets
--   a note when it was inserted and deleted in the same transaction: an ordinary insert writes nothing there.
--   A count, not a flag: an id deleted, inserted again and deleted again in one transaction is noted twice.
-- * Sales: an immediate AFTER DELETE trigger on transactions (note_sale_gone) keeps the deleted row in
--   sale_gone, because at commit it is gone and the event needs it; it does so only when the sale existed
--   before this transaction (its sale_notes row does not say "created", and no earlier flush of this
--   transaction enqueued its transaction_created). It notes the sale in sale_notes/sale_dirty like any other
--   change of the sale, and a deferred DELETE capture on transactions makes sure a flush runs even when no
--   other trigger fires. flush_sales then publishes, for a noted sale that is gone, transaction_deleted if
--   sale_gone has it, else nothing (born and died here). Items removed with their sale by ON DELETE CASCADE
--   note the same sale, so the sale still yields one event for the transaction: the delete.
-- * The stock and quantity events' sale (reason "transaction") is the highest sale this transaction wrote and
--   that still exists: a deleted sale's outbox row is not taken.
--
-- @schema@ is replaced by the (quoted) schema of the business tables before this runs, and @schema_literal@ by
-- the same with its single quotes doubled, for use inside a string literal ('@schema_literal@.products').

CREATE UNLOGGED TABLE delta_bridge.row_born (
    xact   xid8    NOT NULL,
    tbl    text    NOT NULL,      -- products | inventory
    row_id bigint  NOT NULL,
    n      integer NOT NULL,      -- inserts of this id, by this transaction, found gone at commit
    PRIMARY KEY (xact, tbl, row_id)
);
CREATE UNLOGGED TABLE delta_bridge.sale_gone (
    xact    xid8   NOT NULL,
    sale_id bigint NOT NULL,
    old_row json   NOT NULL,      -- the sale as it was before this transaction deleted it
    PRIMARY KEY (xact, sale_id)
);
-- Every row is deleted by the transaction that wrote it: vacuum often, like the outbox.
ALTER TABLE delta_bridge.row_born SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE delta_bridge.sale_gone SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);

-- Immediate: a deleted sale that existed before this transaction is kept for its event (see above).
CREATE FUNCTION delta_bridge.note_sale_gone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP <> 'DELETE' THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.transactions'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.transactions'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    -- Born in this transaction: noted as created, or already published as created by an earlier flush of it
    -- (SET CONSTRAINTS ... IMMEDIATE) that did not replace a delete (a replaced delete keeps its old_row: the
    -- sale existed before). Then the sale's delete is nothing to tell.
    IF NOT EXISTS (SELECT 1 FROM delta_bridge.sale_notes s WHERE s.xact = x AND s.sale_id = OLD.id AND s.created)
       AND NOT EXISTS (SELECT 1 FROM delta_bridge.outbox o
                        WHERE o.xact = x AND o.sale_id = OLD.id AND o.op = 'INSERT' AND o.old_row IS NULL) THEN
        -- The first delete of this id wins: it is the row the devices know.
        INSERT INTO delta_bridge.sale_gone (xact, sale_id, old_row) VALUES (x, OLD.id, row_to_json(OLD))
            ON CONFLICT (xact, sale_id) DO NOTHING;
    END IF;
    INSERT INTO delta_bridge.sale_notes (xact, sale_id, created) VALUES (x, OLD.id, false)
        ON CONFLICT (xact, sale_id) DO NOTHING;
    INSERT INTO delta_bridge.sale_dirty (xact) VALUES (x) ON CONFLICT (xact) DO NOTHING;
    RETURN NULL;
END $$;

-- As in migration 4, and a noted sale that is gone now publishes its delete if it existed before.
CREATE OR REPLACE FUNCTION delta_bridge.flush_sales(p_xact xid8) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    n record; t record; its json; m text; b text; row_id bigint; row_op text; gone json;
    c json := delta_bridge.ctx(NULL);
    -- Rows to update exist only if an earlier flush in this transaction wrote some (immediate mode).
    earlier boolean := EXISTS (SELECT 1 FROM delta_bridge.outbox o WHERE o.xact = p_xact);
    -- One lookup per flush: most transactions delete no sale.
    any_gone boolean := EXISTS (SELECT 1 FROM delta_bridge.sale_gone g WHERE g.xact = p_xact);
BEGIN
    DELETE FROM delta_bridge.sale_dirty WHERE xact = p_xact;
    FOR n IN WITH noted AS (DELETE FROM delta_bridge.sale_notes WHERE xact = p_xact RETURNING sale_id, created)
             SELECT sale_id, created FROM noted ORDER BY sale_id
    LOOP
        row_id := NULL;
        row_op := NULL;
        IF earlier THEN
            SELECT o.id, o.op INTO row_id, row_op FROM delta_bridge.outbox o
             WHERE o.xact = p_xact AND o.sale_id = n.sale_id;
        END IF;
        SELECT * INTO t FROM @schema@.transactions WHERE id = n.sale_id;
        IF NOT FOUND THEN
            gone := NULL;
            IF any_gone THEN
                DELETE FROM delta_bridge.sale_gone g WHERE g.xact = p_xact AND g.sale_id = n.sale_id
                    RETURNING g.old_row INTO gone;
            END IF;
            IF gone IS NULL AND row_op = 'DELETE' THEN
                -- Told already by an earlier flush (immediate mode): the items that ON DELETE CASCADE removed
                -- after it noted the sale again.
                CONTINUE;
            ELSIF gone IS NULL THEN
                -- Inserted and deleted in this transaction: nothing to tell, and nothing told earlier in it.
                IF row_id IS NOT NULL THEN
                    DELETE FROM delta_bridge.outbox WHERE id = row_id;
                END IF;
                CONTINUE;
            END IF;
            SELECT mm.code, bb.code INTO m, b
              FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
             WHERE bb.id = (gone ->> 'branch_id')::bigint;
            IF row_id IS NOT NULL THEN
                -- An earlier flush told transaction_updated: it becomes the delete (one event per transaction).
                UPDATE delta_bridge.outbox
                   SET op = 'DELETE', merchant_code = m, branch_code = b, old_row = gone, new_row = NULL,
                       items = NULL, ctx = c
                 WHERE id = row_id;
            ELSE
                INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx, xact, sale_id)
                VALUES ('sale', 'DELETE', m, b, gone, c, p_xact, n.sale_id);
            END IF;
            CONTINUE;
        END IF;
        SELECT coalesce(json_agg(json_build_object('product_id', i.product_id, 'quantity', i.quantity,
                                                   'price', i.price) ORDER BY i.id), '[]'::json)
          INTO its FROM @schema@.transaction_items i WHERE i.transaction_id = n.sale_id;
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = t.branch_id;
        IF row_id IS NOT NULL THEN
            -- A delete told earlier in this transaction and inserted again since keeps its old_row, which
            -- says that the sale existed before the transaction (see note_sale_gone); conversion ignores it.
            UPDATE delta_bridge.outbox
               SET op = CASE WHEN n.created THEN 'INSERT' WHEN op = 'DELETE' THEN 'UPDATE' ELSE op END,
                   merchant_code = m, branch_code = b, new_row = row_to_json(t), items = its, ctx = c
             WHERE id = row_id;
        ELSE
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, items, ctx, xact, sale_id)
            VALUES ('sale', CASE WHEN n.created THEN 'INSERT' ELSE 'UPDATE' END, m, b, row_to_json(t), its, c,
                    p_xact, n.sale_id);
        END IF;
    END LOOP;
    -- A sale deleted and inserted again under the same id in this transaction exists at commit: its kept row
    -- is not needed, and must not outlive the transaction.
    IF any_gone THEN
        DELETE FROM delta_bridge.sale_gone g WHERE g.xact = p_xact;
    END IF;
    PERFORM delta_bridge.wake();
END $$;

-- products: INSERT -> product; stock changed -> stock; name or price changed -> product (both may happen);
-- DELETE -> product with op DELETE. An INSERT or UPDATE whose row is gone at commit publishes nothing.
CREATE OR REPLACE FUNCTION delta_bridge.capture_product() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8; sale bigint; c json; m text; b text; r record;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.products'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.products'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF TG_OP = 'DELETE' THEN
        r := OLD;
        -- Born in this transaction (its INSERT capture found it gone): nothing to tell.
        UPDATE delta_bridge.row_born rb SET n = rb.n - 1
         WHERE rb.xact = x AND rb.tbl = 'products' AND rb.row_id = OLD.id AND rb.n > 1;
        IF FOUND THEN
            RETURN NULL;
        END IF;
        DELETE FROM delta_bridge.row_born rb WHERE rb.xact = x AND rb.tbl = 'products' AND rb.row_id = OLD.id;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    ELSE
        r := NEW;
        IF NOT EXISTS (SELECT 1 FROM @schema@.products p WHERE p.id = NEW.id) THEN
            -- Deleted later in this transaction: its DELETE capture decides, knowing whether it was born here.
            IF TG_OP = 'INSERT' THEN
                INSERT INTO delta_bridge.row_born AS rb (xact, tbl, row_id, n) VALUES (x, 'products', NEW.id, 1)
                    ON CONFLICT (xact, tbl, row_id) DO UPDATE SET n = rb.n + 1;
            END IF;
            RETURN NULL;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    sale := (SELECT o.sale_id FROM delta_bridge.outbox o WHERE o.xact = x AND o.op <> 'DELETE'
              ORDER BY o.sale_id DESC LIMIT 1);
    c := json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        sale);
    SELECT mm.code, bb.code INTO m, b
      FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
     WHERE bb.id = r.branch_id;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, ctx)
        VALUES ('product', TG_OP, m, b, row_to_json(NEW), c);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx)
        VALUES ('product', TG_OP, m, b, row_to_json(OLD), c);
    ELSE
        IF NEW.stock IS DISTINCT FROM OLD.stock THEN
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, new_row, ctx)
            VALUES ('stock', TG_OP, m, b, row_to_json(OLD), row_to_json(NEW), c);
        END IF;
        IF NEW.name IS DISTINCT FROM OLD.name OR NEW.price IS DISTINCT FROM OLD.price THEN
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, new_row, ctx)
            VALUES ('product', TG_OP, m, b, row_to_json(OLD), row_to_json(NEW), c);
        END IF;
    END IF;
    -- wake(), inline.
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') NOT IN ('on', 'true', '1')
       AND NOT pg_try_advisory_xact_lock_shared(7234298723001) THEN
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
    RETURN NULL;
END $$;

-- inventory: INSERT or quantity changed -> quantity; DELETE -> quantity with op DELETE. As for products, an
-- INSERT or UPDATE whose row is gone at commit publishes nothing.
CREATE OR REPLACE FUNCTION delta_bridge.capture_inventory() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE x xid8; sale bigint; c json; m text; b text; pname text; r record;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RETURN NULL;
    END IF;
    IF TG_RELID <> '@schema_literal@.inventory'::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = '@schema_literal@.inventory'::regclass) THEN
        RETURN NULL;
    END IF;
    x := pg_current_xact_id();
    IF TG_OP = 'DELETE' THEN
        r := OLD;
        UPDATE delta_bridge.row_born rb SET n = rb.n - 1
         WHERE rb.xact = x AND rb.tbl = 'inventory' AND rb.row_id = OLD.id AND rb.n > 1;
        IF FOUND THEN
            RETURN NULL;
        END IF;
        DELETE FROM delta_bridge.row_born rb WHERE rb.xact = x AND rb.tbl = 'inventory' AND rb.row_id = OLD.id;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    ELSE
        r := NEW;
        IF NOT EXISTS (SELECT 1 FROM @schema@.inventory i WHERE i.id = NEW.id) THEN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO delta_bridge.row_born AS rb (xact, tbl, row_id, n) VALUES (x, 'inventory', NEW.id, 1)
                    ON CONFLICT (xact, tbl, row_id) DO UPDATE SET n = rb.n + 1;
            END IF;
            RETURN NULL;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM delta_bridge.sale_dirty d WHERE d.xact = x) THEN
        PERFORM delta_bridge.flush_sales(x);
    END IF;
    sale := (SELECT o.sale_id FROM delta_bridge.outbox o WHERE o.xact = x AND o.op <> 'DELETE'
              ORDER BY o.sale_id DESC LIMIT 1);
    c := json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        sale);
    SELECT mm.code, bb.code INTO m, b
      FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
     WHERE bb.id = r.branch_id;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, old_row, ctx)
        VALUES ('quantity', TG_OP, m, b, row_to_json(OLD), c);
    ELSE
        SELECT p.name INTO pname FROM @schema@.products p WHERE p.id = NEW.product_id;
        INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, product_name, old_row, new_row, ctx)
        VALUES ('quantity', TG_OP, m, b, pname, CASE WHEN TG_OP = 'UPDATE' THEN row_to_json(OLD) END,
                row_to_json(NEW), c);
    END IF;
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') NOT IN ('on', 'true', '1')
       AND NOT pg_try_advisory_xact_lock_shared(7234298723001) THEN
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
    RETURN NULL;
END $$;

-- As migration 4 does: nothing here is callable by PUBLIC (the default privileges cover the new function; this
-- says so again for a schema whose defaults someone changed).
REVOKE ALL ON FUNCTION delta_bridge.note_sale_gone() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER delta_bridge_capture_del AFTER DELETE ON @schema@.products
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_product();

CREATE CONSTRAINT TRIGGER delta_bridge_capture_del AFTER DELETE ON @schema@.inventory
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_inventory();

-- Named to sort before the captures, as migration 1's notes do.
CREATE TRIGGER delta_bridge_a_note_del AFTER DELETE ON @schema@.transactions
    FOR EACH ROW EXECUTE FUNCTION delta_bridge.note_sale_gone();
CREATE CONSTRAINT TRIGGER delta_bridge_capture_del AFTER DELETE ON @schema@.transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_sales();
