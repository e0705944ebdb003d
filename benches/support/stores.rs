//! What `benches/store_compare.rs`, `benches/lookup.rs` and
//! `examples/store_memory.rs` share: the entries they store (built as the
//! proxy builds them), and `quick_cache` set up as our [`Store`] would be
//! replaced by it (issue 17, item 6).
//!
//! Two ways of keying `quick_cache` are measured:
//! - [`QcByHash`]: keyed by the request key's hash (the proxy computes it
//!   for every request anyway), with the key text checked on the entry
//!   after the read. The same scheme as our store, so the same bytes per
//!   object apart from the two maps' own bookkeeping.
//! - [`QcByText`]: keyed by the key text itself (a `Box<str>`), hashed by
//!   `quick_cache`'s default hasher: the ordinary way to use it, paying a
//!   second copy of the key text and a second hash of it.
//!
//! Both charge an entry what our store charges it ([`Entry::weight`]).

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use swr_proxy::cache::entry::Entry;
use swr_proxy::cache::key::{KeyHasher, RequestKey};
use swr_proxy::cache::policy::{self, CacheControlMode, Defaults, RequestFacts, Storability};
use swr_proxy::cache::store::Store;

/// The budget of every store here.
pub const MAX_BYTES: u64 = 256 << 20;

/// The host of every key.
pub const HOST: &str = "127.0.0.1:8080";

/// The path of key `i`.
pub fn path(i: usize) -> String {
    let mut path = String::new();
    write_path(&mut path, i);
    path
}

/// Writes the path of key `i` into `out` (cleared first), without
/// allocating when `out` has room.
pub fn write_path(out: &mut String, i: usize) {
    use std::fmt::Write as _;
    out.clear();
    let _ = write!(out, "/rank?user={i}");
}

/// The caching rules every entry is stored by.
pub fn defaults() -> Defaults {
    Defaults {
        ttl: Duration::from_secs(3600),
        stale_while_revalidate: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(300),
        mode: CacheControlMode::Honor,
        targeted: http::HeaderName::from_static("swr-cache-control"),
        heuristic_percent: None,
    }
}

/// A backend response's headers, as a recommendations backend sends them.
pub fn response_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=60, stale-while-revalidate=300"),
    );
    headers.insert("etag", HeaderValue::from_static("\"r-8f2a91\""));
    headers.insert(
        "date",
        HeaderValue::from_static("Sat, 28 Nov 2026 12:00:00 GMT"),
    );
    headers
}

/// The response every entry stores: 1 KiB and [`response_headers`].
pub struct Response {
    headers: HeaderMap,
    lifetimes: policy::Lifetimes,
    body: Bytes,
}

impl Response {
    pub fn new() -> Response {
        let headers = response_headers();
        let defaults = defaults();
        let Storability::Store(lifetimes) = policy::storability(
            StatusCode::OK,
            &headers,
            RequestFacts::default(),
            Duration::ZERO,
            std::time::SystemTime::now(),
            &defaults,
        ) else {
            unreachable!("a plain 200 is storable")
        };
        Response {
            headers,
            lifetimes,
            body: Bytes::from(vec![b'x'; 1024]),
        }
    }

    /// The entry the proxy stores for this response under `key` (the body
    /// is copied into the entry's own allocation, as on a fill).
    pub fn entry(&self, key: &RequestKey<'_>, now: Instant) -> Entry {
        Entry::new(
            &key.to_text(),
            StatusCode::OK,
            &self.headers,
            std::slice::from_ref(&self.body),
            now,
            self.lifetimes,
        )
    }
}

impl Default for Response {
    fn default() -> Self {
        Response::new()
    }
}

/// Charges an entry what our store charges it.
#[derive(Clone, Copy)]
pub struct ChargedWeight;

impl<K> Weighter<K, Entry> for ChargedWeight {
    fn weight(&self, _key: &K, entry: &Entry) -> u64 {
        u64::from(entry.weight())
    }
}

/// A hasher for keys that are already hashes: the key is the hash.
#[derive(Clone, Copy, Default)]
pub struct HashIsKey;

impl BuildHasher for HashIsKey {
    type Hasher = KeyHash;

    fn build_hasher(&self) -> KeyHash {
        KeyHash(0)
    }
}

pub struct KeyHash(u64);

impl Hasher for KeyHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; this is never reached.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

pub type QcByHash =
    Cache<u64, Entry, ChargedWeight, HashIsKey, quick_cache::sync::DefaultLifecycle<u64, Entry>>;
pub type QcByText = Cache<Box<str>, Entry, ChargedWeight>;

/// How many entries `quick_cache` is told to expect: the budget over one
/// entry's weight (it sizes its shards and its ghost list from this; it
/// allocates nothing up front).
pub fn estimated_items(entry_weight: u32) -> usize {
    (MAX_BYTES / u64::from(entry_weight.max(1))) as usize
}

pub fn qc_by_hash(entry_weight: u32) -> QcByHash {
    Cache::with(
        estimated_items(entry_weight),
        MAX_BYTES,
        ChargedWeight,
        HashIsKey,
        Default::default(),
    )
}

pub fn qc_by_text(entry_weight: u32) -> QcByText {
    Cache::with_weighter(estimated_items(entry_weight), MAX_BYTES, ChargedWeight)
}

/// A read of [`QcByHash`] with what our store checks on a read: the key
/// text, and that the entry can still be served at `now`.
#[inline]
pub fn get_by_hash(cache: &QcByHash, key: &RequestKey<'_>, now: Instant) -> Option<Entry> {
    cache
        .get(&key.hash)
        .filter(|entry| key.matches(entry.key_bytes()) && now < entry.evict_at())
}

/// A read of [`QcByText`] with what our store checks on a read (the map
/// has compared the key text).
#[inline]
pub fn get_by_text(cache: &QcByText, text: &str, now: Instant) -> Option<Entry> {
    cache.get(text).filter(|entry| now < entry.evict_at())
}

/// One of the stores compared, filled the same way.
pub enum AnyStore {
    Ours(Store),
    ByHash(QcByHash),
    ByText(QcByText),
}

impl AnyStore {
    /// The names the memory example takes.
    pub const NAMES: [&'static str; 3] = ["store", "qc-hash", "qc-text"];

    pub fn new(name: &str, entry_weight: u32) -> Option<AnyStore> {
        match name {
            "store" => Some(AnyStore::Ours(Store::new(MAX_BYTES))),
            "qc-hash" => Some(AnyStore::ByHash(qc_by_hash(entry_weight))),
            "qc-text" => Some(AnyStore::ByText(qc_by_text(entry_weight))),
            _ => None,
        }
    }

    pub fn insert(&self, key: &RequestKey<'_>, entry: Entry) {
        match self {
            AnyStore::Ours(store) => store.insert(key.hash, entry),
            AnyStore::ByHash(cache) => cache.insert(key.hash, entry),
            AnyStore::ByText(cache) => cache.insert(key.to_text(), entry),
        }
    }

    pub fn get(&self, key: &RequestKey<'_>, now: Instant) -> Option<Entry> {
        match self {
            AnyStore::Ours(store) => store.get(key, now),
            AnyStore::ByHash(cache) => get_by_hash(cache, key, now),
            AnyStore::ByText(cache) => get_by_text(cache, &key.to_text(), now),
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            AnyStore::Ours(store) => store.entry_count(),
            AnyStore::ByHash(cache) => cache.len() as u64,
            AnyStore::ByText(cache) => cache.len() as u64,
        }
    }

    /// Bytes charged against the budget.
    pub fn charged(&self) -> u64 {
        match self {
            AnyStore::Ours(store) => store.weighted_size(),
            AnyStore::ByHash(cache) => cache.weight(),
            AnyStore::ByText(cache) => cache.weight(),
        }
    }
}

/// The weight of one entry of this shape (all keys here are about as long).
pub fn entry_weight(response: &Response, keys: &KeyHasher) -> u32 {
    let path = path(0);
    response
        .entry(&keys.key(HOST, &path), Instant::now())
        .weight()
}
