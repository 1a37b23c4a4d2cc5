//! Reconciliation: before anything whose outcome is unknown is sent again, ask the server what it
//! already has. This is what makes "nothing duplicated" hold after the five-minute Random dedup
//! window has closed (a restart hours later), where re-sending blindly would import twice.
//!
//! `get_group_info` gives the group's `NextMsgSeq` and `LastMsgTime`; when `NextMsgSeq - 1` is
//! still the lane's checkpoint, nothing of ours landed. Otherwise the tail of the history is read
//! with `group_msg_get_simple`, newest first, back to the checkpoint (or to messages older than
//! the oldest in doubt), and each message in doubt is matched on (From_Account, MsgTimeStamp,
//! MsgRandom). Found: imported with the server's MsgSeq. Not found: sent again with the same
//! Random, or, for a message the server refused with 10004, failed with the reason (or nudged,
//! for a same-second tie under `import.tie_policy = "nudge"`).
//!
//! A failed read leaves everything in flight and backs the lane off; the next step tries again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;

use super::lane::{Step, apply_checkpoint, back_off, block, count_imported};
use super::{EngineError, Shared};
use crate::settings::TiePolicy;
use crate::store::{Lane, LaneUpdate, MessageUpdate, QueuedMessage};
use crate::tencent::{
    ApiError, ApiErrorKind, ErrorClass, GetGroupInfoRequest, GroupInfo, GroupMsgGetSimpleRequest,
};

/// Pages of 20 read back at most, before the lane is blocked as inconclusive.
pub const MAX_PAGES: usize = 500;

type Key = (String, i64, u32);

/// Reconciles `doubt` (messages of `lane` in flight); `refused` are those the server answered
/// with Result 10004. `since_seq` is the checkpoint from before these messages were sent: only
/// history above it can hold them.
pub async fn run(
    sh: &Shared,
    lane: &mut Lane,
    doubt: Vec<QueuedMessage>,
    refused: &HashSet<i64>,
    since_seq: i64,
) -> Result<Step, EngineError> {
    let oldest = doubt
        .iter()
        .map(QueuedMessage::effective_time)
        .min()
        .unwrap_or(0);
    // The tail of the history first: after a lost answer the batch is usually all there, and one
    // page settles it.
    let mut found = match read_tail(sh, lane, oldest, since_seq).await {
        Ok(Tail::Read(map)) => Some(map),
        Ok(Tail::Missing) => None,
        Ok(Tail::Inconclusive(why)) => {
            // Keep the messages in flight: nothing may be sent again until a read is conclusive.
            return block(sh, lane, &[], None, &why).await;
        }
        Err(e) => return read_failed(sh, lane, &doubt, e).await,
    };
    let mut matched: Vec<Option<(i64, i64)>> = doubt
        .iter()
        .map(|m| {
            let key = (m.from_account.clone(), m.effective_time(), m.random);
            found
                .as_mut()
                .and_then(|f| f.get_mut(&key))
                .and_then(VecDeque::pop_front)
        })
        .collect();
    // Group details only when something is not there: whether the group exists, and why the
    // server refused a message.
    let mut info = GroupInfo::default();
    if found.is_some() && matched.iter().any(Option::is_none) {
        match group_info(sh, lane).await {
            Ok(Some(i)) if matches!(i.error_code, 10010 | 10015) => {
                matched.iter_mut().for_each(|m| *m = None);
            }
            Ok(Some(i)) if i.error_code != 0 => {
                return block(sh, lane, &[], Some(i.error_code), &i.error_info).await;
            }
            Ok(Some(i)) => info = i,
            Ok(None) => {
                let e = ApiError::new(
                    "get_group_info",
                    ApiErrorKind::BadResponse("the answer does not list the group".into()),
                );
                return read_failed(sh, lane, &doubt, e).await;
            }
            Err(e) => return read_failed(sh, lane, &doubt, e).await,
        }
    }
    let mut updates = Vec::with_capacity(doubt.len());
    let mut lane_up = LaneUpdate::default();
    let mut imported = 0u64;
    let last_msg_time = info.last_msg_time.unwrap_or(0);
    let create_time = info.create_time.unwrap_or(0);
    for (m, hit) in doubt.iter().zip(matched) {
        if let Some((seq, time)) = hit {
            updates.push(MessageUpdate::Imported {
                id: m.id,
                msg_seq: seq,
                msg_time: time,
                note: Some("found on the server by reconciliation".into()),
            });
            lane_up.seen_send_time = lane_up.seen_send_time.max(Some(m.effective_time()));
            lane_up.seen_msg_seq = lane_up.seen_msg_seq.max(Some(seq));
            imported += 1;
            continue;
        }
        if refused.contains(&m.id) {
            let t = m.effective_time();
            let (reason, nudge) = if t <= create_time {
                (
                    format!(
                        "SendTime {t} is not after the group's creation time ({create_time}); Tencent refused it (10004)"
                    ),
                    false,
                )
            } else if t == lane.last_send_time || t == last_msg_time {
                (
                    format!(
                        "SendTime {t} equals the group's latest message time and the server refuses equal times (10004); import.tie_policy = \"nudge\" would move it forward"
                    ),
                    sh.cfg.tie_policy == TiePolicy::Nudge,
                )
            } else if t < last_msg_time {
                (
                    format!(
                        "SendTime {t} is older than the group's latest message ({last_msg_time}); Tencent imports only in ascending time (10004)"
                    ),
                    false,
                )
            } else {
                (format!("SendTime {t} refused by Tencent (10004)"), false)
            };
            if nudge {
                lane_up.tie_nudge = true;
                updates.push(MessageUpdate::Pending {
                    id: m.id,
                    refund: true,
                });
            } else {
                tracing::info!(group = %lane.group_id, message = m.id, code = 10004, reason = %reason, "message failed");
                metrics::counter!("timport_messages_failed_total", "code" => "10004").increment(1);
                sh.failed.fetch_add(1, Ordering::Relaxed);
                updates.push(MessageUpdate::Failed {
                    id: m.id,
                    code: Some(10004),
                    reason,
                });
            }
        } else if m.attempts >= i64::from(sh.cfg.max_attempts) {
            sh.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("timport_messages_failed_total", "code" => "unknown").increment(1);
            updates.push(MessageUpdate::Failed {
                id: m.id,
                code: None,
                reason: format!(
                    "no answer after {} attempts and not found on the server",
                    m.attempts
                ),
            });
        } else {
            updates.push(MessageUpdate::Pending {
                id: m.id,
                refund: false,
            });
        }
    }
    tracing::info!(group = %lane.group_id, in_doubt = doubt.len(), found = imported, "reconciled with the server");
    sh.store.record(lane.id, &updates, &lane_up).await?;
    count_imported(sh, imported);
    apply_checkpoint(lane, &lane_up);
    Ok(Step::Progress)
}

async fn group_info(sh: &Shared, lane: &Lane) -> Result<Option<GroupInfo>, ApiError> {
    let resp = sh
        .client
        .get_group_info(&GetGroupInfoRequest {
            group_id_list: vec![lane.group_id.clone()],
            response_filter: None,
        })
        .await?;
    Ok(resp
        .group_info
        .into_iter()
        .find(|g| g.group_id == lane.group_id))
}

/// What reading the history back gave.
enum Tail {
    /// Our messages above the checkpoint, by (From_Account, MsgTimeStamp, MsgRandom).
    Read(HashMap<Key, VecDeque<(i64, i64)>>),
    /// The group does not exist: it holds nothing of ours.
    Missing,
    /// The history cannot prove what is there (holes, expiry, too long): the reason.
    Inconclusive(String),
}

/// Reads the history newest first down to `since_seq` or below `oldest`.
async fn read_tail(
    sh: &Shared,
    lane: &Lane,
    oldest: i64,
    since_seq: i64,
) -> Result<Tail, ApiError> {
    let mut found: HashMap<Key, VecDeque<(i64, i64)>> = HashMap::new();
    let mut req_seq: Option<u64> = None;
    let inconclusive = |what: &str| {
        Tail::Inconclusive(format!(
            "reconciliation inconclusive: {what} after the checkpoint (MsgSeq {since_seq}); messages stay in flight, nothing is re-sent. Check the group's history (retention may have expired), then `timport retry --group {}`",
            lane.group_id
        ))
    };
    for _ in 0..MAX_PAGES {
        let page = match sh
            .client
            .group_msg_get_simple(&GroupMsgGetSimpleRequest {
                group_id: lane.group_id.clone(),
                req_msg_number: 20,
                req_msg_seq: req_seq,
                topic_id: (!lane.topic_id.is_empty()).then(|| lane.topic_id.clone()),
                with_recalled_msg: None,
            })
            .await
        {
            Ok(p) => p,
            Err(e) if matches!(e.code(), Some(10010 | 10015)) => return Ok(Tail::Missing),
            Err(e) => return Err(e),
        };
        if page.rsp_msg_list.is_empty() {
            return Ok(Tail::Read(found));
        }
        let mut min_seq = u64::MAX;
        let mut min_time = i64::MAX;
        for m in &page.rsp_msg_list {
            min_seq = min_seq.min(m.msg_seq);
            min_time = min_time.min(m.msg_time_stamp);
            let seq = i64::try_from(m.msg_seq).unwrap_or(i64::MAX);
            if seq <= since_seq {
                continue;
            }
            match m.random_u32() {
                Some(r) if m.is_place_msg != 1 => found
                    .entry((m.from_account.clone(), m.msg_time_stamp, r))
                    .or_default()
                    .push_back((seq, m.msg_time_stamp)),
                _ => {
                    return Ok(inconclusive(
                        "the server shows a hole (expired or deleted message)",
                    ));
                }
            }
        }
        let reached = min_seq <= 1
            || i64::try_from(min_seq).unwrap_or(i64::MAX) <= since_seq + 1
            || min_time < oldest;
        if reached || page.is_finished == 1 {
            for v in found.values_mut() {
                v.make_contiguous().sort_unstable();
            }
            return Ok(Tail::Read(found));
        }
        if page.is_finished == 2 {
            return Ok(inconclusive("the rest of the history has expired"));
        }
        req_seq = Some(min_seq - 1);
    }
    Ok(inconclusive(&format!(
        "more than {} messages",
        MAX_PAGES * 20
    )))
}

async fn read_failed(
    sh: &Shared,
    lane: &Lane,
    doubt: &[QueuedMessage],
    e: ApiError,
) -> Result<Step, EngineError> {
    if e.class() == ErrorClass::Auth {
        let code = e.code().unwrap_or_default();
        sh.set_fatal(EngineError::Auth {
            code,
            info: e.info(),
            hint: "tencent.secret_key",
        });
        return Ok(Step::Stop);
    }
    if e.class() == ErrorClass::Permanent {
        // Keep the messages in flight (`&[]`): their outcome is still unknown.
        return block(sh, lane, &[], e.code(), &e.info()).await;
    }
    let attempt = doubt.iter().map(|m| m.attempts).max().unwrap_or(1);
    let note = format!("reconciliation read failed: {e}");
    tracing::info!(group = %lane.group_id, error = %e, "cannot read the group back yet; backing off");
    back_off(sh, lane, &[], sh.backoff(attempt.min(3)), note).await
}
