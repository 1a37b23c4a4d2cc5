//! The status report behind `timport status`: totals, rate and ETA, blocked lanes, the most common
//! failure reasons, groups and jobs. Read-only against the store (it works while the daemon
//! runs); rate and ETA come from the progress snapshot the engine writes every few seconds.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::engine::outage::Waiting;
use crate::engine::{PROGRESS_KEY, Progress, eta_seconds};
use crate::store::{
    FailureReason, JobStatus, LaneStatus, MemberTotals, Store, StoreError, Totals, VerifyCounts,
    unix_now,
};

/// A snapshot older than this means no daemon is importing.
const STALE_SECS: i64 = 15;

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub database: String,
    pub totals: Totals,
    /// Members of whole-group jobs (imported after their group's history).
    pub members: MemberTotals,
    /// Messages imported per second, recent average (0 when no daemon runs).
    pub rate: f64,
    pub eta_seconds: Option<u64>,
    pub daemon_running: bool,
    /// Why the engine stopped on its own, if it did.
    pub stopped_reason: Option<String>,
    /// While the daemon waits out an outage of Tencent: since when (Unix seconds) and why.
    pub waiting_for_tencent: Option<Waiting>,
    pub blocked_lanes: Vec<LaneStatus>,
    pub failure_reasons: Vec<FailureReason>,
    pub groups: Vec<LaneStatus>,
    pub jobs: Vec<JobStatus>,
    /// What `timport verify` recorded, per lane (empty when never verified).
    pub verification: Vec<VerifyCounts>,
}

/// Builds the report; `group` narrows totals, lanes and failures to one group.
pub async fn report(store: &Store, group: Option<&str>) -> Result<StatusReport, StoreError> {
    let totals = store.totals(group).await?;
    let progress: Option<Progress> = store
        .meta(PROGRESS_KEY)
        .await?
        .and_then(|t| serde_json::from_str(&t).ok());
    let fresh = progress
        .as_ref()
        .is_some_and(|p| unix_now() - p.at <= STALE_SECS && p.stopped_reason.is_none());
    let rate = if fresh {
        progress.as_ref().map(|p| p.rate).unwrap_or(0.0)
    } else {
        0.0
    };
    let waiting = progress
        .as_ref()
        .filter(|_| fresh)
        .and_then(|p| p.waiting_for_tencent.clone());
    Ok(StatusReport {
        database: store.path().display().to_string(),
        totals,
        members: store.member_totals(group).await?,
        rate,
        eta_seconds: if fresh && waiting.is_none() {
            eta_seconds(&totals, rate)
        } else {
            None
        },
        daemon_running: fresh,
        stopped_reason: progress.and_then(|p| p.stopped_reason),
        waiting_for_tencent: waiting,
        blocked_lanes: store.blocked_lanes(50).await?,
        failure_reasons: store.failure_reasons(group, 5).await?,
        groups: store
            .lanes(group, if group.is_some() { 1000 } else { 20 })
            .await?,
        jobs: if group.is_some() {
            Vec::new()
        } else {
            store.jobs(20).await?
        },
        verification: store.verify_counts(group, None).await?,
    })
}

/// The report as a table for people.
pub fn render(r: &StatusReport) -> String {
    let t = &r.totals;
    let mut s = String::new();
    let _ = writeln!(s, "database   {}", r.database);
    let _ = writeln!(
        s,
        "messages   {} total: {} imported, {} pending, {} in flight, {} failed, {} blocked",
        t.total, t.imported, t.pending, t.in_flight, t.failed, t.blocked
    );
    let eta = match r.eta_seconds {
        Some(secs) => humantime::format_duration(Duration::from_secs(secs)).to_string(),
        None => "unknown".into(),
    };
    if t.pending + t.in_flight == 0 {
        let _ = writeln!(s, "rate       nothing left to import");
    } else if r.daemon_running {
        let _ = writeln!(s, "rate       {:.1} messages/s, ETA {eta}", r.rate);
    } else {
        let _ = writeln!(s, "rate       no daemon importing right now");
    }
    if let Some(reason) = &r.stopped_reason {
        let _ = writeln!(s, "STOPPED    {reason}");
    }
    if let Some(w) = &r.waiting_for_tencent {
        let _ = writeln!(
            s,
            "WAITING    for Tencent since {} ({} ago): {}; no message is failed for it",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(w.since).unwrap_or(0))
            ),
            humantime::format_duration(Duration::from_secs(
                u64::try_from(unix_now() - w.since).unwrap_or(0)
            )),
            w.reason
        );
    }
    let _ = writeln!(s, "lanes      {} ({} blocked)", t.lanes, t.lanes_blocked);
    let m = &r.members;
    if m.pending + m.imported + m.failed + m.unread_pending > 0 {
        let _ = writeln!(
            s,
            "members    {} imported, {} pending, {} unread counts to set, {} failed",
            m.imported, m.pending, m.unread_pending, m.failed
        );
    }
    if !r.blocked_lanes.is_empty() {
        let _ = writeln!(
            s,
            "\nblocked lanes (fix the cause, then `timport retry --group G`):"
        );
        for l in &r.blocked_lanes {
            let _ = writeln!(
                s,
                "  {}{}  {} messages  {}",
                l.group_id,
                topic(&l.topic_id),
                l.pending + l.in_flight,
                l.blocked_reason.as_deref().unwrap_or("")
            );
        }
    }
    if !r.failure_reasons.is_empty() {
        let _ = writeln!(s, "\nmost common failure reasons:");
        for f in &r.failure_reasons {
            let code = f.code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(s, "  {:>7} x{:<6} {}", code, f.messages, f.reason);
        }
    }
    if !r.groups.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<32} {:>9} {:>9} {:>9} {:>7}  {:<8} step",
            "group", "imported", "pending", "in flight", "failed", "state"
        );
        for l in &r.groups {
            let _ = writeln!(
                s,
                "{:<32} {:>9} {:>9} {:>9} {:>7}  {:<8} {}",
                format!("{}{}", l.group_id, topic(&l.topic_id)),
                l.imported,
                l.pending,
                l.in_flight,
                l.failed,
                l.state,
                l.step
            );
        }
    }
    if !r.jobs.is_empty() {
        let _ = writeln!(
            s,
            "\n{:>5} {:<32} {:>9} {:>9} {:>9} {:>7}",
            "job", "source", "messages", "imported", "pending", "failed"
        );
        for j in &r.jobs {
            let _ = writeln!(
                s,
                "{:>5} {:<32} {:>9} {:>9} {:>9} {:>7}",
                j.id,
                j.source,
                j.messages,
                j.imported,
                j.pending + j.in_flight,
                j.failed
            );
        }
    }
    s.push_str(&render_verification(&r.verification));
    s
}

/// The verify section of the table: counts per group as `timport verify` last recorded them.
fn render_verification(v: &[VerifyCounts]) -> String {
    let mut s = String::new();
    if v.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n{:<32} {:>9} {:>8} {:>8} {:>10} {:>12} {:>8}  (timport verify)",
        "verified group", "verified", "missing", "altered", "duplicated", "unverifiable", "foreign"
    );
    for g in v.iter().take(50) {
        let _ = writeln!(
            s,
            "{:<32} {:>9} {:>8} {:>8} {:>10} {:>12} {:>8}{}",
            format!("{}{}", g.group, topic(&g.topic)),
            g.verified,
            g.missing,
            g.altered,
            g.duplicated,
            g.unverifiable,
            g.foreign,
            if g.done {
                ""
            } else {
                "  (verify not finished)"
            }
        );
    }
    if v.len() > 50 {
        let _ = writeln!(
            s,
            "… and {} more groups (timport verify --json)",
            v.len() - 50
        );
    }
    s
}

fn topic(t: &str) -> String {
    if t.is_empty() {
        String::new()
    } else {
        format!("/{t}")
    }
}
