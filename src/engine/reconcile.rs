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

use super::lane::{Step, apply_checkpoint, block, count_imported, ms};
use super::{EngineError, Shared};
use crate::settings::TiePolicy;
use crate::store::{Lane, LaneUpdate, MessageUpdate, QueuedMessage, unix_now_ms};
use crate::tencent::{
    ApiError, ErrorClass, GetGroupInfoRequest, GroupInfo, GroupMsgGetSimpleRequest,
};

/// Pages of 20 read back at most, before the lane is blocked as inconclusive.
pub const MAX_PAGES: usize = 500;

type Key = (String, i64, u32);

/// Reconciles `doubt` (messages of `lane` in flight); `refused` are those the server answered
/// with Result 10004.
pub async fn run(
    sh: &Shared,
    lane: &mut Lane,
    doubt: Vec<QueuedMessage>,
    refused: &HashSet<i64>,
) -> Result<Step, EngineError> {
    let info = match group_info(sh, lane).await {
        Ok(Some(info)) => info,
        Ok(None) => unreachable_group(),
        Err(e) => return read_failed(sh, lane, &doubt, e).await,
    };
    // A group that does not exist holds nothing of ours: the messages go back to pending and the
    // next import answers for the group (10010 blocks the lane there, with the import's reason).
    let missing = matches!(info.error_code, 10010 | 10015);
    if info.error_code != 0 && !missing {
        return block(sh, lane, &doubt, Some(info.error_code), &info.error_info).await;
    }
    let newest_seq = info
        .next_msg_seq
        .map(|n| i64::try_from(n.saturating_sub(1)).unwrap_or(i64::MAX));
    let mut found: HashMap<Key, VecDeque<(i64, i64)>> = HashMap::new();
    // Shortcut: a lane without topic whose checkpoint is the group's newest message has nothing
    // of ours beyond it.
    let nothing_new = lane.topic_id.is_empty() && newest_seq == Some(lane.last_msg_seq);
    if !nothing_new && !missing {
        let oldest = doubt
            .iter()
            .map(QueuedMessage::effective_time)
            .min()
            .unwrap_or(0);
        match read_tail(sh, lane, oldest).await {
            Ok(Some(map)) => found = map,
            Ok(None) => {
                return block(
                    sh,
                    lane,
                    &doubt,
                    None,
                    &format!(
                        "reconciliation inconclusive: more than {} messages after the checkpoint (MsgSeq {}) on the server; check the group's history, then `timport retry --group {}`",
                        MAX_PAGES * 20,
                        lane.last_msg_seq,
                        lane.group_id
                    ),
                )
                .await;
            }
            Err(e) => return read_failed(sh, lane, &doubt, e).await,
        }
    }
    let mut updates = Vec::with_capacity(doubt.len());
    let mut lane_up = LaneUpdate::default();
    let mut imported = 0u64;
    let last_msg_time = info.last_msg_time.unwrap_or(0);
    let create_time = info.create_time.unwrap_or(0);
    for m in &doubt {
        let key = (m.from_account.clone(), m.effective_time(), m.random);
        if let Some((seq, time)) = found.get_mut(&key).and_then(VecDeque::pop_front) {
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
    // The group's newest message is ours or older: the checkpoint may move up to it.
    if nothing_new {
        lane_up.seen_msg_seq = lane_up.seen_msg_seq.max(newest_seq);
    }
    tracing::info!(group = %lane.group_id, in_doubt = doubt.len(), found = imported, "reconciled with the server");
    sh.store.record(lane.id, &updates, &lane_up).await?;
    count_imported(sh, imported);
    apply_checkpoint(lane, &lane_up);
    Ok(Step::Progress)
}

fn unreachable_group() -> GroupInfo {
    GroupInfo {
        error_code: 10010,
        error_info: "the group is missing from get_group_info's answer".into(),
        ..GroupInfo::default()
    }
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

/// Reads the history newest first down to the lane's checkpoint or below `oldest`.
/// `Ok(None)` when [`MAX_PAGES`] were not enough.
async fn read_tail(
    sh: &Shared,
    lane: &Lane,
    oldest: i64,
) -> Result<Option<HashMap<Key, VecDeque<(i64, i64)>>>, ApiError> {
    let mut found: HashMap<Key, VecDeque<(i64, i64)>> = HashMap::new();
    let mut req_seq: Option<u64> = None;
    for _ in 0..MAX_PAGES {
        let page = sh
            .client
            .group_msg_get_simple(&GroupMsgGetSimpleRequest {
                group_id: lane.group_id.clone(),
                req_msg_number: 20,
                req_msg_seq: req_seq,
                topic_id: (!lane.topic_id.is_empty()).then(|| lane.topic_id.clone()),
                with_recalled_msg: None,
            })
            .await?;
        if page.rsp_msg_list.is_empty() {
            return Ok(Some(found));
        }
        let mut min_seq = u64::MAX;
        let mut min_time = i64::MAX;
        for m in &page.rsp_msg_list {
            min_seq = min_seq.min(m.msg_seq);
            min_time = min_time.min(m.msg_time_stamp);
            let seq = i64::try_from(m.msg_seq).unwrap_or(i64::MAX);
            if seq <= lane.last_msg_seq {
                continue;
            }
            if let Some(r) = m.random_u32() {
                found
                    .entry((m.from_account.clone(), m.msg_time_stamp, r))
                    .or_default()
                    .push_back((seq, m.msg_time_stamp));
            }
        }
        // Oldest first within each key, so equal keys pair with queue order.
        let done = page.is_finished != 0
            || min_seq <= 1
            || i64::try_from(min_seq).unwrap_or(i64::MAX) <= lane.last_msg_seq + 1
            || min_time < oldest;
        if done {
            for v in found.values_mut() {
                v.make_contiguous().sort_unstable();
            }
            return Ok(Some(found));
        }
        req_seq = Some(min_seq - 1);
    }
    Ok(None)
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
        return block(sh, lane, &[], e.code(), &e.info()).await;
    }
    let attempt = doubt.iter().map(|m| m.attempts).max().unwrap_or(1);
    let note = format!("reconciliation read failed: {e}");
    tracing::info!(group = %lane.group_id, error = %e, "cannot read the group back yet; backing off");
    sh.store
        .record(
            lane.id,
            &[],
            &LaneUpdate {
                retry_at: Some(unix_now_ms() + ms(sh.backoff(attempt.min(3)))),
                last_error: Some(note),
                ..LaneUpdate::default()
            },
        )
        .await?;
    Ok(Step::Backoff)
}
