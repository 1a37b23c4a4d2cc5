-- `timport verify` (src/verify): every imported message read back from Tencent and classed.

-- One row per lane being (or last) verified. A lane is read from top_seq down to low_seq in
-- pages of 20; next_seq is the ReqMsgSeq of the next page not recorded yet (NULL: the lane's
-- newest, for a topic whose newest MsgSeq only a read tells). imported: the lane's imported count
-- when the pass began, so a lane imported into since is verified again.
CREATE TABLE verify_lanes (
    lane_id     INTEGER PRIMARY KEY REFERENCES lanes(id),
    imported    INTEGER NOT NULL,
    top_seq     INTEGER,
    low_seq     INTEGER NOT NULL,
    next_seq    INTEGER,
    done        INTEGER NOT NULL DEFAULT 0,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER
) STRICT;

-- The class of each imported message (message_id set), and the server's messages in the range
-- read that are not ours (message_id NULL: duplicated or foreign). expected and found describe
-- the messages as JSON (NULL when there is nothing to say). A page is recorded in one
-- transaction with the lane's next_seq, so a verify stopped at any instant resumes there.
CREATE TABLE verify_results (
    id         INTEGER PRIMARY KEY,
    lane_id    INTEGER NOT NULL,
    message_id INTEGER,
    msg_seq    INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN
               ('verified', 'missing', 'altered', 'unverifiable', 'duplicated', 'foreign')),
    expected   TEXT,
    found      TEXT
) STRICT;
CREATE INDEX verify_results_lane ON verify_results (lane_id, msg_seq);

-- A lane's imported messages by MsgSeq: verify reads each page's messages by range.
CREATE INDEX messages_lane_seq ON messages (lane_id, msg_seq) WHERE state = 'imported';

-- The quota share between a running verify and the daemon (see docs/OPERATIONS.md): verify
-- writes its rate and renews heartbeat_ms every second; the daemon lowers its own ceiling by
-- rate while the heartbeat is fresh and acknowledges the token.
CREATE TABLE verify_claim (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    token        TEXT NOT NULL,
    rate         REAL NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    ack_token    TEXT,
    ack_ms       INTEGER,
    ack_ceiling  REAL
) STRICT;

-- queue.keep_bodies: the body of an imported message may be dropped (set to '') once it is no
-- longer needed; body_sha256 keeps the SHA-256 of its canonical JSON text, so verify still
-- compares it (tencent::body::digest).
ALTER TABLE messages ADD COLUMN body_sha256 TEXT;
