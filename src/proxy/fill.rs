//! A miss or an expired entry: one coalesced backend fetch per key
//! (`Proxy::fill`), or an uncoalesced one for a key remembered as
//! uncacheable (hit-for-miss), both over one mapping of fetch results
//! ([`failed_over`]). Owns the hit-for-miss marks; the fetch itself is
//! `fetch.rs`'s. In fleet mode a coalesced fill's leader reads the shared
//! level first and fetches under the key's lease (`shared.rs`), and both
//! kinds write what they stored back to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http_body_util::Full;

use crate::cache::entry::Entry;
use crate::cache::policy::{self, BypassReason, RequestFacts};
use crate::cache::store::{self, Fill, FillOutcome};
use crate::cache::vary;
use crate::cache::CacheStatus;
use crate::error::{UpstreamError, UpstreamErrorKind};
use crate::metrics::UpstreamCause;
use crate::upstream::Priority;

use super::fetch::{FetchTarget, Fetched};
use super::lookup::FetchPlan;
use super::respond::Answered;
use super::rules::Peer;
use super::shared::Filled;
use super::{insert_bounded, lock, Proxy};

/// How long a key whose answer could not be stored skips coalescing.
const HIT_FOR_MISS: Duration = Duration::from_secs(60);

/// Coalesced fills a request takes part in before it is fetched alone
/// ([`BypassReason::Unsettled`]).
const FILL_ROUNDS: usize = 3;

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

/// Keys whose answer could not be stored, until when (Varnish's
/// hit-for-miss): their requests go to the backend at once instead of
/// queueing behind one another's fetch. Bounded like every mark table.
#[derive(Debug, Default)]
pub(super) struct HitForMiss(Mutex<HashMap<u64, Uncacheable>>);

/// A key whose answer could not be stored, until when, and for whom.
#[derive(Debug, Clone, Copy)]
struct Uncacheable {
    until: Instant,
    /// Only answers to requests with credentials were private (`Cookie`,
    /// `Authorization`): requests without them still coalesce.
    credentials_only: bool,
}

impl HitForMiss {
    /// Whether a request with `facts` for `hash` skips coalescing at `now`.
    pub(super) fn holds(&self, hash: u64, now: Instant, facts: RequestFacts) -> bool {
        let credentials = facts.has_credentials();
        lock(&self.0)
            .get(&hash)
            .is_some_and(|mark| now < mark.until && (credentials || !mark.credentials_only))
    }

    /// The answer for `hash` could not be stored, for `reason`: later
    /// requests for it go straight to the backend. For an answer that was
    /// private only because of its client's credentials, only requests
    /// with credentials do, or one client could turn coalescing off for
    /// everyone.
    pub(super) fn remember(&self, hash: u64, reason: BypassReason, now: Instant) {
        // Short of memory says nothing of the key.
        if reason == BypassReason::BufferFull {
            return;
        }
        let credentials_only = reason.is_credentials();
        let mark = Uncacheable {
            until: now + HIT_FOR_MISS,
            credentials_only,
        };
        let mut marks = lock(&self.0);
        let kept = marks.get(&hash).filter(|m| !m.credentials_only);
        if kept.is_none() || !credentials_only {
            insert_bounded(&mut marks, hash, mark, |m| now >= m.until);
        }
    }

    /// The answer for `hash` was stored after all.
    pub(super) fn forget(&self, hash: u64) {
        lock(&self.0).remove(&hash);
    }

    /// Drops the marks that have run out.
    pub(super) fn forget_expired(&self, now: Instant) {
        lock(&self.0).retain(|_, mark| now < mark.until);
    }
}

impl Proxy {
    /// A request for a key remembered as uncacheable: fetched for this client
    /// alone, without waiting on anyone; stored after all if it now may be.
    pub(super) async fn fetch_alone(&self, parts: &Parts, plan: FetchPlan) -> Answered {
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
        let fetched = failed_over(fetched, stale.as_ref());
        if let Fetched::Stored(entry) = &fetched {
            self.hit_for_miss.forget(hash);
            self.share(Some(entry), &target.url_text, None);
        }
        self.own_answer(fetched, status, fwd, stale.as_ref(), head, parts)
    }

    /// The answer a client gets from a fetch made for it (its own, or the
    /// fill it led), once [`failed_over`] has mapped the result.
    fn own_answer(
        &self,
        fetched: Fetched,
        status: CacheStatus,
        fwd: &str,
        stale: Option<&Entry>,
        head: bool,
        parts: &Parts,
    ) -> Answered {
        match fetched {
            Fetched::Stored(entry) => self.stored_response(&entry, status, fwd, false, parts),
            Fetched::Pass(passed) => self.passed_response(passed, "bypass", head),
            Fetched::Failed(err) => self.failed(err, stale, status, fwd, parts),
        }
    }

    /// A miss or an expired entry: one backend fetch per key, however many
    /// clients wait for it.
    pub(super) async fn fill(
        self: &Arc<Self>,
        parts: &Parts,
        plan: FetchPlan,
        peer: Peer,
    ) -> Answered {
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
        for _round in 0..FILL_ROUNDS {
            match self.store.begin_fill(fill_hash) {
                Fill::Leader(guard) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let proxy = Arc::clone(self);
                    let fill_target = target.clone();
                    let fallback = stale.clone();
                    // The fetch runs in its own task: a client that goes away
                    // does not cancel the fill the waiters depend on.
                    self.tasks.spawn(async move {
                        let fetched = match proxy.fill_fetch(&fill_target, fallback.as_ref()).await
                        {
                            Filled::Backend(fetched) => fetched,
                            Filled::FromFleet(entry) => {
                                guard.complete(FillOutcome::FromFleet(entry.clone()));
                                let _ = tx.send(Filled::FromFleet(entry));
                                return;
                            }
                        };
                        let outcome = match &fetched {
                            Fetched::Stored(entry) => FillOutcome::Stored(entry.clone()),
                            Fetched::Pass(passed) => {
                                proxy.hit_for_miss.remember(
                                    fill_hash,
                                    passed.reason,
                                    Instant::now(),
                                );
                                FillOutcome::NotShared(passed.reason)
                            }
                            Fetched::Failed(err) => FillOutcome::Failed(err.clone()),
                        };
                        guard.complete(outcome);
                        // The leader's client may have gone away; nothing to do then.
                        let _ = tx.send(Filled::Backend(fetched));
                    });
                    return match rx.await {
                        Ok(Filled::Backend(fetched)) => {
                            self.own_answer(fetched, status, fwd, stale.as_ref(), head, parts)
                        }
                        Ok(Filled::FromFleet(entry)) => {
                            self.shared_response(&entry, &target, false, parts)
                        }
                        Err(_) => continue,
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
                        Some(FillOutcome::FromFleet(entry)) => {
                            if self.serves_variant(&entry, &target) {
                                return self.shared_response(&entry, &target, true, parts);
                            }
                            continue;
                        }
                        Some(FillOutcome::NotShared(reason))
                            if reason.is_credentials() && !target.facts.has_credentials() =>
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
        self.pass::<Full<Bytes>>(parts, None, peer, BypassReason::Unsettled)
            .await
    }

    /// Whether `entry` answers the request `target` describes: the URL's own
    /// entry, or the variant the request's headers select.
    pub(super) fn serves_variant(&self, entry: &Entry, target: &FetchTarget) -> bool {
        let names = self.store.vary_names(target.url_hash);
        vary::answers(
            entry.key_bytes(),
            &target.url_text,
            names.as_deref(),
            &target.client_headers,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_for_miss_marks_by_reason_and_for_whom() {
        let marks = HitForMiss::default();
        let t0 = Instant::now();
        let anonymous = RequestFacts::default();
        let with_cookie = RequestFacts {
            cookie: true,
            ..RequestFacts::default()
        };
        // Short of memory says nothing of the key.
        marks.remember(1, BypassReason::BufferFull, t0);
        assert!(!marks.holds(1, t0, with_cookie));
        // Private to one client's credentials: only credentialed requests skip coalescing.
        marks.remember(2, BypassReason::Cookie, t0);
        assert!(marks.holds(2, t0, with_cookie));
        assert!(!marks.holds(2, t0, anonymous));
        // Not storable for anyone: everyone skips it, until it runs out.
        marks.remember(3, BypassReason::NoStore, t0);
        assert!(marks.holds(3, t0, anonymous));
        assert!(!marks.holds(3, t0 + HIT_FOR_MISS, anonymous));
        // A credentials-only mark does not weaken one for everyone.
        marks.remember(3, BypassReason::Authorization, t0);
        assert!(marks.holds(3, t0, anonymous));
        marks.forget(3);
        assert!(!marks.holds(3, t0, anonymous));
        marks.forget_expired(t0 + HIT_FOR_MISS);
        assert!(!marks.holds(2, t0, with_cookie));
    }
}
