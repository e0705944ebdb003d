//! Test support: an in-process origin that counts and misbehaves on request,
//! a launcher for the real proxy, and a deadline-bound wait.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod raw;

use swr_proxy::config::{Cli, Config};
use swr_proxy::proxy::Proxy;

/// What the origin answers on one path.
#[derive(Clone, Debug)]
pub struct Route {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// `None`: `"<path?query> #<n>"`, n counting this path-and-query's requests.
    pub body: Option<Bytes>,
    pub delay: Duration,
    /// Send the body in chunks without `Content-Length`.
    pub chunked: bool,
    /// Close the connection without answering.
    pub reset: bool,
    /// Hold each request until the gate opens.
    pub gate: Option<Gate>,
    /// Send this ETag, and answer 304 to a matching If-None-Match.
    pub etag: Option<String>,
    /// Append this request header's value to the default body.
    pub echo: Option<String>,
}

impl Default for Route {
    fn default() -> Self {
        Route {
            status: 200,
            headers: Vec::new(),
            body: None,
            delay: Duration::ZERO,
            chunked: false,
            reset: false,
            gate: None,
            etag: None,
            echo: None,
        }
    }
}

impl Route {
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
    pub fn reset(mut self) -> Self {
        self.reset = true;
        self
    }
    pub fn etag(mut self, etag: &str) -> Self {
        self.etag = Some(etag.into());
        self
    }
    pub fn echo(mut self, header: &str) -> Self {
        self.echo = Some(header.into());
        self
    }
    pub fn gate(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }
}

/// Holds origin requests until opened.
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn closed() -> Gate {
        Gate(Arc::new(watch::channel(false).0))
    }
    pub fn open(&self) {
        self.0.send_replace(true);
    }
    async fn pass(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// A request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub version: http::Version,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct OriginState {
    routes: Mutex<HashMap<String, Route>>,
    hits: Mutex<HashMap<String, u64>>,
    seen: Mutex<Vec<Seen>>,
    total: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// TLS handshakes that failed (an https origin).
    tls_failures: AtomicU64,
    connections: Mutex<Vec<AbortHandle>>,
}

/// An HTTP origin on 127.0.0.1 (port 0) that counts requests per
/// path-and-query and answers as scripted per path. Stops on drop.
pub struct Origin {
    pub addr: SocketAddr,
    state: Arc<OriginState>,
    cancel: CancellationToken,
}

impl Origin {
    pub async fn start() -> Origin {
        Origin::start_with(None).await
    }

    /// An https origin with `ca`'s certificate for 127.0.0.1: h2 or
    /// HTTP/1.1 by ALPN.
    pub async fn start_tls(ca: &TestCa) -> Origin {
        Origin::start_with(Some(ca.acceptor(&[b"h2", b"http/1.1"]))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let state = Arc::new(OriginState::default());
        let cancel = CancellationToken::new();
        let accept_state = Arc::clone(&state);
        let accept_cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => conn,
                        Err(_) => continue,
                    },
                    () = accept_cancel.cancelled() => return,
                };
                let state = Arc::clone(&accept_state);
                let conn_state = Arc::clone(&accept_state);
                let service = service_fn(move |request| {
                    let state = Arc::clone(&state);
                    async move { answer(&state, request).await }
                });
                let tls = tls.clone();
                let tls_state = Arc::clone(&accept_state);
                let task = tokio::spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                            Err(_) => {
                                tls_state.tls_failures.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        },
                    };
                });
                conn_state
                    .connections
                    .lock()
                    .unwrap()
                    .push(task.abort_handle());
            }
        });
        Origin {
            addr,
            state,
            cancel,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The origin's URL by https (for [`Origin::start_tls`]).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Scripts the answer for `path` (without query).
    pub fn route(&self, path: &str, route: Route) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_string(), route);
    }

    /// Requests seen for this path-and-query.
    pub fn hits(&self, path_and_query: &str) -> u64 {
        *self
            .state
            .hits
            .lock()
            .unwrap()
            .get(path_and_query)
            .unwrap_or(&0)
    }

    pub fn total_hits(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed (an https origin): a client that did
    /// not trust its certificate.
    pub fn tls_failures(&self) -> u64 {
        self.state.tls_failures.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Every request seen for this path-and-query, oldest first.
    pub fn seen(&self, path_and_query: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path_and_query == path_and_query)
            .cloned()
            .collect()
    }

    /// The path-and-query of every request seen, in the order they came.
    pub fn log(&self) -> Vec<String> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.path_and_query.clone())
            .collect()
    }

    /// Stops listening and closes every open connection: the origin is down.
    pub fn stop(&self) {
        self.cancel.cancel();
        for conn in self.state.connections.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    state: &OriginState,
    request: Request<Incoming>,
) -> Result<Response<OriginBody>, std::io::Error> {
    let method = request.method().to_string();
    let version = request.version();
    let path = request.uri().path().to_string();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |pq| pq.to_string());
    let headers = request.headers().clone();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let n = {
        let mut hits = state.hits.lock().unwrap();
        let n = hits.entry(path_and_query.clone()).or_insert(0);
        *n += 1;
        *n
    };
    state.total.fetch_add(1, Ordering::SeqCst);
    state.seen.lock().unwrap().push(Seen {
        method,
        version,
        path_and_query: path_and_query.clone(),
        headers: headers.clone(),
        body,
    });
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let route = state
        .routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_default();
    if let Some(gate) = &route.gate {
        gate.pass().await;
    }
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    if route.reset {
        return Err(std::io::Error::other("origin resets this connection"));
    }
    let seen_headers = headers;
    if let Some(etag) = &route.etag {
        let matches = seen_headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
        if matches {
            let mut response = Response::new(BodyExt::boxed(http_body_util::Empty::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
                .headers_mut()
                .insert("etag", http::HeaderValue::from_str(etag).unwrap());
            for (name, value) in &route.headers {
                response.headers_mut().append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(value).unwrap(),
                );
            }
            return Ok(response);
        }
    }
    let echoed = route
        .echo
        .as_ref()
        .and_then(|name| seen_headers.get(name.as_str()))
        .and_then(|v| v.to_str().ok())
        .map(|v| format!(" {v}"))
        .unwrap_or_default();
    let bytes = route
        .body
        .clone()
        .unwrap_or_else(|| Bytes::from(format!("{path_and_query} #{n}{echoed}")));
    let body: OriginBody = if route.chunked {
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = bytes
            .chunks(1000)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        BodyExt::boxed(StreamBody::new(stream::iter(chunks)))
    } else {
        BodyExt::boxed(http_body_util::Full::new(bytes))
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(route.status).unwrap();
    for (name, value) in &route.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    if let Some(etag) = &route.etag {
        response
            .headers_mut()
            .insert("etag", http::HeaderValue::from_str(etag).unwrap());
    }
    response
        .headers_mut()
        .insert("x-origin-count", http::HeaderValue::from(n));
    Ok(response)
}

/// The real proxy, in process, on 127.0.0.1 (port 0), with its admin API
/// on another port 0. Stops on drop.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    cancel: CancellationToken,
    /// The proxy's own tasks (refresh workers, the snapshot writer).
    tasks: TaskTracker,
    pub client: reqwest::Client,
}

impl TestProxy {
    /// Starts the proxy in front of `origin` with extra command-line flags.
    pub async fn start(origin: &Origin, flags: &[&str]) -> TestProxy {
        TestProxy::start_for(&origin.url(), flags).await
    }

    /// Starts the proxy in front of the backend at `upstream`.
    pub async fn start_for(upstream: &str, flags: &[&str]) -> TestProxy {
        let mut args = vec![
            "swr-proxy".to_string(),
            "--upstream".into(),
            upstream.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let cli = <Cli as clap::Parser>::try_parse_from(args).expect("test flags parse");
        let config =
            Config::from_args(&cli.proxy, None, Config::DEFAULT_TTL).expect("valid config");
        let listener = TcpListener::bind(config.start.listen)
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin_addr = admin_listener.local_addr().expect("admin address");
        let token: Option<Arc<str>> = config.start.admin_token.as_deref().map(Arc::from);
        // Shutdown's grace period: 5 s at most, shorter when a test asks.
        let timeouts = swr_proxy::server::Timeouts {
            grace: config.start.shutdown_timeout.min(Duration::from_secs(5)),
            ..swr_proxy::server::Timeouts::from_config(&config)
        };
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let proxy = Proxy::start(config, cancel.clone(), &tracker).expect("proxy starts");
        let admin_proxy = Arc::clone(&proxy);
        let admin_cancel = cancel.clone();
        tokio::spawn(swr_proxy::server::serve(
            admin_listener,
            move |request, _peer| {
                swr_proxy::admin::handle(Arc::clone(&admin_proxy), token.clone(), request)
            },
            async move { admin_cancel.cancelled().await },
            timeouts,
        ));
        let server_cancel = cancel.clone();
        tokio::spawn(swr_proxy::server::run(
            listener,
            Arc::clone(&proxy),
            async move { server_cancel.cancelled().await },
            timeouts,
        ));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap();
        TestProxy {
            addr,
            admin_addr,
            proxy,
            cancel,
            tasks: tracker,
            client,
        }
    }

    /// Begins a graceful shutdown, as SIGTERM does.
    pub fn shut_down(&self) {
        self.cancel.cancel();
    }

    /// Shuts down and waits, for `deadline` at most, until the proxy's own
    /// tasks have ended (the snapshot written at shutdown among them).
    pub async fn stop(self, deadline: Duration) {
        self.shut_down();
        self.tasks.close();
        let ended = tokio::time::timeout(deadline, self.tasks.wait()).await;
        assert!(
            ended.is_ok(),
            "the proxy's tasks still ran {deadline:?} after shutdown"
        );
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// The key text of a path on this proxy, as the admin API names keys.
    pub fn key(&self, path_and_query: &str) -> String {
        format!("{}{}", self.addr, path_and_query)
    }

    /// Scrapes `/metrics` into `name{labels}` -> value.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        scrape_metrics(&self.client, &self.admin_url("/metrics")).await
    }

    /// One series of `/metrics` as the admin API serves it, e.g.
    /// `swr_requests_total{cache="HIT"}`; 0 when it is not there.
    pub async fn counter(&self, series: &str) -> u64 {
        self.metrics().await.get(series).copied().unwrap_or(0.0) as u64
    }

    pub async fn get(&self, path_and_query: &str) -> Answer {
        self.send(reqwest::Method::GET, path_and_query, &[]).await
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.client.request(method, self.url(path_and_query));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::read(request.send().await.expect("proxy answers")).await
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Scrapes the Prometheus text at `url` into `name{labels}` -> value.
pub async fn scrape_metrics(client: &reqwest::Client, url: &str) -> HashMap<String, f64> {
    let text = client
        .get(url)
        .send()
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub took: Duration,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Answer {
        let started = Instant::now();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("body");
        Answer {
            status,
            headers,
            body,
            took: started.elapsed(),
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One answer as read off the wire.
#[derive(Debug)]
pub struct Wire {
    pub status: u16,
    /// Lowercase names, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Wire {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Takes the first whole answer (framed by its Content-Length) off `buf`.
pub fn take_answer(buf: &mut Vec<u8>) -> Option<Wire> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = response.parse(buf) else {
        return None;
    };
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if buf.len() < len + length {
        return None;
    }
    let answer = Wire {
        status: response.code.unwrap_or(0),
        headers,
        body: buf[len..len + length].to_vec(),
    };
    buf.drain(..len + length);
    Some(answer)
}

/// Waits until `check` holds, polling, or panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A generous deadline for conditions on a loaded machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// A file in the temp directory, removed on drop.
pub struct TempFile(std::path::PathBuf);

/// A path in the temp directory no other call (of this process or another
/// test binary's) returns: `swr-{stem}-{pid}-{n}{suffix}`.
pub fn unique_temp_path(stem: &str, suffix: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "swr-{stem}-{}-{}{suffix}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl TempFile {
    pub fn new(text: &str) -> TempFile {
        let path = unique_temp_path("proxy-test", ".toml");
        std::fs::write(&path, text).expect("write the config file");
        TempFile(path)
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("rewrite the config file");
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A test CA made by rcgen, and a certificate for 127.0.0.1 it signs, as
/// PEM files in a directory of their own (removed on drop). ECDSA P-256
/// keys, valid from 1975 to 4096 (rcgen's defaults).
pub struct TestCa {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn make(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = unique_temp_path(name, "");
        std::fs::create_dir_all(&dir).expect("a directory for the test CA");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("no names");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "swr-test-ca");
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("an IP name");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("the server certificate");
        let ca = TestCa {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        for (path, pem) in [
            (&ca.ca, ca_cert.pem()),
            (&ca.cert, cert.pem()),
            (&ca.key, key.serialize_pem()),
        ] {
            std::fs::write(path, pem).expect("write a test CA file");
        }
        ca
    }
}

impl TestCa {
    /// A TLS acceptor with the certificate for 127.0.0.1, offering `alpn`.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .expect("read the test certificate")
            .collect::<Result<_, _>>()
            .expect("parse the test certificate");
        let key = PrivateKeyDer::from_pem_file(&self.key).expect("read the test key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the test certificate and key");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
