//! The store: a byte-bounded moka cache of `Arc<Entry>`, and the coalescing
//! of fills (one backend fetch per absent key, however many clients wait).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;
use tokio::sync::watch;

use super::entry::Entry;
use super::key::{BuildPassThrough, RequestKey};

/// What a coalesced fill ended with, as its waiters see it.
#[derive(Debug, Clone)]
pub enum FillOutcome {
    /// The response was stored: every waiter answers with this entry.
    Stored(Arc<Entry>),
    /// The response may not be shared (private, too large, ...): each waiter
    /// fetches for itself.
    NotShared,
    /// The backend failed; the waiters answer with stale content or an error.
    Failed(crate::error::UpstreamError),
}

type FillSlot = watch::Receiver<Option<FillOutcome>>;

/// Either this request leads the fill of a key, or it waits for the leader.
pub enum Fill {
    Leader(FillGuard),
    Follower(FillSlot),
}

/// The cache. Reads are lock-free moka reads (no await on the hit path);
/// fills are coalesced through a small map guarded by a std `Mutex`, held only
/// to insert or remove a slot, never across an await.
pub struct Store {
    entries: Cache<u64, Arc<Entry>, BuildPassThrough>,
    fills: Arc<Mutex<HashMap<u64, FillSlot>>>,
}

/// moka evicts an entry only once it can no longer be served at all.
struct EvictWhenUnservable;

impl Expiry<u64, Arc<Entry>> for EvictWhenUnservable {
    fn expire_after_create(
        &self,
        _key: &u64,
        entry: &Arc<Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.evict_at().saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &u64,
        entry: &Arc<Entry>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.evict_at().saturating_duration_since(updated_at))
    }
}

impl Store {
    /// A store holding at most `max_bytes` of keys, headers and bodies.
    pub fn new(max_bytes: u64) -> Store {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &u64, entry: &Arc<Entry>| entry.weight())
            .expire_after(EvictWhenUnservable)
            .build_with_hasher(BuildPassThrough);
        Store {
            entries,
            fills: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The entry stored for `key`, if any (whatever its state).
    pub fn get(&self, key: &RequestKey<'_>) -> Option<Arc<Entry>> {
        self.entries
            .get(&key.hash)
            .filter(|entry| key.matches(&entry.key))
    }

    /// Stores `entry` under `hash`, replacing any entry there whole.
    pub fn insert(&self, hash: u64, entry: Arc<Entry>) {
        self.entries.insert(hash, entry);
    }

    /// Removes the entry under `hash` if it is the one for `key_text`.
    pub fn remove(&self, hash: u64, key_text: &str) -> bool {
        use moka::ops::compute::{CompResult, Op};
        let result = self
            .entries
            .entry(hash)
            .and_compute_with(|current| match current {
                Some(entry) if &*entry.value().key == key_text => Op::Remove,
                _ => Op::Nop,
            });
        matches!(result, CompResult::Removed(_))
    }

    /// Number of entries (approximate until moka's housekeeping runs).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Bytes charged against the budget (approximate until housekeeping runs).
    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// Runs moka's pending housekeeping, so counts are exact (tests, stats).
    pub fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks();
    }

    /// Joins the fill in progress for `hash`, or becomes its leader.
    pub fn begin_fill(&self, hash: u64) -> Fill {
        let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = fills.get(&hash) {
            return Fill::Follower(slot.clone());
        }
        let (tx, rx) = watch::channel(None);
        fills.insert(hash, rx);
        Fill::Leader(FillGuard {
            hash,
            tx,
            fills: Arc::clone(&self.fills),
        })
    }

    /// Number of fills in progress.
    pub fn fills_in_progress(&self) -> usize {
        self.fills.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// Held by the leader of a fill. Completing it tells every waiter; dropping it
/// without completing (error, panic, cancellation) frees the key, and waiters
/// see the slot close and try again.
pub struct FillGuard {
    hash: u64,
    tx: watch::Sender<Option<FillOutcome>>,
    fills: Arc<Mutex<HashMap<u64, FillSlot>>>,
}

impl FillGuard {
    /// Publishes the outcome to the waiters and frees the key.
    pub fn complete(self, outcome: FillOutcome) {
        // Waiters may all have gone away; that is fine.
        self.tx.send_replace(Some(outcome));
        // `Drop` removes the slot.
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
        fills.remove(&self.hash);
    }
}

/// Waits for the leader of a fill. `None` when the leader went away without
/// an outcome.
pub async fn wait_fill(mut slot: FillSlot) -> Option<FillOutcome> {
    match slot.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    }
}
