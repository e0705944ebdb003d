//! Background refreshes: queueing one for a stale entry (never waiting,
//! without the client's credentials), running it on a refresh worker, and
//! backing off a key whose refresh failed. The queue and its workers are
//! `crate::refresh`'s; this file says what a job does.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderMap;

use crate::cache::entry::Entry;
use crate::cache::policy::{self, BypassReason};
use crate::error::UpstreamErrorKind;
use crate::metrics::UpstreamCause;
use crate::refresh::{Enqueue, Job};
use crate::upstream::Priority;

use super::fetch::{FetchTarget, Fetched};
use super::{insert_bounded, lock, Proxy};

/// The first backoff after a failed refresh; it doubles per failure...
pub(super) const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// ...up to this.
pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Most bytes the refresh jobs queued or running may hold (their requests'
/// headers): a fixed overhead, documented in README's "Failure behaviour".
pub const REFRESH_QUEUE_BYTES: u64 = 32 << 20;

/// What a stale answer did about refreshing its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefreshDecision {
    Queued,
    Pending,
    Dropped,
    Backoff,
}

impl RefreshDecision {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            RefreshDecision::Queued => "refresh-queued",
            RefreshDecision::Pending => "refresh-pending",
            RefreshDecision::Dropped => "refresh-dropped",
            RefreshDecision::Backoff => "refresh-backoff",
        }
    }
}

/// What a background refresh needs to re-fetch an entry.
pub struct RefreshRequest {
    pub(super) target: FetchTarget,
    /// The stale entry, for its validators.
    pub(super) stale: Entry,
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

#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    pub(super) failures: u32,
    pub(super) until: Instant,
}

impl Proxy {
    /// Queues a background refresh of a stale entry, without waiting, unless
    /// the key's last refresh failed recently (backoff).
    pub(super) fn queue_refresh(
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
    pub(super) fn back_off(&self, hash: u64) {
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
    pub(super) async fn run_refresh(self: Arc<Self>, job: Job<RefreshRequest>) {
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
}
