//! The hyper service: request -> cache decision -> upstream -> response.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyDataStream, Full};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::cache::entry::Entry;
use crate::cache::key::{keyed_cookies, valid_host, valid_target, KeyHasher, RequestKey};
use crate::cache::policy::{
    self, BypassReason, Defaults, RequestDirectives, RequestFacts, Storability, Use,
};
use crate::cache::status_field::StatusField;
use crate::cache::store::{self, Fill, FillOutcome, Store};
use crate::cache::CacheStatus;
use crate::config::{Config, ConfigError, Cookies, HeadLimits, Route};
use crate::error::{ProxyError, UpstreamError, UpstreamErrorKind};
use crate::logs::{self, Cause, RateLimit, Summary, Totals};
use crate::metrics::{Gauges, RouteStats, Stats, UpstreamCause};
use crate::refresh::{Enqueue, Job, RefreshQueue};
use crate::upstream::{self, BodyRead, BoxError, Priority, Upstream};

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How often entries that can no longer be served are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// At most one failure line per cause this often; the next says how many
/// were left out. A backend outage at 10,000 requests a second is a handful
/// of lines, not 10,000 a second at a log sink that then falls behind.
const FAILURE_LINE_EVERY: Duration = Duration::from_secs(10);

/// Locks a std mutex; a poisoned one (a panic while held) still holds a
/// consistent map, since every use is a single map operation.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The proxy's shared state: one per process, shared by every connection.
pub struct Proxy {
    config: Config,
    /// `--max-request-line` and `--max-request-headers` (fixed at start).
    limits: HeadLimits,
    /// Per-route counters, kept across reloads (a route's counters survive
    /// as long as its pattern does).
    route_stats: Mutex<Vec<Arc<RouteStats>>>,
    /// What a reload can change: the routes and the caching rules. Swapped
    /// whole; the hit path reads it without a lock or a reference count.
    policy: ArcSwap<Policy>,
    /// The field targeted at this proxy (fixed at start).
    targeted: HeaderName,
    keys: KeyHasher,
    store: Store,
    refresh: RefreshQueue<RefreshRequest>,
    upstream: Upstream,
    stats: Stats,
    /// Keys whose last refresh failed: no new refresh before `until`. A std
    /// `Mutex`: touched on stale answers and refresh results only.
    backoff: Mutex<HashMap<u64, Backoff>>,
    /// Keys whose answer could not be stored, until when: their requests go
    /// to the backend at once instead of queueing behind one another's fetch
    /// (Varnish's hit-for-miss).
    uncacheable: Mutex<HashMap<u64, Uncacheable>>,
    /// Failure lines (refresh failed, error answers, stale-if-error) that
    /// may be written now, per cause.
    failure_lines: RateLimit,
}

/// A key whose answer could not be stored, until when, and for whom.
#[derive(Debug, Clone, Copy)]
struct Uncacheable {
    until: Instant,
    /// Only answers to requests with credentials were private (`Cookie`,
    /// `Authorization`): requests without them still coalesce.
    credentials_only: bool,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Instant,
}

/// The rules requests are cached by: the defaults, and the routes (first
/// match wins), each with its own defaults.
pub struct Policy {
    defaults: Arc<Defaults>,
    routes: Vec<(Route, Arc<Defaults>, Arc<RouteStats>)>,
    honor_client_cache_control: bool,
    /// Peers whose forwarding headers are kept (`--trust-forwarded`).
    trust_forwarded: Vec<ipnet::IpNet>,
}

impl Policy {
    /// `stats` keeps each route's counters across reloads, by pattern.
    fn from_config(config: &Config, stats: &Mutex<Vec<Arc<RouteStats>>>) -> Policy {
        let defaults = |ttl, heuristic: Option<u8>, swr, sie, mode| {
            Arc::new(Defaults {
                ttl,
                stale_while_revalidate: swr,
                stale_if_error: sie,
                mode,
                targeted: config.targeted_cache_control.clone(),
                heuristic_percent: heuristic
                    .or_else(|| Defaults::default_heuristic(ttl))
                    .filter(|&p| p > 0),
            })
        };
        Policy {
            defaults: defaults(
                config.ttl,
                config.heuristic_freshness,
                config.stale_while_revalidate,
                config.stale_if_error,
                config.cache_control,
            ),
            routes: config
                .routes
                .iter()
                .map(|r| {
                    let d = defaults(
                        r.ttl,
                        r.heuristic_freshness,
                        r.stale_while_revalidate,
                        r.stale_if_error,
                        r.cache_control,
                    );
                    let mut known = lock(stats);
                    let counters = match known.iter().find(|s| s.pattern == r.pattern) {
                        Some(counters) => Arc::clone(counters),
                        None => {
                            let counters = Arc::new(RouteStats::new(&r.pattern));
                            known.push(Arc::clone(&counters));
                            counters
                        }
                    };
                    (r.clone(), d, counters)
                })
                .collect(),
            honor_client_cache_control: config.honor_client_cache_control,
            trust_forwarded: config.trust_forwarded.clone(),
        }
    }

    /// Who sent a request, and whether its forwarding headers are trusted.
    fn peer(&self, addr: Option<SocketAddr>) -> Peer {
        let trusted = !self.trust_forwarded.is_empty()
            && addr.is_some_and(|addr| {
                let ip = addr.ip().to_canonical();
                self.trust_forwarded.iter().any(|net| net.contains(&ip))
            });
        Peer { addr, trusted }
    }

    /// The route a request path takes (first match), if any.
    fn route_for(&self, path: &str) -> Option<&(Route, Arc<Defaults>, Arc<RouteStats>)> {
        if self.routes.is_empty() {
            return None;
        }
        self.routes.iter().find(|(route, _, _)| route.matches(path))
    }
}

/// The client a request came from.
#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: Option<SocketAddr>,
    /// A proxy in front of swr-proxy (`--trust-forwarded`): its
    /// `X-Forwarded-*` and `Forwarded` headers are kept and appended to.
    trusted: bool,
}

/// The first backoff after a failed refresh; it doubles per failure...
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// ...up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Most bytes the refresh jobs queued or running may hold (their requests'
/// headers): a fixed overhead, documented in README's "Failure behaviour".
pub const REFRESH_QUEUE_BYTES: u64 = 32 << 20;

/// How long a key whose answer could not be stored skips coalescing.
const HIT_FOR_MISS: Duration = Duration::from_secs(60);

/// What a stale answer did about refreshing its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshDecision {
    Queued,
    Pending,
    Dropped,
    Backoff,
}

impl RefreshDecision {
    fn as_str(self) -> &'static str {
        match self {
            RefreshDecision::Queued => "refresh-queued",
            RefreshDecision::Pending => "refresh-pending",
            RefreshDecision::Dropped => "refresh-dropped",
            RefreshDecision::Backoff => "refresh-backoff",
        }
    }
}

/// The answer to one request: ready at once (from the cache), or a future
/// that waits on the backend.
pub type Answer = futures_util::future::Either<
    std::future::Ready<Response<ProxyBody>>,
    std::pin::Pin<Box<dyn std::future::Future<Output = Response<ProxyBody>> + Send>>,
>;

/// What the cache decided about a request before anything is awaited.
enum Next {
    /// Answered from the cache (or a local error).
    Answer(Response<ProxyBody>),
    /// Needs the backend.
    Backend(BackendWork),
}

/// What a request needs of the backend.
enum BackendWork {
    /// Passed through, nothing stored.
    Pass(BypassReason),
    /// Fetched for the cache (a miss or an expired entry).
    Fetch(Box<FetchPlan>),
}

/// A fetch for the cache, as decided on the request path.
struct FetchPlan {
    target: FetchTarget,
    fill_hash: u64,
    /// The expired entry, kept for revalidation and stale-if-error.
    stale: Option<Entry>,
    fwd: &'static str,
    head: bool,
    /// The key was recently uncacheable (hit-for-miss): fetch uncoalesced.
    alone: bool,
}

/// What the per-route counters and the access log need of a request.
struct AnswerLog {
    route: Option<Arc<RouteStats>>,
    /// Kept only when `--access-log` is on.
    access: Option<AccessLine>,
}

/// What an access-log line says of the request.
struct AccessLine {
    started: Instant,
    method: Method,
    uri: http::Uri,
}

/// What a background refresh needs to re-fetch an entry.
pub struct RefreshRequest {
    target: FetchTarget,
    /// The stale entry, for its validators.
    stale: Entry,
}

impl crate::refresh::Weigh for RefreshRequest {
    /// The job's own bytes: its headers and URL (the entry is shared with
    /// the store, and counted there).
    fn weight(&self) -> u64 {
        let headers = |map: &HeaderMap| -> usize {
            map.iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 32)
                .sum()
        };
        let target = &self.target;
        (256 + headers(&target.client_headers)
            + headers(&target.upstream_headers)
            + target.url_text.len()
            + target.path_and_query.len()) as u64
    }
}

/// What a fetch for the cache is for: the URL, the request's headers, and
/// where the answer is stored.
#[derive(Clone)]
struct FetchTarget {
    /// The URL's key text (`host` + `path?query`) and its hash.
    url_text: Arc<str>,
    url_hash: u64,
    path_and_query: Arc<str>,
    /// The client's headers: what a Vary'd answer is keyed by.
    client_headers: HeaderMap,
    /// What is sent to the backend: forwarded, without the client's
    /// conditionals and framing.
    upstream_headers: HeaderMap,
    /// What storability needs to know of the request.
    facts: RequestFacts,
    /// The cookies left are part of the key (a route's `cookies = [...]`).
    keyed_cookies: bool,
    /// The caching rules of the request's route.
    defaults: Arc<Defaults>,
}

impl FetchTarget {
    /// The fetch without the client's `Authorization` and `Cookie`, for a
    /// background refresh of `stale`, an entry stored for everyone: one
    /// client's credentials never shape what others are served. Kept: the
    /// cookies the route's key names, and a field the entry varies on
    /// (its key holds that value, so every client of the entry sent it).
    fn without_credentials(mut self, stale: &Entry) -> FetchTarget {
        let varies_on = |name: &str| {
            stale
                .header(&header::VARY)
                .and_then(|v| v.to_str().ok().map(str::to_ascii_lowercase))
                .is_some_and(|v| v.split(',').any(|n| n.trim() == name))
        };
        let keep_cookie = self.keyed_cookies || varies_on("cookie");
        let keep_authorization = varies_on("authorization");
        for headers in [&mut self.client_headers, &mut self.upstream_headers] {
            if !keep_authorization {
                headers.remove(header::AUTHORIZATION);
            }
            if !keep_cookie {
                headers.remove(header::COOKIE);
            }
        }
        self.facts = facts_of(&self.client_headers, self.keyed_cookies);
        // A header value can be a slice of the connection's read buffer,
        // which a queued job would keep alive whole: copy what it keeps.
        self.client_headers = detached(&self.client_headers);
        self.upstream_headers = detached(&self.upstream_headers);
        self
    }
}

/// A request's headers as its route's `cookies` setting leaves them: as
/// sent (`private`), without `Cookie` (`ignore`), or with only the cookies
/// the key names. What both the variant lookup and the fetch read.
fn route_headers<'a>(route: Option<&Route>, headers: &'a HeaderMap) -> Cow<'a, HeaderMap> {
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

/// A copy of `headers` that shares no memory with them.
fn detached(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.append(name.clone(), value);
        }
    }
    copy
}

/// What storability needs of a request's headers; cookies that are part of
/// the key do not make an answer private.
fn facts_of(headers: &HeaderMap, keyed_cookies: bool) -> RequestFacts {
    let facts = RequestFacts::of(headers);
    RequestFacts {
        cookie: facts.cookie && !keyed_cookies,
        ..facts
    }
}

/// The result of fetching a response for the cache.
enum Fetched {
    /// Stored (a new entry, or a stale one renewed by a 304).
    Stored(Entry),
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
    Stored(Entry),
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
        let upstream = Upstream::new(
            &config.upstream,
            config.upstream_timeout,
            config.upstream_concurrency,
            config.max_buffered_bytes,
        )?;
        // A claim that outlives two upstream timeouts belongs to a stuck fetch.
        let (refresh, workers) = RefreshQueue::new(
            config.refresh_queue,
            REFRESH_QUEUE_BYTES,
            // A refresh can wait for a slot, a head and a body, each up
            // to the upstream timeout.
            config.upstream_timeout * 3,
        );
        let route_stats = Mutex::new(Vec::new());
        let proxy = Arc::new(Proxy {
            policy: ArcSwap::from_pointee(Policy::from_config(&config, &route_stats)),
            route_stats,
            limits: HeadLimits::of(&config),
            targeted: config.targeted_cache_control.clone(),
            keys: KeyHasher::new(),
            store: Store::new(config.max_size_bytes),
            refresh,
            upstream,
            stats: Stats::default(),
            backoff: Mutex::new(HashMap::new()),
            uncacheable: Mutex::new(HashMap::new()),
            failure_lines: RateLimit::new(FAILURE_LINE_EVERY),
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
                        let now = Instant::now();
                        let removed = sweep_proxy.store.sweep(now);
                        if removed > 0 {
                            tracing::debug!(removed, "swept unservable entries");
                        }
                        sweep_proxy.forget_expired_marks(now);
                    }
                    () = sweep_cancel.cancelled() => break,
                }
            }
        });
        let every = proxy.config.log_summary_interval;
        if !every.is_zero() {
            let summary_proxy = Arc::clone(&proxy);
            let summary_cancel = cancel.clone();
            tracker.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                // After a stall, one summary of it all, not a burst of them.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut summary = Summary::default();
                loop {
                    tokio::select! {
                        _ = tick.tick() => summary.log(summary_proxy.totals()),
                        () = summary_cancel.cancelled() => break,
                    }
                }
            });
        }
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

    /// The request head limits both paths check.
    pub fn limits(&self) -> HeadLimits {
        self.limits
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

    /// Re-reads the configuration file and applies its routes and caching
    /// rules; the cache, the connections, the listeners and the threads
    /// stay. A bad file is rejected and the running configuration kept.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let Some(path) = &self.config.config_file else {
            return Err(ConfigError("no --config file to reload".into()));
        };
        let file = crate::config::read_file(path)?;
        let config = Config::merge(
            &self.config.source,
            &file,
            Some(self.config.upstream.clone()),
            self.config.default_ttl,
        )?;
        let routes = config.routes.len();
        let at_next_start = self.config.start_only_changes(&config);
        self.policy
            .store(Arc::new(Policy::from_config(&config, &self.route_stats)));
        tracing::info!(file = %path.display(), routes, "configuration reloaded");
        if !at_next_start.is_empty() {
            tracing::warn!(
                settings = %at_next_start.join(", "),
                "changed in the file; these take effect at the next start"
            );
        }
        Ok(Reloaded {
            routes,
            at_next_start,
        })
    }

    /// The Prometheus text of every metric.
    pub fn render_metrics(&self) -> String {
        let mut text = self.stats.render_prometheus(Gauges {
            entries: self.store.entry_count(),
            bytes: self.store.weighted_size(),
            max_bytes: self.store.max_bytes(),
            evictions: self.store.evictions(),
            refresh_queue_depth: self.refresh.depth() as u64,
            upstream_in_flight: self.upstream.in_flight(),
            log_lines_dropped: logs::lines_dropped(),
            vary_index_bytes: self.store.vary_bytes(),
            refresh_queue_bytes: self.refresh.bytes(),
            upstream_buffered_bytes: self.upstream.buffered(),
        });
        crate::metrics::render_routes(&mut text, &lock(&self.route_stats));
        text
    }

    /// What the periodic summary line reports the change of.
    fn totals(&self) -> Totals {
        Totals {
            requests: CacheStatus::ALL
                .into_iter()
                .map(|s| self.stats.requests(s))
                .sum(),
            refreshed: Stats::get(&self.stats.refresh_succeeded),
            refresh_failed: Stats::get(&self.stats.refresh_failed),
            refresh_dropped: Stats::get(&self.stats.refresh_dropped),
            log_lines_dropped: logs::lines_dropped(),
            failure_lines_suppressed: self.failure_lines.suppressed(),
        }
    }

    /// Whether a failure line of `cause` may be written now: `Some(n)`, with
    /// `n` lines of that cause left out since the last one written.
    fn failure_line(&self, cause: Cause) -> Option<u64> {
        self.failure_lines.admit(cause, Instant::now())
    }

    /// Drops backoff and hit-for-miss marks that have run out.
    fn forget_expired_marks(&self, now: Instant) {
        lock(&self.backoff).retain(|_, b| now < b.until + BACKOFF_CAP);
        lock(&self.uncacheable).retain(|_, mark| now < mark.until);
    }

    /// Answers one request, and logs it when `--access-log` is on.
    ///
    /// What the cache can answer (a hit, a stale hit, a local error) is
    /// answered here, synchronously, and comes back as a ready future. Only
    /// a request that needs the backend gets a (boxed) future of its own: the
    /// whole state machine of a fetch is a few kilobytes, which a hit would
    /// otherwise build and move on every request.
    pub fn handle<B>(self: &Arc<Self>, request: Request<B>, client: Option<SocketAddr>) -> Answer
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let policy = self.policy.load();
        let route = policy.route_for(request.uri().path());
        let access = self.config.access_log.then(|| AccessLine {
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
        });
        let log = (access.is_some() || route.is_some()).then(|| AnswerLog {
            route: route.map(|(_, _, stats)| Arc::clone(stats)),
            access,
        });
        let (parts, body) = request.into_parts();
        let peer = policy.peer(client);
        let next = match self.refusal(&parts) {
            None => self.from_cache(&parts, peer, &policy, route),
            // Never forwarded: a head past the limits, a Host that is not a
            // host (or two, or none), a path with dot segments.
            Some(err) => Next::Answer(self.refused(&err)),
        };
        drop(policy);
        match next {
            Next::Answer(response) => {
                let response = match log {
                    Some(log) => self.log_answer(log, response, client),
                    None => response,
                };
                Answer::Left(std::future::ready(response))
            }
            Next::Backend(work) => {
                let proxy = Arc::clone(self);
                Answer::Right(Box::pin(async move {
                    let response =
                        upstream_timed(proxy.from_backend(parts, body, peer, work)).await;
                    match log {
                        Some(log) => proxy.log_answer(log, response, client),
                        None => response,
                    }
                }))
            }
        }
    }

    /// Why a request is refused before the cache looks at it, if it is:
    /// over the head limits (414, 431), a bad host or target (400).
    fn refusal(&self, parts: &Parts) -> Option<ProxyError> {
        let target = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            + parts.uri.authority().map_or(0, |a| a.as_str().len());
        let fields = parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().len(), value.len()));
        if let Err(err) = self.limits.check(target, fields) {
            return Some(err);
        }
        if let Err(err) = request_host(parts) {
            return Some(err);
        }
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        (!valid_target(path_and_query)).then_some(ProxyError::BadTarget)
    }

    /// The answer to a refused request, counted by its reason.
    fn refused(&self, err: &ProxyError) -> Response<ProxyBody> {
        self.stats.record_refused(err.detail());
        self.stats.record_request(CacheStatus::Bypass);
        let field = StatusField {
            detail: Some(err.detail()),
            ..StatusField::default()
        };
        self.error_response(err, CacheStatus::Bypass, field)
    }

    /// Counts an answer for its route and writes its access-log line.
    fn log_answer(
        &self,
        log: AnswerLog,
        response: Response<ProxyBody>,
        client: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        let status = response.headers().get(&X_CACHE).and_then(|v| {
            CacheStatus::ALL
                .into_iter()
                .find(|s| s.as_str().as_bytes() == v.as_bytes())
        });
        if let (Some(route), Some(status)) = (&log.route, status) {
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
            cache = header(&X_CACHE),
            route = log.route.as_ref().map_or("-", |r| r.pattern.as_str()),
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

    /// What the cache does with a request, without waiting for anything:
    /// answer it (fresh or stale hit, or a local error), or say what to ask
    /// the backend.
    fn from_cache(
        self: &Arc<Self>,
        parts: &Parts,
        peer: Peer,
        policy: &Policy,
        route: Option<&(Route, Arc<Defaults>, Arc<RouteStats>)>,
    ) -> Next {
        if !policy::method_is_cacheable(&parts.method) {
            return Next::Backend(BackendWork::Pass(BypassReason::Method));
        }
        if parts.headers.contains_key(header::RANGE) {
            return Next::Backend(BackendWork::Pass(BypassReason::Range));
        }
        let host = match request_host(parts) {
            Ok(host) => host,
            Err(err) => return Next::Answer(self.refused(&err)),
        };
        let host = lowercase(host);
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        if !path_and_query.starts_with('/') {
            // The key's host ends where its target's first `/` starts.
            return Next::Answer(self.refused(&ProxyError::BadTarget));
        }
        let (route, defaults) = match route {
            Some((route, defaults, _)) => (Some(route), defaults),
            None => (None, &policy.defaults),
        };
        if route.is_some_and(|r| r.bypass) {
            return Next::Backend(BackendWork::Pass(BypassReason::Route));
        }
        // A route's key options (query filtering and order, key headers) make
        // the key differ from the URL.
        let shaped = route
            .filter(|r| r.shapes_key())
            .map(|r| shaped_key(r, parts.uri.path(), parts.uri.query(), &parts.headers));
        let key = self
            .keys
            .key(&host, shaped.as_ref().map_or(path_and_query, |s| &s.text));
        // What the backend is asked for: the URL as the key has it.
        let path_and_query = shaped.as_ref().map_or(path_and_query, ShapedKey::target);
        let head = parts.method == Method::HEAD;
        let directives = if policy.honor_client_cache_control {
            Some(RequestDirectives::parse(&parts.headers)).filter(|d| !d.is_empty())
        } else {
            None
        };
        if directives.is_some_and(|d| d.no_store) {
            return Next::Backend(BackendWork::Pass(BypassReason::Request));
        }
        let now = Instant::now();

        // The URL's own entry; else, for a URL whose answers vary, the variant
        // this request's headers select.
        let mut variant: Option<(u64, String)> = None;
        let found = match self.store.get(&key, now) {
            Some(entry) => Some(entry),
            None => match self.store.vary_names(key.hash) {
                Some(names) => {
                    let headers = route_headers(route, &parts.headers);
                    let text = variant_text(key, &names, &headers);
                    let hash = self.keys.hash_text(&text);
                    let entry = self.store.get_exact(hash, text.as_bytes(), now);
                    variant = Some((hash, text));
                    entry
                }
                None => None,
            },
        };
        let fill_hash = variant.as_ref().map_or(key.hash, |(hash, _)| *hash);

        let stale = match found {
            Some(entry) => match policy::decide(&entry, now, directives.as_ref()) {
                decided @ (Use::Fresh | Use::Stale) => {
                    let target = || {
                        self.fetch_target(
                            key,
                            path_and_query,
                            &parts.headers,
                            peer,
                            defaults,
                            route,
                        )
                    };
                    let (status, cache_status) =
                        self.at_once(&entry, decided == Use::Stale, fill_hash, target, now);
                    return Next::Answer(self.entry_response(
                        &entry,
                        status,
                        cache_status,
                        parts,
                        now,
                    ));
                }
                Use::Expired => Some((entry, "stale")),
                Use::ClientRefused => Some((entry, "request")),
            },
            None => None,
        };
        if directives.is_some_and(|d| d.only_if_cached) {
            let err = ProxyError::NotCached;
            let field = StatusField {
                fwd: Some("miss"),
                detail: Some("only-if-cached"),
                ..StatusField::default()
            };
            return Next::Answer(self.error_response(&err, CacheStatus::Miss, field));
        }
        let fwd = match (&stale, &variant) {
            (Some((_, why)), _) => why,
            (None, Some(_)) => "vary-miss",
            (None, None) => "uri-miss",
        };
        // A client's own fetch carries its credentials: what it brings back
        // is stored only if the backend says it may be shared.
        let target = self.fetch_target(key, path_and_query, &parts.headers, peer, defaults, route);
        let alone = self.remembered_uncacheable(fill_hash, now, target.facts);
        if alone {
            self.stats.hit_for_miss.fetch_add(1, Relaxed);
        }
        Next::Backend(BackendWork::Fetch(Box::new(FetchPlan {
            target,
            fill_hash,
            stale: stale.map(|(e, _)| e),
            fwd,
            head,
            alone,
        })))
    }

    /// Answers a request the cache could not: passes it through, or fetches
    /// (coalesced) what the cache needs.
    async fn from_backend<B>(
        self: &Arc<Self>,
        parts: Parts,
        body: B,
        peer: Peer,
        work: BackendWork,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        match work {
            BackendWork::Pass(reason) => self.pass(&parts, Some(body), peer, reason).await,
            BackendWork::Fetch(plan) => {
                drop(body);
                let FetchPlan {
                    target,
                    fill_hash,
                    stale,
                    fwd,
                    head,
                    alone,
                } = *plan;
                if alone {
                    self.fetch_alone(&parts, target, fill_hash, stale, fwd, head)
                        .await
                } else {
                    self.fill(&parts, target, fill_hash, stale, fwd, head, peer)
                        .await
                }
            }
        }
    }

    fn remembered_uncacheable(&self, hash: u64, now: Instant, facts: RequestFacts) -> bool {
        let credentials = facts.authorization || facts.cookie;
        lock(&self.uncacheable)
            .get(&hash)
            .is_some_and(|mark| now < mark.until && (credentials || !mark.credentials_only))
    }

    /// A request for a key remembered as uncacheable: fetched for this client
    /// alone, without waiting on anyone; stored after all if it now may be.
    async fn fetch_alone(
        &self,
        parts: &Parts,
        target: FetchTarget,
        hash: u64,
        stale: Option<Entry>,
        fwd: &'static str,
        head: bool,
    ) -> Response<ProxyBody> {
        let status = if stale.is_some() {
            CacheStatus::Expired
        } else {
            CacheStatus::Miss
        };
        self.stats.record_upstream_request(UpstreamCause::Miss);
        let fetched = self.fetch(&target, stale.as_ref(), Priority::Client).await;
        match failed_over(fetched, stale.as_ref()) {
            Fetched::Stored(entry) => {
                lock(&self.uncacheable).remove(&hash);
                self.stored_response(&entry, status, fwd, false, parts)
            }
            Fetched::Pass(passed) => self.passed_response(passed, "bypass", head),
            Fetched::Failed(err) => self.failed(err, stale.as_ref(), status, fwd, parts),
        }
    }

    /// A fetch for the cache of `key`'s URL, by the rules of the request's
    /// route: the headers it keys on are forwarded whatever they are, and
    /// its `cookies` setting decides which cookies go.
    fn fetch_target(
        &self,
        key: RequestKey<'_>,
        path_and_query: &str,
        client_headers: &HeaderMap,
        peer: Peer,
        defaults: &Arc<Defaults>,
        route: Option<&Route>,
    ) -> FetchTarget {
        let client_headers = route_headers(route, client_headers).into_owned();
        let forwarding = upstream::Forwarding {
            host: key.host,
            client: peer.addr,
            trusted: peer.trusted,
            with_body: false,
            keyed: route.map_or(&[][..], |r| &r.key_headers[..]),
        };
        let keyed_cookies = route.is_some_and(|r| matches!(r.cookies, Cookies::Key(_)));
        FetchTarget {
            url_text: key.to_text().into(),
            url_hash: key.hash,
            path_and_query: path_and_query.into(),
            upstream_headers: fill_headers(&client_headers, &forwarding),
            facts: facts_of(&client_headers, keyed_cookies),
            client_headers,
            keyed_cookies,
            defaults: Arc::clone(defaults),
        }
    }

    /// Queues a background refresh of a stale entry, without waiting, unless
    /// the key's last refresh failed recently (backoff).
    fn queue_refresh(
        &self,
        hash: u64,
        entry: &Entry,
        target: impl FnOnce() -> FetchTarget,
        now: Instant,
    ) -> RefreshDecision {
        if lock(&self.backoff)
            .get(&hash)
            .is_some_and(|b| now < b.until)
        {
            self.stats.refresh_backoff.fetch_add(1, Relaxed);
            return RefreshDecision::Backoff;
        }
        let result = self.refresh.try_enqueue(hash, || RefreshRequest {
            target: target().without_credentials(entry),
            stale: entry.clone(),
        });
        match result {
            Enqueue::Queued => {
                self.stats.refresh_queued.fetch_add(1, Relaxed);
                RefreshDecision::Queued
            }
            Enqueue::Dropped => {
                self.stats.refresh_dropped.fetch_add(1, Relaxed);
                tracing::debug!(key = entry.key(), reason = "queue-full", "refresh dropped");
                RefreshDecision::Dropped
            }
            Enqueue::AlreadyClaimed => RefreshDecision::Pending,
        }
    }

    /// Records a failed refresh of `hash`: the next one waits twice as long
    /// as the last (from `BACKOFF_BASE` up to `BACKOFF_CAP`).
    fn back_off(&self, hash: u64) {
        let now = Instant::now();
        let mut backoff = lock(&self.backoff);
        let failures = backoff.get(&hash).map_or(0, |b| b.failures) + 1;
        let delay = BACKOFF_BASE
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(BACKOFF_CAP);
        let mark = Backoff {
            failures,
            until: now + delay,
        };
        insert_bounded(&mut backoff, hash, mark, |b| now >= b.until + BACKOFF_CAP);
    }

    /// A background refresh: re-fetches (or revalidates) and replaces the
    /// entry, or keeps the old one when the backend fails.
    async fn run_refresh(self: Arc<Self>, job: Job<RefreshRequest>) {
        let _in_flight = self.stats.refresh_started();
        let started = Instant::now();
        let RefreshRequest { target, stale } = &job.payload;
        self.stats.record_upstream_request(UpstreamCause::Refresh);
        let fetched = self.fetch(target, Some(stale), Priority::Background).await;
        self.stats.refresh_duration.observe(started.elapsed());
        let took_ms = started.elapsed().as_millis() as u64;
        let key = stale.key();
        match &fetched {
            Fetched::Stored(_) => {
                lock(&self.backoff).remove(&job.hash);
            }
            Fetched::Pass(passed) if !policy::status_is_error(passed.status) => {}
            // The backend was never asked.
            Fetched::Failed(err) if err.kind == UpstreamErrorKind::Busy => {}
            _ => self.back_off(job.hash),
        }
        match fetched {
            Fetched::Stored(_) => {
                self.stats.refresh_succeeded.fetch_add(1, Relaxed);
                tracing::debug!(key, took_ms, "refreshed");
            }
            Fetched::Pass(passed) if policy::status_is_error(passed.status) => {
                self.stats.refresh_failed.fetch_add(1, Relaxed);
                let cause = ("refresh failed", UpstreamErrorKind::Status.as_str());
                if let Some(suppressed) = self.failure_line(cause) {
                    tracing::warn!(
                        key,
                        took_ms,
                        status = passed.status.as_u16(),
                        suppressed,
                        "refresh failed; keeping the stale entry"
                    );
                }
            }
            Fetched::Pass(passed) if passed.reason == BypassReason::BufferFull => {
                // Memory was short, not the answer storable: keep the entry.
                self.stats.refresh_failed.fetch_add(1, Relaxed);
            }
            Fetched::Pass(passed) => {
                self.store.remove(job.hash, key);
                self.stats.refresh_not_storable.fetch_add(1, Relaxed);
                let reason = passed.reason.as_str();
                if let Some(suppressed) = self.failure_line(("refresh not storable", reason)) {
                    tracing::info!(
                        key,
                        took_ms,
                        reason,
                        suppressed,
                        "refresh answer may not be stored; entry removed"
                    );
                }
            }
            Fetched::Failed(err) => {
                self.stats.refresh_failed.fetch_add(1, Relaxed);
                if let Some(suppressed) = self.failure_line(("refresh failed", err.kind.as_str())) {
                    tracing::warn!(key, took_ms, error = %err, suppressed,
                        "refresh failed; keeping the stale entry");
                }
            }
        }
    }

    /// Fetches a response for the cache (always a GET). With a stored entry
    /// that has validators, the request is conditional and a 304 renews the
    /// entry. A storable answer is read whole and stored (under its variant
    /// when it varies); one that may not be stored is handed back to stream.
    async fn fetch(
        &self,
        target: &FetchTarget,
        stale: Option<&Entry>,
        priority: Priority,
    ) -> Fetched {
        // Held until the body is read (or handed on to stream).
        let _permit = match self.upstream.permit(priority).await {
            Ok(permit) => permit,
            // Counted as `busy`, not as a backend failure.
            Err(err) => return Fetched::Failed(err),
        };
        let mut headers = target.upstream_headers.clone();
        let mut conditional = false;
        if let Some(stale) = stale {
            if let Some(etag) = stale.etag() {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
                conditional = true;
            }
            if let Some(modified) = stale.last_modified() {
                headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
                conditional = true;
            }
        }
        if conditional {
            self.stats
                .record_upstream_request(UpstreamCause::Revalidate);
        }
        let request_time = Instant::now();
        let response = match self
            .upstream
            .send(Method::GET, &target.path_and_query, headers, None)
            .await
        {
            Ok(response) => response,
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                return Fetched::Failed(err);
            }
        };
        let response_delay = request_time.elapsed();
        self.stats.upstream_latency.observe(response_delay);
        let status = response.status();
        if policy::status_is_error(status) {
            self.stats.record_upstream_error(UpstreamErrorKind::Status);
        }
        let facts = target.facts;

        if status == StatusCode::NOT_MODIFIED {
            let Some(stale) = stale.filter(|_| conditional) else {
                return Fetched::Pass(self.passed(BypassReason::NotModified, response));
            };
            let merged = stale.renewed_headers(response.headers());
            return match policy::storability(
                stale.status(),
                &merged,
                facts,
                response_delay,
                SystemTime::now(),
                &target.defaults,
            ) {
                Storability::Store(lifetimes) => {
                    let entry = Entry::new(
                        stale.key(),
                        stale.status(),
                        &self.stored_headers(&merged),
                        &[stale.body()],
                        Instant::now(),
                        lifetimes,
                    );
                    let hash = self.keys.hash_text(stale.key());
                    self.store.insert(hash, entry.clone());
                    self.stats.revalidated.fetch_add(1, Relaxed);
                    self.stats
                        .revalidation_bytes_saved
                        .fetch_add(stale.body_len() as u64, Relaxed);
                    Fetched::Stored(entry)
                }
                Storability::Bypass(reason) => {
                    // What the backend said of the stored answer ends it;
                    // that this client's credentials made the 304 private
                    // says nothing about the answer stored for everyone.
                    if !matches!(reason, BypassReason::Authorization | BypassReason::Cookie) {
                        self.store
                            .remove(self.keys.hash_text(stale.key()), stale.key());
                    }
                    Fetched::Pass(Passed {
                        reason,
                        status: stale.status(),
                        headers: self.client_headers(&merged),
                        body: ProxyBody::full(stale.body()),
                    })
                }
            };
        }

        let lifetimes = match policy::storability(
            status,
            response.headers(),
            facts,
            response_delay,
            SystemTime::now(),
            &target.defaults,
        ) {
            Storability::Store(lifetimes) => lifetimes,
            Storability::Bypass(reason) => return Fetched::Pass(self.passed(reason, response)),
        };
        // Where it is stored: under the URL, or under the variant its Vary selects.
        let (hash, text, vary) = match policy::vary_names(response.headers()) {
            Ok(names) if !names.is_empty() => {
                let text = format!(
                    "{}{}",
                    target.url_text,
                    policy::vary_key(&names, &target.client_headers)
                );
                (self.keys.hash_text(&text), text, Some(names))
            }
            _ => (target.url_hash, target.url_text.to_string(), None),
        };
        let omitted = policy::omitted_fields(response.headers(), &self.targeted);
        let mut headers = self.client_headers(response.headers());
        match self
            .upstream
            .read_body(response, self.config.max_object_size_bytes)
            .await
        {
            Ok(BodyRead::Complete(body)) => {
                for name in omitted {
                    headers.remove(name);
                }
                let entry = Entry::new(&text, status, &headers, &body, Instant::now(), lifetimes);
                match vary {
                    Some(names) => {
                        self.store.record_variant(target.url_hash, &names, hash);
                        // The URL's own entry (from before it varied) is stale knowledge.
                        self.store.remove(target.url_hash, &target.url_text);
                    }
                    None => self.store.forget_vary(target.url_hash),
                }
                self.store.insert(hash, entry.clone());
                Fetched::Stored(entry)
            }
            Ok(BodyRead::NoRoom { prefix, rest }) => Fetched::Pass(Passed {
                reason: BypassReason::BufferFull,
                status,
                headers,
                body: self.upstream.stream_body(prefix, rest),
            }),
            Ok(BodyRead::TooLarge { prefix, rest }) => Fetched::Pass(Passed {
                reason: BypassReason::TooLarge,
                status,
                headers,
                body: self.upstream.stream_body(prefix, rest),
            }),
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                Fetched::Failed(err)
            }
        }
    }

    /// A backend response to stream through without storing it.
    fn passed(&self, reason: BypassReason, response: reqwest::Response) -> Passed {
        Passed {
            reason,
            status: response.status(),
            headers: self.client_headers(response.headers()),
            body: self.upstream.stream_body(Vec::new(), response),
        }
    }

    /// A backend response's headers as clients get them: hop-by-hop headers
    /// and the fields targeted at this proxy removed.
    fn client_headers(&self, upstream_headers: &HeaderMap) -> HeaderMap {
        let mut headers = upstream::response_headers(upstream_headers);
        headers.remove(&self.targeted);
        headers.remove(policy::CDN_CACHE_CONTROL);
        headers
    }

    /// A storable response's headers as stored: as clients get them, less
    /// the fields `private="..."` / `no-cache="..."` name (RFC 9111
    /// §5.2.2.4, §5.2.2.7), which a shared cache does not keep. (A fill
    /// removes them itself once it knows the body is stored.)
    fn stored_headers(&self, upstream_headers: &HeaderMap) -> HeaderMap {
        let omitted = policy::omitted_fields(upstream_headers, &self.targeted);
        let mut headers = self.client_headers(upstream_headers);
        for name in omitted {
            headers.remove(name);
        }
        headers
    }

    /// A miss or an expired entry: one backend fetch per key, however many
    /// clients wait for it.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        self: &Arc<Self>,
        parts: &Parts,
        target: FetchTarget,
        fill_hash: u64,
        stale: Option<Entry>,
        fwd: &'static str,
        head: bool,
        peer: Peer,
    ) -> Response<ProxyBody> {
        let status = if stale.is_some() {
            CacheStatus::Expired
        } else {
            CacheStatus::Miss
        };
        // A leader that vanished (its task panicked), or an answer stored for
        // another variant, sends a waiter round again.
        for _attempt in 0..3 {
            match self.store.begin_fill(fill_hash) {
                Fill::Leader(guard) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let proxy = Arc::clone(self);
                    let target = target.clone();
                    let fallback = stale.clone();
                    // The fetch runs in its own task: a client that goes away
                    // does not cancel the fill the waiters depend on.
                    tokio::spawn(async move {
                        proxy.stats.record_upstream_request(UpstreamCause::Miss);
                        let fetched = proxy
                            .fetch(&target, fallback.as_ref(), Priority::Client)
                            .await;
                        let (outcome, answer) = match failed_over(fetched, fallback.as_ref()) {
                            Fetched::Stored(entry) => (
                                FillOutcome::Stored(entry.clone()),
                                LeaderAnswer::Stored(entry),
                            ),
                            Fetched::Pass(passed) => {
                                // Later requests for this key go straight to the
                                // backend; for an answer that was private only
                                // because of this client's credentials, only
                                // requests with credentials do, or one client
                                // could turn coalescing off for everyone.
                                let credentials_only = matches!(
                                    passed.reason,
                                    BypassReason::Authorization | BypassReason::Cookie
                                );
                                // Short of memory says nothing of the key.
                                let remember = passed.reason != BypassReason::BufferFull;
                                let mark = Uncacheable {
                                    until: Instant::now() + HIT_FOR_MISS,
                                    credentials_only,
                                };
                                let mut marks = lock(&proxy.uncacheable);
                                let kept = marks.get(&fill_hash).filter(|m| !m.credentials_only);
                                if remember && (kept.is_none() || !credentials_only) {
                                    let now = Instant::now();
                                    insert_bounded(&mut marks, fill_hash, mark, |m| now >= m.until);
                                }
                                (
                                    FillOutcome::NotShared(passed.reason),
                                    LeaderAnswer::Pass(passed),
                                )
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
                            self.stored_response(&entry, status, fwd, false, parts)
                        }
                        LeaderAnswer::Pass(passed) => self.passed_response(passed, "bypass", head),
                        LeaderAnswer::Failed(err) => {
                            self.failed(err, stale.as_ref(), status, fwd, parts)
                        }
                    };
                }
                Fill::Follower(slot) => {
                    self.stats.coalesced_waiters.fetch_add(1, Relaxed);
                    match store::wait_fill(slot).await {
                        Some(FillOutcome::Stored(entry)) => {
                            if self.serves_variant(&entry, &target) {
                                return self.stored_response(&entry, status, fwd, true, parts);
                            }
                            // Stored for another variant: look again, now that
                            // the URL is known to vary.
                            continue;
                        }
                        Some(FillOutcome::NotShared(reason))
                            if matches!(
                                reason,
                                BypassReason::Authorization | BypassReason::Cookie
                            ) && !target.facts.authorization
                                && !target.facts.cookie =>
                        {
                            // The leader's answer was private to its own
                            // credentials, which this request has none of:
                            // go round again, to lead a fill or follow one.
                            continue;
                        }
                        Some(FillOutcome::NotShared(reason)) => {
                            // Never hand one client's unshareable answer to another:
                            // fetch for this client alone, labelled with the reason.
                            return self.pass::<Full<Bytes>>(parts, None, peer, reason).await;
                        }
                        Some(FillOutcome::Failed(err)) => {
                            return self.failed(err, stale.as_ref(), status, fwd, parts)
                        }
                        None => continue,
                    }
                }
            }
        }
        self.pass::<Full<Bytes>>(parts, None, peer, BypassReason::Status)
            .await
    }

    /// Whether `entry` answers the request `target` describes: the URL's own
    /// entry, or the variant the request's headers select.
    fn serves_variant(&self, entry: &Entry, target: &FetchTarget) -> bool {
        let key = entry.key_bytes();
        if key == target.url_text.as_bytes() {
            return true;
        }
        match self.store.vary_names(target.url_hash) {
            Some(names) => {
                let text = format!(
                    "{}{}",
                    target.url_text,
                    policy::vary_key(&names, &target.client_headers)
                );
                key == text.as_bytes()
            }
            None => false,
        }
    }

    fn stored_response(
        &self,
        entry: &Entry,
        status: CacheStatus,
        fwd: &str,
        collapsed: bool,
        parts: &Parts,
    ) -> Response<ProxyBody> {
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

    /// Passes a request through to the backend, streaming both ways; nothing
    /// is stored. A successful unsafe method invalidates what is stored for
    /// its URI and the URIs in its `Location` and `Content-Location`.
    async fn pass<B>(
        &self,
        parts: &Parts,
        body: Option<B>,
        peer: Peer,
        reason: BypassReason,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        // `handle` answered a request without a valid host with a 400.
        let host = lowercase(request_host(parts).unwrap_or_default());
        let forwarding = upstream::Forwarding {
            host: &host,
            client: peer.addr,
            trusted: peer.trusted,
            with_body: body.is_some(),
            keyed: &[],
        };
        let headers = upstream::forward_headers(&parts.headers, &forwarding);
        // A request without a body (`Content-Length: 0`, or none framed) is
        // sent without one, not as an empty chunked stream.
        let body = body
            .filter(|b| !b.is_end_stream())
            .map(|b| reqwest::Body::wrap_stream(BodyDataStream::new(b)));
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.stats.record_upstream_request(UpstreamCause::Pass);
        let head = parts.method == Method::HEAD;
        let fwd = match reason {
            BypassReason::Method => "method",
            BypassReason::Request => "request",
            _ => "bypass",
        };
        let started = Instant::now();
        let sent = match self.upstream.permit(Priority::Client).await {
            Ok(permit) => {
                let sent = self
                    .upstream
                    .send(parts.method.clone(), path_and_query, headers, body)
                    .await;
                // Held to the response head: a streamed body does not keep its slot.
                drop(permit);
                sent
            }
            Err(err) => Err(err),
        };
        match sent {
            Ok(response) => {
                self.stats.upstream_latency.observe(started.elapsed());
                let status = response.status();
                if policy::status_is_error(status) {
                    self.stats.record_upstream_error(UpstreamErrorKind::Status);
                }
                if policy::method_invalidates(&parts.method)
                    && (status.is_success() || status.is_redirection())
                {
                    self.invalidate(parts, response.headers());
                }
                let passed = self.passed(reason, response);
                self.passed_response(passed, fwd, head)
            }
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                self.stats.record_request(CacheStatus::Bypass);
                self.stats.record_bypass(reason);
                let field = StatusField {
                    fwd: Some(fwd),
                    detail: Some(err.kind.as_str()),
                    ..StatusField::default()
                };
                self.error_response(&ProxyError::Upstream(err), CacheStatus::Bypass, field)
            }
        }
    }

    /// RFC 9111 §4.4: removes the stored answers for the request's URI and for
    /// same-origin `Location` / `Content-Location` URIs in the response.
    fn invalidate(&self, parts: &Parts, response_headers: &HeaderMap) {
        let Ok(host) = request_host(parts) else {
            return;
        };
        let host = lowercase(host);
        let mut targets: Vec<String> = vec![parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string()];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = response_headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if let Some(path) = same_origin_path(value, &host) {
                targets.push(path);
            }
        }
        for path in targets {
            let text = format!("{host}{path}");
            let removed = self.store.remove_url(self.keys.hash_text(&text), &text);
            if removed > 0 {
                self.stats.invalidations.fetch_add(removed as u64, Relaxed);
                tracing::debug!(key = %text, removed, method = %parts.method, "invalidated");
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
            StatusField {
                fwd: Some(fwd),
                fwd_status: Some(passed.status.as_u16()),
                detail: Some(passed.reason.as_str()),
                ..StatusField::default()
            }
            .value(),
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
        parts: &Parts,
    ) -> Response<ProxyBody> {
        let now = Instant::now();
        if let Some(entry) = stale.filter(|e| policy::usable_on_error(e, now)) {
            self.stats.record_request(CacheStatus::Stale);
            self.stats.stale_if_error_served.fetch_add(1, Relaxed);
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
        self.stats.record_request(status);
        let field = StatusField {
            fwd: Some(fwd),
            detail: Some(err.kind.as_str()),
            ..StatusField::default()
        };
        self.error_response(&ProxyError::Upstream(err), status, field)
    }

    /// An error answer: the status for the error, a one-line body naming the cause.
    fn error_response(
        &self,
        err: &ProxyError,
        status: CacheStatus,
        field: StatusField<'_>,
    ) -> Response<ProxyBody> {
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
        headers.insert(CACHE_STATUS, field.value());
        response
    }

    /// An answer from `entry` at once, counted: fresh, or `stale` with a
    /// refresh of `fill_hash` queued (`target` builds it, only when queued).
    /// Returns the cache status and the `Cache-Status` value to send.
    fn at_once(
        &self,
        entry: &Entry,
        stale: bool,
        fill_hash: u64,
        target: impl FnOnce() -> FetchTarget,
        now: Instant,
    ) -> (CacheStatus, HeaderValue) {
        let answer = if stale {
            let queued = self.queue_refresh(fill_hash, entry, target, now);
            let cache_status = StatusField {
                hit: true,
                ttl: Some(entry.ttl_secs(now)),
                detail: Some(queued.as_str()),
                ..StatusField::default()
            }
            .value();
            (CacheStatus::Stale, cache_status)
        } else {
            (CacheStatus::Hit, hit_cache_status(entry.ttl_secs(now)))
        };
        self.stats.record_request(answer.0);
        answer
    }

    /// Records an answer from `entry` (its age, its key among the top keys)
    /// and returns its age.
    fn served(&self, entry: &Entry, now: Instant) -> Duration {
        let age = entry.age(now);
        self.stats.served_age.observe(age);
        self.stats.top_keys.record(entry.key());
        age
    }

    /// The answer from the cache a plain HTTP/1.1 `GET` of `path_and_query`
    /// on `host` gets, for [`crate::fast_hits`]: a fresh hit, or a stale one
    /// with its refresh queued, recorded as [`Proxy::handle`] records them.
    /// The caller has checked that the request asks nothing else of the
    /// cache (no range, no conditional, no body); `directives` says whether
    /// it carries Cache-Control or Pragma, and `headers` builds the client's
    /// headers, which a queued refresh sends on.
    ///
    /// `None` for anything else (a route that bypasses or shapes the key, a
    /// varying URL, a miss, an expired entry, directives that count, a
    /// status without a body): `handle` answers it. The steps are
    /// `from_cache`'s, in its order.
    pub fn fast_hit(
        &self,
        host: &str,
        path_and_query: &str,
        directives: bool,
        client: SocketAddr,
        headers: impl FnOnce() -> HeaderMap,
    ) -> Option<FastHit> {
        let policy = self.policy.load();
        if directives && policy.honor_client_cache_control {
            return None;
        }
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(path, _)| path);
        let route = policy.route_for(path);
        if route.is_some_and(|(route, _, _)| route.bypass || route.shapes_key()) {
            return None;
        }
        let host = lowercase(host);
        let key = self.keys.key(&host, path_and_query);
        let now = Instant::now();
        let entry = self.store.get(&key, now)?;
        if !has_body(entry.status()) {
            return None;
        }
        let decided = policy::decide(&entry, now, None);
        if !matches!(decided, Use::Fresh | Use::Stale) {
            return None;
        }
        let defaults = route.map_or(&policy.defaults, |(_, defaults, _)| defaults);
        let peer = policy.peer(Some(client));
        let route_rules = route.map(|(route, _, _)| route);
        let target =
            || self.fetch_target(key, path_and_query, &headers(), peer, defaults, route_rules);
        let (status, cache_status) =
            self.at_once(&entry, decided == Use::Stale, key.hash, target, now);
        if let Some((_, _, stats)) = route {
            stats.record(status);
        }
        let age = self.served(&entry, now);
        Some(FastHit {
            status,
            age: small_number(age.as_secs()),
            cache_status,
            entry,
        })
    }

    /// An answer from a stored entry: `304` to a matching conditional
    /// request, else the stored response (without a body for HEAD). The body
    /// is shared by reference count.
    fn entry_response(
        &self,
        entry: &Entry,
        status: CacheStatus,
        cache_status: HeaderValue,
        parts: &Parts,
        now: Instant,
    ) -> Response<ProxyBody> {
        let conditional = parts.headers.contains_key(header::IF_NONE_MATCH)
            || parts.headers.contains_key(header::IF_MODIFIED_SINCE);
        let not_modified = conditional && policy::client_not_modified(entry, &parts.headers);
        let (mut headers, body) = entry.answer(3);
        let body = if not_modified {
            self.stats.not_modified_served.fetch_add(1, Relaxed);
            headers.remove(header::CONTENT_LENGTH);
            ProxyBody::empty()
        } else if parts.method == Method::HEAD {
            ProxyBody::empty()
        } else {
            ProxyBody::full(body)
        };
        let age = self.served(entry, now);
        headers.insert(header::AGE, small_number(age.as_secs()));
        headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
        headers.insert(CACHE_STATUS, cache_status);
        let mut response = Response::new(body);
        *response.status_mut() = if not_modified {
            StatusCode::NOT_MODIFIED
        } else {
            entry.status()
        };
        *response.headers_mut() = headers;
        response
    }
}

/// An answer for [`crate::fast_hits`] to write: the entry and the values
/// of the headers an answer adds to the stored ones.
pub struct FastHit {
    pub entry: Entry,
    /// `Hit` or `Stale`, for `X-Cache`.
    pub status: CacheStatus,
    pub age: HeaderValue,
    pub cache_status: HeaderValue,
}

/// Whether an answer with this status carries the body (and stored
/// `Content-Length`) as they are: not 1xx, 204 or 304.
fn has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Keys a side table of marks (backoff, hit-for-miss) holds at most: with
/// 16-32 bytes a mark, about 2 MiB each, whatever the request rate.
const MAX_MARKS: usize = 65_536;

/// Inserts `key` into a table of marks of at most [`MAX_MARKS`]; a full
/// table first forgets the marks `expired` says are past, and if it is
/// still full the new mark is not kept (its key goes without: a refresh not
/// backed off, a fetch coalesced).
fn insert_bounded<V>(
    marks: &mut HashMap<u64, V>,
    key: u64,
    mark: V,
    expired: impl Fn(&V) -> bool,
) -> bool {
    if marks.len() >= MAX_MARKS && !marks.contains_key(&key) {
        marks.retain(|_, v| !expired(v));
        if marks.len() >= MAX_MARKS {
            // Every mark is live: drop them all (they only save work), so
            // that a full table is not scanned on every insert.
            marks.clear();
            return false;
        }
    }
    marks.insert(key, mark);
    true
}

/// A fetch's result as a client's answer sees it: a backend 5xx is a
/// failure (stale-if-error) when the stale entry may stand in for it, and
/// a response to pass on otherwise. One mapping for the coalesced fill and
/// the uncoalesced fetch.
fn failed_over(fetched: Fetched, stale: Option<&Entry>) -> Fetched {
    match fetched {
        Fetched::Pass(passed)
            if policy::status_is_error(passed.status)
                && stale.is_some_and(|e| policy::usable_on_error(e, Instant::now())) =>
        {
            Fetched::Failed(UpstreamError::new(
                UpstreamErrorKind::Status,
                format!("HTTP {}", passed.status.as_u16()),
            ))
        }
        other => other,
    }
}

/// What a reload applied.
#[derive(Debug)]
pub struct Reloaded {
    /// Routes now in force.
    pub routes: usize,
    /// Settings changed in the file that apply at the next start.
    pub at_next_start: Vec<&'static str>,
}

/// How long an answer waited on the backend (a fetch, a pass, or another
/// client's fetch it was coalesced with), for the access log.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTime(pub Duration);

async fn upstream_timed(
    answer: impl std::future::Future<Output = Response<ProxyBody>>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let mut response = answer.await;
    response
        .extensions_mut()
        .insert(UpstreamTime(started.elapsed()));
    response
}

/// The key path of a route with key options: the path, the query with
/// parameters dropped or kept and maybe sorted, then the key headers' values
/// (after a newline, so purging the URL's key purges these too). The first
/// `len` bytes (path and shaped query) are also what the backend is sent:
/// a parameter the key leaves out must not reach the backend, or a client
/// could change the answer stored for everyone who shares the key.
struct ShapedKey {
    text: String,
    len: usize,
}

impl ShapedKey {
    /// The path and query sent to the backend.
    fn target(&self) -> &str {
        &self.text[..self.len]
    }
}

fn shaped_key(route: &Route, path: &str, query: Option<&str>, headers: &HeaderMap) -> ShapedKey {
    let mut params: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| route.keeps_param(p.split('=').next().unwrap_or("")))
        .collect();
    if route.sort_query {
        params.sort_unstable();
    }
    let mut key = String::with_capacity(path.len() + query.map_or(0, str::len) + 16);
    key.push_str(path);
    if !params.is_empty() {
        key.push('?');
        key.push_str(&params.join("&"));
    }
    let len = key.len();
    if !route.key_headers.is_empty() {
        key.push_str(&policy::vary_key(&route.key_headers, headers));
    }
    if let Cookies::Key(names) = &route.cookies {
        key.push_str("\ncookie=");
        key.push_str(&keyed_cookies(headers, names));
    }
    ShapedKey { text: key, len }
}

/// The key text of the variant `names` select for these request headers.
fn variant_text(key: RequestKey<'_>, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut text = key.to_text().into_string();
    text.push_str(&policy::vary_key(names, headers));
    text
}

/// The path and query of a `Location`-style value if it points at `host`
/// (a path, or an absolute URL with the same authority).
fn same_origin_path(value: &str, host: &str) -> Option<String> {
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
fn request_host(parts: &Parts) -> Result<&str, ProxyError> {
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
fn fill_headers(client_headers: &HeaderMap, forwarding: &upstream::Forwarding<'_>) -> HeaderMap {
    let mut headers = upstream::forward_headers(client_headers, forwarding);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_of_marks_stay_bounded() {
        let mut marks: HashMap<u64, u64> = HashMap::new();
        for key in 0..(MAX_MARKS as u64 + 1000) {
            insert_bounded(&mut marks, key, key, |_| false);
        }
        assert!(marks.len() <= MAX_MARKS);
        // Expired marks make room.
        marks.clear();
        for key in 0..MAX_MARKS as u64 {
            insert_bounded(&mut marks, key, key, |_| false);
        }
        assert!(insert_bounded(&mut marks, u64::MAX, 0, |v| *v < 10));
        assert_eq!(marks.len(), MAX_MARKS - 10 + 1);
        // All live: the table is emptied, not scanned again and again.
        assert!(
            !insert_bounded(&mut marks, u64::MAX - 1, 0, |_| false) || marks.len() <= MAX_MARKS
        );
        // A key already held is updated, full or not.
        assert!(insert_bounded(&mut marks, 500, 7, |_| false));
        assert_eq!(marks[&500], 7);
    }
}
