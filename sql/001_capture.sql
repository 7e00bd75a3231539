-- delta-bridge migration 1: the outbox, the dead letters and the capture triggers.
--
-- Design (see README "How capture works"):
-- * Every published change is written to delta_bridge.outbox by a trigger, in the same database transaction as
--   the business write: it commits with it or vanishes with it. Nothing rolled back is ever captured.
-- * The capture triggers are DEFERRABLE INITIALLY DEFERRED constraint triggers: they run at commit time, after
--   every statement of the writer's transaction. So a sale's items are all there (even those inserted after the
--   sale row), and the outbox id is taken while the writer already holds the row's lock: for one row, ids (the
--   events' `seq`) increase in commit order.
-- * No NOTIFY per write: a writer notifies only while the bridge holds the "wake me" advisory lock exclusively,
--   which it does only while it is idle. Under load the bridge is busy and writers pay nothing for the wake-up.
-- * The capture trigger functions are SECURITY DEFINER: a writer needs no rights on the bridge's objects and
--   cannot call the enqueue functions to forge an event. The writer's role is read from the `role` setting
--   (SET ROLE) or session_user, not current_user (which is the owner inside them). The sale bookkeeping in
--   transaction-local settings stays in invoker functions without a SET clause: a function's SET clause
--   would undo the set_config(.., true) made inside it.
-- * No EXCEPTION blocks (they would open a subtransaction per row) and nothing here can fail on user data:
--   rows are stored as json (NaN and oddities survive); the bridge decides what it can convert.
--
-- @schema@ is replaced by the (quoted) schema of the business tables before this runs.

CREATE SCHEMA IF NOT EXISTS delta_bridge;
-- Lets the invoker trigger function capture_sales reach enqueue_sales; grants nothing on any table.
GRANT USAGE ON SCHEMA delta_bridge TO PUBLIC;

CREATE TABLE delta_bridge.meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- event_id = install_id || '-' || seq: unique even if the schema is ever dropped and reinstalled.
    install_id text NOT NULL DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 12)
);
INSERT INTO delta_bridge.meta DEFAULT VALUES;

-- CACHE 1 (the default) on purpose: ids are handed out in the order writers reach commit.
CREATE SEQUENCE delta_bridge.outbox_id_seq;

CREATE TABLE delta_bridge.outbox (
    id            bigint PRIMARY KEY DEFAULT nextval('delta_bridge.outbox_id_seq'),
    captured_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind          text NOT NULL,          -- stock | product | quantity | sale
    op            text NOT NULL,          -- INSERT | UPDATE
    merchant_code text,
    branch_code   text,
    product_name  text,                   -- for quantity events (inventory has no name of its own)
    old_row       json,
    new_row       json,
    items         json,                   -- for sale events: every item as committed
    ctx           json NOT NULL           -- writer's settings and role at commit
);
ALTER SEQUENCE delta_bridge.outbox_id_seq OWNED BY delta_bridge.outbox.id;
-- A queue table: rows live milliseconds. Vacuum it often so dead rows do not pile up in the index.
ALTER TABLE delta_bridge.outbox SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0, fillfactor = 100);

-- Events the bridge could not convert, or that the broker refused (PUBACK >= 0x80). Kept for operators;
-- SELECT delta_bridge.replay() puts them back in the outbox with their original seq and event_id.
CREATE TABLE delta_bridge.dead_letter (
    id            bigint PRIMARY KEY,
    captured_at   timestamptz NOT NULL,
    kind          text NOT NULL,
    op            text NOT NULL,
    merchant_code text,
    branch_code   text,
    product_name  text,
    old_row       json,
    new_row       json,
    items         json,
    ctx           json NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL,          -- unconvertible | rejected
    detail        text NOT NULL
);

CREATE FUNCTION delta_bridge.wake_key() RETURNS bigint LANGUAGE sql IMMUTABLE AS
$$ SELECT 7234298723001::bigint $$;

-- Replay dead letters (all, or the ids given). Returns how many went back to the outbox.
CREATE FUNCTION delta_bridge.replay(p_ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE n bigint;
BEGIN
    WITH moved AS (
        DELETE FROM delta_bridge.dead_letter WHERE p_ids IS NULL OR id = ANY (p_ids)
        RETURNING id, captured_at, kind, op, merchant_code, branch_code, product_name, old_row, new_row, items, ctx)
    INSERT INTO delta_bridge.outbox (id, captured_at, kind, op, merchant_code, branch_code, product_name,
                                     old_row, new_row, items, ctx)
    SELECT * FROM moved;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('delta_bridge_wake', 'replay');   -- the leader sweeps below its cursor at once
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION delta_bridge.replay(bigint[]) FROM PUBLIC;

-- The writer's context, read at commit by the trigger functions. Settings set with
-- set_config(.., true) read back as '' once their transaction is over: '' means unset.
CREATE FUNCTION delta_bridge.ctx() RETURNS json LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'reason',         nullif(current_setting('delta_bridge.reason', true), ''),
        'transaction_id', nullif(current_setting('delta_bridge.transaction_id', true), ''),
        'actor',          nullif(current_setting('delta_bridge.actor', true), ''),
        'db_user',        CASE WHEN current_setting('role') = 'none' THEN session_user::text
                               ELSE current_setting('role') END,
        'sale_id',        nullif(current_setting('delta_bridge._sale_id', true), ''))
$$;

-- Wake the bridge if (and only if) it is idle and waiting: it then holds wake_key exclusively, so our shared
-- try-lock fails. While it is busy the shared lock is granted and nobody pays for NOTIFY's commit lock.
-- A writer that uses two-phase commit sets delta_bridge.no_wake = 'on' (PREPARE TRANSACTION refuses a
-- transaction that called NOTIFY, and a prepared transaction would hold the wake lock until COMMIT PREPARED);
-- its changes are then picked up by the bridge's polling instead.
CREATE FUNCTION delta_bridge.wake() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('delta_bridge.no_wake', true), '') IN ('on', 'true', '1') THEN
        RETURN;
    END IF;
    IF NOT pg_try_advisory_xact_lock_shared(delta_bridge.wake_key()) THEN
        PERFORM pg_notify('delta_bridge_wake', '');
    END IF;
END $$;

CREATE FUNCTION delta_bridge.enqueue(p_kind text, p_op text, p_branch_id bigint, p_product_id bigint,
                                     p_old json, p_new json, p_ctx json) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE m text; b text; pname text;
BEGIN
    SELECT mm.code, bb.code INTO m, b
      FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
     WHERE bb.id = p_branch_id;
    IF p_product_id IS NOT NULL THEN
        SELECT p.name INTO pname FROM @schema@.products p WHERE p.id = p_product_id;
    END IF;
    INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, product_name, old_row, new_row, ctx)
    VALUES (p_kind, p_op, m, b, pname, p_old, p_new, p_ctx);
    PERFORM delta_bridge.wake();
END $$;

-- products: INSERT -> product; stock changed -> stock; name or price changed -> product (both may happen).
CREATE FUNCTION delta_bridge.capture_product() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE c json := delta_bridge.ctx();
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM delta_bridge.enqueue('product', TG_OP, NEW.branch_id, NULL, NULL, row_to_json(NEW), c);
        RETURN NULL;
    END IF;
    IF NEW.stock IS DISTINCT FROM OLD.stock THEN
        PERFORM delta_bridge.enqueue('stock', TG_OP, NEW.branch_id, NULL, row_to_json(OLD), row_to_json(NEW), c);
    END IF;
    IF NEW.name IS DISTINCT FROM OLD.name OR NEW.price IS DISTINCT FROM OLD.price THEN
        PERFORM delta_bridge.enqueue('product', TG_OP, NEW.branch_id, NULL, row_to_json(OLD), row_to_json(NEW), c);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION delta_bridge.capture_inventory() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM delta_bridge.enqueue('quantity', TG_OP, NEW.branch_id, NEW.product_id,
        CASE WHEN TG_OP = 'UPDATE' THEN row_to_json(OLD) END, row_to_json(NEW), delta_bridge.ctx());
    RETURN NULL;
END $$;

-- Immediate (not deferred) bookkeeping for sales, in transaction-local settings:
--   _sale_id   the last transactions row inserted or updated (reason "transaction" for stock/quantity events)
--   _sales     ',id,id,' every sale touched, through its row or its items: one event each at commit
--   _new_sales ',id,' sales inserted in this transaction: transaction_created rather than _updated
-- Invoker, no SET clause, touches no table: it only records sale ids in the writer's own settings.
CREATE FUNCTION delta_bridge.note_sale() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lst text := coalesce(nullif(current_setting('delta_bridge._sales', true), ''), ',');
    ids bigint[];
    sid bigint;
BEGIN
    IF TG_TABLE_NAME = 'transactions' THEN
        PERFORM set_config('delta_bridge._sale_id', NEW.id::text, true);
        IF TG_OP = 'INSERT' THEN
            PERFORM set_config('delta_bridge._new_sales',
                coalesce(nullif(current_setting('delta_bridge._new_sales', true), ''), ',') || NEW.id || ',', true);
        END IF;
        ids := ARRAY[NEW.id];
    ELSIF TG_OP = 'INSERT' THEN
        ids := ARRAY[NEW.transaction_id];
    ELSIF TG_OP = 'DELETE' THEN
        ids := ARRAY[OLD.transaction_id];
    ELSE
        ids := ARRAY[OLD.transaction_id, NEW.transaction_id];
    END IF;
    FOREACH sid IN ARRAY ids LOOP
        IF position(',' || sid || ',' IN lst) = 0 THEN
            lst := lst || sid || ',';
            PERFORM set_config('delta_bridge._sales', lst, true);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

-- At commit: one event per sale touched, with its final row and items, read at commit. It takes no lock: a
-- lock taken here, at commit, could deadlock with the writer's own locks and fail its transaction (a lock
-- taken earlier could too). Two transactions that change one sale without conflicting row locks (one adds
-- items, the other changes its status) and commit within the same few milliseconds may each snapshot the
-- sale without the other's change; writers that lock the sale row before adding items are not affected.
--
-- p_flushed is ',sale:outbox_id,' for sales already enqueued by this transaction (only after SET CONSTRAINTS
-- ... IMMEDIATE does capture run more than once per transaction): their row is updated in place, so a sale
-- still yields one event per transaction. Returns the pairs it added.
-- Refuses to run outside a trigger (it is reachable by writers through capture_sales).
CREATE FUNCTION delta_bridge.enqueue_sales(p_sales text, p_flushed text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE sid bigint; t record; its json; m text; b text; oid bigint; added text := '';
    p_new text := current_setting('delta_bridge._new_sales', true);
    p_ctx json := delta_bridge.ctx();
BEGIN
    IF pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION 'delta_bridge.enqueue_sales is called by the capture triggers only';
    END IF;
    FOR sid IN SELECT DISTINCT x::bigint FROM unnest(string_to_array(p_sales, ',')) AS x WHERE x <> '' ORDER BY 1
    LOOP
        SELECT * INTO t FROM @schema@.transactions WHERE id = sid;
        CONTINUE WHEN NOT FOUND;      -- deleted in the same transaction: nothing to tell
        SELECT coalesce(json_agg(json_build_object('product_id', i.product_id, 'quantity', i.quantity,
                                                   'price', i.price) ORDER BY i.id), '[]'::json)
          INTO its FROM @schema@.transaction_items i WHERE i.transaction_id = sid;
        SELECT mm.code, bb.code INTO m, b
          FROM @schema@.branches bb JOIN @schema@.merchants mm ON mm.id = bb.merchant_id
         WHERE bb.id = t.branch_id;
        oid := substring(coalesce(p_flushed, '') FROM ',' || sid || ':([0-9]+),')::bigint;
        IF oid IS NOT NULL THEN
            UPDATE delta_bridge.outbox
               SET merchant_code = m, branch_code = b, new_row = row_to_json(t), items = its, ctx = p_ctx
             WHERE id = oid;
        ELSE
            INSERT INTO delta_bridge.outbox (kind, op, merchant_code, branch_code, new_row, items, ctx)
            VALUES ('sale',
                    CASE WHEN position(',' || sid || ',' IN coalesce(p_new, '')) > 0 THEN 'INSERT' ELSE 'UPDATE' END,
                    m, b, row_to_json(t), its, p_ctx)
            RETURNING id INTO oid;
            added := added || sid || ':' || oid || ',';
        END IF;
    END LOOP;
    PERFORM delta_bridge.wake();
    RETURN added;
END $$;

-- Deferred, fires once per touched row at commit; the first firing flushes every noted sale and clears the
-- list, the others find it empty. (After SET CONSTRAINTS ... IMMEDIATE, later statements start a new list.)
CREATE FUNCTION delta_bridge.capture_sales() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lst text := nullif(nullif(current_setting('delta_bridge._sales', true), ''), ',');
    flushed text := coalesce(nullif(current_setting('delta_bridge._flushed', true), ''), ',');
BEGIN
    IF lst IS NOT NULL THEN
        PERFORM set_config('delta_bridge._sales', ',', true);
        PERFORM set_config('delta_bridge._flushed', flushed || delta_bridge.enqueue_sales(lst, flushed), true);
    END IF;
    RETURN NULL;
END $$;

-- Only the bridge's own (SECURITY DEFINER) functions may enqueue arbitrary rows.
REVOKE ALL ON FUNCTION delta_bridge.enqueue(text, text, bigint, bigint, json, json, json) FROM PUBLIC;
REVOKE ALL ON FUNCTION delta_bridge.ctx() FROM PUBLIC;

-- The sale snapshot reads items by sale: make sure that is an index lookup, not a scan of every item ever sold.
CREATE INDEX IF NOT EXISTS delta_bridge_items_by_sale ON @schema@.transaction_items (transaction_id);

CREATE CONSTRAINT TRIGGER delta_bridge_capture_ins AFTER INSERT ON @schema@.products
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_product();
CREATE CONSTRAINT TRIGGER delta_bridge_capture_upd AFTER UPDATE ON @schema@.products
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.stock IS DISTINCT FROM NEW.stock OR OLD.name IS DISTINCT FROM NEW.name
          OR OLD.price IS DISTINCT FROM NEW.price)
    EXECUTE FUNCTION delta_bridge.capture_product();

CREATE CONSTRAINT TRIGGER delta_bridge_capture_ins AFTER INSERT ON @schema@.inventory
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_inventory();
CREATE CONSTRAINT TRIGGER delta_bridge_capture_upd AFTER UPDATE ON @schema@.inventory
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.quantity IS DISTINCT FROM NEW.quantity)
    EXECUTE FUNCTION delta_bridge.capture_inventory();

-- AFTER triggers of one row fire in name order: the notes (delta_bridge_a_*) must run before the captures
-- (delta_bridge_capture*), which matters once SET CONSTRAINTS ... IMMEDIATE makes the captures fire per
-- statement.
CREATE TRIGGER delta_bridge_a_note_ins AFTER INSERT ON @schema@.transactions
    FOR EACH ROW EXECUTE FUNCTION delta_bridge.note_sale();
CREATE TRIGGER delta_bridge_a_note_upd AFTER UPDATE ON @schema@.transactions
    FOR EACH ROW
    WHEN ((OLD.branch_id, OLD.transaction_code, OLD.offline_id, OLD.status, OLD.grand_total, OLD.created_by,
           OLD.device_id)
          IS DISTINCT FROM
          (NEW.branch_id, NEW.transaction_code, NEW.offline_id, NEW.status, NEW.grand_total, NEW.created_by,
           NEW.device_id))
    EXECUTE FUNCTION delta_bridge.note_sale();
CREATE CONSTRAINT TRIGGER delta_bridge_capture AFTER INSERT OR UPDATE ON @schema@.transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_sales();

CREATE TRIGGER delta_bridge_a_note_ins_del AFTER INSERT OR DELETE ON @schema@.transaction_items
    FOR EACH ROW EXECUTE FUNCTION delta_bridge.note_sale();
CREATE TRIGGER delta_bridge_a_note_upd AFTER UPDATE ON @schema@.transaction_items
    FOR EACH ROW WHEN ((OLD.transaction_id, OLD.product_id, OLD.quantity, OLD.price)
                       IS DISTINCT FROM (NEW.transaction_id, NEW.product_id, NEW.quantity, NEW.price))
    EXECUTE FUNCTION delta_bridge.note_sale();
CREATE CONSTRAINT TRIGGER delta_bridge_capture AFTER INSERT OR UPDATE OR DELETE ON @schema@.transaction_items
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION delta_bridge.capture_sales();
