//! Fetching a response for the cache: what is sent (forwarded headers,
//! no client conditionals or framing, credentials kept or not), the
//! conditional request and 304 renewal of a stored entry, storability,
//! and storing the answer under its URL or its variant. The only place
//! that stores a backend answer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::body::ProxyBody;
use crate::cache::entry::Entry;
use crate::cache::key::RequestKey;
use crate::cache::policy::{
    self, BypassReason, Defaults, RequestDirectives, RequestFacts, Storability,
};
use crate::cache::vary::{self, VariantKey};
use crate::error::{UpstreamError, UpstreamErrorKind};
use crate::metrics::UpstreamCause;
use crate::routes::{Cookies, Route};
use crate::upstream::{self, BodyRead, Permit, Priority, RequestBody, UpstreamResponse};

use super::rules::{route_headers, Peer};
use super::Proxy;

/// What a fetch for the cache is for: the URL, the request's headers, and
/// where the answer is stored.
#[derive(Clone)]
pub(super) struct FetchTarget {
    /// The URL's key text (`host` + `path?query`) and its hash.
    pub(super) url_text: Arc<str>,
    pub(super) url_hash: u64,
    pub(super) path_and_query: Arc<str>,
    /// The client's headers: what a Vary'd answer is keyed by.
    pub(super) client_headers: HeaderMap,
    /// What is sent to the backend: forwarded, without the client's
    /// conditionals and framing.
    pub(super) upstream_headers: HeaderMap,
    /// What storability needs to know of the request.
    pub(super) facts: RequestFacts,
    /// The cookies left are part of the key (a route's `cookies = [...]`).
    pub(super) keyed_cookies: bool,
    /// The route's `key_headers` name these credentials: their values are
    /// in the key, so a refresh keeps them.
    pub(super) keyed_authorization: bool,
    pub(super) keyed_cookie_header: bool,
    /// The caching rules of the request's route.
    pub(super) defaults: Arc<Defaults>,
    /// The client's Cache-Control, when honoured: it may refuse what is
    /// stored, in memory or in the fleet's shared level alike.
    pub(super) directives: Option<RequestDirectives>,
}

impl FetchTarget {
    /// The fetch without the client's `Authorization` and `Cookie`, for a
    /// background refresh of `stale`, an entry stored for everyone: one
    /// client's credentials never shape what others are served. Kept: the
    /// cookies the route's key names, and a field the key holds (a route's
    /// `key_headers`, or any `Vary` line of the entry): every client of the
    /// entry sent that value.
    pub(super) fn without_credentials(mut self, stale: &Entry) -> FetchTarget {
        let varies_on = |name: &str| vary::stored_varies_on(stale, name);
        let keep_cookie = self.keyed_cookies || self.keyed_cookie_header || varies_on("cookie");
        let keep_authorization = self.keyed_authorization || varies_on("authorization");
        for headers in [&mut self.client_headers, &mut self.upstream_headers] {
            if !keep_authorization {
                headers.remove(header::AUTHORIZATION);
            }
            if !keep_cookie {
                headers.remove(header::COOKIE);
            }
        }
        self.facts = facts_of(&self.client_headers, self.keyed_cookies);
        self.directives = None;
        // A header value can be a slice of the connection's read buffer,
        // which a queued job would keep alive whole: copy what it keeps.
        self.client_headers = detached(&self.client_headers);
        self.upstream_headers = detached(&self.upstream_headers);
        self
    }
}

/// A copy of `headers` that shares no memory with them.
pub(super) fn detached(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.append(name.clone(), value);
        }
    }
    copy
}

/// What storability needs of a request's headers; cookies that are part of
/// the key do not make an answer private.
pub(super) fn facts_of(headers: &HeaderMap, keyed_cookies: bool) -> RequestFacts {
    let facts = RequestFacts::of(headers);
    RequestFacts {
        cookie: facts.cookie && !keyed_cookies,
        ..facts
    }
}

/// The result of fetching a response for the cache.
pub(super) enum Fetched {
    /// Stored (a new entry, or a stale one renewed by a 304).
    Stored(Entry),
    /// Not storable: passed through as a stream.
    Pass(Passed),
    /// The backend failed (no response, or the exchange broke).
    Failed(UpstreamError),
}

impl Fetched {
    /// The entry stored, if one was.
    pub(super) fn stored(&self) -> Option<&Entry> {
        match self {
            Fetched::Stored(entry) => Some(entry),
            Fetched::Pass(_) | Fetched::Failed(_) => None,
        }
    }
}

/// A backend response passed through without being stored.
pub(super) struct Passed {
    pub(super) reason: BypassReason,
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: ProxyBody,
}

/// Headers for a fetch made on behalf of the cache: the client's forwarded
/// headers without its conditionals and ranges (the cache wants the whole,
/// storable response).
pub(super) fn fill_headers(
    client_headers: &HeaderMap,
    forwarding: &upstream::Forwarding<'_>,
) -> HeaderMap {
    let mut headers = upstream::forward_headers(client_headers, forwarding);
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
    headers
}

/// A request the backend answered ([`Proxy::ask_backend`]).
pub(super) struct Sent {
    /// Its response head; the body is still to be read.
    pub(super) response: UpstreamResponse,
    /// The slot to the backend (`None` without a cap): held while the
    /// body is read for the cache, dropped to stream it.
    pub(super) slot: Option<Permit>,
    /// From the send to the response head (the request's response delay).
    pub(super) took: Duration,
}

/// Fields a 304 may add to a stored answer that lacks them: those its
/// lifetimes are computed from. Not the validators: a field the stored
/// answer lacks may be one a `private="..."` left out (see
/// [`renewal_headers`]), and a per-client `ETag` or `Last-Modified` would
/// then be served to everyone; a new validator comes with the next full
/// answer.
const RENEWABLE_ADDITIONS: [HeaderName; 3] = [header::CACHE_CONTROL, header::EXPIRES, header::DATE];

/// Whether a 304 validates the stored answer: it carries no `ETag`, or
/// one, the stored answer's byte for byte (RFC 9111 §4.3.4 selects the
/// stored responses to update by their validator).
fn validates(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    let mut sent = not_modified.get_all(header::ETAG).iter();
    match (sent.next(), sent.next()) {
        (None, _) => true,
        (Some(etag), None) => stored.get(header::ETAG).is_none_or(|kept| kept == etag),
        (Some(_), Some(_)) => false,
    }
}

/// The headers of `stale` renewed with those of a 304 (RFC 9111 §4.3.4),
/// as they are stored.
///
/// - The 304's hop-by-hop fields, and the fields its `Connection` names,
///   belong to that message only (RFC 9110 §7.6.1), so they are removed
///   before the merge: the merged headers hold no `Connection` of the
///   304's, and stripping them later cannot remove a stored field.
/// - A 304 replaces the fields the stored answer holds, but adds only the
///   fields its lifetimes come from ([`RENEWABLE_ADDITIONS`]), where RFC 9111
///   §3.2 adds every field. A field the stored answer lacks may be one its
///   `private="..."` left out, in a field targeted at this cache that is
///   not stored (`CDN-Cache-Control`): a 304 that omits that directive
///   would put one client's field into the answer shared by everyone. A
///   new field comes with the next full answer.
fn renewal_headers(stale: &Entry, stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut end_to_end = upstream::response_headers(not_modified);
    let added: Vec<HeaderName> = end_to_end
        .keys()
        .filter(|name| !stored.contains_key(*name) && !RENEWABLE_ADDITIONS.contains(name))
        .cloned()
        .collect();
    for name in added {
        end_to_end.remove(name);
    }
    stale.renewed_headers(&end_to_end)
}

impl Proxy {
    /// Sends one request to the backend in a slot of `priority` (waited for
    /// `--upstream-timeout` at most) and returns the response head with the
    /// slot: a caller reading the body for the cache keeps it, one that
    /// streams drops it. Counts the backend's latency (from the send, not the
    /// wait for a slot), a 5xx, and a request that failed (`busy` when no
    /// slot came). The one way both the cache's fetches and pass-through ask
    /// the backend.
    pub(super) async fn ask_backend(
        &self,
        priority: Priority,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Option<RequestBody>,
    ) -> Result<Sent, UpstreamError> {
        let sent = async {
            let slot = self.upstream.permit(priority).await?;
            let started = Instant::now();
            let response = self
                .upstream
                .send(method, path_and_query, headers, body)
                .await?;
            let took = started.elapsed();
            self.stats.upstream_latency.observe(took);
            Ok::<_, UpstreamError>(Sent {
                response,
                slot,
                took,
            })
        };
        match sent.await {
            Ok(sent) => {
                if policy::status_is_error(sent.response.status()) {
                    self.stats.record_upstream_error(UpstreamErrorKind::Status);
                }
                Ok(sent)
            }
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                Err(err)
            }
        }
    }

    /// A fetch for the cache of `key`'s URL, by the rules of the request's
    /// route: the headers it keys on are forwarded whatever they are, and
    /// its `cookies` setting decides which cookies go.
    pub(super) fn fetch_target(
        &self,
        key: RequestKey<'_>,
        path_and_query: &str,
        client_headers: &HeaderMap,
        peer: Peer,
        defaults: &Arc<Defaults>,
        route: Option<&Route>,
    ) -> FetchTarget {
        let client_headers = route_headers(route, client_headers).into_owned();
        let forwarding = upstream::Forwarding {
            host: key.host,
            client: peer.addr,
            trusted: peer.trusted,
            with_body: false,
            keyed: route.map_or(&[][..], |r| &r.key_headers[..]),
        };
        let keyed_cookies = route.is_some_and(|r| matches!(r.cookies, Cookies::Key(_)));
        let keys = |name: &HeaderName| route.is_some_and(|r| r.key_headers.contains(name));
        FetchTarget {
            url_text: key.to_text().into(),
            url_hash: key.hash,
            path_and_query: path_and_query.into(),
            upstream_headers: fill_headers(&client_headers, &forwarding),
            facts: facts_of(&client_headers, keyed_cookies),
            client_headers,
            keyed_cookies,
            keyed_authorization: keys(&header::AUTHORIZATION),
            keyed_cookie_header: keys(&header::COOKIE),
            defaults: Arc::clone(defaults),
            directives: None,
        }
    }

    /// Fetches a response for the cache (always a GET). With a stored entry
    /// that has validators, the request is conditional and a 304 renews the
    /// entry ([`Proxy::renewed`]). A storable answer is read whole and
    /// stored (under its variant when it varies); one that may not be stored
    /// is handed back to stream.
    pub(super) async fn fetch(
        &self,
        target: &FetchTarget,
        stale: Option<&Entry>,
        priority: Priority,
    ) -> Fetched {
        let mut headers = target.upstream_headers.clone();
        let mut conditional = false;
        if let Some(stale) = stale {
            if let Some(etag) = stale.etag() {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
                conditional = true;
            }
            if let Some(modified) = stale.last_modified() {
                headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
                conditional = true;
            }
        }
        if conditional {
            self.stats
                .record_upstream_request(UpstreamCause::Revalidate);
        }
        // The slot is held until the body is read (or handed on to stream).
        let Sent {
            response,
            slot: _slot,
            took: response_delay,
        } = match self
            .ask_backend(priority, Method::GET, &target.path_and_query, headers, None)
            .await
        {
            Ok(sent) => sent,
            Err(err) => return Fetched::Failed(err),
        };
        let status = response.status();

        if status == StatusCode::NOT_MODIFIED {
            let Some(stale) = stale.filter(|_| conditional) else {
                return Fetched::Pass(self.passed(BypassReason::NotModified, response));
            };
            return self.renewed(stale, response.headers(), target, response_delay);
        }

        // Decided on the headers as sent, before the fields the backend's
        // `Connection` names are removed: a `Cache-Control: private` there
        // still keeps the answer out of the shared cache.
        let lifetimes = match policy::storability(
            status,
            response.headers(),
            target.facts,
            response_delay,
            SystemTime::now(),
            &target.defaults,
        ) {
            Storability::Store(lifetimes) => lifetimes,
            Storability::Bypass(reason) => return Fetched::Pass(self.passed(reason, response)),
        };
        // Where it is stored: under the URL, or under the variant its Vary selects.
        let (hash, text, vary) = match vary::vary_names(response.headers()) {
            vary::Vary::Names(names) if !names.is_empty() => {
                let text =
                    VariantKey::new(&target.url_text, &names, &target.client_headers).into_string();
                (self.keys.hash_text(&text), text, Some(names))
            }
            _ => (target.url_hash, target.url_text.to_string(), None),
        };
        let omitted = policy::omitted_fields(response.headers(), &self.targeted);
        let mut headers = self.client_headers(response.headers());
        match self
            .upstream
            .read_body(response, self.config.start.max_object_size)
            .await
        {
            Ok(BodyRead::Complete(body)) => {
                for name in omitted {
                    headers.remove(name);
                }
                let entry = Entry::new(&text, status, &headers, &body, Instant::now(), lifetimes);
                match vary {
                    Some(names) => {
                        self.store.record_variant(target.url_hash, &names, hash);
                        // The URL's own entry (from before it varied) is stale knowledge.
                        self.store.remove(target.url_hash, &target.url_text);
                    }
                    None => self.store.forget_vary(target.url_hash),
                }
                self.store.insert(hash, entry.clone());
                Fetched::Stored(entry)
            }
            Ok(BodyRead::NoRoom { prefix, rest }) => Fetched::Pass(Passed {
                reason: BypassReason::BufferFull,
                status,
                headers,
                body: self.upstream.stream_body(prefix, rest),
            }),
            Ok(BodyRead::TooLarge { prefix, rest }) => Fetched::Pass(Passed {
                reason: BypassReason::TooLarge,
                status,
                headers,
                body: self.upstream.stream_body(prefix, rest),
            }),
            Err(err) => {
                self.stats.record_upstream_error(err.kind);
                Fetched::Failed(err)
            }
        }
    }

    /// A 304 to the conditional fetch of `stale`: the entry renewed with
    /// the 304's headers and stored; or, when the renewed answer may not be
    /// stored, passed on from the stored body, and the stored entry removed
    /// unless only this client's credentials made it private.
    fn renewed(
        &self,
        stale: &Entry,
        not_modified: &HeaderMap,
        target: &FetchTarget,
        response_delay: Duration,
    ) -> Fetched {
        // Decided on the 304 as sent, as a 200 is: a directive against
        // storing counts even in a field its `Connection` names (a shared
        // cache may store less than the backend allows, never more), and so
        // do the fields `private="..."` / `no-cache="..."` name, which a
        // shared cache does not keep (RFC 9111 §5.2.2.4, §5.2.2.7).
        let as_sent = stale.renewed_headers(not_modified);
        let stored = stale.header_map(0);
        let mut headers = self.client_headers(&renewal_headers(stale, &stored, not_modified));
        let decided = match policy::storability(
            stale.status(),
            &as_sent,
            target.facts,
            response_delay,
            SystemTime::now(),
            &target.defaults,
        ) {
            Storability::Store(_) if !validates(&stored, not_modified) => {
                Storability::Bypass(BypassReason::ValidatorChanged)
            }
            // The variants stored are keyed by the stored Vary's names.
            Storability::Store(_) if vary::vary_names(&as_sent) != vary::vary_names(&stored) => {
                Storability::Bypass(BypassReason::VaryChanged)
            }
            Storability::Store(lifetimes) => {
                for name in policy::omitted_fields(&as_sent, &self.targeted) {
                    headers.remove(name);
                }
                // The bound is on what is stored, which keeps the stored
                // fields a 304's `Connection` names.
                if policy::fits_entry(&headers) {
                    Storability::Store(lifetimes)
                } else {
                    Storability::Bypass(BypassReason::TooLarge)
                }
            }
            bypass => bypass,
        };
        match decided {
            Storability::Store(lifetimes) => {
                let entry = Entry::new(
                    stale.key(),
                    stale.status(),
                    &headers,
                    &[stale.body()],
                    Instant::now(),
                    lifetimes,
                );
                let hash = self.keys.hash_text(stale.key());
                self.store.insert(hash, entry.clone());
                self.stats.revalidated.inc();
                self.stats
                    .revalidation_bytes_saved
                    .inc_by(stale.body_len() as u64);
                Fetched::Stored(entry)
            }
            Storability::Bypass(reason) => {
                // What the backend said of the stored answer ends it;
                // that this client's credentials made the 304 private
                // says nothing about the answer stored for everyone.
                if !reason.is_credentials() {
                    self.store
                        .remove(self.keys.hash_text(stale.key()), stale.key());
                }
                Fetched::Pass(Passed {
                    reason,
                    status: stale.status(),
                    headers,
                    body: ProxyBody::full(stale.body()),
                })
            }
        }
    }

    /// A backend response to stream through without storing it.
    pub(super) fn passed(&self, reason: BypassReason, response: UpstreamResponse) -> Passed {
        Passed {
            reason,
            status: response.status(),
            headers: self.client_headers(response.headers()),
            body: self.upstream.stream_body(Vec::new(), response),
        }
    }

    /// A backend response's headers as clients get them: hop-by-hop headers
    /// and the fields targeted at this proxy removed.
    pub(super) fn client_headers(&self, upstream_headers: &HeaderMap) -> HeaderMap {
        let mut headers = upstream::response_headers(upstream_headers);
        headers.remove(&self.targeted);
        headers.remove(policy::CDN_CACHE_CONTROL);
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Lifetimes;

    #[test]
    fn a_304_hop_by_hop_fields_leave_the_stored_ones() {
        let mut stored = HeaderMap::new();
        stored.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        stored.insert("x-kept", HeaderValue::from_static("yes"));
        stored.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=1"));
        let lifetimes = Lifetimes {
            fresh: Duration::from_secs(1),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            initial_age: Duration::ZERO,
            keep_for_revalidation: Duration::from_secs(60),
        };
        let stale = Entry::new(
            "h/p",
            StatusCode::OK,
            &stored,
            &[],
            Instant::now(),
            lifetimes,
        );
        let mut not_modified = HeaderMap::new();
        not_modified.insert(
            header::CONNECTION,
            HeaderValue::from_static("etag, x-kept, x-hop"),
        );
        not_modified.insert(header::ETAG, HeaderValue::from_static("\"v2\""));
        not_modified.insert("x-hop", HeaderValue::from_static("1"));
        not_modified.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        not_modified.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );

        let merged = renewal_headers(&stale, &stale.header_map(0), &not_modified);
        // As clients get and the cache stores the renewed answer.
        let renewed = upstream::response_headers(&merged);
        assert_eq!(renewed[header::ETAG], "\"v1\"");
        assert_eq!(renewed["x-kept"], "yes");
        assert_eq!(
            renewed[header::CACHE_CONTROL],
            "max-age=60",
            "an end-to-end field is renewed"
        );
        for hop in [header::CONNECTION.as_str(), "keep-alive", "x-hop"] {
            assert!(!merged.contains_key(hop), "{hop}");
        }
    }

    #[test]
    fn a_304_validates_only_the_stored_etag() {
        let etags = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::ETAG, HeaderValue::from_static(value));
            }
            headers
        };
        let stored = etags(&["\"v\""]);
        assert!(validates(&stored, &etags(&[])), "no ETag: by its date");
        assert!(validates(&stored, &etags(&["\"v\""])));
        assert!(!validates(&stored, &etags(&["\"w\""])));
        assert!(!validates(&stored, &etags(&["\"v\"", "\"w\""])));
        // Stored without one (validated by Last-Modified): the 304's ETag
        // is not stored, so it relabels nothing.
        assert!(validates(&HeaderMap::new(), &etags(&["\"w\""])));
    }
}
