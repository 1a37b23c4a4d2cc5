//! Data carried in and out of the store, the same for every backend: what intake queues, what the
//! engine claims and records, what status and verify read.

use serde::Serialize;

/// A HashMap for keys looked up per message (group and lane names from the job's own file).
pub(crate) type FastMap<K, V> = foldhash::HashMap<K, V>;

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Current Unix time in milliseconds.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Intake: queueing validated messages.

/// A validated message, ready to be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub group_id: String,
    /// Empty when the message has no topic.
    pub topic_id: String,
    pub from_account: String,
    pub send_time: i64,
    /// The caller's Random, if given; otherwise one is assigned at queue time.
    pub random: Option<u32>,
    pub recent_contact: bool,
    /// The MsgBody array as compact JSON.
    pub body: String,
    /// Line in the job file (1-based) or intake row id.
    pub source_line: i64,
    /// Index within its MsgList (0 for NDJSON lines and intake rows).
    pub source_index: i64,
}

/// A member to import into a group after its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMember {
    pub account: String,
    pub role: Option<String>,
    pub join_time: Option<i64>,
    pub unread_msg_num: Option<i64>,
}

/// Where a Random was given or assigned before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EarlierRandom {
    pub job_id: i64,
    /// `file` or `intake`.
    pub kind: String,
    /// The job's file name.
    pub source: String,
    /// Line in the job file, or intake row id.
    pub source_line: i64,
    pub source_index: i64,
    /// True when timport assigned the value (the earlier message had no Random of its own).
    pub assigned: bool,
}

/// A caller-given Random that repeats one already queued in its group. Tencent drops the later of
/// two messages with the same Random within its window (which may count on arrival) and may still
/// answer it as imported, so such a message is refused at intake instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RandomConflict {
    pub group_id: String,
    pub random: u32,
    /// Line (or intake row id) and MsgList index of the refused message.
    pub source_line: i64,
    pub source_index: i64,
    pub earlier: EarlierRandom,
}

impl RandomConflict {
    /// The problem as a report names it; `this_job` is the job being queued.
    pub fn describe(&self, this_job: i64) -> String {
        let e = &self.earlier;
        let index = if e.source_index > 0 {
            format!(" (MsgList index {})", e.source_index)
        } else {
            String::new()
        };
        let at = match (e.kind.as_str(), e.job_id == this_job) {
            ("intake", _) => format!("intake row {}", e.source_line),
            (_, true) => format!("line {}{index} of this file", e.source_line),
            _ => format!(
                "job {} ({}) line {}{index}",
                e.job_id, e.source, e.source_line
            ),
        };
        format!(
            "Random {} repeats the Random {} {at} in group {}: Tencent would drop one of the two as a duplicate; give another Random or none",
            self.random,
            if e.assigned {
                "assigned to"
            } else {
                "given at"
            },
            self.group_id
        )
    }
}

/// What [`JobWriter::push_returning_id`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// Queued as this message id.
    Queued(i64),
    /// Not queued: its Random repeats one queued before in the group.
    Refused(RandomConflict),
}

/// What became of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobOutcome {
    /// Queued as job `job_id`.
    Accepted {
        job_id: i64,
        messages: i64,
        groups: i64,
    },
    /// The same content was queued before, as `job_id`; nothing was added.
    Duplicate { job_id: i64 },
}

/// A row of the intake table as another program wrote it (loosely typed on purpose).
#[derive(Debug, Clone)]
pub struct IntakeRow {
    pub id: i64,
    pub group_id: Option<serde_json::Value>,
    pub topic_id: Option<serde_json::Value>,
    pub from_account: Option<serde_json::Value>,
    pub send_time: Option<serde_json::Value>,
    pub random: Option<serde_json::Value>,
    pub msg_body: Option<serde_json::Value>,
    pub recent_contact_flag: Option<serde_json::Value>,
}

// ---------------------------------------------------------------------------------------------
// Status: read-only queries over the counters (no scan of messages).

/// Message counts. `blocked` counts the pending and in-flight messages of blocked lanes, which
/// are not in `pending`/`in_flight`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub pending: i64,
    pub in_flight: i64,
    pub imported: i64,
    pub failed: i64,
    pub blocked: i64,
    pub total: i64,
    pub lanes: i64,
    pub lanes_blocked: i64,
}

/// One lane (group, topic) as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneStatus {
    pub group_id: String,
    pub topic_id: String,
    pub state: String,
    pub pending: i64,
    pub in_flight: i64,
    pub imported: i64,
    pub failed: i64,
    pub blocked_code: Option<i64>,
    pub blocked_reason: Option<String>,
    pub last_send_time: i64,
    pub last_msg_seq: i64,
    /// Where the group is: create, messages, members, unread, done (or "create blocked").
    pub step: String,
}

/// One job as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobStatus {
    pub id: i64,
    pub kind: String,
    pub source: String,
    pub messages: i64,
    pub groups: i64,
    pub pending: i64,
    pub in_flight: i64,
    pub imported: i64,
    pub failed: i64,
    pub created_at: i64,
}

/// A kind of failure and how many messages have it: the code and the reason with its numbers
/// (SendTimes, sequences, indexes) replaced by `N`, so one cause is one line however many
/// messages it hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureReason {
    pub code: Option<i64>,
    /// The reason with its numbers replaced by `N` (see [`reason_kind`]).
    pub reason: String,
    pub messages: i64,
    /// One of the reasons as recorded, for its numbers.
    pub example: String,
}

/// A failure text with every run of digits but the code itself written `N`: "SendTime 1700000003
/// is older than … (1700000009) … (10004)" becomes "SendTime N is older than … (N) … (10004)".
pub fn reason_kind(code: Option<i64>, text: &str) -> String {
    let code = code.map(|c| c.to_string());
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if !digits.is_empty() {
            if code.as_deref() == Some(digits.as_str()) {
                out.push_str(digits);
            } else {
                out.push('N');
            }
            digits.clear();
        }
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// The import engine's reads and checkpoints.

/// A lane as the engine works it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    pub id: i64,
    pub group_id: String,
    pub topic_id: String,
    pub last_send_time: i64,
    pub last_msg_seq: i64,
    pub tie_nudge: bool,
    /// The newest message id already looked for on the server by a catch-up.
    pub checked_id: i64,
    /// `timport retry` said: take the server's history as it is (see the catch-up).
    pub catch_up_waived: bool,
}

/// A queued message as the engine sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: i64,
    pub from_account: String,
    pub send_time: i64,
    pub sent_time: Option<i64>,
    pub random: u32,
    pub recent_contact: bool,
    pub body: String,
    pub attempts: i64,
}

impl QueuedMessage {
    /// The SendTime that goes (went) to the server.
    pub fn effective_time(&self) -> i64 {
        self.sent_time.unwrap_or(self.send_time)
    }
}

/// What to record for one message after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageUpdate {
    Imported {
        id: i64,
        msg_seq: i64,
        msg_time: i64,
        note: Option<String>,
    },
    Failed {
        id: i64,
        code: Option<i64>,
        reason: String,
    },
    /// Back to pending. `refund` gives the attempt back (rate limits, auth stops, blocked lanes).
    Pending { id: i64, refund: bool },
    /// Stays in flight, outcome unknown; `note` says why (the engine reconciles before resending).
    Unknown { id: i64, note: String },
    /// A pending (or in-flight) message found on the server by a catch-up: imported.
    Adopted {
        id: i64,
        msg_seq: i64,
        msg_time: i64,
        note: String,
    },
}

/// Lane fields to change with the message updates, in the same transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneUpdate {
    /// Raise the checkpoint to at least this SendTime / MsgSeq.
    pub seen_send_time: Option<i64>,
    pub seen_msg_seq: Option<i64>,
    /// Unix ms before which the lane is left alone.
    pub retry_at: Option<i64>,
    pub block: Option<(Option<i64>, String)>,
    pub tie_nudge: bool,
    pub last_error: Option<String>,
    /// A catch-up looked for every message up to this id (and consumed a retry's waiver).
    pub checked_id: Option<i64>,
}

/// One lane's next batch to claim: up to `max` messages, cut at ties when `cut_at_tie`.
#[derive(Debug, Clone)]
pub struct Claim {
    pub lane: Lane,
    pub max: usize,
    pub cut_at_tie: bool,
}

/// One lane's answer to record (see [`Store::record_many`]), and optionally its next claim.
#[derive(Debug, Clone)]
pub struct Record {
    pub lane_id: i64,
    pub updates: Vec<MessageUpdate>,
    pub lane: LaneUpdate,
    pub next: Option<Claim>,
}

/// What `timport retry` applies to.
#[derive(Debug, Clone, Copy)]
pub enum RetryScope<'a> {
    All,
    Group(&'a str),
    Job(i64),
}

// ---------------------------------------------------------------------------------------------
// Accounts (import.accounts = "auto"): every sender, owner and member a job names is recorded in
// the job's own transaction; the engine imports them before anything that needs them is sent.

/// The reason a message (or membership) fails when its account could not be imported; `timport
/// retry --accounts` finds them by it.
pub const ACCOUNT_FAILED_REASON: &str = "sender account could not be imported";

/// An account listed with profile data in a job file (`AccountList`, NDJSON `{"UserID", ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    pub user_id: String,
    pub nick: Option<String>,
    pub face_url: Option<String>,
}

/// A pending account as the engine sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAccount {
    pub user_id: String,
    pub nick: Option<String>,
    pub face_url: Option<String>,
}

/// Where an account stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountState {
    Pending,
    Imported,
    Failed(String),
}

/// Account counts for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AccountTotals {
    pub imported: i64,
    pub pending: i64,
    pub failed: i64,
}

/// What `timport retry --accounts` put back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountRetry {
    pub accounts: u64,
    pub messages: u64,
    pub members: u64,
}

// ---------------------------------------------------------------------------------------------
// Whole-group steps: create the group before its messages, members and unread counts after.

/// A group whose import_group is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupToCreate {
    pub group_id: String,
    pub spec: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// A member whose import (or unread count) is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub id: i64,
    pub account: String,
    pub role: Option<String>,
    pub join_time: Option<i64>,
    pub unread_msg_num: Option<i64>,
}

/// What became of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberUpdate {
    /// Result 1 or 2; `unread_pending` when its unread count must still be set.
    Imported {
        id: i64,
        result: i64,
        unread_pending: bool,
    },
    Failed {
        id: i64,
        result: Option<i64>,
        reason: String,
    },
    UnreadSet {
        id: i64,
    },
    UnreadFailed {
        id: i64,
        reason: String,
    },
}

/// Member counts for status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemberTotals {
    pub pending: i64,
    pub imported: i64,
    pub failed: i64,
    pub unread_pending: i64,
}

// ---------------------------------------------------------------------------------------------
// `timport verify`: the lanes it reads back, the class of every imported message, the quota claim.

/// A lane in the scope of a verify, with where its last pass stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyLane {
    pub lane_id: i64,
    pub group_id: String,
    pub topic_id: String,
    /// Imported messages now.
    pub imported: i64,
    /// Pending and in flight now (the import of the lane is not finished).
    pub unfinished: i64,
    /// The oldest and newest MsgSeq recorded for the lane's imported messages.
    pub low_seq: i64,
    pub high_seq: i64,
    /// The pass recorded for the lane, if any.
    pub pass: Option<VerifyPass>,
}

/// Where a lane's verify pass stands (`verify_lanes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyPass {
    /// The lane's imported count when the pass began.
    pub imported: i64,
    pub top_seq: Option<i64>,
    pub low_seq: i64,
    /// ReqMsgSeq of the next page to read; `None` with `top_seq` `None`: from the newest.
    pub next_seq: Option<i64>,
    pub done: bool,
}

/// One of our imported messages, as verify compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOurs {
    pub id: i64,
    pub msg_seq: i64,
    pub from_account: String,
    /// The SendTime actually sent.
    pub time: i64,
    pub random: u32,
    /// Empty once dropped (`queue.keep_bodies`); then `body_sha256` stands for it.
    pub body: String,
    pub body_sha256: Option<String>,
}

/// One class recorded for a message (ours: `message_id` set) or a server message not ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyRow {
    pub message_id: Option<i64>,
    pub msg_seq: i64,
    pub kind: &'static str,
    /// JSON texts.
    pub expected: Option<String>,
    pub found: Option<String>,
}

/// Counts per lane of the recorded classes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyCounts {
    pub group: String,
    pub topic: String,
    #[serde(skip)]
    pub lane_id: i64,
    pub verified: i64,
    pub missing: i64,
    pub altered: i64,
    pub duplicated: i64,
    pub unverifiable: i64,
    pub foreign: i64,
    /// The pass read the whole range.
    pub done: bool,
}

/// A recorded problem (any class but verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblemRow {
    pub group: String,
    pub topic: String,
    pub msg_seq: i64,
    pub kind: String,
    pub expected: Option<String>,
    pub found: Option<String>,
}

/// The quota claim of a running verify (`verify_claim`).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyClaim {
    pub token: String,
    pub rate: f64,
    pub heartbeat_ms: i64,
    pub ack_token: Option<String>,
    pub ack_ms: Option<i64>,
}

/// Imported messages whose bodies may be dropped now, and the cursor to store with them.
#[derive(Debug, Default)]
pub struct BodiesToDrop {
    /// (message id, body).
    pub messages: Vec<(i64, String)>,
    /// For "until verified": the `verify_results.id` looked at through.
    pub cursor: Option<i64>,
    /// Fewer than asked for: nothing more to do for now.
    pub last: bool,
}
/// The accounts one job names, written at its commit.
#[derive(Debug, Default)]
pub(crate) struct JobAccounts {
    /// Named as sender, owner or member (IDs only).
    pub(crate) named: FastMap<String, ()>,
    /// Listed with profile data.
    pub(crate) profiles: Vec<NewAccount>,
}

impl JobAccounts {
    pub(crate) fn name(&mut self, id: &str) {
        if !id.is_empty() && !self.named.contains_key(id) {
            self.named.insert(id.to_string(), ());
        }
    }

    /// The `Owner_Account` of an import_group body, if it has one.
    pub(crate) fn name_owner(&mut self, spec: &str) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(spec)
            && let Some(owner) = v.get("Owner_Account").and_then(|o| o.as_str())
        {
            self.name(owner);
        }
    }
}

/// High availability: who asks for the lease (a node name, and this process's instance id, so
/// that a restarted node with the same name is a new holder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaNodeId {
    pub node: String,
    pub instance: String,
}

/// What every write transaction of the active node proves first (see `timport_fence` in
/// migrations/postgres/0003_fence_idle_bound.sql): the lease's token and holder instance, and how long such a
/// transaction may sit idle before the server ends it (so a node frozen or cut off inside one
/// cannot hold the lease row, and with it a takeover, beyond its lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaFence {
    pub token: i64,
    pub instance: String,
    pub idle_bound: std::time::Duration,
}

/// A lease this node was granted or renewed: its token and when it expires on the database's
/// clock (Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaGrant {
    pub token: i64,
    pub expires_at_ms: i64,
}

/// The lease as the database holds it (token 0: never granted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaLeaseRow {
    pub token: i64,
    pub node: String,
    pub instance: String,
    pub acquired_at_ms: i64,
    pub expires_at_ms: i64,
    /// The database's clock when this was read.
    pub now_ms: i64,
}

/// One node, as it last said of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaNodeRow {
    pub node: String,
    pub instance: String,
    pub role: String,
    pub token: Option<i64>,
    pub started_at_ms: i64,
    pub seen_at_ms: i64,
}

/// One grant of the lease, from `ha_leases` (the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaLeaseGrant {
    pub token: i64,
    pub node: String,
    pub instance: String,
    pub acquired_at_ms: i64,
    pub expires_at_ms: i64,
    pub released_at_ms: Option<i64>,
}

/// The high-availability state of a queue: the lease and the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaView {
    pub lease: HaLeaseRow,
    pub nodes: Vec<HaNodeRow>,
}
