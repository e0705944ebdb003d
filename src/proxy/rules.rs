//! The rules a request is cached by, as the running configuration has
//! them: the defaults and the routes (swapped whole by a reload), who the
//! peer is, and what of a request makes its key (host, shaped target,
//! route cookies, variant text). Reads requests only: nothing here touches
//! the store or the backend. Building the rules finds (or creates) each
//! route's counters, so that they survive a reload; counting is done by
//! `respond.rs` and the fast path.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::cache::key::{keyed_cookies, valid_host, RequestKey};
use crate::cache::policy::Defaults;
use crate::cache::vary::VariantKey;
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::{RouteStats, Stats};
use crate::routes::{route_path, Cookies, Route};

/// The rules requests are cached by: the defaults, and the routes (first
/// match wins), each with its own defaults.
pub struct Rules {
    pub(super) defaults: Arc<Defaults>,
    pub(super) routes: Vec<RouteInForce>,
    pub(super) honor_client_cache_control: bool,
    /// Requests a minute from which a key outside every route is refreshed
    /// ahead (`--refresh-ahead`; 0: never).
    pub(super) refresh_ahead: usize,
    /// Peers whose forwarding headers are kept (`--trust-forwarded`).
    pub(super) trust_forwarded: Vec<ipnet::IpNet>,
}

/// A route as the running rules hold it: its options, the lifetimes it
/// gives answers, and its counters (kept across reloads by pattern).
pub(super) struct RouteInForce {
    pub(super) route: Route,
    pub(super) defaults: Arc<Defaults>,
    pub(super) stats: Arc<RouteStats>,
}

impl Rules {
    /// `stats` keeps each route's counters across reloads, by pattern.
    /// `targeted` is the field targeted at this proxy as it started: a
    /// start setting, which a reload does not change (the answers' headers
    /// hide the one the proxy started with; the rules read the same one).
    pub(super) fn from_config(config: &Config, stats: &Stats, targeted: &HeaderName) -> Rules {
        let defaults = |ttl, heuristic: Option<u8>, swr, sie, mode| {
            Arc::new(Defaults {
                ttl,
                stale_while_revalidate: swr,
                stale_if_error: sie,
                mode,
                targeted: targeted.clone(),
                heuristic_percent: heuristic
                    .or_else(|| Defaults::default_heuristic(ttl))
                    .filter(|&p| p > 0),
            })
        };
        Rules {
            defaults: defaults(
                config.live.ttl,
                config.live.heuristic_freshness,
                config.live.stale_while_revalidate,
                config.live.stale_if_error,
                config.live.cache_control,
            ),
            routes: config
                .routes
                .iter()
                .map(|r| {
                    let lifetimes = defaults(
                        r.ttl,
                        r.heuristic_freshness,
                        r.stale_while_revalidate,
                        r.stale_if_error,
                        r.cache_control,
                    );
                    RouteInForce {
                        route: r.clone(),
                        defaults: lifetimes,
                        stats: stats.route(&r.pattern),
                    }
                })
                .collect(),
            honor_client_cache_control: config.live.honor_client_cache_control,
            refresh_ahead: config.live.refresh_ahead,
            trust_forwarded: config.live.trust_forwarded.clone(),
        }
    }

    /// Who sent a request, and whether its forwarding headers are trusted.
    pub(super) fn peer(&self, addr: Option<SocketAddr>) -> Peer {
        let trusted = !self.trust_forwarded.is_empty()
            && addr.is_some_and(|addr| {
                let ip = addr.ip().to_canonical();
                self.trust_forwarded.iter().any(|net| net.contains(&ip))
            });
        Peer { addr, trusted }
    }

    /// The route a request path takes (first match), if any, matched as
    /// a backend reads the path ([`route_path`]).
    pub(super) fn route_for(&self, path: &str) -> Option<&RouteInForce> {
        if self.routes.is_empty() {
            return None;
        }
        let path = route_path(path);
        self.routes.iter().find(|r| r.route.matches(&path))
    }
}

/// The client a request came from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) addr: Option<SocketAddr>,
    /// A proxy in front of swr-proxy (`--trust-forwarded`): its
    /// `X-Forwarded-*` and `Forwarded` headers are kept and appended to.
    pub(super) trusted: bool,
}

/// A request's headers as its route's `cookies` setting leaves them: as
/// sent (`private`), without `Cookie` (`ignore`), or with only the cookies
/// the key names. What both the variant lookup and the fetch read.
pub(super) fn route_headers<'a>(
    route: Option<&Route>,
    headers: &'a HeaderMap,
) -> Cow<'a, HeaderMap> {
    let Some(cookies) = route
        .map(|r| &r.cookies)
        .filter(|c| **c != Cookies::Private)
    else {
        return Cow::Borrowed(headers);
    };
    let mut headers = headers.clone();
    match cookies {
        Cookies::Key(names) => {
            let kept = keyed_cookies(&headers, names);
            match HeaderValue::from_str(&kept) {
                Ok(value) if !kept.is_empty() => {
                    headers.insert(header::COOKIE, value);
                }
                _ => {
                    headers.remove(header::COOKIE);
                }
            }
        }
        Cookies::Ignore | Cookies::Private => {
            headers.remove(header::COOKIE);
        }
    }
    Cow::Owned(headers)
}

/// The key text of the variant `names` select for these request headers.
pub(super) fn variant_text(
    key: RequestKey<'_>,
    names: &[HeaderName],
    headers: &HeaderMap,
) -> String {
    VariantKey::new(&key.to_text(), names, headers).into_string()
}

/// The path and query of a `Location`-style value if it points at `host`
/// (a path, or an absolute URL with the same authority).
pub(super) fn same_origin_path(value: &str, host: &str) -> Option<String> {
    if value.starts_with('/') && !value.starts_with("//") {
        return Some(value.to_string());
    }
    let uri: http::Uri = value.parse().ok()?;
    let authority = uri.authority()?;
    if !authority.as_str().eq_ignore_ascii_case(host) {
        return None;
    }
    Some(
        uri.path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string(),
    )
}

/// The host a request is for: the URI's authority (HTTP/2, absolute form),
/// else the `Host` header, else empty (HTTP/1.0 without one). A request
/// with two `Host` fields, an invalid one, an HTTP/1.1 request without one,
/// or an HTTP/2 request whose `Host` differs from its authority is a bad
/// request (RFC 9112 §3.2, RFC 9113 §8.3.1).
pub(super) fn request_host(parts: &Parts) -> Result<&str, ProxyError> {
    let mut fields = parts.headers.get_all(header::HOST).iter();
    let field = fields.next();
    if fields.next().is_some() {
        return Err(ProxyError::BadHost("more than one Host header"));
    }
    let field = match field {
        Some(value) if valid_host(value.as_bytes()) => value.to_str().ok(),
        Some(_) => return Err(ProxyError::BadHost("the Host header is not a host[:port]")),
        None => None,
    };
    if let Some(authority) = parts.uri.authority() {
        let authority = authority.as_str();
        if !valid_host(authority.as_bytes()) {
            return Err(ProxyError::BadHost(
                "the request target's authority is not a host[:port]",
            ));
        }
        if parts.version == http::Version::HTTP_2
            && field.is_some_and(|host| !host.eq_ignore_ascii_case(authority))
        {
            return Err(ProxyError::BadHost(
                "the Host header differs from the request's authority",
            ));
        }
        if parts.version == http::Version::HTTP_11 && field.is_none() {
            return Err(ProxyError::BadHost(
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        return Ok(authority);
    }
    match field {
        Some(host) => Ok(host),
        None if parts.version <= http::Version::HTTP_10 => Ok(""),
        None => Err(ProxyError::BadHost(
            "an HTTP/1.1 request needs a Host header",
        )),
    }
}

/// A host as the key has it: lowercase, copied only when it is not already.
pub(super) fn lowercase(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}
