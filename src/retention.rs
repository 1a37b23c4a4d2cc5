//! `queue.keep_bodies`: the bodies of imported messages are dropped once they are no longer
//! needed, so a finished migration does not keep every body forever.
//!
//! Role: [`pass`] drops, in batches of [`BATCH`] (one short transaction each), the bodies the
//! policy lets go: those `timport verify` found verified (`until_verified`, the default, followed
//! by a cursor over the verify results), or those imported longer ago than a duration. Each body's
//! row in `message_bodies` is deleted and the SHA-256 of its canonical JSON text kept
//! (`messages.body_sha256`), so `verify` still compares it; MsgSeq, sender, times and Random stay
//! for `status` and `verify`. Pending, in-flight and failed messages keep their bodies (they may
//! still be sent). Bodies have their own table, keyed by message id, so a batch deletes whole
//! runs of rows: their pages go to SQLite's freelist and the bodies and messages queued later
//! take them before the file grows (the file itself only shrinks with a compact copy,
//! VACUUM INTO).
//!
//! Stopping and recovery: [`run`] does a pass at once and then every [`EVERY`] until its token
//! fires, which also ends a pass between batches; a batch is one transaction, so a stop or crash
//! anywhere loses nothing and the next pass goes on (`timport run --until-idle` does one last
//! pass before it exits).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::settings::KeepBodies;
use crate::store::{Store, StoreError, unix_now};
use crate::tencent::body;

/// Messages per transaction.
pub const BATCH: i64 = 2_000;
/// Time between passes.
pub const EVERY: Duration = Duration::from_secs(60);

/// Drops every body `keep` lets go now (stopping between batches once `stop` fires); returns
/// how many.
pub async fn pass(
    store: &Store,
    keep: KeepBodies,
    stop: &CancellationToken,
) -> Result<u64, StoreError> {
    let mut dropped = 0;
    while !stop.is_cancelled() {
        let batch = store.bodies_to_drop(keep, unix_now(), BATCH).await?;
        let digests: Vec<(i64, String)> = batch
            .messages
            .iter()
            .map(|(id, text)| {
                let canonical = body::canonical_text(text).unwrap_or_else(|| text.clone());
                (*id, body::digest(&canonical))
            })
            .collect();
        if digests.is_empty() && batch.cursor.is_none() {
            break;
        }
        dropped += store.drop_bodies(&digests, batch.cursor).await?;
        if batch.last {
            break;
        }
        tokio::task::yield_now().await;
    }
    if dropped > 0 {
        tracing::info!(dropped, policy = ?keep, "bodies of imported messages dropped (queue.keep_bodies)");
    }
    Ok(dropped)
}

/// A pass now, then one every [`EVERY`], until `stop` fires.
pub async fn run(store: Store, keep: KeepBodies, stop: CancellationToken) {
    if keep == KeepBodies::Forever {
        return;
    }
    loop {
        if let Err(e) = pass(&store, keep, &stop).await {
            tracing::warn!(error = %e, "dropping imported bodies failed; retrying at the next pass");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
