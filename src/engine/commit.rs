//! Group commit: lanes hand their answers to one committer task, which records the answers of
//! several lanes, and claims their next batches, in one transaction
//! ([`Store::record_many`](crate::store::Store::record_many)). At 200 requests a second a
//! transaction per request costs more in round trips to SQLite's thread and in WAL pages than the
//! work itself; one per few requests does not.
//!
//! The committer waits at most `import.commit_window` after the first answer for others, and only
//! while another lane has a request out and requests queue at the pacer: then the quota, not
//! latency, sets the pace, and holding a lane back a few milliseconds costs no throughput (with few
//! lanes, or a lone one, nothing waits). A lane waits for its own record to be committed before
//! it sends again, so the exactly-once argument is unchanged: nothing is sent before the answer
//! before it is durable.
//!
//! Stopping: the engine fires `done` once its lanes have ended; the committer records whatever is
//! still queued and returns. A store error fails every record of that transaction (nothing of it
//! is written); each lane then treats it like any store error, its messages stay in flight and
//! are reconciled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::EngineError;
use crate::pacing::Pacer;
use crate::store::{QueuedMessage, Record, Store};

/// Records per transaction at most.
const MAX_RECORDS: usize = 32;

type Reply = Result<Vec<QueuedMessage>, EngineError>;

struct Job {
    record: Record,
    reply: oneshot::Sender<Reply>,
}

/// The lanes' handle on the committer task.
pub struct Committer {
    tx: mpsc::Sender<Job>,
    /// Lanes with a request out whose answer is not yet handed over.
    out: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

/// Transactions committed and records they carried, since the start.
#[derive(Debug, Default)]
struct Stats {
    transactions: AtomicUsize,
    records: AtomicUsize,
}

/// Counts a lane as having a request out until it is dropped (or handed to [`Committer::submit`]).
pub struct Outstanding(Arc<AtomicUsize>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Committer {
    /// Starts the committer task; it ends after `done` fires, once its queue is empty.
    pub fn start(
        store: Store,
        pacer: Option<Arc<Pacer>>,
        window: Duration,
        done: CancellationToken,
    ) -> (Committer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(256);
        let out = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let linger = Linger {
            window,
            out: out.clone(),
            pacer,
        };
        let task = tokio::spawn(run(store, rx, linger, done, stats.clone()));
        (Committer { tx, out, stats }, task)
    }

    /// (transactions committed, records they carried) so far.
    pub fn stats(&self) -> (usize, usize) {
        (
            self.stats.transactions.load(Ordering::SeqCst),
            self.stats.records.load(Ordering::SeqCst),
        )
    }

    /// Marks a request as sent: the committer may wait a little for its answer.
    pub fn outstanding(&self) -> Outstanding {
        self.out.fetch_add(1, Ordering::SeqCst);
        Outstanding(self.out.clone())
    }

    /// Records `record` (with its next claim) in the next group transaction; returns the claimed
    /// batch.
    pub async fn submit(&self, record: Record, outstanding: Outstanding) -> Reply {
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(Job { record, reply }).await;
        // Only now: the committer sees either the record in its queue or one lane fewer out.
        drop(outstanding);
        sent.map_err(|_| EngineError::Store("the committer has stopped".into()))?;
        answer
            .await
            .map_err(|_| EngineError::Store("the committer has stopped".into()))?
    }
}

/// When the committer waits for more answers.
struct Linger {
    window: Duration,
    /// Lanes with a request out.
    out: Arc<AtomicUsize>,
    pacer: Option<Arc<Pacer>>,
}

impl Linger {
    fn worth_it(&self) -> bool {
        self.out.load(Ordering::SeqCst) > 0 && self.pacer.as_ref().is_none_or(|p| p.waiting() > 0)
    }
}

async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Job>,
    linger: Linger,
    done: CancellationToken,
    stats: Arc<Stats>,
) {
    loop {
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            _ = done.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        let deadline = tokio::time::Instant::now() + linger.window;
        let mut jobs = vec![first];
        while jobs.len() < MAX_RECORDS {
            if let Ok(job) = rx.try_recv() {
                jobs.push(job);
                continue;
            }
            if !linger.worth_it() || done.is_cancelled() {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                _ => break,
            }
        }
        let (records, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.record, j.reply)).unzip();
        metrics::histogram!("timport_commit_records").record(records.len() as f64);
        tracing::trace!(records = records.len(), "group commit");
        match store.record_many(&records).await {
            Ok(batches) => {
                stats.transactions.fetch_add(1, Ordering::SeqCst);
                stats.records.fetch_add(batches.len(), Ordering::SeqCst);
                for (reply, batch) in replies.into_iter().zip(batches) {
                    let _ = reply.send(Ok(batch));
                }
            }
            Err(e) => {
                let e = EngineError::from(e);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
