//! The simulator's in-memory world and the documented rules, free of HTTP: groups, their
//! per-(group, topic) histories, members, the request log and the app quota.
//!
//! Role: every endpoint handler is a method here that takes the parsed body and the clock and
//! returns Tencent's answer plus whether state changed. Stopping and recovery: nothing persists;
//! a restart starts from the configured groups. All methods run under one mutex and never await.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::tencent::types::*;

/// Largest accepted serialized `MsgBody`, bytes (larger: per-message Result 80002).
pub const MAX_BODY_BYTES: usize = 12_000;
/// Most messages per import request.
pub const MAX_MSGS_PER_IMPORT: usize = 7;
/// Most members per import_group_member request.
pub const MAX_MEMBERS_PER_IMPORT: usize = 300;
/// Most messages per group_msg_get_simple page.
pub const MAX_PAGE: u32 = 20;
/// Most groups per get_group_info request.
pub const MAX_GROUP_INFO: usize = 50;
/// Most accounts per multiaccount_import request.
pub const MAX_ACCOUNTS_PER_IMPORT: usize = 100;
/// Longest UserID, bytes.
pub const MAX_USER_ID_BYTES: usize = 32;
/// Request records kept for [`SimSnapshot::requests`] (oldest dropped first).
pub const MAX_REQUEST_RECORDS: usize = 100_000;

const ALLOWED_ELEMS: [&str; 4] = [
    "TIMTextElem",
    "TIMFaceElem",
    "TIMLocationElem",
    "TIMCustomElem",
];

/// One stored message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    #[serde(rename = "MsgSeq")]
    pub msg_seq: u64,
    #[serde(rename = "From_Account")]
    pub from_account: String,
    #[serde(rename = "SendTime")]
    pub send_time: i64,
    #[serde(rename = "Random")]
    pub random: u32,
    /// The body parsed (what group_msg_get_simple answers: re-formatted, keys sorted, as the
    /// strict reading of Tencent's read-back has it).
    #[serde(rename = "MsgBody")]
    pub msg_body: Value,
    /// The body exactly as it arrived, byte for byte, so tests can compare what was sent.
    #[serde(rename = "MsgBodyBytes", default)]
    pub msg_body_bytes: String,
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSnapshot {
    #[serde(rename = "Member_Account")]
    pub member_account: String,
    #[serde(rename = "Role")]
    pub role: String,
    #[serde(rename = "JoinTime")]
    pub join_time: i64,
    #[serde(rename = "UnreadMsgNum")]
    pub unread_msg_num: u64,
}

/// One group as tests and `GET /admin/state` see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    #[serde(rename = "GroupId")]
    pub group_id: String,
    #[serde(rename = "Type")]
    pub group_type: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Owner_Account", default)]
    pub owner_account: Option<String>,
    #[serde(rename = "CreateTime")]
    pub create_time: i64,
    /// The group's own history (no topic), in MsgSeq order.
    #[serde(rename = "Messages")]
    pub messages: Vec<StoredMessage>,
    /// Histories per TopicId.
    #[serde(rename = "Topics", default)]
    pub topics: BTreeMap<String, Vec<StoredMessage>>,
    #[serde(rename = "Members")]
    pub members: Vec<MemberSnapshot>,
}

/// One request the simulator received on `/v4/...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Arrival order, from 1.
    pub seq: u64,
    /// Arrival time, Unix milliseconds (before the injected latency).
    #[serde(default)]
    pub at_ms: i64,
    /// The path prefix before `/v4`, without leading or trailing slashes (`node-a` for
    /// `/node-a/v4/...`, `a/b` for `/a/b/v4/...`); "" when none. Tells apart daemons that share
    /// one simulator, each with its own `tencent.base_url` path.
    #[serde(default)]
    pub prefix: String,
    /// The command, e.g. `import_group_msg`.
    pub endpoint: String,
    /// The `random` query parameter, when it was a valid u32.
    pub query_random: Option<u32>,
    /// HTTP status answered; `None` when the connection was closed without an answer.
    pub http_status: Option<u16>,
    /// `ErrorCode` answered, when a JSON answer was sent (or computed and then dropped).
    pub error_code: Option<i64>,
    /// Per-message `Result`s of an import, in order.
    pub results: Vec<i64>,
    /// The injected fault, if any: `http_502`, `reset_before`, `drop_response_after_apply`,
    /// `error_10002`, `rate_limit`.
    pub fault: Option<String>,
    /// Whether the request changed state.
    pub applied: bool,
    /// multiaccount_import: the accounts it imported (created or updated), in order.
    #[serde(default)]
    pub accounts: Vec<String>,
}

/// Full state dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimSnapshot {
    pub groups: Vec<GroupSnapshot>,
    pub requests: Vec<RequestRecord>,
    /// The app's accounts (imported by multiaccount_import), by UserID.
    #[serde(default)]
    pub accounts: Vec<AccountSnapshot>,
}

/// One account of the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSnapshot {
    #[serde(rename = "UserID")]
    pub user_id: String,
    #[serde(rename = "Nick")]
    pub nick: Option<String>,
    #[serde(rename = "FaceUrl")]
    pub face_url: Option<String>,
}

/// What import_group_msg does with a sender that is not an account (`--require-accounts`):
/// `tencent-api.md` §9 does not know which Tencent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownSender {
    /// The strict reading (default): the whole request is refused with 10019.
    #[default]
    WholeRequest,
    /// That message alone gets Result 10019.
    PerMessage,
}

impl SimSnapshot {
    /// The group with this ID.
    pub fn group(&self, id: &str) -> Option<&GroupSnapshot> {
        self.groups.iter().find(|g| g.group_id == id)
    }

    /// The requests to one endpoint.
    pub fn requests_to<'a>(&'a self, endpoint: &'a str) -> impl Iterator<Item = &'a RequestRecord> {
        self.requests.iter().filter(move |r| r.endpoint == endpoint)
    }
}

struct Msg {
    stored: StoredMessage,
    arrived: Instant,
    /// Tampered by [`World::tamper`]: gone from every read (its MsgSeq stays used).
    lost: bool,
    /// Tampered: reads back as a hole (IsPlaceMsg 1, no sender, no Random).
    hole: bool,
}

/// What [`World::tamper`] does to a stored message (`POST /admin/tamper`), for tests of
/// `timport verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "Action", rename_all = "lowercase")]
pub enum Tamper {
    /// The server loses it: no read returns it any more.
    Lose,
    /// Its body becomes `MsgBody`.
    Alter {
        #[serde(rename = "MsgBody")]
        msg_body: Value,
    },
    /// A copy (same sender, SendTime, Random and body) lands at the end of the history with the
    /// next MsgSeq, as a message sent twice would.
    Duplicate,
    /// It reads back as a hole (IsPlaceMsg 1), as an expired or deleted message does.
    Hole,
}

#[derive(Default)]
struct History {
    messages: Vec<Msg>,
    /// Random → index of the newest message with it.
    by_random: HashMap<u32, usize>,
}

impl History {
    /// The stored messages, without those lost by [`World::tamper`].
    fn snapshot(&self) -> Vec<StoredMessage> {
        self.messages
            .iter()
            .filter(|m| !m.lost)
            .map(|m| m.stored.clone())
            .collect()
    }

    fn latest_time(&self) -> Option<i64> {
        self.messages.last().map(|m| m.stored.send_time)
    }
}

struct Group {
    group_type: String,
    name: String,
    owner: Option<String>,
    create_time: i64,
    main: History,
    topics: BTreeMap<String, History>,
    members: Vec<MemberSnapshot>,
}

impl Group {
    fn new(group_type: &str, name: &str, owner: Option<String>, create_time: i64) -> Self {
        let members = owner
            .iter()
            .map(|o| MemberSnapshot {
                member_account: o.clone(),
                role: "Owner".into(),
                join_time: create_time,
                unread_msg_num: 0,
            })
            .collect();
        Group {
            group_type: group_type.to_owned(),
            name: name.to_owned(),
            owner,
            create_time,
            main: History::default(),
            topics: BTreeMap::new(),
            members,
        }
    }

    fn message_count(&self) -> u64 {
        self.main.messages.len() as u64
    }
}

/// Rules that come from the configuration.
#[derive(Debug, Clone)]
pub struct Rules {
    pub requests_per_second: u32,
    /// How `requests_per_second` is counted.
    pub limiter: Limiter,
    pub dedup_window: Duration,
    pub strict_equal_time: bool,
    pub auto_create_groups: bool,
    /// Messages older than this (by SendTime) read back as holes.
    pub history_retention: Option<Duration>,
    /// Senders, owners and members must be accounts (imported by multiaccount_import).
    pub require_accounts: bool,
    pub unknown_sender: UnknownSender,
    /// multiaccount_import's own quota, calls/s (60007 above it).
    pub account_requests_per_second: u32,
}

/// An answer: the JSON body (envelope included) and whether state changed.
pub struct Answer {
    pub body: Value,
    pub applied: bool,
    pub error_code: i64,
    pub results: Vec<i64>,
}

impl Answer {
    fn ok(mut fields: Value, applied: bool) -> Self {
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("ActionStatus".into(), json!("OK"));
            obj.insert("ErrorInfo".into(), json!(""));
            obj.insert("ErrorCode".into(), json!(0));
        }
        Answer {
            body: fields,
            applied,
            error_code: 0,
            results: Vec::new(),
        }
    }

    /// A failed answer with `code` and `info`.
    pub fn fail(code: i64, info: impl Into<String>) -> Self {
        Answer {
            body: json!({"ActionStatus": "FAIL", "ErrorInfo": info.into(), "ErrorCode": code}),
            applied: false,
            error_code: code,
            results: Vec::new(),
        }
    }
}

/// The whole simulated app.
pub struct World {
    rules: Rules,
    groups: BTreeMap<String, Group>,
    requests: VecDeque<RequestRecord>,
    next_request: u64,
    /// The app quota.
    quota: QuotaLimiter,
    next_group_id: u64,
    /// Accounts: UserID to (Nick, FaceUrl).
    accounts: BTreeMap<String, (Option<String>, Option<String>)>,
    /// multiaccount_import's own quota.
    account_quota: QuotaLimiter,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, Answer> {
    serde_json::from_value(body.clone())
        .map_err(|e| Answer::fail(10004, format!("invalid parameter: {e}")))
}

/// Request-level validation of one message (sender, element types, one custom element).
fn check_message(m: &ImportMsg) -> Result<(), String> {
    if m.from_account.is_empty() {
        return Err("From_Account is empty".into());
    }
    let body: Value =
        serde_json::from_str(m.msg_body.get()).map_err(|e| format!("MsgBody: {e}"))?;
    let elems = body.as_array().ok_or("MsgBody is not an array")?;
    if elems.is_empty() {
        return Err("MsgBody is empty".into());
    }
    let mut custom = 0;
    for e in elems {
        let ty = e
            .get("MsgType")
            .and_then(Value::as_str)
            .ok_or("MsgType missing")?;
        if !ALLOWED_ELEMS.contains(&ty) {
            return Err(format!("MsgType {ty} is not allowed in group imports"));
        }
        if !e.get("MsgContent").is_some_and(Value::is_object) {
            return Err("MsgContent missing".into());
        }
        if ty == "TIMCustomElem" {
            custom += 1;
        }
    }
    if custom > 1 {
        return Err("more than one TIMCustomElem".into());
    }
    Ok(())
}

impl World {
    pub fn new(rules: Rules) -> Self {
        World {
            quota: QuotaLimiter::new(rules.limiter, rules.requests_per_second, Instant::now()),
            account_quota: QuotaLimiter::new(
                Limiter::Sliding,
                rules.account_requests_per_second,
                Instant::now(),
            ),
            accounts: BTreeMap::new(),
            rules,
            groups: BTreeMap::new(),
            requests: VecDeque::new(),
            next_request: 1,
            next_group_id: 1,
        }
    }

    /// Create a group (admin route and configured groups). False if it exists.
    pub fn add_group(&mut self, id: &str, create_time: i64, group_type: &str) -> bool {
        if self.groups.contains_key(id) {
            return false;
        }
        self.groups
            .insert(id.to_owned(), Group::new(group_type, id, None, create_time));
        true
    }

    /// Count one request against the per-app quota; false when over it.
    pub fn take_quota(&mut self, now: Instant) -> bool {
        self.quota.admit(now)
    }

    /// Append a request record.
    pub fn record(&mut self, mut rec: RequestRecord) {
        rec.seq = self.next_request;
        self.next_request += 1;
        if self.requests.len() >= MAX_REQUEST_RECORDS {
            self.requests.pop_front();
        }
        self.requests.push_back(rec);
    }

    pub fn snapshot(&self) -> SimSnapshot {
        SimSnapshot {
            groups: self
                .groups
                .iter()
                .map(|(id, g)| GroupSnapshot {
                    group_id: id.clone(),
                    group_type: g.group_type.clone(),
                    name: g.name.clone(),
                    owner_account: g.owner.clone(),
                    create_time: g.create_time,
                    messages: g.main.snapshot(),
                    topics: g
                        .topics
                        .iter()
                        .map(|(t, h)| (t.clone(), h.snapshot()))
                        .collect(),
                    members: g.members.clone(),
                })
                .collect(),
            requests: self.requests.iter().cloned().collect(),
            accounts: self
                .accounts
                .iter()
                .map(|(id, (nick, face))| AccountSnapshot {
                    user_id: id.clone(),
                    nick: nick.clone(),
                    face_url: face.clone(),
                })
                .collect(),
        }
    }

    /// Create an account (admin use); false if it exists.
    pub fn add_account(&mut self, id: &str) -> bool {
        if self.accounts.contains_key(id) {
            return false;
        }
        self.accounts.insert(id.to_owned(), (None, None));
        true
    }

    /// With `require_accounts`, whether `id` is an account (always true without).
    fn is_account(&self, id: &str) -> bool {
        !self.rules.require_accounts || self.accounts.contains_key(id)
    }

    /// `multiaccount_import` (`im_open_login_svc`): the old form `{"Accounts": [ids]}` creates
    /// the accounts not there yet and leaves existing ones as they are; the new form
    /// `{"AccountList": [{UserID, Nick?, FaceUrl?}]}` creates or updates, setting Nick and
    /// FaceUrl to what is given (absent ones are cleared*). At most 100 per request (else 70206*);
    /// its own quota (60007). IDs that break the rules (empty, over 32 bytes, not a string, a
    /// control character*) come back in `FailAccounts`; the rest are imported.
    pub fn multiaccount_import(
        &mut self,
        body: &Value,
        mono: Instant,
    ) -> Result<(Answer, Vec<String>), Answer> {
        if !self.account_quota.admit(mono) {
            return Err(Answer::fail(
                60007,
                "REST API call rate exceeded (multiaccount_import)",
            ));
        }
        let (list, profiles) = match (body.get("Accounts"), body.get("AccountList")) {
            (Some(Value::Array(a)), None) => (a.clone(), false),
            (None, Some(Value::Array(a))) => (a.clone(), true),
            _ => {
                return Err(Answer::fail(
                    70402,
                    "invalid parameter: give Accounts (IDs) or AccountList (objects), one of them",
                ));
            }
        };
        if list.is_empty() || list.len() > MAX_ACCOUNTS_PER_IMPORT {
            return Err(Answer::fail(
                70206,
                format!("invalid batch size {} (1 to 100 accounts)", list.len()),
            ));
        }
        let mut failed = Vec::new();
        let mut done = Vec::new();
        for item in list {
            let (id, nick, face) = if profiles {
                let id = item
                    .get("UserID")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let nick = item.get("Nick").and_then(Value::as_str).map(str::to_owned);
                let face = item
                    .get("FaceUrl")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                (id, nick, face)
            } else {
                (item.as_str().map(str::to_owned), None, None)
            };
            let Some(id) = id else {
                failed.push(item.to_string());
                continue;
            };
            if id.is_empty() || id.len() > MAX_USER_ID_BYTES || id.chars().any(char::is_control) {
                failed.push(id);
                continue;
            }
            if profiles {
                self.accounts.insert(id.clone(), (nick, face));
            } else {
                self.accounts.entry(id.clone()).or_insert((None, None));
            }
            done.push(id);
        }
        let applied = !done.is_empty();
        Ok((Answer::ok(json!({"FailAccounts": failed}), applied), done))
    }

    /// Tampers with the message at `seq` of a group's history (or a topic's); for a duplicate,
    /// returns the copy's MsgSeq.
    pub fn tamper(
        &mut self,
        group: &str,
        topic: Option<&str>,
        seq: u64,
        what: Tamper,
    ) -> Result<Option<u64>, String> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| format!("no group {group}"))?;
        let history = match topic.filter(|t| !t.is_empty()) {
            Some(t) => g
                .topics
                .get_mut(t)
                .ok_or_else(|| format!("no topic {t} in group {group}"))?,
            None => &mut g.main,
        };
        let idx = usize::try_from(seq)
            .ok()
            .and_then(|s| s.checked_sub(1))
            .filter(|i| *i < history.messages.len())
            .ok_or_else(|| format!("no MsgSeq {seq} in {group}"))?;
        match what {
            Tamper::Lose => history.messages[idx].lost = true,
            Tamper::Hole => history.messages[idx].hole = true,
            Tamper::Alter { msg_body } => {
                let m = &mut history.messages[idx].stored;
                m.msg_body_bytes = msg_body.to_string();
                m.msg_body = msg_body;
            }
            Tamper::Duplicate => {
                let original = &history.messages[idx];
                let mut stored = original.stored.clone();
                let arrived = original.arrived;
                let new_seq = history.messages.len() as u64 + 1;
                stored.msg_seq = new_seq;
                history.messages.push(Msg {
                    stored,
                    arrived,
                    lost: false,
                    hole: false,
                });
                return Ok(Some(new_seq));
            }
        }
        Ok(None)
    }

    /// Dispatch one command of `group_open_http_svc`. `raw` is the request body as received
    /// (import_group_msg keeps each MsgBody's exact bytes from it), `body` the same parsed.
    pub fn handle(
        &mut self,
        command: &str,
        raw: &[u8],
        body: &Value,
        now: i64,
        mono: Instant,
    ) -> Answer {
        let result = match command {
            "import_group_msg" => self.import_group_msg(raw, now, mono),
            "group_msg_get_simple" => self.group_msg_get_simple(body, now),
            "get_group_info" => self.get_group_info(body),
            "import_group" => self.import_group(body, now),
            "import_group_member" => self.import_group_member(body, now),
            "set_unread_msg_num" => self.set_unread_msg_num(body),
            other => Err(Answer::fail(10003, format!("unknown command {other}"))),
        };
        result.unwrap_or_else(|a| a)
    }

    fn import_group_msg(&mut self, raw: &[u8], now: i64, mono: Instant) -> Result<Answer, Answer> {
        let req: ImportGroupMsgRequest = serde_json::from_slice(raw)
            .map_err(|e| Answer::fail(10004, format!("invalid parameter: {e}")))?;
        if !self.groups.contains_key(&req.group_id) {
            if self.rules.auto_create_groups && !req.group_id.is_empty() {
                self.add_group(&req.group_id, 0, "Public");
            } else {
                return Err(Answer::fail(10010, "group not found"));
            }
        }
        if req.msg_list.is_empty() {
            return Err(Answer::fail(10004, "MsgList is empty"));
        }
        if req.msg_list.len() > MAX_MSGS_PER_IMPORT {
            return Err(Answer::fail(10004, "MsgList too long (at most 7)"));
        }
        for m in &req.msg_list {
            check_message(m).map_err(|e| Answer::fail(10004, format!("invalid parameter: {e}")))?;
        }
        let unknown: Vec<bool> = req
            .msg_list
            .iter()
            .map(|m| !self.is_account(&m.from_account))
            .collect();
        if self.rules.unknown_sender == UnknownSender::WholeRequest
            && let Some(i) = unknown.iter().position(|u| *u)
        {
            return Err(Answer::fail(
                10019,
                format!(
                    "the requested account does not exist: From_Account {:?}",
                    req.msg_list[i].from_account
                ),
            ));
        }
        let rules = self.rules.clone();
        let group = self
            .groups
            .get_mut(&req.group_id)
            .ok_or_else(|| Answer::fail(10010, "group not found"))?;
        let create_time = group.create_time;
        let history = match &req.topic_id {
            Some(t) => group.topics.entry(t.clone()).or_default(),
            None => &mut group.main,
        };
        let mut items = Vec::with_capacity(req.msg_list.len());
        let mut results = Vec::with_capacity(req.msg_list.len());
        let mut applied = false;
        for (i, m) in req.msg_list.into_iter().enumerate() {
            if unknown[i] {
                items.push(json!({"Result": 10019, "MsgTime": m.send_time}));
                results.push(10019);
                continue;
            }
            let random = m.random.unwrap_or_else(|| rand::rng().random());
            // Dedup first: a repeat inside the window is absorbed, whatever its SendTime.
            if let Some(&idx) = history.by_random.get(&random) {
                let prev = &history.messages[idx];
                if mono.saturating_duration_since(prev.arrived) < rules.dedup_window {
                    items.push(json!({"Result": 0, "MsgSeq": prev.stored.msg_seq,
                                      "MsgTime": prev.stored.send_time}));
                    results.push(0);
                    continue;
                }
            }
            // Measured on the bytes received, as the strictest reading of "12K bytes" has it.
            let size = m.msg_body.get().len();
            let latest = history.latest_time();
            let time_ok = m.send_time < now
                && m.send_time > create_time
                && latest.is_none_or(|l| {
                    if rules.strict_equal_time {
                        m.send_time > l
                    } else {
                        m.send_time >= l
                    }
                });
            let code = if size > MAX_BODY_BYTES {
                80002
            } else if !time_ok {
                10004
            } else {
                0
            };
            if code != 0 {
                items.push(json!({"Result": code, "MsgTime": m.send_time}));
                results.push(code);
                continue;
            }
            let seq = history.messages.len() as u64 + 1;
            history.by_random.insert(random, history.messages.len());
            history.messages.push(Msg {
                stored: StoredMessage {
                    msg_seq: seq,
                    from_account: m.from_account,
                    send_time: m.send_time,
                    random,
                    msg_body: serde_json::from_str(m.msg_body.get()).unwrap_or(Value::Null),
                    msg_body_bytes: m.msg_body.get().to_owned(),
                },
                arrived: mono,
                lost: false,
                hole: false,
            });
            items.push(json!({"Result": 0, "MsgSeq": seq, "MsgTime": m.send_time}));
            results.push(0);
            applied = true;
        }
        if applied {
            // Documented side effect: importing zeroes every member's unread count.
            for member in &mut group.members {
                member.unread_msg_num = 0;
            }
        }
        let mut answer = Answer::ok(json!({"ImportMsgResult": items}), applied);
        answer.results = results;
        Ok(answer)
    }

    fn group_msg_get_simple(&mut self, body: &Value, now: i64) -> Result<Answer, Answer> {
        let expired_before = self
            .rules
            .history_retention
            .map(|r| now - i64::try_from(r.as_secs()).unwrap_or(i64::MAX));
        let req: GroupMsgGetSimpleRequest = parse(body)?;
        let group = self
            .groups
            .get(&req.group_id)
            .ok_or_else(|| Answer::fail(10010, "group not found"))?;
        if req.req_msg_number == 0 {
            return Err(Answer::fail(10004, "ReqMsgNumber must be positive"));
        }
        let n = req.req_msg_number.min(MAX_PAGE) as usize;
        let empty = History::default();
        let history = match &req.topic_id {
            Some(t) => group.topics.get(t).unwrap_or(&empty),
            None => &group.main,
        };
        let upto = req.req_msg_seq.unwrap_or(u64::MAX);
        // Seqs are 1..=len in order, so index = seq - 1; messages lost by tampering are skipped.
        let end = (history.messages.len() as u64).min(upto) as usize;
        let mut picked = Vec::with_capacity(n);
        let mut i = end;
        while i > 0 && picked.len() < n {
            i -= 1;
            if !history.messages[i].lost {
                picked.push(&history.messages[i]);
            }
        }
        let list: Vec<Value> = picked
            .iter()
            .map(|m| {
                if m.hole || expired_before.is_some_and(|t| m.stored.send_time < t) {
                    // Expired or deleted: a hole with its Seq only.
                    return json!({"IsPlaceMsg": 1, "MsgSeq": m.stored.msg_seq,
                                  "MsgTimeStamp": m.stored.send_time, "MsgBody": []});
                }
                json!({
                    "From_Account": m.stored.from_account,
                    "IsPlaceMsg": 0,
                    "IsSystemMsg": 0,
                    "MsgBody": m.stored.msg_body,
                    "MsgPriority": 1,
                    "MsgRandom": m.stored.random,
                    "MsgSeq": m.stored.msg_seq,
                    "MsgTimeStamp": m.stored.send_time,
                })
            })
            .collect();
        let rest = history.messages[..i].iter().any(|m| !m.lost);
        let finished = if rest { 0 } else { 1 };
        Ok(Answer::ok(
            json!({"GroupId": req.group_id, "IsFinished": finished, "RspMsgList": list}),
            false,
        ))
    }

    fn get_group_info(&mut self, body: &Value) -> Result<Answer, Answer> {
        let req: GetGroupInfoRequest = parse(body)?;
        if req.group_id_list.is_empty() || req.group_id_list.len() > MAX_GROUP_INFO {
            return Err(Answer::fail(10004, "GroupIdList must hold 1 to 50 groups"));
        }
        let infos: Vec<Value> = req
            .group_id_list
            .iter()
            .map(|id| match self.groups.get(id) {
                Some(g) => json!({
                    "GroupId": id,
                    "ErrorCode": 0,
                    "ErrorInfo": "",
                    "Type": g.group_type,
                    "Name": g.name,
                    "Owner_Account": g.owner.clone().unwrap_or_default(),
                    "CreateTime": g.create_time,
                    "LastInfoTime": g.create_time,
                    "LastMsgTime": g.main.latest_time().unwrap_or(0),
                    "NextMsgSeq": g.message_count() + 1,
                    "MemberNum": g.members.len(),
                    "MaxMemberNum": 2000,
                }),
                None => json!({"GroupId": id, "ErrorCode": 10010,
                               "ErrorInfo": "group not found"}),
            })
            .collect();
        Ok(Answer::ok(json!({"GroupInfo": infos}), false))
    }

    fn import_group(&mut self, body: &Value, now: i64) -> Result<Answer, Answer> {
        let req: ImportGroupRequest = parse(body)?;
        match req.group_type.as_str() {
            "Private" | "Public" | "ChatRoom" | "Community" | "Work" | "Meeting" => {}
            "AVChatRoom" => return Err(Answer::fail(10007, "AVChatRoom cannot be imported")),
            other => return Err(Answer::fail(10004, format!("invalid Type {other}"))),
        }
        if req.name.is_empty() {
            return Err(Answer::fail(10004, "Name is empty"));
        }
        let id = match req.group_id {
            Some(id) if id.is_empty() || id.starts_with("@TGS#") => {
                return Err(Answer::fail(10015, "invalid GroupId"));
            }
            Some(id) => id,
            None => {
                let id = format!("@TGS#SIM{:06}", self.next_group_id);
                self.next_group_id += 1;
                id
            }
        };
        if self.groups.contains_key(&id) {
            return Err(Answer::fail(10021, "group id already used"));
        }
        if let Some(owner) = req.owner_account.as_deref()
            && !self.is_account(owner)
        {
            return Err(Answer::fail(
                10019,
                format!("the requested account does not exist: Owner_Account {owner:?}"),
            ));
        }
        let create_time = req.create_time.unwrap_or(now);
        self.groups.insert(
            id.clone(),
            Group::new(&req.group_type, &req.name, req.owner_account, create_time),
        );
        Ok(Answer::ok(json!({"GroupId": id}), true))
    }

    fn import_group_member(&mut self, body: &Value, now: i64) -> Result<Answer, Answer> {
        let req: ImportGroupMemberRequest = parse(body)?;
        let group = self
            .groups
            .get_mut(&req.group_id)
            .ok_or_else(|| Answer::fail(10010, "group not found"))?;
        if req.member_list.is_empty() || req.member_list.len() > MAX_MEMBERS_PER_IMPORT {
            return Err(Answer::fail(10004, "MemberList must hold 1 to 300 members"));
        }
        let count = group.message_count();
        let require = self.rules.require_accounts;
        let accounts = &self.accounts;
        let mut out = Vec::with_capacity(req.member_list.len());
        let mut applied = false;
        for m in req.member_list {
            let result = if group
                .members
                .iter()
                .any(|x| x.member_account == m.member_account)
            {
                2
            } else if m.member_account.is_empty()
                || (require && !accounts.contains_key(&m.member_account))
                || m.role.as_deref().is_some_and(|r| r != "Admin")
                || m.join_time
                    .is_some_and(|t| t <= group.create_time || t >= now)
            {
                0
            } else {
                group.members.push(MemberSnapshot {
                    member_account: m.member_account.clone(),
                    role: m.role.unwrap_or_else(|| "Member".into()),
                    join_time: m.join_time.unwrap_or(now),
                    unread_msg_num: m.unread_msg_num.unwrap_or(0).min(count),
                });
                applied = true;
                1
            };
            out.push(json!({"Member_Account": m.member_account, "Result": result}));
        }
        Ok(Answer::ok(json!({"MemberList": out}), applied))
    }

    fn set_unread_msg_num(&mut self, body: &Value) -> Result<Answer, Answer> {
        let req: SetUnreadMsgNumRequest = parse(body)?;
        let group = self
            .groups
            .get_mut(&req.group_id)
            .ok_or_else(|| Answer::fail(10010, "group not found"))?;
        let count = group.message_count();
        let member = group
            .members
            .iter_mut()
            .find(|m| m.member_account == req.member_account)
            .ok_or_else(|| Answer::fail(10007, "Member_Account is not a member of the group"))?;
        member.unread_msg_num = req.unread_msg_num.min(count);
        Ok(Answer::ok(json!({}), true))
    }
}

/// How the app quota is counted (`tencent-api.md` §9: the docs do not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Limiter {
    /// A token bucket of one second's worth, starting full and refilled continuously: any
    /// sequence whose average stays at the quota passes, bursts above one second's worth do not.
    Bucket,
    /// A counter per one-second window, aligned to when the simulator started.
    Fixed,
    /// The strict reading (default): at most `quota` arrivals in any last second, counting the
    /// refused arrivals too, so sending above the quota keeps being refused until it slows down.
    #[default]
    Sliding,
}

/// One app's quota under one [`Limiter`], on an injected clock.
#[derive(Debug, Clone)]
pub struct QuotaLimiter {
    kind: Limiter,
    quota: u32,
    /// Where the fixed windows are aligned.
    epoch: Instant,
    /// Bucket: (tokens left, when last refilled).
    bucket: Option<(f64, Instant)>,
    /// Fixed: (window number, requests admitted in it).
    fixed: (u64, u32),
    /// Sliding: arrivals of the last second, refused ones included.
    arrivals: VecDeque<Instant>,
}

impl QuotaLimiter {
    /// `quota` requests per second (0 is treated as 1); fixed windows start at `epoch`.
    pub fn new(kind: Limiter, quota: u32, epoch: Instant) -> Self {
        QuotaLimiter {
            kind,
            quota: quota.max(1),
            epoch,
            bucket: None,
            fixed: (0, 0),
            arrivals: VecDeque::new(),
        }
    }

    /// Count one arrival at `now`; false when it is over the quota.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.kind {
            Limiter::Bucket => {
                let rate = f64::from(self.quota);
                let (tokens, last) = self.bucket.unwrap_or((rate, now));
                let elapsed = now.saturating_duration_since(last).as_secs_f64();
                let tokens = (tokens + elapsed * rate).min(rate);
                let ok = tokens >= 1.0;
                self.bucket = Some((if ok { tokens - 1.0 } else { tokens }, now.max(last)));
                ok
            }
            Limiter::Fixed => {
                let window = now.saturating_duration_since(self.epoch).as_secs();
                if window != self.fixed.0 {
                    self.fixed = (window, 0);
                }
                let ok = self.fixed.1 < self.quota;
                if ok {
                    self.fixed.1 += 1;
                }
                ok
            }
            Limiter::Sliding => {
                let second = Duration::from_secs(1);
                while self.arrivals.front().is_some_and(|a| *a + second <= now) {
                    self.arrivals.pop_front();
                }
                let ok = self.arrivals.len() < self.quota as usize;
                self.arrivals.push_back(now);
                ok
            }
        }
    }
}
