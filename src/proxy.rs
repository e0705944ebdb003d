//! The hyper service: request -> cache decision -> upstream -> response.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyDataStream, Full};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::cache::entry::Entry;
use crate::cache::key::{KeyHasher, RequestKey};
use crate::cache::policy::{self, BypassReason, Defaults, EntryState, Storability};
use crate::cache::store::{self, Fill, FillOutcome, Store};
use crate::cache::CacheStatus;
use crate::config::Config;
use crate::error::{ProxyError, UpstreamError, UpstreamErrorKind};
use crate::metrics::{Stats, UpstreamCause};
use crate::refresh::{Enqueue, Job, RefreshQueue};
use crate::upstream::{self, BodyRead, BoxError, Upstream};

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How often entries that can no longer be served are swept out.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The proxy's shared state: one per process, shared by every connection.
pub struct Proxy {
    config: Config,
    defaults: Defaults,
    keys: KeyHasher,
    store: Store,
    refresh: RefreshQueue<RefreshRequest>,
    upstream: Upstream,
    stats: Stats,
}

/// What a background refresh needs to re-fetch an entry.
pub struct RefreshRequest {
    key: Box<str>,
    path_and_query: Box<str>,
    headers: HeaderMap,
}

/// The result of fetching a response to store it.
enum Fetched {
    /// Storable and read whole; not yet inserted.
    Entry(Arc<Entry>),
    /// Not storable: passed through as a stream.
    Pass(Passed),
    /// The backend failed (no response, or the exchange broke).
    Failed(UpstreamError),
}

/// A backend response passed through without being stored.
struct Passed {
    reason: BypassReason,
    status: StatusCode,
    headers: HeaderMap,
    body: ProxyBody,
}

/// What the leader of a fill answers its own client with.
enum LeaderAnswer {
    Stored(Arc<Entry>),
    Pass(Passed),
    Failed(UpstreamError),
}

impl Proxy {
    /// Builds the proxy and starts its refresh workers, which stop when
    /// `cancel` fires.
    pub fn start(
        config: Config,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Proxy>, String> {
        let upstream = Upstream::new(&config.upstream, config.upstream_timeout)?;
        // A claim that outlives two upstream timeouts belongs to a stuck fetch.
        let (refresh, workers) =
            RefreshQueue::new(config.refresh_queue, config.upstream_timeout * 2);
        let proxy = Arc::new(Proxy {
            defaults: Defaults {
                ttl: config.ttl,
                stale_while_revalidate: config.stale_while_revalidate,
                stale_if_error: config.stale_if_error,
            },
            keys: KeyHasher::new(),
            store: Store::new(config.max_size_bytes),
            refresh,
            upstream,
            stats: Stats::default(),
            config,
        });
        // Entries past every window are dropped lazily by reads and eviction;
        // the sweep returns their memory when nothing else would.
        let sweep_proxy = Arc::clone(&proxy);
        let sweep_cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let removed = sweep_proxy.store.sweep(Instant::now());
                        if removed > 0 {
                            tracing::debug!(removed, "swept unservable entries");
                        }
                    }
                    () = sweep_cancel.cancelled() => break,
                }
            }
        });
        let worker_proxy = Arc::clone(&proxy);
        workers.spawn(
            proxy.config.refresh_concurrency,
            move |job| Arc::clone(&worker_proxy).run_refresh(job),
            cancel,
            tracker,
        );
        Ok(proxy)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Refreshes waiting for a worker.
    pub fn refresh_queue_depth(&self) -> usize {
        self.refresh.depth()
    }

    /// Answers one request.
    pub async fn handle<B>(
        self: &Arc<Self>,
        request: Request<B>,
        client: Option<SocketAddr>,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        if !policy::method_is_cacheable(&parts.method) {
            return self
                .pass(&parts, Some(body), client, BypassReason::Method)
                .await;
        }
        let host = match request_host(&parts) {
            Ok(host) => host,
            Err(err) => return self.error_response(&err, CacheStatus::Bypass, "detail=bad-host"),
        };
        let host = lowercase(host);
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let key = self.keys.key(&host, path_and_query);
        let head = parts.method == Method::HEAD;
        let now = Instant::now();

        let stale = match self.store.get(&key, now) {
            Some(entry) => match policy::entry_state(&entry, now) {
                EntryState::Fresh => {
                    self.stats.record_request(CacheStatus::Hit);
                    let cache_status = hit_cache_status(entry.ttl_secs(now));
                    return entry_response(&entry, CacheStatus::Hit, cache_status, head, now);
                }
                EntryState::Stale => {
                    let queued = self.queue_refresh(&key, &entry, &parts.headers, client);
                    self.stats.record_request(CacheStatus::Stale);
                    let cache_status = formatted(format_args!(
                        "swr-proxy; hit; ttl={}; detail={}",
                        entry.ttl_secs(now),
                        match queued {
                            Enqueue::Queued => "refresh-queued",
                            Enqueue::AlreadyClaimed => "refresh-pending",
                            Enqueue::Dropped => "refresh-dropped",
                        }
                    ));
                    return entry_response(&entry, CacheStatus::Stale, cache_status, head, now);
                }
                EntryState::Expired => Some(entry),
            },
            None => None,
        };
        drop(body);
        self.fill(&parts, key, stale, client).await
    }

    /// Queues a background refresh of a stale entry, without waiting.
    fn queue_refresh(
        &self,
        key: &RequestKey<'_>,
        entry: &Arc<Entry>,
        headers: &HeaderMap,
        client: Option<SocketAddr>,
    ) -> Enqueue {
        let result = self.refresh.try_enqueue(key.hash, || RefreshRequest {
            key: entry.key().into(),
            path_and_query: key.path_and_query.into(),
            headers: fill_headers(headers, client),
        });
        match result {
            Enqueue::Queued => {
                self.stats.refresh_queued.fetch_add(1, Relaxed);
            }
            Enqueue::Dropped => {
                self.stats.refresh_dropped.fetch_add(1, Relaxed);
                tracing::debug!(key = entry.key(), reason = "queue-full", "refresh dropped");
            }
            Enqueue::AlreadyClaimed => {}
        }
        result
    }

    /// A background refresh: re-fetches and replaces the entry, or keeps the
    /// old one when the backend fails.
    async fn run_refresh(self: Arc<Self>, job: Job<RefreshRequest>) {
        let _in_flight = self.stats.refresh_started();
        let started = Instant::now();
        let request = &job.payload;
        self.stats.record_upstream_request(UpstreamCause::Refresh);
        let fetched = self
            .fetch(
                request.key.clone(),
                &request.path_and_query,
                request.headers.clone(),
            )
            .await;
        let took_ms = started.elapsed().as_millis() as u64;
        match fetched {
            Fetched::Entry(entry) => {
                self.store.insert(job.hash, entry);
                self.stats.refresh_succeeded.fetch_add(1, Relaxed);
                tracing::info!(key = %request.key, took_ms, "refreshed");
            }
            Fetched::Pass(passed) if policy::status_is_error(passed.status) => {
                self.stats.refresh_failed.fetch_add(1, Relaxed);
                tracing::warn!(key = %request.key, took_ms, status = passed.status.as_u16(),
                    "refresh failed; keeping the stale entry");
            }
            Fetched::Pass(passed) => {
                self.store.remove(job.hash, &request.key);
                self.stats.refresh_not_storable.fetch_add(1, Relaxed);
                tracing::info!(key = %request.key, took_ms, reason = passed.reason.as_str(),
                    "refresh answer may not be stored; entry removed");
            }
            Fetched::Failed(err) => {
                self.stats.refresh_failed.fetch_add(1, Relaxed);
                tracing::warn!(key = %request.key, took_ms, error = %err,
                    "refresh failed; keeping the stale entry");
            }
        }
    }

    /// Fetches a response for the cache (always a GET): reads it whole when it
    /// may be stored, or hands it back to be streamed when it may not.
    async fn fetch(&self, key: Box<str>, path_and_query: &str, headers: HeaderMap) -> Fetched {
        let request_time = Instant::now();
        let response = match self
            .upstream
            .send(Method::GET, path_and_query, headers, None)
            .await
        {
            Ok(response) => response,
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                return Fetched::Failed(err);
            }
        };
        let status = response.status();
        if policy::status_is_error(status) {
            self.stats.record_upstream_error(UpstreamErrorKind::Status);
        }
        let response_delay = request_time.elapsed();
        let lifetimes =
            match policy::storability(status, response.headers(), response_delay, &self.defaults) {
                Storability::Store(lifetimes) => lifetimes,
                Storability::Bypass(reason) => {
                    return Fetched::Pass(Passed {
                        reason,
                        status,
                        headers: upstream::response_headers(response.headers()),
                        body: upstream::stream_body(Vec::new(), response),
                    })
                }
            };
        let headers = upstream::response_headers(response.headers());
        match self
            .upstream
            .read_body(response, self.config.max_object_size_bytes)
            .await
        {
            Ok(BodyRead::Complete(body)) => Fetched::Entry(Arc::new(Entry::new(
                &key,
                status,
                &headers,
                &body,
                Instant::now(),
                lifetimes,
            ))),
            Ok(BodyRead::TooLarge { prefix, rest }) => Fetched::Pass(Passed {
                reason: BypassReason::TooLarge,
                status,
                headers,
                body: upstream::stream_body(prefix, rest),
            }),
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                Fetched::Failed(err)
            }
        }
    }

    /// A miss or an expired entry: one backend fetch per key, however many
    /// clients wait for it.
    async fn fill(
        self: &Arc<Self>,
        parts: &Parts,
        key: RequestKey<'_>,
        stale: Option<Arc<Entry>>,
        client: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        let status = if stale.is_some() {
            CacheStatus::Expired
        } else {
            CacheStatus::Miss
        };
        let fwd = if stale.is_some() { "stale" } else { "uri-miss" };
        let head = parts.method == Method::HEAD;
        // A leader that vanished (its task panicked) lets a waiter lead the next try.
        for _attempt in 0..3 {
            match self.store.begin_fill(key.hash) {
                Fill::Leader(guard) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let proxy = Arc::clone(self);
                    let key_text = key.to_text();
                    let hash = key.hash;
                    let path_and_query: Box<str> = key.path_and_query.into();
                    let headers = fill_headers(&parts.headers, client);
                    let fallback = stale.clone();
                    // The fetch runs in its own task: a client that goes away
                    // does not cancel the fill the waiters depend on.
                    tokio::spawn(async move {
                        proxy.stats.record_upstream_request(UpstreamCause::Miss);
                        let fetched = proxy.fetch(key_text, &path_and_query, headers).await;
                        let fallback_usable = fallback
                            .as_ref()
                            .is_some_and(|e| policy::usable_on_error(e, Instant::now()));
                        let (outcome, answer) = match fetched {
                            Fetched::Entry(entry) => {
                                proxy.store.insert(hash, Arc::clone(&entry));
                                (
                                    FillOutcome::Stored(Arc::clone(&entry)),
                                    LeaderAnswer::Stored(entry),
                                )
                            }
                            Fetched::Pass(passed)
                                if fallback_usable && policy::status_is_error(passed.status) =>
                            {
                                let err = UpstreamError::new(
                                    UpstreamErrorKind::Status,
                                    format!("HTTP {}", passed.status.as_u16()),
                                );
                                (FillOutcome::Failed(err.clone()), LeaderAnswer::Failed(err))
                            }
                            Fetched::Pass(passed) => {
                                (FillOutcome::NotShared, LeaderAnswer::Pass(passed))
                            }
                            Fetched::Failed(err) => {
                                (FillOutcome::Failed(err.clone()), LeaderAnswer::Failed(err))
                            }
                        };
                        guard.complete(outcome);
                        // The leader's client may have gone away; nothing to do then.
                        let _ = tx.send(answer);
                    });
                    let Ok(answer) = rx.await else { continue };
                    return match answer {
                        LeaderAnswer::Stored(entry) => {
                            self.stats.record_request(status);
                            let now = Instant::now();
                            let cache_status = formatted(format_args!(
                                "swr-proxy; fwd={fwd}; fwd-status={}; stored; ttl={}",
                                entry.status.as_u16(),
                                entry.ttl_secs(now)
                            ));
                            entry_response(&entry, status, cache_status, head, now)
                        }
                        LeaderAnswer::Pass(passed) => self.passed_response(passed, fwd, head),
                        LeaderAnswer::Failed(err) => {
                            self.failed(err, stale.as_deref(), status, fwd, head)
                        }
                    };
                }
                Fill::Follower(slot) => {
                    self.stats.coalesced_waiters.fetch_add(1, Relaxed);
                    match store::wait_fill(slot).await {
                        Some(FillOutcome::Stored(entry)) => {
                            self.stats.record_request(status);
                            let now = Instant::now();
                            let cache_status = formatted(format_args!(
                                "swr-proxy; fwd={fwd}; fwd-status={}; stored; collapsed; ttl={}",
                                entry.status.as_u16(),
                                entry.ttl_secs(now)
                            ));
                            return entry_response(&entry, status, cache_status, head, now);
                        }
                        Some(FillOutcome::NotShared) => {
                            // Never hand one client's unshareable answer to another:
                            // fetch for this client alone.
                            return self
                                .pass::<Full<Bytes>>(parts, None, client, BypassReason::Status)
                                .await;
                        }
                        Some(FillOutcome::Failed(err)) => {
                            return self.failed(err, stale.as_deref(), status, fwd, head)
                        }
                        None => continue,
                    }
                }
            }
        }
        self.error_response(
            &ProxyError::Internal("the fill of this key was abandoned three times".into()),
            status,
            "detail=fill-abandoned",
        )
    }

    /// Passes a request through to the backend, streaming both ways; nothing is stored.
    async fn pass<B>(
        &self,
        parts: &Parts,
        body: Option<B>,
        client: Option<SocketAddr>,
        reason: BypassReason,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let headers = upstream::forward_headers(&parts.headers, client);
        let body = body.map(|b| reqwest::Body::wrap_stream(BodyDataStream::new(b)));
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.stats.record_upstream_request(UpstreamCause::Pass);
        let head = parts.method == Method::HEAD;
        let fwd = if reason == BypassReason::Method {
            "method"
        } else {
            "bypass"
        };
        match self
            .upstream
            .send(parts.method.clone(), path_and_query, headers, body)
            .await
        {
            Ok(response) => {
                let status = response.status();
                if policy::status_is_error(status) {
                    self.stats.record_upstream_error(UpstreamErrorKind::Status);
                }
                let passed = Passed {
                    reason,
                    status,
                    headers: upstream::response_headers(response.headers()),
                    body: upstream::stream_body(Vec::new(), response),
                };
                self.passed_response(passed, fwd, head)
            }
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                self.stats.record_request(CacheStatus::Bypass);
                self.stats.record_bypass(reason);
                let detail = format!("fwd={fwd}; detail={}", err.kind.as_str());
                self.error_response(&ProxyError::Upstream(err), CacheStatus::Bypass, &detail)
            }
        }
    }

    fn passed_response(&self, passed: Passed, fwd: &str, head: bool) -> Response<ProxyBody> {
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
            CACHE_STATUS,
            formatted(format_args!(
                "swr-proxy; fwd={fwd}; fwd-status={}; detail={}",
                passed.status.as_u16(),
                passed.reason.as_str()
            )),
        );
        response
    }

    /// The backend failed: a stale copy within stale-if-error, or 502/504.
    fn failed(
        &self,
        err: UpstreamError,
        stale: Option<&Entry>,
        status: CacheStatus,
        fwd: &str,
        head: bool,
    ) -> Response<ProxyBody> {
        let now = Instant::now();
        if let Some(entry) = stale.filter(|e| policy::usable_on_error(e, now)) {
            self.stats.record_request(CacheStatus::Stale);
            self.stats.stale_if_error_served.fetch_add(1, Relaxed);
            tracing::warn!(key = entry.key(), error = %err, "backend failed; serving stale (stale-if-error)");
            let cache_status = formatted(format_args!(
                "swr-proxy; fwd=stale; ttl={}; detail=stale-if-error-{}",
                entry.ttl_secs(now),
                err.kind.as_str()
            ));
            return entry_response(entry, CacheStatus::Stale, cache_status, head, now);
        }
        self.stats.record_request(status);
        let detail = format!("fwd={fwd}; detail={}", err.kind.as_str());
        self.error_response(&ProxyError::Upstream(err), status, &detail)
    }

    /// An error answer: the status for the error, a one-line body naming the cause.
    fn error_response(
        &self,
        err: &ProxyError,
        status: CacheStatus,
        cache_status_params: &str,
    ) -> Response<ProxyBody> {
        tracing::warn!(error = %err, cache = status.as_str(), "answering with an error");
        let body = format!("swr-proxy: {err}\n");
        let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
        *response.status_mut() = err.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
        headers.insert(
            CACHE_STATUS,
            formatted(format_args!("swr-proxy; {cache_status_params}")),
        );
        response
    }
}

/// The host a request is for: the URI's authority (HTTP/2, absolute form),
/// else the `Host` header, else empty (HTTP/1.0).
fn request_host(parts: &Parts) -> Result<&str, ProxyError> {
    if let Some(authority) = parts.uri.authority() {
        return Ok(authority.as_str());
    }
    match parts.headers.get(header::HOST) {
        Some(host) => host
            .to_str()
            .map_err(|_| ProxyError::BadRequest("the Host header is not valid text")),
        None => Ok(""),
    }
}

fn lowercase(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// Headers for a fetch made on behalf of the cache: the client's forwarded
/// headers without its conditionals and ranges (the cache wants the whole,
/// storable response).
fn fill_headers(client_headers: &HeaderMap, client: Option<SocketAddr>) -> HeaderMap {
    let mut headers = upstream::forward_headers(client_headers, client);
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
    headers
}

/// An answer from a stored entry. The body is shared by reference count.
fn entry_response(
    entry: &Entry,
    status: CacheStatus,
    cache_status: HeaderValue,
    head: bool,
    now: Instant,
) -> Response<ProxyBody> {
    let body = if head { Bytes::new() } else { entry.body() };
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = entry.status;
    let mut headers = entry.header_map(3);
    headers.insert(header::AGE, small_number(entry.age(now).as_secs()));
    headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
    headers.insert(CACHE_STATUS, cache_status);
    *response.headers_mut() = headers;
    response
}

/// Values up to this are served from a table built once, not formatted per answer.
const TABLE_SIZE: u64 = 4096;

/// A header value for a small number (`Age`), from a table when it can.
fn small_number(n: u64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| (0..TABLE_SIZE).map(HeaderValue::from).collect());
    match usize::try_from(n).ok().and_then(|i| table.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(n),
    }
}

/// `Cache-Status` of a fresh hit with `ttl` seconds left.
fn hit_cache_status(ttl: i64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..TABLE_SIZE)
            .map(|n| formatted(format_args!("swr-proxy; hit; ttl={n}")))
            .collect()
    });
    match usize::try_from(ttl).ok().and_then(|i| table.get(i)) {
        Some(value) => value.clone(),
        None => formatted(format_args!("swr-proxy; hit; ttl={ttl}")),
    }
}

/// A header value from formatted text. The text is built from our own
/// constants and numbers, so it is always a valid value.
fn formatted(args: std::fmt::Arguments<'_>) -> HeaderValue {
    HeaderValue::try_from(args.to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("swr-proxy"))
}
