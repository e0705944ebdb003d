//! Plain HTTP/1.1 `GET`s answered straight from the socket: hits from the
//! entry, the rest with hyper's path's own answer; every other request
//! handed to hyper with its connection.
//!
//! A hit is a lookup and one write, and on this path what hyper does
//! per request (a header map for the request and one for the answer, the
//! service call, encoding the map again) is most of the CPU a hit spends
//! beyond the kernel's (BENCHMARKS.md, `limit-raw`). So a connection starts
//! here: each request head is parsed with httparse, the parser hyper uses,
//! with hyper's settings, and a `GET` that asks the cache for nothing but
//! its entry is answered with the entry's stored head and body in one
//! `writev`.
//!
//! A plain `GET` the cache cannot answer at once (a miss, a pass, a route
//! that shapes the key, ...) is answered by [`Proxy::handle`], the function
//! hyper's service calls, with the request hyper would give it. When that
//! answer's body is in one piece and hyper would frame it by its length
//! (a stored or buffered answer, a local error), it is written here as
//! hyper writes it ([`write_response`]) and the connection stays here: a
//! keep-alive connection that meets a miss keeps its fast hits
//! (BENCHMARKS.md, "Keep-alive hits that meet misses"). An answer that
//! streams, or whose head hyper must frame (204, 304, `Connection`, ...),
//! goes to hyper with the connection and the request's bytes: hyper reads
//! the request again and answers it with that answer ([`Early`]), so the
//! backend is never asked twice.
//!
//! The first request that is anything else goes to hyper, with the bytes
//! read so far, and hyper serves the connection from then on: another
//! method, HTTP/1.0, a body (`Content-Length`, `Transfer-Encoding`),
//! `Expect`, `Upgrade`, `Connection` other than `keep-alive`, a conditional
//! or range, no `Host`, a second one or one that is not a `host[:port]`
//! (hyper's path answers those 400), a head httparse rejects or longer than
//! [`MAX_HEAD`], HTTP/2's preface. So this module reads no request body and
//! decides nothing about an ambiguous request: the requests it answers
//! carry no body, and a request it declines costs only the fast path, never
//! the answer.
//!
//! A connection stays with hyper once handed over (hyper owns it from
//! then on).

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use crate::server::ClientStream;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::Empty;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::ProxyBody;
use crate::cache::key::{valid_host, valid_target};
use crate::config::HeadLimits;
use crate::connections::{Busy, Control, Graceful};
use crate::proxy::{self, FastHit, Proxy};
use crate::upstream::BoxError;

/// The read buffer a connection starts with.
const READ_BUFFER: usize = 4 * 1024;
/// A request head longer than this goes to hyper (whose limit is larger).
pub const MAX_HEAD: usize = 16 * 1024;
/// A request with more headers goes to hyper (whose limit is 100).
const MAX_HEADERS: usize = 32;

/// A connection served here until a request needs hyper; then by the
/// connection `handoff` makes.
pub struct FastConnection<F, C> {
    state: State<C>,
    handoff: Option<F>,
    shutting_down: bool,
}

enum State<C> {
    Direct(Box<Direct>),
    Hyper(Pin<Box<C>>),
    Done,
}

impl<F, C> FastConnection<F, C>
where
    F: FnOnce(Prefixed, Option<Early>) -> C,
{
    /// Serves plain `GET`s on `stream` for `proxy` (hits from the entry, the
    /// rest with [`Proxy::handle`]'s answer), each counted on `control` as a
    /// request in progress until its answer is written.
    pub fn new(
        stream: ClientStream,
        peer: SocketAddr,
        proxy: Arc<Proxy>,
        control: Arc<Control>,
        handoff: F,
    ) -> FastConnection<F, C> {
        FastConnection {
            state: State::Direct(Box::new(Direct {
                stream,
                peer,
                proxy,
                control,
                buf: vec![0; READ_BUFFER],
                start: 0,
                filled: 0,
                head: Vec::with_capacity(512),
                body: Bytes::new(),
                sent: 0,
                busy: None,
                waiting: None,
            })),
            handoff: Some(handoff),
            shutting_down: false,
        }
    }

    /// Hands `stream` to hyper at once.
    pub fn hyper_only(stream: ClientStream, handoff: F) -> FastConnection<F, C> {
        FastConnection {
            state: State::Hyper(Box::pin(handoff(
                Prefixed {
                    prefix: Bytes::new(),
                    stream,
                },
                None,
            ))),
            handoff: None,
            shutting_down: false,
        }
    }
}

impl<F, C, E> Future for FastConnection<F, C>
where
    F: FnOnce(Prefixed, Option<Early>) -> C + Unpin,
    C: Future<Output = Result<(), E>> + Graceful,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Direct(direct) => match ready!(direct.poll(cx, this.shutting_down)) {
                    Ok(Step::Close) => {
                        this.state = State::Done;
                        return Poll::Ready(Ok(()));
                    }
                    Err(err) => {
                        this.state = State::Done;
                        return Poll::Ready(Err(err.into()));
                    }
                    Ok(Step::Hyper(early)) => {
                        let state = std::mem::replace(&mut this.state, State::Done);
                        let (State::Direct(direct), Some(handoff)) = (state, this.handoff.take())
                        else {
                            return Poll::Ready(Ok(()));
                        };
                        let connection = handoff((*direct).into_prefixed(), early);
                        this.state = State::Hyper(Box::pin(connection));
                    }
                },
                State::Hyper(connection) => {
                    return connection.as_mut().poll(cx).map_err(Into::into);
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<F, C> Graceful for FastConnection<F, C>
where
    F: Unpin,
    C: Graceful,
{
    /// Here: the answer being written is finished, then the connection
    /// closes (a request head only partly read is dropped, as nginx drops
    /// an idle keep-alive connection at shutdown); an answer still being
    /// made says `Connection: close`, as hyper's does, and hyper writes it.
    /// In hyper: hyper's own.
    fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        this.shutting_down = true;
        if let State::Hyper(connection) = &mut this.state {
            connection.as_mut().graceful_shutdown();
        }
    }
}

/// What the direct loop stopped for.
enum Step {
    /// The client closed the connection, or shutdown asked to.
    Close,
    /// A request hyper must serve, and its answer when hyper's path gave
    /// it already (see [`Early`]).
    Hyper(Option<Early>),
}

/// What the next buffered request is.
enum Parsed {
    /// A request taken here: a hit, whose answer is ready to write, or one
    /// whose answer hyper's path is making (`Direct::waiting`).
    Taken,
    /// Its head has not all arrived.
    Partial,
    /// One for hyper.
    Hyper,
}

/// The connection while served here.
struct Direct {
    stream: ClientStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    control: Arc<Control>,
    /// Bytes read: `start..filled` are not yet parsed.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// The answer being written: `head`, then `body`; `sent` bytes so far.
    head: Vec<u8>,
    body: Bytes,
    sent: usize,
    /// Held from a request's head to the end of its answer's write.
    busy: Option<Busy>,
    /// The answer hyper's path is making for the request at `start`.
    waiting: Option<Waiting>,
}

impl Direct {
    fn poll(&mut self, cx: &mut Context<'_>, shutting_down: bool) -> Poll<io::Result<Step>> {
        loop {
            if let Some(waiting) = &mut self.waiting {
                let polled = Pin::new(&mut waiting.answer).poll(cx);
                let end = self.start + waiting.len;
                let Poll::Ready(mut response) = polled else {
                    // As hyper does with a request in flight and nothing
                    // read after it: a client that closes its side ends the
                    // connection, and the request's work (a pass's backend
                    // request; a fill runs on for its other waiters).
                    if self.filled == end && ready!(self.poll_gone(cx))? {
                        return Poll::Ready(Ok(Step::Close));
                    }
                    return Poll::Pending;
                };
                let Some(Waiting { len, target, .. }) = self.waiting.take() else {
                    continue;
                };
                if shutting_down {
                    // The connection closes after this answer: hyper says
                    // so in it, and writes it (`Connection` is hyper's).
                    close_after(response.headers_mut());
                }
                match write_response(&mut self.head, &response) {
                    Some(body) => {
                        self.body = body;
                        self.start += len;
                    }
                    None => {
                        // The request stays in the buffer for hyper to read
                        // again; its answer goes with it.
                        let early = self.busy.take().map(|busy| Early {
                            response,
                            busy,
                            target,
                        });
                        return Poll::Ready(Ok(Step::Hyper(early)));
                    }
                }
            }
            if self.busy.is_some() {
                ready!(self.poll_write(cx))?;
                self.busy = None;
                self.head.clear();
                self.body = Bytes::new();
                self.sent = 0;
            }
            if shutting_down {
                return Poll::Ready(Ok(Step::Close));
            }
            if self.start < self.filled {
                match self.next_request() {
                    Parsed::Taken => continue,
                    Parsed::Partial => {}
                    Parsed::Hyper => return Poll::Ready(Ok(Step::Hyper(None))),
                }
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.filled, 0);
                self.filled -= self.start;
                self.start = 0;
            }
            if self.filled == self.buf.len() {
                if self.buf.len() >= MAX_HEAD {
                    return Poll::Ready(Ok(Step::Hyper(None)));
                }
                self.buf.resize(MAX_HEAD, 0);
            }
            let mut read = ReadBuf::new(&mut self.buf[self.filled..]);
            ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                // The client is done; a head it left unfinished gets no answer.
                return Poll::Ready(Ok(Step::Close));
            }
            self.filled += n;
        }
    }

    /// Parses the next buffered request and, for a hit, prepares its
    /// answer; for another plain `GET`, starts hyper's path's answer.
    fn next_request(&mut self) -> Parsed {
        let bytes = &self.buf[self.start..self.filled];
        match answer(&self.proxy, bytes, self.peer, &mut self.head) {
            Answer::Ready { len, body } => {
                self.busy = Some(self.control.begin());
                self.body = body;
                self.start += len;
                Parsed::Taken
            }
            Answer::Later {
                len,
                target,
                answer,
            } => {
                self.busy = Some(self.control.begin());
                self.waiting = Some(Waiting {
                    answer,
                    len,
                    target,
                });
                Parsed::Taken
            }
            Answer::Partial => Parsed::Partial,
            Answer::Hyper => Parsed::Hyper,
        }
    }

    /// Reads what the client sends while its request's answer is being
    /// made: `true` when it has closed its side. Bytes read (the next
    /// request) are kept; the buffer grows to [`MAX_HEAD`] at most, and a
    /// full one is not read.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.filled == self.buf.len() {
            if self.buf.len() >= MAX_HEAD {
                return Poll::Ready(Ok(false));
            }
            self.buf.resize(MAX_HEAD, 0);
        }
        let mut read = ReadBuf::new(&mut self.buf[self.filled..]);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.filled += n;
        Poll::Ready(Ok(n == 0))
    }

    /// Writes the rest of the answer.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let total = self.head.len() + self.body.len();
        while self.sent < total {
            let (head, body) = if self.sent < self.head.len() {
                (&self.head[self.sent..], &self.body[..])
            } else {
                (&[][..], &self.body[self.sent - self.head.len()..])
            };
            let slices = [IoSlice::new(head), IoSlice::new(body)];
            let n = ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        Poll::Ready(Ok(()))
    }

    /// The stream for hyper, with the bytes read and not yet answered.
    fn into_prefixed(self) -> Prefixed {
        self.proxy.stats().fast_handoffs.inc();
        let Direct {
            stream,
            buf,
            start,
            filled,
            ..
        } = self;
        Prefixed {
            prefix: Bytes::copy_from_slice(&buf[start..filled]),
            stream,
        }
    }
}

/// A request whose answer hyper's path is making.
struct Waiting {
    answer: proxy::Answer,
    /// The request's length in the buffer.
    len: usize,
    /// The request's target, for [`Early::target`].
    target: Box<str>,
}

/// What [`answer`] makes of the bytes at the start of a connection's buffer.
pub enum Answer {
    /// A hit: its head is written, this is its body, and the request took
    /// `len` bytes.
    Ready { len: usize, body: Bytes },
    /// A plain `GET` the cache cannot answer at once (a miss, a pass, ...):
    /// `answer` is what hyper's path answers it with ([`Proxy::handle`]),
    /// the request took `len` bytes, and `target` is its target (as
    /// written).
    Later {
        len: usize,
        target: Box<str>,
        answer: proxy::Answer,
    },
    /// The request head has not all arrived.
    Partial,
    /// The request is hyper's.
    Hyper,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Ready { len, body } => f
                .debug_struct("Ready")
                .field("len", len)
                .field("body", &body.len())
                .finish(),
            Answer::Later { len, .. } => f.debug_struct("Later").field("len", len).finish(),
            Answer::Partial => f.write_str("Partial"),
            Answer::Hyper => f.write_str("Hyper"),
        }
    }
}

/// The answer to the first request of a connection handed to hyper, made
/// by hyper's path while the fast path held the connection: hyper reads
/// the request again, and its service answers with this instead of asking
/// the backend a second time. The request stays counted in progress
/// (`busy`) until the answer's body ends.
pub struct Early {
    /// Hyper's path's answer to the request, not yet written.
    pub response: Response<ProxyBody>,
    /// The request counted in progress since the fast path read its head.
    pub busy: Busy,
    /// The request's target as its `Uri` has it (as hyper's does), to
    /// check the request hyper reads is the one.
    pub target: Box<str>,
}

/// Parses the request head at the start of `bytes` and, when it is a plain
/// `GET` the cache answers at once, appends the answer's head to `head` and
/// returns its body (shared with the entry): all the work of a fast hit but
/// the socket's. Another plain `GET` gets hyper's path's answer, to come
/// ([`Answer::Later`]), with nothing written to `head`.
pub fn answer(proxy: &Arc<Proxy>, bytes: &[u8], peer: SocketAddr, head: &mut Vec<u8>) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Answer::Partial,
        Err(_) => return Answer::Hyper,
    };
    let Some(plain) = PlainGet::of(&request, proxy.limits()) else {
        return Answer::Hyper;
    };
    let client_headers = || client_headers(request.headers);
    let Some(hit) = proxy.fast_hit(
        plain.host,
        plain.target,
        plain.directives,
        peer,
        client_headers,
    ) else {
        let Some(request) = hyper_request(&request, plain.target) else {
            return Answer::Hyper;
        };
        // As hyper's `Uri` has it (a fragment dropped), which is what
        // `take_early` compares with the request hyper reads again.
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .into();
        return Answer::Later {
            len,
            target,
            answer: proxy.handle(request, Some(peer)),
        };
    };
    proxy.stats().fast_hits.add(1);
    write_head(head, &hit);
    Answer::Ready {
        len,
        body: hit.entry.body(),
    }
}

/// A request this module may answer: `GET` of an origin-form target over
/// HTTP/1.1, one `Host`, nothing that frames a body or asks for more than
/// the entry.
struct PlainGet<'a> {
    host: &'a str,
    target: &'a str,
    /// Carries Cache-Control or Pragma (which count with
    /// `--honor-client-cache-control`).
    directives: bool,
}

impl<'a> PlainGet<'a> {
    /// `None` for a request hyper's path must serve, including every one
    /// it refuses (past `limits`, a bad host or target).
    fn of(request: &httparse::Request<'_, 'a>, limits: HeadLimits) -> Option<PlainGet<'a>> {
        if request.method != Some("GET") || request.version != Some(1) {
            return None;
        }
        let target = request
            .path
            .filter(|t| t.starts_with('/') && valid_target(t))?;
        let fields = request
            .headers
            .iter()
            .map(|h| (h.name.len(), h.value.len()));
        limits.check(target.len(), fields).ok()?;
        let mut host = None;
        let mut directives = false;
        for header in request.headers.iter() {
            let name = header.name.as_bytes();
            if name.eq_ignore_ascii_case(b"host") {
                if host.is_some() {
                    return None;
                }
                // Only a `host[:port]` (ASCII, so text); anything else is
                // hyper's path's to refuse with a 400.
                if !valid_host(header.value) {
                    return None;
                }
                host = Some(std::str::from_utf8(header.value).ok()?);
            } else if name.eq_ignore_ascii_case(b"connection") {
                if !header.value.eq_ignore_ascii_case(b"keep-alive") {
                    return None;
                }
            } else if name.eq_ignore_ascii_case(b"cache-control")
                || name.eq_ignore_ascii_case(b"pragma")
            {
                directives = true;
            } else if HYPER_ONLY.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                return None;
            }
        }
        Some(PlainGet {
            host: host?,
            target,
            directives,
        })
    }
}

/// Request headers that send a request to hyper: they frame a body, change
/// the connection, or ask the cache for something other than the entry.
const HYPER_ONLY: [&[u8]; 13] = [
    b"content-length",
    b"transfer-encoding",
    b"expect",
    b"upgrade",
    b"te",
    b"http2-settings",
    b"keep-alive",
    b"range",
    b"if-range",
    b"if-none-match",
    b"if-modified-since",
    b"if-match",
    b"if-unmodified-since",
];

/// The head of a hit's answer, as hyper would write it for
/// `Proxy::entry_response`'s: the stored headers with `Age`, `X-Cache` and
/// `Cache-Status` set (`HeaderMap::insert`: in the place of a stored one,
/// its other values dropped; else after the rest), and `Date` unless
/// stored.
fn write_head(out: &mut Vec<u8>, hit: &FastHit) {
    let status = hit.entry.status();
    status_line(out, status);
    let set: [(&[u8], &[u8]); 3] = [
        (b"age", hit.age.as_bytes()),
        (b"x-cache", hit.status.as_str().as_bytes()),
        (b"cache-status", hit.cache_status.as_bytes()),
    ];
    let mut written = [false; 3];
    let mut dated = false;
    for (name, value) in hit.entry.wire_headers() {
        if let Some(i) = set.iter().position(|(set_name, _)| *set_name == name) {
            if !written[i] {
                written[i] = true;
                header_line(out, name, set[i].1);
            }
            continue;
        }
        dated |= name == b"date";
        header_line(out, name, &value);
    }
    for ((name, value), written) in set.iter().zip(written) {
        if !written {
            header_line(out, name, value);
        }
    }
    if !dated {
        DATE.with(|date| header_line(out, b"date", &date.now()));
    }
    out.extend_from_slice(b"\r\n");
}

/// `request` as hyper hands it to its service: `GET` of `target` over
/// HTTP/1.1 with every header field in order and no body. `None` when a
/// field is one `http` refuses (none that httparse accepts is known), so
/// that hyper's own reading decides.
fn hyper_request(
    request: &httparse::Request<'_, '_>,
    target: &str,
) -> Option<Request<Empty<Bytes>>> {
    let mut built = Request::new(Empty::new());
    *built.uri_mut() = target.parse().ok()?;
    let headers = built.headers_mut();
    headers.reserve(request.headers.len());
    for field in request.headers.iter() {
        let (name, value) = header_field(field)?;
        headers.append(name, value);
    }
    Some(built)
}

/// Appends `response`'s head to `out` exactly as hyper's HTTP/1.1 server
/// writes it to a keep-alive `GET` (status line with the canonical reason,
/// fields in the map's order with lower-case names, then `Content-Length`
/// and `Date` when the map has none) and returns its body, when the body is
/// in one piece and hyper would frame it by its length alone
/// ([`framed_by_length`]). `None`, with nothing written, for everything
/// else, which hyper writes.
fn write_response(out: &mut Vec<u8>, response: &Response<ProxyBody>) -> Option<Bytes> {
    let ProxyBody::Full(body) = response.body() else {
        return None;
    };
    let length = body.len().to_string();
    if !framed_by_length(response, &length) {
        return None;
    }
    status_line(out, response.status());
    // An empty body's length is written last (hyper leaves out the field
    // and adds its own); a longer one's where the map has it, once.
    let mut length_written = false;
    let mut dated = false;
    for (name, value) in response.headers() {
        if *name == header::CONTENT_LENGTH {
            if body.is_empty() || length_written {
                continue;
            }
            length_written = true;
        }
        dated |= *name == header::DATE;
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !length_written {
        header_line(out, b"content-length", length.as_bytes());
    }
    if !dated {
        DATE.with(|date| header_line(out, b"date", &date.now()));
    }
    out.extend_from_slice(b"\r\n");
    Some(body.clone())
}

/// Whether hyper's HTTP/1.1 server frames `response`, whose whole body is
/// `length` bytes (in decimal), by that length alone, with the head
/// [`write_response`] writes. Not: a status with no body (1xx, 204, 304),
/// a `Connection`, `Transfer-Encoding` or `Trailer` field, a
/// `Content-Length` that is not `length` written plainly, a version other
/// than HTTP/1.1, a custom reason phrase.
fn framed_by_length(response: &Response<ProxyBody>, length: &str) -> bool {
    let status = response.status();
    let plain = |(name, value): (&HeaderName, &HeaderValue)| {
        *name != header::CONNECTION
            && *name != header::TRANSFER_ENCODING
            && *name != header::TRAILER
            && (*name != header::CONTENT_LENGTH || value.as_bytes() == length.as_bytes())
    };
    response.version() == Version::HTTP_11
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
        && response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .is_none()
        && response.headers().iter().all(plain)
}

/// What hyper does to an answer written once its connection is told to
/// finish (keep-alive disabled): adds `Connection: close`, unless a
/// `Connection` field says it already. Hyper, given it, writes it in that
/// place and closes the connection after the answer's body.
fn close_after(headers: &mut HeaderMap) {
    let says_close = headers.get_all(header::CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    if !says_close {
        headers.append(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The request's headers as hyper's path has them, for a refresh to send on.
fn client_headers(headers: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    // A field hyper keeps but `http` refuses (none is known) would be left
    // out of the refresh only.
    for (name, value) in headers.iter().filter_map(header_field) {
        map.append(name, value);
    }
    map
}

/// A header field as `http` has it; `None` for one it refuses (httparse
/// checked the name and the value: none it accepts is known).
fn header_field(field: &httparse::Header<'_>) -> Option<(HeaderName, HeaderValue)> {
    let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
    Some((name, HeaderValue::from_bytes(field.value).ok()?))
}

/// An HTTP/1.1 status line as hyper writes it: the canonical reason, or
/// `<none>` for a status that has none.
#[inline]
fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[inline]
fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    static DATE: CachedDate = const { CachedDate::new() };
}

/// The `Date` value of the current second, formatted once per second per
/// thread (as hyper does).
struct CachedDate {
    second: std::cell::Cell<u64>,
    text: std::cell::Cell<[u8; 29]>,
}

impl CachedDate {
    const fn new() -> CachedDate {
        CachedDate {
            second: std::cell::Cell::new(u64::MAX),
            text: std::cell::Cell::new([b' '; 29]),
        }
    }

    fn now(&self) -> [u8; 29] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second.get() {
            let text = httpdate::fmt_http_date(now);
            let mut bytes = [b' '; 29];
            let len = text.len().min(bytes.len());
            bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
            self.text.set(bytes);
            self.second.set(second);
        }
        self.text.get()
    }
}

/// A stream that reads `prefix` (bytes read before hyper took over) before
/// the socket; writes go straight to the socket, vectored.
pub struct Prefixed {
    prefix: Bytes,
    stream: ClientStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `PlainGet::of` makes of a request head: `Some((host, target,
    /// directives))`, or `None` for hyper.
    fn plain(head: &str) -> Option<(String, String, bool)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(head.as_bytes()) {
            Ok(httparse::Status::Complete(_)) => {}
            other => panic!("{head:?} parses: {other:?}"),
        }
        PlainGet::of(
            &request,
            HeadLimits {
                line: 8 << 10,
                headers: 32 << 10,
            },
        )
        .map(|p| (p.host.to_string(), p.target.to_string(), p.directives))
    }

    #[test]
    fn plain_gets_and_the_rest() {
        let answered = |head: &str| plain(head).is_some();
        assert_eq!(
            plain("GET /a?b=1 HTTP/1.1\r\nHost: Example:8080\r\nAccept: */*\r\n\r\n"),
            Some(("Example:8080".into(), "/a?b=1".into(), false))
        );
        assert_eq!(
            plain(
                "GET / HTTP/1.1\r\nhost: h\r\nConnection: Keep-Alive\r\nPragma: no-cache\r\n\r\n"
            ),
            Some(("h".into(), "/".into(), true))
        );
        for head in [
            "HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: hé\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nTRANSFER-ENCODING: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nIf-None-Match: \"x\"\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
        ] {
            assert!(!answered(head), "{head:?} goes to hyper");
        }
    }

    #[test]
    fn the_date_is_an_http_date() {
        let date = CachedDate::new().now();
        let text = std::str::from_utf8(&date).expect("ascii");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text:?}");
    }
}
