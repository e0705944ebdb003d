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
}

/// Heuristic freshness is this fraction of the time since `Last-Modified`...
const HEURISTIC_FRACTION: f64 = 0.1;
/// ...and never more than this.
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
    /// The body is larger than `--max-object-size`.
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
    /// A route says `bypass = true`.
    Route,
}

impl BypassReason {
    pub const ALL: [BypassReason; 13] = [
        BypassReason::Method,
        BypassReason::NoStore,
        BypassReason::Private,
        BypassReason::SetCookie,
        BypassReason::Status,
        BypassReason::VaryStar,
        BypassReason::TooLarge,
        BypassReason::Authorization,
        BypassReason::Cookie,
        BypassReason::Range,
        BypassReason::Request,
        BypassReason::NotModified,
        BypassReason::Route,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BypassReason::Method => "method",
            BypassReason::NoStore => "no-store",
            BypassReason::Private => "private",
            BypassReason::SetCookie => "set-cookie",
            BypassReason::Status => "status",
            BypassReason::VaryStar => "vary-star",
            BypassReason::TooLarge => "too-large",
            BypassReason::Authorization => "authorization",
            BypassReason::Cookie => "cookie",
            BypassReason::Range => "range",
            BypassReason::Request => "request",
            BypassReason::NotModified => "not-modified",
            BypassReason::Route => "route",
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

/// Methods whose success invalidates what is stored for the URI (RFC 9111 §4.4).
pub fn method_invalidates(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::DELETE | Method::PATCH
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
    let cc = CacheControl::of_response(headers, &defaults.targeted);
    if cc.no_store {
        return Storability::Bypass(BypassReason::NoStore);
    }
    if cc.private {
        return Storability::Bypass(BypassReason::Private);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Storability::Bypass(BypassReason::SetCookie);
    }
    if vary_names(headers).is_err() {
        return Storability::Bypass(BypassReason::VaryStar);
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
    let initial_age = age_value(headers).saturating_add(response_delay);
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
            None => heuristic_freshness(headers, response_time).unwrap_or(defaults.ttl),
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

/// 10% of the time since `Last-Modified`, capped (RFC 9111 §4.2.2).
fn heuristic_freshness(headers: &HeaderMap, response_time: SystemTime) -> Option<Duration> {
    let last_modified = headers.get(header::LAST_MODIFIED).and_then(http_date)?;
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_time);
    let since = date.duration_since(last_modified).unwrap_or(Duration::ZERO);
    Some(since.mul_f64(HEURISTIC_FRACTION).min(HEURISTIC_CAP))
}

fn http_date(value: &http::HeaderValue) -> Option<SystemTime> {
    http_date_str(value.to_str().ok()?)
}

fn http_date_str(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value.trim()).ok()
}

/// The `Age` header's value, at most [`MAX_AGE`]; an absent or invalid one
/// counts as zero.
pub fn age_value(headers: &HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
        .min(MAX_AGE)
}

/// The request header names a response varies on, lowercase and deduplicated;
/// `Err(())` for `Vary: *`.
#[allow(clippy::result_unit_err)]
pub fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, ()> {
    let mut names: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else { continue };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(());
            }
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(names)
}

/// The normalised values of the named request headers, as one text for the
/// cache key: `name=value` pairs, values of repeated fields joined with ", ",
/// runs of white space folded to one space.
pub fn vary_key(names: &[HeaderName], request: &HeaderMap) -> String {
    let mut key = String::new();
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        key.push('=');
        let mut first = true;
        for value in request.get_all(name) {
            if !first {
                key.push_str(", ");
            }
            first = false;
            let text = String::from_utf8_lossy(value.as_bytes());
            let mut words = text.split_whitespace();
            if let Some(word) = words.next() {
                key.push_str(word);
                for word in words {
                    key.push(' ');
                    key.push_str(word);
                }
            }
        }
    }
    key
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
            if headers.contains_key(field) {
                let mut cc = CacheControl::parse(headers, field);
                cc.targeted = is_targeted;
                if is_targeted {
                    // `no-store` and `private` in Cache-Control still keep
                    // an answer out of every shared cache.
                    let general = CacheControl::parse(headers, &header::CACHE_CONTROL);
                    cc.no_store |= general.no_store;
                    cc.private |= general.private;
                }
                return cc;
            }
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
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
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
        .flat_map(|v| v.split(','))
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
        .and_then(http_date_str)
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
        }
    }

    fn strict() -> Defaults {
        Defaults {
            ttl: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
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
        // Heuristic: 10% of the time since Last-Modified, capped at a day.
        let l = lifetimes(
            &[DATE, ("last-modified", "Sat, 28 Nov 2026 11:00:00 GMT")],
            &d,
        );
        assert_eq!(l.fresh, S(360));
        let l = lifetimes(
            &[DATE, ("last-modified", "Sat, 28 Nov 2020 12:00:00 GMT")],
            &d,
        );
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
        assert_eq!(
            with(&[("cache-control", "private=\"x\"")]),
            bypass(BypassReason::Private)
        );
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
        // Cache-Control's no-store still keeps it out.
        assert_eq!(
            decide_with(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("swr-cache-control", "max-age=5")
                ],
                false,
                &d
            ),
            Storability::Bypass(BypassReason::NoStore)
        );
    }

    #[test]
    fn vary_keys_are_normalised() {
        let names = vary_names(&headers(&[
            ("vary", "Accept-Encoding,  accept"),
            ("vary", "X-Tenant"),
        ]))
        .unwrap();
        let names_text: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        assert_eq!(names_text, ["accept", "accept-encoding", "x-tenant"]);
        let a = vary_key(
            &names,
            &headers(&[("accept", "text/html"), ("accept-encoding", "gzip,   br")]),
        );
        let b = vary_key(
            &names,
            &headers(&[("Accept-Encoding", "gzip, br"), ("accept", " text/html ")]),
        );
        assert_eq!(a, b);
        let c = vary_key(
            &names,
            &headers(&[("accept", "text/html"), ("accept-encoding", "br")]),
        );
        assert_ne!(a, c);
        assert!(vary_names(&headers(&[("vary", "*")])).is_err());
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
