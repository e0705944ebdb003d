//! The request flow: request -> lookup -> (fill | pass) -> respond.
//!
//! [`Proxy`] is the shared state (configuration, rules, store, refresh
//! queue, upstream client, counters, and in fleet mode the connection to
//! Redis) and [`Proxy::handle`] the entry point. Each step lives in its
//! own file:
//! - `rules.rs`: the running rules (routes, defaults) and the key of a request;
//! - `lookup.rs`: what the cache has, decided without waiting (also the fast path's);
//! - `fill.rs`: a miss or an expired entry, coalesced per key;
//! - `fetch.rs`: one fetch for the cache, conditional, stored when storable;
//! - `background.rs`: stale entries' refreshes and their backoff;
//! - `pass.rs`: pass-through and invalidation;
//! - `shared.rs`: fleet mode around fill and refresh: the shared level
//!   read first and written back, the key's lease, the other instances'
//!   events, purges carried to the fleet (a no-op without `--redis`);
//! - `respond.rs`: every answer's headers, counters and access-log line;
//! - `warm_restart.rs`: the snapshot read at start, written while running
//!   and at shutdown, removed by a purge (`--snapshot-dir`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use http::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::cache::key::{valid_target, KeyHasher};
use crate::cache::store::Store;
use crate::cache::CacheStatus;
use crate::config::{Config, ConfigError, HeadLimits};
use crate::error::ProxyError;
use crate::fleet::{Fleet, FleetSettings, StreamSettings, LEASE_MARGIN};
use crate::logs::{self, Cause, RateLimit, Summary, Totals};
use crate::metrics::{Gauges, Stats};
use crate::refresh::limit::Gate;
use crate::refresh::popularity::Popularity;
use crate::refresh::RefreshQueue;
use crate::upstream::{BoxError, Upstream};

mod background;
mod fetch;
mod fill;
mod lookup;
mod pass;
mod respond;
mod rules;
mod shared;
mod warm_restart;
mod worker;

use self::background::{Backoffs, RefreshRequest, REFRESH_QUEUE_BYTES};
use self::fill::HitForMiss;
pub use self::lookup::FastHit;
use self::lookup::{BackendWork, Next};
use self::respond::{upstream_timed, AccessLine, AnswerLog, Answered};
use self::rules::{request_host, Peer, Rules};

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
    /// What a reload can change: the routes and the caching rules. Swapped
    /// whole; the hit path reads it without a lock or a reference count.
    rules: ArcSwap<Rules>,
    /// The field targeted at this proxy (fixed at start).
    targeted: HeaderName,
    keys: KeyHasher,
    store: Store,
    refresh: RefreshQueue<RefreshRequest>,
    /// How many refreshes may run at once: adapted to the backend.
    refresh_gate: Arc<Gate>,
    /// Recent requests per key: what a refresh is worth, and which keys
    /// are refreshed ahead of staleness.
    popularity: Popularity,
    /// Purges so far: a snapshot whose entries were taken before the
    /// latest one is not kept (see [`Proxy::snapshot_outdated`]).
    purges: std::sync::atomic::AtomicU64,
    /// Spreads refresh-ahead moments per process, so that a fleet's
    /// instances holding the same entry do not all refresh it at once.
    ahead_seed: u64,
    upstream: Upstream,
    stats: Stats,
    /// Keys whose last refresh failed: no new refresh before `until`. A std
    /// `Mutex`: touched on stale answers and refresh results only.
    backoff: Mutex<Backoffs>,
    /// Keys whose answer could not be stored, until when: their requests go
    /// to the backend at once instead of queueing behind one another's fetch
    /// (Varnish's hit-for-miss).
    hit_for_miss: HitForMiss,
    /// Failure lines (refresh failed, error answers, stale-if-error) that
    /// may be written now, per cause.
    failure_lines: RateLimit,
    /// The tasks shutdown waits for: fills run in their own task (so that a
    /// client going away does not cancel its waiters'), tracked here.
    tasks: TaskTracker,
    /// Fleet mode (`--redis`): the shared level, leases and events.
    fleet: Option<Arc<Fleet>>,
}

/// The answer to one request: ready at once (from the cache), or a future
/// that waits on the backend.
pub type Answer = futures_util::future::Either<
    std::future::Ready<Response<ProxyBody>>,
    std::pin::Pin<Box<dyn std::future::Future<Output = Response<ProxyBody>> + Send>>,
>;

/// What a reload applied.
#[derive(Debug)]
pub struct Reloaded {
    /// Routes now in force.
    pub routes: usize,
    /// Settings changed in the file that apply at the next start.
    pub at_next_start: Vec<&'static str>,
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

impl Proxy {
    /// Builds the proxy and starts its refresh workers, which stop when
    /// `cancel` fires.
    pub fn start(
        config: Config,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Proxy>, String> {
        Proxy::start_as(config, cancel, tracker, true)
    }

    /// Builds the proxy of `swr-proxy worker`: its refreshes are the
    /// stream's jobs ([`Proxy::run_worker`]), so no local refresh workers
    /// take slots of the refresh limit.
    pub fn start_worker(
        config: Config,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Proxy>, String> {
        Proxy::start_as(config, cancel, tracker, false)
    }

    fn start_as(
        config: Config,
        cancel: CancellationToken,
        tracker: &TaskTracker,
        local_refresh: bool,
    ) -> Result<Arc<Proxy>, String> {
        let upstream = Upstream::new(
            &config.start.upstream,
            config.upstream_roots.clone(),
            config.start.upstream_timeout,
            config.start.upstream_concurrency,
            config.start.max_buffered,
        )?;
        let (refresh, workers) = RefreshQueue::new(
            config.start.refresh_queue,
            REFRESH_QUEUE_BYTES,
            // A claim's age limit: a refresh can wait for a slot, a head and
            // a body, each up to the upstream timeout; one older than that
            // belongs to a stuck fetch.
            config.start.upstream_timeout * 3,
        );
        let stats = Stats::default();
        let fleet = match &config.start.redis {
            Some(url) => Some(Fleet::start(
                FleetSettings {
                    url: url.clone(),
                    timeout: config.start.redis_timeout,
                    max_object: config.start.redis_max_object_size,
                    lease: config.start.upstream_timeout + LEASE_MARGIN,
                    stream: StreamSettings {
                        visibility: config.start.refresh_visibility_timeout,
                        max_attempts: config.start.refresh_max_attempts,
                        max_len: config.start.refresh_stream_max_len,
                    },
                },
                &cancel,
                tracker,
            )?),
            None => None,
        };
        let proxy = Arc::new(Proxy {
            rules: ArcSwap::from_pointee(Rules::from_config(
                &config,
                &stats,
                &config.start.targeted_cache_control,
            )),
            limits: HeadLimits::of(&config),
            targeted: config.start.targeted_cache_control.clone(),
            keys: KeyHasher::new(),
            store: Store::new(config.start.max_size),
            refresh,
            refresh_gate: Gate::new(config.start.refresh_concurrency),
            popularity: Popularity::new(Instant::now()),
            purges: std::sync::atomic::AtomicU64::new(0),
            ahead_seed: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(0u64)
            },
            upstream,
            stats,
            backoff: Mutex::new(Backoffs::default()),
            hit_for_miss: HitForMiss::default(),
            failure_lines: RateLimit::new(FAILURE_LINE_EVERY),
            tasks: tracker.clone(),
            fleet,
            config,
        });
        proxy.listen_to_fleet(&cancel);
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
                        sweep_proxy.popularity.decay_if_due(now);
                    }
                    () = sweep_cancel.cancelled() => break,
                }
            }
        });
        let every = proxy.config.start.log_summary_interval;
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
        if let Some(dir) = proxy.config.start.snapshot_dir.clone() {
            // A worker keeps no cache worth restoring.
            if local_refresh {
                proxy.load_snapshot(&dir);
                proxy.keep_snapshots(dir, tracker, cancel.clone());
            }
        }
        if local_refresh {
            let worker_proxy = Arc::clone(&proxy);
            workers.spawn(
                &proxy.refresh_gate,
                move |job| Arc::clone(&worker_proxy).run_refresh(job),
                cancel,
                tracker,
            );
        }
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

    /// Keys with a refresh queued or running.
    pub fn refresh_claims(&self) -> usize {
        self.refresh.claimed()
    }

    /// Refreshes waiting for a worker.
    pub fn refresh_queue_depth(&self) -> usize {
        self.refresh.depth()
    }

    /// Re-reads the configuration file and applies its routes and caching
    /// rules; the cache, the connections, the listeners and the threads
    /// stay. A bad file is rejected and the running configuration kept.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let config = self.config.reread()?;
        let path = config
            .file()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let routes = config.routes.len();
        let at_next_start = self.config.start_only_changes(&config);
        // Start settings keep their running values (`at_next_start` names
        // those the file changed): the rules are built with this proxy's.
        self.rules.store(Arc::new(Rules::from_config(
            &config,
            &self.stats,
            &self.targeted,
        )));
        tracing::info!(file = %path, routes, "configuration reloaded");
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

    /// In fleet mode, whether Redis answers (`None` without `--redis`).
    pub fn redis_up(&self) -> Option<bool> {
        self.fleet.as_ref().map(|fleet| fleet.is_up())
    }

    /// The Prometheus text of every metric (see [`Stats::render_prometheus`]).
    pub fn render_metrics(&self) -> Result<String, std::fmt::Error> {
        let limit = self.refresh_gate.snapshot();
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
            refresh_limit: limit.limit() as u64,
            refresh_latency_baseline: limit.baseline().map_or(0.0, |d| d.as_secs_f64()),
            refresh_latency: limit.recent().map_or(0.0, |d| d.as_secs_f64()),
        })?;
        if let Some(fleet) = &self.fleet {
            fleet.render(&mut text)?;
        }
        Ok(text)
    }

    /// What the periodic summary line reports the change of.
    fn totals(&self) -> Totals {
        Totals {
            requests: CacheStatus::ALL
                .into_iter()
                .map(|s| self.stats.requests(s))
                .sum(),
            refreshed: self.stats.refresh_succeeded.get(),
            refresh_failed: self.stats.refresh_failed.get(),
            refresh_dropped: self.stats.refresh_dropped.get(),
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
        lock(&self.backoff).forget_expired(now);
        self.hit_for_miss.forget_expired(now);
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
        let rules = self.rules.load();
        let route = rules.route_for(request.uri().path());
        let access = self.config.start.access_log.then(|| AccessLine {
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
        });
        let log = (access.is_some() || route.is_some()).then(|| AnswerLog {
            route: route.map(|r| Arc::clone(&r.stats)),
            access,
        });
        let (parts, body) = request.into_parts();
        let peer = rules.peer(client);
        let next = match self.refusal(&parts) {
            None => self.from_cache(&parts, peer, &rules, route),
            // Never forwarded: a head past the limits, a Host that is not a
            // host (or two, or none), a path with dot segments.
            Some(err) => Next::Answer(self.refused(&err)),
        };
        drop(rules);
        match next {
            Next::Answer(answered) => {
                Answer::Left(std::future::ready(self.log_answer(log, answered, client)))
            }
            Next::Backend(work) => {
                let proxy = Arc::clone(self);
                Answer::Right(Box::pin(async move {
                    let answered =
                        upstream_timed(proxy.from_backend(parts, body, peer, work)).await;
                    proxy.log_answer(log, answered, client)
                }))
            }
        }
    }

    /// Answers a request the cache could not: passes it through, or fetches
    /// (coalesced) what the cache needs.
    async fn from_backend<B>(
        self: &Arc<Self>,
        parts: Parts,
        body: B,
        peer: Peer,
        work: BackendWork,
    ) -> Answered
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        match work {
            BackendWork::Pass(reason) => self.pass(&parts, Some(body), peer, reason).await,
            BackendWork::Fetch(plan) => {
                drop(body);
                if plan.alone {
                    self.fetch_alone(&parts, *plan).await
                } else {
                    self.fill(&parts, *plan, peer).await
                }
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
        let mut next = MAX_MARKS as u64;
        while marks.len() < MAX_MARKS {
            assert!(insert_bounded(&mut marks, next, 0, |_| false));
            next += 1;
        }
        // A key already held is updated, full or not.
        assert!(insert_bounded(&mut marks, 500, 7, |_| false));
        assert_eq!((marks[&500], marks.len()), (7, MAX_MARKS));
        // Full and every mark live: the new mark is not kept and the table
        // is emptied, not scanned again on every insert.
        assert!(!insert_bounded(&mut marks, u64::MAX - 1, 0, |_| false));
        assert!(marks.is_empty());
    }
}
