//! A whole cache hit through `Proxy::handle`, from the parsed request to the
//! response hyper would send, next to what the load harness's "limit" server
//! does for the same request (find the body in a map, build the response).
//! The difference is what a hit costs swr-proxy beyond the least a cache can
//! do; the network and hyper's parsing and encoding are the same for both
//! and are left out.
//!
//! cargo bench --bench hit

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::future::Either;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use swr_proxy::config::{Config, ProxyArgs};
use swr_proxy::proxy::Proxy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PATH: &str = "/rank?user=42";

/// A backend that answers every request with 1 KiB and the headers a
/// recommendations backend sends.
async fn origin(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let service = service_fn(|_request: Request<hyper::body::Incoming>| async {
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
            Ok::<_, Infallible>(response)
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn request(host: &str) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = http::Uri::from_static(PATH);
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
    let (proxy, host) = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(origin(listener));
        let upstream = format!("http://{addr}").parse().expect("url");
        let config = Config::from_args(
            &ProxyArgs::default(),
            Some(upstream),
            Duration::from_secs(3600),
        )
        .expect("config");
        let proxy = Proxy::start(config, cancel.clone(), &TaskTracker::new()).expect("proxy");
        let host = format!("bench.example:{}", addr.port());
        let filled = proxy.handle(request(&host), None).await;
        assert_eq!(filled.status(), StatusCode::OK);
        assert_eq!(filled.headers()["x-cache"], "MISS");
        (proxy, host)
    });

    c.bench_function("proxy_hit", |b| {
        b.iter(|| {
            let Either::Left(ready) = proxy.handle(black_box(request(&host)), None) else {
                panic!("a hit answers at once");
            };
            let response = ready.into_inner();
            assert_eq!(response.headers()["x-cache"], "HIT");
            black_box(response)
        })
    });

    // What the limit server's handler does (benches/load.rs, `start_limit`).
    let map: Arc<HashMap<String, Bytes>> = Arc::new(
        (0..10_000)
            .map(|i| (format!("/rank?user={i}"), Bytes::from(vec![b'x'; 1024])))
            .collect(),
    );
    c.bench_function("limit_hit", |b| {
        b.iter(|| {
            let request = black_box(request(&host));
            let map = Arc::clone(&map);
            let body = map
                .get(request.uri().path_and_query().map_or("/", |pq| pq.as_str()))
                .expect("in the map");
            let mut response = Response::new(Full::new(body.clone()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            black_box(response)
        })
    });
    cancel.cancel();
}

criterion_group!(benches, hit);
criterion_main!(benches);
