//! Pure rules: whether a response may be stored, how long it lives, and what
//! state an entry is in at a given `now`. No clocks are read here: every
//! function takes `now`, so tests probe each boundary without sleeping.

use std::time::{Duration, Instant};

use http::{header, HeaderMap, Method, StatusCode};

use super::entry::Entry;

/// The state of an entry at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// `now < fresh_until`: serve it.
    Fresh,
    /// `fresh_until <= now < stale_until`: serve it at once and queue a refresh.
    Stale,
    /// Past `stale_until`: fetch before answering (serve it only if the fetch
    /// fails and `now < error_until`).
    Expired,
}

/// Classifies `entry` at `now`.
pub fn entry_state(entry: &Entry, now: Instant) -> EntryState {
    if now < entry.fresh_until {
        EntryState::Fresh
    } else if now < entry.stale_until {
        EntryState::Stale
    } else {
        EntryState::Expired
    }
}

/// Whether an entry may stand in for a failed fetch at `now` (stale-if-error).
pub fn usable_on_error(entry: &Entry, now: Instant) -> bool {
    now < entry.error_until
}

/// How long a stored response lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Fresh for this long after it is stored.
    pub fresh: Duration,
    /// Then served stale, while a refresh runs, for this long.
    pub stale_while_revalidate: Duration,
    /// After turning stale, served in place of a failed fetch for this long.
    pub stale_if_error: Duration,
    /// The response's age when it arrived: its `Age` plus the time the
    /// exchange took (RFC 9111 §4.2.3), so that a refresh that took 200 ms
    /// still leaves the entry fresh until `ttl` after the request was sent.
    pub initial_age: Duration,
}

/// The configured defaults the rules start from.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// Why a response is passed through and not stored. Each reason has a
/// name used in `Cache-Status: detail=`, the bypass metric and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BypassReason {
    /// The request method is not GET or HEAD.
    Method,
    /// The response says `Cache-Control: no-store`.
    NoStore,
    /// The response says `Cache-Control: private`.
    Private,
    /// The response sets a cookie.
    SetCookie,
    /// The response's status is not one a cache stores by default.
    Status,
    /// The response varies on request headers (not part of the key yet).
    Vary,
    /// The body is larger than `--max-object-size`.
    TooLarge,
}

impl BypassReason {
    pub const ALL: [BypassReason; 7] = [
        BypassReason::Method,
        BypassReason::NoStore,
        BypassReason::Private,
        BypassReason::SetCookie,
        BypassReason::Status,
        BypassReason::Vary,
        BypassReason::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BypassReason::Method => "method",
            BypassReason::NoStore => "no-store",
            BypassReason::Private => "private",
            BypassReason::SetCookie => "set-cookie",
            BypassReason::Status => "status",
            BypassReason::Vary => "vary",
            BypassReason::TooLarge => "too-large",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The storability decision for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storability {
    Store(Lifetimes),
    Bypass(BypassReason),
}

/// Whether a method's responses can be served from the cache.
pub fn method_is_cacheable(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Status codes a cache may store without explicit freshness (RFC 9111 §4.2.2).
pub fn status_is_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses that count as a backend failure: stale content may stand in
/// for them (RFC 5861 §4).
pub fn status_is_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Decides whether a response to a GET may be stored, and for how long.
/// `response_delay` is the time from sending the request to receiving the response.
pub fn storability(
    status: StatusCode,
    headers: &HeaderMap,
    response_delay: Duration,
    defaults: &Defaults,
) -> Storability {
    let directives = CacheControl::parse(headers);
    if directives.no_store {
        return Storability::Bypass(BypassReason::NoStore);
    }
    if directives.private {
        return Storability::Bypass(BypassReason::Private);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Storability::Bypass(BypassReason::SetCookie);
    }
    if headers.contains_key(header::VARY) {
        return Storability::Bypass(BypassReason::Vary);
    }
    if !status_is_cacheable(status) {
        return Storability::Bypass(BypassReason::Status);
    }
    Storability::Store(Lifetimes {
        fresh: defaults.ttl,
        stale_while_revalidate: defaults.stale_while_revalidate,
        stale_if_error: defaults.stale_if_error,
        initial_age: age_value(headers) + response_delay,
    })
}

/// The `Age` header's value; an absent or invalid one counts as zero.
pub fn age_value(headers: &HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// The `Cache-Control` response directives the rules look at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub private: bool,
}

impl CacheControl {
    /// Reads every `Cache-Control` header; directive names are case-insensitive.
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for directive in text.split(',') {
                let name = directive.split('=').next().unwrap_or("").trim();
                if name.eq_ignore_ascii_case("no-store") {
                    cc.no_store = true;
                } else if name.eq_ignore_ascii_case("private") {
                    cc.private = true;
                }
            }
        }
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const DEFAULTS: Defaults = Defaults {
        ttl: Duration::from_secs(10),
        stale_while_revalidate: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(300),
    };

    fn entry_at(now: Instant) -> Entry {
        let Storability::Store(lifetimes) =
            storability(StatusCode::OK, &HeaderMap::new(), Duration::ZERO, &DEFAULTS)
        else {
            panic!("a plain 200 is storable");
        };
        Entry::new("k/", StatusCode::OK, &HeaderMap::new(), &[], now, lifetimes)
    }

    #[test]
    fn state_boundaries() {
        let t0 = Instant::now();
        let entry = entry_at(t0);
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(entry_state(&entry, t0), EntryState::Fresh);
        assert_eq!(entry_state(&entry, t0 + s(10) - ms(1)), EntryState::Fresh);
        assert_eq!(entry_state(&entry, t0 + s(10)), EntryState::Stale);
        assert_eq!(entry_state(&entry, t0 + s(70) - ms(1)), EntryState::Stale);
        assert_eq!(entry_state(&entry, t0 + s(70)), EntryState::Expired);
        assert!(usable_on_error(&entry, t0 + s(310) - ms(1)));
        assert!(!usable_on_error(&entry, t0 + s(310)));
        assert_eq!(entry.evict_at(), t0 + s(310));
        assert_eq!(entry.ttl_secs(t0 + ms(1500)), 9);
        assert_eq!(entry.ttl_secs(t0), 10);
        assert_eq!(entry.ttl_secs(t0 + s(13)), -3);
        assert_eq!(entry.ttl_secs(t0 + s(10) + ms(1)), -1);
        assert_eq!(entry.age(t0 + ms(2500)), ms(2500));
    }

    #[test]
    fn age_and_response_delay_shorten_freshness() {
        let t0 = Instant::now();
        let mut h = HeaderMap::new();
        h.insert("age", HeaderValue::from_static("3"));
        let Storability::Store(lifetimes) =
            storability(StatusCode::OK, &h, Duration::from_millis(200), &DEFAULTS)
        else {
            panic!("storable");
        };
        assert_eq!(lifetimes.initial_age, Duration::from_millis(3200));
        let entry = Entry::new("k/", StatusCode::OK, &h, &[], t0, lifetimes);
        assert_eq!(entry.fresh_until, t0 + Duration::from_millis(6800));
        assert_eq!(entry.age(t0), Duration::from_millis(3200));
        // An Age beyond the ttl makes the response stale on arrival.
        let mut old = HeaderMap::new();
        old.insert("age", HeaderValue::from_static("100"));
        let Storability::Store(lifetimes) =
            storability(StatusCode::OK, &old, Duration::ZERO, &DEFAULTS)
        else {
            panic!("storable");
        };
        let entry = Entry::new("k/", StatusCode::OK, &old, &[], t0, lifetimes);
        assert_eq!(entry_state(&entry, t0), EntryState::Stale);
    }

    #[test]
    fn bypass_reasons() {
        let with = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            storability(StatusCode::OK, &h, Duration::ZERO, &DEFAULTS)
        };
        let bypass = Storability::Bypass;
        assert_eq!(
            with("cache-control", "no-store"),
            bypass(BypassReason::NoStore)
        );
        assert_eq!(
            with("cache-control", "max-age=5, No-Store"),
            bypass(BypassReason::NoStore)
        );
        assert_eq!(
            with("cache-control", "private"),
            bypass(BypassReason::Private)
        );
        assert_eq!(
            with("cache-control", "private=\"x\""),
            bypass(BypassReason::Private)
        );
        assert_eq!(with("set-cookie", "a=b"), bypass(BypassReason::SetCookie));
        assert_eq!(with("vary", "accept"), bypass(BypassReason::Vary));
        assert!(matches!(
            with("cache-control", "public"),
            Storability::Store(_)
        ));
        assert_eq!(
            storability(
                StatusCode::INTERNAL_SERVER_ERROR,
                &HeaderMap::new(),
                Duration::ZERO,
                &DEFAULTS
            ),
            bypass(BypassReason::Status)
        );
        assert!(matches!(
            storability(
                StatusCode::NOT_FOUND,
                &HeaderMap::new(),
                Duration::ZERO,
                &DEFAULTS
            ),
            Storability::Store(_)
        ));
    }
}
