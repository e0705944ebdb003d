//! The store: a byte-bounded, sharded map of entries with CLOCK
//! eviction, and the coalescing of fills (one backend fetch per absent key,
//! however many clients wait).
//!
//! Why not moka: a moka `sync::Cache` read measured 1.3 µs on this machine
//! (10,000 keys, criterion; its concurrent hash table and access-order
//! bookkeeping miss the CPU cache several times per read), against 75 ns for
//! a locked `HashMap`. A cache hit has about 1 µs to spend in all, so the hit
//! path reads a plain sharded map: a read lock, a lookup, a reference-count
//! increment and one relaxed flag load (a store only the first time).
//! Nor `quick_cache` 0.7 (issue 17, BENCHMARKS.md): keyed by the key's hash
//! it takes 1,336 B per 1 KiB object against our 1,334 B (1,376 B keyed by
//! the key text), and two criterion runs on a busy machine disagreed on
//! which reads faster (its hit at 0.38x, then 1.20x, of ours).
//! Eviction is CLOCK (second chance): a read marks the entry visited; the
//! eviction hand passes over visited entries once, clearing the mark, and
//! evicts the first unvisited one, or any entry that can no longer be served
//! at all. The hand walks the hash table's own buckets (hashbrown's
//! `HashTable` gives access by bucket index), so the clock costs no memory
//! per entry.

use std::alloc::System;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use hashbrown::HashTable;
use http::HeaderName;
use tokio::sync::watch;

use super::entry::Entry;
use super::key::RequestKey;
use super::vary::{VariantKey, VaryIndex};

/// What a coalesced fill ended with, as its waiters see it.
#[derive(Debug, Clone)]
pub enum FillOutcome {
    /// The response was stored: every waiter answers with this entry.
    Stored(Entry),
    /// Another instance of the fleet had stored it (read from the shared
    /// level, in Redis): every waiter answers with this entry. Not to be
    /// confused with [`FillOutcome::NotShared`], an answer that may not be
    /// shared among clients.
    FromFleet(Entry),
    /// The response may not be shared (private, too large, ...: the
    /// reason): each waiter fetches for itself.
    NotShared(crate::cache::policy::BypassReason),
    /// The backend failed; the waiters answer with stale content or an error.
    Failed(crate::error::UpstreamError),
}

type FillSlot = watch::Receiver<Option<FillOutcome>>;

/// Either this request leads the fill of a key, or it waits for the leader.
pub enum Fill {
    Leader(FillGuard),
    Follower(FillSlot),
}

/// Shards of the map: enough that two cores rarely meet on one lock.
const SHARDS: usize = 64;

/// The cache.
pub struct Store {
    shards: Box<[Shard]>,
    /// Bytes charged by all entries (see [`Entry::weight`]).
    bytes: AtomicU64,
    max_bytes: u64,
    /// The shard the eviction hand visits next.
    evict_cursor: AtomicUsize,
    evictions: AtomicU64,
    /// Fills in progress. A std `Mutex`: held to insert or remove a slot,
    /// never across an await.
    fills: Arc<Mutex<HashMap<u64, FillSlot>>>,
    /// For URLs whose responses vary: the header names they vary on and the
    /// variants stored, by the hash of the URL's key. Read on a miss only.
    vary: RwLock<VaryIndex>,
}

/// The part of the budget the Vary index may take: 1/16. Records count
/// against the store's budget like entries; past their share, records are
/// dropped (their variants are then misses, fetched again), so
/// `GET /?n=<counter>` against a backend that varies cannot grow memory
/// past `--max-size`. The sweep drops records whose variants have all gone.
const VARY_SHARE: u64 = 16;

/// One shard. A std `RwLock`: readers (hits) share it; writers hold it for a
/// map operation only.
#[derive(Default)]
struct Shard {
    inner: RwLock<ShardInner>,
}

#[derive(Default)]
struct ShardInner {
    /// Slots by key hash: one entry per hash (a key whose hash collides with
    /// a stored one replaces it; a read checks the key text). In the system
    /// allocator, with the entries (see entry.rs): a table that grows frees
    /// its old buckets there, where entries reuse them, instead of leaving
    /// them in mimalloc's pages among small objects that live on.
    table: HashTable<Slot, System>,
    /// The CLOCK hand: the bucket index the next eviction looks at first.
    hand: usize,
}

impl ShardInner {
    fn get(&self, hash: u64) -> Option<&Slot> {
        self.table.find(hash, |slot| slot.hash == hash)
    }

    /// Removes the slot under `hash` if `is_it` says so of its entry.
    fn remove_if(&mut self, hash: u64, is_it: impl FnOnce(&Entry) -> bool) -> Option<Slot> {
        let found = self.table.find_entry(hash, |slot| slot.hash == hash).ok()?;
        if !is_it(&found.get().entry) {
            return None;
        }
        Some(found.remove().0)
    }
}

struct Slot {
    hash: u64,
    entry: Entry,
    weight: u32,
    /// Set by reads, cleared by the eviction hand: the second chance.
    visited: AtomicBool,
}

impl Store {
    /// A store holding at most `max_bytes` of keys, headers and bodies.
    pub fn new(max_bytes: u64) -> Store {
        Store {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            bytes: AtomicU64::new(0),
            max_bytes,
            evict_cursor: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            fills: Arc::new(Mutex::new(HashMap::new())),
            vary: RwLock::new(VaryIndex::default()),
        }
    }

    fn shard(&self, hash: u64) -> &Shard {
        // Middle bits pick the shard: the map inside uses the low bits for
        // the bucket and the top seven as the tag.
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    /// The entry stored for `key`, if it can still be served in some way at `now`.
    pub fn get(&self, key: &RequestKey<'_>, now: Instant) -> Option<Entry> {
        self.lookup(key.hash, |text| key.matches(text), now)
    }

    /// The entry stored under `hash` whose key text is exactly `text`.
    pub fn get_exact(&self, hash: u64, text: &[u8], now: Instant) -> Option<Entry> {
        self.lookup(hash, |stored| stored == text, now)
    }

    fn lookup(&self, hash: u64, is_key: impl Fn(&[u8]) -> bool, now: Instant) -> Option<Entry> {
        let inner = read(&self.shard(hash).inner);
        let slot = inner.get(hash)?;
        if !is_key(slot.entry.key_bytes()) || now >= slot.entry.evict_at() {
            return None;
        }
        // Load first: a hot entry's flag is already set, and a load leaves
        // its cache line shared between cores.
        if !slot.visited.load(Relaxed) {
            slot.visited.store(true, Relaxed);
        }
        Some(slot.entry.clone())
    }

    /// The header names the responses for the URL `url_hash` vary on, if they do.
    pub fn vary_names(&self, url_hash: u64) -> Option<Arc<[HeaderName]>> {
        self.vary_index().names(url_hash)
    }

    /// Bytes the Vary index is charged (part of [`Store::weighted_size`]).
    pub fn vary_bytes(&self) -> u64 {
        self.vary_index().bytes()
    }

    /// URLs the Vary index holds records for.
    pub fn vary_records(&self) -> usize {
        self.vary_index().len()
    }

    fn vary_index(&self) -> std::sync::RwLockReadGuard<'_, VaryIndex> {
        self.vary.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the Vary index with `change`, charging (or refunding) the
    /// store's budget for the bytes its records gained or lost.
    fn change_vary<T>(&self, change: impl FnOnce(&mut VaryIndex) -> T) -> T {
        let mut vary = self.vary.write().unwrap_or_else(|e| e.into_inner());
        let before = vary.bytes();
        let result = change(&mut vary);
        let after = vary.bytes();
        if after >= before {
            self.bytes.fetch_add(after - before, Relaxed);
        } else {
            self.bytes.fetch_sub(before - after, Relaxed);
        }
        result
    }

    /// Records that the URL `url_hash` varies on `names`, with a variant
    /// stored under `variant_hash`.
    pub fn record_variant(&self, url_hash: u64, names: &[HeaderName], variant_hash: u64) {
        let budget = self.max_bytes / VARY_SHARE;
        // Records dropped to stay within the share take their variants with
        // them (unreachable without the record, and an invalidation could
        // no longer find them).
        let orphans = self.change_vary(|vary| vary.record(url_hash, names, variant_hash, budget));
        for hash in orphans {
            let mut inner = write(&self.shard(hash).inner);
            if let Some(old) = inner.remove_if(hash, |_| true) {
                self.bytes.fetch_sub(u64::from(old.weight), Relaxed);
            }
        }
    }

    /// Forgets that the URL varies (its responses no longer do).
    pub fn forget_vary(&self, url_hash: u64) {
        self.change_vary(|vary| vary.remove(url_hash));
    }

    /// Removes everything stored for a URL: its entry and every variant.
    /// Returns how many entries went.
    pub fn remove_url(&self, url_hash: u64, url_text: &str) -> usize {
        let mut removed = usize::from(self.remove(url_hash, url_text));
        if let Some(record) = self.change_vary(|vary| vary.remove(url_hash)) {
            for hash in record.variants() {
                let mut inner = write(&self.shard(hash).inner);
                let is_variant =
                    |entry: &Entry| VariantKey::is_variant_of(entry.key_bytes(), url_text);
                if let Some(old) = inner.remove_if(hash, is_variant) {
                    self.bytes.fetch_sub(u64::from(old.weight), Relaxed);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Stores `entry` under `hash`, replacing any entry there whole, then
    /// evicts until the store is within its budget.
    pub fn insert(&self, hash: u64, entry: Entry) {
        let weight = entry.weight();
        if u64::from(weight) > self.max_bytes {
            return;
        }
        {
            let mut inner = write(&self.shard(hash).inner);
            let slot = Slot {
                hash,
                entry,
                weight,
                visited: AtomicBool::new(false),
            };
            let found = inner.table.entry(hash, |s| s.hash == hash, |s| s.hash);
            match found {
                hashbrown::hash_table::Entry::Occupied(mut occupied) => {
                    // A replaced entry (a refresh, a revalidation) keeps its
                    // second chance: it was read, or it would not have been
                    // refreshed. Without it the hand took hot keys as cold
                    // in the moment after their refresh (seen in the soak).
                    let visited = occupied.get().visited.load(Relaxed);
                    slot.visited.store(visited, Relaxed);
                    let old = std::mem::replace(occupied.get_mut(), slot);
                    self.bytes.fetch_sub(u64::from(old.weight), Relaxed);
                }
                hashbrown::hash_table::Entry::Vacant(vacant) => {
                    vacant.insert(slot);
                }
            }
            self.bytes.fetch_add(u64::from(weight), Relaxed);
        }
        self.evict_over_budget();
    }

    /// Removes the entry under `hash` if it is the one for `key_text`.
    pub fn remove(&self, hash: u64, key_text: &str) -> bool {
        let mut inner = write(&self.shard(hash).inner);
        match inner.remove_if(hash, |entry| entry.key() == key_text) {
            Some(old) => {
                self.bytes.fetch_sub(u64::from(old.weight), Relaxed);
                true
            }
            None => false,
        }
    }

    /// Evicts entries until the bytes fit the budget. The hand visits the
    /// shards in turn; in each it passes over visited entries (clearing their
    /// mark) and evicts the first unvisited one. After every shard has been
    /// passed once, every mark is clear, so the loop ends; it also gives up
    /// when the shards are empty or readers keep re-marking everything.
    fn evict_over_budget(&self) {
        let mut fruitless = 0;
        while self.bytes.load(Relaxed) > self.max_bytes && fruitless < SHARDS * 3 {
            let index = self.evict_cursor.fetch_add(1, Relaxed) % SHARDS;
            let mut inner = write(&self.shards[index].inner);
            match evict_one(&mut inner, Instant::now()) {
                Some(weight) => {
                    self.bytes.fetch_sub(weight, Relaxed);
                    self.evictions.fetch_add(1, Relaxed);
                    fruitless = 0;
                }
                None => fruitless += 1,
            }
        }
    }

    /// Removes, or with `soft` marks stale (see [`Entry::marked_stale`]),
    /// every entry whose key text `selects`. Returns how many.
    pub fn purge(&self, selects: impl Fn(&[u8]) -> bool, soft: bool, now: Instant) -> usize {
        let mut affected = 0;
        for shard in self.shards.iter() {
            let mut inner = write(&shard.inner);
            if soft {
                for slot in inner.table.iter_mut() {
                    if selects(slot.entry.key_bytes()) && now < slot.entry.evict_at() {
                        slot.entry = slot.entry.marked_stale(now);
                        affected += 1;
                    }
                }
            } else {
                let mut freed = 0;
                inner.table.retain(|slot| {
                    let keep = !selects(slot.entry.key_bytes());
                    if !keep {
                        freed += u64::from(slot.weight);
                        affected += 1;
                    }
                    keep
                });
                self.bytes.fetch_sub(freed, Relaxed);
            }
        }
        if !soft {
            self.prune_vary();
        }
        affected
    }

    /// Every entry that can still be served or revalidated at `now`, one
    /// shard's read lock at a time (a snapshot's contents).
    pub fn entries(&self, now: Instant) -> Vec<Entry> {
        let mut entries = Vec::with_capacity(usize::try_from(self.entry_count()).unwrap_or(0));
        for shard in self.shards.iter() {
            let inner = read(&shard.inner);
            entries.extend(
                inner
                    .table
                    .iter()
                    .filter(|slot| now < slot.entry.evict_at())
                    .map(|slot| slot.entry.clone()),
            );
        }
        entries
    }

    /// The budget in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Removes every entry that can no longer be served at `now`; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut inner = write(&shard.inner);
            let mut freed = 0;
            inner.table.retain(|slot| {
                let keep = now < slot.entry.evict_at();
                if !keep {
                    freed += u64::from(slot.weight);
                    removed += 1;
                }
                keep
            });
            self.bytes.fetch_sub(freed, Relaxed);
        }
        self.prune_vary();
        removed
    }

    /// Drops from the Vary index the variants no longer stored, and the
    /// records left without any.
    fn prune_vary(&self) {
        self.change_vary(|vary| {
            vary.prune(|hash| read(&self.shard(hash).inner).get(hash).is_some())
        });
    }

    /// Number of entries.
    pub fn entry_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| read(&s.inner).table.len() as u64)
            .sum()
    }

    /// Bytes charged against the budget.
    pub fn weighted_size(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// Entries evicted to stay within the budget.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
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

/// Moves this shard's CLOCK hand once around its buckets at most: evicts
/// the first entry that is unvisited (or unservable) and returns its weight,
/// or returns `None` having cleared every visited mark on the way.
fn evict_one(inner: &mut ShardInner, now: Instant) -> Option<u64> {
    let buckets = inner.table.num_buckets();
    for _ in 0..buckets {
        let index = inner.hand % buckets;
        inner.hand = index + 1;
        let Some(slot) = inner.table.get_bucket(index) else {
            continue; // an empty bucket
        };
        let unservable = now >= slot.entry.evict_at();
        if !unservable && slot.visited.swap(false, Relaxed) {
            continue;
        }
        let (slot, _) = inner.table.get_bucket_entry(index).ok()?.remove();
        return Some(u64::from(slot.weight));
    }
    None
}

/// Locks for reading; a poisoned lock (a panic while writing) still holds a
/// consistent map, since every write is a single map operation.
fn read(lock: &RwLock<ShardInner>) -> std::sync::RwLockReadGuard<'_, ShardInner> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write(lock: &RwLock<ShardInner>) -> std::sync::RwLockWriteGuard<'_, ShardInner> {
    lock.write().unwrap_or_else(|e| e.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vary_index_stays_within_its_share_of_the_budget() {
        let store = Store::new(1 << 20);
        let names = [HeaderName::from_static("accept-encoding")];
        for url in 0..100_000u64 {
            store.record_variant(url, &names, url.wrapping_mul(31) + 7);
        }
        assert!(
            store.vary_bytes() <= (1 << 20) / VARY_SHARE,
            "{}",
            store.vary_bytes()
        );
        assert!(store.vary_records() < 1_000, "{}", store.vary_records());
        assert_eq!(
            store.weighted_size(),
            store.vary_bytes(),
            "charged to the budget"
        );
        // No variant of any record is stored: the sweep drops them all.
        store.sweep(Instant::now());
        assert_eq!((store.vary_records(), store.vary_bytes()), (0, 0));
        assert_eq!(store.weighted_size(), 0);
    }
    use crate::cache::key::KeyHasher;
    use crate::cache::policy::Lifetimes;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use std::time::Duration;

    fn entry(key: &RequestKey<'_>, size: usize, now: Instant, fresh: Duration) -> Entry {
        let lifetimes = Lifetimes {
            fresh,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            initial_age: Duration::ZERO,
            keep_for_revalidation: Duration::ZERO,
        };
        Entry::new(
            &key.to_text(),
            StatusCode::OK,
            &HeaderMap::new(),
            &[Bytes::from(vec![0; size])],
            now,
            lifetimes,
        )
    }

    #[test]
    fn get_checks_the_key_and_the_instant() {
        let keys = KeyHasher::new();
        let store = Store::new(1 << 20);
        let now = Instant::now();
        let a = keys.key("h", "/a");
        store.insert(a.hash, entry(&a, 10, now, Duration::from_secs(5)));
        assert!(store.get(&a, now).is_some());
        assert!(
            store.get(&a, now + Duration::from_secs(5)).is_none(),
            "unservable"
        );
        // Same hash, other key text: never the other key's answer.
        let impostor = RequestKey {
            hash: a.hash,
            ..keys.key("h", "/b")
        };
        assert!(store.get(&impostor, now).is_none());
        assert!(store.remove(a.hash, "h/a"));
        assert!(store.get_exact(a.hash, b"h/a", now).is_none());
        assert!(store.get(&a, now).is_none());
        assert_eq!(store.weighted_size(), 0);
    }

    #[test]
    fn stays_within_its_budget_and_keeps_visited_entries() {
        let keys = KeyHasher::new();
        let now = Instant::now();
        let paths: Vec<String> = (0..400).map(|i| format!("/{i}")).collect();
        let hot = keys.key("h", "/hot");
        let one = entry(&hot, 1000, now, Duration::from_secs(60)).weight() as u64;
        let store = Store::new(one * 100);
        store.insert(hot.hash, entry(&hot, 1000, now, Duration::from_secs(60)));
        for path in &paths {
            let key = keys.key("h", path);
            store.insert(key.hash, entry(&key, 1000, now, Duration::from_secs(60)));
            // The hot key is read between inserts, as a popular key would be.
            assert!(store.get(&hot, now).is_some(), "the hot entry survives");
        }
        assert!(store.weighted_size() <= one * 100);
        assert!(store.entry_count() >= 90, "{}", store.entry_count());
        assert!(store.evictions() >= 300);
    }

    #[test]
    fn purge_hard_and_soft() {
        let keys = KeyHasher::new();
        let store = Store::new(1 << 20);
        let now = Instant::now();
        for path in ["/a/1", "/a/2", "/b/1"] {
            let key = keys.key("h", path);
            store.insert(key.hash, entry(&key, 10, now, Duration::from_secs(60)));
        }
        let soft = store.purge(|k| k.starts_with(b"h/a/"), true, now);
        assert_eq!(soft, 2);
        let a1 = keys.key("h", "/a/1");
        let marked = store.get(&a1, now).expect("still stored");
        assert!(marked.fresh_until() <= now, "stale from now on");
        assert_eq!(store.purge(|_| true, false, now), 3);
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.weighted_size(), 0);
    }

    #[test]
    fn sweep_removes_unservable_entries() {
        let keys = KeyHasher::new();
        let store = Store::new(1 << 20);
        let now = Instant::now();
        for i in 0..10 {
            let path = format!("/{i}");
            let key = keys.key("h", &path);
            let fresh = Duration::from_secs(if i < 4 { 1 } else { 60 });
            store.insert(key.hash, entry(&key, 10, now, fresh));
        }
        assert_eq!(store.sweep(now + Duration::from_secs(2)), 4);
        assert_eq!(store.entry_count(), 6);
    }

    #[test]
    fn eviction_skips_removed_entries_and_keeps_the_budget() {
        let keys = KeyHasher::new();
        let now = Instant::now();
        let probe = keys.key("h", "/probe");
        let one = u64::from(entry(&probe, 100, now, Duration::from_secs(60)).weight());
        let store = Store::new(one * 10);
        for round in 0..50 {
            for i in 0..10 {
                let path = format!("/{round}/{i}");
                let key = keys.key("h", &path);
                store.insert(key.hash, entry(&key, 100, now, Duration::from_secs(60)));
                if i % 3 == 0 {
                    store.remove(key.hash, &key.to_text());
                }
            }
            assert!(store.weighted_size() <= one * 10);
        }
        assert!(store.entry_count() >= 5, "{}", store.entry_count());
        assert!(store.evictions() > 0);
    }
}
