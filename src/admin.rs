//! The admin API, on its own listener: health, Prometheus metrics, a JSON
//! summary, configuration reload, and purge (hard, or soft: marked stale and refreshed by the next
//! request, so a purge after a model release never stampedes the backend).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::ProxyBody;
use crate::cache::CacheStatus;
use crate::fleet::events::Scope;
use crate::metrics::{self, Stats, UpstreamCause};
use crate::proxy::Proxy;

/// Largest admin request body read.
const MAX_BODY: usize = 64 * 1024;

/// Answers one admin request.
pub async fn handle(
    proxy: Arc<Proxy>,
    token: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(token) = &token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|given| token_matches(given, token.as_bytes())) {
            let mut response = text(
                StatusCode::UNAUTHORIZED,
                "admin: a bearer token is required\n",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"swr-proxy admin\""),
            );
            return response;
        }
    }
    if token.is_none() && !is_local_host(request.headers()) {
        // Without a token, only a loopback listener is allowed, and a page
        // reaches it by name only through DNS rebinding.
        return text(
            StatusCode::FORBIDDEN,
            "admin: without --admin-token, Host must be an address or localhost\n",
        );
    }
    let method = request.method().clone();
    if method == Method::POST && !is_json(request.headers()) {
        // A web page can make a browser POST a form or text to any address,
        // 127.0.0.1 included, without asking first; it cannot send JSON
        // without a CORS preflight, which this API never grants.
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "admin: POST needs Content-Type: application/json\n",
        );
    }
    match (method, request.uri().path()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        // Ready once the proxy listens, which happens before the admin API starts.
        (Method::GET, "/readyz") => match proxy.redis_up() {
            None => text(StatusCode::OK, "ready\n"),
            Some(true) => text(StatusCode::OK, "ready\nredis: up\n"),
            // Still serving from memory and the backend: ready, unless
            // the operator asked for Redis to be required.
            Some(false) if proxy.config().start.redis_required => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\nredis: down\n")
            }
            Some(false) => text(StatusCode::OK, "ready\nredis: down\n"),
        },
        (Method::GET, "/metrics") => match proxy.render_metrics() {
            Ok(metrics) => {
                let mut response = text(StatusCode::OK, &metrics);
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                response
            }
            Err(err) => {
                tracing::error!(error = %err, "a metric failed to encode");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "admin: the metrics could not be encoded\n",
                )
            }
        },
        (Method::GET, "/stats") => json(StatusCode::OK, &stats(&proxy)),
        (Method::POST, "/purge") => purge(&proxy, request).await,
        (Method::POST, "/reload") => match proxy.reload() {
            Ok(reloaded) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "reloaded": true,
                    "routes": reloaded.routes,
                    "at_next_start": reloaded.at_next_start,
                }),
            ),
            Err(err) => {
                tracing::warn!(error = %err, "reload rejected; keeping the running configuration");
                text(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("admin: reload rejected: {err}\n"),
                )
            }
        },
        (_, "/healthz" | "/readyz" | "/metrics" | "/stats" | "/purge" | "/reload") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "admin: method not allowed\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "admin: try /healthz, /readyz, /metrics, /stats or POST /purge\n",
        ),
    }
}

/// Compares a given token with the expected one in time that does not
/// depend on where they differ (only on their lengths).
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.ct_eq(expected).into()
}

/// Whether `Host` is absent, an IP address or `localhost` (with any port):
/// not a name a DNS rebinding page could have pointed at this listener.
fn is_local_host(headers: &http::HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(a, _)| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Whether a request says its body is JSON (`application/json`, with any
/// parameters).
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// `POST /purge` with exactly one of `{"key": ...}`, `{"prefix": ...}` or
/// `{"all": true}`, and optionally `"soft": true`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    key: Option<String>,
    prefix: Option<String>,
    all: Option<bool>,
    #[serde(default)]
    soft: bool,
}

async fn purge(proxy: &Proxy, request: Request<Incoming>) -> Response<ProxyBody> {
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "admin: body too large\n"),
    };
    let purge: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(purge) => purge,
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("admin: expected {{\"key\"|\"prefix\"|\"all\", \"soft\"}}: {err}\n"),
            )
        }
    };
    let soft = purge.soft;
    let scope = match (purge.key, purge.prefix, purge.all) {
        (Some(key), None, None) => Scope::Key(strip_scheme(&key).to_string()),
        (None, Some(prefix), None) => Scope::Prefix(strip_scheme(&prefix).to_string()),
        (None, None, Some(true)) => Scope::All,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "admin: give exactly one of \"key\", \"prefix\" or \"all\": true\n",
            )
        }
    };
    let (affected, shared) = proxy.purge(scope, soft).await;
    tracing::info!(affected, shared, soft, "purge");
    let mut answer = serde_json::json!({ "purged": affected, "soft": soft });
    if proxy.redis_up().is_some() {
        // How many entries the shared level held (null: Redis did not answer).
        answer["shared"] = serde_json::json!(shared);
    }
    json(StatusCode::OK, &answer)
}

/// Keys are `host` + `path?query`; a URL's scheme is accepted and dropped.
fn strip_scheme(text: &str) -> &str {
    text.strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .unwrap_or(text)
}

fn stats(proxy: &Proxy) -> serde_json::Value {
    let s: &Stats = proxy.stats();
    let requests: serde_json::Map<String, serde_json::Value> = CacheStatus::ALL
        .iter()
        .map(|status| (status.as_str().to_string(), s.requests(*status).into()))
        .collect();
    let from_cache = s.requests(CacheStatus::Hit) + s.requests(CacheStatus::Stale);
    let cacheable = from_cache + s.requests(CacheStatus::Miss) + s.requests(CacheStatus::Expired);
    let hit_ratio = if cacheable == 0 {
        0.0
    } else {
        from_cache as f64 / cacheable as f64
    };
    let upstream: serde_json::Map<String, serde_json::Value> = UpstreamCause::ALL
        .iter()
        .map(|cause| {
            (
                cause.as_str().to_string(),
                s.upstream_requests(*cause).into(),
            )
        })
        .collect();
    let store = proxy.store();
    serde_json::json!({
        "requests": requests,
        "hit_ratio": hit_ratio,
        "entries": store.entry_count(),
        "bytes": store.weighted_size(),
        "max_bytes": store.max_bytes(),
        "evictions": store.evictions(),
        "refresh": {
            "queue_depth": proxy.refresh_queue_depth(),
            "in_flight": s.refresh_in_flight.get(),
            "queued": s.refresh_queued.get(),
            "dropped": s.refresh_dropped.get(),
            "succeeded": s.refresh_succeeded.get(),
            "failed": s.refresh_failed.get(),
            "backoff": s.refresh_backoff.get(),
        },
        "upstream_requests": upstream,
        "coalesced_waiters": s.coalesced_waiters.get(),
        "stale_if_error": s.stale_if_error_served.get(),
        "purged": s.purged.get(),
        "top_keys": s
            .top_keys
            .top(10)
            .into_iter()
            .map(|(key, answers)| serde_json::json!({ "key": key, "answers": answers }))
            .collect::<Vec<_>>(),
    })
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_scheme_is_dropped() {
        assert_eq!(strip_scheme("http://h/a"), "h/a");
    }

    #[test]
    fn tokens_and_json() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cres", b"s3cret"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"", b"s3cret"));
        let with = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_json(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!is_json(&http::HeaderMap::new()));
        let host = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static(value));
            is_local_host(&headers)
        };
        for local in [
            "127.0.0.1:6180",
            "localhost:6180",
            "LOCALHOST",
            "[::1]:6180",
            "10.1.2.3",
        ] {
            assert!(host(local), "{local}");
        }
        for remote in [
            "rebind.attacker.example:6180",
            "localhost.attacker.example",
            "[::1",
        ] {
            assert!(!host(remote), "{remote}");
        }
    }
}
