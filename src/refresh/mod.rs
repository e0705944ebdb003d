//! Background refresh: a bounded queue drained by workers, as many at once
//! as the adaptive limit allows ([`limit`]), and a per-key claim so that at
//! most one refresh per key is queued or running.
//!
//! The request path only ever calls [`RefreshQueue::try_enqueue`], which never
//! waits: a full queue drops the refresh (the caller counts it) and the stale
//! answer goes out anyway. The queue is bounded twice: by jobs
//! (`--refresh-queue`) and by the bytes its jobs hold, queued or running
//! (a job carries the triggering request's headers, up to
//! `--max-request-headers` twice over).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod limit;

use limit::{Gate, Sample};

/// What happened to a refresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// Queued; a worker will run it.
    Queued,
    /// A refresh of this key is already queued or running.
    AlreadyClaimed,
    /// The queue is full: dropped.
    Dropped,
}

/// What a job's payload holds in memory, for the queue's byte bound.
pub trait Weigh {
    fn weight(&self) -> u64;
}

/// A queued refresh: the key's hash, the caller's payload, and the claim that
/// frees the key (and the job's bytes) when the job is done or dropped.
pub struct Job<T> {
    pub hash: u64,
    pub payload: T,
    /// When it was queued, for the time it waited for a worker.
    pub queued_at: Instant,
    _claim: Claim,
}

/// The sending side, held by the request path.
pub struct RefreshQueue<T> {
    /// Bounded, so an origin outage cannot pile up refreshes without limit.
    tx: mpsc::Sender<Job<T>>,
    claims: Arc<Claims>,
    /// Most bytes the jobs queued or running may hold.
    max_bytes: u64,
}

/// Keys with a refresh queued or running. A std `Mutex`: held for a map
/// insert or remove, never across an await.
struct Claims {
    held: Mutex<HashMap<u64, Held>>,
    next_id: AtomicU64,
    /// A claim older than this no longer blocks its key (a stuck fetch).
    max_age: Duration,
    /// Bytes held by the jobs of live claims.
    bytes: AtomicU64,
}

struct Held {
    id: u64,
    at: Instant,
}

/// Frees its key when dropped, whatever happened to the job (done, failed,
/// panicked, cancelled, or dropped from a full queue), unless a newer claim
/// has replaced it.
struct Claim {
    hash: u64,
    id: u64,
    claims: Arc<Claims>,
    /// The job's bytes, refunded on drop.
    weight: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.bytes.fetch_sub(self.weight, Ordering::Relaxed);
        let mut held = self.claims.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(&self.hash).is_some_and(|h| h.id == self.id) {
            held.remove(&self.hash);
        }
    }
}

impl Claims {
    fn try_claim(self: &Arc<Self>, hash: u64, now: Instant) -> Option<Claim> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get(&hash) {
            if now.saturating_duration_since(h.at) < self.max_age {
                return None;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        held.insert(hash, Held { id, at: now });
        Some(Claim {
            hash,
            id,
            claims: Arc::clone(self),
            weight: 0,
        })
    }
}

impl<T: Weigh + Send + 'static> RefreshQueue<T> {
    /// A queue of `capacity` jobs holding at most `max_bytes`; a claim
    /// older than `max_claim_age` stops blocking its key.
    pub fn new(capacity: usize, max_bytes: u64, max_claim_age: Duration) -> (Self, Workers<T>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let queue = RefreshQueue {
            tx,
            claims: Arc::new(Claims {
                held: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                max_age: max_claim_age,
                bytes: AtomicU64::new(0),
            }),
            max_bytes,
        };
        (queue, Workers { rx })
    }

    /// Bytes held by the jobs queued or running.
    pub fn bytes(&self) -> u64 {
        self.claims.bytes.load(Ordering::Relaxed)
    }

    /// Queues a refresh of `hash` unless one is queued or running, without
    /// waiting. `payload` is only built when the job is queued.
    pub fn try_enqueue(&self, hash: u64, payload: impl FnOnce() -> T) -> Enqueue {
        let now = Instant::now();
        let Some(mut claim) = self.claims.try_claim(hash, now) else {
            return Enqueue::AlreadyClaimed;
        };
        let payload = payload();
        let weight = payload.weight();
        let held = self.claims.bytes.fetch_add(weight, Ordering::Relaxed);
        claim.weight = weight;
        if held + weight > self.max_bytes {
            // Dropping the claim refunds the bytes and frees the key.
            return Enqueue::Dropped;
        }
        let job = Job {
            hash,
            payload,
            queued_at: now,
            _claim: claim,
        };
        match self.tx.try_send(job) {
            Ok(()) => Enqueue::Queued,
            // The job, and with it the claim, is dropped here: the key is free again.
            Err(_) => Enqueue::Dropped,
        }
    }

    /// Jobs waiting for a worker.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Keys with a refresh queued or running.
    pub fn claimed(&self) -> usize {
        self.claims.held.lock().map(|h| h.len()).unwrap_or(0)
    }
}

/// The receiving side, turned into running workers by [`Workers::spawn`].
pub struct Workers<T> {
    rx: mpsc::Receiver<Job<T>>,
}

impl<T: Weigh + Send + 'static> Workers<T> {
    /// Starts workers, one per refresh `gate` may ever admit (its ceiling),
    /// that run `handler` on each job until `cancel` fires. A worker takes
    /// a job only once the gate admits it, so the refreshes in flight stay
    /// within the adaptive limit; the handler's [`Sample`] moves the limit.
    /// Each job runs in its own task, so a panic in one refresh ends that
    /// refresh only (its claim is freed) and the worker goes on.
    pub fn spawn<F, Fut>(
        self,
        gate: &Arc<Gate>,
        handler: F,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) where
        F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Sample> + Send + 'static,
    {
        // Workers share the one receiver; the async mutex is held only while
        // a worker waits for its next job.
        let rx = Arc::new(tokio::sync::Mutex::new(self.rx));
        let handler = Arc::new(handler);
        for _ in 0..gate.ceiling() {
            let rx = Arc::clone(&rx);
            let handler = Arc::clone(&handler);
            let cancel = cancel.clone();
            let gate = Arc::clone(gate);
            tracker.spawn(async move {
                loop {
                    let permit = tokio::select! {
                        _ = cancel.cancelled() => break,
                        permit = gate.admit() => permit,
                    };
                    let next = tokio::select! {
                        _ = cancel.cancelled() => None,
                        job = async { rx.lock().await.recv().await } => job,
                    };
                    let Some(job) = next else { break };
                    match tokio::spawn(handler(job)).await {
                        Ok(sample) => permit.finish(sample),
                        Err(err) => tracing::error!(error = %err, "refresh task failed"),
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for u32 {
        fn weight(&self) -> u64 {
            u64::from(*self)
        }
    }

    #[tokio::test]
    async fn the_bytes_of_queued_jobs_are_bounded() {
        let (queue, workers) = RefreshQueue::<u32>::new(100, 1000, Duration::from_secs(60));
        assert_eq!(queue.try_enqueue(1, || 600), Enqueue::Queued);
        assert_eq!(
            queue.try_enqueue(2, || 600),
            Enqueue::Dropped,
            "past 1000 bytes"
        );
        assert_eq!(queue.bytes(), 600, "the dropped job's bytes are refunded");
        assert_eq!(queue.try_enqueue(2, || 400), Enqueue::Queued);
        drop(workers);
        assert_eq!(queue.bytes(), 0);
    }

    #[tokio::test]
    async fn one_claim_per_key_until_the_job_is_dropped() {
        let (queue, workers) = RefreshQueue::<u32>::new(4, u64::MAX, Duration::from_secs(60));
        assert_eq!(queue.try_enqueue(1, || 10), Enqueue::Queued);
        assert_eq!(queue.try_enqueue(1, || 11), Enqueue::AlreadyClaimed);
        assert_eq!(queue.try_enqueue(2, || 20), Enqueue::Queued);
        assert_eq!(queue.depth(), 2);
        drop(workers); // drops the queued jobs, and their claims
        assert_eq!(queue.claimed(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_frees_the_key() {
        let (queue, _workers) = RefreshQueue::<u32>::new(1, u64::MAX, Duration::from_secs(60));
        assert_eq!(queue.try_enqueue(1, || 1), Enqueue::Queued);
        assert_eq!(queue.try_enqueue(2, || 2), Enqueue::Dropped);
        assert_eq!(queue.claimed(), 1, "the dropped job's claim is freed");
    }

    #[tokio::test]
    async fn an_old_claim_stops_blocking() {
        let (queue, _workers) = RefreshQueue::<u32>::new(4, u64::MAX, Duration::ZERO);
        assert_eq!(queue.try_enqueue(1, || 1), Enqueue::Queued);
        assert_eq!(queue.try_enqueue(1, || 2), Enqueue::Queued);
    }

    #[tokio::test]
    async fn workers_run_jobs_and_survive_a_panic() {
        let (queue, workers) = RefreshQueue::<u32>::new(8, u64::MAX, Duration::from_secs(60));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        workers.spawn(
            &Gate::new(1),
            move |job: Job<u32>| {
                let done_tx = done_tx.clone();
                async move {
                    if job.payload == 0 {
                        panic!("refresh handler panicked on purpose");
                    }
                    let _ = done_tx.send(job.payload);
                    Sample::NotSent
                }
            },
            cancel.clone(),
            &tracker,
        );
        assert_eq!(queue.try_enqueue(1, || 0), Enqueue::Queued);
        assert_eq!(queue.try_enqueue(2, || 7), Enqueue::Queued);
        assert_eq!(done_rx.recv().await, Some(7));
        // The panicked job's claim was freed.
        assert_eq!(queue.try_enqueue(1, || 8), Enqueue::Queued);
        assert_eq!(done_rx.recv().await, Some(8));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
