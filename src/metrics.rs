//! Counters of what the proxy did, in one place, and their Prometheus text.
//! Every bypass, drop and failure is counted here under the same name its log
//! line uses.
//!
//! Plain atomics rendered by hand rather than the `metrics` crate: the hit
//! path records with one relaxed increment on a field it already knows, with
//! no registry lookup, and the exposition format is a few lines of text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::cache::policy::BypassReason;
use crate::cache::CacheStatus;
use crate::error::{ProxyError, UpstreamErrorKind};

/// Why the proxy contacted the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A counter recorded on every hit, striped over cache-line-padded cells
/// picked per thread: two cores answering hits never write the same line.
#[derive(Debug, Default)]
pub struct Striped([Padded; STRIPES]);

const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    pub fn add(&self, n: u64) {
        self.0[stripe()].0.fetch_add(n, Relaxed);
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

/// A histogram with fixed bucket bounds (seconds), Prometheus-style.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Counts per bucket (not cumulative); the last is `+Inf`.
    buckets: Box<[Striped]>,
    sum_micros: Striped,
}

/// Latency buckets: 1 ms to 30 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Served-age buckets: 1 s to 1 day.
pub const AGE_BOUNDS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 86400.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| Striped::default()).collect(),
            sum_micros: Striped::default(),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.add(1);
        }
        self.sum_micros
            .add(u64::try_from(value.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Striped::get).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.get();
            match self.bounds.get(i) {
                Some(bound) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_micros.get() as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", self.count());
    }
}

/// The proxy's counters. Relaxed atomics: each is read on its own.
#[derive(Debug)]
pub struct Stats {
    requests: [Striped; CacheStatus::ALL.len()],
    bypasses: [AtomicU64; BypassReason::ALL.len()],
    /// Requests refused before the cache looked at them, by
    /// [`ProxyError::REFUSALS`] detail.
    refused: [AtomicU64; ProxyError::REFUSALS.len()],
    upstream_requests: [AtomicU64; UpstreamCause::ALL.len()],
    upstream_errors: [AtomicU64; UpstreamErrorKind::ALL.len()],
    pub refresh_queued: AtomicU64,
    pub refresh_dropped: AtomicU64,
    pub refresh_succeeded: AtomicU64,
    pub refresh_failed: AtomicU64,
    /// Refreshes whose backend answer may not be stored: the entry is removed.
    pub refresh_not_storable: AtomicU64,
    /// Refreshes running now (a gauge).
    pub refresh_in_flight: AtomicU64,
    /// Most refreshes ever running at once.
    pub refresh_in_flight_max: AtomicU64,
    /// Requests that waited on another request's fill instead of fetching.
    pub coalesced_waiters: AtomicU64,
    /// Answers served from a stale entry because the backend failed.
    pub stale_if_error_served: AtomicU64,
    /// Entries renewed by a 304 from the backend.
    pub revalidated: AtomicU64,
    /// Body bytes the backend did not have to send thanks to a 304.
    pub revalidation_bytes_saved: AtomicU64,
    /// Entries removed after a successful POST/PUT/DELETE/PATCH.
    pub invalidations: AtomicU64,
    /// 304 answers the cache gave to clients' conditional requests.
    pub not_modified_served: AtomicU64,
    /// Refreshes not queued because the key's last refresh failed recently.
    pub refresh_backoff: AtomicU64,
    /// Entries removed or marked stale by the admin API.
    pub purged: AtomicU64,
    /// Requests for keys remembered as uncacheable, sent without coalescing.
    pub hit_for_miss: AtomicU64,
    /// Hits answered without hyper (see [`crate::fast_hits`]).
    pub fast_hits: Striped,
    /// Connections the fast hit path handed to hyper.
    pub fast_handoffs: AtomicU64,
    /// Time from sending a request upstream to its response head.
    pub upstream_latency: Histogram,
    /// How long background refreshes took.
    pub refresh_duration: Histogram,
    /// The age of answers served from the cache.
    pub served_age: Histogram,
    /// The most requested keys (sampled).
    pub top_keys: TopKeys,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: Default::default(),
            bypasses: Default::default(),
            refused: Default::default(),
            upstream_requests: Default::default(),
            upstream_errors: Default::default(),
            refresh_queued: AtomicU64::new(0),
            refresh_dropped: AtomicU64::new(0),
            refresh_succeeded: AtomicU64::new(0),
            refresh_failed: AtomicU64::new(0),
            refresh_not_storable: AtomicU64::new(0),
            refresh_in_flight: AtomicU64::new(0),
            refresh_in_flight_max: AtomicU64::new(0),
            coalesced_waiters: AtomicU64::new(0),
            stale_if_error_served: AtomicU64::new(0),
            revalidated: AtomicU64::new(0),
            revalidation_bytes_saved: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            not_modified_served: AtomicU64::new(0),
            refresh_backoff: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            hit_for_miss: AtomicU64::new(0),
            fast_hits: Striped::default(),
            fast_handoffs: AtomicU64::new(0),
            upstream_latency: Histogram::new(LATENCY_BOUNDS),
            refresh_duration: Histogram::new(LATENCY_BOUNDS),
            served_age: Histogram::new(AGE_BOUNDS),
            top_keys: TopKeys::default(),
        }
    }
}

/// Answers by cache status for one route.
#[derive(Debug)]
pub struct RouteStats {
    pub pattern: String,
    requests: [Striped; CacheStatus::ALL.len()],
}

impl RouteStats {
    pub fn new(pattern: &str) -> RouteStats {
        RouteStats {
            pattern: pattern.to_string(),
            requests: Default::default(),
        }
    }

    pub fn record(&self, status: CacheStatus) {
        self.requests[status.index()].add(1);
    }

    pub fn requests(&self, status: CacheStatus) -> u64 {
        self.requests[status.index()].get()
    }
}

/// Renders `swr_route_requests_total` for these routes.
pub fn render_routes(out: &mut String, routes: &[std::sync::Arc<RouteStats>]) {
    let _ = writeln!(
        out,
        "# HELP swr_route_requests_total Answers by route and cache status.\n# TYPE swr_route_requests_total counter"
    );
    for route in routes {
        let label = route.pattern.replace('\\', "\\\\").replace('"', "\\\"");
        for status in CacheStatus::ALL {
            let _ = writeln!(
                out,
                "swr_route_requests_total{{route=\"{label}\",cache=\"{}\"}} {}",
                status.as_str(),
                route.requests(status)
            );
        }
    }
}

/// The most requested keys, estimated by sampling one answer from the cache
/// in `TOP_KEYS_SAMPLE` per thread: the hit path pays a thread-local
/// increment, and a short lock one time in sixteen.
#[derive(Debug, Default)]
pub struct TopKeys {
    /// A std `Mutex`: held for one map update per sample.
    counts: std::sync::Mutex<std::collections::HashMap<Box<str>, u64>>,
}

const TOP_KEYS_SAMPLE: u64 = 16;
/// Keys tracked at most; past this the less requested half is dropped.
const TOP_KEYS_TRACKED: usize = 4096;
/// Bytes of a key's text kept (a variant's key can hold 32 KiB of request
/// headers): the table stays under about 1.5 MiB whatever clients send.
const TOP_KEY_BYTES: usize = 256;

impl TopKeys {
    pub fn record(&self, key: &str) {
        thread_local! {
            static TICK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        let sampled = TICK.with(|tick| {
            let n = tick.get().wrapping_add(1);
            tick.set(n);
            n % TOP_KEYS_SAMPLE == 0
        });
        if !sampled {
            return;
        }
        let mut end = key.len().min(TOP_KEY_BYTES);
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        let key = &key[..end];
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(key) {
            Some(count) => *count += TOP_KEYS_SAMPLE,
            None => {
                counts.insert(key.into(), TOP_KEYS_SAMPLE);
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
}

/// Every metric name the proxy exports (histograms by their base name).
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
    "swr_served_age_seconds",
    "swr_log_lines_dropped_total",
];

impl Stats {
    pub fn record_request(&self, status: CacheStatus) {
        self.requests[status.index()].add(1);
    }

    pub fn requests(&self, status: CacheStatus) -> u64 {
        self.requests[status.index()].get()
    }

    /// Counts a request refused with this [`ProxyError::detail`].
    pub fn record_refused(&self, detail: &str) {
        if let Some(i) = ProxyError::REFUSALS.iter().position(|d| *d == detail) {
            self.refused[i].fetch_add(1, Relaxed);
        }
    }

    pub fn refused(&self, detail: &str) -> u64 {
        ProxyError::REFUSALS
            .iter()
            .position(|d| *d == detail)
            .map_or(0, |i| self.refused[i].load(Relaxed))
    }

    pub fn record_bypass(&self, reason: BypassReason) {
        self.bypasses[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn bypasses(&self, reason: BypassReason) -> u64 {
        self.bypasses[reason.index()].load(Relaxed)
    }

    pub fn record_upstream_request(&self, cause: UpstreamCause) {
        self.upstream_requests[cause as usize].fetch_add(1, Relaxed);
    }

    pub fn upstream_requests(&self, cause: UpstreamCause) -> u64 {
        self.upstream_requests[cause as usize].load(Relaxed)
    }

    pub fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn upstream_errors(&self, kind: UpstreamErrorKind) -> u64 {
        self.upstream_errors[kind.index()].load(Relaxed)
    }

    /// Marks a refresh as started; returns a token that marks it ended on drop.
    pub fn refresh_started(&self) -> InFlight<'_> {
        let now = self.refresh_in_flight.fetch_add(1, Relaxed) + 1;
        self.refresh_in_flight_max.fetch_max(now, Relaxed);
        InFlight(&self.refresh_in_flight)
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

impl Stats {
    /// The Prometheus text exposition of every metric.
    pub fn render_prometheus(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(8192);
        labelled_counter(
            &mut out,
            "swr_requests_total",
            "Answers by cache status.",
            "cache",
            CacheStatus::ALL.map(|s| (s.as_str(), self.requests(s))),
        );
        labelled_counter(
            &mut out,
            "swr_bypass_total",
            "Answers passed through and not stored, by reason.",
            "reason",
            BypassReason::ALL.map(|r| (r.as_str(), self.bypasses(r))),
        );
        labelled_counter(
            &mut out,
            "swr_refused_total",
            "Requests refused before the cache looked at them (400, 414, 431), by reason.",
            "reason",
            ProxyError::REFUSALS.map(|d| (d, self.refused(d))),
        );
        labelled_counter(
            &mut out,
            "swr_upstream_requests_total",
            "Requests sent to the backend, by cause.",
            "cause",
            UpstreamCause::ALL.map(|c| (c.as_str(), self.upstream_requests(c))),
        );
        labelled_counter(
            &mut out,
            "swr_upstream_errors_total",
            "Backend failures, by kind.",
            "kind",
            UpstreamErrorKind::ALL.map(|k| (k.as_str(), self.upstream_errors(k))),
        );
        labelled_counter(
            &mut out,
            "swr_refresh_events_total",
            "Background refreshes, by what happened.",
            "event",
            [
                ("queued", &self.refresh_queued),
                ("dropped", &self.refresh_dropped),
                ("succeeded", &self.refresh_succeeded),
                ("failed", &self.refresh_failed),
                ("not_storable", &self.refresh_not_storable),
                ("backoff", &self.refresh_backoff),
            ]
            .map(|(event, counter)| (event, counter.load(Relaxed))),
        );
        let simple: [(&str, &str, &str, u64); 22] = [
            (
                "swr_refresh_in_flight",
                "gauge",
                "Background refreshes running now.",
                self.refresh_in_flight.load(Relaxed),
            ),
            (
                "swr_refresh_queue_depth",
                "gauge",
                "Refreshes waiting for a worker.",
                gauges.refresh_queue_depth,
            ),
            (
                "swr_coalesced_waiters_total",
                "counter",
                "Requests that waited on another request's fetch.",
                self.coalesced_waiters.load(Relaxed),
            ),
            (
                "swr_stale_if_error_total",
                "counter",
                "Stale answers served because the backend failed.",
                self.stale_if_error_served.load(Relaxed),
            ),
            (
                "swr_revalidated_total",
                "counter",
                "Entries renewed by a 304 from the backend.",
                self.revalidated.load(Relaxed),
            ),
            (
                "swr_revalidation_saved_bytes_total",
                "counter",
                "Body bytes the backend did not send thanks to a 304.",
                self.revalidation_bytes_saved.load(Relaxed),
            ),
            (
                "swr_invalidations_total",
                "counter",
                "Entries removed after a successful unsafe method.",
                self.invalidations.load(Relaxed),
            ),
            (
                "swr_not_modified_total",
                "counter",
                "304 answers given to clients' conditional requests.",
                self.not_modified_served.load(Relaxed),
            ),
            (
                "swr_purged_total",
                "counter",
                "Entries removed or marked stale by the admin API.",
                self.purged.load(Relaxed),
            ),
            (
                "swr_hit_for_miss_total",
                "counter",
                "Requests for keys remembered as uncacheable.",
                self.hit_for_miss.load(Relaxed),
            ),
            (
                "swr_fast_hits_total",
                "counter",
                "Hits answered without hyper (plain HTTP/1.1 GET); also counted in swr_requests_total.",
                self.fast_hits.get(),
            ),
            (
                "swr_fast_hit_handoffs_total",
                "counter",
                "Connections the fast hit path handed to hyper, at their first request it does not answer.",
                self.fast_handoffs.load(Relaxed),
            ),
            (
                "swr_cache_entries",
                "gauge",
                "Entries stored.",
                gauges.entries,
            ),
            (
                "swr_cache_bytes",
                "gauge",
                "Bytes charged against --max-size.",
                gauges.bytes,
            ),
            (
                "swr_cache_max_bytes",
                "gauge",
                "The --max-size budget.",
                gauges.max_bytes,
            ),
            (
                "swr_cache_evictions_total",
                "counter",
                "Entries evicted to stay within --max-size.",
                gauges.evictions,
            ),
            (
                "swr_upstream_in_flight",
                "gauge",
                "Requests to the backend in flight.",
                gauges.upstream_in_flight,
            ),
            (
                "swr_refresh_in_flight_max",
                "gauge",
                "Most background refreshes ever running at once.",
                self.refresh_in_flight_max.load(Relaxed),
            ),
            (
                "swr_vary_index_bytes",
                "gauge",
                "Bytes the Vary index is charged, within swr_cache_bytes (at most 1/16 of --max-size).",
                gauges.vary_index_bytes,
            ),
            (
                "swr_refresh_queue_bytes",
                "gauge",
                "Bytes held by refresh jobs queued or running (at most 32 MiB).",
                gauges.refresh_queue_bytes,
            ),
            (
                "swr_upstream_buffered_bytes",
                "gauge",
                "Body bytes being read from the backend to store (at most --max-buffered).",
                gauges.upstream_buffered_bytes,
            ),
            (
                "swr_log_lines_dropped_total",
                "counter",
                "Log lines dropped, never waited for, because the log sink fell behind.",
                gauges.log_lines_dropped,
            ),
        ];
        for (name, kind, help, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        self.upstream_latency.render(
            &mut out,
            "swr_upstream_latency_seconds",
            "Time from sending a request to the backend to its response head.",
        );
        self.refresh_duration.render(
            &mut out,
            "swr_refresh_duration_seconds",
            "How long background refreshes took.",
        );
        self.served_age.render(
            &mut out,
            "swr_served_age_seconds",
            "The age of answers served from the cache.",
        );
        out
    }
}

/// One counter family with one label: its HELP and TYPE lines, then a
/// sample per label value.
fn labelled_counter<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: [(&str, u64); N],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

/// Decrements a shared counter when dropped.
pub struct Decrement(pub std::sync::Arc<AtomicU64>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Decrements a gauge when dropped.
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_keys_rank_by_sampled_counts() {
        let top = TopKeys::default();
        for _ in 0..1600 {
            top.record("hot");
        }
        for _ in 0..160 {
            top.record("warm");
        }
        let ranked = top.top(5);
        assert_eq!(ranked[0].0, "hot");
        assert_eq!(ranked[1].0, "warm");
        assert!((1500..=1700).contains(&ranked[0].1), "{ranked:?}");
    }

    #[test]
    fn top_keys_stay_bounded() {
        let top = TopKeys::default();
        for i in 0..(TOP_KEYS_TRACKED as u64 * TOP_KEYS_SAMPLE * 3) {
            top.record(&format!("k{}", i / TOP_KEYS_SAMPLE));
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
}
