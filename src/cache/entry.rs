//! One stored response and the instants that govern it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::policy::Lifetimes;

/// A stored response. Entries are immutable and shared as `Arc<Entry>`: a
/// refresh builds a new one and swaps it in whole, so a reader sees the old
/// entry or the new one, never a mix.
#[derive(Debug)]
pub struct Entry {
    /// The key text (`host` + `path?query`), compared on every lookup.
    pub key: Box<str>,
    pub status: StatusCode,
    /// The headers sent to clients: hop-by-hop headers removed,
    /// `Content-Length` set to the body's length. `Age`, `X-Cache` and
    /// `Cache-Status` are added per answer.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When this response was stored (or last refreshed).
    pub stored_at: Instant,
    /// The response's age when it was stored (the upstream's `Age`).
    pub initial_age: Duration,
    /// Served as fresh before this instant.
    pub fresh_until: Instant,
    /// Served stale (with a background refresh) before this instant.
    pub stale_until: Instant,
    /// Served stale when the backend fails before this instant.
    pub error_until: Instant,
    /// Validators for conditional requests.
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
}

impl Entry {
    /// Builds an entry stored at `now` with the given lifetimes.
    pub fn new(
        key: Box<str>,
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        now: Instant,
        lifetimes: Lifetimes,
    ) -> Entry {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let etag = headers.get(http::header::ETAG).cloned();
        let last_modified = headers.get(http::header::LAST_MODIFIED).cloned();
        // Fresh while its current age is below the freshness lifetime (RFC 9111 §4.2).
        let fresh_until = now + lifetimes.fresh.saturating_sub(lifetimes.initial_age);
        Entry {
            key,
            status,
            headers,
            body,
            stored_at: now,
            initial_age: lifetimes.initial_age,
            fresh_until,
            stale_until: fresh_until + lifetimes.stale_while_revalidate,
            error_until: fresh_until + lifetimes.stale_if_error,
            etag,
            last_modified,
        }
    }

    /// The age of the response at `now`: its age when stored plus the time since.
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    /// Seconds of freshness left at `now`, rounded up; negative once stale
    /// (as in `Cache-Status: ttl=`).
    pub fn ttl_secs(&self, now: Instant) -> i64 {
        if now < self.fresh_until {
            ceil_secs(self.fresh_until - now)
        } else {
            -ceil_secs(now - self.fresh_until)
        }
    }

    /// After this instant the entry can no longer be served at all.
    pub fn evict_at(&self) -> Instant {
        self.stale_until.max(self.error_until)
    }

    /// Bytes charged against the cache's budget: key, headers, body and a
    /// fixed overhead for the entry and the map's bookkeeping.
    pub fn weight(&self) -> u32 {
        const OVERHEAD: usize = 256;
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        let total = OVERHEAD + self.key.len() + headers + self.body.len();
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

fn ceil_secs(d: Duration) -> i64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}
