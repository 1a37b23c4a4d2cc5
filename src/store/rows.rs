//! Rows as both backends read them: the same columns come back as the same Rust types
//! (integers as i64, flags as 0/1 integers, text as String), so each kind of row is mapped to
//! its struct once, here, for a SQLite row and a PostgreSQL row alike.

use sqlx::Row;

use super::{Lane, LaneStatus, MemberRow, QueuedMessage, VerifyOurs};

/// A row of either backend, read by column name.
pub(crate) trait QueueRow {
    fn int(&self, col: &str) -> i64;
    fn opt_int(&self, col: &str) -> Option<i64>;
    fn text(&self, col: &str) -> String;
    fn opt_text(&self, col: &str) -> Option<String>;
}

macro_rules! queue_row {
    ($row:ty) => {
        impl QueueRow for $row {
            fn int(&self, col: &str) -> i64 {
                self.get(col)
            }
            fn opt_int(&self, col: &str) -> Option<i64> {
                self.get(col)
            }
            fn text(&self, col: &str) -> String {
                self.get(col)
            }
            fn opt_text(&self, col: &str) -> Option<String> {
                self.get(col)
            }
        }
    };
}

queue_row!(sqlx::sqlite::SqliteRow);
queue_row!(sqlx::postgres::PgRow);

/// A Random as stored (0..=u32::MAX, checked by the schema).
fn random(r: &impl QueueRow) -> u32 {
    u32::try_from(r.int("random")).unwrap_or_default()
}

pub(crate) fn queued_message(r: &impl QueueRow) -> QueuedMessage {
    QueuedMessage {
        id: r.int("id"),
        from_account: r.text("from_account"),
        send_time: r.int("send_time"),
        sent_time: r.opt_int("sent_time"),
        random: random(r),
        recent_contact: r.int("recent_contact") != 0,
        body: r.text("body"),
        attempts: r.int("attempts"),
    }
}

pub(crate) fn lane_row(r: &impl QueueRow) -> Lane {
    Lane {
        id: r.int("id"),
        group_id: r.text("group_id"),
        topic_id: r.text("topic_id"),
        last_send_time: r.int("last_send_time"),
        last_msg_seq: r.int("last_msg_seq"),
        tie_nudge: r.int("tie_nudge") != 0,
        checked_id: r.int("checked_id"),
        catch_up_waived: r.int("catch_up_waived") != 0,
    }
}

pub(crate) fn member_row(r: &impl QueueRow) -> MemberRow {
    MemberRow {
        id: r.int("id"),
        account: r.text("member_account"),
        role: r.opt_text("role"),
        join_time: r.opt_int("join_time"),
        unread_msg_num: r.opt_int("unread_msg_num"),
    }
}

pub(crate) fn lane_status(r: &impl QueueRow) -> LaneStatus {
    LaneStatus {
        group_id: r.text("group_id"),
        topic_id: r.text("topic_id"),
        state: r.text("state"),
        pending: r.int("pending"),
        in_flight: r.int("in_flight"),
        imported: r.int("imported"),
        failed: r.int("failed"),
        blocked_code: r.opt_int("blocked_code"),
        blocked_reason: r.opt_text("blocked_reason"),
        last_send_time: r.int("last_send_time"),
        last_msg_seq: r.int("last_msg_seq"),
        step: r.text("step"),
    }
}

pub(crate) fn verify_ours_row(r: &impl QueueRow) -> VerifyOurs {
    VerifyOurs {
        id: r.int("id"),
        msg_seq: r.int("msg_seq"),
        from_account: r.text("from_account"),
        time: r.int("t"),
        random: random(r),
        body: r.text("body"),
        body_sha256: r.opt_text("body_sha256"),
    }
}
