//! The first step of every request: what the cache has for it, decided
//! without waiting for anything. A fresh or stale entry is answered at
//! once (a stale one queues its refresh); anything else becomes the
//! backend work `fill.rs` or `pass.rs` does. [`Proxy::fast_hit`] is the
//! same lookup for the fast path's plain GETs. Owns no state; answers go
//! through `respond.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};

use crate::cache::entry::Entry;
use crate::cache::key::RequestKey;
use crate::cache::policy::{self, BypassReason, RequestDirectives, Use};
use crate::cache::CacheStatus;
use crate::error::ProxyError;
use crate::routes::{Route, ShapedKey};

use super::fetch::FetchTarget;
use super::respond::Answered;
use super::rules::{
    lowercase, request_host, route_headers, variant_text, Peer, RouteInForce, Rules,
};
use super::Proxy;

/// What the cache decided about a request before anything is awaited.
pub(super) enum Next {
    /// Answered from the cache (or a local error).
    Answer(Answered),
    /// Needs the backend.
    Backend(BackendWork),
}

impl FetchPlan {
    /// The cache status of the answer: `Expired` when a stored entry was
    /// past its windows, else `Miss`.
    pub(super) fn cache_status(&self) -> CacheStatus {
        if self.stale.is_some() {
            CacheStatus::Expired
        } else {
            CacheStatus::Miss
        }
    }
}

/// What the store holds for a request, and whether it can be served now.
/// `hash` is the key a fill or a refresh is for (the variant's, when the
/// URL varies).
pub(super) enum Looked {
    /// Served at once: fresh, or `stale` (a refresh is queued).
    Usable {
        entry: Entry,
        stale: bool,
        hash: u64,
    },
    /// Stored, but the backend is asked first: the entry is past its
    /// windows (`why` is `stale`), or the client's directives refuse it
    /// (`request`). Kept for revalidation and stale-if-error.
    Unusable {
        entry: Entry,
        why: &'static str,
        hash: u64,
    },
    /// Nothing stored for the URL, or for the variant when it `varied`.
    Missing { hash: u64, varied: bool },
}

/// What a request needs of the backend.
pub(super) enum BackendWork {
    /// Passed through, nothing stored.
    Pass(BypassReason),
    /// Fetched for the cache (a miss or an expired entry).
    Fetch(Box<FetchPlan>),
}

/// A fetch for the cache, as decided on the request path.
pub(super) struct FetchPlan {
    pub(super) target: FetchTarget,
    pub(super) fill_hash: u64,
    /// The expired entry, kept for revalidation and stale-if-error.
    pub(super) stale: Option<Entry>,
    pub(super) fwd: &'static str,
    pub(super) head: bool,
    /// The key was recently uncacheable (hit-for-miss): fetch uncoalesced.
    pub(super) alone: bool,
}

/// An answer for [`crate::fast_hits`] to write: the entry and the values
/// of the headers an answer adds to the stored ones.
pub struct FastHit {
    pub entry: Entry,
    /// `Hit` or `Stale`, for `X-Cache`.
    pub status: CacheStatus,
    pub age: HeaderValue,
    pub cache_status: HeaderValue,
}

/// Whether an answer with this status carries the body (and stored
/// `Content-Length`) as they are: not 1xx, 204 or 304.
pub(super) fn has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

impl Proxy {
    /// The one lookup of both paths: the entry of `key`'s URL; else, for a
    /// URL whose answers vary, the variant the request's headers select, as
    /// its route leaves them (`variant_of`; the fast path gives none and
    /// leaves varying URLs to hyper's path). Then whether the entry can be
    /// served now, by its instants and the client's `directives`.
    #[inline]
    pub(super) fn look_up(
        &self,
        key: RequestKey<'_>,
        variant_of: Option<(&HeaderMap, Option<&Route>)>,
        directives: Option<&RequestDirectives>,
        now: Instant,
    ) -> Looked {
        let mut varied = false;
        let mut hash = key.hash;
        let found = match self.store.get(&key, now) {
            Some(entry) => Some(entry),
            None => match (variant_of, self.store.vary_names(key.hash)) {
                (Some((headers, route)), Some(names)) => {
                    let text = variant_text(key, &names, &route_headers(route, headers));
                    hash = self.keys.hash_text(&text);
                    varied = true;
                    self.store.get_exact(hash, text.as_bytes(), now)
                }
                _ => None,
            },
        };
        self.popularity.record(hash);
        let Some(entry) = found else {
            return Looked::Missing { hash, varied };
        };
        match policy::decide(&entry, now, directives) {
            Use::Fresh => Looked::Usable {
                entry,
                stale: false,
                hash,
            },
            Use::Stale => Looked::Usable {
                entry,
                stale: true,
                hash,
            },
            Use::Expired => Looked::Unusable {
                entry,
                why: "stale",
                hash,
            },
            Use::ClientRefused => Looked::Unusable {
                entry,
                why: "request",
                hash,
            },
        }
    }

    /// What the cache does with a request, without waiting for anything:
    /// answer it (fresh or stale hit, or a local error), or say what to ask
    /// the backend.
    pub(super) fn from_cache(
        self: &Arc<Self>,
        parts: &Parts,
        peer: Peer,
        rules: &Rules,
        route: Option<&RouteInForce>,
    ) -> Next {
        if !policy::method_is_cacheable(&parts.method) {
            return Next::Backend(BackendWork::Pass(BypassReason::Method));
        }
        if parts.headers.contains_key(header::RANGE) {
            return Next::Backend(BackendWork::Pass(BypassReason::Range));
        }
        let host = match request_host(parts) {
            Ok(host) => host,
            Err(err) => return Next::Answer(self.refused(&err)),
        };
        let host = lowercase(host);
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        if !path_and_query.starts_with('/') {
            // The key's host ends where its target's first `/` starts.
            return Next::Answer(self.refused(&ProxyError::BadTarget));
        }
        let (route, defaults) = match route {
            Some(r) => (Some(&r.route), &r.defaults),
            None => (None, &rules.defaults),
        };
        if route.is_some_and(|r| r.bypass) {
            return Next::Backend(BackendWork::Pass(BypassReason::Route));
        }
        // A route's key options (query filtering and order, key headers) make
        // the key differ from the URL.
        let shaped = route
            .filter(|r| r.shapes_key())
            .map(|r| r.shaped_key(parts.uri.path(), parts.uri.query(), &parts.headers));
        let key = self.keys.key(
            &host,
            shaped.as_ref().map_or(path_and_query, ShapedKey::text),
        );
        // What the backend is asked for: the URL as the key has it.
        let path_and_query = shaped.as_ref().map_or(path_and_query, ShapedKey::target);
        let head = parts.method == Method::HEAD;
        let directives = if rules.honor_client_cache_control {
            Some(RequestDirectives::parse(&parts.headers)).filter(|d| !d.is_empty())
        } else {
            None
        };
        if directives.is_some_and(|d| d.no_store) {
            return Next::Backend(BackendWork::Pass(BypassReason::Request));
        }
        let now = Instant::now();

        let (stale, fwd, fill_hash) =
            match self.look_up(key, Some((&parts.headers, route)), directives.as_ref(), now) {
                Looked::Usable { entry, stale, hash } => {
                    let target = || {
                        self.fetch_target(
                            key,
                            path_and_query,
                            &parts.headers,
                            peer,
                            defaults,
                            route,
                        )
                    };
                    let ahead = route.map_or(rules.refresh_ahead, |r| r.refresh_ahead);
                    let refresh = self.refresh_on_answer(hash, &entry, stale, ahead, target, now);
                    let (status, cache_status) = self.at_once(&entry, stale, refresh, now);
                    return Next::Answer(self.entry_response(
                        &entry,
                        status,
                        cache_status,
                        parts,
                        now,
                    ));
                }
                Looked::Unusable { entry, why, hash } => (Some(entry), why, hash),
                Looked::Missing { hash, varied } => {
                    (None, if varied { "vary-miss" } else { "uri-miss" }, hash)
                }
            };
        if directives.is_some_and(|d| d.only_if_cached) {
            return Next::Answer(self.not_cached());
        }
        // A client's own fetch carries its credentials: what it brings back
        // is stored only if the backend says it may be shared.
        let mut target =
            self.fetch_target(key, path_and_query, &parts.headers, peer, defaults, route);
        target.directives = directives;
        let alone = self.hit_for_miss.holds(fill_hash, now, target.facts);
        if alone {
            self.stats.hit_for_miss.inc();
        }
        Next::Backend(BackendWork::Fetch(Box::new(FetchPlan {
            target,
            fill_hash,
            stale,
            fwd,
            head,
            alone,
        })))
    }

    /// The answer from the cache a plain HTTP/1.1 `GET` of `path_and_query`
    /// on `host` gets, for [`crate::fast_hits`]: a fresh hit, or a stale one
    /// with its refresh queued, recorded as [`Proxy::handle`] records them.
    /// The caller has checked that the request asks nothing else of the
    /// cache (no range, no conditional, no body); `directives` says whether
    /// it carries Cache-Control or Pragma, and `headers` builds the client's
    /// headers, which a queued refresh sends on.
    ///
    /// `None` for anything else (a route that bypasses or shapes the key, a
    /// varying URL, a miss, an expired entry, directives that count, a
    /// status without a body): `handle` answers it. The steps are
    /// `from_cache`'s, in its order.
    pub fn fast_hit(
        &self,
        host: &str,
        path_and_query: &str,
        directives: bool,
        client: SocketAddr,
        headers: impl FnOnce() -> HeaderMap,
    ) -> Option<FastHit> {
        let rules = self.rules.load();
        if directives && rules.honor_client_cache_control {
            return None;
        }
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(path, _)| path);
        let route = rules.route_for(path);
        if route.is_some_and(|r| r.route.bypass || r.route.shapes_key()) {
            return None;
        }
        let host = lowercase(host);
        let key = self.keys.key(&host, path_and_query);
        let now = Instant::now();
        let Looked::Usable { entry, stale, hash } = self.look_up(key, None, None, now) else {
            return None;
        };
        if !has_body(entry.status()) {
            return None;
        }
        let defaults = route.map_or(&rules.defaults, |r| &r.defaults);
        let peer = rules.peer(Some(client));
        let route_rules = route.map(|r| &r.route);
        let target =
            || self.fetch_target(key, path_and_query, &headers(), peer, defaults, route_rules);
        let ahead = route.map_or(rules.refresh_ahead, |r| r.route.refresh_ahead);
        let refresh = self.refresh_on_answer(hash, &entry, stale, ahead, target, now);
        Some(self.fast_answer(entry, stale, refresh, route.map(|r| &*r.stats), now))
    }
}
