-- High availability: one lease for the queue, the nodes that share it, and every lease ever
-- granted (the audit trail that lets tests and operators see that no two leases overlapped).

-- The one lease. token grows at every grant; expires_at is on the database's clock. A row always
-- exists (token 0: never granted).
CREATE TABLE ha_lease (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    token       BIGINT NOT NULL,
    node        TEXT NOT NULL,
    instance    TEXT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
INSERT INTO ha_lease (id, token, node, instance, acquired_at, expires_at)
VALUES (1, 0, '', '', '-infinity', '-infinity');

-- Every grant, one row per token: who held it, from when, and until when it could last (the
-- last renewal's expiry, or the release).
CREATE TABLE ha_leases (
    token       BIGINT PRIMARY KEY,
    node        TEXT NOT NULL,
    instance    TEXT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    released_at TIMESTAMPTZ
);

-- The nodes, as each last said of itself (heartbeat every ha.renew_every).
CREATE TABLE ha_nodes (
    node       TEXT PRIMARY KEY,
    instance   TEXT NOT NULL,
    role       TEXT NOT NULL,
    token      BIGINT,
    started_at TIMESTAMPTZ NOT NULL,
    seen_at    TIMESTAMPTZ NOT NULL
);

-- The fence: every write transaction of an active node calls this first. It takes the lease
-- row FOR SHARE, so a takeover's UPDATE waits for the transactions in progress and every later
-- one sees the new holder. A stale holder is refused with SQLSTATE TF001. Both the token and
-- the holder's instance must match: after a failover that lost the last grant, the same token
-- number could be granted again to another node.
CREATE FUNCTION timport_fence(expected BIGINT, holder TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    current_token BIGINT;
    current_instance TEXT;
BEGIN
    SELECT token, instance INTO current_token, current_instance
    FROM ha_lease WHERE id = 1 FOR SHARE;
    IF current_token IS DISTINCT FROM expected OR current_instance IS DISTINCT FROM holder THEN
        RAISE EXCEPTION 'fenced: this node''s lease (token %) is stale; the lease is at token %',
            expected, current_token
            USING ERRCODE = 'TF001';
    END IF;
END
$$;
