//! A miss or an expired entry: one coalesced backend fetch per key
//! (`Proxy::fill`), or an uncoalesced one for a key remembered as
//! uncacheable (hit-for-miss), both over one mapping of fetch results
//! ([`failed_over`]). Owns the hit-for-miss marks; the fetch itself is
//! `fetch.rs`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::Response;
use http_body_util::Full;

use crate::body::ProxyBody;
use crate::cache::entry::Entry;
use crate::cache::policy::{self, BypassReason, RequestFacts};
use crate::cache::store::{self, Fill, FillOutcome};
use crate::cache::vary::VariantKey;
use crate::error::{UpstreamError, UpstreamErrorKind};
use crate::metrics::UpstreamCause;
use crate::upstream::{BoxError, Priority};

use super::fetch::{FetchTarget, Fetched, Passed};
use super::lookup::{BackendWork, FetchPlan};
use super::rules::Peer;
use super::{insert_bounded, lock, Proxy};

/// How long a key whose answer could not be stored skips coalescing.
pub(super) const HIT_FOR_MISS: Duration = Duration::from_secs(60);

/// What the leader of a fill answers its own client with.
pub(super) enum LeaderAnswer {
    Stored(Entry),
    Pass(Passed),
    Failed(UpstreamError),
}

/// A fetch's result as a client's answer sees it: a backend 5xx is a
/// failure (stale-if-error) when the stale entry may stand in for it, and
/// a response to pass on otherwise. One mapping for the coalesced fill and
/// the uncoalesced fetch.
pub(super) fn failed_over(fetched: Fetched, stale: Option<&Entry>) -> Fetched {
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

/// A key whose answer could not be stored, until when, and for whom.
#[derive(Debug, Clone, Copy)]
pub(super) struct Uncacheable {
    pub(super) until: Instant,
    /// Only answers to requests with credentials were private (`Cookie`,
    /// `Authorization`): requests without them still coalesce.
    pub(super) credentials_only: bool,
}

impl Proxy {
    /// Answers a request the cache could not: passes it through, or fetches
    /// (coalesced) what the cache needs.
    pub(super) async fn from_backend<B>(
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
                if plan.alone {
                    self.fetch_alone(&parts, *plan).await
                } else {
                    self.fill(&parts, *plan, peer).await
                }
            }
        }
    }

    pub(super) fn remembered_uncacheable(
        &self,
        hash: u64,
        now: Instant,
        facts: RequestFacts,
    ) -> bool {
        let credentials = facts.authorization || facts.cookie;
        lock(&self.uncacheable)
            .get(&hash)
            .is_some_and(|mark| now < mark.until && (credentials || !mark.credentials_only))
    }

    /// A request for a key remembered as uncacheable: fetched for this client
    /// alone, without waiting on anyone; stored after all if it now may be.
    pub(super) async fn fetch_alone(&self, parts: &Parts, plan: FetchPlan) -> Response<ProxyBody> {
        let status = plan.cache_status();
        let FetchPlan {
            target,
            fill_hash: hash,
            stale,
            fwd,
            head,
            ..
        } = plan;
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

    /// A miss or an expired entry: one backend fetch per key, however many
    /// clients wait for it.
    pub(super) async fn fill(
        self: &Arc<Self>,
        parts: &Parts,
        plan: FetchPlan,
        peer: Peer,
    ) -> Response<ProxyBody> {
        let status = plan.cache_status();
        let FetchPlan {
            target,
            fill_hash,
            stale,
            fwd,
            head,
            ..
        } = plan;
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
                    self.stats.coalesced_waiters.inc();
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
    pub(super) fn serves_variant(&self, entry: &Entry, target: &FetchTarget) -> bool {
        let key = entry.key_bytes();
        if key == target.url_text.as_bytes() {
            return true;
        }
        match self.store.vary_names(target.url_hash) {
            Some(names) => {
                let variant = VariantKey::new(&target.url_text, &names, &target.client_headers);
                key == variant.as_str().as_bytes()
            }
            None => false,
        }
    }
}
