//! The fast path's head parser and answer: `fast_hits::answer` over
//! arbitrary bytes, against a proxy holding a few entries (fresh, stale, a
//! 404, a varying one, a 204) under two hosts.
//!
//! Besides "no panic", what it checks of each answer:
//! - `Partial` only for a head httparse calls partial; nothing written
//!   unless `Ready`;
//! - `Later` (hyper's path's answer, made and not awaited here) only for a
//!   `GET` httparse parses whole, of that length;
//! - `Ready` only for a head httparse parses whole, of that length, as a
//!   `GET` over HTTP/1.1 of an origin-form target `valid_target` accepts,
//!   with exactly one `Host` that `valid_host` accepts and none of the
//!   fields that frame a body or ask for more than the entry; its body is
//!   the stored one of that host and target, its head a whole response
//!   head of the stored status with one `Content-Length`, the body's;
//! - hyper's path (`Proxy::handle` behind hyper's HTTP/1 server), given the
//!   same bytes, answers with the same status and body from the cache: the
//!   fast path never answers what hyper's path would refuse or fetch;
//! - the head without its last byte is never answered.

#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use swr_proxy::cache::key::{valid_host, valid_target};
use swr_proxy::config::{Config, Settings};
use swr_proxy::fast_hits::{self, Answer};
use swr_proxy::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PEER: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
    40000,
);

/// The hosts the entries are stored under.
const HOSTS: [&str; 2] = ["h", "fuzz.example:8080"];

/// What the origin answers, by path and query: status, Cache-Control,
/// Vary, body.
const OBJECTS: [(&str, u16, &str, &str, &str); 6] = [
    ("/a", 200, "max-age=86400", "", "alpha"),
    (
        "/b?x=1",
        200,
        "max-age=0, stale-while-revalidate=31536000",
        "",
        "bravo",
    ),
    ("/c", 404, "max-age=86400", "", "not here"),
    ("/v", 200, "max-age=86400", "accept-encoding", "varies"),
    ("/n", 204, "max-age=86400", "", ""),
    ("/%7Eu/x;p?q=%20&r", 200, "max-age=86400", "", "odd"),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    _cancel: CancellationToken,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let cancel = CancellationToken::new();
        let proxy = runtime.block_on(async {
            let upstream = origin().await;
            let config = Config::from_args(
                &Settings::default(),
                Some(upstream.parse().expect("url")),
                Duration::from_secs(10),
            )
            .expect("config");
            let proxy = Proxy::start(config, cancel.clone(), &TaskTracker::new()).expect("proxy");
            for host in HOSTS {
                for (path, status, ..) in OBJECTS {
                    let request = Request::get(path)
                        .header("host", host)
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let response = proxy.handle(request, None).await;
                    assert_eq!(response.status().as_u16(), status, "warming {host}{path}");
                }
            }
            proxy
        });
        let mut head = Vec::new();
        let warm = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(
            matches!(
                fast_hits::answer(&proxy, warm, PEER, &mut head),
                Answer::Ready { .. }
            ),
            "the fixture's entries are answered by the fast path"
        );
        Fixture {
            runtime,
            proxy,
            _cancel: cancel,
        }
    })
}

/// The origin: answers `OBJECTS` with validators, on 127.0.0.1; its URL.
async fn origin() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(|request: Request<Incoming>| async move {
                let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
                let (status, cache_control, vary, body) = OBJECTS
                    .iter()
                    .find(|o| o.0 == target)
                    .map_or((404, "no-store", "", ""), |o| (o.1, o.2, o.3, o.4));
                let mut response = Response::builder()
                    .status(status)
                    .header("cache-control", cache_control)
                    .header("etag", "\"e1\"")
                    .header("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT");
                if !vary.is_empty() {
                    response = response.header("vary", vary);
                }
                Ok::<_, Infallible>(
                    response
                        .body(Full::new(Bytes::from_static(body.as_bytes())))
                        .expect("response"),
                )
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{addr}")
}

/// What hyper's path answers to `request` (one whole request head): the
/// status, the `X-Cache` value and the body.
async fn through_hyper(proxy: &Arc<Proxy>, request: &[u8]) -> (u16, String, Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let handler = Arc::clone(proxy);
    let service = service_fn(move |request| {
        let answer = handler.handle(request, Some(PEER));
        async move { Ok::<_, Infallible>(answer.await) }
    });
    // Half-close: the client has sent all it will, and still reads the answer.
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .half_close(true)
        .max_buf_size(proxy.limits().buffer())
        .serve_connection(TokioIo::new(server), service);
    let task = tokio::spawn(connection);
    client.write_all(request).await.expect("write");
    client.shutdown().await.expect("shutdown");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
        .await
        .expect("hyper's path answers and closes")
        .expect("read");
    task.abort();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = response.parse(&out) else {
        panic!("hyper's path wrote no whole response: {out:?}");
    };
    let x_cache = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("x-cache"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .unwrap_or_default();
    let length = content_length(response.headers).unwrap_or(0);
    let body = out[head_len..].get(..length).unwrap_or(&out[head_len..]);
    (response.code.unwrap_or(0), x_cache, body.to_vec())
}

/// The value of the one `Content-Length` field; `None` unless exactly one.
fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    let mut values = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let one = values.next()?;
    if values.next().is_some() {
        return None;
    }
    std::str::from_utf8(one.value).ok()?.parse().ok()
}

/// Request fields a fast hit never has.
const NEVER_ANSWERED: [&str; 13] = [
    "content-length",
    "transfer-encoding",
    "expect",
    "upgrade",
    "te",
    "http2-settings",
    "keep-alive",
    "range",
    "if-range",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
];

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let _runtime = fixture.runtime.enter();
    let proxy = &fixture.proxy;
    let mut head = Vec::new();
    let answer = fast_hits::answer(proxy, data, PEER, &mut head);

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(data);
    let (len, body) = match answer {
        Answer::Partial => {
            assert!(
                matches!(parsed, Ok(httparse::Status::Partial)),
                "{parsed:?}"
            );
            assert!(head.is_empty());
            return;
        }
        Answer::Hyper => {
            assert!(head.is_empty());
            return;
        }
        Answer::Later { len, .. } => {
            assert_eq!(parsed, Ok(httparse::Status::Complete(len)));
            assert_eq!(request.method, Some("GET"));
            assert!(head.is_empty());
            return;
        }
        Answer::Ready { len, body } => (len, body),
    };

    // The request: a plain GET, parsed whole.
    assert_eq!(parsed, Ok(httparse::Status::Complete(len)));
    assert_eq!(request.method, Some("GET"));
    assert_eq!(request.version, Some(1));
    let target = request.path.expect("a target");
    assert!(
        target.starts_with('/') && valid_target(target),
        "{target:?}"
    );
    let hosts: Vec<&[u8]> = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value)
        .collect();
    assert_eq!(hosts.len(), 1, "one Host");
    assert!(valid_host(hosts[0]), "{:?}", hosts[0]);
    for field in request.headers.iter() {
        let name = field.name.to_ascii_lowercase();
        assert!(!NEVER_ANSWERED.contains(&name.as_str()), "{name} answered");
        if name == "connection" {
            assert!(field.value.eq_ignore_ascii_case(b"keep-alive"));
        }
    }

    // The answer: the entry of that host and target.
    let host = std::str::from_utf8(hosts[0])
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(HOSTS.contains(&host.as_str()), "{host:?} has no entries");
    let (_, status, _, _, stored) = OBJECTS
        .iter()
        .find(|o| o.0 == target)
        .unwrap_or_else(|| panic!("{target:?} has no entry"));
    assert_eq!(&body[..], stored.as_bytes());
    let mut response_headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut response_headers);
    assert_eq!(
        response.parse(&head),
        Ok(httparse::Status::Complete(head.len())),
        "a whole response head"
    );
    assert_eq!(response.code, Some(*status));
    assert_eq!(content_length(response.headers), Some(body.len()));

    // Hyper's path answers the same bytes the same way.
    let (hyper_status, x_cache, hyper_body) =
        fixture.runtime.block_on(through_hyper(proxy, &data[..len]));
    assert_eq!(hyper_status, *status, "hyper's path: {x_cache}");
    assert!(
        x_cache == "HIT" || x_cache == "STALE",
        "hyper's path: {x_cache}"
    );
    assert_eq!(hyper_body, body);

    // A head cut short is not answered.
    let mut cut_head = Vec::new();
    let cut = fast_hits::answer(proxy, &data[..len - 1], PEER, &mut cut_head);
    assert!(!matches!(cut, Answer::Ready { .. }), "answered a cut head");
});
