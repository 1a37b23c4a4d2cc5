//! Reconciliation: before anything whose outcome is unknown is sent again, and before a lane
//! sends into a group the server holds more of than the lane's checkpoint says, ask the server
//! what it already has. This is what makes "nothing duplicated" hold after the five-minute Random
//! dedup window has closed (a restart hours later, a database put back to an older copy, a job
//! file dropped in again), where re-sending blindly would import twice.
//!
//! The history is read with `group_msg_get_simple`, newest first, down to the lane's checkpoint
//! (or further, to the oldest message in question), and each message in question is paired with
//! a message read back: first on (From_Account, MsgTimeStamp, MsgRandom), then, for those left,
//! on (From_Account, MsgTimeStamp, body compared as JSON values), since a message queued again
//! after a restore may carry another Random. Each message read back pairs at most once.
//!
//! - [`run`]: messages in flight (an unknown outcome, a crash mid-request). Found: imported with
//!   the server's MsgSeq. Not found: sent again with the same Random, or, for a message the
//!   server refused with 10004, failed with the reason (or nudged, for a same-second tie under
//!   `import.tie_policy = "nudge"`).
//! - [`catch_up`]: at the start of every lane task (and whenever a lane's head is older than
//!   its checkpoint), `get_group_info` (batched, up to 50 groups per call, [`GroupInfos`]) tells
//!   whether the group's newest MsgSeq is past the checkpoint; if it is, or if pending messages
//!   are not newer than what the lane already imported, the pending messages that the server
//!   could hold are looked for the same way and adopted as imported where found.
//! - [`seq_holder`]: what the server holds at one MsgSeq, for a Result 0 whose MsgSeq cannot be
//!   this message's (a duplicate on the Random).
//!
//! A failed read leaves everything as it was and backs the lane off; a read that cannot prove
//! what is there (holes, expired history, too long) blocks the lane with the reason, and nothing
//! is sent. Every read waits for the outage gate and reports to it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;

use super::lane::{Step, app_level, apply_checkpoint, back_off, block, count_imported};
use super::{EngineError, Shared};
use crate::settings::TiePolicy;
use crate::store::{Lane, LaneUpdate, MessageUpdate, QueuedMessage};
use crate::tencent::{
    ApiError, ApiErrorKind, ErrorClass, GetGroupInfoRequest, GroupInfo, GroupMsgGetSimpleRequest,
    body,
};

/// Pages of 20 read back at most, before the lane is blocked as inconclusive.
pub const MAX_PAGES: usize = 500;

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
    if !sh.admitted().await {
        // Stopped while Tencent was down: everything stays in flight for the next start.
        return Ok(Step::Stop);
    }
    // The tail of the history first: after a lost answer the batch is usually all there, and one
    // page settles it.
    let mut found = match scan(sh, lane, since_seq, oldest, MAX_PAGES).await {
        Ok(Scan::Read(found)) => Some(found),
        Ok(Scan::Missing) => None,
        Ok(Scan::Inconclusive(why)) => {
            // Keep the messages in flight: nothing may be sent again until a read is conclusive.
            return block(sh, lane, &[], None, &why).await;
        }
        Err(e) => return read_failed(sh, lane, &doubt, e).await,
    };
    let mut matched: Vec<Option<(i64, i64)>> = match found.as_mut() {
        Some(f) => f.pair(&doubt),
        None => vec![None; doubt.len()],
    };
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
        } else {
            // Not there: sent again with the same Random, however many attempts it took (an
            // outage is no fault of the message).
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
        .await;
    sh.outage.observe(&resp);
    let resp = resp?;
    Ok(resp
        .group_info
        .into_iter()
        .find(|g| g.group_id == lane.group_id))
}

/// One message read back.
#[derive(Debug)]
struct ServerMsg {
    seq: i64,
    time: i64,
    from: String,
    random: u32,
    /// [`body::canonical`] of its MsgBody.
    body: String,
    paired: bool,
}

/// The messages read back above the point where reading stopped, oldest first.
#[derive(Debug, Default)]
pub struct Found {
    msgs: Vec<ServerMsg>,
    /// The group's (or topic's) newest MsgSeq, 0 for an empty history.
    pub newest_seq: i64,
    /// The newest MsgTimeStamp read, 0 for none.
    pub newest_time: i64,
}

impl Found {
    /// Pairs each of `ours` with a message read back (its MsgSeq and MsgTimeStamp): first on
    /// (sender, time, Random), then, for those left, on (sender, time, body as JSON values), each
    /// message read back at most once, oldest first.
    pub fn pair(&mut self, ours: &[QueuedMessage]) -> Vec<Option<(i64, i64)>> {
        let mut by_random: HashMap<(&str, i64, u32), VecDeque<usize>> = HashMap::new();
        let mut by_body: HashMap<(&str, i64, &str), VecDeque<usize>> = HashMap::new();
        for (i, m) in self.msgs.iter().enumerate().filter(|(_, m)| !m.paired) {
            by_random
                .entry((m.from.as_str(), m.time, m.random))
                .or_default()
                .push_back(i);
            by_body
                .entry((m.from.as_str(), m.time, m.body.as_str()))
                .or_default()
                .push_back(i);
        }
        let mut taken = vec![false; self.msgs.len()];
        // The oldest message of a key not taken yet (by the other key's pass).
        fn take(q: Option<&mut VecDeque<usize>>, taken: &mut [bool]) -> Option<usize> {
            let q = q?;
            while let Some(i) = q.pop_front() {
                if !taken[i] {
                    taken[i] = true;
                    return Some(i);
                }
            }
            None
        }
        let mut hits: Vec<Option<usize>> = ours
            .iter()
            .map(|m| {
                take(
                    by_random.get_mut(&(m.from_account.as_str(), m.effective_time(), m.random)),
                    &mut taken,
                )
            })
            .collect();
        let bodies: Vec<Option<String>> = ours
            .iter()
            .zip(&hits)
            .map(|(m, h)| match h {
                Some(_) => None,
                None => body::canonical_text(&m.body),
            })
            .collect();
        for ((m, hit), b) in ours.iter().zip(hits.iter_mut()).zip(&bodies) {
            if let (None, Some(b)) = (&hit, b) {
                *hit = take(
                    by_body.get_mut(&(m.from_account.as_str(), m.effective_time(), b.as_str())),
                    &mut taken,
                );
            }
        }
        for (i, t) in taken.iter().enumerate() {
            self.msgs[i].paired |= *t;
        }
        hits.into_iter()
            .map(|h| h.map(|i| (self.msgs[i].seq, self.msgs[i].time)))
            .collect()
    }
}

/// What reading the history back gave.
pub enum Scan {
    /// The history down to where it was asked for.
    Read(Found),
    /// The group does not exist: it holds nothing of ours.
    Missing,
    /// The history cannot prove what is there (holes, expiry, too long): the reason.
    Inconclusive(String),
}

/// Reads the lane's history newest first, down to `stop_seq` (exclusive) or to the first message
/// older than `oldest`, at most `max_pages` pages of 20. A hole in that range (IsPlaceMsg 1: an
/// expired, failed or deleted message, without sender or Random) makes it inconclusive.
pub async fn scan(
    sh: &Shared,
    lane: &Lane,
    stop_seq: i64,
    oldest: i64,
    max_pages: usize,
) -> Result<Scan, ApiError> {
    let mut found = Found::default();
    let mut req_seq: Option<u64> = None;
    let inconclusive = |what: &str| {
        Scan::Inconclusive(format!(
            "reconciliation inconclusive: {what} after MsgSeq {stop_seq} (SendTime {oldest} on); nothing is sent until it is clear. Check the group's history (retention may have expired), then `timport retry --group {}`",
            lane.group_id
        ))
    };
    for _ in 0..max_pages {
        if !sh.admitted().await {
            return Err(ApiError::new(
                "group_msg_get_simple",
                ApiErrorKind::Connect("the engine is stopping".into()),
            ));
        }
        let page = sh
            .client
            .group_msg_get_simple(&GroupMsgGetSimpleRequest {
                group_id: lane.group_id.clone(),
                req_msg_number: 20,
                req_msg_seq: req_seq,
                topic_id: (!lane.topic_id.is_empty()).then(|| lane.topic_id.clone()),
                with_recalled_msg: None,
            })
            .await;
        sh.outage.observe(&page);
        let page = match page {
            Ok(p) => p,
            Err(e) if matches!(e.code(), Some(10010 | 10015)) => return Ok(Scan::Missing),
            Err(e) => return Err(e),
        };
        if page.rsp_msg_list.is_empty() {
            found.msgs.sort_unstable_by_key(|m| m.seq);
            return Ok(Scan::Read(found));
        }
        let mut min_seq = u64::MAX;
        let mut reached = false;
        for m in &page.rsp_msg_list {
            min_seq = min_seq.min(m.msg_seq);
            let seq = i64::try_from(m.msg_seq).unwrap_or(i64::MAX);
            if req_seq.is_none() {
                found.newest_seq = found.newest_seq.max(seq);
            }
            if seq <= stop_seq {
                reached = true;
                continue;
            }
            match m.random_u32() {
                Some(random) if m.is_place_msg != 1 => {
                    found.newest_time = found.newest_time.max(m.msg_time_stamp);
                    reached |= m.msg_time_stamp < oldest;
                    found.msgs.push(ServerMsg {
                        seq,
                        time: m.msg_time_stamp,
                        from: m.from_account.clone(),
                        random,
                        body: body::canonical(&m.msg_body),
                        paired: false,
                    });
                }
                // A hole known to be older than every message in question cannot be one.
                _ if m.msg_time_stamp > 0 && m.msg_time_stamp < oldest => reached = true,
                _ => {
                    return Ok(inconclusive(
                        "the server shows a hole (expired or deleted message)",
                    ));
                }
            }
        }
        let below_stop = i64::try_from(min_seq).unwrap_or(i64::MAX) <= stop_seq + 1;
        if reached || below_stop || min_seq <= 1 || page.is_finished == 1 {
            found.msgs.sort_unstable_by_key(|m| m.seq);
            return Ok(Scan::Read(found));
        }
        if page.is_finished == 2 {
            return Ok(inconclusive("the rest of the history has expired"));
        }
        req_seq = Some(min_seq - 1);
    }
    Ok(inconclusive(&format!(
        "more than {} messages",
        max_pages * 20
    )))
}

async fn read_failed(
    sh: &Shared,
    lane: &Lane,
    doubt: &[QueuedMessage],
    e: ApiError,
) -> Result<Step, EngineError> {
    let app_level = e.code().and_then(app_level);
    if e.class() == ErrorClass::Auth || app_level.is_some() {
        let code = e.code().unwrap_or_default();
        sh.set_fatal(EngineError::Auth {
            code,
            info: e.info(),
            hint: app_level.unwrap_or("tencent.secret_key"),
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

/// Most pending messages one catch-up looks for (more are looked for at the next).
pub const CATCH_UP_LIMIT: i64 = 50_000;
/// Most pages of 20 one catch-up reads back before it is inconclusive.
pub const CATCH_UP_PAGES: usize = 10_000;

/// Before a lane sends (see the module doc): looks for its pending messages on the server when
/// the group's newest MsgSeq is past the lane's checkpoint, or when pending messages are not newer
/// than what the lane already imported. Found ones are adopted as imported; the checkpoint moves
/// to the server's newest MsgSeq. `None`: the lane may send; otherwise the step it took.
pub async fn catch_up(sh: &Shared, lane: &mut Lane) -> Result<Option<Step>, EngineError> {
    let (oldest, newest_id, stale) = sh
        .store
        .pending_span(lane.id, lane.checked_id, lane.last_send_time)
        .await?;
    let Some(oldest) = oldest else {
        return Ok(None);
    };
    // The group's newest MsgSeq; topics have their own sequences, which only a read tells.
    let server_newest = if lane.topic_id.is_empty() {
        match sh.group_infos.get(&lane.group_id).await {
            Ok(Some(i)) if i.error_code == 0 => i
                .next_msg_seq
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX) - 1),
            // Missing, or refused for another reason: nothing of ours is there; the import
            // itself meets the reason and blocks the lane with it.
            Ok(Some(_)) => return Ok(None),
            Ok(None) => None,
            Err(e) => return read_failed(sh, lane, &[], e).await.map(Some),
        }
    } else {
        None
    };
    let ahead = server_newest.is_none_or(|n| n > lane.last_msg_seq);
    if lane.catch_up_waived {
        return waived(sh, lane, newest_id).await.map(Some);
    }
    if !ahead && !stale {
        return Ok(None);
    }
    // Below the checkpoint only for messages queued after the lane imported as new as them.
    let stop_seq = if stale { 0 } else { lane.last_msg_seq };
    let mut found = match scan(sh, lane, stop_seq, oldest, CATCH_UP_PAGES).await {
        Ok(Scan::Read(found)) => found,
        Ok(Scan::Missing) => return Ok(None),
        Ok(Scan::Inconclusive(why)) => return block(sh, lane, &[], None, &why).await.map(Some),
        Err(e) => return read_failed(sh, lane, &[], e).await.map(Some),
    };
    let ours = sh
        .store
        .pending_upto(lane.id, found.newest_time, CATCH_UP_LIMIT)
        .await?;
    let complete = i64::try_from(ours.len()).unwrap_or(i64::MAX) < CATCH_UP_LIMIT;
    let hits = found.pair(&ours);
    let mut updates = Vec::new();
    let mut lane_up = LaneUpdate::default();
    for (m, hit) in ours.iter().zip(&hits) {
        if let Some((seq, time)) = *hit {
            updates.push(MessageUpdate::Adopted {
                id: m.id,
                msg_seq: seq,
                msg_time: time,
                note: "already on the server (found before sending, by catch-up)".into(),
            });
            lane_up.seen_send_time = lane_up.seen_send_time.max(Some(m.effective_time()));
            lane_up.seen_msg_seq = lane_up.seen_msg_seq.max(Some(seq));
        }
    }
    let adopted = updates.len() as u64;
    if complete {
        // Every pending message the server could hold was looked for in all of its history
        // that could hold it.
        // The checkpoint moves to the server's newest message, time included: a message queued
        // later that is not newer than it is looked for again (it may be one of those there).
        lane_up.seen_msg_seq = lane_up.seen_msg_seq.max(Some(found.newest_seq));
        lane_up.seen_send_time = lane_up.seen_send_time.max(Some(found.newest_time));
        lane_up.checked_id = Some(newest_id);
    }
    tracing::info!(
        group = %lane.group_id,
        topic = %lane.topic_id,
        checkpoint = lane.last_msg_seq,
        server_newest = found.newest_seq,
        looked_for = ours.len(),
        already_there = adopted,
        "caught up with the server before sending"
    );
    sh.store.record(lane.id, &updates, &lane_up).await?;
    count_imported(sh, adopted);
    apply_checkpoint(lane, &lane_up);
    Ok((adopted > 0 || !complete).then_some(Step::Progress))
}

/// `timport retry` on a lane whose history could not be read conclusively: the operator has
/// looked, so the server's newest MsgSeq becomes the checkpoint and the pending messages go out
/// without being looked for.
async fn waived(sh: &Shared, lane: &mut Lane, newest_id: i64) -> Result<Step, EngineError> {
    let newest = match scan(sh, lane, i64::MAX, 0, 1).await {
        Ok(Scan::Read(found)) => found.newest_seq,
        Ok(Scan::Missing) => 0,
        Ok(Scan::Inconclusive(why)) => return block(sh, lane, &[], None, &why).await,
        Err(e) => return read_failed(sh, lane, &[], e).await,
    };
    tracing::warn!(group = %lane.group_id, topic = %lane.topic_id, checkpoint = newest, "catch-up waived by `timport retry`: the server's newest MsgSeq is the checkpoint; pending messages are sent without being looked for");
    let lane_up = LaneUpdate {
        seen_msg_seq: Some(newest),
        checked_id: Some(newest_id),
        ..LaneUpdate::default()
    };
    sh.store.record(lane.id, &[], &lane_up).await?;
    apply_checkpoint(lane, &lane_up);
    Ok(Step::Progress)
}

/// What the server holds at `seq` in the lane's history (`None`: nothing, or a hole).
pub async fn seq_holder(
    sh: &Shared,
    lane: &Lane,
    seq: i64,
) -> Result<Option<crate::tencent::RspMsg>, ApiError> {
    let Ok(seq) = u64::try_from(seq) else {
        return Ok(None);
    };
    if seq == 0 || !sh.admitted().await {
        return Ok(None);
    }
    let page = sh
        .client
        .group_msg_get_simple(&GroupMsgGetSimpleRequest {
            group_id: lane.group_id.clone(),
            req_msg_number: 1,
            req_msg_seq: Some(seq),
            topic_id: (!lane.topic_id.is_empty()).then(|| lane.topic_id.clone()),
            with_recalled_msg: None,
        })
        .await;
    sh.outage.observe(&page);
    Ok(page?
        .rsp_msg_list
        .into_iter()
        .find(|m| m.msg_seq == seq && m.is_place_msg != 1))
}

type InfoReply = tokio::sync::oneshot::Sender<Result<Option<GroupInfo>, ApiError>>;

/// `get_group_info` for many lanes at once: requests that arrive within a few milliseconds of
/// each other share one call of up to [`GROUP_INFO_BATCH`] groups.
pub struct GroupInfos {
    tx: tokio::sync::mpsc::UnboundedSender<(String, InfoReply)>,
}

/// Groups per get_group_info call (Tencent's maximum).
pub const GROUP_INFO_BATCH: usize = 50;

impl GroupInfos {
    /// The handle, and the receiver for [`GroupInfos::work`].
    pub fn new() -> (
        Self,
        tokio::sync::mpsc::UnboundedReceiver<(String, InfoReply)>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (GroupInfos { tx }, rx)
    }

    /// The group's details (`None` when the answer does not list it).
    pub async fn get(&self, group: &str) -> Result<Option<GroupInfo>, ApiError> {
        let stopping = || {
            ApiError::new(
                "get_group_info",
                ApiErrorKind::Connect("the engine is stopping".into()),
            )
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send((group.to_string(), reply))
            .map_err(|_| stopping())?;
        answer.await.unwrap_or_else(|_| Err(stopping()))
    }

    /// Answers [`GroupInfos::get`] calls until the engine stops.
    pub async fn work(
        sh: std::sync::Arc<Shared>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, InfoReply)>,
    ) {
        loop {
            let first = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => return },
                _ = sh.stop.cancelled() => return,
            };
            let mut batch = vec![first];
            let gather = tokio::time::sleep(std::time::Duration::from_millis(5));
            tokio::pin!(gather);
            let mut groups: Vec<String> = vec![batch[0].0.clone()];
            while groups.len() < GROUP_INFO_BATCH {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => {
                            if !groups.contains(&r.0) {
                                groups.push(r.0.clone());
                            }
                            batch.push(r);
                        }
                        None => break,
                    },
                    _ = &mut gather => break,
                }
            }
            if !sh.admitted().await {
                return;
            }
            let answer = sh
                .client
                .get_group_info(&GetGroupInfoRequest {
                    group_id_list: groups,
                    response_filter: None,
                })
                .await;
            sh.outage.observe(&answer);
            for (group, reply) in batch {
                let _ = reply.send(
                    answer
                        .as_ref()
                        .map(|r| r.group_info.iter().find(|i| i.group_id == group).cloned())
                        .map_err(Clone::clone),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(id: i64, from: &str, time: i64, random: u32, body: &str) -> QueuedMessage {
        QueuedMessage {
            id,
            from_account: from.into(),
            send_time: time,
            sent_time: None,
            random,
            recent_contact: false,
            body: body.into(),
            attempts: 1,
        }
    }

    fn theirs(seq: i64, from: &str, time: i64, random: u32, body: &str) -> ServerMsg {
        ServerMsg {
            seq,
            time,
            from: from.into(),
            random,
            body: body::canonical_text(body).unwrap(),
            paired: false,
        }
    }

    const HI: &str = r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]"#;
    const HI_BACK: &str = r#"[{"MsgContent":{"Text":"hi"},"MsgType":"TIMTextElem"}]"#;
    const HO: &str = r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"ho"}}]"#;

    #[test]
    fn pairs_on_random_first_then_on_body_each_server_message_once() {
        let mut found = Found {
            msgs: vec![
                theirs(5, "a", 100, 7, HI_BACK),
                // Same sender, second and body as message 2, under another Random (queued again
                // after a restore, it got another one).
                theirs(6, "a", 100, 99, HI_BACK),
                theirs(7, "b", 100, 8, HO),
            ],
            newest_seq: 7,
            newest_time: 100,
        };
        let mine = [
            ours(1, "a", 100, 7, HI),
            ours(2, "a", 100, 3, HI),
            // A third identical "hi": no server message left for it.
            ours(3, "a", 100, 4, HI),
            // Sender differs from seq 7's: no pair, whatever the body.
            ours(4, "c", 100, 8, HO),
        ];
        let hits = found.pair(&mine);
        assert_eq!(
            hits,
            vec![Some((5, 100)), Some((6, 100)), None, None],
            "Random first (1 takes seq 5, not seq 6 by body), then body; each once"
        );
        // A later pairing sees only what is left.
        assert_eq!(
            found.pair(&[ours(9, "b", 100, 1, HO)]),
            vec![Some((7, 100))]
        );
        assert_eq!(found.pair(&[ours(10, "a", 100, 7, HI)]), vec![None]);
    }
}
