//! High availability: several `timport run` nodes on one PostgreSQL queue, exactly one of them
//! sending (`[ha]`, docs/OPERATIONS.md "High availability").
//!
//! Role: a node is a standby until it is granted the queue's lease ([`Node::acquire`], tried
//! every `ha.renew_every`, granted once the lease has expired on the database's clock), then
//! active while it holds it ([`Node::hold`], renewing every `ha.renew_every`). Each grant carries
//! a fencing token one above the last; the store proves it at the start of every write
//! transaction of the active node, so a node that lost its lease can write nothing more.
//!
//! Never two senders: the active node reckons its lease on its own monotonic clock, from the
//! moment it *sent* the renewal that the database granted, minus `ha.margin`; the [`Gate`] lets
//! a request to Tencent start only if it would end (its timeout) before that deadline. Past the
//! deadline, or told by a renewal that another node holds the lease, the node stops its engine
//! and is a standby again. The database's lease outlives every deadline the node reckons, so by
//! the time a standby can be granted the lease, the old node has sent its last request.
//!
//! Stopping: [`Node::acquire`] returns `None` when shutdown fires; [`Node::hold`] keeps renewing
//! until the engine has finished (its in-flight requests included) and then releases the lease,
//! so a standby takes over at its next look instead of after the lease's expiry. Recovery: a
//! renewal that fails (the database unreachable) is retried at the next beat; the deadline
//! decides.

mod gate;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use gate::Gate;

use crate::settings::HaSettings;
use crate::store::{HaFence, HaNodeId, Store, StoreError};

/// The lease's timing, from `[ha]` and `tencent.request_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_ttl: Duration,
    pub renew_every: Duration,
    pub margin: Duration,
    /// How long a request to Tencent may last (`tencent.request_timeout`).
    pub request_timeout: Duration,
}

impl Timing {
    pub fn new(ha: &HaSettings, request_timeout: Duration) -> Self {
        Timing {
            lease_ttl: ha.lease_ttl,
            renew_every: ha.renew_every,
            margin: ha.margin,
            request_timeout,
        }
    }

    /// How long a write transaction of the active node may sit idle before the server ends it:
    /// `ha.renew_every`, at least a second (so a busy machine does not lose healthy
    /// transactions), but never beyond the node's own deadline (`lease_ttl - margin`). So a node
    /// frozen or cut off inside a transaction has lost it by the time its lease expires, and a
    /// takeover does not wait for it.
    fn idle_bound(&self) -> Duration {
        let deadline = self.lease_ttl.saturating_sub(self.margin);
        self.renew_every
            .max(Duration::from_secs(1))
            .min(deadline)
            // Never 0: to PostgreSQL that switches the bound off.
            .max(Duration::from_millis(1))
    }

    /// The node's own deadline for a lease granted by a statement sent at `sent`.
    fn deadline(&self, sent: Instant) -> Instant {
        sent + self.lease_ttl.saturating_sub(self.margin)
    }
}

/// A term as the active node: the token it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    pub token: i64,
}

/// How a term ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermEnd {
    /// Given up on a clean stop.
    Released,
    /// Lost: another node holds the lease now, or this node could not renew it in time.
    Lost(String),
}

/// The role a node has now, for `/readyz`, `status` and the gauge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not in a high-availability group (`ha.enabled = false`): the one node.
    Single,
    Standby,
    Active {
        token: i64,
    },
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Standby => "standby",
            Role::Active { .. } => "active",
        }
    }
}

/// One node of a high-availability group.
pub struct Node {
    store: Store,
    me: HaNodeId,
    timing: Timing,
    gate: Gate,
    role: tokio::sync::watch::Sender<Role>,
}

impl Node {
    /// A node named `name` (this process gets an instance id of its own, so a restart under the
    /// same name is a new holder). Starts as a standby with the gate closed.
    pub fn new(store: Store, name: String, timing: Timing) -> Self {
        let instance = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        let (role, _) = tokio::sync::watch::channel(Role::Standby);
        set_role_gauge(&Role::Standby);
        Node {
            store,
            me: HaNodeId {
                node: name,
                instance,
            },
            timing,
            gate: Gate::new(timing.request_timeout),
            role,
        }
    }

    pub fn name(&self) -> &str {
        &self.me.node
    }

    /// The gate the Tencent client asks before every request.
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// This node's role, as it changes.
    pub fn roles(&self) -> tokio::sync::watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Waits as a standby until this node is granted the lease (`Some`), or `shutdown` fires
    /// (`None`). On a grant, the store's fence and the gate's deadline are set before it returns.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<Term> {
        let mut failing: Option<String> = None;
        let mut holder: Option<String> = None;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let sent = Instant::now();
            match self.store.ha_acquire(&self.me, self.timing.lease_ttl).await {
                Ok(Some(grant)) => {
                    self.store.set_fence(Some(HaFence {
                        token: grant.token,
                        instance: self.me.instance.clone(),
                        idle_bound: self.timing.idle_bound(),
                    }));
                    self.gate.open_until(self.timing.deadline(sent));
                    let from = match holder.as_deref() {
                        Some(h) if !h.is_empty() => format!("from {h} "),
                        _ => String::new(),
                    };
                    tracing::warn!(
                        node = %self.me.node,
                        token = grant.token,
                        previous = holder.as_deref().unwrap_or(""),
                        "high availability: this node is now the active node (took the lease {from}with token {}); it reconciles the lanes in flight and sends",
                        grant.token
                    );
                    metrics::counter!("timport_ha_takeovers_total").increment(1);
                    let role = Role::Active { token: grant.token };
                    set_role_gauge(&role);
                    self.role.send_replace(role);
                    self.beat("active", Some(grant.token)).await;
                    return Some(Term { token: grant.token });
                }
                Ok(None) => {
                    failing = None;
                    if let Ok(Some(view)) = self.store.ha_view().await
                        && holder.as_deref() != Some(view.lease.node.as_str())
                    {
                        tracing::info!(node = %self.me.node, active = %view.lease.node, token = view.lease.token, "high availability: standby; {} is the active node", view.lease.node);
                        holder = Some(view.lease.node);
                    }
                    self.beat("standby", None).await;
                }
                Err(e) => note_failure(&mut failing, &e, "asking for the lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timing.renew_every) => {}
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    /// Holds `term` while the engine runs: renews every `ha.renew_every`, moving the gate's
    /// deadline. When the lease is lost (taken over, or not renewed before the deadline), closes
    /// the gate and fires `engine_stop`. Returns once `engine_done` has fired (the engine has
    /// finished, in-flight requests included), having released the lease if it still held it;
    /// the fence is cleared and the node is a standby again.
    pub async fn hold(
        &self,
        term: Term,
        engine_stop: CancellationToken,
        engine_done: CancellationToken,
    ) -> TermEnd {
        let mut deadline = self.gate.deadline().unwrap_or_else(Instant::now);
        let mut failing: Option<String> = None;
        let mut lost: Option<String> = None;
        let mut next = Instant::now() + self.timing.renew_every;
        while lost.is_none() {
            let wake = next.min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = engine_done.cancelled() => break,
            }
            if Instant::now() >= deadline {
                lost = Some(format!(
                    "the lease could not be renewed before this node's deadline ({}){}",
                    humantime::format_duration(self.timing.lease_ttl),
                    failing
                        .as_deref()
                        .map(|f| format!(": {f}"))
                        .unwrap_or_default()
                ));
                break;
            }
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + self.timing.renew_every;
            let sent = Instant::now();
            match self
                .store
                .ha_renew(&self.me, term.token, self.timing.lease_ttl)
                .await
            {
                Ok(Some(_)) => {
                    if failing.take().is_some() {
                        tracing::info!(node = %self.me.node, token = term.token, "high availability: the lease is renewed again");
                    }
                    deadline = self.timing.deadline(sent);
                    self.gate.open_until(deadline);
                    self.beat("active", Some(term.token)).await;
                }
                Ok(None) => {
                    let holder = match self.store.ha_view().await {
                        Ok(Some(v)) => {
                            format!("{} holds it with token {}", v.lease.node, v.lease.token)
                        }
                        _ => "another node holds it".into(),
                    };
                    lost = Some(format!("the lease was taken over: {holder}"));
                }
                Err(e) => note_failure(&mut failing, &e, "renewing the lease"),
            }
        }
        if let Some(why) = &lost {
            self.gate.close();
            engine_stop.cancel();
            tracing::warn!(node = %self.me.node, token = term.token, reason = %why, "high availability: this node is no longer the active node; it stops sending and stands by");
            let role = Role::Standby;
            set_role_gauge(&role);
            self.role.send_replace(role);
            // Requests in flight end within their timeout, before the lease could expire in
            // the database; their records are refused if another node took over.
            engine_done.cancelled().await;
        } else {
            // A clean stop: the engine has finished; give the lease up for the next node.
            self.gate.close();
            match self.store.ha_release(&self.me, term.token).await {
                Ok(true) => {
                    tracing::info!(node = %self.me.node, token = term.token, "high availability: lease released")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(node = %self.me.node, error = %e, "high availability: could not release the lease; a standby takes over when it expires")
                }
            }
            let role = Role::Standby;
            set_role_gauge(&role);
            self.role.send_replace(role);
        }
        self.store.set_fence(None);
        self.beat("standby", None).await;
        match lost {
            Some(why) => TermEnd::Lost(why),
            None => TermEnd::Released,
        }
    }

    async fn beat(&self, role: &str, token: Option<i64>) {
        if let Err(e) = self.store.ha_heartbeat(&self.me, role, token).await {
            tracing::debug!(node = %self.me.node, error = %e, "high availability: heartbeat not recorded");
        }
    }
}

/// Logs a failure of the lease's statements once per spell (debug while it lasts).
fn note_failure(failing: &mut Option<String>, e: &StoreError, what: &str) {
    let text = e.to_string();
    if failing.is_none() {
        tracing::warn!(error = %text, "high availability: {what} failed; retrying at the next beat");
    } else {
        tracing::debug!(error = %text, "high availability: {what} failed again");
    }
    *failing = Some(text);
}

/// `timport_ha_role{role}`: 1 for the node's role now, 0 for the others.
pub fn set_role_gauge(role: &Role) {
    for r in ["single", "standby", "active"] {
        metrics::gauge!("timport_ha_role", "role" => r).set(if role.as_str() == r {
            1.0
        } else {
            0.0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(lease_ms: u64, renew_ms: u64, margin_ms: u64) -> Timing {
        Timing {
            lease_ttl: Duration::from_millis(lease_ms),
            renew_every: Duration::from_millis(renew_ms),
            margin: Duration::from_millis(margin_ms),
            request_timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn the_idle_bound_is_renew_every_at_least_a_second_and_ends_before_the_lease() {
        // The defaults: 10 s lease, renewed every 2 s.
        assert_eq!(
            timing(10_000, 2_000, 1_000).idle_bound(),
            Duration::from_secs(2)
        );
        // Fast renewals still leave healthy transactions a second.
        assert_eq!(timing(3_000, 200, 500).idle_bound(), Duration::from_secs(1));
        // A lease shorter than that: the bound ends before the node's own deadline.
        assert_eq!(
            timing(900, 100, 200).idle_bound(),
            Duration::from_millis(700)
        );
    }
}
