//! The one upstream client: builds the backend request from the client's,
//! strips hop-by-hop headers both ways, and reads or streams the answer.
//!
//! The client is hyper-util's pooled client ("legacy" is hyper's name for
//! that API) with a rustls connector: http backends get HTTP/1.1, https
//! backends h2 or HTTP/1.1 by ALPN, verified against the compiled-in
//! webpki roots or `--upstream-ca`'s (read by `config/tls.rs`). reqwest, used before af4b400, is built on the same two crates and
//! adds layers a proxy does not need: its URL parser (which also re-encoded
//! bytes of the key's target, so the backend could be asked for another
//! URL), default headers, redirects. Without them, Zipf's misses took 15.8
//! instead of 16.6 us of CPU per answer (BENCHMARKS.md, "Issue 18: the
//! upstream client"). The one layer of reqwest's kept is its retry of a
//! bodiless request an HTTP/2 backend refused before reading it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyDataStream, BodyExt, Either, Empty, StreamBody};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::ProxyBody;
use crate::error::{UpstreamError, UpstreamErrorKind};

/// Errors of a client's request body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to the backend (TCP, then TLS for https) within a time limit
/// for the whole: `HttpConnector`'s own limit ends at TCP, and hyper-util
/// finishes a connect in the background when a pooled connection frees up
/// first, so a backend that stalls its TLS handshake would hold a task and
/// a socket per such request, beyond `--upstream-concurrency`.
#[derive(Clone)]
struct TimedConnect {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl TimedConnect {
    /// Verifies an https backend against `roots` (`--upstream-ca`), or the
    /// compiled-in webpki (Mozilla) roots, as reqwest's rustls-tls did.
    fn new(roots: Option<Arc<RootCertStore>>, timeout: Duration) -> Result<TimedConnect, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        // A pooled connection to a backend host that vanished would be reused
        // into a timeout: probes drop it within 15 s + 3 x 15 s.
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        let roots = roots.unwrap_or_else(|| {
            Arc::new(RootCertStore::from_iter(
                webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
            ))
        });
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot build the upstream client: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // `tls` names no ALPN protocol (`with_tls_config` panics otherwise):
        // `enable_all_versions` sets h2 and http/1.1.
        let inner = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(TimedConnect { inner, timeout })
    }
}

impl tower_service::Service<Uri> for TimedConnect {
    type Response = <HttpsConnector<HttpConnector> as tower_service::Service<Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(BoxError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {}ms", timeout.as_millis()),
                ))),
            }
        })
    }
}

/// A request's body as sent: none, or a client's, streamed.
type OutBody = Either<Empty<Bytes>, BoxBody<Bytes, BoxError>>;

/// The backend and the client that talks to it.
pub struct Upstream {
    /// Pooled connections to the backend, HTTP/1.1 or h2.
    client: Client<TimedConnect, OutBody>,
    /// The backend URL's scheme (`http` or `https`).
    scheme: Scheme,
    /// The backend URL's host and port, without user info: also the `Host`
    /// every request carries (the client's is removed).
    authority: Authority,
    /// The backend URL's path without a trailing slash (often empty): the
    /// prefix of every request's path.
    base_path: String,
    timeout: Duration,
    limiter: Option<Limiter>,
    in_flight: Arc<AtomicU64>,
    /// Body bytes being read to store, across every fill and refresh now
    /// (`--max-buffered` at most: a body that would pass it is streamed
    /// through, not stored).
    buffered: Arc<AtomicU64>,
    max_buffered: u64,
}

/// Who is asking for a slot to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A client waits for the answer (a miss, a pass).
    Client,
    /// Nobody waits (a background refresh).
    Background,
}

/// Caps requests in flight to the backend. Tokio semaphores (fair, async):
/// `all` holds one permit per slot; `background` holds one fewer, and a
/// refresh takes one of those first, so refreshes can never hold every slot
/// and a client miss always finds one free, or is next in line for one.
struct Limiter {
    all: Arc<Semaphore>,
    background: Arc<Semaphore>,
}

/// A slot to the backend, freed on drop.
pub struct Permit {
    _all: OwnedSemaphorePermit,
    _background: Option<OwnedSemaphorePermit>,
}

/// A response body read for storing, or the signal that it is too large.
pub enum BodyRead {
    /// The whole body, as the chunks it arrived in.
    Complete(Vec<Bytes>),
    /// Over the limit: the chunks read so far, and the rest still unread.
    TooLarge {
        prefix: Vec<Bytes>,
        rest: UpstreamResponse,
    },
    /// `--max-buffered` is taken by other reads: as `TooLarge`, but it says
    /// nothing of the object, which may be stored next time.
    NoRoom {
        prefix: Vec<Bytes>,
        rest: UpstreamResponse,
    },
}

impl Upstream {
    /// The client for `url`; `concurrency` caps requests in flight (0: no cap).
    pub fn new(
        url: &url::Url,
        roots: Option<Arc<RootCertStore>>,
        timeout: Duration,
        concurrency: usize,
        max_buffered: u64,
    ) -> Result<Upstream, String> {
        let connector = TimedConnect::new(roots, timeout)?;
        let client = Client::builder(TokioExecutor::new())
            // The pool's timer reaps idle connections; without one they
            // would be closed only when taken from the pool.
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // The backend's Host comes from here alone: forward_headers
            // removes the client's.
            .set_host(true)
            // A request that was never written (its pooled connection closed
            // first) is sent again on another.
            .retry_canceled_requests(true)
            .build(connector);
        let authority = Authority::try_from(
            url[url::Position::BeforeHost..url::Position::AfterPort].as_bytes(),
        )
        .map_err(|e| format!("cannot use the backend's host and port: {e}"))?;
        let scheme = Scheme::try_from(url.scheme())
            .map_err(|e| format!("cannot use the backend's scheme: {e}"))?;
        let base_path = url.path().trim_end_matches('/').to_string();
        let limiter = (concurrency > 0).then(|| Limiter {
            all: Arc::new(Semaphore::new(concurrency)),
            background: Arc::new(Semaphore::new(concurrency.saturating_sub(1).max(1))),
        });
        Ok(Upstream {
            client,
            scheme,
            authority,
            base_path,
            timeout,
            limiter,
            in_flight: Arc::new(AtomicU64::new(0)),
            buffered: Arc::new(AtomicU64::new(0)),
            max_buffered,
        })
    }

    /// Waits for a slot to the backend, for `--upstream-timeout` at most
    /// (then a timeout, as if the backend had not answered); `None` when
    /// there is no cap.
    pub async fn permit(&self, priority: Priority) -> Result<Option<Permit>, UpstreamError> {
        let Some(limiter) = self.limiter.as_ref() else {
            return Ok(None);
        };
        let wait = async {
            let background = match priority {
                Priority::Client => None,
                Priority::Background => Arc::clone(&limiter.background).acquire_owned().await.ok(),
            };
            let all = Arc::clone(&limiter.all).acquire_owned().await.ok()?;
            Some(Permit {
                _all: all,
                _background: background,
            })
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(permit) => Ok(permit),
            Err(_) => Err(UpstreamError::new(
                UpstreamErrorKind::Busy,
                format!(
                    "no slot to the backend within {}ms (--upstream-concurrency)",
                    self.timeout.as_millis()
                ),
            )),
        }
    }

    /// Body bytes being read to store now.
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Requests in flight to the backend now (until their response head).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The backend URI for a target: the key's, byte for byte, after the
    /// base path (never normalised or re-encoded).
    fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let mut path = String::with_capacity(self.base_path.len() + path_and_query.len());
        path.push_str(&self.base_path);
        path.push_str(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(path)?)
            .build()
    }

    /// Sends a request and waits for the response head, within the timeout.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Option<RequestBody>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        // Every target was parsed as a URI's path and query when it was
        // received (or decoded from the fleet's stream), and the base path
        // is the url crate's encoding: this cannot fail short of a bug.
        let uri = self.uri_for(path_and_query).map_err(|e| {
            UpstreamError::new(
                UpstreamErrorKind::Protocol,
                format!("cannot build the backend request's target: {e}"),
            )
        })?;
        // Only an https backend may speak h2 (see the retry below).
        let retry = (body.is_none() && self.scheme == Scheme::HTTPS)
            .then(|| (method.clone(), uri.clone(), headers.clone()));
        let body = match body {
            Some(body) => Either::Right(body.0),
            None => Either::Left(Empty::new()),
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = crate::metrics::Decrement(Arc::clone(&self.in_flight));
        let exchange = async {
            let mut answer = self.client.request(request).await;
            // As reqwest did: an h2 backend that refused the stream or is
            // going away gracefully has not read the request; at most twice.
            if let Some((method, uri, headers)) = retry {
                for _ in 0..2 {
                    match &answer {
                        Err(err) if refused_unread(err) => {}
                        _ => break,
                    }
                    let mut again = Request::new(Either::Left(Empty::new()));
                    *again.method_mut() = method.clone();
                    *again.uri_mut() = uri.clone();
                    *again.headers_mut() = headers.clone();
                    answer = self.client.request(again).await;
                }
            }
            answer
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(response)) => Ok(UpstreamResponse(response)),
            Ok(Err(err)) => Err(upstream_error(&err)),
            Err(_) => Err(timed_out(self.timeout)),
        }
    }

    /// Reads a body to store it: whole if it fits in `limit` bytes, within the
    /// timeout; otherwise hands back what was read and the rest to stream.
    pub async fn read_body(
        &self,
        response: UpstreamResponse,
        limit: u64,
    ) -> Result<BodyRead, UpstreamError> {
        if response.content_length().is_some_and(|len| len > limit) {
            return Ok(BodyRead::TooLarge {
                prefix: Vec::new(),
                rest: response,
            });
        }
        let mut response = response;
        // Released when the read ends, whatever its outcome.
        let reserved = Reservation {
            bytes: Arc::clone(&self.buffered),
            held: 0,
        };
        let read = async {
            let mut reserved = reserved;
            let mut chunks: Vec<Bytes> = Vec::new();
            let mut total: u64 = 0;
            while let Some(frame) = response.0.body_mut().frame().await {
                let Ok(chunk) = frame.map_err(|e| body_error(&e))?.into_data() else {
                    continue; // trailers: an entry has no place for them
                };
                total += chunk.len() as u64;
                let fits = reserved.take(chunk.len() as u64, self.max_buffered);
                chunks.push(chunk);
                if total > limit {
                    return Ok(BodyRead::TooLarge {
                        prefix: chunks,
                        rest: response,
                    });
                }
                if !fits {
                    return Ok(BodyRead::NoRoom {
                        prefix: chunks,
                        rest: response,
                    });
                }
            }
            Ok(BodyRead::Complete(chunks))
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(self.timeout)),
        }
    }
}

/// Bytes reserved from [`Upstream::buffered`], given back on drop.
struct Reservation {
    bytes: Arc<AtomicU64>,
    held: u64,
}

impl Reservation {
    /// Reserves `more` bytes; `false` (and nothing reserved) when that would
    /// pass `max`.
    fn take(&mut self, more: u64, max: u64) -> bool {
        let reserved = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                now.checked_add(more).filter(|total| *total <= max)
            });
        if reserved.is_err() {
            return false;
        }
        self.held += more;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.bytes.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// A backend's response, its body not yet read: read it whole
/// ([`Upstream::read_body`]) or stream it ([`Upstream::stream_body`]).
pub struct UpstreamResponse(http::Response<Incoming>);

impl UpstreamResponse {
    pub fn status(&self) -> StatusCode {
        self.0.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.0.headers()
    }

    /// The body's length when the backend framed it with one.
    fn content_length(&self) -> Option<u64> {
        http_body::Body::size_hint(self.0.body()).exact()
    }
}

/// A request body to send to the backend: a client's body, streamed.
pub struct RequestBody(BoxBody<Bytes, BoxError>);

impl RequestBody {
    /// Its data only: a client's trailers are not forwarded, nor its size
    /// hint (the framing sent is the client's `Content-Length`, or chunked).
    pub fn stream<B>(body: B) -> RequestBody
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let data = BodyDataStream::new(body).map_err(Into::into);
        RequestBody(BodyExt::boxed(StreamBody::new(data.map_ok(Frame::data))))
    }
}

/// Classifies an error of the HTTP client.
fn upstream_error(err: &hyper_util::client::legacy::Error) -> UpstreamError {
    let kind = if caused_by_timeout(err) {
        UpstreamErrorKind::Timeout
    } else if err.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Protocol
    };
    UpstreamError::new(kind, crate::error::error_chain(err))
}

/// An error while reading a response body.
fn body_error(err: &hyper::Error) -> UpstreamError {
    let kind = if caused_by_timeout(err) {
        UpstreamErrorKind::Timeout
    } else {
        UpstreamErrorKind::Protocol
    };
    UpstreamError::new(kind, crate::error::error_chain(err))
}

/// Whether an HTTP/2 backend turned a request away before reading it
/// (`REFUSED_STREAM`, or a graceful `GOAWAY`), so it may be sent again.
fn refused_unread(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return h2.is_remote()
                && ((h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM)));
        }
        source = cause.source();
    }
    false
}

/// Whether an I/O timeout is among an error's sources: a connect timeout,
/// or the kernel's on a pooled connection whose keepalive probes failed.
fn caused_by_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn timed_out(after: Duration) -> UpstreamError {
    UpstreamError::new(
        UpstreamErrorKind::Timeout,
        format!("no answer within {}ms", after.as_millis()),
    )
}

impl Upstream {
    /// A body that sends `prefix` and then streams the rest of `response`,
    /// without buffering it. A backend that sends nothing for
    /// `--upstream-timeout` ends the body with an error (the client's
    /// connection is closed, never left with a truncated answer that looks
    /// whole), so a stalled backend cannot hold a socket and a client forever.
    pub fn stream_body(&self, prefix: Vec<Bytes>, response: UpstreamResponse) -> ProxyBody {
        let timeout = self.timeout;
        let rest = stream::unfold(
            Some(BodyDataStream::new(response.0.into_body())),
            move |state| async move {
                let mut body = state?;
                match tokio::time::timeout(timeout, body.next()).await {
                    Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
                    Ok(Some(Err(err))) => Some((Err(BoxError::from(err)), None)),
                    Ok(None) => None,
                    Err(_) => Some((Err(BoxError::from(timed_out(timeout))), None)),
                }
            },
        );
        let all = stream::iter(prefix.into_iter().map(Ok)).chain(rest);
        ProxyBody::Stream(BodyExt::boxed(StreamBody::new(all.map_ok(Frame::data))))
    }
}

/// Headers that concern one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those named in `Connection`
/// (a response's: the backend is trusted to name its own).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    strip_fixed_hop_by_hop(headers);
}

fn strip_fixed_hop_by_hop(headers: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Request headers that tell a backend where a request came from or what
/// it "really" is. A client can set any of them; a backend that builds
/// links, redirects or routes from them would answer differently for a
/// request whose cache key is the same, and that answer would be served to
/// everyone. So they are dropped unless the peer is trusted
/// (`--trust-forwarded`), and swr-proxy sets its own. Every header whose
/// name starts with `x-forwarded-` is dropped as well.
pub const FORWARDING_HEADERS: [&str; 25] = [
    "forwarded",
    "x-forwarded",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-script-name",
    "client-ip",
    "x-original-method",
    "x-envoy-original-path",
    // httpoxy: CGI backends turn it into HTTP_PROXY.
    "proxy",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-original-host",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-proxyuser-ip",
];

/// Whether a request header is one of [`FORWARDING_HEADERS`] or `x-forwarded-*`.
pub fn is_forwarding_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-forwarded-") || FORWARDING_HEADERS.contains(&name)
}

/// Request headers that frame a body. A request forwarded without the
/// client's body (a fill, a refresh, a coalesced follower, a HEAD fetched
/// as GET) must not carry them: a backend that reads by `Content-Length`
/// would take the next request on the pooled connection as this one's body.
const FRAMING: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::TRAILER,
];

/// How a client's request is forwarded to the backend.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The host the request is for, as in its cache key (sent as
    /// `X-Forwarded-Host`; empty for an HTTP/1.0 request without one).
    pub host: &'a str,
    /// The client's address (for `X-Forwarded-For`).
    pub client: Option<SocketAddr>,
    /// The client is a trusted proxy (`--trust-forwarded`): its
    /// forwarding headers are kept and appended to.
    pub trusted: bool,
    /// The client's body goes with the request (a pass-through). Otherwise
    /// none does, and neither does the client's framing.
    pub with_body: bool,
    /// Headers a route keys on: forwarded even when they are forwarding headers.
    pub keyed: &'a [HeaderName],
}

/// HTTP/2 clients may split `Cookie` into one field per cookie; an
/// HTTP/1.1 backend expects one, joined with `; ` (RFC 9113 §8.2.3).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The headers sent to the backend for a client's request.
///
/// - Hop-by-hop headers are removed. Names a client lists in `Connection`
///   are not honoured (as nginx does not): removing `Host`, a header a
///   route keys on, or one a response varies on would make the backend
///   answer differently for the same key.
/// - `Host` is removed (the client sets the backend's); the key's host
///   goes as `X-Forwarded-Host`.
/// - Forwarding headers from an untrusted client are removed, then
///   `X-Forwarded-For`, `-Host` and `-Proto` are set from what swr-proxy saw.
/// - Without the client's body, the client's framing is removed.
pub fn forward_headers(client_headers: &HeaderMap, how: &Forwarding<'_>) -> HeaderMap {
    let mut headers = client_headers.clone();
    strip_fixed_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    join_cookie_crumbs(&mut headers);
    if !how.with_body {
        for name in &FRAMING {
            headers.remove(name);
        }
    }
    if !how.trusted {
        let dropped: Vec<HeaderName> = headers
            .keys()
            .filter(|name| is_forwarding_header(name) && !how.keyed.contains(name))
            .cloned()
            .collect();
        for name in dropped {
            headers.remove(name);
        }
    }
    if let Some(addr) = how.client {
        let ip = addr.ip().to_canonical().to_string();
        let earlier = headers
            .get(X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .filter(|_| how.trusted);
        let value = match earlier {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip,
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    let keep = |headers: &HeaderMap, name: &HeaderName| how.trusted && headers.contains_key(name);
    if !keep(&headers, &X_FORWARDED_HOST) {
        match HeaderValue::from_str(how.host) {
            Ok(host) if !how.host.is_empty() => {
                headers.insert(X_FORWARDED_HOST, host);
            }
            _ => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    if !keep(&headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    headers
}

/// The headers of a backend response as sent to clients.
pub fn response_headers(upstream_headers: &HeaderMap) -> HeaderMap {
    let mut headers = upstream_headers.clone();
    strip_hop_by_hop(&mut headers);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-private-hop"),
        );
        h.insert("x-private-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    fn forwarding<'a>(trusted: bool, with_body: bool) -> Forwarding<'a> {
        Forwarding {
            host: "shop.example",
            client: Some("127.0.0.9:5000".parse().unwrap()),
            trusted,
            with_body,
            keyed: &[],
        }
    }

    #[test]
    fn forwarded_headers_are_set_from_what_the_proxy_saw() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("shop.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-prefix", HeaderValue::from_static("/evil"));
        h.insert("forwarded", HeaderValue::from_static("host=evil.example"));
        h.insert("x-original-url", HeaderValue::from_static("/admin"));
        let out = forward_headers(&h, &forwarding(false, true));
        assert!(!out.contains_key("host"));
        assert_eq!(out["x-forwarded-host"], "shop.example");
        assert_eq!(out["x-forwarded-for"], "127.0.0.9");
        assert_eq!(out["x-forwarded-proto"], "http");
        for gone in ["x-forwarded-prefix", "forwarded", "x-original-url"] {
            assert!(!out.contains_key(gone), "{gone} is dropped");
        }
        // From a trusted proxy, its values are kept and appended to.
        let out = forward_headers(&h, &forwarding(true, true));
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(out["x-forwarded-host"], "evil.example");
        assert_eq!(out["x-forwarded-prefix"], "/evil");
    }

    #[test]
    fn connection_cannot_remove_end_to_end_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("shop.example"));
        h.insert(
            "connection",
            HeaderValue::from_static("host, accept-language, x-forwarded-host"),
        );
        h.insert("accept-language", HeaderValue::from_static("fr"));
        let out = forward_headers(&h, &forwarding(false, true));
        assert_eq!(out["accept-language"], "fr");
        assert_eq!(out["x-forwarded-host"], "shop.example");
        assert!(!out.contains_key("connection"));
    }

    #[test]
    fn framing_goes_only_with_the_body() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("10"));
        h.insert("expect", HeaderValue::from_static("100-continue"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let out = forward_headers(&h, &forwarding(false, false));
        assert!(!out.contains_key("content-length"));
        assert!(!out.contains_key("expect"));
        assert!(!out.contains_key("transfer-encoding"));
        let out = forward_headers(&h, &forwarding(false, true));
        assert_eq!(out["content-length"], "10");
        assert!(!out.contains_key("transfer-encoding"));
    }

    #[test]
    fn buffered_bytes_never_pass_their_bound() {
        let shared = Arc::new(AtomicU64::new(0));
        let mut a = Reservation {
            bytes: Arc::clone(&shared),
            held: 0,
        };
        let mut b = Reservation {
            bytes: Arc::clone(&shared),
            held: 0,
        };
        assert!(a.take(600, 1000));
        assert!(
            !b.take(600, 1000),
            "two fills cannot hold more than the bound"
        );
        assert!(b.take(400, 1000));
        assert_eq!(shared.load(Ordering::Relaxed), 1000);
        drop(a);
        assert_eq!(
            shared.load(Ordering::Relaxed),
            400,
            "released with the read"
        );
        drop(b);
        assert_eq!(shared.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_client_waits_for_a_slot_no_longer_than_the_timeout() {
        let url = url::Url::parse("http://127.0.0.1:1").unwrap();
        let up = Upstream::new(&url, None, Duration::from_millis(100), 1, u64::MAX).unwrap();
        let held = up.permit(Priority::Client).await.unwrap();
        let waited = up.permit(Priority::Client).await;
        assert!(matches!(waited, Err(ref e) if e.kind == UpstreamErrorKind::Busy));
        drop(held);
    }

    #[tokio::test]
    async fn refreshes_never_take_the_last_slot() {
        let url = url::Url::parse("http://127.0.0.1:1").unwrap();
        let up = Upstream::new(&url, None, Duration::from_secs(1), 3, u64::MAX).unwrap();
        let mut refreshes = Vec::new();
        for _ in 0..2 {
            refreshes.push(up.permit(Priority::Background).await.unwrap().unwrap());
        }
        // A third refresh waits, though a slot is free...
        let third =
            tokio::time::timeout(Duration::from_millis(50), up.permit(Priority::Background));
        assert!(third.await.is_err());
        // ...which a client takes at once.
        let client = tokio::time::timeout(Duration::from_millis(50), up.permit(Priority::Client));
        assert!(client.await.is_ok());
    }

    /// An error whose source is `cause`, as hyper-util wraps its causes.
    #[derive(Debug)]
    struct Wrapped(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn timeouts_and_refusals_are_told_apart_by_their_causes() {
        use std::io::{Error, ErrorKind};
        let timed_out = Wrapped(Box::new(Error::new(ErrorKind::TimedOut, "connect")));
        let refused = Wrapped(Box::new(Error::from(ErrorKind::ConnectionRefused)));
        assert!(caused_by_timeout(&timed_out));
        assert!(!caused_by_timeout(&refused));
        // Only the backend's own refusal may be retried: not our reset, nor
        // an I/O error.
        let ours = Wrapped(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert!(!refused_unread(&ours));
        assert!(!refused_unread(&refused));
    }

    #[tokio::test]
    async fn a_backend_that_stalls_its_tls_handshake_times_the_connect_out() {
        use tower_service::Service;
        let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = mute.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((socket, _)) = mute.accept().await {
                kept.push(socket);
            }
        });
        let mut connect = TimedConnect::new(None, Duration::from_millis(200)).unwrap();
        let uri: Uri = format!("https://{addr}/").parse().unwrap();
        // Without the limit, the handshake waits for as long as the socket is open.
        let connected = tokio::time::timeout(Duration::from_secs(20), connect.call(uri))
            .await
            .expect("the connect's own limit ends it");
        held.abort();
        let err = connected.expect_err("no TLS from a mute backend");
        assert!(caused_by_timeout(&*err), "{err}");
    }

    #[test]
    fn uris_join_base_path() {
        let up = |base| {
            Upstream::new(
                &url::Url::parse(base).unwrap(),
                None,
                Duration::from_secs(1),
                0,
                u64::MAX,
            )
            .unwrap()
        };
        let api = up("http://127.0.0.1:1/api/");
        assert_eq!(
            api.uri_for("/x?y=1").unwrap(),
            "http://127.0.0.1:1/api/x?y=1"
        );
        // Not normalised, nor re-encoded (the proxy answers 400 to a target
        // with dot segments before it gets here; uri_for keeps any byte).
        assert_eq!(
            api.uri_for("/a/../b/%2e?q=%zz").unwrap(),
            "http://127.0.0.1:1/api/a/../b/%2e?q=%zz"
        );
        let root = up("https://Backend.internal:8443");
        assert_eq!(root.uri_for("/").unwrap(), "https://backend.internal:8443/");
        let ipv6 = up("http://[::1]:80/");
        assert_eq!(ipv6.uri_for("/v").unwrap(), "http://[::1]/v");
    }
}
