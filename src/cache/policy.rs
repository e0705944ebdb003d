//! Pure rules: whether a response may be stored, how long it lives, and what
//! state an entry is in at a given `now`. No clocks are read here: every
//! function takes `now`, so tests probe each boundary without sleeping.
//!
//! Freshness follows RFC 9111 (shared cache), the stale windows RFC 5861, the
//! targeted fields RFC 9213. Why not the `http-cache-semantics` crate: it
//! decides with the request and response kept per entry (too heavy for the
//! memory budget of an entry), it has no notion of configured default windows,
//! an override mode or a capped heuristic, and the directives it does not
//! expose (`stale-while-revalidate`, `stale-if-error`, `must-revalidate`)
//! would have to be parsed here anyway.

use std::time::{Duration, Instant, SystemTime};

use http::{header, HeaderMap, HeaderName, Method, StatusCode};

use super::entry::Entry;
use super::vary::Vary;

/// The state of an entry at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// `now < fresh_until`: serve it.
    Fresh,
    /// `fresh_until <= now < stale_until`: serve it at once and queue a refresh.
    Stale,
    /// Past `stale_until`: fetch (or revalidate) before answering; serve it
    /// only if the fetch fails and `now < error_until`.
    Expired,
}

/// Classifies `entry` at `now`.
pub fn entry_state(entry: &Entry, now: Instant) -> EntryState {
    if now < entry.fresh_until() {
        EntryState::Fresh
    } else if now < entry.stale_until() {
        EntryState::Stale
    } else {
        EntryState::Expired
    }
}

/// Whether an entry may stand in for a failed fetch at `now` (stale-if-error).
pub fn usable_on_error(entry: &Entry, now: Instant) -> bool {
    now < entry.error_until()
}

/// How long a stored response lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// The freshness lifetime: fresh while its age is below this.
    pub fresh: Duration,
    /// Then served stale, while a refresh runs, for this long.
    pub stale_while_revalidate: Duration,
    /// After turning stale, served in place of a failed fetch for this long.
    pub stale_if_error: Duration,
    /// The response's age when it arrived: its `Age` plus the time the
    /// exchange took (RFC 9111 §4.2.3), so that a refresh that took 200 ms
    /// still leaves the entry fresh until `ttl` after the request was sent.
    pub initial_age: Duration,
    /// A response with validators is kept this long past its windows, so a
    /// later request can revalidate it (a 304) instead of fetching it whole.
    pub keep_for_revalidation: Duration,
}

impl Lifetimes {
    /// Each lifetime at most [`MAX_LIFETIME`], the age at most [`MAX_AGE`].
    fn capped(self) -> Lifetimes {
        Lifetimes {
            fresh: self.fresh.min(MAX_LIFETIME),
            stale_while_revalidate: self.stale_while_revalidate.min(MAX_LIFETIME),
            stale_if_error: self.stale_if_error.min(MAX_LIFETIME),
            initial_age: self.initial_age.min(MAX_AGE),
            keep_for_revalidation: self.keep_for_revalidation,
        }
    }
}

/// How the backend's freshness directives are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheControlMode {
    /// RFC 9111: the backend's directives decide; the configured values are defaults.
    #[default]
    Honor,
    /// The configured ttl and windows apply whatever the backend says about
    /// freshness (`no-store`, `private` and `Set-Cookie` still prevent storing).
    Override,
}

impl CacheControlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheControlMode::Honor => "honor",
            CacheControlMode::Override => "override",
        }
    }
}

/// The configured values the rules start from.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub mode: CacheControlMode,
    /// The `Cache-Control` targeted at this proxy (RFC 9213), e.g. `swr-cache-control`.
    pub targeted: HeaderName,
    /// Heuristic freshness for a response with `Last-Modified` and no
    /// explicit freshness: this percentage of the time since it was last
    /// modified, at most `ttl` (at most a day when `ttl` is zero). `None`:
    /// such a response is fresh for `ttl`, as any other.
    pub heuristic_percent: Option<u8>,
}

impl Defaults {
    /// The heuristic a ttl gets unless one is configured: none, since the
    /// configured ttl is the answer to "how long when the backend does not
    /// say"; with a ttl of zero (strict RFC 9111), RFC 9111 §4.2.2's
    /// customary 10%, at most a day.
    pub fn default_heuristic(ttl: Duration) -> Option<u8> {
        ttl.is_zero().then_some(10)
    }
}

/// Heuristic freshness with a ttl of zero is never more than this.
pub const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 3600);
/// The longest freshness lifetime or stale window an entry gets, whatever
/// the backend or the configuration says (`max-age=99999999999` is a year):
/// an entry is never fresh forever.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest `Age` counted: 2^31 seconds, as RFC 9111 §1.2.2 caps
/// delta-seconds.
pub const MAX_AGE: Duration = Duration::from_secs(1 << 31);
/// How long past its windows a response with validators is kept for revalidation.
pub const KEEP_FOR_REVALIDATION: Duration = Duration::from_secs(600);
/// The most header field values a stored answer holds: what fleet's codec
/// (Redis and the snapshot) reads back, far below what a `HeaderMap` holds
/// (24,576; past it, making one panics). One backend answer holds at most
/// 100 over HTTP/1.1 (hyper's client), but a 304 adds the fields it names
/// to the stored answer (RFC 9111 §3.2), renewal after renewal.
pub const MAX_STORED_FIELDS: usize = 1024;
/// The most bytes of header names and values a stored answer holds: above
/// the largest head hyper's client reads (8 KiB + 100 x 4 KiB), so only
/// 304s adding fields to a stored answer reach it (as Varnish bounds an
/// object's headers by `http_max_hdr` and its workspace).
pub const MAX_STORED_HEAD_BYTES: usize = 512 << 10;

/// Whether an entry can hold `headers`: at most [`MAX_STORED_FIELDS`]
/// fields and [`MAX_STORED_HEAD_BYTES`] of names and values.
pub fn fits_entry(headers: &HeaderMap) -> bool {
    headers.len() <= MAX_STORED_FIELDS
        && headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum::<usize>()
            <= MAX_STORED_HEAD_BYTES
}

/// Why a response is passed through and not stored. Each reason has a
/// name used in `Cache-Status: detail=`, the bypass metric and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BypassReason {
    /// The request method is not GET or HEAD.
    Method,
    /// The response says `no-store`.
    NoStore,
    /// The response says `private`.
    Private,
    /// The response sets a cookie.
    SetCookie,
    /// The status is not one a cache stores without explicit freshness, or is 206.
    Status,
    /// `Vary: *`: no later request can be known to match.
    VaryStar,
    /// `Vary` names a field swr-proxy writes per client (its address:
    /// `X-Forwarded-For`, `Forwarded`, `X-Real-IP`): the answer was made for
    /// the backend's view of one client, which the client's own value of
    /// that field (the only thing a key could hold) does not show.
    VaryClient,
    /// The body is larger than `--max-object-size`, or the headers pass
    /// what an entry holds ([`MAX_STORED_FIELDS`], [`MAX_STORED_HEAD_BYTES`]).
    TooLarge,
    /// The request carried `Authorization` and the response did not say
    /// `public`, `s-maxage` or `must-revalidate`.
    Authorization,
    /// The request carried `Cookie` and the response did not say `public`
    /// or `s-maxage`, or carry a field targeted at this cache.
    Cookie,
    /// A range request: passed to the backend, which answers the range.
    Range,
    /// The client asked for it (`Cache-Control: no-store`, with
    /// `--honor-client-cache-control`).
    Request,
    /// The backend answered 304 to a request that carried no validators of ours.
    NotModified,
    /// A 304 names another `Vary` than the stored answer's: the stored
    /// answer may not be renewed for every variant at once, so it ends and
    /// the next request fetches the answer whole.
    VaryChanged,
    /// A 304 carries another `ETag` than the stored answer's, or several:
    /// it validates another body (RFC 9111 §4.3.4), so the stored answer
    /// ends and the next request fetches the answer whole.
    ValidatorChanged,
    /// A route says `bypass = true`.
    Route,
    /// `--max-buffered` was taken by other reads: streamed this time.
    BufferFull,
    /// Coalesced fills ended three times in a row without an answer this
    /// request could take (their leaders vanished, or stored other
    /// variants): fetched for this client alone.
    Unsettled,
}

/// Fields swr-proxy sends with each client's own address (it drops what the
/// client sent, or appends to it for a trusted peer): see
/// [`BypassReason::VaryClient`].
const PER_CLIENT_FIELDS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

impl BypassReason {
    /// The answer was not shared only because of the client's credentials
    /// (`Authorization` or `Cookie`): it says nothing of the answer others
    /// would get.
    pub fn is_credentials(self) -> bool {
        matches!(self, BypassReason::Authorization | BypassReason::Cookie)
    }

    pub const ALL: [BypassReason; 18] = [
        BypassReason::Method,
        BypassReason::NoStore,
        BypassReason::Private,
        BypassReason::SetCookie,
        BypassReason::Status,
        BypassReason::VaryStar,
        BypassReason::VaryClient,
        BypassReason::TooLarge,
        BypassReason::Authorization,
        BypassReason::Cookie,
        BypassReason::Range,
        BypassReason::Request,
        BypassReason::NotModified,
        BypassReason::VaryChanged,
        BypassReason::ValidatorChanged,
        BypassReason::Route,
        BypassReason::BufferFull,
        BypassReason::Unsettled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BypassReason::Method => "method",
            BypassReason::NoStore => "no-store",
            BypassReason::Private => "private",
            BypassReason::SetCookie => "set-cookie",
            BypassReason::Status => "status",
            BypassReason::VaryStar => "vary-star",
            BypassReason::VaryClient => "vary-client",
            BypassReason::TooLarge => "too-large",
            BypassReason::Authorization => "authorization",
            BypassReason::Cookie => "cookie",
            BypassReason::Range => "range",
            BypassReason::Request => "request",
            BypassReason::NotModified => "not-modified",
            BypassReason::VaryChanged => "vary-changed",
            BypassReason::ValidatorChanged => "validator-changed",
            BypassReason::Route => "route",
            BypassReason::BufferFull => "buffer-full",
            BypassReason::Unsettled => "fill-unsettled",
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

/// Methods whose success invalidates what is stored for the URI: every
/// method not known to be safe (RFC 9111 §4.4, RFC 9110 §9.2.1), extension
/// methods included.
pub fn method_invalidates(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
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

/// What storability needs to know about the request that fetched a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The request carried `Authorization`.
    pub authorization: bool,
    /// The request carried `Cookie` (that its route does not ignore).
    pub cookie: bool,
}

impl RequestFacts {
    /// What storability needs of a request's headers.
    pub fn of(headers: &HeaderMap) -> RequestFacts {
        RequestFacts {
            authorization: headers.contains_key(header::AUTHORIZATION),
            cookie: headers.contains_key(header::COOKIE),
        }
    }

    /// The request carried credentials (`Authorization` or a `Cookie`
    /// that counts): what it is answered may be private to it.
    pub fn has_credentials(self) -> bool {
        self.authorization || self.cookie
    }
}

/// Decides whether a response to a GET may be stored, and for how long.
/// `response_delay` is the time from sending the request to receiving the
/// response; `response_time` is the wall-clock time it arrived (for `Date`,
/// `Expires` and `Last-Modified`).
pub fn storability(
    status: StatusCode,
    headers: &HeaderMap,
    request: RequestFacts,
    response_delay: Duration,
    response_time: SystemTime,
    defaults: &Defaults,
) -> Storability {
    if !fits_entry(headers) {
        return Storability::Bypass(BypassReason::TooLarge);
    }
    let cc = CacheControl::of_response(headers, &defaults.targeted);
    if cc.no_store {
        return Storability::Bypass(BypassReason::NoStore);
    }
    if cc.private {
        return Storability::Bypass(BypassReason::Private);
    }
    if headers.contains_key(header::SET_COOKIE)
        && !omitted_fields(headers, &defaults.targeted).contains(&header::SET_COOKIE)
    {
        return Storability::Bypass(BypassReason::SetCookie);
    }
    match super::vary::vary_names(headers) {
        Vary::Star => return Storability::Bypass(BypassReason::VaryStar),
        Vary::Names(names)
            if names
                .iter()
                .any(|n| PER_CLIENT_FIELDS.contains(&n.as_str())) =>
        {
            return Storability::Bypass(BypassReason::VaryClient);
        }
        Vary::Names(_) => {}
    }
    // RFC 9111 §3.5: a shared cache stores an answer to an authenticated
    // request only when the response says it may be shared.
    // A field targeted at this cache (RFC 9213) is written for shared caches.
    let shared = cc.public || cc.s_maxage.is_some() || cc.targeted;
    if request.authorization && !(shared || cc.must_revalidate) {
        return Storability::Bypass(BypassReason::Authorization);
    }
    // What a client's cookies produced is theirs (Varnish passes such
    // requests; swr-proxy stores the answer when the backend says it may).
    if request.cookie && !shared {
        return Storability::Bypass(BypassReason::Cookie);
    }
    if status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Storability::Bypass(BypassReason::Status);
    }
    // RFC 9111 §4.2.3: the larger of the apparent age (from `Date`) and the
    // corrected `Age`.
    let initial_age =
        apparent_age(headers, response_time).max(age_value(headers).saturating_add(response_delay));
    let has_validators =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let keep_for_revalidation = if has_validators {
        KEEP_FOR_REVALIDATION
    } else {
        Duration::ZERO
    };

    if defaults.mode == CacheControlMode::Override {
        if !status_is_cacheable(status) {
            return Storability::Bypass(BypassReason::Status);
        }
        return Storability::Store(
            Lifetimes {
                fresh: defaults.ttl,
                stale_while_revalidate: defaults.stale_while_revalidate,
                stale_if_error: defaults.stale_if_error,
                initial_age,
                keep_for_revalidation,
            }
            .capped(),
        );
    }

    let explicit = explicit_freshness(&cc, headers, response_time);
    if explicit.is_none() && !status_is_cacheable(status) {
        return Storability::Bypass(BypassReason::Status);
    }
    let fresh = if cc.no_cache {
        // Stored, but validated before every use.
        Duration::ZERO
    } else {
        match explicit {
            Some(lifetime) => lifetime,
            None => match defaults.heuristic_percent {
                Some(percent) => {
                    heuristic_freshness(headers, response_time, percent).map_or(defaults.ttl, |h| {
                        h.min(if defaults.ttl.is_zero() {
                            HEURISTIC_CAP
                        } else {
                            defaults.ttl
                        })
                    })
                }
                None => defaults.ttl,
            },
        }
    };
    // RFC 9111 §4.2.4: no stale content for these unless the response itself
    // allows it with an explicit stale-while-revalidate / stale-if-error.
    let no_default_stale =
        cc.no_cache || cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    let window = |explicit: Option<u64>, default: Duration| match explicit {
        Some(secs) => Duration::from_secs(secs),
        None if no_default_stale => Duration::ZERO,
        None => default,
    };
    let lifetimes = Lifetimes {
        fresh,
        stale_while_revalidate: window(cc.stale_while_revalidate, defaults.stale_while_revalidate),
        stale_if_error: window(cc.stale_if_error, defaults.stale_if_error),
        initial_age,
        keep_for_revalidation,
    }
    .capped();
    let usable = lifetimes.fresh > lifetimes.initial_age
        || !lifetimes.stale_while_revalidate.is_zero()
        || !lifetimes.stale_if_error.is_zero()
        || has_validators;
    if !usable {
        // Nothing could ever be served from it: not worth a slot.
        return Storability::Bypass(BypassReason::Status);
    }
    Storability::Store(lifetimes)
}

/// `s-maxage`, else `max-age`, else `Expires` − `Date` (RFC 9111 §4.2.1).
fn explicit_freshness(
    cc: &CacheControl,
    headers: &HeaderMap,
    response_time: SystemTime,
) -> Option<Duration> {
    if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(secs));
    }
    if cc.targeted {
        // A targeted field replaces Cache-Control and Expires (RFC 9213 §2.2).
        return None;
    }
    let expires = headers.get(header::EXPIRES)?;
    // An invalid Expires (e.g. "0") means already expired.
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_time);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// `percent` of the time since `Last-Modified` (RFC 9111 §4.2.2).
fn heuristic_freshness(
    headers: &HeaderMap,
    response_time: SystemTime,
    percent: u8,
) -> Option<Duration> {
    let last_modified = headers.get(header::LAST_MODIFIED).and_then(http_date)?;
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_time);
    let since = date.duration_since(last_modified).unwrap_or(Duration::ZERO);
    Some(since.mul_f64(f64::from(percent.min(100)) / 100.0))
}

/// The time between `Date` and the response's arrival, in whole seconds,
/// less one; zero without a valid `Date` or when the backend's clock is
/// ahead. `Date` has a resolution of a second, and servers stamp it from a
/// clock they refresh once a second (hyper does), so a response sent at
/// once can carry a `Date` up to two seconds behind its arrival: counting
/// that would make a `max-age=1` answer stale on arrival.
fn apparent_age(headers: &HeaderMap, response_time: SystemTime) -> Duration {
    let Some(date) = headers.get(header::DATE).and_then(http_date) else {
        return Duration::ZERO;
    };
    let since = response_time.duration_since(date).unwrap_or(Duration::ZERO);
    Duration::from_secs(since.as_secs().saturating_sub(1)).min(MAX_AGE)
}

fn http_date(value: &http::HeaderValue) -> Option<SystemTime> {
    http_date_str(value.to_str().ok()?)
}

/// An HTTP date in any of its three formats (IMF-fixdate, RFC 850,
/// asctime; RFC 9110 §5.6.7), in any letter case.
fn http_date_str(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(time) = httpdate::parse_http_date(value) {
        return Some(time);
    }
    // Day and month names as `Sun` / `Nov`, the zone as `GMT`.
    let mut canonical = String::with_capacity(value.len());
    let mut word_start = true;
    for c in value.chars() {
        if c.is_ascii_alphabetic() {
            canonical.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = false;
        } else {
            canonical.push(c);
            word_start = true;
        }
    }
    let canonical = canonical.replace("Gmt", "GMT");
    httpdate::parse_http_date(&canonical).ok()
}

/// The `Age` a response arrived with (RFC 9111 §5.1), at most [`MAX_AGE`]:
/// zero when absent. A value that is not a single non-negative integer (a
/// list such as `7200, 0`, two `Age` lines, a negative or a word) is
/// invalid, and must not make the response fresher than it is: a list
/// counts as its largest member, anything else as [`MAX_AGE`].
pub fn age_value(headers: &HeaderMap) -> Duration {
    let mut age: Option<u64> = None;
    for value in headers.get_all(header::AGE) {
        let Ok(text) = value.to_str() else {
            return MAX_AGE;
        };
        for member in text.split(',') {
            let member = member.trim();
            if member.is_empty() || !member.bytes().all(|b| b.is_ascii_digit()) {
                return MAX_AGE;
            }
            let secs = member.parse::<u64>().unwrap_or(u64::MAX);
            age = Some(age.map_or(secs, |a| a.max(secs)));
        }
    }
    age.map_or(Duration::ZERO, Duration::from_secs).min(MAX_AGE)
}

/// [`split_list`] over bytes: a field value need not be UTF-8.
pub(crate) fn split_list_bytes(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    let mut members = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                members.push(&bytes[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    members.push(&bytes[start..]);
    members.into_iter()
}

/// The response directives the rules look at, from the most specific field
/// present: the targeted one, else `CDN-Cache-Control`, else `Cache-Control`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// The directives came from a targeted field (RFC 9213).
    pub targeted: bool,
}

/// The `CDN-Cache-Control` field (RFC 9213).
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

impl CacheControl {
    pub fn of_response(headers: &HeaderMap, targeted: &HeaderName) -> CacheControl {
        for (field, is_targeted) in [
            (targeted, true),
            (&CDN_CACHE_CONTROL, true),
            (&header::CACHE_CONTROL, false),
        ] {
            if !headers.contains_key(field) {
                continue;
            }
            // A targeted field replaces Cache-Control entirely for this
            // cache, `no-store` and `private` included (RFC 9213 §2.2), when
            // it is a valid Structured Fields dictionary; an invalid one is
            // ignored, as if absent.
            if is_targeted && !valid_dictionary(headers, field) {
                continue;
            }
            let mut cc = CacheControl::parse(headers, field);
            cc.targeted = is_targeted;
            return cc;
        }
        CacheControl::default()
    }

    /// Reads every value of `field`; directive names are case-insensitive;
    /// an invalid number makes the directive count as absent, except for
    /// `max-age` and `s-maxage`, where it counts as zero (stale at once).
    pub fn parse(headers: &HeaderMap, field: &HeaderName) -> CacheControl {
        let mut cc = CacheControl::default();
        for (name, arg) in directives(headers, field) {
            let secs = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => cc.no_store = true,
                // Qualified forms (`no-cache="set-cookie"`) name fields
                // that are left out of what is stored: `omitted_fields`.
                "no-cache" if arg.is_none() => cc.no_cache = true,
                "private" if arg.is_none() => cc.private = true,
                "public" => cc.public = true,
                "must-revalidate" => cc.must_revalidate = true,
                "proxy-revalidate" => cc.proxy_revalidate = true,
                "max-age" => cc.max_age = Some(secs().unwrap_or(0)),
                "s-maxage" => cc.s_maxage = Some(secs().unwrap_or(0)),
                "stale-while-revalidate" => cc.stale_while_revalidate = secs(),
                "stale-if-error" => cc.stale_if_error = secs(),
                _ => {}
            }
        }
        cc
    }
}

/// The `name[=arg]` directives of every value of `field`, quotes removed.
fn directives<'a>(
    headers: &'a HeaderMap,
    field: &HeaderName,
) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
    headers
        .get_all(field)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .filter_map(|directive| {
            let mut parts = directive.splitn(2, '=');
            let name = parts.next()?.trim();
            if name.is_empty() {
                return None;
            }
            let arg = parts.next().map(|a| a.trim().trim_matches('"'));
            Some((name, arg))
        })
}

/// The members of a comma-separated list, commas inside a quoted string
/// (`private="set-cookie, x-user"`) not splitting it.
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    // Commas are ASCII, so every member starts and ends on a char boundary.
    split_list_bytes(text.as_bytes()).map(|member| std::str::from_utf8(member).unwrap_or(""))
}

/// The response fields a shared cache leaves out of what it stores:
/// those named by `private="..."` and `no-cache="..."` (RFC 9111
/// §5.2.2.4, §5.2.2.7) in the directives that apply to this cache. The
/// answer is stored, and served, without them.
pub fn omitted_fields(headers: &HeaderMap, targeted: &HeaderName) -> Vec<HeaderName> {
    let (cdn, general) = (CDN_CACHE_CONTROL, header::CACHE_CONTROL);
    let field = [targeted, &cdn]
        .into_iter()
        .find(|f| headers.contains_key(*f) && valid_dictionary(headers, f))
        .unwrap_or(&general);
    let mut omitted = Vec::new();
    for (name, arg) in directives(headers, field) {
        let qualified =
            name.eq_ignore_ascii_case("private") || name.eq_ignore_ascii_case("no-cache");
        let Some(arg) = arg.filter(|_| qualified) else {
            continue;
        };
        for field in arg.split(',') {
            if let Ok(name) = HeaderName::from_bytes(field.trim().as_bytes()) {
                if !omitted.contains(&name) {
                    omitted.push(name);
                }
            }
        }
    }
    omitted
}

/// Whether every value of `field` is a Structured Fields dictionary
/// (RFC 8941 §3.2): `key[=item][;params]` members separated by commas,
/// keys in lowercase, items integers, decimals, tokens, strings or
/// booleans. What RFC 9213 requires of a targeted field.
fn valid_dictionary(headers: &HeaderMap, field: &HeaderName) -> bool {
    let mut any = false;
    for value in headers.get_all(field) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for member in split_list(text) {
            any = true;
            if !valid_member(member.trim_matches([' ', '\t'])) {
                return false;
            }
        }
    }
    any
}

/// One dictionary member: a key, an optional `=item`, parameters.
fn valid_member(member: &str) -> bool {
    let mut parts = split_params(member);
    let Some(first) = parts.next() else {
        return false;
    };
    let valid_pair = |pair: &str, allow_bare: bool| {
        let (key, item) = match pair.split_once('=') {
            Some((key, item)) => (key, Some(item)),
            None => (pair, None),
        };
        valid_key(key) && item.map_or(allow_bare, valid_item)
    };
    valid_pair(first, true) && parts.all(|param| valid_pair(param.trim_start(), true))
}

/// Splits `key=item;a=1;b` at semicolons outside quoted strings.
fn split_params(member: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, b) in member.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                parts.push(&member[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&member[start..]);
    parts.into_iter()
}

fn valid_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b))
}

fn valid_item(item: &str) -> bool {
    let bytes = item.as_bytes();
    match bytes.first() {
        Some(b'"') => {
            bytes.len() >= 2
                && bytes[bytes.len() - 1] == b'"'
                && bytes[1..bytes.len() - 1]
                    .iter()
                    .all(|&b| (b' '..=b'~').contains(&b))
        }
        Some(b'?') => item == "?0" || item == "?1",
        Some(b'-' | b'0'..=b'9') => {
            let digits = item.strip_prefix('-').unwrap_or(item);
            !digits.is_empty()
                && digits.bytes().filter(|&b| b == b'.').count() <= 1
                && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        }
        Some(b) if b.is_ascii_alphabetic() || *b == b'*' => bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b)),
        _ => false,
    }
}

/// The request directives honoured with `--honor-client-cache-control`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_store: bool,
    pub no_cache: bool,
    pub max_age: Option<u64>,
    /// `Some(u64::MAX)` for a bare `max-stale` (any staleness).
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// Reads `Cache-Control`, and `Pragma: no-cache` when there is no
    /// `Cache-Control` (RFC 9111 §5.4).
    pub fn parse(headers: &HeaderMap) -> RequestDirectives {
        let mut rd = RequestDirectives::default();
        if !headers.contains_key(header::CACHE_CONTROL) {
            rd.no_cache = headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    v.split(',')
                        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
                });
            return rd;
        }
        for (name, arg) in directives(headers, &header::CACHE_CONTROL) {
            let secs = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => rd.no_store = true,
                "no-cache" => rd.no_cache = true,
                "max-age" => rd.max_age = Some(secs().unwrap_or(0)),
                "max-stale" => {
                    rd.max_stale = Some(if arg.is_some() {
                        secs().unwrap_or(0)
                    } else {
                        u64::MAX
                    })
                }
                "min-fresh" => rd.min_fresh = secs(),
                "only-if-cached" => rd.only_if_cached = true,
                _ => {}
            }
        }
        rd
    }

    pub fn is_empty(&self) -> bool {
        *self == RequestDirectives::default()
    }
}

/// What to do with a stored entry for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Serve it as fresh.
    Fresh,
    /// Serve it at once, and queue a refresh.
    Stale,
    /// Fetch (or revalidate) before answering: the entry is past its windows.
    Expired,
    /// Fetch (or revalidate) before answering: the client's directives ask for it.
    ClientRefused,
}

/// Decides how an entry serves a request at `now`, given the client's
/// directives (only passed with `--honor-client-cache-control`).
#[inline]
pub fn decide(entry: &Entry, now: Instant, client: Option<&RequestDirectives>) -> Use {
    let state = entry_state(entry, now);
    let Some(rd) = client else {
        return match state {
            EntryState::Fresh => Use::Fresh,
            EntryState::Stale => Use::Stale,
            EntryState::Expired => Use::Expired,
        };
    };
    let age = entry.age(now).as_secs();
    if rd.no_cache || rd.max_age.is_some_and(|max| age > max) {
        return Use::ClientRefused;
    }
    if let Some(min_fresh) = rd.min_fresh {
        let left = entry.fresh_until().saturating_duration_since(now).as_secs();
        if left < min_fresh {
            return Use::ClientRefused;
        }
    }
    match state {
        EntryState::Fresh => Use::Fresh,
        EntryState::Stale => Use::Stale,
        EntryState::Expired => {
            let staleness = now.saturating_duration_since(entry.fresh_until()).as_secs();
            if rd.max_stale.is_some_and(|max| staleness <= max) {
                Use::Stale
            } else {
                Use::Expired
            }
        }
    }
}

/// Whether a client's conditional GET or HEAD is answered `304 Not
/// Modified` from `entry` (RFC 9110 §13.1.2, §13.1.3): `If-None-Match`
/// against the ETag (weak comparison), else `If-Modified-Since` against
/// `Last-Modified`.
pub fn client_not_modified(entry: &Entry, request: &HeaderMap) -> bool {
    if entry.status() != StatusCode::OK {
        return false;
    }
    if request.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = entry.header_str(&header::ETAG) else {
            return false;
        };
        return request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|tag| tag == "*" || opaque_tag(tag) == opaque_tag(etag.trim()));
    }
    let Some(since) = request.get(header::IF_MODIFIED_SINCE).and_then(http_date) else {
        return false;
    };
    entry
        .header_str(&header::LAST_MODIFIED)
        .and_then(|modified| http_date_str(&modified))
        .is_some_and(|modified| modified <= since)
}

/// An entity tag without its weakness indicator, for weak comparison.
fn opaque_tag(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn defaults() -> Defaults {
        Defaults {
            ttl: S(10),
            stale_while_revalidate: S(60),
            stale_if_error: S(300),
            mode: CacheControlMode::Honor,
            targeted: HeaderName::from_static("swr-cache-control"),
            heuristic_percent: None,
        }
    }

    fn strict() -> Defaults {
        Defaults {
            ttl: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            heuristic_percent: Defaults::default_heuristic(Duration::ZERO),
            ..defaults()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    /// The time responses in these tests arrive: Date is this instant.
    fn arrival() -> SystemTime {
        httpdate::parse_http_date("Sat, 28 Nov 2026 12:00:00 GMT").unwrap()
    }

    const DATE: (&str, &str) = ("date", "Sat, 28 Nov 2026 12:00:00 GMT");

    fn decide_with(
        status: u16,
        pairs: &[(&'static str, &str)],
        authorization: bool,
        defaults: &Defaults,
    ) -> Storability {
        storability(
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
            RequestFacts {
                authorization,
                cookie: false,
            },
            Duration::ZERO,
            arrival(),
            defaults,
        )
    }

    fn lifetimes(pairs: &[(&'static str, &str)], defaults: &Defaults) -> Lifetimes {
        match decide_with(200, pairs, false, defaults) {
            Storability::Store(l) => l,
            Storability::Bypass(reason) => panic!("expected storable, got {reason:?}"),
        }
    }

    fn entry_at(now: Instant, pairs: &[(&'static str, &str)]) -> Entry {
        let l = lifetimes(pairs, &defaults());
        Entry::new("k/", StatusCode::OK, &headers(pairs), &[], now, l)
    }

    #[test]
    fn state_boundaries() {
        let t0 = Instant::now();
        let entry = entry_at(t0, &[]);
        assert_eq!(entry_state(&entry, t0), EntryState::Fresh);
        assert_eq!(entry_state(&entry, t0 + S(10) - MS(1)), EntryState::Fresh);
        assert_eq!(entry_state(&entry, t0 + S(10)), EntryState::Stale);
        assert_eq!(entry_state(&entry, t0 + S(70) - MS(1)), EntryState::Stale);
        assert_eq!(entry_state(&entry, t0 + S(70)), EntryState::Expired);
        assert!(usable_on_error(&entry, t0 + S(310) - MS(1)));
        assert!(!usable_on_error(&entry, t0 + S(310)));
        assert_eq!(entry.evict_at(), t0 + S(310));
        assert_eq!(entry.ttl_secs(t0 + MS(1500)), 9);
        assert_eq!(entry.ttl_secs(t0), 10);
        assert_eq!(entry.ttl_secs(t0 + S(13)), -3);
        assert_eq!(entry.ttl_secs(t0 + S(10) + MS(1)), -1);
        assert_eq!(entry.age(t0 + MS(2500)), MS(2500));
    }

    #[test]
    fn age_and_response_delay_shorten_freshness() {
        let t0 = Instant::now();
        let h = headers(&[("age", "3")]);
        let Storability::Store(l) = storability(
            StatusCode::OK,
            &h,
            RequestFacts::default(),
            MS(200),
            arrival(),
            &defaults(),
        ) else {
            panic!("storable");
        };
        assert_eq!(l.initial_age, MS(3200));
        let entry = Entry::new("k/", StatusCode::OK, &h, &[], t0, l);
        assert_eq!(entry.fresh_until(), t0 + MS(6800));
        assert_eq!(entry.age(t0), MS(3200));
        // An Age beyond the ttl makes the response stale on arrival.
        let old = entry_at(t0, &[("age", "100")]);
        assert_eq!(entry_state(&old, t0), EntryState::Stale);
    }

    #[test]
    fn freshness_precedence() {
        let d = defaults();
        // s-maxage > max-age > Expires - Date > heuristic > --ttl
        let l = lifetimes(&[("cache-control", "max-age=30, s-maxage=90")], &d);
        assert_eq!(l.fresh, S(90));
        let l = lifetimes(
            &[
                ("cache-control", "max-age=30"),
                DATE,
                ("expires", "Sat, 28 Nov 2026 13:00:00 GMT"),
            ],
            &d,
        );
        assert_eq!(l.fresh, S(30));
        let l = lifetimes(&[DATE, ("expires", "Sat, 28 Nov 2026 12:02:00 GMT")], &d);
        assert_eq!(l.fresh, S(120));
        // An invalid Expires means already expired; so does a past one.
        let l = lifetimes(&[DATE, ("expires", "0"), ("etag", "\"a\"")], &d);
        assert_eq!(l.fresh, Duration::ZERO);
        let l = lifetimes(&[DATE, ("expires", "Sat, 28 Nov 2026 11:00:00 GMT")], &d);
        assert_eq!(l.fresh, Duration::ZERO);
        // Last-Modified without explicit freshness: the configured ttl,
        // whether it was modified just now or years ago.
        let hour_ago = ("last-modified", "Sat, 28 Nov 2026 11:00:00 GMT");
        let years_ago = ("last-modified", "Sat, 28 Nov 2020 12:00:00 GMT");
        let now = ("last-modified", DATE.1);
        for lm in [hour_ago, years_ago, now] {
            assert_eq!(lifetimes(&[DATE, lm], &d).fresh, S(10));
        }
        // Asked for: a percentage of the time since, at most the ttl...
        let asked = Defaults {
            ttl: S(3600),
            heuristic_percent: Some(10),
            ..defaults()
        };
        assert_eq!(lifetimes(&[DATE, hour_ago], &asked).fresh, S(360));
        assert_eq!(lifetimes(&[DATE, years_ago], &asked).fresh, S(3600));
        assert_eq!(lifetimes(&[DATE, now], &asked).fresh, S(0));
        // ...or, with a ttl of 0 (strict RFC 9111), 10% up to a day.
        let l = lifetimes(&[DATE, hour_ago, ("etag", "\"a\"")], &strict());
        assert_eq!(l.fresh, S(360));
        let l = lifetimes(&[DATE, years_ago], &strict());
        assert_eq!(l.fresh, HEURISTIC_CAP);
        // Nothing from the backend: the configured ttl.
        assert_eq!(lifetimes(&[DATE], &d).fresh, S(10));
        // A bad max-age counts as zero.
        let l = lifetimes(&[("cache-control", "max-age=soon"), ("etag", "\"a\"")], &d);
        assert_eq!(l.fresh, Duration::ZERO);
    }

    #[test]
    fn stale_windows() {
        let d = defaults();
        let l = lifetimes(&[("cache-control", "max-age=5")], &d);
        assert_eq!(
            (l.stale_while_revalidate, l.stale_if_error),
            (S(60), S(300))
        );
        let l = lifetimes(
            &[(
                "cache-control",
                "max-age=5, stale-while-revalidate=7, stale-if-error=9",
            )],
            &d,
        );
        assert_eq!((l.stale_while_revalidate, l.stale_if_error), (S(7), S(9)));
        for cc in [
            "max-age=5, must-revalidate",
            "max-age=5, proxy-revalidate",
            "s-maxage=5",
        ] {
            let l = lifetimes(&[("cache-control", cc)], &d);
            assert_eq!(
                (l.stale_while_revalidate, l.stale_if_error),
                (Duration::ZERO, Duration::ZERO),
                "{cc}"
            );
        }
        // ... unless the response itself allows stale content.
        let l = lifetimes(
            &[(
                "cache-control",
                "max-age=5, must-revalidate, stale-if-error=30",
            )],
            &d,
        );
        assert_eq!(
            (l.stale_while_revalidate, l.stale_if_error),
            (Duration::ZERO, S(30))
        );
        // no-cache: stored, validated before every use.
        let l = lifetimes(&[("cache-control", "no-cache"), ("etag", "\"v\"")], &d);
        assert_eq!(
            (l.fresh, l.stale_while_revalidate, l.stale_if_error),
            (Duration::ZERO, Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(l.keep_for_revalidation, KEEP_FOR_REVALIDATION);
    }

    #[test]
    fn override_mode_ignores_backend_freshness_but_not_privacy() {
        let d = Defaults {
            mode: CacheControlMode::Override,
            ..defaults()
        };
        let l = lifetimes(
            &[("cache-control", "no-cache, max-age=0, must-revalidate")],
            &d,
        );
        assert_eq!(
            (l.fresh, l.stale_while_revalidate, l.stale_if_error),
            (S(10), S(60), S(300))
        );
        assert_eq!(
            decide_with(200, &[("cache-control", "no-store")], false, &d),
            Storability::Bypass(BypassReason::NoStore)
        );
        assert_eq!(
            decide_with(200, &[("cache-control", "private")], false, &d),
            Storability::Bypass(BypassReason::Private)
        );
        assert_eq!(
            decide_with(200, &[("set-cookie", "a=b")], false, &d),
            Storability::Bypass(BypassReason::SetCookie)
        );
    }

    #[test]
    fn strict_mode_stores_only_what_can_be_used() {
        let d = strict();
        // No freshness, no validators: nothing could ever be served from it.
        assert_eq!(
            decide_with(200, &[DATE], false, &d),
            Storability::Bypass(BypassReason::Status)
        );
        let l = lifetimes(&[("cache-control", "max-age=60")], &d);
        assert_eq!((l.fresh, l.stale_while_revalidate), (S(60), Duration::ZERO));
        let l = lifetimes(
            &[DATE, ("last-modified", "Sat, 28 Nov 2026 11:00:00 GMT")],
            &d,
        );
        assert_eq!(l.fresh, S(360));
        assert!(matches!(
            decide_with(200, &[("etag", "\"x\"")], false, &d),
            Storability::Store(_)
        ));
    }

    #[test]
    fn authorization_needs_explicit_permission() {
        let d = defaults();
        let auth = |cc: &str| decide_with(200, &[("cache-control", cc)], true, &d);
        assert_eq!(
            auth("max-age=60"),
            Storability::Bypass(BypassReason::Authorization)
        );
        assert!(matches!(auth("public, max-age=60"), Storability::Store(_)));
        assert!(matches!(auth("s-maxage=60"), Storability::Store(_)));
        assert!(matches!(
            auth("max-age=60, must-revalidate"),
            Storability::Store(_)
        ));
        assert_eq!(
            decide_with(200, &[], true, &d),
            Storability::Bypass(BypassReason::Authorization)
        );
    }

    #[test]
    fn huge_ages_and_lifetimes_are_capped_not_overflowed() {
        let d = defaults();
        let max = u64::MAX.to_string();
        let cc = format!("max-age={max}, stale-while-revalidate={max}, stale-if-error={max}");
        let l = lifetimes(&[("cache-control", &cc), ("age", &max)], &d);
        assert_eq!(l.fresh, MAX_LIFETIME);
        assert_eq!(l.stale_while_revalidate, MAX_LIFETIME);
        assert_eq!(l.stale_if_error, MAX_LIFETIME);
        assert_eq!(l.initial_age, MAX_AGE);
        // Stored at the far end of time, it is still a finite entry.
        let entry = crate::cache::entry::Entry::new(
            "k/",
            StatusCode::OK,
            &HeaderMap::new(),
            &[],
            std::time::Instant::now(),
            l,
        );
        assert!(entry.age(std::time::Instant::now()) >= MAX_AGE);
    }

    #[test]
    fn cookies_need_explicit_permission() {
        let d = defaults();
        let with_cookie = |pairs: &[(&'static str, &str)]| {
            storability(
                StatusCode::OK,
                &headers(pairs),
                RequestFacts {
                    authorization: false,
                    cookie: true,
                },
                Duration::ZERO,
                arrival(),
                &d,
            )
        };
        assert_eq!(with_cookie(&[]), Storability::Bypass(BypassReason::Cookie));
        assert_eq!(
            with_cookie(&[("cache-control", "max-age=60")]),
            Storability::Bypass(BypassReason::Cookie)
        );
        assert!(matches!(
            with_cookie(&[("cache-control", "public, max-age=60")]),
            Storability::Store(_)
        ));
        assert!(matches!(
            with_cookie(&[("cache-control", "s-maxage=60")]),
            Storability::Store(_)
        ));
        assert!(matches!(
            with_cookie(&[("cdn-cache-control", "max-age=60")]),
            Storability::Store(_)
        ));
    }

    #[test]
    fn bypass_reasons() {
        let d = defaults();
        let with = |pairs: &[(&'static str, &str)]| decide_with(200, pairs, false, &d);
        let bypass = Storability::Bypass;
        assert_eq!(
            with(&[("cache-control", "no-store")]),
            bypass(BypassReason::NoStore)
        );
        assert_eq!(
            with(&[("cache-control", "max-age=5, No-Store")]),
            bypass(BypassReason::NoStore)
        );
        assert_eq!(
            with(&[("cache-control", "private")]),
            bypass(BypassReason::Private)
        );
        // A qualified private names fields to leave out: the rest is stored.
        assert!(matches!(
            with(&[("cache-control", "private=\"x\"")]),
            Storability::Store(_)
        ));
        assert_eq!(
            with(&[("set-cookie", "a=b")]),
            bypass(BypassReason::SetCookie)
        );
        assert_eq!(
            with(&[("vary", "accept, *")]),
            bypass(BypassReason::VaryStar)
        );
        assert!(matches!(with(&[("vary", "accept")]), Storability::Store(_)));
        assert!(matches!(
            with(&[("cache-control", "public")]),
            Storability::Store(_)
        ));
    }

    #[test]
    fn status_codes() {
        let d = defaults();
        for status in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            assert!(
                matches!(decide_with(status, &[], false, &d), Storability::Store(_)),
                "{status}"
            );
        }
        for status in [201, 302, 307, 400, 403, 500, 503] {
            assert_eq!(
                decide_with(status, &[], false, &d),
                Storability::Bypass(BypassReason::Status),
                "{status}"
            );
            // ... unless the response gives explicit freshness.
            assert!(matches!(
                decide_with(status, &[("cache-control", "max-age=60")], false, &d),
                Storability::Store(_)
            ));
        }
        assert_eq!(
            decide_with(206, &[("cache-control", "max-age=60")], false, &d),
            Storability::Bypass(BypassReason::Status)
        );
    }

    #[test]
    fn targeted_fields_take_precedence() {
        let d = defaults();
        let l = lifetimes(
            &[
                ("cache-control", "max-age=5"),
                ("cdn-cache-control", "max-age=50"),
            ],
            &d,
        );
        assert_eq!(l.fresh, S(50));
        let l = lifetimes(
            &[
                ("cache-control", "no-cache"),
                ("cdn-cache-control", "max-age=50"),
                ("swr-cache-control", "max-age=500, stale-while-revalidate=5"),
            ],
            &d,
        );
        assert_eq!((l.fresh, l.stale_while_revalidate), (S(500), S(5)));
        // A targeted field replaces Cache-Control entirely for this cache
        // (RFC 9213 §2.2): its no-store and private do not apply here...
        for general in ["no-store", "private"] {
            let l = lifetimes(
                &[
                    ("cache-control", general),
                    ("swr-cache-control", "max-age=5"),
                ],
                &d,
            );
            assert_eq!(l.fresh, S(5), "{general}");
        }
        // ...while the targeted field's own no-store does.
        assert_eq!(
            decide_with(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store")
                ],
                false,
                &d
            ),
            Storability::Bypass(BypassReason::NoStore)
        );
        // An invalid one (not a Structured Fields dictionary) is ignored.
        for invalid in ["Max-Age=50", "max-age=50,,", "max-age=\"50", "max-age=5 0"] {
            let l = lifetimes(
                &[
                    ("cache-control", "max-age=7"),
                    ("cdn-cache-control", invalid),
                ],
                &d,
            );
            assert_eq!(l.fresh, S(7), "{invalid}");
        }
        let l = lifetimes(
            &[
                ("cache-control", "max-age=7"),
                ("swr-cache-control", "max-age=\"x"),
                (
                    "cdn-cache-control",
                    "max-age=70, stale-while-revalidate=5;a=1",
                ),
            ],
            &d,
        );
        assert_eq!(l.fresh, S(70));
    }

    #[test]
    fn invalid_ages_never_make_a_response_fresher() {
        let age = |values: &[&'static str]| {
            let pairs: Vec<(&'static str, &str)> = values.iter().map(|v| ("age", *v)).collect();
            age_value(&headers(&pairs))
        };
        assert_eq!(age(&[]), S(0));
        assert_eq!(age(&["30"]), S(30));
        // RFC 9111 §5.1: a list or two lines is invalid; not younger than its largest.
        assert_eq!(age(&["7200, 0"]), S(7200));
        assert_eq!(age(&["0", "7200"]), S(7200));
        for junk in ["-1", "1.5", "soon", ""] {
            assert_eq!(age(&[junk]), MAX_AGE, "{junk:?}");
        }
    }

    #[test]
    fn headers_past_what_an_entry_holds_are_not_stored() {
        let d = defaults();
        let store = |headers: &HeaderMap| {
            storability(
                StatusCode::OK,
                headers,
                RequestFacts::default(),
                Duration::ZERO,
                arrival(),
                &d,
            )
        };
        let mut many = headers(&[("cache-control", "max-age=60")]);
        for n in 1..MAX_STORED_FIELDS {
            many.append("x-n", HeaderValue::from(n));
        }
        assert!(matches!(store(&many), Storability::Store(_)));
        many.append("x-n", HeaderValue::from_static("one more"));
        assert!(matches!(
            store(&many),
            Storability::Bypass(BypassReason::TooLarge)
        ));
        let mut large = headers(&[("cache-control", "max-age=60")]);
        let value = HeaderValue::from_str(&"v".repeat(64 << 10)).unwrap();
        for n in 0..8 {
            large.append(
                HeaderName::from_bytes(format!("x-{n}").as_bytes()).unwrap(),
                value.clone(),
            );
        }
        assert!(matches!(
            store(&large),
            Storability::Bypass(BypassReason::TooLarge)
        ));
        large.remove("x-7");
        assert!(matches!(store(&large), Storability::Store(_)));
    }

    #[test]
    fn apparent_age_counts_whole_seconds_since_date() {
        let d = defaults();
        // DATE is 12:00:00; the response arrives at 12:00:30.9.
        let arrived = arrival() + Duration::from_millis(30_900);
        let stored = |pairs: &[(&'static str, &str)]| match storability(
            StatusCode::OK,
            &headers(pairs),
            RequestFacts::default(),
            Duration::ZERO,
            arrived,
            &d,
        ) {
            Storability::Store(l) => l,
            other => panic!("{other:?}"),
        };
        let l = stored(&[DATE, ("cache-control", "max-age=60")]);
        assert_eq!(
            l.initial_age,
            S(29),
            "whole seconds, less the Date's resolution"
        );
        // The corrected Age wins when it is larger.
        let l = stored(&[DATE, ("cache-control", "max-age=60"), ("age", "45")]);
        assert_eq!(l.initial_age, S(45));
        // A clock ahead of ours makes no negative age.
        let l = stored(&[
            ("date", "Sat, 28 Nov 2026 12:05:00 GMT"),
            ("cache-control", "max-age=60"),
        ]);
        assert_eq!(l.initial_age, S(0));
    }

    #[test]
    fn http_dates_in_every_format_and_case() {
        let expected = http_date_str("Sun, 06 Nov 1994 08:49:37 GMT");
        assert!(expected.is_some());
        for text in [
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "sunday, 06-nov-94 08:49:37 gmt",
            "Sun Nov  6 08:49:37 1994",
            "SUN NOV  6 08:49:37 1994",
        ] {
            assert_eq!(http_date_str(text), expected, "{text}");
        }
    }

    #[test]
    fn unsafe_methods_invalidate() {
        for method in [
            "POST", "PUT", "DELETE", "PATCH", "PURGE", "LOCK", "X-CUSTOM",
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert!(method_invalidates(&method), "{method}");
        }
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(!method_invalidates(&method), "{method}");
        }
    }

    #[test]
    fn qualified_no_cache_and_private_name_fields_to_omit() {
        let d = defaults();
        let h = headers(&[
            (
                "cache-control",
                "max-age=60, private=\"set-cookie, x-user\", no-cache=\"x-debug\"",
            ),
            ("set-cookie", "a=b"),
        ]);
        let omitted = omitted_fields(&h, &d.targeted);
        assert_eq!(omitted, ["set-cookie", "x-user", "x-debug"]);
        // Stored (Set-Cookie left out), fresh for its max-age, not revalidated each time.
        match storability(
            StatusCode::OK,
            &h,
            RequestFacts::default(),
            Duration::ZERO,
            arrival(),
            &d,
        ) {
            Storability::Store(l) => assert_eq!(l.fresh, S(60)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_conditionals() {
        let t0 = Instant::now();
        let entry = entry_at(
            t0,
            &[
                ("etag", "W/\"v1\""),
                ("last-modified", "Sat, 28 Nov 2026 11:00:00 GMT"),
            ],
        );
        let nm = |pairs: &[(&'static str, &str)]| client_not_modified(&entry, &headers(pairs));
        assert!(nm(&[("if-none-match", "\"v1\"")]));
        assert!(nm(&[("if-none-match", "\"x\", W/\"v1\"")]));
        assert!(nm(&[("if-none-match", "*")]));
        assert!(!nm(&[("if-none-match", "\"v2\"")]));
        // If-None-Match wins over If-Modified-Since.
        assert!(!nm(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Sat, 28 Nov 2026 12:00:00 GMT")
        ]));
        assert!(nm(&[(
            "if-modified-since",
            "Sat, 28 Nov 2026 11:00:00 GMT"
        )]));
        assert!(!nm(&[(
            "if-modified-since",
            "Sat, 28 Nov 2026 10:59:59 GMT"
        )]));
        assert!(!nm(&[("if-modified-since", "yesterday")]));
        assert!(!nm(&[]));
    }

    #[test]
    fn client_directives() {
        let t0 = Instant::now();
        let entry = entry_at(t0, &[]); // fresh 10 s, stale window 60 s
        let rd = |text: &str| RequestDirectives::parse(&headers(&[("cache-control", text)]));
        assert_eq!(decide(&entry, t0 + S(5), None), Use::Fresh);
        assert_eq!(
            decide(&entry, t0 + S(5), Some(&rd("no-cache"))),
            Use::ClientRefused
        );
        assert_eq!(
            decide(&entry, t0 + S(5), Some(&rd("max-age=4"))),
            Use::ClientRefused
        );
        assert_eq!(
            decide(&entry, t0 + S(5), Some(&rd("max-age=5"))),
            Use::Fresh
        );
        assert_eq!(
            decide(&entry, t0 + S(5), Some(&rd("min-fresh=6"))),
            Use::ClientRefused
        );
        assert_eq!(
            decide(&entry, t0 + S(5), Some(&rd("min-fresh=4"))),
            Use::Fresh
        );
        assert_eq!(decide(&entry, t0 + S(80), None), Use::Expired);
        assert_eq!(
            decide(&entry, t0 + S(80), Some(&rd("max-stale=70"))),
            Use::Stale
        );
        assert_eq!(
            decide(&entry, t0 + S(80), Some(&rd("max-stale=69"))),
            Use::Expired
        );
        assert_eq!(
            decide(&entry, t0 + S(80), Some(&rd("max-stale"))),
            Use::Stale
        );
        let pragma = RequestDirectives::parse(&headers(&[("pragma", "no-cache")]));
        assert!(pragma.no_cache);
        assert!(rd("only-if-cached").only_if_cached);
        assert!(rd("no-store").no_store);
    }
}
