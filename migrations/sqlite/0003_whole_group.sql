-- Whole-group jobs: a .json body may carry the group itself (`Group`, the import_group body) and
-- its members (`Members`). Per group: import_group first, then the messages, then the members,
-- then unread counts. The step a group is in is derived from these rows, not stored.

-- The import_group request body to send before any message of the group, and its progress:
-- NULL (nothing to create), 'pending', 'created', or 'blocked' (with step_error).
ALTER TABLE groups ADD COLUMN spec TEXT;
ALTER TABLE groups ADD COLUMN create_state TEXT;
-- Attempts of import_group so far: a later 10021 ("ID in use") after an attempt of ours means
-- ours landed; on the very first attempt it means the group belongs to someone else.
ALTER TABLE groups ADD COLUMN create_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN step_error TEXT;
-- Unix ms before which the group's create/member steps wait (backoff).
ALTER TABLE groups ADD COLUMN retry_at INTEGER NOT NULL DEFAULT 0;

CREATE TABLE members (
    id             INTEGER PRIMARY KEY,
    group_id       TEXT NOT NULL REFERENCES groups(group_id),
    job_id         INTEGER NOT NULL REFERENCES jobs(id),
    member_account TEXT NOT NULL,
    role           TEXT,
    join_time      INTEGER,
    unread_msg_num INTEGER,
    state          TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'imported', 'failed')),
    -- import_group_member's Result: 0 refused, 1 added, 2 already a member.
    result         INTEGER,
    -- 'pending' when set_unread_msg_num must still set the member's unread count.
    unread_state   TEXT NOT NULL DEFAULT 'none'
                   CHECK (unread_state IN ('none', 'pending', 'set', 'failed')),
    result_text    TEXT,
    updated_at     INTEGER,
    UNIQUE (group_id, member_account)
) STRICT;
CREATE INDEX members_work ON members (group_id) WHERE state = 'pending' OR unread_state = 'pending';
