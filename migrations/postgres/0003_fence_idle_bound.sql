-- The fence with a bound on how long its transaction may sit idle.
--
-- A node can freeze (SIGSTOP, a VM paused) or be cut off inside a fenced write transaction; the
-- FOR SHARE lock it holds on the lease row would keep a takeover waiting until the server
-- noticed (idle_in_transaction_session_timeout, 60 s by default here, or TCP keepalives). So the
-- fence bounds the transaction's idle time by idle_ms (the node's ha.renew_every, at least a
-- second; an operator's tighter bound stays). The node's lease outlives that bound, so by the time
-- the lease has expired the server has ended the frozen transaction and freed the row. A stale
-- holder is refused before it takes the lock at all.
--
-- The two-argument timport_fence of 0002 stays, so that a node of the previous release keeps
-- working during a rolling update.
CREATE FUNCTION timport_fence(expected BIGINT, holder TEXT, idle_ms INTEGER) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    current_token BIGINT;
    current_instance TEXT;
    idle_now INTERVAL;
BEGIN
    SELECT token, instance INTO current_token, current_instance FROM ha_lease WHERE id = 1;
    IF current_token IS DISTINCT FROM expected OR current_instance IS DISTINCT FROM holder THEN
        RAISE EXCEPTION 'fenced: this node''s lease (token %) is stale; the lease is at token %',
            expected, current_token
            USING ERRCODE = 'TF001';
    END IF;
    idle_now := current_setting('idle_in_transaction_session_timeout')::interval;
    IF idle_now = interval '0' OR idle_now > idle_ms * interval '1 millisecond' THEN
        PERFORM set_config('idle_in_transaction_session_timeout', idle_ms || 'ms', true);
    END IF;
    -- The locked check of 0002.
    PERFORM timport_fence(expected, holder);
END
$$;
