//! Background refresh: a bounded queue ordered by what a refresh is worth,
//! drained by workers, as many at once as the adaptive limit allows
//! ([`limit`]), and a per-key claim so that at most one refresh per key is
//! queued or running.
//!
//! The request path only ever calls [`RefreshQueue::try_enqueue_with`], which never
//! waits. Each job comes with its value (the caller's: popularity times how
//! far past its ttl the entry is, see [`popularity`]); workers take the most
//! valuable job first (the oldest among equals), and a full queue drops its
//! least valuable job to make room for one clearly more valuable, or else
//! the new one (the caller counts it; the stale answer goes out anyway).
//! With every value equal this is a FIFO queue that drops the newest, as it
//! was before priorities. A key asked for again while its job waits raises
//! the job's value when the new one is well above it ([`RAISE_FACTOR`]), so
//! a key that turns hot while queued moves up.
//!
//! The queue is bounded twice: by jobs (`--refresh-queue`) and by the bytes
//! its jobs hold, queued or running (a job carries the triggering request's
//! headers, up to `--max-request-headers` twice over).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod limit;
pub mod popularity;

use limit::{Gate, Sample};

/// What happened to a refresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// Queued; a worker will run it. `displaced`: the queue was full and
    /// its least valuable job was dropped for this one.
    Queued { displaced: bool },
    /// A refresh of this key is already queued or running; `waiting`: it
    /// is still queued (a backlog), not running.
    AlreadyClaimed { waiting: bool },
    /// Not queued, for this reason.
    Dropped(DropReason),
}

/// Why a refresh request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue is full of jobs this one is not clearly worth more than
    /// ([`DISPLACE_MARGIN`]).
    Full,
    /// Its jobs' bytes would pass their bound.
    Bytes,
    /// Its workers are gone (shutdown).
    Closed,
}

impl DropReason {
    /// The reason as a log field says it.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Full => "queue-full",
            DropReason::Bytes => "queue-bytes",
            DropReason::Closed => "shutdown",
        }
    }
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
    claim: Claim,
}

/// Where a job sits in the queue: its value, then `Reverse` of its order of
/// arrival, so that among equal values the oldest sorts last. The map's
/// last key is the job to run (most valuable, oldest), its first the job to
/// drop (least valuable, newest).
type Place = (u64, Reverse<u64>);

/// The sending side, held by the request path.
pub struct RefreshQueue<T> {
    queue: Arc<Queue<T>>,
    claims: Arc<Claims>,
    /// Most bytes the jobs queued or running may hold.
    max_bytes: u64,
}

/// The jobs waiting for a worker, by [`Place`]. A std `Mutex`: held for a
/// map insert or remove, never across an await. Locked before
/// [`Claims::held`] when both are (a job's claim is dropped with this lock
/// held; the claim takes `held`).
struct Queue<T> {
    jobs: Mutex<BTreeMap<Place, Job<T>>>,
    capacity: usize,
    next_seq: AtomicU64,
    /// A job was queued: wakes an idle worker.
    ready: Notify,
    /// No worker will run jobs any more: nothing is queued.
    closed: AtomicBool,
}

impl<T> Queue<T> {
    fn jobs(&self) -> MutexGuard<'_, BTreeMap<Place, Job<T>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
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

impl Claims {
    fn held(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Held {
    id: u64,
    at: Instant,
    /// Where its job waits, until a worker takes it.
    place: Option<Place>,
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
        let mut held = self.claims.held();
        if held.get(&self.hash).is_some_and(|h| h.id == self.id) {
            held.remove(&self.hash);
        }
    }
}

/// What [`Claims::try_claim`] found.
enum Claimed {
    New(Claim),
    /// Claimed already; where its job waits, if it does.
    Taken(Option<Place>),
}

impl Claims {
    fn try_claim(self: &Arc<Self>, hash: u64, now: Instant) -> Claimed {
        let mut held = self.held();
        if let Some(h) = held.get(&hash) {
            if now.saturating_duration_since(h.at) < self.max_age {
                return Claimed::Taken(h.place);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        held.insert(
            hash,
            Held {
                id,
                at: now,
                place: None,
            },
        );
        Claimed::New(Claim {
            hash,
            id,
            claims: Arc::clone(self),
            weight: 0,
        })
    }

    /// The job of claim `id` on `hash` now waits at `place` (`None`: a
    /// worker took it).
    fn moved(&self, hash: u64, id: u64, place: Option<Place>) {
        if let Some(h) = self.held().get_mut(&hash).filter(|h| h.id == id) {
            h.place = place;
        }
    }
}

/// A waiting job's value is raised only past this factor of what it was,
/// so a hot key's every stale answer does not move its job.
const RAISE_FACTOR: u64 = 2;
/// A new job displaces the least valuable one of a full queue only when
/// worth more than it by a 1/this share: jobs of about the same value (keys
/// as popular, give or take one sampled request, stale a moment apart) do
/// not churn a full queue.
const DISPLACE_MARGIN: u64 = 2;

impl<T: Weigh + Send + 'static> RefreshQueue<T> {
    /// A queue of `capacity` jobs holding at most `max_bytes`; a claim
    /// older than `max_claim_age` stops blocking its key.
    pub fn new(capacity: usize, max_bytes: u64, max_claim_age: Duration) -> (Self, Workers<T>) {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(BTreeMap::new()),
            capacity: capacity.max(1),
            next_seq: AtomicU64::new(0),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let refresh = RefreshQueue {
            queue: Arc::clone(&queue),
            claims: Arc::new(Claims {
                held: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                max_age: max_claim_age,
                bytes: AtomicU64::new(0),
            }),
            max_bytes,
        };
        let workers = Workers {
            closer: Arc::new(Closer(queue)),
        };
        (refresh, workers)
    }

    /// Bytes held by the jobs queued or running.
    pub fn bytes(&self) -> u64 {
        self.claims.bytes.load(Ordering::Relaxed)
    }

    /// [`RefreshQueue::try_enqueue_with`] with a value known in advance
    /// (the tests' shorthand).
    #[cfg(test)]
    pub fn try_enqueue(&self, hash: u64, value: u64, payload: impl FnOnce() -> T) -> Enqueue {
        self.try_enqueue_with(hash, || value, payload)
    }

    /// Queues a refresh of `hash` worth `value()` unless one is queued or
    /// running, without waiting. The value is computed only when needed
    /// (not for a key whose refresh is running, the common case of a stale
    /// answer under load), and `payload` only built when the job is
    /// queued. A job already waiting for `hash` is moved up to the value
    /// when that is well above its own.
    pub fn try_enqueue_with(
        &self,
        hash: u64,
        value: impl FnOnce() -> u64,
        payload: impl FnOnce() -> T,
    ) -> Enqueue {
        let now = Instant::now();
        let mut claim = match self.claims.try_claim(hash, now) {
            Claimed::New(claim) => claim,
            Claimed::Taken(None) => return Enqueue::AlreadyClaimed { waiting: false },
            Claimed::Taken(Some(place)) => {
                let value = value();
                if value > place.0.saturating_mul(RAISE_FACTOR) {
                    self.raise(hash, place, value);
                }
                return Enqueue::AlreadyClaimed { waiting: true };
            }
        };
        if self.queue.closed.load(Ordering::Relaxed) {
            return Enqueue::Dropped(DropReason::Closed);
        }
        let payload = payload();
        let weight = payload.weight();
        let held = self.claims.bytes.fetch_add(weight, Ordering::Relaxed);
        claim.weight = weight;
        if held + weight > self.max_bytes {
            // Dropping the claim refunds the bytes and frees the key.
            return Enqueue::Dropped(DropReason::Bytes);
        }
        let id = claim.id;
        let job = Job {
            hash,
            payload,
            queued_at: now,
            claim,
        };
        let value = value();
        let place = (
            value,
            Reverse(self.queue.next_seq.fetch_add(1, Ordering::Relaxed)),
        );
        let mut jobs = self.queue.jobs();
        let mut displaced = false;
        if jobs.len() >= self.queue.capacity {
            match jobs.first_key_value() {
                Some((least, _)) if value > least.0.saturating_add(least.0 / DISPLACE_MARGIN) => {
                    // The least valuable job goes (its claim frees its key).
                    jobs.pop_first();
                    displaced = true;
                }
                // The job, and with it the claim, is dropped: the key is free again.
                _ => return Enqueue::Dropped(DropReason::Full),
            }
        }
        jobs.insert(place, job);
        self.claims.moved(hash, id, Some(place));
        drop(jobs);
        self.queue.ready.notify_one();
        Enqueue::Queued { displaced }
    }

    /// Moves the job waiting at `place` for `hash` up to `value`.
    fn raise(&self, hash: u64, place: Place, value: u64) {
        let mut jobs = self.queue.jobs();
        let Some(job) = jobs.remove(&place) else {
            // A worker took it meanwhile.
            return;
        };
        let new_place = (value, place.1);
        let id = job.claim.id;
        jobs.insert(new_place, job);
        self.claims.moved(hash, id, Some(new_place));
    }

    /// Jobs waiting for a worker.
    pub fn depth(&self) -> usize {
        self.queue.jobs().len()
    }

    /// Keys with a refresh queued or running.
    pub fn claimed(&self) -> usize {
        self.claims.held().len()
    }
}

/// The receiving side, turned into running workers by [`Workers::spawn`].
pub struct Workers<T> {
    closer: Arc<Closer<T>>,
}

/// Closes the queue when the last worker (or an unspawned [`Workers`]) is
/// gone: its jobs are dropped, their keys freed, and nothing more is queued.
struct Closer<T>(Arc<Queue<T>>);

impl<T> Drop for Closer<T> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Relaxed);
        let jobs = std::mem::take(&mut *self.0.jobs());
        drop(jobs);
    }
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
        let handler = Arc::new(handler);
        for _ in 0..gate.ceiling() {
            let closer = Arc::clone(&self.closer);
            let handler = Arc::clone(&handler);
            let cancel = cancel.clone();
            let gate = Arc::clone(gate);
            tracker.spawn(async move {
                let queue = &closer.0;
                loop {
                    let permit = tokio::select! {
                        _ = cancel.cancelled() => break,
                        permit = gate.admit() => permit,
                    };
                    let next = tokio::select! {
                        _ = cancel.cancelled() => None,
                        job = next_job(queue) => Some(job),
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

/// The most valuable job, once there is one.
async fn next_job<T>(queue: &Queue<T>) -> Job<T> {
    loop {
        let notified = queue.ready.notified();
        {
            let mut jobs = queue.jobs();
            if let Some((_, job)) = jobs.pop_last() {
                job.claim.claims.moved(job.hash, job.claim.id, None);
                if !jobs.is_empty() {
                    // More work: pass the wake-up on to another idle worker.
                    queue.ready.notify_one();
                }
                return job;
            }
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queued without displacing another job.
    const QUEUED: Enqueue = Enqueue::Queued { displaced: false };

    impl Weigh for u32 {
        fn weight(&self) -> u64 {
            u64::from(*self)
        }
    }

    #[tokio::test]
    async fn the_bytes_of_queued_jobs_are_bounded() {
        let (queue, workers) = RefreshQueue::<u32>::new(100, 1000, Duration::from_secs(60));
        assert_eq!(queue.try_enqueue(1, 0, || 600), QUEUED);
        assert_eq!(
            queue.try_enqueue(2, 0, || 600),
            Enqueue::Dropped(DropReason::Bytes),
            "past 1000 bytes"
        );
        assert_eq!(queue.bytes(), 600, "the dropped job's bytes are refunded");
        assert_eq!(queue.try_enqueue(2, 0, || 400), QUEUED);
        drop(workers);
        assert_eq!(queue.bytes(), 0);
    }

    #[tokio::test]
    async fn one_claim_per_key_until_the_job_is_dropped() {
        let (queue, workers) = RefreshQueue::<u32>::new(4, u64::MAX, Duration::from_secs(60));
        assert_eq!(queue.try_enqueue(1, 0, || 10), QUEUED);
        assert_eq!(
            queue.try_enqueue(1, 0, || 11),
            Enqueue::AlreadyClaimed { waiting: true }
        );
        assert_eq!(queue.try_enqueue(2, 0, || 20), QUEUED);
        assert_eq!(queue.depth(), 2);
        drop(workers); // drops the queued jobs, and their claims
        assert_eq!(queue.claimed(), 0);
        assert_eq!(
            queue.try_enqueue(3, 0, || 30),
            Enqueue::Dropped(DropReason::Closed),
            "no workers: nothing is queued"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_frees_the_key() {
        let (queue, _workers) = RefreshQueue::<u32>::new(1, u64::MAX, Duration::from_secs(60));
        assert_eq!(queue.try_enqueue(1, 0, || 1), QUEUED);
        assert_eq!(
            queue.try_enqueue(2, 0, || 2),
            Enqueue::Dropped(DropReason::Full)
        );
        assert_eq!(queue.claimed(), 1, "the dropped job's claim is freed");
    }

    #[tokio::test]
    async fn an_old_claim_stops_blocking() {
        let (queue, _workers) = RefreshQueue::<u32>::new(4, u64::MAX, Duration::ZERO);
        assert_eq!(queue.try_enqueue(1, 0, || 1), QUEUED);
        assert_eq!(queue.try_enqueue(1, 0, || 2), QUEUED);
    }

    #[tokio::test]
    async fn workers_run_jobs_and_survive_a_panic() {
        let (queue, workers) = RefreshQueue::<u32>::new(8, u64::MAX, Duration::from_secs(60));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
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
        assert_eq!(queue.try_enqueue(1, 0, || 0), QUEUED);
        assert_eq!(queue.try_enqueue(2, 0, || 7), QUEUED);
        assert_eq!(done_rx.recv().await, Some(7));
        // The panicked job's claim was freed.
        assert_eq!(queue.try_enqueue(1, 0, || 8), QUEUED);
        assert_eq!(done_rx.recv().await, Some(8));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn the_most_valuable_job_runs_first_and_equals_in_order() {
        let (queue, workers) = RefreshQueue::<u32>::new(16, u64::MAX, Duration::from_secs(60));
        for (hash, value) in [(1, 5), (2, 50), (3, 5), (4, 500), (5, 50)] {
            assert_eq!(queue.try_enqueue(hash, value, || hash as u32), QUEUED);
        }
        // A queued key asked for again, worth far more now, moves up...
        assert_eq!(
            queue.try_enqueue(3, 5000, || 0),
            Enqueue::AlreadyClaimed { waiting: true }
        );
        // ...but not for a small rise.
        assert_eq!(
            queue.try_enqueue(1, 9, || 0),
            Enqueue::AlreadyClaimed { waiting: true }
        );
        let queue_of = &workers.closer.0;
        let mut order = Vec::new();
        for _ in 0..5 {
            let job = next_job(queue_of).await;
            order.push(job.payload);
            if job.payload == 3 {
                assert_eq!(
                    queue.try_enqueue(3, 1, || 0),
                    Enqueue::AlreadyClaimed { waiting: false },
                    "running, not waiting"
                );
            }
        }
        assert_eq!(order, [3, 4, 2, 5, 1], "by value, then oldest first");
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_least_valuable_job() {
        let (queue, workers) = RefreshQueue::<u32>::new(3, u64::MAX, Duration::from_secs(60));
        for (hash, value) in [(1, 10), (2, 8), (3, 10)] {
            queue.try_enqueue(hash, value, || hash as u32);
        }
        assert_eq!(
            queue.try_enqueue(4, 8, || 4),
            Enqueue::Dropped(DropReason::Full),
            "worth no more than the least: the new one goes"
        );
        assert_eq!(
            queue.try_enqueue(6, 9, || 6),
            Enqueue::Dropped(DropReason::Full),
            "worth a little more (within the margin): the new one goes"
        );
        assert_eq!(
            queue.try_enqueue(5, 100, || 5),
            Enqueue::Queued { displaced: true }
        );
        assert_eq!(queue.depth(), 3);
        assert_eq!(queue.claimed(), 3, "the displaced job's key is free");
        assert!(matches!(queue.try_enqueue(2, 1, || 2), Enqueue::Dropped(_)));
        let queue_of = &workers.closer.0;
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(next_job(queue_of).await.payload);
        }
        assert_eq!(order, [5, 1, 3]);
    }

    #[tokio::test]
    async fn equal_values_are_first_in_first_out_and_drop_the_newest() {
        let (queue, workers) = RefreshQueue::<u32>::new(2, u64::MAX, Duration::from_secs(60));
        for hash in 1..=3 {
            queue.try_enqueue(hash, 0, || hash as u32);
        }
        let queue_of = &workers.closer.0;
        assert_eq!(next_job(queue_of).await.payload, 1);
        assert_eq!(next_job(queue_of).await.payload, 2);
    }
}
