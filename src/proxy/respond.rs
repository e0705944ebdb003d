//! The answers: the only place that sets `X-Cache`, `Cache-Status` and
//! `Age`, counts an answer by its cache status, and writes the access-log
//! line. Every path (lookup, fill, pass, errors) ends here.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use crate::body::ProxyBody;
use crate::cache::entry::Entry;
use crate::cache::policy::{self, BypassReason};
use crate::cache::status_field::StatusField;
use crate::cache::CacheStatus;
use crate::error::{ProxyError, UpstreamError};
use crate::metrics::RouteStats;

use super::background::RefreshDecision;
use super::fetch::{FetchTarget, Passed};
use super::lookup::FastHit;
use super::Proxy;

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// An answer as this module made it: the response, and the cache status it
/// was counted under and sent as `X-Cache`. The per-route counters take the
/// status from here, never back from the headers.
pub(super) struct Answered {
    pub(super) response: Response<ProxyBody>,
    pub(super) status: CacheStatus,
    /// An answer from a stored entry: its age over its freshness lifetime,
    /// for the route's histogram.
    pub(super) age_ratio: Option<f64>,
}

/// What the per-route counters and the access log need of a request.
pub(super) struct AnswerLog {
    pub(super) route: Option<Arc<RouteStats>>,
    /// Kept only when `--access-log` is on.
    pub(super) access: Option<AccessLine>,
}

/// What an access-log line says of the request.
pub(super) struct AccessLine {
    pub(super) started: Instant,
    pub(super) method: Method,
    pub(super) uri: http::Uri,
}

/// How long an answer waited on the backend (a fetch, a pass, or another
/// client's fetch it was coalesced with), for the access log.
#[derive(Debug, Clone, Copy)]
struct UpstreamTime(Duration);

pub(super) async fn upstream_timed(
    answer: impl std::future::Future<Output = Answered>,
) -> Answered {
    let started = Instant::now();
    let mut answered = answer.await;
    answered
        .response
        .extensions_mut()
        .insert(UpstreamTime(started.elapsed()));
    answered
}

/// Values up to this are served from a table built once, not formatted per answer.
const TABLE_SIZE: u64 = 4096;

/// A header value for a small number (`Age`), from a table when it can.
fn small_number(n: u64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..TABLE_SIZE)
            .map(|n| static_value(n.to_string()))
            .collect()
    });
    match usize::try_from(n).ok().and_then(|i| table.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(n),
    }
}

/// The `Cache-Status` parameters of a fresh hit with `ttl` seconds left.
fn hit_field(ttl: i64) -> StatusField<'static> {
    StatusField {
        hit: true,
        ttl: Some(ttl),
        ..StatusField::default()
    }
}

/// `Cache-Status` of a fresh hit with `ttl` seconds left.
fn hit_cache_status(ttl: i64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..TABLE_SIZE)
            .map(|n| static_value(hit_field(n as i64).text()))
            .collect()
    });
    match usize::try_from(ttl).ok().and_then(|i| table.get(i)) {
        Some(value) => value.clone(),
        None => hit_field(ttl).value(),
    }
}

/// A header value for a table built once and kept for the life of the
/// process. A static value is cloned without touching a shared reference
/// count, which every core would otherwise contend on when one key is hot.
fn static_value(text: String) -> HeaderValue {
    let text: &'static str = text.leak();
    HeaderValue::from_str(text)
        .map(|_| HeaderValue::from_static(text))
        .unwrap_or_else(|_| HeaderValue::from_static("swr-proxy"))
}

impl Proxy {
    /// An answer from `entry` at once, counted: fresh or `stale`, with what
    /// was done about its refresh (always something when stale; for a fresh
    /// entry, a refresh queued ahead of staleness). Returns the cache status
    /// and the `Cache-Status` value to send.
    #[inline]
    pub(super) fn at_once(
        &self,
        entry: &Entry,
        stale: bool,
        refresh: Option<RefreshDecision>,
        now: Instant,
    ) -> (CacheStatus, HeaderValue) {
        let status = if stale {
            CacheStatus::Stale
        } else {
            CacheStatus::Hit
        };
        let answer = match refresh {
            Some(decision) => {
                let cache_status = StatusField {
                    hit: true,
                    ttl: Some(entry.ttl_secs(now)),
                    detail: Some(decision.as_str()),
                    ..StatusField::default()
                }
                .value();
                (status, cache_status)
            }
            None => (status, hit_cache_status(entry.ttl_secs(now))),
        };
        self.stats.record_request(answer.0);
        answer
    }

    /// The fast path's answer from `entry` (see [`Proxy::fast_hit`]),
    /// counted as [`Proxy::at_once`] counts it and for its `route` (hyper's
    /// path counts the route in [`Proxy::log_answer`]), with the `Age` and
    /// `Cache-Status` values [`crate::fast_hits`] writes.
    #[inline]
    pub(super) fn fast_answer(
        &self,
        entry: Entry,
        stale: bool,
        refresh: Option<RefreshDecision>,
        route: Option<&RouteStats>,
        now: Instant,
    ) -> FastHit {
        let (status, cache_status) = self.at_once(&entry, stale, refresh, now);
        let (age, ratio) = self.served(&entry, now);
        if let Some(route) = route {
            route.record(status);
        }
        self.stats.record_age_ratio(route, ratio);
        FastHit {
            status,
            age: small_number(age.as_secs()),
            cache_status,
            entry,
        }
    }

    /// The answer to a refused request, counted by its reason.
    pub(super) fn refused(&self, err: &ProxyError) -> Answered {
        self.stats.record_refused(err.detail());
        let field = StatusField {
            detail: Some(err.detail()),
            ..StatusField::default()
        };
        self.error_response(err, CacheStatus::Bypass, field)
    }

    /// Records an answer from the cache's age over its freshness lifetime
    /// (routed or not); counts the answer for its route and writes its
    /// access-log line, when there is a route or an access log (`log`).
    pub(super) fn log_answer(
        &self,
        log: Option<AnswerLog>,
        answered: Answered,
        client: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        let Answered {
            response,
            status,
            age_ratio,
        } = answered;
        let route = log.as_ref().and_then(|log| log.route.as_deref());
        if let Some(ratio) = age_ratio {
            self.stats.record_age_ratio(route, ratio);
        }
        let Some(log) = log else {
            return response;
        };
        if let Some(route) = &log.route {
            route.record(status);
        }
        let Some(access) = log.access else {
            return response;
        };
        let header = |name: &HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        tracing::info!(
            target: "swr_proxy::access",
            method = %access.method,
            uri = %access.uri,
            status = response.status().as_u16(),
            cache = status.as_str(),
            route = log.route.as_ref().map_or("-", |r| &*r.pattern),
            age = header(&header::AGE),
            took_us = access.started.elapsed().as_micros() as u64,
            upstream_us = response
                .extensions()
                .get::<UpstreamTime>()
                .map_or(0, |t| t.0.as_micros() as u64),
            client = client.map(|c| c.ip().to_string()).unwrap_or_default(),
        );
        response
    }

    pub(super) fn stored_response(
        &self,
        entry: &Entry,
        status: CacheStatus,
        fwd: &str,
        collapsed: bool,
        parts: &Parts,
    ) -> Answered {
        self.stats.record_request(status);
        let now = Instant::now();
        let cache_status = StatusField {
            fwd: Some(fwd),
            fwd_status: Some(entry.status().as_u16()),
            stored: true,
            collapsed,
            ttl: Some(entry.ttl_secs(now)),
            ..StatusField::default()
        }
        .value();
        self.entry_response(entry, status, cache_status, parts, now)
    }

    /// An answer from an entry another instance of the fleet stored (read
    /// from the shared level on a local miss): a hit, or a stale hit with
    /// its refresh queued, with `detail=l2`.
    pub(super) fn shared_response(
        &self,
        entry: &Entry,
        target: &FetchTarget,
        collapsed: bool,
        parts: &Parts,
    ) -> Answered {
        let now = Instant::now();
        let refresh = (entry.fresh_until() <= now).then(|| {
            let hash = self.keys.hash_text(entry.key());
            self.queue_refresh(hash, entry, || target.clone(), now)
        });
        let status = match refresh {
            Some(_) => CacheStatus::Stale,
            None => CacheStatus::Hit,
        };
        self.stats.record_request(status);
        let cache_status = StatusField {
            hit: true,
            collapsed,
            ttl: Some(entry.ttl_secs(now)),
            detail: Some(if refresh.is_some() { "l2-" } else { "l2" }),
            detail_suffix: refresh.map(RefreshDecision::as_str),
            ..StatusField::default()
        }
        .value();
        self.entry_response(entry, status, cache_status, parts, now)
    }

    pub(super) fn passed_response(&self, passed: Passed, fwd: &str, head: bool) -> Answered {
        self.stats.record_request(CacheStatus::Bypass);
        self.stats.record_bypass(passed.reason);
        tracing::debug!(
            reason = passed.reason.as_str(),
            status = passed.status.as_u16(),
            "bypass"
        );
        let body = if head {
            ProxyBody::empty()
        } else {
            passed.body
        };
        let mut response = Response::new(body);
        *response.status_mut() = passed.status;
        *response.headers_mut() = passed.headers;
        let headers = response.headers_mut();
        headers.insert(
            X_CACHE,
            HeaderValue::from_static(CacheStatus::Bypass.as_str()),
        );
        headers.insert(
            header::CACHE_STATUS,
            StatusField {
                fwd: Some(fwd),
                fwd_status: Some(passed.status.as_u16()),
                detail: Some(passed.reason.as_str()),
                ..StatusField::default()
            }
            .value(),
        );
        Answered {
            response,
            status: CacheStatus::Bypass,
            age_ratio: None,
        }
    }

    /// The backend failed: a stale copy within stale-if-error, or 502/504.
    pub(super) fn failed(
        &self,
        err: UpstreamError,
        stale: Option<&Entry>,
        status: CacheStatus,
        fwd: &str,
        parts: &Parts,
    ) -> Answered {
        let now = Instant::now();
        if let Some(entry) = stale.filter(|e| policy::usable_on_error(e, now)) {
            self.stats.record_request(CacheStatus::Stale);
            self.stats.stale_if_error_served.inc();
            if let Some(suppressed) = self.failure_line(("stale-if-error", err.kind.as_str())) {
                tracing::warn!(key = entry.key(), error = %err, suppressed,
                    "backend failed; serving stale (stale-if-error)");
            }
            let cache_status = StatusField {
                fwd: Some("stale"),
                ttl: Some(entry.ttl_secs(now)),
                detail: Some("stale-if-error-"),
                detail_suffix: Some(err.kind.as_str()),
                ..StatusField::default()
            }
            .value();
            return self.entry_response(entry, CacheStatus::Stale, cache_status, parts, now);
        }
        let field = StatusField {
            fwd: Some(fwd),
            detail: Some(err.kind.as_str()),
            ..StatusField::default()
        };
        self.error_response(&ProxyError::Upstream(err), status, field)
    }

    /// A pass-through the backend did not answer: 502/504, counted as a
    /// bypass for its `reason`.
    pub(super) fn pass_failed(
        &self,
        err: UpstreamError,
        reason: BypassReason,
        fwd: &str,
        parts: &Parts,
    ) -> Answered {
        self.stats.record_bypass(reason);
        self.failed(err, None, CacheStatus::Bypass, fwd, parts)
    }

    /// `504` to `Cache-Control: only-if-cached` when nothing stored may
    /// answer (RFC 9111 section 5.2.1.7).
    pub(super) fn not_cached(&self) -> Answered {
        let field = StatusField {
            fwd: Some("miss"),
            detail: Some("only-if-cached"),
            ..StatusField::default()
        };
        self.error_response(&ProxyError::NotCached, CacheStatus::Miss, field)
    }

    /// An error answer, counted: the status for the error, a one-line body
    /// naming the cause.
    fn error_response(
        &self,
        err: &ProxyError,
        status: CacheStatus,
        field: StatusField<'_>,
    ) -> Answered {
        self.stats.record_request(status);
        if err.status().is_client_error() {
            // Counted in swr_refused_total; a client cannot fill the log.
            tracing::debug!(error = %err, cache = status.as_str(), "refusing a bad request");
        } else if let Some(suppressed) = self.failure_line(("error answer", err.detail())) {
            tracing::warn!(error = %err, cache = status.as_str(), suppressed, "answering with an error");
        }
        let body = format!("swr-proxy: {}\n", err.client_message());
        let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
        *response.status_mut() = err.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
        headers.insert(header::CACHE_STATUS, field.value());
        Answered {
            response,
            status,
            age_ratio: None,
        }
    }

    /// Records an answer from `entry` (its age, its key among the top keys)
    /// and returns its age, and its age over its freshness lifetime (for the
    /// route's histogram, which the caller knows).
    fn served(&self, entry: &Entry, now: Instant) -> (Duration, f64) {
        let age = entry.age(now);
        self.stats.served_age.observe(age);
        self.stats.top_keys.record(entry.key());
        (age, entry.age_ratio(age))
    }

    /// An answer from a stored entry: `304` to a matching conditional
    /// request, else the stored response (without a body for HEAD). The body
    /// is shared by reference count.
    pub(super) fn entry_response(
        &self,
        entry: &Entry,
        status: CacheStatus,
        cache_status: HeaderValue,
        parts: &Parts,
        now: Instant,
    ) -> Answered {
        let conditional = parts.headers.contains_key(header::IF_NONE_MATCH)
            || parts.headers.contains_key(header::IF_MODIFIED_SINCE);
        let not_modified = conditional && policy::client_not_modified(entry, &parts.headers);
        let (mut headers, body) = entry.answer(3);
        let body = if not_modified {
            self.stats.not_modified_served.inc();
            headers.remove(header::CONTENT_LENGTH);
            ProxyBody::empty()
        } else if parts.method == Method::HEAD {
            ProxyBody::empty()
        } else {
            ProxyBody::full(body)
        };
        let (age, ratio) = self.served(entry, now);
        headers.insert(header::AGE, small_number(age.as_secs()));
        headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
        headers.insert(header::CACHE_STATUS, cache_status);
        let mut response = Response::new(body);
        *response.status_mut() = if not_modified {
            StatusCode::NOT_MODIFIED
        } else {
            entry.status()
        };
        *response.headers_mut() = headers;
        Answered {
            response,
            status,
            age_ratio: Some(ratio),
        }
    }
}
