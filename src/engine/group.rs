//! Whole-group steps, in the order Tencent needs them (tencent-api.md sections 1.3 and 3): the
//! group is created (`import_group`, with a CreateTime before its first message) before any of its
//! messages go, and its members (`import_group_member`, at most 300 per request) and their unread
//! counts (`set_unread_msg_num`) only after its whole history is in, since importing messages sets
//! every member's unread count to 0.
//!
//! One task works the steps of all groups, one request at a time, through the same client and
//! pacer as the lanes. Every step is recorded before the next is taken, so a stop or SIGKILL
//! anywhere resumes where it was: an import_group whose answer was lost is sent again, and its
//! 10021 ("ID in use") then counts as done because an earlier attempt was ours; members are
//! idempotent (Result 2, already a member, counts as done). The task ends when `stop` fires.

use std::time::Duration;

use super::accounts::Readiness;
use super::{EngineError, Shared};
use crate::store::{
    ACCOUNT_FAILED_REASON, GroupToCreate, MemberRow, MemberUpdate, StoreError, unix_now_ms,
};
use crate::tencent::{
    ApiError, ErrorClass, ImportGroupMemberRequest, ImportGroupRequest, ImportMember,
    SetUnreadMsgNumRequest, codes,
};

/// Members per import_group_member request (Tencent's maximum).
pub const MEMBERS_PER_REQUEST: i64 = 300;

/// Works group steps until `stop` fires.
pub async fn work(sh: std::sync::Arc<Shared>) {
    let sh = &*sh;
    loop {
        if sh.stop.is_cancelled() {
            return;
        }
        // While the database refuses writes the store probes it; group steps wait.
        let did = if sh.store.writes_refused().is_some() {
            false
        } else {
            match step_all(sh).await {
                Ok(did) => did,
                Err(e) => {
                    if sh.store.health() == crate::store::Health::Ok {
                        tracing::warn!(error = %e, "group step failed on the store; retrying");
                    } else {
                        tracing::debug!(error = %e, "group step failed on the store");
                    }
                    false
                }
            }
        };
        if !did {
            tokio::select! {
                _ = sh.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// One pass over the due group steps; true when any ran.
async fn step_all(sh: &Shared) -> Result<bool, StoreError> {
    let mut did = false;
    // Owners and members are accounts: none of their steps before the accounts are in.
    if sh.accounts.busy() {
        return Ok(false);
    }
    let to_create = sh.store.groups_to_create(unix_now_ms(), 16).await?;
    let with_members = sh.store.groups_with_member_work(unix_now_ms(), 16).await?;
    // Read after the work: a group or member seen above was queued with its accounts, so a
    // pending one among them is seen here (the flag above may not have caught up yet).
    if sh.cfg.accounts
        && !(to_create.is_empty() && with_members.is_empty())
        && sh.store.accounts_pending().await?
    {
        return Ok(false);
    }
    for g in to_create {
        if sh.stop.is_cancelled() {
            return Ok(did);
        }
        create(sh, &g).await?;
        did = true;
    }
    for group in with_members {
        if sh.stop.is_cancelled() {
            return Ok(did);
        }
        members(sh, &group).await?;
        did = true;
    }
    Ok(did)
}

/// Members queued after their account already failed are failed here, with the account's
/// reason (as the accounts stage fails those pending when it fails), and never sent; members
/// whose account is still pending wait for it. Returns the members to send now.
async fn without_failed_accounts(
    sh: &Shared,
    group: &str,
    batch: Vec<MemberRow>,
) -> Result<Vec<MemberRow>, StoreError> {
    let ids: Vec<&str> = batch.iter().map(|m| m.account.as_str()).collect();
    let ready = sh.accounts.check_ids(sh, &ids).await?;
    let mut send = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for (m, r) in batch.into_iter().zip(ready) {
        match r {
            Readiness::Ready => send.push(m),
            Readiness::Wait => {}
            Readiness::Failed(why) => {
                let reason = format!(
                    "member {}: {why}",
                    ACCOUNT_FAILED_REASON.trim_start_matches("sender ")
                );
                tracing::info!(group, member = %m.account, reason = %reason, "member failed");
                refused.push(MemberUpdate::Failed {
                    id: m.id,
                    result: None,
                    reason,
                });
            }
        }
    }
    if !refused.is_empty() {
        sh.store.record_members(&refused).await?;
    }
    Ok(send)
}

/// What to do with an error of a group step.
enum Next {
    /// Try again after a pause (rate limit, retryable, unknown outcome).
    Later(Duration),
    /// The engine stops (credentials).
    Stop,
    /// Permanent for this step.
    Refused,
}

fn next_after(sh: &Shared, e: &ApiError, attempt: i64) -> Next {
    match e.class() {
        ErrorClass::RateLimited => Next::Later(Duration::from_millis(200)),
        ErrorClass::Retryable | ErrorClass::Unknown => Next::Later(sh.backoff(attempt.max(1))),
        ErrorClass::Auth => {
            sh.set_fatal(EngineError::Auth {
                code: e.code().unwrap_or_default(),
                info: e.info(),
                hint: "tencent.secret_key",
            });
            Next::Stop
        }
        ErrorClass::Permanent | ErrorClass::PerMessage => Next::Refused,
    }
}

async fn create(sh: &Shared, g: &GroupToCreate) -> Result<(), StoreError> {
    let req: ImportGroupRequest = match serde_json::from_str(&g.spec) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("the stored group definition is unreadable: {e}");
            return sh.store.group_blocked(&g.group_id, None, &reason).await;
        }
    };
    // An owner whose account failed: the server would refuse the group; say why instead.
    if let Some(owner) = req.owner_account.as_deref()
        && let [Readiness::Failed(why)] = sh.accounts.check_ids(sh, &[owner]).await?.as_slice()
    {
        let reason = format!(
            "owner {}: {owner:?} ({why}); fix it, then `timport retry --accounts` and `timport retry --group {}`",
            ACCOUNT_FAILED_REASON.trim_start_matches("sender "),
            g.group_id
        );
        tracing::warn!(group = %g.group_id, reason = %reason, "lane blocked");
        return sh.store.group_blocked(&g.group_id, None, &reason).await;
    }
    sh.store.count_create_attempt(&g.group_id).await?;
    let Some(answer) = call(sh, sh.client.import_group(&req)).await else {
        return Ok(());
    };
    match answer {
        Ok(_) => {
            tracing::info!(group = %g.group_id, "group created");
            sh.store.group_created(&g.group_id, None).await
        }
        Err(e) if e.code() == Some(codes::GROUP_ID_IN_USE) && g.attempts > 0 => {
            tracing::info!(group = %g.group_id, "group already exists: created by an earlier attempt whose answer was lost");
            sh.store
                .group_created(
                    &g.group_id,
                    Some("created by an earlier attempt (10021 on retry)"),
                )
                .await
        }
        Err(e) if e.code() == Some(codes::GROUP_ID_IN_USE) => {
            let reason = format!(
                "group {} already exists on Tencent and was not created by timport (10021: {}); to import into it as it is, run `timport retry --group {}`",
                g.group_id,
                e.info(),
                g.group_id
            );
            tracing::warn!(group = %g.group_id, code = 10021, reason = %reason, "lane blocked");
            sh.store
                .group_blocked(&g.group_id, Some(10021), &reason)
                .await
        }
        Err(e) => match next_after(sh, &e, g.attempts + 1) {
            Next::Later(d) => later(sh, &g.group_id, d, &e).await,
            Next::Stop => Ok(()),
            Next::Refused => {
                let reason = format!("import_group refused ({e})");
                tracing::warn!(group = %g.group_id, code = e.code(), reason = %reason, "lane blocked");
                sh.store.group_blocked(&g.group_id, e.code(), &reason).await
            }
        },
    }
}

async fn members(sh: &Shared, group: &str) -> Result<(), StoreError> {
    let batch = sh.store.pending_members(group, MEMBERS_PER_REQUEST).await?;
    let batch = without_failed_accounts(sh, group, batch).await?;
    if !batch.is_empty() {
        let req = ImportGroupMemberRequest {
            group_id: group.to_string(),
            member_list: batch
                .iter()
                .map(|m| ImportMember {
                    member_account: m.account.clone(),
                    role: m.role.clone(),
                    join_time: m.join_time,
                    unread_msg_num: m.unread_msg_num.and_then(|n| u64::try_from(n).ok()),
                })
                .collect(),
        };
        let Some(answer) = call(sh, sh.client.import_group_member(&req)).await else {
            return Ok(());
        };
        let updates: Vec<MemberUpdate> = match answer {
            Ok(resp) => batch
                .iter()
                .map(|m| {
                    let result = resp
                        .member_list
                        .iter()
                        .find(|r| r.member_account == m.account)
                        .map(|r| r.result);
                    let wants_unread = m.unread_msg_num.is_some_and(|n| n > 0);
                    match result {
                        Some(1) => MemberUpdate::Imported {
                            id: m.id,
                            result: 1,
                            unread_pending: false,
                        },
                        // Already a member: its unread count was zeroed by the history import.
                        Some(2) => MemberUpdate::Imported {
                            id: m.id,
                            result: 2,
                            unread_pending: wants_unread,
                        },
                        Some(r) => MemberUpdate::Failed {
                            id: m.id,
                            result: Some(r),
                            reason: format!(
                                "Tencent refused the member (Result {r}): its JoinTime must be after the group's CreateTime and before now, and the account must exist"
                            ),
                        },
                        None => MemberUpdate::Failed {
                            id: m.id,
                            result: None,
                            reason: "the answer did not list the member".into(),
                        },
                    }
                })
                .collect(),
            Err(e) => match next_after(sh, &e, 1) {
                Next::Later(d) => return later(sh, group, d, &e).await,
                Next::Stop => return Ok(()),
                Next::Refused => batch
                    .iter()
                    .map(|m| MemberUpdate::Failed {
                        id: m.id,
                        result: None,
                        reason: format!("import_group_member refused ({e})"),
                    })
                    .collect(),
            },
        };
        let (ok, failed) = updates.iter().fold((0, 0), |(o, f), u| match u {
            MemberUpdate::Imported { .. } => (o + 1, f),
            _ => (o, f + 1),
        });
        for u in &updates {
            if let MemberUpdate::Failed { id, reason, .. } = u {
                tracing::info!(group, member = id, reason = %reason, "member failed");
            }
        }
        tracing::info!(group, imported = ok, failed, "members imported");
        return sh.store.record_members(&updates).await;
    }
    for m in sh.store.pending_unread(group, 50).await? {
        if sh.stop.is_cancelled() {
            return Ok(());
        }
        let req = SetUnreadMsgNumRequest {
            group_id: group.to_string(),
            member_account: m.account.clone(),
            unread_msg_num: m
                .unread_msg_num
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0),
        };
        let Some(answer) = call(sh, sh.client.set_unread_msg_num(&req)).await else {
            return Ok(());
        };
        let update = match answer {
            Ok(_) => MemberUpdate::UnreadSet { id: m.id },
            Err(e) => match next_after(sh, &e, 1) {
                Next::Later(d) => return later(sh, group, d, &e).await,
                Next::Stop => return Ok(()),
                Next::Refused => MemberUpdate::UnreadFailed {
                    id: m.id,
                    reason: format!("set_unread_msg_num refused ({e})"),
                },
            },
        };
        sh.store.record_members(&[update]).await?;
    }
    Ok(())
}

/// Sends one request once the outage gate lets it go, and reports its result to the gate;
/// `None` when the engine stops first.
async fn call<T>(
    sh: &Shared,
    request: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Option<Result<T, ApiError>> {
    if !sh.admitted().await {
        return None;
    }
    let r = request.await;
    sh.outage.observe(&r);
    Some(r)
}

/// Parks the group's steps for `d` after `e`.
async fn later(sh: &Shared, group: &str, d: Duration, e: &ApiError) -> Result<(), StoreError> {
    tracing::info!(group, error = %e, "group step not done; retrying later");
    sh.store
        .group_retry_at(group, unix_now_ms() + ms(d), &e.to_string())
        .await
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
