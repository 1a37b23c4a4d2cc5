-- Set when the server refused a message for sharing the second of the group's latest message and
-- import.tie_policy = "nudge": from then on the lane sends equal SendTimes moved forward by the
-- fewest whole seconds that keep the order (messages.sent_time records what was sent).
ALTER TABLE lanes ADD COLUMN tie_nudge INTEGER NOT NULL DEFAULT 0;
-- Why the lane waits (the last retryable or unknown outcome), for status.
ALTER TABLE lanes ADD COLUMN last_error TEXT;

-- The scheduler's "which lanes have work" query, every tick: a partial index over the few lanes
-- with work, instead of a scan and sort of all lanes.
CREATE INDEX lanes_runnable ON lanes (retry_at, id)
    WHERE state = 'active' AND (pending > 0 OR in_flight > 0);
