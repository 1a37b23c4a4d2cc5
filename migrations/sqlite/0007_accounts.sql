-- Accounts (import.accounts = "auto"): every sender, group owner and member the queue names, and
-- every account a job file lists with profile data, once per database. Recorded in the same
-- transaction as the job that names it; imported by the engine (multiaccount_import, at most 100
-- per request) before any message or membership that needs it is sent.
--   state    'pending' (to import), 'imported', 'failed' (reason says why; `timport retry
--            --accounts` puts it back to pending)
--   profile  1 when a job gave Nick/FaceUrl: sent in the AccountList form (which overwrites the
--            server's profile); 0: sent in the Accounts form (IDs only, an existing profile kept)
CREATE TABLE accounts (
    user_id    TEXT PRIMARY KEY,
    profile    INTEGER NOT NULL DEFAULT 0,
    nick       TEXT,
    face_url   TEXT,
    state      TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'imported', 'failed')),
    attempts   INTEGER NOT NULL DEFAULT 0,
    reason     TEXT,
    updated_at INTEGER
) STRICT, WITHOUT ROWID;
CREATE INDEX accounts_pending ON accounts (user_id) WHERE state = 'pending';
-- A database queued before accounts existed: what its queue still has to send names accounts too.
INSERT OR IGNORE INTO accounts(user_id)
    SELECT DISTINCT from_account FROM messages
    WHERE state IN ('pending', 'in_flight') AND from_account <> '';
INSERT OR IGNORE INTO accounts(user_id)
    SELECT DISTINCT member_account FROM members WHERE state = 'pending' AND member_account <> '';
INSERT OR IGNORE INTO accounts(user_id)
    SELECT DISTINCT spec ->> '$.Owner_Account' FROM groups
    WHERE create_state = 'pending' AND spec ->> '$.Owner_Account' <> '';
