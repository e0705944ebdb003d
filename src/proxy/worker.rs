//! `swr-proxy worker`: refreshes entries from the fleet's refresh stream
//! (see [`crate::fleet::stream`]) with the proxy's own fetch: the same
//! request shaping, conditional requests against the shared entry, the
//! same storability rules and routes, the adaptive refresh limit
//! (`--refresh-concurrency` is its ceiling). What it stores is written to
//! the shared level, where the instances read it (the write's event
//! replaces their copies).
//!
//! A job is acknowledged once its entry is written, or once nothing is
//! left to do (another instance refreshed the key, or holds its lease; the
//! answer may not be stored). A job whose fetch failed is not
//! acknowledged: another delivery retries it after the visibility timeout
//! (that timeout is the key's backoff), and the last allowed attempt moves
//! it to the dead letters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cache::entry::Entry;
use crate::cache::policy;
use crate::error::UpstreamErrorKind;
use crate::fleet::codec::Shared;
use crate::fleet::events::Scope;
use crate::fleet::stream::{Delivery, RefreshJob};
use crate::fleet::{Claim, Fleet};
use crate::metrics::UpstreamCause;
use crate::refresh::limit::{Permit, Sample};
use crate::upstream::Priority;

use super::fetch::{facts_of, FetchTarget, Fetched};
use super::shared::RefreshLease;
use super::Proxy;

/// The longest one read of the stream blocks.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// After a failed read (Redis down), the next one waits this long.
const READ_RETRY: Duration = Duration::from_millis(500);
/// Jobs taken over per look at the idle ones.
const RECLAIM_BATCH: usize = 64;

impl Proxy {
    /// Takes refresh jobs from the stream until `cancel`, each run in a
    /// slot of the adaptive refresh limit.
    pub async fn run_worker(self: Arc<Self>, cancel: CancellationToken) -> Result<(), String> {
        let fleet = self
            .fleet
            .clone()
            .ok_or("a worker needs --redis, the fleet's Redis")?;
        let consumer = fleet.owner().to_string();
        while !fleet.ensure_group().await {
            tracing::warn!("cannot create the refresh stream's consumer group; retrying");
            tokio::select! {
                () = tokio::time::sleep(READ_RETRY) => {}
                () = cancel.cancelled() => return Ok(()),
            }
        }
        // Idle jobs are looked for four times per visibility timeout.
        let reclaim_every = (self.config.start.refresh_visibility_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut next_reclaim = Instant::now();
        let mut reader = None;
        tracing::info!(consumer, "worker taking refresh jobs");
        loop {
            if Instant::now() >= next_reclaim {
                for delivery in fleet.reclaim(&consumer, RECLAIM_BATCH).await {
                    let permit = tokio::select! {
                        permit = self.refresh_gate.admit() => permit,
                        () = cancel.cancelled() => return Ok(()),
                    };
                    self.spawn_job(delivery, permit);
                }
                fleet.observe_stream().await;
                next_reclaim = Instant::now() + reclaim_every;
            }
            let permit = tokio::select! {
                permit = self.refresh_gate.admit() => permit,
                () = cancel.cancelled() => return Ok(()),
            };
            let conn = match &mut reader {
                Some(conn) => conn,
                None => match fleet.reader().await {
                    Ok(conn) => reader.insert(conn),
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot connect to read the refresh stream");
                        permit.finish(Sample::NotSent);
                        tokio::select! {
                            () = tokio::time::sleep(READ_RETRY) => continue,
                            () = cancel.cancelled() => return Ok(()),
                        }
                    }
                },
            };
            let block = READ_BLOCK.min(reclaim_every);
            let read = tokio::select! {
                read = fleet.read_jobs(conn, &consumer, 1, block) => read,
                () = cancel.cancelled() => return Ok(()),
            };
            match read {
                Ok(mut deliveries) => match deliveries.pop() {
                    Some(delivery) => self.spawn_job(delivery, permit),
                    None => permit.finish(Sample::NotSent),
                },
                Err(err) => {
                    tracing::debug!(error = %err, "reading the refresh stream failed");
                    permit.finish(Sample::NotSent);
                    reader = None;
                    tokio::select! {
                        () = tokio::time::sleep(READ_RETRY) => {}
                        () = cancel.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }

    fn spawn_job(self: &Arc<Self>, delivery: Delivery, permit: Permit) {
        let proxy = Arc::clone(self);
        self.tasks.spawn(async move {
            let sample = proxy.run_job(delivery).await;
            permit.finish(sample);
        });
    }

    /// One job: refreshed and written to the shared level, left to whoever
    /// holds its lease, or failed (retried, or dead-lettered at the last
    /// attempt).
    async fn run_job(&self, delivery: Delivery) -> Sample {
        let Some(fleet) = self.fleet.clone() else {
            return Sample::NotSent;
        };
        let Some(job) = &delivery.job else {
            fleet.count_worker("invalid");
            tracing::warn!(id = %delivery.id, "a refresh job this version did not write; dropped");
            fleet.ack(&delivery.id, None).await;
            return Sample::NotSent;
        };
        let stale = self.shared_entry(&fleet, &job.key).await;
        if nothing_left_to_do(job, stale.as_ref(), Instant::now()) {
            // Another refresh made the key fresh after this job was queued:
            // an instance answered stale before that refresh's event reached
            // it. The event goes out again, for an instance that missed it.
            fleet.count_worker("already-fresh");
            fleet
                .publish(&crate::fleet::Event::Replaced(job.key.clone()))
                .await;
            fleet.ack(&delivery.id, Some(job)).await;
            return Sample::NotSent;
        }
        if delivery.attempts > self.config.start.refresh_max_attempts {
            fleet.dead_letter(&delivery).await;
            return Sample::NotSent;
        }
        let target = self.job_target(job);
        let lease = match &stale {
            Some(stale) => {
                self.refresh_lease(stale, &target.url_text, target.url_hash)
                    .await
            }
            None => match fleet.claim(&job.key, true).await {
                Claim::Won | Claim::Value { won: true, .. } => RefreshLease::Held(job.key.clone()),
                Claim::Held | Claim::Value { won: false, .. } => RefreshLease::Elsewhere,
                Claim::Unavailable => RefreshLease::Local,
            },
        };
        let lease = match lease {
            RefreshLease::Adopted => {
                fleet.count_worker("adopted");
                fleet.ack(&delivery.id, Some(job)).await;
                return Sample::NotSent;
            }
            RefreshLease::Elsewhere => {
                // Another instance or worker holds the key's lease (or held
                // it and died): not acknowledged, so a later delivery finds
                // its entry, or takes the lease once it runs out.
                fleet.count_worker("leased-elsewhere");
                return Sample::NotSent;
            }
            RefreshLease::Held(key) => Some(key),
            RefreshLease::Local => None,
        };
        let started = Instant::now();
        self.stats.record_upstream_request(UpstreamCause::Refresh);
        let fetched = self
            .fetch(&target, stale.as_ref(), Priority::Background)
            .await;
        let took = started.elapsed();
        let (sample, done) = match &fetched {
            Fetched::Stored(entry) => {
                let names = super::shared::varies_on(entry);
                fleet.write(entry, &job.url, names.as_deref()).await;
                fleet.count_worker("refreshed");
                let sample = if policy::status_is_error(entry.status()) {
                    Sample::Failed
                } else {
                    Sample::Answered(took)
                };
                (sample, true)
            }
            Fetched::Pass(passed) if policy::status_is_error(passed.status) => {
                (Sample::Failed, false)
            }
            Fetched::Pass(_) => {
                // The backend says the answer may no longer be stored: the
                // fleet's copies go.
                fleet.count_worker("not-storable");
                fleet.purge_url(&job.key, false).await;
                fleet
                    .publish(&crate::fleet::Event::Purged {
                        scope: Scope::Key(job.key.clone()),
                        soft: false,
                    })
                    .await;
                (Sample::Answered(took), true)
            }
            Fetched::Failed(err) if err.kind == UpstreamErrorKind::Busy => (Sample::NotSent, false),
            Fetched::Failed(_) => (Sample::Failed, false),
        };
        if let Some(key) = lease {
            fleet.release(&key).await;
        }
        if done {
            fleet.ack(&delivery.id, Some(job)).await;
        } else {
            fleet.count_worker("failed");
            tracing::debug!(key = %job.key, attempts = delivery.attempts, "refresh job failed");
            if delivery.attempts >= self.config.start.refresh_max_attempts {
                fleet.dead_letter(&delivery).await;
            }
        }
        sample
    }

    /// The shared entry under `key`, if Redis holds one this version wrote.
    async fn shared_entry(&self, fleet: &Fleet, key: &str) -> Option<Entry> {
        let bytes = fleet.read(key).await?;
        match fleet.decode(&bytes, key, Instant::now())? {
            Shared::Entry(entry) => Some(entry),
            Shared::Vary(_) => None,
        }
    }

    /// The fetch a job describes, by this worker's routes.
    fn job_target(&self, job: &RefreshJob) -> FetchTarget {
        let rules = self.rules.load();
        let path = job
            .path_and_query
            .split_once('?')
            .map_or(job.path_and_query.as_str(), |(path, _)| path);
        let defaults = rules
            .route_for(path)
            .map_or(&rules.defaults, |route| &route.defaults);
        FetchTarget {
            url_text: job.url.as_str().into(),
            url_hash: self.keys.hash_text(&job.url),
            path_and_query: job.path_and_query.as_str().into(),
            facts: facts_of(&job.client_headers, job.keyed_cookies),
            client_headers: job.client_headers.clone(),
            upstream_headers: job.upstream_headers.clone(),
            keyed_cookies: job.keyed_cookies,
            keyed_authorization: job.keyed_authorization,
            keyed_cookie_header: job.keyed_cookie_header,
            // A background refresh carries no client's directives.
            directives: None,
            defaults: Arc::clone(defaults),
        }
    }
}

/// Whether `job` has nothing left to do: it was queued for a stale entry
/// (not ahead of time), and the shared level holds the key fresh at `now`.
/// Clocks that disagree by some seconds can make an instance see an entry
/// stale that is still fresh here: its job then waits for the entry to
/// turn stale here too, for as long as the clocks disagree.
fn nothing_left_to_do(job: &RefreshJob, shared: Option<&Entry>, now: Instant) -> bool {
    job.stale && shared.is_some_and(|entry| now < entry.fresh_until())
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use crate::cache::policy::Lifetimes;

    fn job(stale: bool) -> RefreshJob {
        RefreshJob {
            key: "h/k".into(),
            url: "h/k".into(),
            path_and_query: "/k".into(),
            client_headers: HeaderMap::new(),
            upstream_headers: HeaderMap::new(),
            keyed_cookies: false,
            keyed_authorization: false,
            keyed_cookie_header: false,
            stale,
        }
    }

    fn entry_stored(at: Instant, fresh: Duration) -> Entry {
        let lifetimes = Lifetimes {
            fresh,
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            initial_age: Duration::ZERO,
            keep_for_revalidation: Duration::ZERO,
        };
        let body = [Bytes::from_static(b"x")];
        Entry::new(
            "h/k",
            StatusCode::OK,
            &HeaderMap::new(),
            &body,
            at,
            lifetimes,
        )
    }

    #[test]
    fn only_a_stale_entrys_job_meeting_a_fresh_shared_entry_is_left_undone() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let fresh = entry_stored(now - second, 60 * second);
        let stale = entry_stored(now - 2 * second, second);
        assert!(nothing_left_to_do(&job(true), Some(&fresh), now));
        assert!(
            !nothing_left_to_do(&job(false), Some(&fresh), now),
            "a refresh-ahead is for a fresh entry"
        );
        assert!(!nothing_left_to_do(&job(true), Some(&stale), now));
        assert!(!nothing_left_to_do(&job(true), None, now));
    }
}
