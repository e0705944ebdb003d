//! Background refreshes: queueing one for a stale entry (never waiting,
//! without the client's credentials), running it on a refresh worker, and
//! backing off a key whose refresh failed. The queue and its workers are
//! `crate::refresh`'s; this file says what a job does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderMap;

use crate::cache::entry::Entry;
use crate::cache::policy::{self, BypassReason};
use crate::config::RefreshMode;
use crate::error::UpstreamErrorKind;
use crate::metrics::UpstreamCause;
use crate::refresh::limit::Sample;
use crate::refresh::popularity::SAMPLE;
use crate::refresh::{Enqueue, Job};
use crate::upstream::Priority;

use super::fetch::{FetchTarget, Fetched};
use super::shared::RefreshLease;
use super::{insert_bounded, lock, Proxy};

/// The first backoff after a failed refresh; it doubles per failure...
pub(super) const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// ...up to this.
pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Refresh-ahead starts at the earliest with 1/this of an entry's freshness
/// left: the widest of [`AHEAD_SHARE`], an integer so that
/// `in_ahead_window` rules out every hit with more left without float work.
const AHEAD_EARLIEST_PART: u32 = 5;
/// Where refresh-ahead may start, as a share of an entry's freshness before
/// it turns stale: each key's moment is spread between these, by its hash
/// and the process's seed.
pub(super) const AHEAD_SHARE: (f64, f64) = (0.05, 1.0 / AHEAD_EARLIEST_PART as f64);
/// 2^64 over the golden ratio: multiplying by it spreads a hash's bits over
/// the whole word (Fibonacci hashing).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The fixed-point unit of a refresh's overdue factor (the factor of its
/// value per request of popularity): 1 when the entry turns stale, one
/// more per freshness lifetime past that, less before it (refresh-ahead).
const OVERDUE_UNIT: i128 = 256;
/// The overdue factor's bounds: a quarter to 4.
const OVERDUE_BOUNDS: (i128, i128) = (OVERDUE_UNIT / 4, 4 * OVERDUE_UNIT);
/// Added to every key's popularity: a key never seen is worth something,
/// and one sampled request more or less (a step of [`SAMPLE`]) moves a
/// cold key's value by a quarter at most.
const UNSEEN_POPULARITY: u64 = 4 * SAMPLE;

/// Most bytes the refresh jobs queued or running may hold (their requests'
/// headers): a fixed overhead, documented in README's "Failure behaviour".
pub const REFRESH_QUEUE_BYTES: u64 = 32 << 20;

/// What an answer from the cache did about refreshing its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefreshDecision {
    /// Queued by a stale answer.
    Queued,
    /// Queued by a fresh answer: the key is hot and its entry near the end
    /// of its freshness (refresh-ahead).
    Ahead,
    /// Its refresh is running.
    Pending,
    /// Its refresh is queued and waits for a worker (a backlog).
    Backlog,
    /// Not queued: the queue is full (or shutting down); counted.
    Dropped,
    /// Not queued: the key's last refresh failed recently.
    Backoff,
}

impl RefreshDecision {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            RefreshDecision::Queued => "refresh-queued",
            RefreshDecision::Ahead => "refresh-ahead",
            RefreshDecision::Pending => "refresh-pending",
            RefreshDecision::Backlog => "refresh-backlog",
            RefreshDecision::Dropped => "refresh-dropped",
            RefreshDecision::Backoff => "refresh-backoff",
        }
    }
}

/// What a background refresh needs to re-fetch an entry.
pub struct RefreshRequest {
    pub(super) target: FetchTarget,
    /// The entry's key text and when it was stored: the job holds no
    /// reference to the entry itself, which the worker looks up again (for
    /// its validators). An entry evicted, replaced or purged while its job
    /// waits is freed at once and not refreshed: a job held a whole copy
    /// (body included) outside the cache's budget for as long as it waited,
    /// and a purged entry's refresh could renew it on a 304.
    entry_key: Box<str>,
    stored_at: Instant,
}

impl crate::refresh::Weigh for RefreshRequest {
    /// The job's own bytes: its headers, URL and key (it holds no entry).
    fn weight(&self) -> u64 {
        // What a header map spends per field beyond its name and value, and
        // a job beyond its fields and texts (the structs, the queue's
        // place): estimates, generous rather than short. A field's bucket
        // in http 1.x's map is about 104 B: clones of maps of 1, 3 and 6
        // fields took 136, 392 and 704 B, with the index (measured with a
        // counting allocator, 2026-12-05).
        const PER_FIELD: usize = 112;
        const PER_JOB: usize = 256;
        let headers = |map: &HeaderMap| -> usize {
            map.iter()
                .map(|(name, value)| name.as_str().len() + value.len() + PER_FIELD)
                .sum()
        };
        let target = &self.target;
        (PER_JOB
            + headers(&target.client_headers)
            + headers(&target.upstream_headers)
            + target.url_text.len()
            + target.path_and_query.len()
            + self.entry_key.len()) as u64
    }
}

/// Keys whose last refresh failed: their next refresh waits until `until`,
/// twice as long per failure in a row (from [`BACKOFF_BASE`] up to
/// [`BACKOFF_CAP`]). Bounded like every table of marks; instants are passed
/// in, so the rules are tested without a clock.
#[derive(Debug, Default)]
pub(super) struct Backoffs(HashMap<u64, Backoff>);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Instant,
}

impl Backoffs {
    /// Whether a refresh of `hash` waits at `now`.
    pub(super) fn holds(&self, hash: u64, now: Instant) -> bool {
        self.0.get(&hash).is_some_and(|b| now < b.until)
    }

    /// A refresh of `hash` failed at `now`.
    pub(super) fn failed(&mut self, hash: u64, now: Instant) {
        let failures = self.0.get(&hash).map_or(0, |b| b.failures) + 1;
        let delay = BACKOFF_BASE
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(BACKOFF_CAP);
        let mark = Backoff {
            failures,
            until: now + delay,
        };
        insert_bounded(&mut self.0, hash, mark, |b| now >= b.until + BACKOFF_CAP);
    }

    /// No refresh of `hash` before `until` (another instance of the fleet
    /// is refreshing it); its failures so far are kept.
    pub(super) fn hold(&mut self, hash: u64, until: Instant) {
        let failures = self.0.get(&hash).map_or(0, |b| b.failures);
        let mark = Backoff { failures, until };
        insert_bounded(&mut self.0, hash, mark, |b| until >= b.until + BACKOFF_CAP);
    }

    /// A refresh of `hash` succeeded: the next failure starts over.
    pub(super) fn succeeded(&mut self, hash: u64) {
        self.0.remove(&hash);
    }

    /// Forgets keys whose backoff ran out more than [`BACKOFF_CAP`] ago (a
    /// failure after that starts over).
    pub(super) fn forget_expired(&mut self, now: Instant) {
        self.0.retain(|_, b| now < b.until + BACKOFF_CAP);
    }
}

impl Proxy {
    /// Queues a background refresh of `entry` (stale, or fresh and refreshed
    /// ahead), without waiting, unless the key's last refresh failed
    /// recently (backoff).
    pub(super) fn queue_refresh(
        &self,
        hash: u64,
        entry: &Entry,
        target: impl FnOnce() -> FetchTarget,
        now: Instant,
    ) -> RefreshDecision {
        if lock(&self.backoff).holds(hash, now) {
            self.stats.refresh_backoff.inc();
            return RefreshDecision::Backoff;
        }
        self.enqueue_refresh(hash, entry, target, now, None)
    }

    /// [`Proxy::queue_refresh`] past its backoff check; `popularity`: the
    /// key's estimate, when the caller has it already.
    fn enqueue_refresh(
        &self,
        hash: u64,
        entry: &Entry,
        target: impl FnOnce() -> FetchTarget,
        now: Instant,
        popularity: Option<u64>,
    ) -> RefreshDecision {
        let value = || self.refresh_value(hash, entry, now, popularity);
        let result = self
            .refresh
            .try_enqueue_with(hash, value, || RefreshRequest {
                target: target().without_credentials(entry),
                entry_key: entry.key().into(),
                stored_at: entry.stored_at(),
            });
        match result {
            Enqueue::Queued { displaced } => {
                self.stats.refresh_queued.inc();
                if displaced {
                    // The queue's least valuable job made room for this one.
                    self.stats.refresh_dropped.inc();
                    tracing::debug!(
                        for_key = entry.key(),
                        reason = "displaced",
                        "refresh dropped"
                    );
                }
                RefreshDecision::Queued
            }
            Enqueue::Dropped(why) => {
                // A refresh ahead that found no room drops nothing stale:
                // only a stale entry's dropped refresh is counted.
                if now >= entry.fresh_until() {
                    self.stats.refresh_dropped.inc();
                    tracing::debug!(key = entry.key(), reason = why.as_str(), "refresh dropped");
                }
                RefreshDecision::Dropped
            }
            Enqueue::AlreadyClaimed { waiting: true } => RefreshDecision::Backlog,
            Enqueue::AlreadyClaimed { waiting: false } => RefreshDecision::Pending,
        }
    }

    /// What an answer from `entry` does about its refresh: a `stale` one
    /// queues it; a fresh one may queue it ahead, when its key is asked for
    /// at least `ahead_per_minute` times a minute ([`Proxy::refresh_ahead`]).
    #[inline]
    pub(super) fn refresh_on_answer(
        &self,
        hash: u64,
        entry: &Entry,
        stale: bool,
        ahead_per_minute: usize,
        target: impl FnOnce() -> FetchTarget,
        now: Instant,
    ) -> Option<RefreshDecision> {
        if stale {
            Some(self.queue_refresh(hash, entry, target, now))
        } else {
            self.refresh_ahead(hash, entry, ahead_per_minute, target, now)
        }
    }

    /// Refresh-ahead: queues a refresh of a fresh `entry` whose key is asked
    /// for at least `per_minute` times a minute (0: never) once it is in
    /// the last part of its freshness ([`AHEAD_SHARE`]). `Some` only when
    /// this answer queued it; a key backed off after a failed refresh waits.
    pub(super) fn refresh_ahead(
        &self,
        hash: u64,
        entry: &Entry,
        per_minute: usize,
        target: impl FnOnce() -> FetchTarget,
        now: Instant,
    ) -> Option<RefreshDecision> {
        if per_minute == 0 || !self.in_ahead_window(hash, entry, now) {
            return None;
        }
        let popularity = self.popularity.estimate(hash);
        // The backoff is checked here, not counted as `queue_refresh`
        // would count it for every fresh hit of a backed-off key.
        if popularity < per_minute as u64 || lock(&self.backoff).holds(hash, now) {
            return None;
        }
        match self.enqueue_refresh(hash, entry, target, now, Some(popularity)) {
            RefreshDecision::Queued => {
                self.stats.refresh_ahead.inc();
                Some(RefreshDecision::Ahead)
            }
            _ => None,
        }
    }

    /// Whether `entry` is fresh at `now` with at most its key's
    /// refresh-ahead share ([`AHEAD_SHARE`]) left of the time it is fresh
    /// here: from `stored_at` to `fresh_until` (the age it arrived with does
    /// not count, unlike in [`Entry::lifetime`]).
    fn in_ahead_window(&self, hash: u64, entry: &Entry, now: Instant) -> bool {
        let fresh_until = entry.fresh_until();
        let Some(left) = fresh_until.checked_duration_since(now) else {
            return false;
        };
        let fresh_here = fresh_until.saturating_duration_since(entry.stored_at());
        // Most fresh hits have more than the widest share left: ruled out in
        // integers, before the float work below (every fresh hit pays for
        // this check).
        if left.as_nanos() * u128::from(AHEAD_EARLIEST_PART) > fresh_here.as_nanos() {
            return false;
        }
        let spread = unit_interval((hash ^ self.ahead_seed).wrapping_mul(GOLDEN));
        let share = AHEAD_SHARE.0 + (AHEAD_SHARE.1 - AHEAD_SHARE.0) * spread;
        left.as_secs_f64() <= fresh_here.as_secs_f64() * share
    }

    /// What refreshing `entry` at `now` is worth, for the queue's order
    /// (with `--refresh-priority=false`, nothing: first in, first out): the
    /// key's recent requests (plus [`UNSEEN_POPULARITY`]) times how far past
    /// its freshness it is, 1 when it turns stale and one more per freshness
    /// lifetime past that (below 1 when refreshed ahead), within
    /// [`OVERDUE_BOUNDS`]: a stale key asked for more than four times as
    /// often as another is always ahead of it. `popularity`: the key's
    /// estimate, when the caller has it (else it is read here).
    fn refresh_value(
        &self,
        hash: u64,
        entry: &Entry,
        now: Instant,
        popularity: Option<u64>,
    ) -> u64 {
        if !self.config.start.refresh_priority {
            return 0;
        }
        let popularity =
            popularity.unwrap_or_else(|| self.popularity.estimate(hash)) + UNSEEN_POPULARITY;
        let fresh_until = entry.fresh_until();
        let overdue = if now >= fresh_until {
            (now - fresh_until).as_nanos() as i128
        } else {
            -((fresh_until - now).as_nanos() as i128)
        };
        let lifetime = (entry.lifetime().as_nanos() as i128).max(1);
        let factor = (OVERDUE_UNIT + overdue * OVERDUE_UNIT / lifetime)
            .clamp(OVERDUE_BOUNDS.0, OVERDUE_BOUNDS.1);
        popularity.saturating_mul(factor as u64)
    }

    /// A background refresh: re-fetches (or revalidates) and replaces the
    /// entry, or keeps the old one when the backend fails. What the backend
    /// showed of itself is the [`Sample`] for the adaptive limit.
    pub(super) async fn run_refresh(self: Arc<Self>, job: Job<RefreshRequest>) -> Sample {
        let _in_flight = self.stats.refresh_started();
        let started = Instant::now();
        self.stats
            .refresh_wait
            .observe(started.saturating_duration_since(job.queued_at));
        let RefreshRequest {
            target,
            entry_key,
            stored_at,
        } = &job.payload;
        let Some(stale) = self
            .store
            .get_exact(job.hash, entry_key.as_bytes(), started)
            .filter(|entry| entry.stored_at() == *stored_at)
        else {
            // Evicted, replaced (refreshed some other way) or purged while
            // the job waited: nothing to refresh.
            self.stats.refresh_dropped.inc();
            tracing::debug!(key = &**entry_key, reason = "gone", "refresh dropped");
            return Sample::NotSent;
        };
        let stale = &stale;
        if self.config.start.refresh_mode == RefreshMode::Stream
            && self.queue_on_stream(target, stale).await
        {
            // A worker refreshes it; its entry arrives as an event.
            return Sample::NotSent;
        }
        let lease = match self
            .refresh_lease(stale, &target.url_text, target.url_hash)
            .await
        {
            RefreshLease::Adopted => {
                // Another instance refreshed it; its entry is stored here.
                lock(&self.backoff).succeeded(job.hash);
                self.stats.refresh_succeeded.inc();
                return Sample::NotSent;
            }
            RefreshLease::Elsewhere => {
                self.leave_refresh(job.hash);
                return Sample::NotSent;
            }
            RefreshLease::Held(key) => Some(key),
            RefreshLease::Local => None,
        };
        self.stats.record_upstream_request(UpstreamCause::Refresh);
        let fetched = self.fetch(target, Some(stale), Priority::Background).await;
        self.share(fetched.stored(), &target.url_text, lease);
        let took = started.elapsed();
        self.stats.refresh_duration.observe(took);
        let took_ms = took.as_millis() as u64;
        let key = stale.key();
        // Each arm: the key's backoff (a failure of the backend backs it
        // off, a success clears it), then the counter and the log line.
        match fetched {
            Fetched::Stored(entry) => {
                lock(&self.backoff).succeeded(job.hash);
                self.stats.refresh_succeeded.inc();
                tracing::debug!(key, took_ms, "refreshed");
                // A 5xx the backend said may be stored is still a backend
                // in trouble, as far as the limit is concerned.
                if policy::status_is_error(entry.status()) {
                    Sample::Failed
                } else {
                    Sample::Answered(took)
                }
            }
            Fetched::Pass(passed) if policy::status_is_error(passed.status) => {
                lock(&self.backoff).failed(job.hash, Instant::now());
                self.stats.refresh_failed.inc();
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
                Sample::Failed
            }
            Fetched::Pass(passed) if passed.reason == BypassReason::BufferFull => {
                // Memory was short, not the answer storable: keep the entry.
                self.stats.refresh_failed.inc();
                Sample::Answered(took)
            }
            Fetched::Pass(passed) => {
                self.store.remove(job.hash, key);
                self.stats.refresh_not_storable.inc();
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
                Sample::Answered(took)
            }
            Fetched::Failed(err) if err.kind == UpstreamErrorKind::Busy => {
                // No slot to the backend in time: the backend was never
                // asked, so this says nothing of it (no backoff). Dropped,
                // like a refresh that found the queue full; the next stale
                // answer queues another.
                self.stats.refresh_dropped.inc();
                tracing::debug!(key, took_ms, reason = "busy", "refresh dropped");
                Sample::NotSent
            }
            Fetched::Failed(err) => {
                lock(&self.backoff).failed(job.hash, Instant::now());
                self.stats.refresh_failed.inc();
                if let Some(suppressed) = self.failure_line(("refresh failed", err.kind.as_str())) {
                    tracing::warn!(key, took_ms, error = %err, suppressed,
                        "refresh failed; keeping the stale entry");
                }
                Sample::Failed
            }
        }
    }
}

/// `bits` as a number from 0 up to (not including) 1, from its top 53 bits
/// (as many as an `f64` holds exactly).
#[inline]
fn unit_interval(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::{CacheControlMode, Defaults, RequestFacts};
    use crate::refresh::Weigh;
    use http::HeaderValue;

    #[test]
    fn a_jobs_weight_is_not_below_what_its_header_maps_take() {
        // Six fields with short values, as a browser sends: a clone of such
        // a map took 704 B (counting allocator, http 1.x), the values'
        // own bytes aside.
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "example.com"),
            ("accept", "*/*"),
            ("user-agent", "curl/8"),
            ("accept-encoding", "gzip"),
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.1 swr"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let job = RefreshRequest {
            target: FetchTarget {
                url_text: "example.com/a".into(),
                url_hash: 1,
                path_and_query: "/a".into(),
                client_headers: headers.clone(),
                upstream_headers: headers,
                facts: RequestFacts::default(),
                keyed_cookies: false,
                keyed_authorization: false,
                keyed_cookie_header: false,
                defaults: Arc::new(Defaults {
                    ttl: Duration::from_secs(10),
                    stale_while_revalidate: Duration::from_secs(60),
                    stale_if_error: Duration::from_secs(300),
                    mode: CacheControlMode::Honor,
                    targeted: http::HeaderName::from_static("swr-cache-control"),
                    heuristic_percent: None,
                }),
                directives: None,
            },
            entry_key: "example.com/a".into(),
            stored_at: Instant::now(),
        };
        assert!(job.weight() >= 2 * 704, "{}", job.weight());
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap_and_a_success_clears_it() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut backoffs = Backoffs::default();
        assert!(!backoffs.holds(1, t0));
        let mut at = t0;
        for expected in [1, 2, 4, 8, 16, 32, 60, 60] {
            backoffs.failed(1, at);
            assert!(backoffs.holds(1, at + secs(expected) - Duration::from_millis(1)));
            assert!(!backoffs.holds(1, at + secs(expected)), "{expected} s");
            assert!(!backoffs.holds(2, at), "another key is not held");
            at += secs(expected);
        }
        backoffs.succeeded(1);
        assert!(!backoffs.holds(1, at));
        backoffs.failed(1, at);
        assert!(!backoffs.holds(1, at + secs(1)), "started over at 1 s");
        // Forgotten a cap after it ran out: the next failure starts over.
        backoffs.failed(1, at + secs(1));
        backoffs.forget_expired(at + secs(1) + secs(2) + BACKOFF_CAP);
        backoffs.failed(1, at + secs(100));
        assert!(!backoffs.holds(1, at + secs(101)));
    }
}
