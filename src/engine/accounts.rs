//! Accounts first (`import.accounts = "auto"`): every sender, group owner and member the queue
//! names is imported as an account of the app (`multiaccount_import`) before any message, group or
//! membership that needs it is sent.
//!
//! The intake records each account once per database, in the transaction of the job that names
//! it ([`Store::pending_accounts`](crate::store::Store::pending_accounts)). One task ([`work`])
//! sends the pending ones, at most 100 per request, IDs alone in the old `Accounts` form (an
//! existing profile is kept) and accounts with profile data in the `AccountList` form, at
//! `import.account_requests_per_second` and through the app-wide pacer like every request. The
//! answer is recorded in one short transaction after the call; no transaction spans it.
//!
//! Two gates keep the order: while any account is pending ([`Gate::busy`]) no lane starts and no
//! group step runs; and a lane checks each batch it is about to send ([`Gate::check`]), so a
//! message queued while the lane ran waits for its sender, and a message whose sender failed
//! fails with [`ACCOUNT_FAILED_REASON`](crate::store::ACCOUNT_FAILED_REASON).
//!
//! Stopping and recovery: the task ends when `stop` fires. An account import is idempotent on the
//! server, so an unknown outcome (timeout, 502, a SIGKILL mid-request) leaves the accounts pending
//! and they are simply sent again; nothing that needs an account is sent before it is recorded as
//! imported.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{EngineError, Shared, lane};
use crate::store::{AccountState, PendingAccount, QueuedMessage, StoreError};
use crate::tencent::{AccountItem, ErrorClass, MultiaccountImportRequest};

/// Accounts per multiaccount_import request (Tencent's maximum).
pub const ACCOUNTS_PER_REQUEST: usize = 100;

/// Whether senders are known to be accounts.
pub struct Gate {
    enabled: bool,
    /// Accounts are pending (set by [`work`]; true until its first look).
    busy: AtomicBool,
    /// Accounts recorded as imported: once on the server an account stays there, so the lanes
    /// need not read them again.
    imported: Mutex<HashSet<String>>,
}

/// What a message's sender allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The account is not imported yet.
    Wait,
    /// The account could not be imported (the reason).
    Failed(String),
}

impl Gate {
    pub fn new(enabled: bool) -> Self {
        Gate {
            enabled,
            busy: AtomicBool::new(enabled),
            imported: Mutex::new(HashSet::new()),
        }
    }

    /// Accounts wait to be imported: lanes and group steps hold back.
    pub fn busy(&self) -> bool {
        self.enabled && self.busy.load(Ordering::Relaxed)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.imported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The readiness of each message of `batch`, in order (all ready when accounts are off).
    pub async fn check(
        &self,
        sh: &Shared,
        batch: &[QueuedMessage],
    ) -> Result<Vec<Readiness>, StoreError> {
        let ids: Vec<&str> = batch.iter().map(|m| m.from_account.as_str()).collect();
        self.check_ids(sh, &ids).await
    }

    /// The readiness of each account of `ids`, in order (all ready when accounts are off): for
    /// senders ([`Gate::check`]) and for members queued after their account already failed.
    pub async fn check_ids(&self, sh: &Shared, ids: &[&str]) -> Result<Vec<Readiness>, StoreError> {
        if !self.enabled {
            return Ok(vec![Readiness::Ready; ids.len()]);
        }
        let unknown: Vec<&str> = {
            let cache = self.cache();
            let mut v: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|a| !cache.contains(*a))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let states = if unknown.is_empty() {
            Default::default()
        } else {
            sh.store.account_states(&unknown).await?
        };
        let mut cache = self.cache();
        for (id, st) in &states {
            if *st == AccountState::Imported {
                cache.insert(id.clone());
            }
        }
        Ok(ids
            .iter()
            .map(|id| {
                if cache.contains(*id) {
                    return Readiness::Ready;
                }
                match states.get(*id) {
                    Some(AccountState::Failed(reason)) => Readiness::Failed(reason.clone()),
                    // Not recorded at all: a message queued while accounts were off. It is
                    // taken to exist, as it was when queued.
                    None => Readiness::Ready,
                    Some(_) => Readiness::Wait,
                }
            })
            .collect())
    }
}

/// Imports pending accounts until `stop` fires (returns at once when accounts are off).
pub async fn work(sh: Arc<Shared>) {
    if !sh.cfg.accounts {
        return;
    }
    let sh = &*sh;
    let interval = Duration::from_secs_f64(1.0 / f64::from(sh.cfg.account_rps.max(1)));
    let mut state = Sender {
        last_start: None,
        interval,
        failures: 0,
        limited: 0,
        one_at_a_time: false,
        last_gauges: None,
    };
    loop {
        if sh.stop.is_cancelled() {
            return;
        }
        let pause = match state.pass(sh).await {
            Ok(Some(pause)) => pause,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "account step failed on the store; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = sh.stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

struct Sender {
    last_start: Option<Instant>,
    interval: Duration,
    /// Transient failures in a row (for the backoff).
    failures: i64,
    /// Rate-limited answers in a row.
    limited: i64,
    /// A whole request was refused: send accounts one by one to find the bad one.
    one_at_a_time: bool,
    last_gauges: Option<Instant>,
}

impl Sender {
    /// One request (or none); `Some(pause)` to wait before the next pass, `None` to go on.
    async fn pass(&mut self, sh: &Shared) -> Result<Option<Duration>, StoreError> {
        self.export_gauges(sh).await;
        let limit = if self.one_at_a_time {
            1
        } else {
            ACCOUNTS_PER_REQUEST as i64
        };
        let mut batch = Vec::new();
        let mut profile = false;
        for p in [false, true] {
            batch = sh.store.pending_accounts(p, limit).await?;
            if !batch.is_empty() {
                profile = p;
                break;
            }
        }
        if batch.is_empty() {
            sh.accounts.busy.store(false, Ordering::Relaxed);
            self.one_at_a_time = false;
            return Ok(Some(Duration::from_millis(200)));
        }
        sh.accounts.busy.store(true, Ordering::Relaxed);
        // Paced at import.account_requests_per_second, on top of the app-wide pacer.
        if let Some(last) = self.last_start {
            let next = last + self.interval;
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = sh.stop.cancelled() => return Ok(None),
            }
        }
        if !sh.admitted().await {
            return Ok(None);
        }
        self.last_start = Some(Instant::now());
        self.send(sh, &batch, profile).await
    }

    async fn send(
        &mut self,
        sh: &Shared,
        batch: &[PendingAccount],
        profile: bool,
    ) -> Result<Option<Duration>, StoreError> {
        let req = if profile {
            MultiaccountImportRequest::Profiles {
                account_list: batch
                    .iter()
                    .map(|a| AccountItem {
                        user_id: a.user_id.clone(),
                        nick: a.nick.clone(),
                        face_url: a.face_url.clone(),
                    })
                    .collect(),
            }
        } else {
            MultiaccountImportRequest::Ids {
                accounts: batch.iter().map(|a| a.user_id.clone()).collect(),
            }
        };
        let answer = sh.client.multiaccount_import(&req).await;
        sh.outage.observe(&answer);
        match answer {
            Ok(resp) => {
                self.failures = 0;
                self.limited = 0;
                let failed_ids: HashSet<&str> =
                    resp.fail_accounts.iter().map(String::as_str).collect();
                let imported: Vec<&str> = batch
                    .iter()
                    .map(|a| a.user_id.as_str())
                    .filter(|id| !failed_ids.contains(id))
                    .collect();
                let failed: Vec<(&str, String)> = batch
                    .iter()
                    .map(|a| a.user_id.as_str())
                    .filter(|id| failed_ids.contains(id))
                    .map(|id| {
                        (
                            id,
                            "Tencent listed it in FailAccounts of multiaccount_import (a UserID is at most 32 bytes, not empty)".to_string(),
                        )
                    })
                    .collect();
                for (id, reason) in &failed {
                    tracing::warn!(account = %id, reason = %reason, "account could not be imported; the messages and memberships that need it fail");
                }
                sh.store.record_accounts(&imported, &failed).await?;
                count(imported.len(), failed.len());
                tracing::info!(
                    imported = imported.len(),
                    failed = failed.len(),
                    profile,
                    "accounts imported"
                );
                // One by one (after a refused request) until no account is pending.
                Ok(None)
            }
            Err(e) => match e.class() {
                ErrorClass::RateLimited => {
                    // The client already slowed the app-wide pacer; multiaccount_import has a
                    // quota of its own too, so wait longer each time in a row (200 ms to 6.4 s).
                    self.limited += 1;
                    let exp = u32::try_from(self.limited.clamp(1, 6) - 1).unwrap_or(0);
                    Ok(Some(Duration::from_millis(200 * 2u64.pow(exp))))
                }
                ErrorClass::Retryable | ErrorClass::Unknown => {
                    // Idempotent on the server: the same accounts are simply sent again.
                    self.failures += 1;
                    let delay = sh.backoff(self.failures);
                    tracing::info!(error = %e, accounts = batch.len(), "account request not answered; sending it again after a backoff");
                    Ok(Some(delay))
                }
                ErrorClass::Auth => {
                    let code = e.code().unwrap_or_default();
                    sh.set_fatal(EngineError::Auth {
                        code,
                        info: e.info(),
                        hint: lane::app_level(code).unwrap_or("tencent.secret_key"),
                    });
                    Ok(None)
                }
                ErrorClass::Permanent | ErrorClass::PerMessage => {
                    let code = e.code().unwrap_or_default();
                    if let Some(hint) = lane::app_level(code) {
                        sh.set_fatal(EngineError::Auth {
                            code,
                            info: e.info(),
                            hint,
                        });
                        return Ok(None);
                    }
                    if batch.len() > 1 {
                        tracing::info!(error = %e, accounts = batch.len(), "account request refused as a whole; sending the accounts one by one");
                        self.one_at_a_time = true;
                        return Ok(None);
                    }
                    let reason = format!("multiaccount_import refused it ({code}: {})", e.info());
                    tracing::warn!(account = %batch[0].user_id, reason = %reason, "account could not be imported; the messages and memberships that need it fail");
                    let failed = [(batch[0].user_id.as_str(), reason)];
                    sh.store.record_accounts(&[], &failed).await?;
                    count(0, 1);
                    Ok(None)
                }
            },
        }
    }

    async fn export_gauges(&mut self, sh: &Shared) {
        if self
            .last_gauges
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_gauges = Some(Instant::now());
        if let Ok(t) = sh.store.account_totals().await {
            export(&t);
        }
    }
}

/// The account gauges on /metrics.
pub fn export(t: &crate::store::AccountTotals) {
    metrics::gauge!("timport_accounts", "state" => "imported").set(t.imported as f64);
    metrics::gauge!("timport_accounts", "state" => "pending").set(t.pending as f64);
    metrics::gauge!("timport_accounts", "state" => "failed").set(t.failed as f64);
}

fn count(imported: usize, failed: usize) {
    if imported > 0 {
        metrics::counter!("timport_accounts_imported_total").increment(imported as u64);
    }
    if failed > 0 {
        metrics::counter!("timport_accounts_failed_total").increment(failed as u64);
    }
}
