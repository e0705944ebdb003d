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
use std::time::{Duration, Instant, SystemTime};

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
        if delivery.attempts > self.config.start.refresh_max_attempts {
            fleet.dead_letter(&delivery).await;
            return Sample::NotSent;
        }
        let target = self.job_target(job);
        let stale = self.shared_entry(&fleet, &job.key).await;
        if let Some(shared) = &stale {
            if done_since(shared, job, &delivery, Instant::now(), SystemTime::now()) {
                // Refreshed since the entry the job was queued for: an
                // instance's stale answer given before that refresh's event
                // reached it queued this job.
                fleet.count_worker("adopted");
                fleet.ack(&delivery.id, Some(job)).await;
                return Sample::NotSent;
            }
        }
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

/// Stored entries closer than this are taken for one version: the wall
/// time of an entry goes through two clocks' conversions (and whole
/// milliseconds) between the instance that queues its job and the worker.
const SAME_VERSION: u64 = 50;

/// Whether the shared entry `shared` is a later version than the one
/// `job` was queued for (or, for a job that does not say, stored after it
/// was queued) and still fresh: then the job has nothing left to do. A job
/// queued ahead of time (refresh-ahead, for an entry still fresh) is for
/// the shared entry itself, and is done. `now` and `wall` are the same
/// moment on the two clocks. Instances whose clocks disagree with the
/// worker's by more than the time between two refreshes of a key can make
/// a job look done early; the key's next stale answer queues another.
fn done_since(
    shared: &Entry,
    job: &RefreshJob,
    delivery: &Delivery,
    now: Instant,
    wall: SystemTime,
) -> bool {
    let Some(version) = job.stored_ms.or_else(|| delivery.queued_ms()) else {
        return false;
    };
    let Some(stored) = super::shared::wall_ms(shared.stored_at(), now, wall) else {
        return false;
    };
    stored > version.saturating_add(SAME_VERSION) && shared.fresh_until() > now
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use crate::cache::policy::Lifetimes;

    fn ms(wall: SystemTime) -> u64 {
        wall.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn delivery_at(wall: SystemTime) -> Delivery {
        Delivery {
            id: format!("{}-0", ms(wall)),
            job: None,
            attempts: 1,
        }
    }

    fn job_for(stored_ms: Option<u64>) -> RefreshJob {
        RefreshJob {
            key: "h/k".into(),
            url: "h/k".into(),
            path_and_query: "/k".into(),
            client_headers: HeaderMap::new(),
            upstream_headers: HeaderMap::new(),
            keyed_cookies: false,
            keyed_authorization: false,
            keyed_cookie_header: false,
            stored_ms,
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
        Entry::new(
            "h/k",
            StatusCode::OK,
            &HeaderMap::new(),
            &[Bytes::from_static(b"x")],
            at,
            lifetimes,
        )
    }

    #[test]
    fn a_job_is_done_only_by_a_later_fresh_version_than_its_own() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let second = Duration::from_secs(1);
        let fresh = 60 * second;
        // Queued now, for the version stored 3 s ago.
        let delivery = delivery_at(wall);
        let job = job_for(Some(ms(wall - 3 * second)));
        let later = entry_stored(now - second, fresh);
        assert!(
            done_since(&later, &job, &delivery, now, wall),
            "refreshed since"
        );
        let same = entry_stored(now - 3 * second, fresh);
        assert!(
            !done_since(&same, &job, &delivery, now, wall),
            "its own version (refresh-ahead: still fresh) is refreshed"
        );
        let stale_again = entry_stored(now - second, second / 2);
        assert!(!done_since(&stale_again, &job, &delivery, now, wall));
        // Without the version: counted from when it was queued (2 s ago).
        let old_job = job_for(None);
        let queued_before = delivery_at(wall - 2 * second);
        assert!(done_since(&later, &old_job, &queued_before, now, wall));
        assert!(!done_since(&same, &old_job, &queued_before, now, wall));
        let unreadable = Delivery {
            id: "not-an-id".into(),
            job: None,
            attempts: 1,
        };
        assert!(!done_since(&later, &old_job, &unreadable, now, wall));
    }
}
