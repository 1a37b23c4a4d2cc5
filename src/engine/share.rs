//! Sharing the app's quota with a running `timport verify` on the same database.
//!
//! Role: verify writes a claim (`verify_claim`: its rate and a heartbeat it renews every second,
//! see `verify`). [`watch`] runs beside the engine: about once a second it reads the claim and,
//! while the heartbeat is fresher than [`CLAIM_FRESH`], lowers the daemon's pacer maximum by the
//! claimed rate ([`Pacer::set_reserved`]) and then acknowledges the claim's token, which verify
//! waits for before its first request. A stale or withdrawn claim gives the share back. Together
//! the two never start more than `import.requests_per_second` in any second: the daemon's pacer
//! holds every window ending after the change to the lowered ceiling, and verify starts a full
//! window after the acknowledgement (see docs/OPERATIONS.md).
//!
//! Stopping and recovery: [`watch`] ends when its token fires; [`apply`] is called once before
//! the first lane starts, so a daemon starting while a verify runs is lowered before it sends. A
//! failed read keeps the share as it was (the safe side while a claim is held); a daemon
//! restart reads the claim again.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pacing::Pacer;
use crate::store::{Store, unix_now_ms};

/// A claim whose heartbeat is older than this is over (its verify ended or was killed).
pub const CLAIM_FRESH: Duration = Duration::from_secs(3);
/// How often the claim is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the daemon currently gives up, and to which claim.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Share {
    pub token: Option<String>,
    pub reserved: f64,
}

/// Reads the claim once and applies it to `pacer`; acknowledges a claim not acknowledged yet.
pub async fn apply(store: &Store, pacer: &Pacer, share: &mut Share) {
    let claim = match store.verify_claim_read().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "verify claim not read; the share stays as it is");
            return;
        }
    };
    let now = unix_now_ms();
    let fresh = claim.filter(|c| {
        now.saturating_sub(c.heartbeat_ms) <= CLAIM_FRESH.as_millis() as i64 && c.rate > 0.0
    });
    match fresh {
        Some(c) => {
            let max = pacer.set_reserved(c.rate);
            if share.token.as_deref() != Some(c.token.as_str()) || share.reserved != c.rate {
                tracing::info!(
                    verify_rate = c.rate,
                    daemon_max = max,
                    "a verify shares the quota: the daemon's request rate is lowered"
                );
            }
            if c.ack_token.as_deref() != Some(c.token.as_str())
                && let Err(e) = store.verify_ack(&c.token, unix_now_ms(), max).await
            {
                tracing::debug!(error = %e, "verify claim not acknowledged yet");
                return;
            }
            share.token = Some(c.token);
            share.reserved = c.rate;
        }
        None if share.token.is_some() || share.reserved > 0.0 => {
            let max = pacer.set_reserved(0.0);
            tracing::info!(daemon_max = max, "the verify's share of the quota is back");
            *share = Share::default();
        }
        None => {}
    }
}

/// [`apply`] every [`CHECK_EVERY`] until `stop` fires.
pub async fn watch(store: Store, pacer: Arc<Pacer>, mut share: Share, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        apply(&store, &pacer, &mut share).await;
    }
}

/// Applies the claim now, then keeps watching it in a task (none without a pacer).
pub async fn start(
    store: &Store,
    pacer: Option<Arc<Pacer>>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let pacer = pacer?;
    let mut share = Share::default();
    apply(store, &pacer, &mut share).await;
    Some(tokio::spawn(watch(store.clone(), pacer, share, stop)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[tokio::test]
    async fn a_fresh_claim_lowers_the_pacer_and_is_acknowledged_a_stale_one_gives_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.db"), &StoreOptions::default())
            .await
            .unwrap();
        let pacer = Pacer::new(100);
        let mut share = Share::default();
        apply(&store, &pacer, &mut share).await;
        assert_eq!((pacer.max_rate(), share.token.is_none()), (100.0, true));
        store.verify_claim("t1", 40.0, unix_now_ms()).await.unwrap();
        apply(&store, &pacer, &mut share).await;
        assert_eq!(pacer.max_rate(), 60.0);
        let c = store.verify_claim_read().await.unwrap().unwrap();
        assert_eq!(c.ack_token.as_deref(), Some("t1"), "acknowledged");
        // A heartbeat older than CLAIM_FRESH: the share is back.
        let old = unix_now_ms() - CLAIM_FRESH.as_millis() as i64 - 1000;
        assert!(store.verify_heartbeat("t1", old).await.unwrap());
        apply(&store, &pacer, &mut share).await;
        assert_eq!((pacer.max_rate(), share.token.is_none()), (100.0, true));
        // Withdrawn: the same.
        store.verify_claim("t2", 30.0, unix_now_ms()).await.unwrap();
        apply(&store, &pacer, &mut share).await;
        assert_eq!(pacer.max_rate(), 70.0);
        store.verify_release("t2").await.unwrap();
        apply(&store, &pacer, &mut share).await;
        assert_eq!(pacer.max_rate(), 100.0);
    }
}
