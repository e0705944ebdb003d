//! Counters of what the proxy did, in one place, and their Prometheus text.
//! Every bypass, drop and failure is counted here under the same name its log
//! line uses.
//!
//! The exposition is `prometheus-client`'s: [`Stats`] registers every family
//! once in a [`Registry`], and `/metrics` is that registry written by
//! [`prometheus_text::encode`], the Prometheus text format 0.0.4 (counters
//! are registered without `_total`; the encoder appends it, to the HELP and
//! TYPE lines as well). Label sets derive `EncodeLabelSet`; label values are
//! the enums' `as_str()`, the strings of `X-Cache`, `Cache-Status` and the
//! logs, through `EncodeLabelValue` impls written here (the derive would
//! write the Rust variant name, `Hit` instead of `HIT`).
//!
//! What is prometheus-client's own, and what is a custom metric, and why:
//! - Counters off the hit path (bypass reasons, refusals, backend requests
//!   and errors, refresh events, the single counters) are its `Counter`: one
//!   relaxed `fetch_add`. A labelled one is a `Family` whose series are all
//!   created here, once, and kept as `Counter` handles in [`Stats`], so that
//!   recording is never a label hash and a map lookup, and every series is
//!   exported from the start, at 0.
//! - Gauges are its `Gauge`. Those whose values live elsewhere (the store,
//!   the refresh queue, the backend client, the log sink: [`Gauges`]) are set
//!   from a snapshot when `/metrics` is scraped.
//! - What the hit path records stays `Striped`: answers by cache status and
//!   by route, fast hits and the served-age histogram. Two cores answering
//!   hits would otherwise write the same cache line on every answer; a stripe
//!   per thread keeps them apart. These are custom metrics implementing
//!   `EncodeMetric`, written by the same encoder. prometheus-client's own
//!   `Histogram` is not used for the others either: its `observe` takes a
//!   write lock.
//! - Per-route counters are a custom metric over every route configured since
//!   start, in first-seen order, kept across reloads: a routed hit records on
//!   counters its rules already hold (no lookup), and the family is declared
//!   even before a route exists, where an empty `Family` is left out.

use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::encoding::{
    prometheus_text, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};

use crate::cache::policy::BypassReason;
use crate::cache::CacheStatus;
use crate::error::{ProxyError, UpstreamErrorKind};
use crate::sampling::{self, Countdown};

/// Why the proxy contacted the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamCause {
    /// A miss or an expired entry (the coalesced fill).
    Miss,
    /// A background refresh of a stale entry.
    Refresh,
    /// A request passed through (method, or a response that may not be shared).
    Pass,
    /// A conditional fetch of a stored entry (If-None-Match / If-Modified-Since).
    Revalidate,
}

impl UpstreamCause {
    pub const ALL: [UpstreamCause; 4] = [
        UpstreamCause::Miss,
        UpstreamCause::Refresh,
        UpstreamCause::Pass,
        UpstreamCause::Revalidate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamCause::Miss => "miss",
            UpstreamCause::Refresh => "refresh",
            UpstreamCause::Pass => "pass",
            UpstreamCause::Revalidate => "revalidate",
        }
    }
}

/// What became of a background refresh (`swr_refresh_events_total{event}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RefreshEvent {
    Queued,
    Dropped,
    Succeeded,
    Failed,
    NotStorable,
    Backoff,
    Ahead,
}

impl RefreshEvent {
    const ALL: [RefreshEvent; 7] = [
        RefreshEvent::Queued,
        RefreshEvent::Dropped,
        RefreshEvent::Succeeded,
        RefreshEvent::Failed,
        RefreshEvent::NotStorable,
        RefreshEvent::Backoff,
        RefreshEvent::Ahead,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RefreshEvent::Queued => "queued",
            RefreshEvent::Dropped => "dropped",
            RefreshEvent::Succeeded => "succeeded",
            RefreshEvent::Failed => "failed",
            RefreshEvent::NotStorable => "not_storable",
            RefreshEvent::Backoff => "backoff",
            RefreshEvent::Ahead => "ahead",
        }
    }
}

/// A label value is the name `as_str()` gives, the one headers and logs use.
macro_rules! label_value_is_as_str {
    ($($label:ty),+) => {$(
        impl EncodeLabelValue for $label {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    )+};
}

label_value_is_as_str!(
    CacheStatus,
    BypassReason,
    UpstreamCause,
    UpstreamErrorKind,
    RefreshEvent
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CacheLabel {
    cache: CacheStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabel {
    route: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
    cache: CacheStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BypassLabel {
    reason: BypassReason,
}

/// A [`ProxyError::REFUSALS`] detail.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabel {
    cause: UpstreamCause,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: UpstreamErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabel {
    event: RefreshEvent,
}

/// Cells of a counter recorded on every hit, cache-line-padded and picked
/// per thread: two cores answering hits never write the same line.
#[derive(Debug, Default)]
struct Striped([Padded; STRIPES]);

const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    pub fn add(&self, n: u64) {
        self.add_to(stripe(), n);
    }

    /// [`Striped::add`] with this thread's [`stripe`] already known.
    fn add_to(&self, stripe: usize, n: u64) {
        if let Some(cell) = self.0.get(stripe) {
            cell.0.fetch_add(n, Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Relaxed)).sum()
    }
}

/// This thread's stripe, assigned round-robin on first use.
fn stripe() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static STRIPE: usize = (NEXT.fetch_add(1, Relaxed) as usize) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// An unlabelled counter on the hit path: `Striped` cells, shared with
/// the registry like prometheus-client's `Counter`.
#[derive(Debug, Clone, Default)]
pub struct StripedCounter(Arc<Striped>);

impl StripedCounter {
    pub fn add(&self, n: u64) {
        self.0.add(n);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl EncodeMetric for StripedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Answers by cache status: striped cells per [`CacheStatus`].
#[derive(Debug, Default)]
struct ByStatus([Striped; CacheStatus::ALL.len()]);

impl ByStatus {
    pub fn record(&self, status: CacheStatus) {
        self.0[status.index()].add(1);
    }

    pub fn get(&self, status: CacheStatus) -> u64 {
        self.0[status.index()].get()
    }
}

/// `swr_requests_total`: one series per cache status, from the cells
/// [`Stats`] records on.
#[derive(Debug)]
struct RequestsMetric(Arc<ByStatus>);

impl EncodeMetric for RequestsMetric {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for cache in CacheStatus::ALL {
            encoder
                .encode_family(&CacheLabel { cache })?
                .encode_counter::<NoLabelSet, _, u64>(&self.0.get(cache), None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A histogram with fixed bucket bounds (in seconds, or a ratio for
/// `swr_served_age_ttl_ratio`), its buckets striped.
/// Cloning shares it (a handle, like prometheus-client's metrics).
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Buckets>);

#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    /// Counts per bucket (not cumulative); the last is `+Inf`.
    counts: Box<[Striped]>,
    /// The sum of the values observed, in millionths of their unit
    /// (microseconds for seconds).
    sum_millionths: Striped,
}

/// Latency buckets: 1 ms to 30 s.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of an answer's age over its freshness lifetime: below 1 fresh,
/// above it stale.
const AGE_RATIO_BOUNDS: &[f64] = &[
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0,
    50.0,
];
/// Served-age buckets: 1 s to 1 day.
const AGE_BOUNDS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 86400.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram(Arc::new(Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| Striped::default()).collect(),
            sum_millionths: Striped::default(),
        }))
    }

    pub fn observe(&self, value: Duration) {
        self.observe_f64(value.as_secs_f64());
    }

    /// Observes a value in the histogram's unit (seconds, or a ratio).
    pub fn observe_f64(&self, value: f64) {
        let index = self
            .0
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.0.bounds.len());
        let stripe = stripe();
        if let Some(bucket) = self.0.counts.get(index) {
            bucket.add_to(stripe, 1);
        }
        // `as` saturates (and maps NaN to 0).
        self.0.sum_millionths.add_to(stripe, (value * 1e6) as u64);
    }

    pub fn count(&self) -> u64 {
        self.0.counts.iter().map(Striped::get).sum()
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        // (upper bound, count in that bucket alone); the encoder accumulates.
        let buckets: Vec<(f64, u64)> = self
            .0
            .counts
            .iter()
            .enumerate()
            .map(|(i, count)| {
                let bound = self.0.bounds.get(i).copied().unwrap_or(f64::INFINITY);
                (bound, count.get())
            })
            .collect();
        // The count from the same reads as the buckets, so `+Inf` and
        // `_count` agree even while hits are recorded.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_millionths.get() as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Answers by cache status for one route.
#[derive(Debug)]
pub struct RouteStats {
    pub pattern: Arc<str>,
    requests: ByStatus,
    /// Answers from the cache by age over freshness lifetime.
    age_ratio: Histogram,
}

impl RouteStats {
    fn new(pattern: &str) -> RouteStats {
        RouteStats {
            pattern: pattern.into(),
            requests: ByStatus::default(),
            age_ratio: Histogram::new(AGE_RATIO_BOUNDS),
        }
    }

    pub fn record(&self, status: CacheStatus) {
        self.requests.record(status);
    }

    /// An answer from the cache `ratio` of its freshness lifetime old.
    pub fn record_age_ratio(&self, ratio: f64) {
        self.age_ratio.observe_f64(ratio);
    }

    pub fn requests(&self, status: CacheStatus) -> u64 {
        self.requests.get(status)
    }
}

/// `swr_route_requests_total`: every route configured since start, in the
/// order first seen. A std `Mutex`: taken when rules are built and at a
/// scrape, never when an answer is counted.
#[derive(Debug, Clone, Default)]
struct Routes(Arc<Mutex<Vec<Arc<RouteStats>>>>);

impl Routes {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<RouteStats>>> {
        // A poisoned list is still a list: every use is one push or a read.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_create(&self, pattern: &str) -> Arc<RouteStats> {
        let mut routes = self.lock();
        if let Some(route) = routes.iter().find(|r| &*r.pattern == pattern) {
            return Arc::clone(route);
        }
        let route = Arc::new(RouteStats::new(pattern));
        routes.push(Arc::clone(&route));
        route
    }
}

impl EncodeMetric for Routes {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for route in self.lock().iter() {
            for cache in CacheStatus::ALL {
                let labels = RouteLabels {
                    route: Arc::clone(&route.pattern),
                    cache,
                };
                encoder
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&route.requests(cache), None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// `swr_served_age_ttl_ratio`: per route, and for answers outside every
/// route (`route="default"`), how old answers from the cache were against
/// their freshness lifetime.
#[derive(Debug, Clone)]
struct AgeRatios {
    routes: Routes,
    unrouted: Arc<RouteStats>,
}

impl EncodeMetric for AgeRatios {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let routes = self.routes.lock().clone();
        for route in std::iter::once(&self.unrouted).chain(routes.iter()) {
            let label = RouteLabel {
                route: Arc::clone(&route.pattern),
            };
            route.age_ratio.encode(encoder.encode_family(&label)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A gauge of a count (prometheus-client's default gauge is signed).
pub type CountGauge = Gauge<u64, AtomicU64>;
/// A gauge of seconds.
pub type SecondsGauge = Gauge<f64, AtomicU64>;

/// The proxy's metrics: the registry that writes them, and a handle on each
/// series to record with (the registry holds the other handle).
#[derive(Debug)]
pub struct Stats {
    /// Every family below, registered once, in the order `/metrics` lists them.
    registry: Registry,
    requests: Arc<ByStatus>,
    routes: Routes,
    bypasses: [Counter; BypassReason::ALL.len()],
    /// Requests refused before the cache looked at them, by
    /// [`ProxyError::REFUSALS`] detail.
    refused: [Counter; ProxyError::REFUSALS.len()],
    upstream_requests: [Counter; UpstreamCause::ALL.len()],
    upstream_errors: [Counter; UpstreamErrorKind::ALL.len()],
    pub refresh_queued: Counter,
    pub refresh_dropped: Counter,
    pub refresh_succeeded: Counter,
    pub refresh_failed: Counter,
    /// Refreshes whose backend answer may not be stored: the entry is removed.
    pub refresh_not_storable: Counter,
    /// Refreshes not queued because the key's last refresh failed recently.
    pub refresh_backoff: Counter,
    /// Refreshes queued before their entry turned stale (refresh-ahead),
    /// also counted as queued.
    pub refresh_ahead: Counter,
    /// Refreshes running now.
    pub refresh_in_flight: CountGauge,
    /// Most refreshes ever running at once.
    pub refresh_in_flight_max: CountGauge,
    /// Requests that waited on another request's fill instead of fetching.
    pub coalesced_waiters: Counter,
    /// Answers served from a stale entry because the backend failed.
    pub stale_if_error_served: Counter,
    /// Entries renewed by a 304 from the backend.
    pub revalidated: Counter,
    /// Body bytes the backend did not have to send thanks to a 304.
    pub revalidation_bytes_saved: Counter,
    /// Entries removed after a successful POST/PUT/DELETE/PATCH.
    pub invalidations: Counter,
    /// 304 answers the cache gave to clients' conditional requests.
    pub not_modified_served: Counter,
    /// Entries removed or marked stale by the admin API: this instance's,
    /// or (fleet mode) another instance's, whose purge or unsafe-method
    /// invalidation arrived as an event.
    pub purged: Counter,
    /// Requests for keys remembered as uncacheable, sent without coalescing.
    pub hit_for_miss: Counter,
    /// Hits answered without hyper (see [`crate::fast_hits`]); the misses
    /// and passes the fast path also answers are not counted here.
    pub fast_hits: StripedCounter,
    /// Connections the fast path handed to hyper: at a request it does not
    /// take, or with an answer only hyper writes (a streamed body, 204, ...).
    pub fast_handoffs: Counter,
    /// Time from sending a request upstream to its response head.
    pub upstream_latency: Histogram,
    /// How long background refreshes took.
    pub refresh_duration: Histogram,
    /// How long refreshes waited in the queue for a worker.
    pub refresh_wait: Histogram,
    /// The age of answers served from the cache.
    pub served_age: Histogram,
    /// The most requested keys (sampled; in `/stats`, not in `/metrics`).
    pub top_keys: TopKeys,
    /// Age over freshness lifetime of answers outside every route (a
    /// route's own are in its [`RouteStats`]); see
    /// [`Stats::record_age_ratio`].
    unrouted: Arc<RouteStats>,
    /// The [`Gauges`], as registered series, set at each scrape.
    scraped: Scraped,
}

/// Series whose values are kept elsewhere ([`Gauges`]): copied in when
/// `/metrics` is scraped, never recorded here.
#[derive(Debug)]
struct Scraped {
    refresh_queue_depth: CountGauge,
    entries: CountGauge,
    bytes: CountGauge,
    max_bytes: CountGauge,
    /// The store's own count, so a counter set rather than incremented.
    evictions: Counter,
    upstream_in_flight: CountGauge,
    vary_index_bytes: CountGauge,
    refresh_queue_bytes: CountGauge,
    upstream_buffered_bytes: CountGauge,
    /// The log sink's own count, like `evictions`.
    log_lines_dropped: Counter,
    refresh_limit: CountGauge,
    refresh_latency_baseline: SecondsGauge,
    refresh_latency: SecondsGauge,
}

impl Scraped {
    fn set(&self, gauges: Gauges) {
        self.refresh_queue_depth.set(gauges.refresh_queue_depth);
        self.entries.set(gauges.entries);
        self.bytes.set(gauges.bytes);
        self.max_bytes.set(gauges.max_bytes);
        self.evictions.inner().store(gauges.evictions, Relaxed);
        self.upstream_in_flight.set(gauges.upstream_in_flight);
        self.vary_index_bytes.set(gauges.vary_index_bytes);
        self.refresh_queue_bytes.set(gauges.refresh_queue_bytes);
        self.upstream_buffered_bytes
            .set(gauges.upstream_buffered_bytes);
        self.log_lines_dropped
            .inner()
            .store(gauges.log_lines_dropped, Relaxed);
        self.refresh_limit.set(gauges.refresh_limit);
        self.refresh_latency_baseline
            .set(gauges.refresh_latency_baseline);
        self.refresh_latency.set(gauges.refresh_latency);
    }
}

/// Registers `metric` and hands back the caller's handle on it.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers a counter family and creates each of its series once; the
/// handles come back in the order of `labels`.
fn family<L, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    labels: [L; N],
) -> [Counter; N]
where
    L: EncodeLabelSet + Clone + Eq + Hash + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Counter>::default();
    let handles = labels.map(|label| family.get_or_create_owned(&label));
    registry.register(name, help, family);
    handles
}

// HELP texts are given without their final period: the registry adds it.
// Counter names are given without `_total`: the encoder adds it.
impl Default for Stats {
    fn default() -> Self {
        let mut r = Registry::default();
        let requests = Arc::new(ByStatus::default());
        r.register(
            "swr_requests",
            "Answers by cache status",
            RequestsMetric(Arc::clone(&requests)),
        );
        let bypasses = family(
            &mut r,
            "swr_bypass",
            "Answers passed through and not stored, by reason",
            BypassReason::ALL.map(|reason| BypassLabel { reason }),
        );
        let refused = family(
            &mut r,
            "swr_refused",
            "Requests refused before the cache looked at them (400, 414, 431), by reason",
            ProxyError::REFUSALS.map(|reason| RefusedLabel { reason }),
        );
        let upstream_requests = family(
            &mut r,
            "swr_upstream_requests",
            "Requests sent to the backend, by cause",
            UpstreamCause::ALL.map(|cause| CauseLabel { cause }),
        );
        let upstream_errors = family(
            &mut r,
            "swr_upstream_errors",
            "Backend failures, by kind",
            UpstreamErrorKind::ALL.map(|kind| KindLabel { kind }),
        );
        let [refresh_queued, refresh_dropped, refresh_succeeded, refresh_failed, refresh_not_storable, refresh_backoff, refresh_ahead] =
            family(
                &mut r,
                "swr_refresh_events",
                "Background refreshes, by what happened",
                RefreshEvent::ALL.map(|event| EventLabel { event }),
            );
        let refresh_in_flight = register(
            &mut r,
            "swr_refresh_in_flight",
            "Background refreshes running now",
            CountGauge::default(),
        );
        let refresh_queue_depth = register(
            &mut r,
            "swr_refresh_queue_depth",
            "Refreshes waiting for a worker",
            CountGauge::default(),
        );
        let mut counter = |name: &str, help: &str| register(&mut r, name, help, Counter::default());
        let coalesced_waiters = counter(
            "swr_coalesced_waiters",
            "Requests that waited on another request's fetch",
        );
        let stale_if_error_served = counter(
            "swr_stale_if_error",
            "Stale answers served because the backend failed",
        );
        let revalidated = counter(
            "swr_revalidated",
            "Entries renewed by a 304 from the backend",
        );
        let revalidation_bytes_saved = counter(
            "swr_revalidation_saved_bytes",
            "Body bytes the backend did not send thanks to a 304",
        );
        let invalidations = counter(
            "swr_invalidations",
            "Entries removed after a successful unsafe method",
        );
        let not_modified_served = counter(
            "swr_not_modified",
            "304 answers given to clients' conditional requests",
        );
        let purged = counter(
            "swr_purged",
            "Entries removed or marked stale by the admin API (in fleet mode, also by another instance's purge or invalidation)",
        );
        let hit_for_miss = counter(
            "swr_hit_for_miss",
            "Requests for keys remembered as uncacheable",
        );
        let fast_hits = register(
            &mut r,
            "swr_fast_hits",
            "Hits answered without hyper (plain HTTP/1.1 GET; not the misses the fast path also answers); also counted in swr_requests_total",
            StripedCounter::default(),
        );
        let fast_handoffs = register(
            &mut r,
            "swr_fast_hit_handoffs",
            "Connections the fast path handed to hyper: at their first request it does not take, or with an answer only hyper writes (a streamed body, 204, 304, ...)",
            Counter::default(),
        );
        let mut gauge =
            |name: &str, help: &str| register(&mut r, name, help, CountGauge::default());
        let entries = gauge("swr_cache_entries", "Entries stored");
        let bytes = gauge("swr_cache_bytes", "Bytes charged against --max-size");
        let max_bytes = gauge("swr_cache_max_bytes", "The --max-size budget");
        let evictions = register(
            &mut r,
            "swr_cache_evictions",
            "Entries evicted to stay within --max-size",
            Counter::default(),
        );
        let mut gauge =
            |name: &str, help: &str| register(&mut r, name, help, CountGauge::default());
        let upstream_in_flight = gauge(
            "swr_upstream_in_flight",
            "Requests to the backend in flight",
        );
        let refresh_in_flight_max = gauge(
            "swr_refresh_in_flight_max",
            "Most background refreshes ever running at once",
        );
        let vary_index_bytes = gauge(
            "swr_vary_index_bytes",
            "Bytes the Vary index is charged, within swr_cache_bytes (at most 1/16 of --max-size)",
        );
        let refresh_queue_bytes = gauge(
            "swr_refresh_queue_bytes",
            "Bytes held by refresh jobs queued or running (at most 32 MiB)",
        );
        let upstream_buffered_bytes = gauge(
            "swr_upstream_buffered_bytes",
            "Body bytes being read from the backend to store (at most --max-buffered)",
        );
        let log_lines_dropped = register(
            &mut r,
            "swr_log_lines_dropped",
            "Log lines dropped, never waited for, because the log sink fell behind",
            Counter::default(),
        );
        let mut latency =
            |name: &str, help: &str| register(&mut r, name, help, Histogram::new(LATENCY_BOUNDS));
        let upstream_latency = latency(
            "swr_upstream_latency_seconds",
            "Time from sending a request to the backend to its response head",
        );
        let refresh_duration = latency(
            "swr_refresh_duration_seconds",
            "How long background refreshes took",
        );
        let refresh_wait = latency(
            "swr_refresh_wait_seconds",
            "How long refreshes waited in the queue for a worker",
        );
        let refresh_limit = register(
            &mut r,
            "swr_refresh_limit",
            "Refreshes that may be in flight now: the adaptive limit, at most --refresh-concurrency",
            CountGauge::default(),
        );
        let mut seconds =
            |name: &str, help: &str| register(&mut r, name, help, SecondsGauge::default());
        let refresh_latency_baseline = seconds(
            "swr_refresh_latency_baseline_seconds",
            "The backend's unloaded refresh latency, as the adaptive limit estimates it",
        );
        let refresh_latency = seconds(
            "swr_refresh_latency_seconds",
            "The moving average of refreshes' backend latency",
        );
        let served_age = register(
            &mut r,
            "swr_served_age_seconds",
            "The age of answers served from the cache",
            Histogram::new(AGE_BOUNDS),
        );
        let routes = register(
            &mut r,
            "swr_route_requests",
            "Answers by route and cache status",
            Routes::default(),
        );
        let unrouted = Arc::new(RouteStats::new("default"));
        register(
            &mut r,
            "swr_served_age_ttl_ratio",
            "Answers from the cache by age over freshness lifetime (above 1: stale), per route",
            AgeRatios {
                routes: routes.clone(),
                unrouted: Arc::clone(&unrouted),
            },
        );
        Stats {
            registry: r,
            requests,
            routes,
            bypasses,
            refused,
            upstream_requests,
            upstream_errors,
            refresh_queued,
            refresh_dropped,
            refresh_succeeded,
            refresh_failed,
            refresh_not_storable,
            refresh_backoff,
            refresh_ahead,
            refresh_in_flight,
            refresh_in_flight_max,
            coalesced_waiters,
            stale_if_error_served,
            revalidated,
            revalidation_bytes_saved,
            invalidations,
            not_modified_served,
            purged,
            hit_for_miss,
            fast_hits,
            fast_handoffs,
            upstream_latency,
            refresh_duration,
            refresh_wait,
            served_age,
            top_keys: TopKeys::default(),
            unrouted,
            scraped: Scraped {
                refresh_queue_depth,
                entries,
                bytes,
                max_bytes,
                evictions,
                upstream_in_flight,
                vary_index_bytes,
                refresh_queue_bytes,
                upstream_buffered_bytes,
                log_lines_dropped,
                refresh_limit,
                refresh_latency_baseline,
                refresh_latency,
            },
        }
    }
}

/// The most requested keys, estimated by sampling about one answer from the
/// cache in [`sampling::MEAN_GAP`] per thread, at random gaps: the hit path
/// pays a thread-local decrement, and a short lock about one time in
/// sixteen.
#[derive(Debug, Default)]
pub struct TopKeys {
    /// A std `Mutex`: held for one map update per sample.
    counts: std::sync::Mutex<std::collections::HashMap<Box<str>, u64>>,
}

/// Keys tracked at most; past this the less requested half is dropped.
const TOP_KEYS_TRACKED: usize = 4096;
/// Bytes of a key's text kept (a variant's key can hold 32 KiB of request
/// headers): the table stays under about 1.5 MiB whatever clients send.
const TOP_KEY_BYTES: usize = 256;

impl TopKeys {
    pub fn record(&self, key: &str) {
        thread_local! {
            static UNTIL_SAMPLE: Countdown = const { Countdown::new() };
        }
        if !UNTIL_SAMPLE.with(Countdown::due) {
            return;
        }
        let mut end = key.len().min(TOP_KEY_BYTES);
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        let key = &key[..end];
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(key) {
            Some(count) => *count += sampling::MEAN_GAP,
            None => {
                counts.insert(key.into(), sampling::MEAN_GAP);
            }
        }
        if counts.len() > TOP_KEYS_TRACKED {
            let mut all: Vec<u64> = counts.values().copied().collect();
            let middle = all.len() / 2;
            let (_, threshold, _) = all.select_nth_unstable(middle);
            let threshold = *threshold;
            counts.retain(|_, count| *count > threshold);
        }
    }

    /// The `n` most requested keys with their estimated answer counts.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(String, u64)> = counts.iter().map(|(k, c)| (k.to_string(), *c)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// Gauges read from elsewhere when the metrics are rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub evictions: u64,
    pub refresh_queue_depth: u64,
    pub upstream_in_flight: u64,
    /// Log lines dropped because the log sink fell behind (see [`crate::logs`]).
    pub log_lines_dropped: u64,
    /// Bytes the Vary index is charged (within `bytes`).
    pub vary_index_bytes: u64,
    /// Bytes held by refresh jobs queued or running.
    pub refresh_queue_bytes: u64,
    /// Body bytes being read to store (`--max-buffered` at most).
    pub upstream_buffered_bytes: u64,
    /// Refreshes that may be in flight now (see [`crate::refresh::limit`]).
    pub refresh_limit: u64,
    /// Seconds: the backend's unloaded and recent refresh latency.
    pub refresh_latency_baseline: f64,
    pub refresh_latency: f64,
}

/// Every metric name the proxy exports (histograms by their base name);
/// fleet mode (`--redis`) adds its own `swr_fleet_*` series ([`crate::fleet`]).
pub const METRIC_NAMES: &[&str] = &[
    "swr_requests_total",
    "swr_route_requests_total",
    "swr_bypass_total",
    "swr_refused_total",
    "swr_upstream_requests_total",
    "swr_upstream_errors_total",
    "swr_refresh_events_total",
    "swr_refresh_in_flight",
    "swr_refresh_in_flight_max",
    "swr_refresh_queue_depth",
    "swr_coalesced_waiters_total",
    "swr_stale_if_error_total",
    "swr_revalidated_total",
    "swr_revalidation_saved_bytes_total",
    "swr_invalidations_total",
    "swr_not_modified_total",
    "swr_purged_total",
    "swr_hit_for_miss_total",
    "swr_fast_hits_total",
    "swr_fast_hit_handoffs_total",
    "swr_cache_entries",
    "swr_cache_bytes",
    "swr_cache_max_bytes",
    "swr_vary_index_bytes",
    "swr_refresh_queue_bytes",
    "swr_upstream_buffered_bytes",
    "swr_cache_evictions_total",
    "swr_upstream_in_flight",
    "swr_upstream_latency_seconds",
    "swr_refresh_duration_seconds",
    "swr_refresh_wait_seconds",
    "swr_refresh_limit",
    "swr_refresh_latency_baseline_seconds",
    "swr_refresh_latency_seconds",
    "swr_served_age_seconds",
    "swr_served_age_ttl_ratio",
    "swr_log_lines_dropped_total",
];

impl Stats {
    pub fn record_request(&self, status: CacheStatus) {
        self.requests.record(status);
    }

    /// An answer from the cache `ratio` of its freshness lifetime old, in
    /// its `route`'s histogram (`None`: outside every route).
    pub fn record_age_ratio(&self, route: Option<&RouteStats>, ratio: f64) {
        route.unwrap_or(&self.unrouted).record_age_ratio(ratio);
    }

    pub fn requests(&self, status: CacheStatus) -> u64 {
        self.requests.get(status)
    }

    /// The counters of the route with this pattern: the same ones for as
    /// long as the process runs, so they survive reloads.
    pub fn route(&self, pattern: &str) -> Arc<RouteStats> {
        self.routes.get_or_create(pattern)
    }

    /// Counts a request refused with this [`ProxyError::detail`].
    pub fn record_refused(&self, detail: &str) {
        if let Some(i) = ProxyError::REFUSALS.iter().position(|d| *d == detail) {
            self.refused[i].inc();
        }
    }

    pub fn refused(&self, detail: &str) -> u64 {
        ProxyError::REFUSALS
            .iter()
            .position(|d| *d == detail)
            .map_or(0, |i| self.refused[i].get())
    }

    pub fn record_bypass(&self, reason: BypassReason) {
        self.bypasses[reason.index()].inc();
    }

    pub fn bypasses(&self, reason: BypassReason) -> u64 {
        self.bypasses[reason.index()].get()
    }

    pub fn record_upstream_request(&self, cause: UpstreamCause) {
        self.upstream_requests[cause as usize].inc();
    }

    pub fn upstream_requests(&self, cause: UpstreamCause) -> u64 {
        self.upstream_requests[cause as usize].get()
    }

    pub fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind.index()].inc();
    }

    pub fn upstream_errors(&self, kind: UpstreamErrorKind) -> u64 {
        self.upstream_errors[kind.index()].get()
    }

    /// Marks a refresh as started; returns a token that marks it ended on drop.
    pub fn refresh_started(&self) -> InFlight<'_> {
        let now = self.refresh_in_flight.inc() + 1;
        self.refresh_in_flight_max.inner().fetch_max(now, Relaxed);
        InFlight(&self.refresh_in_flight)
    }

    /// The Prometheus text (format 0.0.4) of every metric, with `gauges`
    /// read just now. An error is a metric that failed to encode itself
    /// (writing to a `String` cannot fail).
    pub fn render_prometheus(&self, gauges: Gauges) -> Result<String, std::fmt::Error> {
        self.scraped.set(gauges);
        let mut out = String::with_capacity(8192);
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `Content-Type` of [`Stats::render_prometheus`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Decrements a shared counter when dropped.
pub struct Decrement(pub std::sync::Arc<AtomicU64>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Decrements a gauge when dropped.
pub struct InFlight<'a>(&'a CountGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_keys_rank_by_sampled_counts() {
        let top = TopKeys::default();
        for _ in 0..16_000 {
            top.record("hot");
        }
        for _ in 0..1600 {
            top.record("warm");
        }
        let ranked = top.top(5);
        assert_eq!(ranked[0].0, "hot");
        assert_eq!(ranked[1].0, "warm");
        // Random gaps: 1,000 samples expected, about 18 either way.
        assert!((14_400..=17_600).contains(&ranked[0].1), "{ranked:?}");
    }

    #[test]
    fn top_keys_asked_in_turn_are_both_listed() {
        // A fixed 1-in-16 tick listed only one of two keys asked in turn.
        let top = TopKeys::default();
        for _ in 0..3200 {
            top.record("/a");
            top.record("/b");
        }
        let ranked = top.top(5);
        assert_eq!(ranked.len(), 2, "{ranked:?}");
        for (key, answers) in &ranked {
            assert!((1600..=4800).contains(answers), "{key}: {answers}");
        }
    }

    #[test]
    fn top_keys_stay_bounded() {
        let top = TopKeys::default();
        for i in 0..(TOP_KEYS_TRACKED as u64 * sampling::MEAN_GAP * 3) {
            top.record(&format!("k{}", i / sampling::MEAN_GAP));
        }
        let tracked = top.counts.lock().unwrap().len();
        assert!(tracked <= TOP_KEYS_TRACKED, "{tracked}");
    }

    /// Counters live in arrays indexed by the enums: each `ALL` must list
    /// every variant at its own index.
    #[test]
    fn label_arrays_cover_every_variant() {
        for (i, c) in UpstreamCause::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, r) in BypassReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, s) in CacheStatus::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
        for (i, k) in UpstreamErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        assert_eq!(
            UpstreamCause::Revalidate as usize,
            UpstreamCause::ALL.len() - 1
        );
        assert_eq!(BypassReason::Unsettled.index(), BypassReason::ALL.len() - 1);
    }

    fn render(stats: &Stats, gauges: Gauges) -> String {
        stats.render_prometheus(gauges).expect("the metrics encode")
    }

    /// `series` (name, labels and value) is a line of `text`.
    fn assert_series(text: &str, series: &str) {
        assert!(
            text.lines().any(|line| line == series),
            "{series} missing from\n{text}"
        );
    }

    /// The families `/metrics` declares are exactly [`METRIC_NAMES`]:
    /// counters keep their `_total` names, and nothing is added or lost.
    #[test]
    fn the_text_declares_every_metric_name() {
        let text = render(&Stats::default(), Gauges::default());
        let declared: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split(' ').next())
            .collect();
        let names: std::collections::BTreeSet<&str> = METRIC_NAMES.iter().copied().collect();
        assert_eq!(declared, names);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            }
            if line.starts_with("# HELP ") {
                assert!(line.ends_with('.') && !line.ends_with(".."), "{line}");
            }
        }
    }

    #[test]
    fn recorded_values_come_out_in_the_text() {
        let stats = Stats::default();
        stats.record_request(CacheStatus::Hit);
        stats.record_request(CacheStatus::Hit);
        stats.fast_hits.add(1);
        stats.refresh_queued.inc();
        stats.record_refused("bad-host");
        stats.record_upstream_error(UpstreamErrorKind::Timeout);
        stats.route("/a\"b").record(CacheStatus::Stale);
        stats.served_age.observe(Duration::from_millis(1500));
        stats.served_age.observe(Duration::from_secs(7200));
        let text = render(
            &stats,
            Gauges {
                entries: 3,
                evictions: 4,
                ..Gauges::default()
            },
        );
        for series in [
            "swr_requests_total{cache=\"HIT\"} 2",
            "swr_requests_total{cache=\"MISS\"} 0",
            "swr_fast_hits_total 1",
            "swr_refresh_events_total{event=\"queued\"} 1",
            "swr_refresh_events_total{event=\"not_storable\"} 0",
            "swr_refused_total{reason=\"bad-host\"} 1",
            "swr_upstream_errors_total{kind=\"timeout\"} 1",
            "swr_route_requests_total{route=\"/a\\\"b\",cache=\"STALE\"} 1",
            "swr_route_requests_total{route=\"/a\\\"b\",cache=\"HIT\"} 0",
            "swr_served_age_seconds_bucket{le=\"1\"} 0",
            "swr_served_age_seconds_bucket{le=\"5\"} 1",
            "swr_served_age_seconds_bucket{le=\"86400\"} 2",
            "swr_served_age_seconds_bucket{le=\"+Inf\"} 2",
            "swr_served_age_seconds_count 2",
            "swr_upstream_latency_seconds_bucket{le=\"0.001\"} 0",
            "swr_cache_entries 3",
            "swr_cache_evictions_total 4",
        ] {
            assert_series(&text, series);
        }
    }

    /// Each refresh counter is the series of its own event: the handles are
    /// taken from `RefreshEvent::ALL` by position, which a reordering would
    /// silently swap.
    #[test]
    fn each_refresh_counter_is_its_own_event() {
        let stats = Stats::default();
        let counters = [
            (&stats.refresh_queued, "queued"),
            (&stats.refresh_dropped, "dropped"),
            (&stats.refresh_succeeded, "succeeded"),
            (&stats.refresh_failed, "failed"),
            (&stats.refresh_not_storable, "not_storable"),
            (&stats.refresh_backoff, "backoff"),
        ];
        for (n, (counter, _)) in (1..).zip(counters) {
            counter.inc_by(n);
        }
        let text = render(&stats, Gauges::default());
        for (n, (_, event)) in (1..).zip(counters) {
            assert_series(
                &text,
                &format!("swr_refresh_events_total{{event=\"{event}\"}} {n}"),
            );
        }
    }

    /// A route's counters outlive a reload: the same pattern finds them.
    #[test]
    fn a_route_keeps_its_counters() {
        let stats = Stats::default();
        let before = stats.route("/rank");
        before.record(CacheStatus::Hit);
        let after = stats.route("/rank");
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(after.requests(CacheStatus::Hit), 1);
        assert!(!Arc::ptr_eq(&before, &stats.route("/other")));
    }
}
