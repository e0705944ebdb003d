//! A whole cache hit through `Proxy::handle`, from the parsed request to the
//! response hyper would send, next to what the load harness's "limit" server
//! does for the same request (find the body in a map, build the response).
//! The difference is what a hit costs swr-proxy beyond the least a cache can
//! do; the network and hyper's parsing and encoding are the same for both
//! and are left out.
//!
//! `fast_hit` is the same hit on the path that answers without hyper
//! (`fast_hits::answer`): from the request's bytes to the answer's head
//! bytes and body, parsing and encoding included.
//!
//! cargo bench --bench hit

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::future::Either;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use swr_proxy::config::{Config, Settings};
use swr_proxy::fast_hits;
use swr_proxy::proxy::Proxy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// For the limit's answer and the origin's accept loop.
#[allow(dead_code)]
#[path = "load.rs"]
mod load;

const PATH: &str = "/rank?user=42";

/// What the backend answers every request with: 1 KiB and the headers a
/// recommendations backend sends.
async fn origin_answer() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; 1024])));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    headers.insert(header::ETAG, HeaderValue::from_static("\"r-8f2a91\""));
    response
}

fn request(path: &'static str, host: &str) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = http::Uri::from_static(path);
    if let Ok(host) = HeaderValue::from_str(host) {
        request.headers_mut().insert(header::HOST, host);
    }
    request
}

fn hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cancel = CancellationToken::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (proxy, host) = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(load::serve(listener, stopped, |_| origin_answer()));
        let upstream = format!("http://{addr}").parse().expect("url");
        let config = Config::from_args(
            &Settings::default(),
            Some(upstream),
            Duration::from_secs(3600),
        )
        .expect("config");
        let proxy = Proxy::start(config, cancel.clone(), &TaskTracker::new()).expect("proxy");
        let host = format!("bench.example:{}", addr.port());
        let filled = proxy.handle(request(PATH, &host), None).await;
        assert_eq!(filled.status(), StatusCode::OK);
        assert_eq!(filled.headers()["x-cache"], "MISS");
        (proxy, host)
    });

    c.bench_function("proxy_hit", |b| {
        b.iter(|| {
            let Either::Left(ready) = proxy.handle(black_box(request(PATH, &host)), None) else {
                panic!("a hit answers at once");
            };
            let response = ready.into_inner();
            assert_eq!(response.headers()["x-cache"], "HIT");
            black_box(response)
        })
    });

    let wire = format!("GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wrk\r\n\r\n");
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 40000));
    let mut head = Vec::with_capacity(512);
    c.bench_function("fast_hit", |b| {
        b.iter(|| {
            head.clear();
            let answer = fast_hits::answer(&proxy, black_box(wire.as_bytes()), peer, &mut head);
            let fast_hits::Answer::Ready { body, .. } = answer else {
                panic!("a fast hit: {answer:?}");
            };
            assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
            black_box(head.len());
            black_box(body)
        })
    });

    // What the limit server's handler does (benches/load.rs, `start_limit`),
    // for a request of the same shape.
    let map = Arc::new(load::limit_map(10_000, 1024));
    c.bench_function("limit_hit", |b| {
        b.iter(|| {
            let request = black_box(request("/k/42", &host));
            let map = Arc::clone(&map);
            let response = load::limit_response(&map, request.uri().path(), false);
            assert_eq!(response.status(), StatusCode::OK);
            black_box(response)
        })
    });
    cancel.cancel();
    let _ = stop.send(true);
}

criterion_group!(benches, hit);
criterion_main!(benches);
