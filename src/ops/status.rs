//! The status report behind `timport status`: totals, rate and ETA, blocked lanes, the most common
//! failure reasons, groups and jobs. Read-only against the store (it works while the daemon
//! runs); rate and ETA come from the progress snapshot the engine writes every few seconds.
//!
//! No ETA is given while the import is stalled ([`StatusReport::stalled`]): waiting for Tencent,
//! every remaining message in a blocked lane, or no lane at work and no recent progress. Failure
//! reasons are grouped by code and kind (numbers masked), with one example each. Texts that come
//! from job files or the server are printed with control characters escaped.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::engine::outage::Waiting;
use crate::engine::{PROGRESS_KEY, Progress, eta_seconds};
use crate::store::{
    AccountTotals, FailureReason, JobStatus, LaneStatus, MemberTotals, Store, StoreError, Totals,
    VerifyCounts, unix_now,
};
use crate::verify::report;

/// A snapshot older than this means no daemon is importing.
const STALE_SECS: i64 = 15;

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub database: String,
    pub totals: Totals,
    /// Members of whole-group jobs (imported after their group's history).
    pub members: MemberTotals,
    /// Accounts (import.accounts = "auto"): imported, pending, failed.
    pub accounts: AccountTotals,
    /// `import.accounts = "off"`: the accounts are not imported by timport (set by the caller,
    /// which knows the settings).
    #[serde(skip)]
    pub accounts_off: bool,
    /// Messages imported per second, recent average (0 when no daemon runs).
    pub rate: f64,
    pub eta_seconds: Option<u64>,
    pub daemon_running: bool,
    /// Why the import makes no progress although messages remain, if it does not.
    pub stalled: Option<String>,
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
    /// This node and, with high availability, the active one (set by the caller, which knows
    /// the node's name; see [`node_report`]).
    pub node: NodeStatus,
    /// High availability: every node of the group, as each last reported itself.
    pub nodes: Vec<NodeSeen>,
}

/// The node `timport status` runs for.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// `single` (no high availability), `active`, `standby`, or `down` (a node of the group that
    /// has not reported itself for longer than a lease).
    pub role: String,
    /// This node's lease token, while it is the active node.
    pub token: Option<i64>,
    /// The active node of the group (`None`: none holds a live lease, or no high availability).
    pub active: Option<ActiveNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActiveNode {
    pub name: String,
    pub token: i64,
    /// RFC 3339, the database's clock.
    pub lease_expires_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeSeen {
    pub name: String,
    pub role: String,
    /// RFC 3339, the database's clock.
    pub seen_at: String,
}

fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
    .to_string()
}

/// The node part of the report. `ha`: this node's name and `ha.lease_ttl`, when high
/// availability is on; otherwise the node is `single`, named `name`.
pub async fn node_report(
    store: &Store,
    name: &str,
    ha: Option<Duration>,
) -> Result<(NodeStatus, Vec<NodeSeen>), StoreError> {
    let Some(ttl) = ha else {
        return Ok((
            NodeStatus {
                name: name.to_owned(),
                role: "single".into(),
                token: None,
                active: None,
            },
            Vec::new(),
        ));
    };
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let Some(view) = store.ha_view().await? else {
        return Ok((
            NodeStatus {
                name: name.to_owned(),
                role: "down".into(),
                token: None,
                active: None,
            },
            Vec::new(),
        ));
    };
    let now = view.lease.now_ms;
    let live = view.lease.token > 0 && view.lease.expires_at_ms > now;
    let active = live.then(|| ActiveNode {
        name: view.lease.node.clone(),
        token: view.lease.token,
        lease_expires_at: rfc3339_ms(view.lease.expires_at_ms),
    });
    let role_of = |n: &crate::store::HaNodeRow| -> String {
        if live && n.node == view.lease.node && n.instance == view.lease.instance {
            "active".into()
        } else if now - n.seen_at_ms <= ttl_ms {
            "standby".into()
        } else {
            "down".into()
        }
    };
    let nodes: Vec<NodeSeen> = view
        .nodes
        .iter()
        .map(|n| NodeSeen {
            name: n.node.clone(),
            role: role_of(n),
            seen_at: rfc3339_ms(n.seen_at_ms),
        })
        .collect();
    let me = view.nodes.iter().find(|n| n.node == name);
    let role = me.map(role_of).unwrap_or_else(|| "down".into());
    Ok((
        NodeStatus {
            name: name.to_owned(),
            token: (role == "active").then_some(view.lease.token),
            role,
            active,
        },
        nodes,
    ))
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
    let stalled = stall_reason(
        &totals,
        fresh,
        waiting.as_ref(),
        progress.as_ref().map(|p| p.active_lanes),
        rate,
    );
    let accounts = store.account_totals().await?;
    let stalled = accounts_first(stalled, &accounts, active_lanes(progress.as_ref()));
    Ok(StatusReport {
        database: store.database(),
        totals,
        members: store.member_totals(group).await?,
        accounts,
        accounts_off: false,
        rate,
        eta_seconds: if fresh && stalled.is_none() {
            eta_seconds(&totals, rate)
        } else {
            None
        },
        daemon_running: fresh,
        stalled,
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
        node: NodeStatus::default(),
        nodes: Vec::new(),
    })
}

/// Why a running import makes no progress, if it makes none: `None` while it moves (or when there
/// is nothing left, or no daemon to judge).
pub fn stall_reason(
    t: &Totals,
    daemon_running: bool,
    waiting: Option<&Waiting>,
    active_lanes: Option<usize>,
    rate: f64,
) -> Option<String> {
    let importable = t.pending + t.in_flight;
    if importable == 0 && t.blocked > 0 {
        return Some(format!(
            "every remaining message ({}) is in a blocked lane; fix the cause, then `timport retry`",
            t.blocked
        ));
    }
    if !daemon_running || importable == 0 {
        return None;
    }
    if let Some(w) = waiting {
        return Some(format!("waiting for Tencent: {}", w.reason));
    }
    if active_lanes == Some(0) && rate < 0.01 {
        return Some(
            "no lane is at work and nothing was imported recently (lanes backing off)".into(),
        );
    }
    None
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
    if t.pending + t.in_flight == 0 && t.blocked == 0 {
        let _ = writeln!(s, "rate       nothing left to import");
    } else if let Some(why) = &r.stalled {
        let _ = writeln!(s, "rate       stalled, no ETA: {}", esc(why));
    } else if r.daemon_running {
        let _ = writeln!(s, "rate       {:.1} messages/s, ETA {eta}", r.rate);
    } else {
        let _ = writeln!(s, "rate       no daemon importing right now");
    }
    if let Some(reason) = &r.stopped_reason {
        let _ = writeln!(s, "STOPPED    {}", esc(reason));
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
            esc(&w.reason)
        );
    }
    if r.node.role != "single" && !r.node.role.is_empty() {
        let active = match &r.node.active {
            Some(a) => format!(
                "active node {} (token {}, lease until {})",
                esc(&a.name),
                a.token,
                a.lease_expires_at
            ),
            None => "no active node (no live lease)".into(),
        };
        let others: Vec<String> = r
            .nodes
            .iter()
            .filter(|n| n.name != r.node.name)
            .map(|n| format!("{} {}", esc(&n.name), n.role))
            .collect();
        let _ = writeln!(
            s,
            "node       {}: {}; {active}{}",
            esc(&r.node.name),
            r.node.role,
            if others.is_empty() {
                String::new()
            } else {
                format!("; others: {}", others.join(", "))
            }
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
    render_accounts(&mut s, &r.accounts, r.accounts_off);
    if !r.blocked_lanes.is_empty() {
        let _ = writeln!(
            s,
            "\nblocked lanes (fix the cause, then `timport retry --group G`):"
        );
        for l in &r.blocked_lanes {
            let _ = writeln!(
                s,
                "  {}{}  {} messages  {}",
                esc(&l.group_id),
                esc(&topic(&l.topic_id)),
                l.pending + l.in_flight,
                esc(l.blocked_reason.as_deref().unwrap_or(""))
            );
        }
    }
    if !r.failure_reasons.is_empty() {
        let _ = writeln!(s, "\nmost common failure reasons (by code and kind):");
        for f in &r.failure_reasons {
            let code = f.code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(s, "  {:>7} x{:<6} {}", code, f.messages, esc(&f.reason));
            if f.example != f.reason {
                let _ = writeln!(s, "  {:>7}  e.g.   {}", "", esc(&f.example));
            }
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
                esc(&format!("{}{}", l.group_id, topic(&l.topic_id))),
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
                esc(&j.source),
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
        "\n{}  (timport verify)",
        report::counts_header("verified group")
    );
    for g in v.iter().take(50) {
        let _ = writeln!(s, "{}", report::counts_row(g, "  (verify not finished)"));
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

fn active_lanes(p: Option<&Progress>) -> Option<usize> {
    p.map(|p| p.active_lanes)
}

/// No lane at work while accounts are pending is the accounts stage, not a stall: say so.
fn accounts_first(
    stalled: Option<String>,
    a: &AccountTotals,
    active_lanes: Option<usize>,
) -> Option<String> {
    match stalled {
        // Only the "no lane at work" reading: a blocked queue or an outage stays what it is.
        Some(why) if a.pending > 0 && active_lanes == Some(0) && why.starts_with("no lane") => {
            Some(format!(
                "importing accounts first ({} pending); the messages that need them follow",
                a.pending
            ))
        }
        other => other,
    }
}

/// The accounts line (only when the database knows accounts).
fn render_accounts(s: &mut String, a: &AccountTotals, off: bool) {
    if off {
        let _ = writeln!(
            s,
            "accounts   not imported by timport (import.accounts = \"off\"): {} named by the queue are taken to exist",
            a.imported + a.pending + a.failed
        );
    } else if a.imported + a.pending + a.failed > 0 {
        let _ = writeln!(
            s,
            "accounts   {} imported, {} pending, {} failed{}",
            a.imported,
            a.pending,
            a.failed,
            if a.failed > 0 {
                " (fix them, then `timport retry --accounts`)"
            } else {
                ""
            }
        );
    }
}

fn esc(text: &str) -> std::borrow::Cow<'_, str> {
    crate::telemetry::escape_control(text)
}

fn topic(t: &str) -> String {
    if t.is_empty() {
        String::new()
    } else {
        format!("/{t}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(pending: i64, blocked: i64) -> Totals {
        Totals {
            pending,
            in_flight: 0,
            imported: 10,
            failed: 0,
            blocked,
            total: 10 + pending + blocked,
            lanes: 2,
            lanes_blocked: i64::from(blocked > 0),
        }
    }

    #[test]
    fn the_accounts_stage_is_not_called_a_stall() {
        let pending = AccountTotals {
            imported: 0,
            pending: 5,
            failed: 0,
        };
        let idle = stall_reason(&totals(100, 0), true, None, Some(0), 0.0);
        let why = accounts_first(idle, &pending, Some(0)).unwrap();
        assert!(
            why.contains("importing accounts first (5 pending)"),
            "{why}"
        );
        // A blocked queue stays blocked, accounts or not.
        let blocked = stall_reason(&totals(0, 40), true, None, Some(0), 0.0);
        let why = accounts_first(blocked, &pending, Some(0)).unwrap();
        assert!(why.contains("blocked"), "{why}");
        let none = accounts_first(None, &pending, Some(0));
        assert_eq!(none, None);
    }

    #[test]
    fn stalled_imports_have_no_eta() {
        // Moving: no stall.
        assert_eq!(
            stall_reason(&totals(100, 0), true, None, Some(3), 50.0),
            None
        );
        // Everything left is blocked.
        let why = stall_reason(&totals(0, 40), true, None, Some(0), 0.0).unwrap();
        assert!(why.contains("blocked"), "{why}");
        // Waiting for Tencent.
        let w = Waiting {
            since: 1,
            reason: "connection refused".into(),
        };
        let why = stall_reason(&totals(100, 0), true, Some(&w), Some(3), 20.0).unwrap();
        assert!(why.contains("connection refused"), "{why}");
        // No lane at work, no rate.
        assert!(stall_reason(&totals(100, 0), true, None, Some(0), 0.0).is_some());
        // Nothing left.
        assert_eq!(stall_reason(&totals(0, 0), true, None, Some(0), 0.0), None);
    }
}
