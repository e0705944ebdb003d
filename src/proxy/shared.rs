//! Fleet mode on the request flow (see [`crate::fleet`]): a fill reads
//! the shared level before the backend and asks the backend only under
//! the key's lease; a refresh does the same, and leaves a key another
//! instance is refreshing to that instance; what is stored is written
//! back; the other instances' events are applied; purges fan out. Without
//! `--redis` every function here returns at once and the flow is the
//! single instance's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cache::entry::Entry;
use crate::cache::policy::{self, Use};
use crate::cache::vary::{self, VariantKey};
use crate::fleet::codec::Shared;
use crate::fleet::events::{Scope, EVENT_QUEUE};
use crate::fleet::stream::{Queued, RefreshJob};
use crate::fleet::{Claim, Event, Fleet};
use crate::metrics::UpstreamCause;
use crate::upstream::Priority;

use super::fetch::{FetchTarget, Fetched};
use super::fill::failed_over;
use super::{lock, Proxy};

/// A miss waiting on another instance's fetch looks again after this,
/// doubling...
const POLL_FIRST: Duration = Duration::from_millis(5);
/// ...up to this.
const POLL_MAX: Duration = Duration::from_millis(50);

/// A key whose refresh another instance holds the lease of is not
/// refreshed here for this long: that instance's answer arrives as an
/// event, or is read from the shared level by the next refresh.
const LEASE_ELSEWHERE_HOLD: Duration = Duration::from_secs(1);

/// Where a fill's answer came from.
pub(super) enum Filled {
    /// The backend: fetched here (under the key's lease in fleet mode),
    /// mapped by [`failed_over`].
    Backend(Fetched),
    /// Another instance's entry, read from the shared level and stored here.
    FromFleet(Entry),
}

/// What the shared level gave a fill.
enum Found {
    /// An entry that can be served (fresh or stale), stored here.
    Usable(Entry),
    /// Nothing that can be served: fetch, under the lease on `lease` when
    /// this instance holds it. `fallback` is the newest unusable entry
    /// known (local or shared), for revalidation and stale-if-error.
    Fetch {
        lease: Option<String>,
        fallback: Option<Entry>,
    },
}

/// What a refresh does in fleet mode.
pub(super) enum RefreshLease {
    /// Another instance already refreshed it: its entry is stored here.
    Adopted,
    /// Another instance holds the lease: leave it to that instance.
    Elsewhere,
    /// Refresh it; the lease on this key text is this instance's.
    Held(String),
    /// No fleet, or Redis did not answer: refresh it here.
    Local,
}

/// A fill waiting on another instance's fetch: it looks again after a
/// pause that doubles, until a lease's life has passed.
struct Waiting {
    pause: Duration,
    deadline: Instant,
}

impl Waiting {
    /// Sleeps before the next look; `false` (counted) once past the
    /// deadline: fetch without the lease then.
    async fn again(&mut self, fleet: &Fleet) -> bool {
        if Instant::now() >= self.deadline {
            fleet.wait_timed_out();
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(POLL_MAX);
        true
    }
}

/// The newer of two optional entries (by store time).
fn newer(a: Option<Entry>, b: Entry) -> Option<Entry> {
    match a {
        Some(a) if a.stored_at() >= b.stored_at() => Some(a),
        _ => Some(b),
    }
}

/// The names an entry's stored `Vary` lists, when it varies.
pub(super) fn varies_on(entry: &Entry) -> Option<Vec<http::HeaderName>> {
    match vary::vary_names(&entry.header_map(0)) {
        vary::Vary::Names(names) if !names.is_empty() => Some(names),
        _ => None,
    }
}

/// The key text of the URL `entry` answers: its own key, or for a variant
/// (an answer with Vary), its key without the one `\n`-led field per Vary
/// name that [`VariantKey`] appended. Not the key up to its first `\n`: a
/// route's key headers and keyed cookies put newlines in the URL's own key.
pub(super) fn url_text_of(entry: &Entry) -> &str {
    let key = entry.key();
    let fields = varies_on(entry).map_or(0, |names| names.len());
    let mut end = key.len();
    for _ in 0..fields {
        match key[..end].rfind('\n') {
            Some(at) => end = at,
            None => return key,
        }
    }
    &key[..end]
}

impl Proxy {
    /// The fetch a fill leads: from the shared level when another instance
    /// stored the key, else from the backend (mapped by [`failed_over`]),
    /// then written back.
    pub(super) async fn fill_fetch(
        self: &Arc<Self>,
        target: &FetchTarget,
        stale: Option<&Entry>,
    ) -> Filled {
        let (lease, fallback) = match &self.fleet {
            // The client's own Cache-Control may refuse any stored answer
            // (no-cache, max-age=0): the shared level's are stored too.
            Some(_) if target.directives.is_some() => (None, stale.cloned()),
            None => (None, stale.cloned()),
            Some(fleet) => match self.read_shared(fleet, target, stale).await {
                Found::Usable(entry) => return Filled::FromFleet(entry),
                Found::Fetch { lease, fallback } => (lease, fallback),
            },
        };
        self.stats.record_upstream_request(UpstreamCause::Miss);
        let fetched = self
            .fetch(target, fallback.as_ref(), Priority::Client)
            .await;
        let fetched = failed_over(fetched, fallback.as_ref());
        self.share(fetched.stored(), &target.url_text, lease);
        Filled::Backend(fetched)
    }

    /// Reads the shared level for a fill: an entry to serve, or the lease
    /// to fetch under. A lease held elsewhere is waited on (polling, up to
    /// a lease's life) for its holder's entry; a holder that fails or dies
    /// frees it, and this instance takes it.
    async fn read_shared(
        &self,
        fleet: &Fleet,
        target: &FetchTarget,
        stale: Option<&Entry>,
    ) -> Found {
        let mut key = target.url_text.to_string();
        let mut fallback = stale.cloned();
        let mut take_anyway = false;
        let mut varied = false;
        let mut unusable: Option<Vec<u8>> = None;
        let mut waiting = Waiting {
            pause: POLL_FIRST,
            deadline: Instant::now() + fleet.lease() + POLL_MAX,
        };
        loop {
            let now = Instant::now();
            match fleet.claim(&key, take_anyway).await {
                Claim::Unavailable => {
                    return Found::Fetch {
                        lease: None,
                        fallback,
                    }
                }
                Claim::Won => {
                    fleet.count_read("miss");
                    return Found::Fetch {
                        lease: Some(key),
                        fallback,
                    };
                }
                Claim::Held => {
                    if !waiting.again(fleet).await {
                        return Found::Fetch {
                            lease: None,
                            fallback,
                        };
                    }
                }
                Claim::Value { bytes, won } => {
                    // The value found unusable last time is not read (nor
                    // counted) again.
                    let seen = unusable.as_deref() == Some(&bytes[..]);
                    let shared = if seen {
                        None
                    } else {
                        fleet.decode(&bytes, &key, now)
                    };
                    match shared {
                        Some(Shared::Entry(entry)) => match policy::decide(&entry, now, None) {
                            Use::Fresh | Use::Stale => {
                                let stale = entry.fresh_until() <= now;
                                fleet.count_read(if stale { "stale" } else { "hit" });
                                if won {
                                    fleet.release(&key).await;
                                }
                                self.adopt(&entry, &target.url_text, target.url_hash);
                                return Found::Usable(entry);
                            }
                            Use::Expired | Use::ClientRefused => {
                                fleet.count_read("expired");
                                fallback = newer(fallback, entry);
                            }
                        },
                        Some(Shared::Vary(names)) if !varied => {
                            // The URL's answers vary: the one for this
                            // request is under its variant's key.
                            if won {
                                fleet.release(&key).await;
                            }
                            varied = true;
                            take_anyway = false;
                            key = VariantKey::new(&target.url_text, &names, &target.client_headers)
                                .into_string();
                            continue;
                        }
                        // A vary record under a variant's key, or a
                        // corrupt value: nothing to serve.
                        Some(Shared::Vary(_)) | None => {}
                    }
                    unusable = Some(bytes);
                    if won {
                        return Found::Fetch {
                            lease: Some(key),
                            fallback,
                        };
                    }
                    if take_anyway {
                        // Something unusable is shared and the lease is
                        // another's: wait for that instance's fetch.
                        fleet.lease_lost();
                        if !waiting.again(fleet).await {
                            return Found::Fetch {
                                lease: None,
                                fallback,
                            };
                        }
                    }
                    take_anyway = true;
                }
            }
        }
    }

    /// Stores an entry made elsewhere (read from the shared level, or from
    /// a snapshot) here, under its own key (and, for a variant of
    /// `url_text`, in the URL's Vary record).
    pub(super) fn adopt(&self, entry: &Entry, url_text: &str, url_hash: u64) {
        let hash = self.keys.hash_text(entry.key());
        if entry.key() != url_text {
            if let Some(names) = varies_on(entry) {
                self.store.record_variant(url_hash, &names, hash);
            }
        }
        self.store.insert(hash, entry.clone());
    }

    /// Writes what a fetch stored to the shared level and releases the
    /// lease it held, in the background (the answer does not wait).
    pub(super) fn share(&self, stored: Option<&Entry>, url_text: &Arc<str>, lease: Option<String>) {
        let Some(fleet) = &self.fleet else { return };
        if stored.is_none() && lease.is_none() {
            return;
        }
        let stored = stored.cloned();
        let fleet = Arc::clone(fleet);
        let url_text = Arc::clone(url_text);
        self.tasks.spawn(async move {
            if let Some(entry) = stored {
                let names = varies_on(&entry);
                fleet.write(&entry, &url_text, names.as_deref()).await;
            }
            if let Some(key) = lease {
                fleet.release(&key).await;
            }
        });
    }

    /// Before a refresh of `stale`: take the key's lease, unless another
    /// instance holds it, or has already refreshed the key (its entry is
    /// stored here instead).
    pub(super) async fn refresh_lease(
        &self,
        stale: &Entry,
        url_text: &str,
        url_hash: u64,
    ) -> RefreshLease {
        let Some(fleet) = &self.fleet else {
            return RefreshLease::Local;
        };
        let key = stale.key();
        let now = Instant::now();
        let (bytes, won) = match fleet.claim(key, true).await {
            Claim::Unavailable => return RefreshLease::Local,
            Claim::Won => return RefreshLease::Held(key.to_string()),
            Claim::Held => return RefreshLease::Elsewhere,
            Claim::Value { bytes, won } => (bytes, won),
        };
        if let Some(Shared::Entry(entry)) = fleet.decode(&bytes, key, now) {
            if entry.stored_at() > stale.stored_at() && entry.fresh_until() > now {
                fleet.count_read("hit");
                if won {
                    fleet.release(key).await;
                }
                self.adopt(&entry, url_text, url_hash);
                return RefreshLease::Adopted;
            }
        }
        if won {
            RefreshLease::Held(key.to_string())
        } else {
            fleet.lease_lost();
            RefreshLease::Elsewhere
        }
    }

    /// `--refresh-mode stream`: puts the refresh of `stale` on the fleet's
    /// refresh stream for a worker. `false` when Redis did not take it (the
    /// refresh is then made here).
    pub(super) async fn queue_on_stream(&self, target: &FetchTarget, stale: &Entry) -> bool {
        let Some(fleet) = &self.fleet else {
            return false;
        };
        let job = RefreshJob {
            key: stale.key().to_string(),
            url: target.url_text.to_string(),
            path_and_query: target.path_and_query.to_string(),
            client_headers: target.client_headers.clone(),
            upstream_headers: target.upstream_headers.clone(),
            keyed_cookies: target.keyed_cookies,
            keyed_authorization: target.keyed_authorization,
            keyed_cookie_header: target.keyed_cookie_header,
            stale: Instant::now() >= stale.fresh_until(),
        };
        fleet.queue_job(&job).await != Queued::Unavailable
    }

    /// A refresh left to the instance holding its lease: not queued again
    /// here for [`LEASE_ELSEWHERE_HOLD`].
    pub(super) fn leave_refresh(&self, hash: u64) {
        lock(&self.backoff).hold(hash, Instant::now() + LEASE_ELSEWHERE_HOLD);
    }

    /// Starts applying the other instances' events (fleet mode only).
    pub(super) fn listen_to_fleet(self: &Arc<Self>, cancel: &tokio_util::sync::CancellationToken) {
        let Some(fleet) = &self.fleet else { return };
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
        self.tasks.spawn(crate::fleet::events::listen(
            Arc::clone(fleet),
            tx,
            cancel.clone(),
        ));
        let proxy = Arc::downgrade(self);
        self.tasks.spawn(async move {
            while let Some(event) = rx.recv().await {
                let Some(proxy) = proxy.upgrade() else { break };
                proxy.apply(event).await;
            }
        });
    }

    /// Applies another instance's event to this one's memory.
    async fn apply(&self, event: Event) {
        match event {
            Event::Replaced(key) => {
                let Some(fleet) = &self.fleet else { return };
                let now = Instant::now();
                let hash = self.keys.hash_text(&key);
                // Only what this instance holds: others are read when asked for.
                let Some(local) = self.store.get_exact(hash, key.as_bytes(), now) else {
                    return;
                };
                let Some(bytes) = fleet.read(&key).await else {
                    return;
                };
                if let Some(Shared::Entry(entry)) = fleet.decode(&bytes, &key, Instant::now()) {
                    if entry.stored_at() > local.stored_at() {
                        self.store.insert(hash, entry);
                    }
                }
            }
            Event::Purged { scope, soft } => {
                let affected = self.purge_here(&scope, soft, Instant::now());
                self.stats.purged.inc_by(affected as u64);
                tracing::info!(affected, soft, "purge from another instance");
            }
        }
    }

    /// Purges this instance's memory: a key (and its variants), a prefix
    /// of keys, or everything; soft marks them stale. Returns how many.
    fn purge_here(&self, scope: &Scope, soft: bool, now: Instant) -> usize {
        let affected = match scope {
            Scope::Key(key) => self.store.purge(|k| is_key_or_variant(k, key), soft, now),
            Scope::Prefix(prefix) => {
                self.store
                    .purge(|k| k.starts_with(prefix.as_bytes()), soft, now)
            }
            Scope::All => self.store.purge(|_| true, soft, now),
        };
        // A snapshot written before this purge would bring back what it
        // removed (or marked stale) at the next start, after a crash.
        self.snapshot_outdated();
        affected
    }

    /// Purges this instance and, in fleet mode, the shared level and every
    /// other instance. Returns how many entries this instance held, and how
    /// many the shared level did (`None`: no fleet, or Redis did not answer).
    pub async fn purge(&self, scope: Scope, soft: bool) -> (usize, Option<usize>) {
        let affected = self.purge_here(&scope, soft, Instant::now());
        self.stats.purged.inc_by(affected as u64);
        let Some(fleet) = &self.fleet else {
            return (affected, None);
        };
        let shared = purge_shared(fleet, &scope, soft).await;
        fleet.publish(&Event::Purged { scope, soft }).await;
        (affected, shared)
    }

    /// An unsafe method's invalidation of `key_text`, carried to the shared
    /// level and the other instances (in the background).
    pub(super) fn invalidate_shared(&self, key_text: String) {
        let Some(fleet) = &self.fleet else { return };
        let fleet = Arc::clone(fleet);
        self.tasks.spawn(async move {
            let scope = Scope::Key(key_text);
            purge_shared(&fleet, &scope, false).await;
            fleet.publish(&Event::Purged { scope, soft: false }).await;
        });
    }
}

/// Purges the shared level by `scope`.
async fn purge_shared(fleet: &Fleet, scope: &Scope, soft: bool) -> Option<usize> {
    match scope {
        Scope::Key(key) => fleet.purge_url(key, soft).await,
        Scope::Prefix(prefix) => fleet.purge(prefix, |_| true, soft).await,
        Scope::All => fleet.purge("", |_| true, soft).await,
    }
}

/// The key itself, or one of its Vary variants.
fn is_key_or_variant(stored: &[u8], key: &str) -> bool {
    stored == key.as_bytes() || VariantKey::is_variant_of(stored, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_variants() {
        assert!(is_key_or_variant(b"h/a?1", "h/a?1"));
        assert!(is_key_or_variant(b"h/a?1\naccept=x", "h/a?1"));
        assert!(!is_key_or_variant(b"h/a?10", "h/a?1"));
    }
}
