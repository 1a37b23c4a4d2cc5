//! The intake table: rows that other programs insert into `intake` (see
//! `migrations/0001_queue.sql` and the README) are validated like job-file lines and queued.
//!
//! One poll takes up to [`POLL_LIMIT`] new rows and, in one transaction, queues the valid ones
//! (status `queued`, `message_id` set) and marks the others `rejected` with the reason in `error`.
//! A crash before the commit leaves the rows `new`, so they are taken again; after it, they are
//! never taken twice.

use serde_json::Value;

use super::validate::{self, Fields};
use crate::store::{Store, StoreError, unix_now};

/// Rows taken per poll.
pub const POLL_LIMIT: i64 = 5_000;

/// What one poll did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollOutcome {
    pub queued: u64,
    pub rejected: u64,
}

/// Takes new rows once.
pub async fn poll_once(store: &Store) -> Result<PollOutcome, StoreError> {
    let rows = store.new_intake_rows(POLL_LIMIT).await?;
    if rows.is_empty() {
        return Ok(PollOutcome::default());
    }
    let now = unix_now();
    let mut out = PollOutcome::default();
    let mut writer = store.job_writer("intake", "intake table").await?;
    for row in rows {
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
            Ok(msg) => {
                let id = writer.push_returning_id(msg).await?;
                writer
                    .mark_intake_row(row.id, "queued", None, Some(id))
                    .await?;
                out.queued += 1;
            }
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
    if out.queued + out.rejected > 0 {
        tracing::info!(
            queued = out.queued,
            rejected = out.rejected,
            "intake table rows taken"
        );
    }
    Ok(out)
}
