-- Catch-up (engine::reconcile::catch_up): before a lane sends, the pending messages the server
-- could already hold (a database put back to an older copy, a job file dropped in again) are
-- looked for in the group's history. checked_id: the newest message id of the lane that has been
-- looked for, so a message is looked for below the checkpoint once. catch_up_waived: set by
-- `timport retry` on a lane the engine blocked because the history could not be read
-- conclusively; the next catch-up takes the server's newest MsgSeq as the checkpoint instead.
ALTER TABLE lanes ADD COLUMN checked_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE lanes ADD COLUMN catch_up_waived INTEGER NOT NULL DEFAULT 0;
