-- queue.keep_bodies, space reused: message bodies live in their own table, keyed by message id.
-- Dropping the bodies of imported messages deletes whole runs of rows here, so their pages go to
-- SQLite's freelist and later bodies and messages take them before the file grows (a body set
-- to '' inside `messages` kept its page: new rows are appended at the end of the table).
-- A message has a row here while its body is kept; once dropped, messages.body_sha256 stands
-- for it (migrations/0006_verify.sql).
CREATE TABLE message_bodies (
    message_id INTEGER PRIMARY KEY REFERENCES messages(id),
    body       TEXT NOT NULL
) STRICT;

-- A queue from before: every body still kept moves across (in id order, so the new table is
-- written front to back), then the column goes (its pages become free for what follows).
INSERT INTO message_bodies (message_id, body)
SELECT id, body FROM messages WHERE body <> '' ORDER BY id;
ALTER TABLE messages DROP COLUMN body;
