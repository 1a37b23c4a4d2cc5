//! `timport verify`: read every group's history back from Tencent and prove the import
//! complete, message by message.
//!
//! Role: for every lane with imported messages (or those of one group or job), the history is
//! read with `group_msg_get_simple` from the lane's newest MsgSeq on the server (`NextMsgSeq − 1`
//! from `get_group_info`, batched; for a topic, the newest a first read returns) down to the
//! oldest MsgSeq recorded for the lane, so a copy that landed after our last message is seen too.
//! The range is cut into pages of 20 MsgSeqs, read several at once per lane (and several lanes at
//! once) under verify's own pacer, and recorded strictly in order, newest first. Each of our
//! messages is classed against the server's message at its recorded MsgSeq ([`classify`]); the
//! server's messages there that are none of ours are `duplicated` when they equal one of ours
//! (sender, time, body as JSON values) and `foreign` otherwise. A page that comes back short
//! (IsFinished 0, fewer than 20) is read on below its lowest MsgSeq; an empty page ends the lane
//! (nothing lower exists); IsFinished 2 means the rest has expired (unverifiable).
//!
//! The quota: see [`claim`] and `engine::share`; requests wait for [`claim::Gate::admit`].
//!
//! Stopping and recovery: each page's classes are recorded with the lane's next page in one
//! transaction, so a verify stopped at any instant (SIGTERM, SIGKILL) resumes at the first page
//! not recorded; a page read twice replaces its classes. A lane imported into since its pass
//! began, or `--restart`, starts its pass over. Reads that fail transiently are retried with
//! backoff (the history does not change by reading it); a refusal that cannot pass (credentials,
//! permissions) ends the verify with the error, keeping what was recorded.

pub mod claim;
pub mod classify;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pacing::Pacer;
use crate::store::{Store, StoreError, VerifyLane, VerifyRow};
use crate::tencent::{
    ApiError, ErrorClass, GetGroupInfoRequest, GroupMsgGetSimpleRequest, RspMsg, TencentClient,
    body, codes,
};
use claim::Gate;
use classify::{expected, found, seq_of};

/// Most messages per page (Tencent's maximum).
pub const PAGE: i64 = 20;
/// Groups per get_group_info call (Tencent's maximum).
const INFO_BATCH: usize = 50;

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub group: Option<String>,
    pub job: Option<i64>,
    /// Forget earlier results of the scope first.
    pub restart: bool,
    /// Lanes read at once.
    pub lanes_at_once: usize,
    /// Pages of one lane in flight at once.
    pub pages_in_flight: usize,
}

impl VerifyOptions {
    /// Everything, resuming, with enough pages in flight to fill `rate` at a round trip of up
    /// to a quarter of a second.
    pub fn for_rate(rate: f64) -> Self {
        VerifyOptions {
            group: None,
            job: None,
            restart: false,
            lanes_at_once: 4,
            pages_in_flight: ((rate / 4.0).ceil() as usize).clamp(4, 64),
        }
    }
}

/// Why a verify stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading group {group} back failed and retrying cannot help: {error}")]
    Read { group: String, error: ApiError },
}

/// How a verify ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every lane in scope read to its end.
    Complete,
    /// Stopped (SIGTERM/SIGINT) first; what was recorded stays.
    Stopped,
}

/// Counters of this run, for progress lines and the benchmark.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub pages: AtomicU64,
    pub messages: AtomicU64,
}

struct Ctx {
    store: Store,
    /// Unpaced: requests are paced here, by `pacer`, so that the gate is looked at after the
    /// slot is taken (a request never starts after the claim went stale while it queued).
    client: TencentClient,
    pacer: Arc<Pacer>,
    gate: Gate,
    cancel: CancellationToken,
    pages_in_flight: usize,
    counters: Arc<Counters>,
}

/// Runs the verify of `opts`' scope; results are in the store (see [`report`]).
pub async fn run(
    store: &Store,
    client: &TencentClient,
    pacer: Arc<Pacer>,
    opts: &VerifyOptions,
    gate: Gate,
    cancel: &CancellationToken,
    counters: Arc<Counters>,
) -> Result<Ended, VerifyError> {
    if opts.restart {
        store.verify_reset(opts.group.as_deref(), opts.job).await?;
    }
    let lanes = store.verify_scope(opts.group.as_deref(), opts.job).await?;
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        client: client.clone(),
        pacer,
        gate,
        cancel: cancel.clone(),
        pages_in_flight: opts.pages_in_flight.max(1),
        counters,
    });
    // Lanes whose pass is done and nothing was imported since are settled.
    let todo: Vec<VerifyLane> = lanes
        .into_iter()
        .filter(|l| {
            !l.pass
                .as_ref()
                .is_some_and(|p| p.done && p.imported == l.imported && p.low_seq == l.low_seq)
        })
        .collect();
    let fresh = |l: &VerifyLane| {
        l.pass
            .as_ref()
            .is_none_or(|p| p.done || p.imported != l.imported || p.low_seq != l.low_seq)
    };
    // The newest MsgSeq of each group whose pass starts now (topics learn theirs by a read).
    let wanted: Vec<String> = todo
        .iter()
        .filter(|l| fresh(l) && l.topic_id.is_empty())
        .map(|l| l.group_id.clone())
        .collect();
    let tops = newest_seqs(&ctx, wanted).await?;
    let Some(tops) = tops else {
        return Ok(Ended::Stopped);
    };
    tracing::info!(lanes = todo.len(), "verify started");
    let progress = tokio::spawn(log_progress(ctx.counters.clone(), cancel.clone()));
    let mut tasks: JoinSet<Result<Ended, VerifyError>> = JoinSet::new();
    let mut queue = todo.into_iter();
    let mut result = Ok(Ended::Complete);
    loop {
        while tasks.len() < opts.lanes_at_once.max(1) && !cancel.is_cancelled() {
            let Some(lane) = queue.next() else { break };
            let start = if fresh(&lane) {
                let top = if lane.topic_id.is_empty() {
                    tops.get(&lane.group_id).copied().flatten()
                } else {
                    None
                };
                let top = top.map(|t| t.max(lane.high_seq));
                if let Err(e) = store
                    .verify_begin_lane(lane.lane_id, lane.imported, top, lane.low_seq)
                    .await
                {
                    result = Err(e.into());
                    break;
                }
                top
            } else {
                lane.pass.as_ref().and_then(|p| p.next_seq.or(p.top_seq))
            };
            tasks.spawn(verify_lane(ctx.clone(), lane, start));
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done {
            Ok(Ok(Ended::Complete)) => {}
            Ok(Ok(Ended::Stopped)) => {
                if result.is_ok() {
                    result = Ok(Ended::Stopped);
                }
            }
            Ok(Err(e)) => {
                cancel.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a verify lane task failed");
                cancel.cancel();
                if result.is_ok() {
                    result = Ok(Ended::Stopped);
                }
            }
        }
        if result.is_err() {
            cancel.cancel();
        }
    }
    progress.abort();
    if cancel.is_cancelled() && matches!(result, Ok(Ended::Complete)) {
        result = Ok(Ended::Stopped);
    }
    result
}

async fn log_progress(c: Arc<Counters>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        tracing::info!(
            requests = c.requests.load(Ordering::Relaxed),
            pages = c.pages.load(Ordering::Relaxed),
            messages = c.messages.load(Ordering::Relaxed),
            "verify progress"
        );
    }
}

/// `NextMsgSeq − 1` per group (`None` inside: the group does not exist, or is empty). `None`:
/// stopped first.
async fn newest_seqs(
    ctx: &Ctx,
    mut groups: Vec<String>,
) -> Result<Option<BTreeMap<String, Option<i64>>>, VerifyError> {
    groups.sort();
    groups.dedup();
    let mut out = BTreeMap::new();
    for chunk in groups.chunks(INFO_BATCH) {
        let req = GetGroupInfoRequest {
            group_id_list: chunk.to_vec(),
            response_filter: Some(serde_json::json!({"GroupBaseInfoFilter": ["NextMsgSeq"]})),
        };
        let resp = match with_retries(ctx, &chunk[0], || ctx.client.get_group_info(&req)).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(error) => {
                return Err(VerifyError::Read {
                    group: chunk[0].clone(),
                    error,
                });
            }
        };
        for info in resp.group_info {
            let top = (info.error_code == 0)
                .then(|| {
                    info.next_msg_seq
                        .map(|n| i64::try_from(n).unwrap_or(i64::MAX) - 1)
                })
                .flatten();
            out.insert(info.group_id, top);
        }
    }
    Ok(Some(out))
}

/// Runs `call` until it succeeds or fails for good; waits for the gate before each attempt.
/// `Ok(None)`: stopped first.
async fn with_retries<T, F, Fut>(ctx: &Ctx, group: &str, call: F) -> Result<Option<T>, ApiError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        let slot = tokio::select! {
            s = ctx.pacer.acquire() => s,
            _ = ctx.cancel.cancelled() => return Ok(None),
        };
        if !ctx.gate.is_open() {
            // The slot is given up; the next one is taken once the gate opens again.
            if !ctx.gate.admit(&ctx.cancel).await {
                return Ok(None);
            }
            continue;
        }
        ctx.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = call().await;
        match &result {
            Err(e) if e.class() == ErrorClass::RateLimited => {
                ctx.pacer.on_rate_limited(slot);
            }
            Ok(_) => ctx.pacer.on_success(),
            Err(_) => {}
        }
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) => match e.class() {
                // Reading changes nothing: whatever the outcome, reading again is safe.
                ErrorClass::RateLimited => {}
                ErrorClass::Retryable | ErrorClass::Unknown => {
                    tracing::info!(group, error = %e, "read failed; retrying");
                    tokio::select! {
                        _ = ctx.cancel.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                _ => return Err(e),
            },
        }
    }
}

/// What one page range gave: the server's messages in `lo..=hi`, and how the range ended.
struct ChunkRead {
    hi: i64,
    lo: i64,
    msgs: Vec<RspMsg>,
    /// The server's MsgSeqs below this in the range are expired (IsFinished 2): the lane ends.
    expired_below: Option<i64>,
    /// Nothing at or below some MsgSeq of the range exists: the lane ends.
    empty_below: bool,
}

/// Reads the MsgSeqs `lo..=hi` of a lane: one page, and more below a short one.
async fn read_chunk(
    ctx: &Ctx,
    group: &str,
    topic: &str,
    hi: i64,
    lo: i64,
) -> Result<Option<ChunkRead>, ApiError> {
    let mut out = ChunkRead {
        hi,
        lo,
        msgs: Vec::new(),
        expired_below: None,
        empty_below: false,
    };
    let mut req_seq = hi;
    loop {
        let req = GroupMsgGetSimpleRequest {
            group_id: group.to_owned(),
            req_msg_number: u32::try_from((req_seq - lo + 1).clamp(1, PAGE)).unwrap_or(20),
            req_msg_seq: Some(u64::try_from(req_seq.max(1)).unwrap_or(1)),
            topic_id: (!topic.is_empty()).then(|| topic.to_owned()),
            with_recalled_msg: Some(1),
        };
        let page = match with_retries(ctx, group, || ctx.client.group_msg_get_simple(&req)).await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            // The group (or topic) is gone: nothing of ours is there.
            Err(e) if matches!(e.code(), Some(codes::GROUP_NOT_FOUND | 10015)) => {
                out.empty_below = true;
                return Ok(Some(out));
            }
            Err(e) => return Err(e),
        };
        ctx.counters.pages.fetch_add(1, Ordering::Relaxed);
        let Some(min) = page.rsp_msg_list.iter().map(seq_of).min() else {
            if page.is_finished == 2 {
                out.expired_below = Some(req_seq + 1);
            } else {
                out.empty_below = true;
            }
            return Ok(Some(out));
        };
        out.msgs.extend(
            page.rsp_msg_list
                .into_iter()
                .filter(|m| (lo..=hi).contains(&seq_of(m))),
        );
        if min <= lo || min <= 1 {
            return Ok(Some(out));
        }
        if page.is_finished == 2 {
            out.expired_below = Some(min);
            return Ok(Some(out));
        }
        req_seq = min - 1;
    }
}

/// Verifies one lane from `start` (its next page; `None`: from the newest, learned by a read).
async fn verify_lane(
    ctx: Arc<Ctx>,
    lane: VerifyLane,
    start: Option<i64>,
) -> Result<Ended, VerifyError> {
    let low = lane.low_seq.max(1);
    let read_err = |error| VerifyError::Read {
        group: lane.group_id.clone(),
        error,
    };
    let mut learned_top = None;
    let top = match start {
        Some(s) => s,
        None => {
            // A topic (or a group get_group_info did not describe): one read tells its newest.
            let req = GroupMsgGetSimpleRequest {
                group_id: lane.group_id.clone(),
                req_msg_number: 1,
                req_msg_seq: None,
                topic_id: (!lane.topic_id.is_empty()).then(|| lane.topic_id.clone()),
                with_recalled_msg: Some(1),
            };
            let newest = match with_retries(&ctx, &lane.group_id, || {
                ctx.client.group_msg_get_simple(&req)
            })
            .await
            {
                Ok(Some(p)) => p.rsp_msg_list.iter().map(seq_of).max().unwrap_or(0),
                Ok(None) => return Ok(Ended::Stopped),
                Err(e) if matches!(e.code(), Some(codes::GROUP_NOT_FOUND | 10015)) => 0,
                Err(e) => return Err(read_err(e)),
            };
            let top = newest.max(lane.high_seq);
            learned_top = Some(top);
            top
        }
    };
    if top < low {
        // Recorded as done already (a pass resumed after its last page).
        return Ok(Ended::Complete);
    }
    // Pages hi = top, top − 20, …, each down to max(hi − 19, low).
    let chunk = |k: i64| {
        let hi = top - k * PAGE;
        (hi, (hi - PAGE + 1).max(low))
    };
    let chunks = (top - low) / PAGE + 1;
    let mut next_spawn = 0i64;
    let mut next_record = 0i64;
    let mut ready: BTreeMap<i64, ChunkRead> = BTreeMap::new();
    let mut reads: JoinSet<(i64, Result<Option<ChunkRead>, ApiError>)> = JoinSet::new();
    loop {
        while next_spawn < chunks && (next_spawn - next_record) < ctx.pages_in_flight as i64 {
            let (hi, lo) = chunk(next_spawn);
            let c = ctx.clone();
            let (g, t) = (lane.group_id.clone(), lane.topic_id.clone());
            let k = next_spawn;
            reads.spawn(async move { (k, read_chunk(&c, &g, &t, hi, lo).await) });
            next_spawn += 1;
        }
        let Some(joined) = reads.join_next().await else {
            return Ok(Ended::Complete);
        };
        let (k, read) = match joined {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "a verify read task failed");
                return Ok(Ended::Stopped);
            }
        };
        match read {
            Ok(Some(r)) => {
                ready.insert(k, r);
            }
            Ok(None) => {
                reads.abort_all();
                return Ok(Ended::Stopped);
            }
            Err(e) => {
                reads.abort_all();
                return Err(read_err(e));
            }
        }
        // Record in order, newest first.
        while let Some(r) = ready.remove(&next_record) {
            let ends = r.expired_below.is_some() || r.empty_below;
            let lo = if ends { low } else { r.lo };
            record_range(&ctx, &lane, &r, lo, learned_top).await?;
            next_record += 1;
            if ends || lo <= low {
                reads.abort_all();
                return Ok(Ended::Complete);
            }
        }
    }
}

/// Classes the MsgSeqs `lo..=r.hi` from what `r` read and records them with the next page.
async fn record_range(
    ctx: &Ctx,
    lane: &VerifyLane,
    r: &ChunkRead,
    lo: i64,
    top: Option<i64>,
) -> Result<(), VerifyError> {
    let ours = ctx.store.verify_ours(lane.lane_id, lo, r.hi).await?;
    // IsFinished 2: below the lowest message returned, the history has expired.
    let (mut rows, strangers) = classify::classify(&ours, &r.msgs, r.expired_below);
    for m in strangers {
        if let Some(row) = stranger(ctx, lane, m).await? {
            rows.push(row);
        }
    }
    ctx.counters
        .messages
        .fetch_add(ours.len() as u64, Ordering::Relaxed);
    ctx.store
        .verify_record(
            lane.lane_id,
            lo,
            r.hi,
            &rows,
            top,
            lo - 1,
            lo <= lane.low_seq.max(1),
        )
        .await?;
    Ok(())
}

/// A server message that is none of ours at its MsgSeq: `duplicated` when it equals one of our
/// imported messages (sender, time, body), `foreign` otherwise; `None` when it equals one of ours
/// still being imported (the daemon's reconciliation adopts it).
async fn stranger(
    ctx: &Ctx,
    lane: &VerifyLane,
    m: &RspMsg,
) -> Result<Option<VerifyRow>, VerifyError> {
    let found_text = found(m).to_string();
    let server_body = body::canonical(&m.msg_body);
    let candidates = if m.from_account.is_empty() {
        Vec::new()
    } else {
        ctx.store
            .verify_lookalikes(lane.lane_id, &m.from_account, m.msg_time_stamp)
            .await?
    };
    let equal: Vec<_> = candidates
        .into_iter()
        .filter(|(o, _)| classify::same_body(o, &server_body))
        .collect();
    let seq = seq_of(m);
    if let Some((o, _)) = equal
        .iter()
        .find(|(o, imported)| *imported && o.msg_seq != seq)
    {
        return Ok(Some(VerifyRow {
            message_id: None,
            msg_seq: seq,
            kind: "duplicated",
            expected: Some(expected(o).to_string()),
            found: Some(found_text),
        }));
    }
    if equal.iter().any(|(_, imported)| !imported) {
        return Ok(None);
    }
    Ok(Some(VerifyRow {
        message_id: None,
        msg_seq: seq,
        kind: "foreign",
        expected: None,
        found: Some(found_text),
    }))
}
