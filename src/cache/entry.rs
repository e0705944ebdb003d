//! One stored response and the instants that govern it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::policy::Lifetimes;

/// A stored response. Entries are immutable and shared as `Arc<Entry>`: a
/// refresh builds a new one and swaps it in whole, so a reader sees the old
/// entry or the new one, never a mix.
///
/// The key text, every header value and the body live in one allocation
/// (`blob`); header values and the body are slices of it. That saves an
/// allocation per header and per body, and keeps what a hit touches close.
#[derive(Debug, Clone)]
pub struct Entry {
    blob: Bytes,
    key_len: usize,
    body_start: usize,
    pub status: StatusCode,
    /// The headers sent to clients: hop-by-hop headers removed,
    /// `Content-Length` set to the body's length. `Age`, `X-Cache` and
    /// `Cache-Status` are added per answer. A boxed slice, not a `HeaderMap`:
    /// a map keeps spare capacity (600 bytes for four headers), and each
    /// answer builds its own map anyway.
    headers: Box<[(HeaderName, HeaderValue)]>,
    /// When this response was stored (or last refreshed).
    pub stored_at: Instant,
    /// The response's age when it was stored (see [`Lifetimes::initial_age`]).
    pub initial_age: Duration,
    /// Served as fresh before this instant.
    pub fresh_until: Instant,
    /// Served stale (with a background refresh) before this instant.
    pub stale_until: Instant,
    /// Served stale when the backend fails before this instant.
    pub error_until: Instant,
    /// Kept (for revalidation or stale-if-error) until this instant.
    pub keep_until: Instant,
}

impl Entry {
    /// Builds an entry stored at `now` with the given lifetimes. `headers`
    /// are the response's headers, hop-by-hop ones already removed; the body
    /// comes as the chunks it was read in.
    pub fn new(
        key: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[Bytes],
        now: Instant,
        lifetimes: Lifetimes,
    ) -> Entry {
        let body_len: usize = body.iter().map(Bytes::len).sum();
        let content_length = body_len.to_string();
        let values_len: usize = headers.values().map(HeaderValue::len).sum();
        let mut blob = Vec::with_capacity(key.len() + values_len + content_length.len() + body_len);
        blob.extend_from_slice(key.as_bytes());
        let mut ranges = Vec::with_capacity(headers.len() + 1);
        for (name, value) in headers {
            if name == CONTENT_LENGTH {
                continue;
            }
            let start = blob.len();
            blob.extend_from_slice(value.as_bytes());
            ranges.push((name.clone(), start, blob.len(), value.is_sensitive()));
        }
        let start = blob.len();
        blob.extend_from_slice(content_length.as_bytes());
        ranges.push((CONTENT_LENGTH, start, blob.len(), false));
        let body_start = blob.len();
        for chunk in body {
            blob.extend_from_slice(chunk);
        }
        let blob = Bytes::from(blob);

        let stored: Box<[(HeaderName, HeaderValue)]> = ranges
            .into_iter()
            .filter_map(|(name, start, end, sensitive)| {
                // The bytes were a valid value a moment ago; a failure here
                // would be a bug, and the header is dropped rather than the
                // request failed.
                let mut value = HeaderValue::from_maybe_shared(blob.slice(start..end)).ok()?;
                value.set_sensitive(sensitive);
                Some((name, value))
            })
            .collect();

        // Fresh while its current age is below the freshness lifetime (RFC 9111 §4.2).
        let fresh_until = now + lifetimes.fresh.saturating_sub(lifetimes.initial_age);
        let stale_until = fresh_until + lifetimes.stale_while_revalidate;
        let error_until = fresh_until + lifetimes.stale_if_error;
        let keep_until = stale_until
            .max(error_until)
            .max(fresh_until + lifetimes.keep_for_revalidation);
        Entry {
            blob,
            key_len: key.len(),
            body_start,
            status,
            headers: stored,
            stored_at: now,
            initial_age: lifetimes.initial_age,
            fresh_until,
            stale_until,
            error_until,
            keep_until,
        }
    }

    /// The key text: `host` + `path?query`.
    pub fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).unwrap_or("")
    }

    pub fn key_bytes(&self) -> &[u8] {
        &self.blob[..self.key_len]
    }

    /// The body, shared by reference count.
    pub fn body(&self) -> Bytes {
        self.blob.slice(self.body_start..)
    }

    pub fn body_len(&self) -> usize {
        self.blob.len() - self.body_start
    }

    /// The stored headers as a map for one answer, with room for `extra` more.
    pub fn header_map(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len() + extra);
        for (name, value) in self.headers.iter() {
            map.append(name.clone(), value.clone());
        }
        map
    }

    /// The first stored value of a header.
    pub fn header(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Every stored header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.headers.iter().map(|(n, v)| (n, v))
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

    /// After this instant the entry can no longer be served nor revalidated.
    pub fn evict_at(&self) -> Instant {
        self.keep_until
    }

    pub fn etag(&self) -> Option<&HeaderValue> {
        self.header(&http::header::ETAG)
    }

    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.header(&http::header::LAST_MODIFIED)
    }

    /// A copy of this entry that is stale from `now` on (a soft purge): served
    /// stale, with a refresh, for as long a window as it had; an entry with
    /// no such window is expired and fetched (coalesced) by the next request.
    pub fn marked_stale(&self, now: Instant) -> Entry {
        let window = self.stale_until.saturating_duration_since(self.fresh_until);
        let mut entry = self.clone();
        entry.fresh_until = self.fresh_until.min(now);
        entry.stale_until = entry.fresh_until + window;
        entry.error_until = self.error_until.max(entry.stale_until);
        entry.keep_until = self.keep_until.max(entry.error_until);
        entry
    }

    /// The headers of this entry updated with those of a `304 Not Modified`
    /// (RFC 9111 §4.3.4): each field in the 304 replaces the stored one,
    /// except the body's framing.
    pub fn renewed_headers(&self, not_modified: &HeaderMap) -> HeaderMap {
        let mut merged = self.header_map(0);
        merged.remove(CONTENT_LENGTH);
        let mut replaced: Vec<&HeaderName> = Vec::new();
        for (name, value) in not_modified {
            if name == CONTENT_LENGTH || name == http::header::CONTENT_TYPE {
                continue;
            }
            if !replaced.contains(&name) {
                merged.remove(name);
                replaced.push(name);
            }
            merged.append(name.clone(), value.clone());
        }
        merged
    }

    /// Bytes charged against the cache's budget: the blob (key, header
    /// values, body), the header map, the entry and the map's bookkeeping.
    pub fn weight(&self) -> u32 {
        const OVERHEAD: usize = 256;
        const PER_HEADER: usize = 72;
        let total = OVERHEAD + self.blob.len() + self.headers.len() * PER_HEADER;
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

fn ceil_secs(d: Duration) -> i64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}
