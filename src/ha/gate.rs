//! The gate every request to Tencent passes: open while this node may send, until a deadline on
//! the monotonic clock (see [`super`]). Without high availability no gate is installed and
//! nothing waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Whether a request may start now. Cheap to clone; clones share the deadline.
#[derive(Debug, Clone)]
pub struct Gate {
    /// `None`: closed.
    deadline: Arc<watch::Sender<Option<Instant>>>,
    /// How long a request may take (`tencent.request_timeout`): one may start only if it ends
    /// before the deadline.
    request_timeout: Duration,
}

impl Gate {
    /// A closed gate for requests of at most `request_timeout`.
    pub fn new(request_timeout: Duration) -> Self {
        Gate {
            deadline: Arc::new(watch::channel(None).0),
            request_timeout,
        }
    }

    /// Lets requests start that end by `deadline`.
    pub fn open_until(&self, deadline: Instant) {
        self.deadline.send_replace(Some(deadline));
    }

    /// No request may start.
    pub fn close(&self) {
        self.deadline.send_replace(None);
    }

    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.borrow()
    }

    /// Whether a request starting at `now` would end (time out at the latest) before the
    /// deadline.
    pub fn allows_at(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| {
            now.checked_add(self.request_timeout)
                .is_some_and(|end| end <= d)
        })
    }

    /// Whether a request may start now.
    pub fn allows(&self) -> bool {
        self.allows_at(Instant::now())
    }

    /// Waits until a request may start (a renewal or a new term moves the deadline).
    pub async fn opened(&self) {
        let mut rx = self.deadline.subscribe();
        loop {
            if self.allows() {
                return;
            }
            if rx.changed().await.is_err() {
                // Cannot happen while `self` holds the sender; never busy-loop if it does.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_may_start_only_if_its_timeout_ends_before_the_deadline() {
        let g = Gate::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(!g.allows_at(t0), "a new gate is closed");
        g.open_until(t0 + Duration::from_secs(9));
        assert!(g.allows_at(t0));
        assert!(g.allows_at(t0 + Duration::from_secs(4)));
        assert!(!g.allows_at(t0 + Duration::from_millis(4001)));
        g.close();
        assert!(!g.allows_at(t0));
    }

    #[tokio::test]
    async fn opened_waits_for_a_renewal_that_moves_the_deadline() {
        let g = Gate::new(Duration::from_secs(5));
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.opened().await }
        });
        tokio::task::yield_now().await;
        // Moved, but not far enough for a whole request: still waiting.
        g.open_until(Instant::now() + Duration::from_secs(1));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        g.open_until(Instant::now() + Duration::from_secs(60));
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("opened after the renewal")
            .expect("task");
    }
}
