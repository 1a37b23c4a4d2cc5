//! The intake table: rows that other programs insert into `intake` (see
//! `migrations/sqlite/0001_queue.sql` and the README) are validated like job-file lines and queued.
//!
//! One poll reads up to [`POLL_LIMIT`] new rows and, in one transaction, queues the valid ones
//! (status `queued`, `message_id` set) and marks the others `rejected` with the reason in `error`.
//! Each row is taken by an UPDATE that requires `status = 'new'` in that same transaction, so a
//! row another process took after it was read is skipped, never queued twice. A row whose Random
//! repeats one already queued in its group is rejected naming the earlier message; the others go
//! on. A crash before the commit leaves the rows `new`, so they are taken again; after it, they
//! are never taken twice.

use serde_json::Value;

use super::validate::{self, Fields};
use crate::store::{IntakeRow, Pushed, Store, StoreError, unix_now};

/// Rows taken per poll.
pub const POLL_LIMIT: i64 = 5_000;

/// What one poll did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollOutcome {
    pub queued: u64,
    pub rejected: u64,
    /// Rows another process took after they were read (left as that process marked them).
    pub skipped: u64,
}

/// Takes new rows once.
pub async fn poll_once(store: &Store) -> Result<PollOutcome, StoreError> {
    let rows = store.new_intake_rows(POLL_LIMIT).await?;
    take_rows(store, rows).await
}

/// Queues or rejects rows read by [`Store::new_intake_rows`], in one transaction. A row that is no
/// longer `new` by then is skipped.
pub async fn take_rows(store: &Store, rows: Vec<IntakeRow>) -> Result<PollOutcome, StoreError> {
    if rows.is_empty() {
        return Ok(PollOutcome::default());
    }
    let now = unix_now();
    let mut out = PollOutcome::default();
    let mut writer = store.job_writer("intake", "intake table").await?;
    for row in rows {
        if !writer.take_intake_row(row.id).await? {
            out.skipped += 1;
            continue;
        }
        // MsgBody is stored as JSON text: validated as a value, queued as that text (minified).
        // Any other SQLite type comes as its JSON, which validation reports as the wrong type.
        let body = match row.msg_body {
            Some(Value::String(s)) => Some(s),
            other => other.map(|v| v.to_string()),
        };
        let fields = Fields {
            group_id: row.group_id,
            topic_id: row.topic_id.filter(|t| t.as_str() != Some("")),
            recent_contact_flag: row.recent_contact_flag,
            from_account: row.from_account,
            send_time: row.send_time,
            random: row.random,
            msg_body: body,
        };
        match validate::message(&fields, None, now, row.id, 0) {
            Ok(msg) => match writer.push_returning_id(msg).await? {
                Pushed::Queued(id) => {
                    writer
                        .mark_intake_row(row.id, "queued", None, Some(id))
                        .await?;
                    out.queued += 1;
                }
                Pushed::Refused(conflict) => {
                    let reason = conflict.describe(writer.job_id());
                    writer
                        .mark_intake_row(row.id, "rejected", Some(&reason), None)
                        .await?;
                    out.rejected += 1;
                }
            },
            Err(problems) => {
                let reason = problems.join("; ");
                writer
                    .mark_intake_row(row.id, "rejected", Some(&reason), None)
                    .await?;
                out.rejected += 1;
            }
        }
    }
    writer.commit(None).await?;
    metrics::counter!("timport_intake_rows_total", "outcome" => "queued").increment(out.queued);
    metrics::counter!("timport_intake_rows_total", "outcome" => "rejected").increment(out.rejected);
    if out.queued + out.rejected + out.skipped > 0 {
        tracing::info!(
            queued = out.queued,
            rejected = out.rejected,
            skipped = out.skipped,
            "intake table rows taken"
        );
    }
    Ok(out)
}
