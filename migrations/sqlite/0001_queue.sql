-- The queue. One writer (the daemon, or a CLI command holding BEGIN IMMEDIATE), many readers.
-- States are plain words so an operator can read them with the sqlite3 shell.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- One row per accepted job file (content_hash makes a second drop of the same bytes a no-op),
-- plus one row for everything that came through the intake table.
CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('file', 'intake')),
    source        TEXT NOT NULL,
    content_hash  TEXT UNIQUE,
    message_count INTEGER NOT NULL DEFAULT 0,
    group_count   INTEGER NOT NULL DEFAULT 0,
    -- Kept like the lane counters: by the intake on insert, by the trigger on state changes.
    pending       INTEGER NOT NULL DEFAULT 0,
    in_flight     INTEGER NOT NULL DEFAULT 0,
    imported      INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
) STRICT;

-- Per group: the counter behind assigned Random values. Assigned values are a bijection of this
-- counter, so they never repeat within a group (see intake::random).
CREATE TABLE groups (
    group_id       TEXT PRIMARY KEY,
    random_counter INTEGER NOT NULL DEFAULT 0
) STRICT;

-- One lane per (group, topic): the unit of ordering. topic_id '' means no topic.
-- The counters are kept by the intake (inserts) and by the trigger below (state changes), so that
-- status needs no scan of messages.
CREATE TABLE lanes (
    id              INTEGER PRIMARY KEY,
    group_id        TEXT NOT NULL REFERENCES groups(group_id),
    topic_id        TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'blocked')),
    blocked_code    INTEGER,
    blocked_reason  TEXT,
    -- 1 when the lane's last request had an unknown outcome (or the daemon stopped with it in
    -- flight): the server must be asked before anything is sent again.
    needs_reconcile INTEGER NOT NULL DEFAULT 0,
    -- Checkpoint: the newest SendTime and MsgSeq known to be on the server for this lane.
    last_send_time  INTEGER NOT NULL DEFAULT 0,
    last_msg_seq    INTEGER NOT NULL DEFAULT 0,
    -- Unix milliseconds before which the lane is not worked on (backoff after retryable answers).
    retry_at        INTEGER NOT NULL DEFAULT 0,
    pending         INTEGER NOT NULL DEFAULT 0,
    in_flight       INTEGER NOT NULL DEFAULT 0,
    imported        INTEGER NOT NULL DEFAULT 0,
    failed          INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (group_id, topic_id)
) STRICT;

-- The messages. id is the queue order; within a lane messages go out by (send_time, id).
CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    lane_id         INTEGER NOT NULL REFERENCES lanes(id),
    job_id          INTEGER NOT NULL REFERENCES jobs(id),
    -- Line in the job file (or the intake row id) and index within its MsgList.
    source_line     INTEGER NOT NULL,
    source_index    INTEGER NOT NULL DEFAULT 0,
    from_account    TEXT NOT NULL,
    send_time       INTEGER NOT NULL,
    -- The SendTime actually sent, when import.tie_policy = "nudge" moved it; NULL otherwise.
    sent_time       INTEGER,
    random          INTEGER NOT NULL CHECK (random BETWEEN 0 AND 4294967295),
    random_assigned INTEGER NOT NULL DEFAULT 0,
    recent_contact  INTEGER NOT NULL DEFAULT 0,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'in_flight', 'imported', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    msg_seq         INTEGER,
    msg_time        INTEGER,
    result_code     INTEGER,
    result_text     TEXT,
    updated_at      INTEGER
) STRICT;

-- "Next batch of this lane" and "what is in flight in this lane": a range scan of one lane.
CREATE INDEX messages_lane_queue ON messages (lane_id, state, send_time, id);
-- Failed messages only (few): the most common failure reasons and `timport retry`, without
-- scanning the imported millions. Per-job counts live on `jobs` (kept like the lane counters), so
-- no index on job_id is paid for on every queued message.
CREATE INDEX messages_failed ON messages (job_id, result_code) WHERE state = 'failed';

-- Which lanes each job put messages in (for `timport retry --job` to unblock them).
CREATE TABLE job_lanes (
    job_id  INTEGER NOT NULL REFERENCES jobs(id),
    lane_id INTEGER NOT NULL REFERENCES lanes(id),
    PRIMARY KEY (job_id, lane_id)
) STRICT, WITHOUT ROWID;

CREATE TRIGGER messages_state_counts AFTER UPDATE OF state ON messages
WHEN old.state <> new.state
BEGIN
    UPDATE lanes SET
        pending   = pending   + (new.state = 'pending')   - (old.state = 'pending'),
        in_flight = in_flight + (new.state = 'in_flight') - (old.state = 'in_flight'),
        imported  = imported  + (new.state = 'imported')  - (old.state = 'imported'),
        failed    = failed    + (new.state = 'failed')    - (old.state = 'failed')
    WHERE id = new.lane_id;
    UPDATE jobs SET
        pending   = pending   + (new.state = 'pending')   - (old.state = 'pending'),
        in_flight = in_flight + (new.state = 'in_flight') - (old.state = 'in_flight'),
        imported  = imported  + (new.state = 'imported')  - (old.state = 'imported'),
        failed    = failed    + (new.state = 'failed')    - (old.state = 'failed')
    WHERE id = new.job_id;
END;

-- The intake table, for other programs. Insert rows with status left at its default; the daemon
-- picks them up within a second, validates them like job-file lines and sets status to 'queued'
-- (message_id tells which message) or 'rejected' (error tells why). Columns are deliberately
-- loosely typed (no STRICT) so that a wrong value is reported, not refused by SQLite.
--   group_id      TEXT     required
--   topic_id      TEXT     optional (NULL or '' = none)
--   from_account  TEXT     required
--   send_time     INTEGER  required, Unix seconds, in the past
--   random        INTEGER  optional u32; assigned when NULL
--   msg_body      TEXT     required: the MsgBody JSON array
--   recent_contact_flag INTEGER optional 0/1
CREATE TABLE intake (
    id                  INTEGER PRIMARY KEY,
    group_id            TEXT,
    topic_id            TEXT,
    from_account        TEXT,
    send_time           INTEGER,
    random              INTEGER,
    msg_body            TEXT,
    recent_contact_flag INTEGER,
    created_at          INTEGER NOT NULL DEFAULT (unixepoch()),
    status              TEXT NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'queued', 'rejected')),
    error               TEXT,
    message_id          INTEGER,
    processed_at        INTEGER
);
CREATE INDEX intake_new ON intake (id) WHERE status = 'new';
