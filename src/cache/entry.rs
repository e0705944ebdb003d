//! One stored response and the instants that govern it, in one allocation.
//!
//! Memory is the budget that decides how many answers fit, so an entry is a
//! single `Arc<[u8]>`: a fixed header of instants and lengths, then the key
//! text, the response headers (a standard name as one byte, then the value),
//! and the body. 100,000 objects of 1 KiB with two headers take 1,274 B
//! each in a store alone (key, headers, instants, allocation and map slot),
//! against about 1,620 B when the headers were `(HeaderName, HeaderValue)`
//! pairs, the instants `Instant`s and the entry a second allocation.
//!
//! A hit wraps the entry in one `Bytes` owner (one small allocation, with a
//! reference count of its own) and hands out slices of it for the header
//! values and the body. The entry's shared count is touched by the lookup and
//! by that owner, however many headers the entry has, which matters when one
//! hot key is served by every core at once.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, CONTENT_LENGTH};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::policy::Lifetimes;

/// A stored response. Entries are immutable and cheap to clone (a reference
/// count): a refresh builds a new one and swaps it in whole, so a reader sees
/// the old entry or the new one, never a mix.
#[derive(Clone)]
pub struct Entry {
    data: Arc<[u8]>,
}

// The fixed header at the start of `data`, little-endian.
const STORED_AT: usize = 0; // i64 nanoseconds from `epoch()`
const INITIAL_AGE: usize = 8; // u64 nanoseconds
const FRESH_UNTIL: usize = 16; // i64 nanoseconds from `epoch()`, as the next three
const STALE_UNTIL: usize = 24;
const ERROR_UNTIL: usize = 32;
const KEEP_UNTIL: usize = 40;
const STATUS: usize = 48; // u16
const HEADER_COUNT: usize = 50; // u16
const KEY_LEN: usize = 52; // u32
const BODY_START: usize = 56; // u64
const KEY_START: usize = 64;

/// A header's name byte for a name outside [`KNOWN`]: the name follows as a
/// u16 length and its bytes.
const CUSTOM_NAME: u8 = u8::MAX;
/// The top bit of a value's u32 length marks a sensitive value.
const SENSITIVE: u32 = 1 << 31;

/// Response header names stored as one byte (their index here).
static KNOWN: [HeaderName; 46] = [
    header::ACCEPT_RANGES,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
    header::AGE,
    header::ALLOW,
    header::ALT_SVC,
    header::CACHE_CONTROL,
    header::CACHE_STATUS,
    header::CDN_CACHE_CONTROL,
    header::CONTENT_DISPOSITION,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LENGTH,
    header::CONTENT_LOCATION,
    header::CONTENT_RANGE,
    header::CONTENT_SECURITY_POLICY,
    header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
    header::CONTENT_TYPE,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::LINK,
    header::LOCATION,
    header::PRAGMA,
    header::PROXY_AUTHENTICATE,
    header::REFERRER_POLICY,
    header::REFRESH,
    header::RETRY_AFTER,
    header::SERVER,
    header::SET_COOKIE,
    header::STRICT_TRANSPORT_SECURITY,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::VARY,
    header::VIA,
    header::WARNING,
    header::WWW_AUTHENTICATE,
    header::X_CONTENT_TYPE_OPTIONS,
    header::X_FRAME_OPTIONS,
    header::X_XSS_PROTECTION,
];

/// The largest [`Entry::age_ratio`].
pub const MAX_AGE_RATIO: f64 = 1000.0;

/// The instant entries count from. Instants before it (a test's `now`
/// taken earlier) are stored as negative offsets.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn to_offset(at: Instant) -> i64 {
    let e = epoch();
    let clamp = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    if at >= e {
        clamp(at - e)
    } else {
        -clamp(e - at)
    }
}

fn from_offset(nanos: i64) -> Instant {
    let e = epoch();
    let d = Duration::from_nanos(nanos.unsigned_abs());
    let at = if nanos >= 0 {
        e.checked_add(d)
    } else {
        e.checked_sub(d)
    };
    at.unwrap_or(e)
}

/// `at + d`, saturating far in the future instead of overflowing.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| from_offset(i64::MAX).max(at))
}

impl Entry {
    /// Builds an entry stored at `now` with the given lifetimes. `headers`
    /// are the response's headers, hop-by-hop ones already removed
    /// (`Content-Length` is set to the body's length); the body comes as the
    /// chunks it was read in.
    pub fn new(
        key: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[Bytes],
        now: Instant,
        lifetimes: Lifetimes,
    ) -> Entry {
        // Fresh while its current age is below the freshness lifetime (RFC 9111 §4.2).
        let fresh_until = later(now, lifetimes.fresh.saturating_sub(lifetimes.initial_age));
        let stale_until = later(fresh_until, lifetimes.stale_while_revalidate);
        let error_until = later(fresh_until, lifetimes.stale_if_error);
        let keep_until = stale_until
            .max(error_until)
            .max(later(fresh_until, lifetimes.keep_for_revalidation));
        let instants = Instants {
            stored_at: now,
            initial_age: lifetimes.initial_age,
            fresh_until,
            stale_until,
            error_until,
            keep_until,
        };
        Entry::build(key, status, headers, body, instants)
    }

    /// Builds an entry with the given instants (an entry another process
    /// stored, in fleet mode).
    pub fn with_instants(
        key: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[Bytes],
        instants: Instants,
    ) -> Entry {
        Entry::build(key, status, headers, body, instants)
    }

    /// The instants this entry was built with.
    pub fn instants(&self) -> Instants {
        Instants {
            stored_at: self.stored_at(),
            initial_age: self.initial_age(),
            fresh_until: self.fresh_until(),
            stale_until: self.stale_until(),
            error_until: self.error_until(),
            keep_until: self.evict_at(),
        }
    }

    fn build(
        key: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[Bytes],
        at: Instants,
    ) -> Entry {
        let body_len: usize = body.iter().map(Bytes::len).sum();
        let content_length = body_len.to_string();
        let headers_len: usize = headers
            .iter()
            .map(|(name, value)| 8 + name.as_str().len() + value.len())
            .sum();
        let mut data = Vec::with_capacity(
            KEY_START + key.len() + headers_len + content_length.len() + 8 + body_len,
        );
        let initial_age = u64::try_from(at.initial_age.as_nanos()).unwrap_or(u64::MAX);
        data.extend_from_slice(&to_offset(at.stored_at).to_le_bytes());
        data.extend_from_slice(&initial_age.to_le_bytes());
        for instant in [
            at.fresh_until,
            at.stale_until,
            at.error_until,
            at.keep_until,
        ] {
            data.extend_from_slice(&to_offset(instant).to_le_bytes());
        }
        data.extend_from_slice(&status.as_u16().to_le_bytes());
        data.extend_from_slice(&[0; 2]); // header count, set below
        let key_len = u32::try_from(key.len()).unwrap_or(u32::MAX);
        data.extend_from_slice(&key_len.to_le_bytes());
        data.extend_from_slice(&[0; 8]); // body start, set below
        data.extend_from_slice(&key.as_bytes()[..key_len as usize]);

        let mut count: u16 = 0;
        let stored = headers
            .iter()
            .filter(|(name, _)| *name != CONTENT_LENGTH)
            .map(|(name, value)| (name, value.as_bytes(), value.is_sensitive()));
        let length = (&CONTENT_LENGTH, content_length.as_bytes(), false);
        for (name, value, sensitive) in stored.chain(std::iter::once(length)) {
            // A value of 2 GiB or a name of 64 KiB cannot come from a
            // backend (hyper's header limits are far below); skip rather
            // than store a truncated one.
            let (Ok(value_len), Ok(name_len)) = (
                u32::try_from(value.len()),
                u16::try_from(name.as_str().len()),
            ) else {
                continue;
            };
            if value_len >= SENSITIVE || count == u16::MAX {
                continue;
            }
            match KNOWN.iter().position(|known| known == name) {
                Some(index) => data.push(index as u8),
                None => {
                    data.push(CUSTOM_NAME);
                    data.extend_from_slice(&name_len.to_le_bytes());
                    data.extend_from_slice(name.as_str().as_bytes());
                }
            }
            let flagged = if sensitive {
                value_len | SENSITIVE
            } else {
                value_len
            };
            data.extend_from_slice(&flagged.to_le_bytes());
            data.extend_from_slice(value);
            count += 1;
        }
        let body_start = data.len() as u64;
        for chunk in body {
            data.extend_from_slice(chunk);
        }
        data[HEADER_COUNT..HEADER_COUNT + 2].copy_from_slice(&count.to_le_bytes());
        data[BODY_START..BODY_START + 8].copy_from_slice(&body_start.to_le_bytes());
        Entry {
            data: Arc::from(data),
        }
    }

    fn u16_at(&self, at: usize) -> u16 {
        let mut bytes = [0; 2];
        bytes.copy_from_slice(&self.data[at..at + 2]);
        u16::from_le_bytes(bytes)
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&self.data[at..at + 8]);
        u64::from_le_bytes(bytes)
    }

    fn instant_at(&self, at: usize) -> Instant {
        from_offset(self.u64_at(at) as i64)
    }

    fn key_len(&self) -> usize {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(&self.data[KEY_LEN..KEY_LEN + 4]);
        u32::from_le_bytes(bytes) as usize
    }

    fn body_start(&self) -> usize {
        usize::try_from(self.u64_at(BODY_START)).unwrap_or(self.data.len())
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.u16_at(STATUS)).unwrap_or(StatusCode::OK)
    }

    /// When this response was stored (or last refreshed).
    pub fn stored_at(&self) -> Instant {
        self.instant_at(STORED_AT)
    }

    /// The response's age when it was stored (see [`Lifetimes::initial_age`]).
    pub fn initial_age(&self) -> Duration {
        Duration::from_nanos(self.u64_at(INITIAL_AGE))
    }

    /// Served as fresh before this instant.
    pub fn fresh_until(&self) -> Instant {
        self.instant_at(FRESH_UNTIL)
    }

    /// Served stale (with a background refresh) before this instant.
    pub fn stale_until(&self) -> Instant {
        self.instant_at(STALE_UNTIL)
    }

    /// Served stale when the backend fails before this instant.
    pub fn error_until(&self) -> Instant {
        self.instant_at(ERROR_UNTIL)
    }

    /// After this instant the entry can no longer be served nor revalidated.
    pub fn evict_at(&self) -> Instant {
        self.instant_at(KEEP_UNTIL)
    }

    /// The key text: `host` + `path?query`.
    pub fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).unwrap_or("")
    }

    pub fn key_bytes(&self) -> &[u8] {
        let len = self.key_len();
        &self.data[KEY_START..KEY_START + len]
    }

    pub fn body_len(&self) -> usize {
        self.data.len() - self.body_start()
    }

    /// The body, shared by reference count.
    pub fn body(&self) -> Bytes {
        let start = self.body_start();
        self.shared().slice(start..)
    }

    /// The entry as one `Bytes` that header values and the body are sliced from.
    fn shared(&self) -> Bytes {
        Bytes::from_owner(Data(Arc::clone(&self.data)))
    }

    /// Every stored header as `(name, value range in data, sensitive)`.
    fn header_ranges(&self) -> HeaderRanges<'_> {
        HeaderRanges(self.raw_headers())
    }

    fn raw_headers(&self) -> RawHeaders<'_> {
        RawHeaders {
            data: &self.data,
            at: KEY_START + self.key_len(),
            left: self.u16_at(HEADER_COUNT),
        }
    }

    /// Every stored header as the bytes of its (lowercase) name and value,
    /// in stored order, for writing an answer without a header map.
    pub fn wire_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let data = &self.data[..];
        self.raw_headers().map(move |(name, range, _)| {
            let name = match name {
                RawName::Known(name) => name.as_str().as_bytes(),
                RawName::Custom(bytes) => &data[bytes],
            };
            (name, &data[range])
        })
    }

    /// What an answer from this entry sends: the stored headers as a map
    /// with room for `extra` more, and the body. Both share this entry's
    /// bytes; nothing is copied.
    pub fn answer(&self, extra: usize) -> (HeaderMap, Bytes) {
        let shared = self.shared();
        let headers = self.headers_in(&shared, extra);
        (headers, shared.slice(self.body_start()..))
    }

    /// The stored headers as a map for one answer, with room for `extra` more.
    pub fn header_map(&self, extra: usize) -> HeaderMap {
        self.headers_in(&self.shared(), extra)
    }

    /// The stored headers as a map of slices of `shared` (this entry's bytes).
    fn headers_in(&self, shared: &Bytes, extra: usize) -> HeaderMap {
        let ranges = self.header_ranges();
        let mut map = HeaderMap::with_capacity(usize::from(ranges.0.left) + extra);
        for (name, range, sensitive) in ranges {
            // The bytes were a valid value when stored; should one not be,
            // the header is dropped rather than the answer failed.
            if let Ok(mut value) = HeaderValue::from_maybe_shared(shared.slice(range)) {
                value.set_sensitive(sensitive);
                map.append(name, value);
            }
        }
        map
    }

    /// The first stored value of a header, as text.
    pub fn header_str(&self, name: &HeaderName) -> Option<&str> {
        self.header_ranges()
            .find(|(n, _, _)| n == name)
            .and_then(|(_, range, _)| std::str::from_utf8(&self.data[range]).ok())
    }

    /// The first stored value of a header.
    pub fn header(&self, name: &HeaderName) -> Option<HeaderValue> {
        let (_, range, _) = self.header_ranges().find(|(n, _, _)| n == name)?;
        HeaderValue::from_bytes(&self.data[range]).ok()
    }

    pub fn etag(&self) -> Option<HeaderValue> {
        self.header(&header::ETAG)
    }

    pub fn last_modified(&self) -> Option<HeaderValue> {
        self.header(&header::LAST_MODIFIED)
    }

    /// The age of the response at `now`: its age when stored plus the time since.
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age() + now.saturating_duration_since(self.stored_at())
    }

    /// The freshness lifetime: the age up to which the response is fresh.
    pub fn lifetime(&self) -> Duration {
        self.initial_age()
            + self
                .fresh_until()
                .saturating_duration_since(self.stored_at())
    }

    /// `age` over the freshness lifetime: below 1 fresh, above 1 stale;
    /// at most [`MAX_AGE_RATIO`] (which a lifetime of zero gives).
    pub fn age_ratio(&self, age: Duration) -> f64 {
        let lifetime = self.lifetime().as_secs_f64();
        if lifetime <= 0.0 {
            return MAX_AGE_RATIO;
        }
        (age.as_secs_f64() / lifetime).min(MAX_AGE_RATIO)
    }

    /// Seconds of freshness left at `now`, rounded up; negative once stale
    /// (as in `Cache-Status: ttl=`).
    pub fn ttl_secs(&self, now: Instant) -> i64 {
        let fresh_until = self.fresh_until();
        if now < fresh_until {
            ceil_secs(fresh_until - now)
        } else {
            -ceil_secs(now - fresh_until)
        }
    }

    /// A copy of this entry that is stale from `now` on (a soft purge): served
    /// stale, with a refresh, for as long a window as it had; an entry with
    /// no such window is expired and fetched (coalesced) by the next request.
    pub fn marked_stale(&self, now: Instant) -> Entry {
        let window = self
            .stale_until()
            .saturating_duration_since(self.fresh_until());
        let fresh_until = self.fresh_until().min(now);
        let stale_until = later(fresh_until, window);
        let error_until = self.error_until().max(stale_until);
        let keep_until = self.evict_at().max(error_until);
        let mut data = self.data.to_vec();
        for (at, instant) in [
            (FRESH_UNTIL, fresh_until),
            (STALE_UNTIL, stale_until),
            (ERROR_UNTIL, error_until),
            (KEEP_UNTIL, keep_until),
        ] {
            data[at..at + 8].copy_from_slice(&to_offset(instant).to_le_bytes());
        }
        Entry {
            data: Arc::from(data),
        }
    }

    /// The headers of this entry updated with those of a `304 Not Modified`
    /// (RFC 9111 §4.3.4): each field in the 304 replaces the stored one,
    /// except the body's framing.
    pub fn renewed_headers(&self, not_modified: &HeaderMap) -> HeaderMap {
        let mut merged = self.header_map(0);
        merged.remove(CONTENT_LENGTH);
        let mut replaced: Vec<&HeaderName> = Vec::new();
        for (name, value) in not_modified {
            if name == CONTENT_LENGTH || name == header::CONTENT_TYPE {
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

    /// Bytes charged against the cache's budget: the entry's bytes, their
    /// allocation and the map's bookkeeping.
    pub fn weight(&self) -> u32 {
        const OVERHEAD: usize = 64;
        u32::try_from(OVERHEAD + self.data.len()).unwrap_or(u32::MAX)
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key())
            .field("status", &self.status())
            .field("body_len", &self.body_len())
            .finish_non_exhaustive()
    }
}

/// The instants an entry is built with, and what [`Entry::instants`]
/// gives back: fleet mode carries them to other processes as wall-clock
/// times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instants {
    pub stored_at: Instant,
    pub initial_age: Duration,
    pub fresh_until: Instant,
    pub stale_until: Instant,
    pub error_until: Instant,
    pub keep_until: Instant,
}

/// An entry's bytes as the owner of a `Bytes`.
struct Data(Arc<[u8]>);

impl AsRef<[u8]> for Data {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Walks the stored headers, with their names as [`HeaderName`]s.
struct HeaderRanges<'a>(RawHeaders<'a>);

impl Iterator for HeaderRanges<'_> {
    type Item = (HeaderName, std::ops::Range<usize>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, range, sensitive) = self.0.next()?;
        let name = match name {
            RawName::Known(name) => name.clone(),
            RawName::Custom(bytes) => HeaderName::from_bytes(&self.0.data[bytes]).ok()?,
        };
        Some((name, range, sensitive))
    }
}

/// A stored header's name: one of [`KNOWN`], or the range of its bytes.
enum RawName {
    Known(&'static HeaderName),
    Custom(std::ops::Range<usize>),
}

/// Walks the stored headers as stored: names not parsed again.
struct RawHeaders<'a> {
    data: &'a [u8],
    at: usize,
    left: u16,
}

impl Iterator for RawHeaders<'_> {
    type Item = (RawName, std::ops::Range<usize>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let data = self.data;
        let tag = *data.get(self.at)?;
        self.at += 1;
        let name = if tag == CUSTOM_NAME {
            let len = usize::from(u16::from_le_bytes([
                *data.get(self.at)?,
                *data.get(self.at + 1)?,
            ]));
            let bytes = self.at + 2..self.at + 2 + len;
            data.get(bytes.clone())?;
            self.at += 2 + len;
            RawName::Custom(bytes)
        } else {
            RawName::Known(KNOWN.get(usize::from(tag))?)
        };
        let mut len = [0; 4];
        len.copy_from_slice(data.get(self.at..self.at + 4)?);
        let flagged = u32::from_le_bytes(len);
        let start = self.at + 4;
        let end = start + (flagged & !SENSITIVE) as usize;
        if end > data.len() {
            return None;
        }
        self.at = end;
        Some((name, start..end, flagged & SENSITIVE != 0))
    }
}

fn ceil_secs(d: Duration) -> i64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifetimes(fresh: u64) -> Lifetimes {
        Lifetimes {
            fresh: Duration::from_secs(fresh),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(300),
            initial_age: Duration::from_millis(1500),
            keep_for_revalidation: Duration::from_secs(600),
        }
    }

    #[test]
    fn round_trips_headers_body_and_instants() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.append("x-gen", HeaderValue::from_static("7"));
        headers.append("x-gen", HeaderValue::from_static("8"));
        let mut secret = HeaderValue::from_static("s3cr3t");
        secret.set_sensitive(true);
        headers.insert("x-token", secret);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        let body = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")];
        // Before the epoch is first read, so negative offsets are exercised too.
        let now = Instant::now();
        let entry = Entry::new(
            "h/p?q",
            StatusCode::NOT_FOUND,
            &headers,
            &body,
            now,
            lifetimes(10),
        );

        assert_eq!(entry.key(), "h/p?q");
        assert_eq!(entry.status(), StatusCode::NOT_FOUND);
        assert_eq!(entry.stored_at(), now);
        assert_eq!(entry.initial_age(), Duration::from_millis(1500));
        assert_eq!(entry.fresh_until(), now + Duration::from_millis(8500));
        assert_eq!(entry.stale_until(), now + Duration::from_millis(68_500));
        assert_eq!(entry.error_until(), now + Duration::from_millis(308_500));
        assert_eq!(entry.evict_at(), now + Duration::from_millis(608_500));
        assert_eq!(
            entry.age(now + Duration::from_secs(1)),
            Duration::from_millis(2500)
        );

        let (map, body) = entry.answer(3);
        assert_eq!(&body[..], b"hello world");
        assert_eq!(entry.body_len(), 11);
        assert_eq!(map[header::CONTENT_LENGTH], "11", "the body's own length");
        assert_eq!(map[header::CONTENT_TYPE], "text/plain");
        let gens: Vec<_> = map.get_all("x-gen").iter().collect();
        assert_eq!(gens, ["7", "8"]);
        assert!(map["x-token"].is_sensitive());
        assert!(!map[header::CONTENT_TYPE].is_sensitive());
        assert_eq!(map.len(), 6);
        assert_eq!(entry.header_str(&header::ETAG), Some("\"v1\""));
        assert_eq!(entry.etag(), Some(HeaderValue::from_static("\"v1\"")));
        assert_eq!(entry.last_modified(), None);
    }

    #[test]
    fn marked_stale_keeps_everything_but_the_instants() {
        let now = Instant::now();
        let entry = Entry::new(
            "k",
            StatusCode::OK,
            &HeaderMap::new(),
            &[Bytes::from_static(b"x")],
            now,
            lifetimes(100),
        );
        let later = now + Duration::from_secs(5);
        let marked = entry.marked_stale(later);
        assert_eq!(marked.fresh_until(), later);
        assert_eq!(marked.stale_until(), later + Duration::from_secs(60));
        assert_eq!(marked.evict_at(), entry.evict_at());
        assert_eq!(marked.key(), "k");
        assert_eq!(&marked.body()[..], b"x");
        assert_eq!(marked.stored_at(), now);
    }

    #[test]
    fn lifetimes_far_in_the_future_saturate() {
        let now = Instant::now();
        let forever = Lifetimes {
            fresh: Duration::MAX,
            stale_while_revalidate: Duration::MAX,
            stale_if_error: Duration::MAX,
            initial_age: Duration::ZERO,
            keep_for_revalidation: Duration::MAX,
        };
        let entry = Entry::new("k", StatusCode::OK, &HeaderMap::new(), &[], now, forever);
        assert!(entry.fresh_until() > now + Duration::from_secs(100 * 365 * 86_400));
        assert!(entry.evict_at() >= entry.fresh_until());
    }
}
