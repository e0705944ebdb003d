//! The cache: keys, stored entries, the pure rules about them, and the store.
//!
//! This module knows `http` types; it knows neither hyper's server
//! nor the upstream client.

pub mod entry;
pub mod key;
pub mod policy;
pub mod status_field;
pub mod store;
pub mod vary;

/// What the cache did for one answer. The same string goes into the
/// `X-Cache` header, the metric label and the log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// Fresh entry, served from memory.
    Hit,
    /// Stale entry served at once (a refresh was queued), or served because the backend failed.
    Stale,
    /// No entry: fetched from the backend (once per key, however many clients asked).
    Miss,
    /// Entry too old to serve: fetched from the backend before answering.
    Expired,
    /// Passed through and not stored (method, no-store, private, ...).
    Bypass,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 5] = [
        CacheStatus::Hit,
        CacheStatus::Stale,
        CacheStatus::Miss,
        CacheStatus::Expired,
        CacheStatus::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Stale => "STALE",
            CacheStatus::Miss => "MISS",
            CacheStatus::Expired => "EXPIRED",
            CacheStatus::Bypass => "BYPASS",
        }
    }

    /// Position in [`CacheStatus::ALL`], for counters kept in arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}
