//! One lane's work: claim the head, send it, record the answer; reconcile first whenever the lane
//! has messages in flight. Each outcome class of the Tencent client is handled here, once.
//!
//! A lane task ends when its lane is empty, waits for a backoff (persisted as `retry_at`, so the
//! scheduler and a restart honour it), is blocked, or the engine stops. Everything it decides is
//! written before it sends again, so it can be killed at any await point.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::value::RawValue;

use super::accounts::Readiness;
use super::commit::Outstanding;
use super::{EngineError, Shared, reconcile};
use crate::store::{
    ACCOUNT_FAILED_REASON, Claim, Lane, LaneUpdate, MessageUpdate, QueuedMessage, Record,
    unix_now_ms,
};
use crate::tencent::{
    ApiError, ErrorClass, ImportGroupMsgRequest, ImportMsg, ImportMsgResult, codes,
};

/// What a step left the lane in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Sent something (or reconciled): go on.
    Progress,
    /// Nothing pending.
    Idle,
    /// Wait for `retry_at` (set in the store).
    Backoff,
    /// Blocked with a reason (set in the store).
    Blocked,
    /// The engine stops.
    Stop,
}

/// Codes where one message in the batch may be at fault: split the batch to find it.
fn bisectable(code: i64) -> bool {
    matches!(
        code,
        10004 | 10020 | 10019 | 20003 | 70107 | 80001 | 80002 | 80004 | 93000
    )
}

/// Codes that concern the app or its credentials, not a group: stop every lane.
pub(super) fn app_level(code: i64) -> Option<&'static str> {
    match code {
        70001 | 70002 | 70003 | 70005 | 20002 | 60004 | 60005 => {
            Some("tencent.secret_key (the UserSig is refused)")
        }
        70009 | 70016 => Some("tencent.secret_key (it does not belong to this app)"),
        70013 | 60010 | 70403 | 70402 => {
            Some("tencent.identifier (it must be an App admin account)")
        }
        70014 | 70020 | 60006 | 60012 | 60016 | 60017 => Some("tencent.sdkappid"),
        60020 => Some("the app's edition (it has expired)"),
        60021 => Some("the app's allowed IP list"),
        10026 => Some("the app's enabled commands"),
        _ => None,
    }
}

/// Works one lane until it is idle, waits, is blocked, or the engine stops.
pub async fn work(sh: Arc<Shared>, mut lane: Lane) {
    let mut max_batch = sh.cfg.batch_size;
    // Messages can be left in flight only by an earlier task or process (a step that leaves some
    // ends the task), so they are looked for when the task starts, and then the server is asked
    // whether it holds what is pending (see `reconcile::catch_up`).
    let mut starting = true;
    // The next batch, claimed in the same transaction that recorded the previous answer.
    let mut prefetched: Option<Vec<QueuedMessage>> = None;
    loop {
        if sh.stop.is_cancelled() {
            // Give back a batch claimed but not sent.
            if let Some(batch) = prefetched.take()
                && let Err(e) = release(&sh, &lane, &batch).await
            {
                tracing::warn!(group = %lane.group_id, error = %e, "could not release a claimed batch; it is reconciled at the next start");
            }
            return;
        }
        let result = step(
            &sh,
            &mut lane,
            &mut max_batch,
            &mut starting,
            &mut prefetched,
        )
        .await;
        match result {
            Ok(Step::Progress) => continue,
            Ok(Step::Idle | Step::Backoff | Step::Blocked | Step::Stop) => return,
            Err(e) => {
                // Whatever was claimed stays in flight and is reconciled when the lane starts
                // again, as after a crash: an answer that could not be recorded is asked of the
                // server, never sent twice, and fails no message.
                if sh.store.health() == crate::store::Health::Ok {
                    tracing::warn!(group = %lane.group_id, error = %e, "lane step failed on the store; retrying later");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    // The store has said why, once; the engine waits for it as a whole.
                    tracing::debug!(group = %lane.group_id, error = %e, "lane step failed on the store");
                }
                return;
            }
        }
    }
}

/// One step of a lane.
pub async fn step(
    sh: &Shared,
    lane: &mut Lane,
    max_batch: &mut usize,
    starting: &mut bool,
    prefetched: &mut Option<Vec<QueuedMessage>>,
) -> Result<Step, EngineError> {
    if *starting {
        let in_flight = sh.store.in_flight(lane.id).await?;
        if !in_flight.is_empty() {
            let since = lane.last_msg_seq;
            return reconcile::run(sh, lane, in_flight, &HashSet::new(), since).await;
        }
        // Nothing in doubt: before the first send, make sure the server holds nothing of what
        // is pending (a database put back to an older copy, a job file dropped in again).
        *starting = false;
        if let Some(step) = reconcile::catch_up(sh, lane).await? {
            return Ok(step);
        }
    }
    let batch = match prefetched.take() {
        Some(b) => b,
        None => {
            let cut_at_tie = !sh.ties_ok.load(Ordering::Relaxed);
            sh.store.claim_batch(lane, *max_batch, cut_at_tie).await?
        }
    };
    if batch.is_empty() {
        return Ok(Step::Idle);
    }
    let batch = match senders_ready(sh, lane, batch).await? {
        Ok(b) => b,
        Err(step) => return Ok(step),
    };
    if batch[0].effective_time() < lane.last_send_time && batch[0].id > lane.checked_id {
        // Queued while the lane ran, older than what it imported: looked for first.
        release(sh, lane, &batch).await?;
        return Ok(reconcile::catch_up(sh, lane)
            .await?
            .unwrap_or(Step::Progress));
    }
    if !sh.admitted().await {
        // Stopped while Tencent was down: the batch goes back untouched.
        release(sh, lane, &batch).await?;
        return Ok(Step::Stop);
    }
    let req = match request(lane, &batch) {
        Ok(req) => req,
        Err((id, reason)) => {
            // Never sent altered or empty: that message fails, the rest goes back to pending.
            tracing::warn!(group = %lane.group_id, message = id, reason = %reason, "message failed");
            sh.failed.fetch_add(1, Ordering::Relaxed);
            let updates: Vec<_> = batch
                .iter()
                .map(|m| match m.id == id {
                    true => MessageUpdate::Failed {
                        id,
                        code: None,
                        reason: reason.clone(),
                    },
                    false => MessageUpdate::Pending {
                        id: m.id,
                        refund: true,
                    },
                })
                .collect();
            sh.store
                .record(lane.id, &updates, &LaneUpdate::default())
                .await?;
            return Ok(Step::Progress);
        }
    };
    let started = std::time::Instant::now();
    let out = sh.committer.outstanding();
    let answer = sh.client.import_group_msg(&req).await;
    sh.outage.observe(&answer);
    tracing::debug!(group = %lane.group_id, messages = batch.len(), elapsed_ms = started.elapsed().as_millis() as u64, ok = answer.is_ok(), "import_group_msg");
    match answer {
        Ok(resp) => {
            let results = resp.import_msg_result.unwrap_or_default();
            on_results(sh, lane, &batch, &results, max_batch, prefetched, out).await
        }
        // A failed answer that still carries per-message results: those results stand.
        Err(e) if e.import_results.as_ref().is_some_and(|r| !r.is_empty()) => {
            tracing::info!(group = %lane.group_id, error = %e, "failed answer with per-message results; recording them");
            let results = e.import_results.unwrap_or_default();
            on_results(sh, lane, &batch, &results, max_batch, prefetched, out).await
        }
        Err(e) => on_error(sh, lane, &batch, e, max_batch).await,
    }
}

/// Accounts first: the part of `batch` whose senders are imported accounts (the rest goes back to
/// pending), or what the step ends with: when the head's account failed, the messages of the
/// batch whose account failed fail with [`ACCOUNT_FAILED_REASON`] (the rest of the lane goes on);
/// a head whose account is not imported yet waits (the lane ends until the accounts are in).
async fn senders_ready(
    sh: &Shared,
    lane: &Lane,
    mut batch: Vec<QueuedMessage>,
) -> Result<Result<Vec<QueuedMessage>, Step>, EngineError> {
    let ready = sh.accounts.check(sh, &batch).await?;
    let Some(cut) = ready.iter().position(|r| *r != Readiness::Ready) else {
        return Ok(Ok(batch));
    };
    if cut > 0 {
        release(sh, lane, &batch[cut..]).await?;
        batch.truncate(cut);
        return Ok(Ok(batch));
    }
    match &ready[0] {
        Readiness::Failed(_) => {
            // Every message of the batch whose account failed fails now; the others go back.
            let mut updates = Vec::with_capacity(batch.len());
            for (m, r) in batch.iter().zip(&ready) {
                match r {
                    Readiness::Failed(why) => {
                        let reason = format!(
                            "{ACCOUNT_FAILED_REASON}: {:?} ({why}); fix it, then `timport retry --accounts`",
                            m.from_account
                        );
                        tracing::info!(group = %lane.group_id, message = m.id, reason = %reason, "message failed");
                        metrics::counter!("timport_messages_failed_total", "code" => "account")
                            .increment(1);
                        sh.failed.fetch_add(1, Ordering::Relaxed);
                        updates.push(MessageUpdate::Failed {
                            id: m.id,
                            code: None,
                            reason,
                        });
                    }
                    _ => updates.push(MessageUpdate::Pending {
                        id: m.id,
                        refund: true,
                    }),
                }
            }
            sh.store
                .record(lane.id, &updates, &LaneUpdate::default())
                .await?;
            Ok(Err(Step::Progress))
        }
        _ => {
            release(sh, lane, &batch).await?;
            Ok(Err(Step::Idle))
        }
    }
}

/// Why Tencent refused a message for its sender: it is not an account of the app.
fn not_an_account(code: i64, sender: &str) -> String {
    format!(
        "the sender {sender:?} is not an account of the app (Tencent answered {code}, the requested account does not exist); import the account (import.accounts = \"auto\" does), then `timport retry`"
    )
}

/// The request for `batch`. Each body goes out as the text that was queued (validated and
/// minified at intake), not re-serialized. Err names a message whose stored body is not JSON at
/// all, which only a hand-edited database could cause.
fn request(lane: &Lane, batch: &[QueuedMessage]) -> Result<ImportGroupMsgRequest, (i64, String)> {
    let mut msg_list = Vec::with_capacity(batch.len());
    for m in batch {
        let body = RawValue::from_string(m.body.clone())
            .map_err(|e| (m.id, format!("the queued MsgBody is not JSON ({e})")))?;
        msg_list.push(ImportMsg {
            from_account: m.from_account.clone(),
            send_time: m.effective_time(),
            random: Some(m.random),
            msg_body: body,
        });
    }
    Ok(ImportGroupMsgRequest {
        group_id: lane.group_id.clone(),
        topic_id: (!lane.topic_id.is_empty()).then(|| lane.topic_id.clone()),
        recent_contact_flag: batch.first().and_then(|m| m.recent_contact.then_some(1)),
        msg_list,
    })
}

/// Pairs each message with its result: by MsgTime where that is unambiguous, else by position.
fn match_results<'a>(
    batch: &[QueuedMessage],
    results: &'a [ImportMsgResult],
) -> Vec<Option<&'a ImportMsgResult>> {
    let aligned = results.len() == batch.len()
        && batch
            .iter()
            .zip(results)
            .all(|(m, r)| r.msg_time.is_none_or(|t| t == m.effective_time()));
    if aligned {
        return results.iter().map(Some).collect();
    }
    let mut used = vec![false; results.len()];
    let mut paired: Vec<Option<usize>> = batch
        .iter()
        .map(|m| {
            let i = results
                .iter()
                .enumerate()
                .position(|(i, r)| !used[i] && r.msg_time == Some(m.effective_time()))?;
            used[i] = true;
            Some(i)
        })
        .collect();
    if results.len() == batch.len() {
        // One result per message, some with another MsgTime (a server that answers a repeated
        // Random with the original message's MsgSeq and MsgTime): the rest pair in order, and
        // the mismatch is looked into (see `duplicate_on_random`).
        let mut left = (0..results.len()).filter(|i| !used[*i]);
        for p in paired.iter_mut().filter(|p| p.is_none()) {
            *p = left.next();
        }
    }
    paired.into_iter().map(|p| p.map(|i| &results[i])).collect()
}

async fn on_results(
    sh: &Shared,
    lane: &mut Lane,
    batch: &[QueuedMessage],
    results: &[ImportMsgResult],
    max_batch: &mut usize,
    prefetched: &mut Option<Vec<QueuedMessage>>,
    out: Outstanding,
) -> Result<Step, EngineError> {
    let since_seq = lane.last_msg_seq;
    let mut updates = Vec::with_capacity(batch.len());
    let mut lane_up = LaneUpdate::default();
    let mut refused = HashSet::new();
    let mut unresolved = Vec::new();
    let mut imported = 0u64;
    let mut prev = lane.last_send_time;
    let mut tie_taken = false;
    let mut last_seq = since_seq;
    for (m, r) in batch.iter().zip(match_results(batch, results)) {
        let is_tie = m.effective_time() == prev;
        prev = m.effective_time();
        match r {
            Some(r) if r.result == 0 => {
                let seq = r.msg_seq.and_then(|s| i64::try_from(s).ok()).unwrap_or(0);
                let time = r.msg_time.unwrap_or(m.effective_time());
                if seq <= last_seq || time != m.effective_time() {
                    // Not a new MsgSeq: the server may have taken it as a repeat of another
                    // message's Random and answered with that message's MsgSeq.
                    match duplicate_on_random(sh, lane, m, seq).await {
                        Some(update) => {
                            if matches!(update, MessageUpdate::Failed { .. }) {
                                sh.failed.fetch_add(1, Ordering::Relaxed);
                            } else {
                                imported += 1;
                            }
                            updates.push(update);
                        }
                        None => unresolved.push(m.clone()),
                    }
                    continue;
                }
                last_seq = seq;
                tie_taken |= is_tie;
                updates.push(MessageUpdate::Imported {
                    id: m.id,
                    msg_seq: seq,
                    msg_time: time,
                    note: None,
                });
                lane_up.seen_send_time = lane_up.seen_send_time.max(Some(m.effective_time()));
                lane_up.seen_msg_seq = lane_up.seen_msg_seq.max(Some(seq));
                imported += 1;
            }
            Some(r) if r.result == codes::INVALID_PARAMETER => {
                // Refused for its SendTime: already there (an earlier attempt applied it), or
                // really out of order. Reconciliation tells which.
                refused.insert(m.id);
                unresolved.push(m.clone());
            }
            Some(r) => {
                let reason = match r.result {
                    80001 => "the message contains restricted words (80001)".to_string(),
                    80002 => {
                        "the message body is longer than Tencent's 12,000 bytes (80002)".to_string()
                    }
                    c @ (codes::ACCOUNT_NOT_FOUND | codes::ACCOUNT_NOT_FOUND_70107) => {
                        not_an_account(c, &m.from_account)
                    }
                    c => format!("refused by Tencent with result {c}"),
                };
                metrics::counter!("timport_messages_failed_total", "code" => r.result.to_string())
                    .increment(1);
                tracing::info!(group = %lane.group_id, message = m.id, code = r.result, reason = %reason, "message failed");
                sh.failed.fetch_add(1, Ordering::Relaxed);
                updates.push(MessageUpdate::Failed {
                    id: m.id,
                    code: Some(r.result),
                    reason,
                });
            }
            None => unresolved.push(m.clone()),
        }
    }
    *max_batch = sh.cfg.batch_size;
    // All answered and the engine goes on: claim the next batch in the same transaction.
    let claim_next = unresolved.is_empty() && !sh.stop.is_cancelled();
    let mut after = lane.clone();
    apply_checkpoint(&mut after, &lane_up);
    let cut_at_tie = !(sh.ties_ok.load(Ordering::Relaxed) || tie_taken);
    let next = sh
        .committer
        .submit(
            Record {
                lane_id: lane.id,
                updates,
                lane: lane_up,
                next: claim_next.then(|| Claim {
                    lane: after.clone(),
                    max: *max_batch,
                    cut_at_tie,
                }),
            },
            out,
        )
        .await?;
    count_imported(sh, imported);
    *lane = after;
    if claim_next && !next.is_empty() {
        *prefetched = Some(next);
    }
    if tie_taken && !sh.ties_ok.swap(true, Ordering::Relaxed) {
        tracing::info!(group = %lane.group_id, "the server takes messages sharing a second; batches no longer end at ties");
        if let Err(e) = sh.store.set_meta(super::TIES_ACCEPTED_KEY, "1").await {
            tracing::warn!(error = %e, "could not remember that the server takes ties; it is learned again after a restart");
        }
    }
    if !unresolved.is_empty() {
        return reconcile::run(sh, lane, unresolved, &refused, since_seq).await;
    }
    Ok(if claim_next && prefetched.is_none() {
        Step::Idle
    } else {
        Step::Progress
    })
}

/// A Result 0 whose MsgSeq (`seq`) cannot be `m`'s: it is not above the lane's checkpoint or
/// the MsgSeq before it. What the server holds there decides: `m` itself (imported), another
/// message (failed: the server dropped `m` as a repeat of that message's Random), or `None` when
/// that cannot be read now (reconciled like an unknown outcome).
async fn duplicate_on_random(
    sh: &Shared,
    lane: &Lane,
    m: &QueuedMessage,
    seq: i64,
) -> Option<MessageUpdate> {
    let holder = match reconcile::seq_holder(sh, lane, seq).await {
        Ok(Some(h)) => h,
        Ok(None) | Err(_) => return None,
    };
    let ours = holder.from_account == m.from_account
        && holder.msg_time_stamp == m.effective_time()
        && holder.random_u32() == Some(m.random);
    if ours {
        return Some(MessageUpdate::Imported {
            id: m.id,
            msg_seq: seq,
            msg_time: holder.msg_time_stamp,
            note: None,
        });
    }
    let reason = format!(
        "server-side duplicate on the Random: Tencent answered Result 0 with MsgSeq {seq}, which holds another message (From_Account {:?}, SendTime {}, Random {}); it dropped this message as a repeat of that message's Random {} and stored nothing of it. `timport retry` sends it again (after the server's dedup window has passed)",
        holder.from_account, holder.msg_time_stamp, holder.msg_random, m.random
    );
    tracing::warn!(group = %lane.group_id, message = m.id, seq, reason = %reason, "message failed");
    metrics::counter!("timport_messages_failed_total", "code" => "duplicate_random").increment(1);
    Some(MessageUpdate::Failed {
        id: m.id,
        code: None,
        reason,
    })
}

pub(super) fn count_imported(sh: &Shared, n: u64) {
    if n > 0 {
        sh.imported.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("timport_messages_imported_total").increment(n);
    }
}

pub(super) fn apply_checkpoint(lane: &mut Lane, up: &LaneUpdate) {
    if let Some(id) = up.checked_id {
        lane.checked_id = lane.checked_id.max(id);
        lane.catch_up_waived = false;
    }
    if let Some(t) = up.seen_send_time {
        lane.last_send_time = lane.last_send_time.max(t);
    }
    if let Some(s) = up.seen_msg_seq {
        lane.last_msg_seq = lane.last_msg_seq.max(s);
    }
    if up.tie_nudge {
        lane.tie_nudge = true;
    }
}

/// Tencent refused the app's credentials: the batch goes back untouched and every lane stops with
/// one error naming the setting to check.
async fn stop_on_credentials(
    sh: &Shared,
    lane: &Lane,
    batch: &[QueuedMessage],
    code: i64,
    info: String,
    hint: &'static str,
) -> Result<Step, EngineError> {
    release(sh, lane, batch).await?;
    sh.set_fatal(EngineError::Auth { code, info, hint });
    Ok(Step::Stop)
}

/// Gives the batch back to pending with its attempt refunded (nothing was done with it).
async fn release(sh: &Shared, lane: &Lane, batch: &[QueuedMessage]) -> Result<(), EngineError> {
    sh.store
        .record(
            lane.id,
            &back_to_pending(batch, true),
            &LaneUpdate::default(),
        )
        .await?;
    Ok(())
}

fn back_to_pending(batch: &[QueuedMessage], refund: bool) -> Vec<MessageUpdate> {
    batch
        .iter()
        .map(|m| MessageUpdate::Pending { id: m.id, refund })
        .collect()
}

async fn on_error(
    sh: &Shared,
    lane: &mut Lane,
    batch: &[QueuedMessage],
    e: ApiError,
    max_batch: &mut usize,
) -> Result<Step, EngineError> {
    let code = e.code();
    let info = e.info();
    match e.write_class() {
        ErrorClass::RateLimited => {
            // The client already slowed the pacer; this is not a failed attempt.
            release(sh, lane, batch).await?;
            Ok(Step::Progress)
        }
        ErrorClass::Auth => {
            let c = code.unwrap_or_default();
            let hint = app_level(c).unwrap_or("tencent.secret_key");
            stop_on_credentials(sh, lane, batch, c, info, hint).await
        }
        ErrorClass::Unknown => {
            // May have been applied: keep the batch in flight; the next step reconciles.
            let attempt = batch.iter().map(|m| m.attempts).max().unwrap_or(1);
            let note = format!("outcome unknown: {e}");
            tracing::info!(group = %lane.group_id, messages = batch.len(), error = %e, "request outcome unknown; the lane reconciles before sending again");
            let updates: Vec<_> = batch
                .iter()
                .map(|m| MessageUpdate::Unknown {
                    id: m.id,
                    note: note.clone(),
                })
                .collect();
            back_off(sh, lane, &updates, sh.backoff(attempt.min(3)), note).await
        }
        ErrorClass::Retryable => {
            // Nothing was applied and nothing is wrong with the messages: they go back to the
            // head of the lane and wait, however long it takes (a message fails only for a
            // reason of its own). The wait is capped by `import.backoff_max`.
            let attempt = batch.iter().map(|m| m.attempts).max().unwrap_or(1);
            let reason = format!("{e}");
            if attempt == i64::from(sh.cfg.max_attempts) {
                tracing::warn!(group = %lane.group_id, attempt, code, error = %e, "the lane's head has failed transiently {attempt} times; it keeps waiting and retrying (no message is failed for it)");
            } else {
                tracing::info!(group = %lane.group_id, attempt, code, error = %e, "retryable answer; backing off");
            }
            back_off(
                sh,
                lane,
                &back_to_pending(batch, false),
                sh.backoff(attempt),
                reason,
            )
            .await
        }
        ErrorClass::Permanent | ErrorClass::PerMessage => {
            let c = code.unwrap_or_default();
            if let Some(hint) = app_level(c) {
                return stop_on_credentials(sh, lane, batch, c, info, hint).await;
            }
            if code.is_some_and(bisectable) {
                if batch.len() > 1 {
                    // Split: send the first half alone; the head moves on as halves succeed.
                    *max_batch = batch.len() / 2;
                    tracing::info!(group = %lane.group_id, code = c, size = batch.len(), next = *max_batch, "whole request refused; bisecting the batch");
                    release(sh, lane, batch).await?;
                    return Ok(Step::Progress);
                }
                *max_batch = sh.cfg.batch_size;
                let reason = match c {
                    codes::ACCOUNT_NOT_FOUND | codes::ACCOUNT_NOT_FOUND_70107 => {
                        let sender = batch.first().map(|m| m.from_account.as_str());
                        format!("{} ({info})", not_an_account(c, sender.unwrap_or_default()))
                    }
                    _ => format!("refused by Tencent ({c}: {info})"),
                };
                tracing::info!(group = %lane.group_id, code = c, reason = %reason, "message failed");
                metrics::counter!("timport_messages_failed_total", "code" => c.to_string())
                    .increment(1);
                sh.failed.fetch_add(1, Ordering::Relaxed);
                let updates: Vec<_> = batch
                    .iter()
                    .map(|m| MessageUpdate::Failed {
                        id: m.id,
                        code,
                        reason: reason.clone(),
                    })
                    .collect();
                sh.store
                    .record(lane.id, &updates, &LaneUpdate::default())
                    .await?;
                return Ok(Step::Progress);
            }
            block(sh, lane, batch, code, &info).await
        }
    }
}

/// Records `updates` and parks the lane for `delay` (persisted as `retry_at`), saying why.
pub(super) async fn back_off(
    sh: &Shared,
    lane: &Lane,
    updates: &[MessageUpdate],
    delay: Duration,
    why: String,
) -> Result<Step, EngineError> {
    let up = LaneUpdate {
        retry_at: Some(unix_now_ms() + ms(delay)),
        last_error: Some(why),
        ..LaneUpdate::default()
    };
    sh.store.record(lane.id, updates, &up).await?;
    Ok(Step::Backoff)
}

/// Blocks the lane: its messages go back to pending (shown as blocked) until `timport retry`.
pub(super) async fn block(
    sh: &Shared,
    lane: &Lane,
    batch: &[QueuedMessage],
    code: Option<i64>,
    info: &str,
) -> Result<Step, EngineError> {
    let reason = match code {
        Some(10010) | Some(10015) => format!(
            "group {} does not exist on Tencent ({}: {info}); create it, then run `timport retry --group {}`",
            lane.group_id,
            code.unwrap_or_default(),
            lane.group_id
        ),
        Some(10007) => format!(
            "no permission to import into group {} (10007: {info}); AVChatRoom groups cannot be imported into",
            lane.group_id
        ),
        Some(c) => format!("refused by Tencent ({c}: {info})"),
        None => info.to_string(),
    };
    tracing::warn!(group = %lane.group_id, topic = %lane.topic_id, code, reason = %reason, "lane blocked");
    sh.store
        .record(
            lane.id,
            &back_to_pending(batch, true),
            &LaneUpdate {
                block: Some((code, reason)),
                ..LaneUpdate::default()
            },
        )
        .await?;
    Ok(Step::Blocked)
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
