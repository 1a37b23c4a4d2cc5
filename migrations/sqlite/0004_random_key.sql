-- Assigned Randoms unique across databases, and no Random repeated within a group.

-- The secret behind this database's assigned Randoms: 128 random bits (SQLite's randomblob, from
-- the operating system's random source), drawn once, here. A database that assigned Randoms
-- before keys existed keeps the sequence it started ('legacy'), so no value repeats within a
-- group across the upgrade. Never shown by timport.
INSERT INTO meta(key, value)
SELECT 'random_key',
       CASE WHEN EXISTS (SELECT 1 FROM groups WHERE random_counter > 0) THEN 'legacy'
            ELSE lower(hex(randomblob(16))) END
WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'random_key');

-- Randoms given by callers, one row per (group, value): intake refuses a second message of the
-- group with the same value, and assignment skips the counter whose value a caller took.
-- counter is the value's position in the group's assigned sequence (the inverse of the keyed
-- permutation); timport fills it at start where it is NULL (rows copied below).
CREATE TABLE caller_randoms (
    group_id     TEXT NOT NULL,
    random       INTEGER NOT NULL,
    counter      INTEGER,
    -- Where the value was given: the job and its line (or intake row id) and MsgList index.
    job_id       INTEGER NOT NULL,
    source_line  INTEGER NOT NULL,
    source_index INTEGER NOT NULL,
    PRIMARY KEY (group_id, random)
) STRICT, WITHOUT ROWID;

INSERT OR IGNORE INTO caller_randoms(group_id, random, job_id, source_line, source_index)
SELECT l.group_id, m.random, m.job_id, m.source_line, m.source_index
FROM messages m JOIN lanes l ON l.id = m.lane_id
WHERE m.random_assigned = 0
ORDER BY m.id;

-- "The next counter a caller's value occupies" when assigning.
CREATE INDEX caller_randoms_counter ON caller_randoms (group_id, counter);
CREATE INDEX caller_randoms_uncounted ON caller_randoms (group_id) WHERE counter IS NULL;
