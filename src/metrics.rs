//! Counters of what the proxy did, in one place. Every bypass, drop and
//! failure is counted here under the same name its log line uses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::cache::policy::BypassReason;
use crate::cache::CacheStatus;
use crate::error::UpstreamErrorKind;

/// Why the proxy contacted the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamCause {
    /// A miss or an expired entry (the coalesced fill).
    Miss,
    /// A background refresh of a stale entry.
    Refresh,
    /// A request passed through (method, or a response that may not be shared).
    Pass,
    /// A conditional fetch of a stored entry (If-None-Match / If-Modified-Since).
    Revalidate,
}

impl UpstreamCause {
    pub const ALL: [UpstreamCause; 4] = [
        UpstreamCause::Miss,
        UpstreamCause::Refresh,
        UpstreamCause::Pass,
        UpstreamCause::Revalidate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamCause::Miss => "miss",
            UpstreamCause::Refresh => "refresh",
            UpstreamCause::Pass => "pass",
            UpstreamCause::Revalidate => "revalidate",
        }
    }
}

/// The proxy's counters. Relaxed atomics: each is read on its own.
#[derive(Debug, Default)]
pub struct Stats {
    requests: [AtomicU64; CacheStatus::ALL.len()],
    bypasses: [AtomicU64; BypassReason::ALL.len()],
    upstream_requests: [AtomicU64; UpstreamCause::ALL.len()],
    upstream_errors: [AtomicU64; UpstreamErrorKind::ALL.len()],
    pub refresh_queued: AtomicU64,
    pub refresh_dropped: AtomicU64,
    pub refresh_succeeded: AtomicU64,
    pub refresh_failed: AtomicU64,
    /// Refreshes whose backend answer may not be stored: the entry is removed.
    pub refresh_not_storable: AtomicU64,
    /// Refreshes running now (a gauge).
    pub refresh_in_flight: AtomicU64,
    /// Most refreshes ever running at once.
    pub refresh_in_flight_max: AtomicU64,
    /// Requests that waited on another request's fill instead of fetching.
    pub coalesced_waiters: AtomicU64,
    /// Answers served from a stale entry because the backend failed.
    pub stale_if_error_served: AtomicU64,
    /// Entries renewed by a 304 from the backend.
    pub revalidated: AtomicU64,
    /// Body bytes the backend did not have to send thanks to a 304.
    pub revalidation_bytes_saved: AtomicU64,
    /// Entries removed after a successful POST/PUT/DELETE/PATCH.
    pub invalidations: AtomicU64,
    /// 304 answers the cache gave to clients' conditional requests.
    pub not_modified_served: AtomicU64,
}

impl Stats {
    pub fn record_request(&self, status: CacheStatus) {
        self.requests[status.index()].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, status: CacheStatus) -> u64 {
        self.requests[status.index()].load(Relaxed)
    }

    pub fn record_bypass(&self, reason: BypassReason) {
        self.bypasses[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn bypasses(&self, reason: BypassReason) -> u64 {
        self.bypasses[reason.index()].load(Relaxed)
    }

    pub fn record_upstream_request(&self, cause: UpstreamCause) {
        self.upstream_requests[cause as usize].fetch_add(1, Relaxed);
    }

    pub fn upstream_requests(&self, cause: UpstreamCause) -> u64 {
        self.upstream_requests[cause as usize].load(Relaxed)
    }

    pub fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn upstream_errors(&self, kind: UpstreamErrorKind) -> u64 {
        self.upstream_errors[kind.index()].load(Relaxed)
    }

    /// Marks a refresh as started; returns a token that marks it ended on drop.
    pub fn refresh_started(&self) -> InFlight<'_> {
        let now = self.refresh_in_flight.fetch_add(1, Relaxed) + 1;
        self.refresh_in_flight_max.fetch_max(now, Relaxed);
        InFlight(&self.refresh_in_flight)
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

/// Decrements a gauge when dropped.
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters live in arrays indexed by the enums: each `ALL` must list
    /// every variant at its own index.
    #[test]
    fn label_arrays_cover_every_variant() {
        for (i, c) in UpstreamCause::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, r) in BypassReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, s) in CacheStatus::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
        for (i, k) in UpstreamErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        assert_eq!(
            UpstreamCause::Revalidate as usize,
            UpstreamCause::ALL.len() - 1
        );
        assert_eq!(
            BypassReason::NotModified.index(),
            BypassReason::ALL.len() - 1
        );
    }
}
