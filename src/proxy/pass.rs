//! Requests passed through to the backend, streamed both ways and never
//! stored, and the invalidation an unsafe method's success causes
//! (RFC 9111 §4.4).

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::Method;

use crate::cache::policy::{self, BypassReason};
use crate::metrics::UpstreamCause;
use crate::upstream::{self, BoxError, Priority, RequestBody};

use super::fetch::Sent;
use super::respond::Answered;
use super::rules::{lowercase, request_host, same_origin_path, Peer};
use super::Proxy;

impl Proxy {
    /// Passes a request through to the backend, streaming both ways; nothing
    /// is stored. A successful unsafe method invalidates what is stored for
    /// its URI and the URIs in its `Location` and `Content-Location`.
    pub(super) async fn pass<B>(
        &self,
        parts: &Parts,
        body: Option<B>,
        peer: Peer,
        reason: BypassReason,
    ) -> Answered
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        // `handle` answered a request without a valid host with a 400.
        let host = lowercase(request_host(parts).unwrap_or_default());
        let forwarding = upstream::Forwarding {
            host: &host,
            client: peer.addr,
            trusted: peer.trusted,
            with_body: body.is_some(),
            keyed: &[],
        };
        let headers = upstream::forward_headers(&parts.headers, &forwarding);
        // A request without a body (`Content-Length: 0`, or none framed) is
        // sent without one, not as an empty chunked stream.
        let body = body.filter(|b| !b.is_end_stream()).map(RequestBody::stream);
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.stats.record_upstream_request(UpstreamCause::Pass);
        let head = parts.method == Method::HEAD;
        let fwd = match reason {
            BypassReason::Method => "method",
            BypassReason::Request => "request",
            _ => "bypass",
        };
        let sent = self
            .ask_backend(
                Priority::Client,
                parts.method.clone(),
                path_and_query,
                headers,
                body,
            )
            .await;
        match sent {
            Ok(Sent { response, slot, .. }) => {
                // Held to the response head: a streamed body does not keep its slot.
                drop(slot);
                let status = response.status();
                if policy::method_invalidates(&parts.method)
                    && (status.is_success() || status.is_redirection())
                {
                    self.invalidate(parts, response.headers());
                }
                let passed = self.passed(reason, response);
                self.passed_response(passed, fwd, head)
            }
            Err(err) => self.pass_failed(err, reason, fwd, parts),
        }
    }

    /// RFC 9111 §4.4: removes the stored answers for the request's URI and for
    /// same-origin `Location` / `Content-Location` URIs in the response, each
    /// under the key its route makes (with this request's key headers).
    pub(super) fn invalidate(&self, parts: &Parts, response_headers: &HeaderMap) {
        let Ok(host) = request_host(parts) else {
            return;
        };
        let host = lowercase(host);
        let mut targets: Vec<String> = vec![parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string()];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = response_headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if let Some(path) = same_origin_path(value, &host) {
                targets.push(path);
            }
        }
        let rules = self.rules.load();
        for path in targets {
            // Stored under the key its route makes of it (sorted or filtered
            // query, key headers), as the request's own GET would be.
            let (only_path, query) = match path.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (path.as_str(), None),
            };
            let text = match rules.route_for(only_path).filter(|r| r.route.shapes_key()) {
                Some(r) => {
                    let shaped = r.route.shaped_key(only_path, query, &parts.headers);
                    format!("{host}{}", shaped.text())
                }
                None => format!("{host}{path}"),
            };
            let removed = self.store.remove_url(self.keys.hash_text(&text), &text);
            self.invalidate_shared(text.clone());
            if removed > 0 {
                self.stats.invalidations.inc_by(removed as u64);
                tracing::debug!(key = %text, removed, method = %parts.method, "invalidated");
            }
        }
    }
}
