//! The load harness: swr-proxy side by side with nginx `proxy_cache`, Varnish
//! and a "limit" server, under wrk, on 127.0.0.1.
//!
//! ```sh
//! apt-get install -y wrk nginx-light varnish   # nginx and Varnish are optional
//! cargo bench --bench load                     # every scenario, 3 interleaved rounds of 10 s
//! cargo bench --bench load -- --quick          # 1 round of 3 s, for a smoke run
//! cargo bench --bench load -- --only hits-1k,herd --rounds 5
//! cargo bench --bench load -- --only mix-1pct,mix-5pct   # keep-alive hits that meet misses
//! cargo bench --bench load -- --only refresh-order,restart   # issue 20: what to refresh, warm restart
//! cargo bench --bench load -- --only hot-1k --compare /tmp/old/swr-proxy   # A/B two builds
//! cargo bench --bench load -- --only hot-1k --compare target/release/swr-proxy --compare-args "--threads 1"
//! cargo bench --bench load -- --only hot-1k --wire-limit   # also the limit with swr-proxy's headers
//! cargo bench --bench load -- --only hot-1k --raw-limit    # also the limit without hyper
//! ```
//!
//! The origin answers like a real backend: every answer has an `ETag` and a
//! `Last-Modified`. The mixes (`mix-1pct`, `mix-5pct`) send 1% or 5% of
//! their requests, on the same keep-alive connections as the hits, to URLs
//! never asked before; the limit answers those from memory too (a perfect
//! cache, paying no miss). `cold-1k` starts wrk on an empty cache, so every
//! key's first request is a miss on a keep-alive connection. `zipf` asks for
//! keys by a Zipf law (s = 1) over more keys than the caches' budget holds,
//! and notes each cache's hit ratio against a simulated LRU of swr-proxy's
//! size. `memory` measures bytes per stored object by PSS (and RSS beside
//! it). `refresh-order` runs Zipf traffic against a backend at its capacity
//! for four settings of the refresh queue (one round of
//! `--refresh-duration`, 60 s by default), and `restart` restarts swr-proxy
//! under load, with and without `--snapshot-dir` (swr-proxy only: these
//! measure its own choices, not a comparison).
//!
//! The origin and the limit server run inside this process; swr-proxy, nginx,
//! Varnish and wrk are child processes, each stopped by PID when its run ends.
//! The limit is a minimal hyper server that keeps one body per key in a plain
//! map: a cache cannot do less than find the object and send it.
//!
//! With `--wire-limit`, the hit scenarios also run "limit-wire": the limit
//! answering with the three headers a swr-proxy hit adds (`Age`, `X-Cache`,
//! `Cache-Status`, of the same lengths). It sends the same bytes as
//! swr-proxy, so the ratio to it separates what the code costs from what the
//! bytes cost wrk, which parses every answer on the same two cores.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Collected, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const SWR_PROXY: &str = env!("CARGO_BIN_EXE_swr-proxy");
const WRK_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/wrk.lua");

// ---------------------------------------------------------------- options

pub struct Options {
    pub rounds: usize,
    pub duration: Duration,
    /// The scenarios to run (all when `None`).
    pub only: Option<Vec<String>>,
    /// Keys of the hits-1k and hits-64k scenarios.
    pub hit_keys: usize,
    /// Objects cached by the memory scenario.
    pub memory_keys: usize,
    /// Keys of the zipf scenario.
    pub zipf_keys: usize,
    /// Another swr-proxy binary (an earlier build) to run beside this one,
    /// as the target "baseline".
    pub baseline: Option<PathBuf>,
    /// Extra flags for the baseline (A/B of a flag: `--compare` this build).
    pub baseline_args: Vec<String>,
    /// Also run the target "limit-wire" in the hit scenarios.
    pub wire_limit: bool,
    /// Also run the target "limit-raw" (the limit without hyper).
    pub raw_limit: bool,
    /// wrk's run in the refresh-order scenario (one round), and the
    /// longest wait for the hit ratio in the restart scenario.
    pub refresh_duration: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            rounds: 3,
            duration: Duration::from_secs(10),
            only: None,
            hit_keys: 10_000,
            memory_keys: 100_000,
            zipf_keys: 100_000,
            baseline: None,
            baseline_args: Vec::new(),
            wire_limit: false,
            raw_limit: false,
            refresh_duration: Duration::from_secs(60),
        }
    }
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options::default();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {} // passed by `cargo bench`
                "--quick" => {
                    options.rounds = 1;
                    options.duration = Duration::from_secs(3);
                }
                "--rounds" => {
                    options.rounds = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| *n >= 1)
                        .ok_or("--rounds takes a whole number of at least 1")?;
                }
                "--duration" => {
                    let secs: u64 = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| (1..=120).contains(n))
                        .ok_or("--duration takes whole seconds, 1 to 120")?;
                    options.duration = Duration::from_secs(secs);
                }
                "--compare" => {
                    let path = args
                        .next()
                        .ok_or("--compare takes the path of a swr-proxy binary")?;
                    let path = PathBuf::from(path);
                    if !path.is_file() {
                        return Err(format!("--compare: no file at {}", path.display()));
                    }
                    options.baseline = Some(path);
                }
                "--compare-args" => {
                    let list = args
                        .next()
                        .ok_or("--compare-args takes flags like \"--threads 1\"")?;
                    options.baseline_args = list.split_whitespace().map(str::to_string).collect();
                }
                "--refresh-duration" => {
                    let secs: u64 = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| (1..=600).contains(n))
                        .ok_or("--refresh-duration takes whole seconds, 1 to 600")?;
                    options.refresh_duration = Duration::from_secs(secs);
                }
                "--wire-limit" => options.wire_limit = true,
                "--raw-limit" => options.raw_limit = true,
                "--only" => {
                    let list = args.next().ok_or("--only takes a list like hits-1k,herd")?;
                    options.only = Some(list.split(',').map(str::to_string).collect());
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if !options.baseline_args.is_empty() && options.baseline.is_none() {
            return Err("--compare-args needs --compare".into());
        }
        Ok(options)
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

// ---------------------------------------------------------------- origin and limit

/// The body for key `i`: distinct per key, `size` bytes.
fn body_for(i: usize, size: usize) -> Bytes {
    let mut body = format!("key {i} ").into_bytes();
    body.resize(size.max(body.len()), b'x');
    Bytes::from(body)
}

fn key_index(path: &str) -> Option<usize> {
    path.strip_prefix("/k/")?.parse().ok()
}

/// The origin: answers `/k/<i>` with `body_for(i)` after `delay`; counts.
struct Origin {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    in_flight: Arc<AtomicU64>,
    max_in_flight: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Origin {
    async fn start(
        body_size: usize,
        delay: Duration,
        cache_control: Option<&'static str>,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let requests = Arc::new(AtomicU64::new(0));
        let in_flight = Arc::new(AtomicU64::new(0));
        let max_in_flight = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let counters = (requests.clone(), in_flight.clone(), max_in_flight.clone());
        let last_modified =
            http::HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
                .expect("an HTTP date is a header value");
        tokio::spawn(serve(
            listener,
            stopped,
            move |request: Request<Incoming>| {
                let (requests, in_flight, max_in_flight) = counters.clone();
                let last_modified = last_modified.clone();
                async move {
                    requests.fetch_add(1, Ordering::Relaxed);
                    let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                    max_in_flight.fetch_max(now, Ordering::Relaxed);
                    // Decrements even when the client goes away mid-delay
                    // (the handler is dropped then).
                    let in_flight_guard = Decrement(Arc::clone(&in_flight));
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    drop(in_flight_guard);
                    let i = key_index(request.uri().path()).unwrap_or(0);
                    let mut response = Response::new(Full::new(body_for(i, body_size)));
                    let headers = response.headers_mut();
                    headers.insert(
                        "content-type",
                        http::HeaderValue::from_static("application/octet-stream"),
                    );
                    // Validators, as real backends send them.
                    if let Ok(etag) = http::HeaderValue::from_str(&format!("\"k{i}\"")) {
                        headers.insert("etag", etag);
                    }
                    headers.insert("last-modified", last_modified.clone());
                    if let Some(cc) = cache_control {
                        response
                            .headers_mut()
                            .insert("cache-control", http::HeaderValue::from_static(cc));
                    }
                    response
                }
            },
        ));
        Origin {
            addr,
            requests,
            in_flight,
            max_in_flight,
            stop,
        }
    }

    fn reset_counters(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Decrements a counter when dropped.
struct Decrement(Arc<AtomicU64>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The limit's map: one body per key, by path.
pub fn limit_map(keys: usize, body_size: usize) -> HashMap<String, Bytes> {
    (0..keys)
        .map(|i| (format!("/k/{i}"), body_for(i, body_size)))
        .collect()
}

/// The limit's body for `path`: its key's, or for a URL never asked before
/// (`/n/...`, the mixes) key 0's, as if a perfect cache already held every
/// answer: the limit pays no miss.
fn limit_body<'a>(map: &'a HashMap<String, Bytes>, path: &str) -> Option<&'a Bytes> {
    map.get(path)
        .or_else(|| path.starts_with("/n/").then(|| map.get("/k/0")).flatten())
}

/// What the limit answers for `path`: the body as is; with `wire`, with the
/// headers a swr-proxy hit adds. `benches/hit.rs` measures this too.
pub fn limit_response(
    map: &HashMap<String, Bytes>,
    path: &str,
    wire: bool,
) -> Response<Full<Bytes>> {
    let Some(body) = limit_body(map, path) else {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        return response;
    };
    let mut response = Response::new(Full::new(body.clone()));
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/octet-stream"),
    );
    if wire {
        // As a hit on an entry with an hour's ttl, 12 s old.
        for (name, value) in [
            ("age", "12"),
            ("x-cache", "HIT"),
            ("cache-status", "swr-proxy; hit; ttl=3588"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
    }
    response
}

/// The limit: one body per key in a plain map, answered as is (`kind`
/// `Limit`), with a swr-proxy hit's headers too (`LimitWire`), or without
/// hyper (`LimitRaw`: a bare HTTP/1.1 loop over the socket that finds the
/// head's end, takes the path and writes head and body in one `writev`,
/// with the limit's headers; it shows what the HTTP library costs a hit).
async fn start_limit(
    keys: usize,
    body_size: usize,
    kind: Kind,
) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind limit");
    let addr = listener.local_addr().expect("limit addr");
    let map = Arc::new(limit_map(keys, body_size));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if kind == Kind::LimitRaw {
        tokio::spawn(accept_until(listener, stopped, move |stream| {
            tokio::spawn(raw_connection(stream, Arc::clone(&map)));
        }));
    } else {
        let wire = kind == Kind::LimitWire;
        tokio::spawn(serve(
            listener,
            stopped,
            move |request: Request<Incoming>| {
                let map = Arc::clone(&map);
                async move { limit_response(&map, request.uri().path(), wire) }
            },
        ));
    }
    (addr, stop)
}

async fn raw_connection(stream: tokio::net::TcpStream, map: Arc<HashMap<String, Bytes>>) {
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    let mut date = (0u64, String::new());
    loop {
        match stream.try_read(&mut buf[filled..]) {
            Ok(0) => return,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stream.readable().await.is_err() {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        let mut start = 0;
        while let Some(end) = buf[start..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &buf[start..start + end];
            let path = head
                .split(|b| *b == b' ')
                .nth(1)
                .and_then(|p| std::str::from_utf8(p).ok());
            let now = std::time::SystemTime::now();
            let secs = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if secs != date.0 {
                date = (secs, httpdate::fmt_http_date(now));
            }
            let body = path.and_then(|p| limit_body(&map, p));
            let answer = match body {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\ndate: {}\r\n\r\n",
                    body.len(),
                    date.1
                ),
                None => format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ndate: {}\r\n\r\n",
                    date.1
                ),
            };
            let body = body.map_or(&[][..], |b| &b[..]);
            if !write_all(&stream, answer.as_bytes(), body).await {
                return;
            }
            start += end + 4;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            return; // a request head over 8 KiB
        }
    }
}

/// Writes `head` then `body` with `writev`, waiting while the socket is full.
async fn write_all(stream: &tokio::net::TcpStream, head: &[u8], body: &[u8]) -> bool {
    let mut sent = 0;
    let total = head.len() + body.len();
    while sent < total {
        let slices = if sent < head.len() {
            [
                std::io::IoSlice::new(&head[sent..]),
                std::io::IoSlice::new(body),
            ]
        } else {
            [
                std::io::IoSlice::new(&body[sent - head.len()..]),
                std::io::IoSlice::new(&[]),
            ]
        };
        match stream.try_write_vectored(&slices) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stream.writable().await.is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Serves `handler` on `listener` (HTTP/1.1 and HTTP/2) until `stopped`
/// turns true.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    stopped: tokio::sync::watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    accept_until(listener, stopped, move |stream| {
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request).await) }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    })
    .await;
}

/// Accepts connections on `listener` (with `TCP_NODELAY`) and hands each to
/// `each`, until `stopped` turns true.
async fn accept_until(
    listener: TcpListener,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    mut each: impl FnMut(tokio::net::TcpStream),
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(_) => continue,
            },
            _ = stopped.wait_for(|s| *s) => return,
        };
        let _ = stream.set_nodelay(true);
        each(stream);
    }
}

// ---------------------------------------------------------------- targets

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    SwrProxy,
    /// The swr-proxy binary given with `--compare`.
    Baseline,
    Nginx,
    Varnish,
    Limit,
    /// The limit, answering with a swr-proxy hit's headers too.
    LimitWire,
    /// The limit without hyper.
    LimitRaw,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::SwrProxy => "swr-proxy",
            Kind::Baseline => "baseline",
            Kind::Nginx => "nginx",
            Kind::Varnish => "varnish",
            Kind::Limit => "limit",
            Kind::LimitWire => "limit-wire",
            Kind::LimitRaw => "limit-raw",
        }
    }
}

/// How a cache under test is set up.
#[derive(Clone, Copy)]
struct CacheSetup {
    ttl_secs: u64,
    grace_secs: u64,
    refresh_concurrency: usize,
    /// The memory budget every cache is given, in MiB; `None`: room for
    /// every key (2 GiB).
    budget_mib: Option<u64>,
    /// swr-proxy in fleet mode on this Redis.
    redis: Option<SocketAddr>,
}

/// A child process stopped by PID (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: std::process::Child,
    pub dir: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A target under test: where it listens, and what keeps it running.
struct Target {
    addr: SocketAddr,
    /// swr-proxy's admin listener.
    admin: Option<SocketAddr>,
    _proc: Option<Proc>,
    _limit_stop: Option<tokio::sync::watch::Sender<bool>>,
    /// Processes whose RSS is the target's memory.
    pids: Vec<u32>,
    /// A directory whose allocated bytes count as the target's memory (nginx's cache files).
    cache_dir: Option<PathBuf>,
}

/// Starts `command` with its output discarded; `dir` is removed when it stops.
fn spawn_quiet(command: &mut Command, dir: Option<PathBuf>) -> Option<Proc> {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Proc { child, dir })
}

pub fn free_port() -> SocketAddr {
    let [addr] = free_ports();
    addr
}

/// `N` distinct free ports on 127.0.0.1: all bound at once before any is
/// released, so that two calls in a row cannot hand out the same port (a
/// target whose listener and admin listener collided did not start).
pub fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let listeners: [StdListener; N] =
        std::array::from_fn(|_| StdListener::bind("127.0.0.1:0").expect("a free port"));
    std::array::from_fn(|i| listeners[i].local_addr().expect("a bound address"))
}

/// Whether `program` is on the PATH.
pub fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn scratch_dir(name: &str) -> PathBuf {
    // tmpfs when there is one, as an nginx cache in RAM would be deployed.
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("swr-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub async fn wait_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn start_target(
    kind: Kind,
    origin: &Origin,
    setup: CacheSetup,
    keys: usize,
    body_size: usize,
) -> Option<Target> {
    let [addr, admin_addr] = free_ports();
    let origin_addr = origin.addr;
    let mut admin = None;
    let budget = setup.budget_mib.unwrap_or(2048);
    let (proc, pids, cache_dir, limit_stop, addr) = match kind {
        Kind::Limit | Kind::LimitWire | Kind::LimitRaw => {
            let (addr, stop) = start_limit(keys, body_size, kind).await;
            (None, vec![std::process::id()], None, Some(stop), addr)
        }
        Kind::SwrProxy | Kind::Baseline => {
            let binary = match kind {
                Kind::Baseline => BASELINE.get()?.0.clone(),
                _ => PathBuf::from(SWR_PROXY),
            };
            admin = Some(admin_addr);
            let mut command = Command::new(binary);
            command
                .args([
                    "--upstream",
                    &format!("http://{origin_addr}"),
                    "--listen",
                    &addr.to_string(),
                    "--ttl",
                    &format!("{}s", setup.ttl_secs),
                    "--stale-while-revalidate",
                    &format!("{}s", setup.grace_secs),
                    "--refresh-concurrency",
                    &setup.refresh_concurrency.to_string(),
                    "--max-size",
                    &format!("{budget}MiB"),
                    "--admin-listen",
                    &admin_addr.to_string(),
                ])
                .env("RUST_LOG", "warn");
            if let (Kind::Baseline, Some((_, extra))) = (kind, BASELINE.get()) {
                command.args(extra);
            }
            if let Some(redis) = setup.redis {
                command.args(["--redis", &format!("redis://{redis}")]);
            }
            let proc = spawn_quiet(&mut command, None)?;
            let pid = proc.pid();
            (Some(proc), vec![pid], None, None, addr)
        }
        Kind::Nginx => {
            if !installed("nginx") {
                return None;
            }
            let dir = scratch_dir("nginx");
            let cache = dir.join("cache");
            std::fs::create_dir_all(&cache).ok()?;
            // nginx enforces `max_size` only after the fact (its cache
            // manager deletes files now and then: a zipf run ended with 15x
            // its budget on disk), but drops the least recently used key at
            // once when `keys_zone` is full. With a budget, the zone holds
            // as many keys as swr-proxy holds objects in it (about 1,300 B
            // each; nginx: about 8,000 keys per MiB of zone).
            let zone = match setup.budget_mib {
                None => "256m".to_string(),
                Some(mib) => format!("{}k", (mib * (1 << 20) / 1300 * 131 / 1024).max(64)),
            };
            let conf = format!(
                r#"worker_processes auto;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  proxy_cache_path {cache} levels=1:2 keys_zone=z:{zone} max_size={budget}m inactive=1h use_temp_path=off;
  upstream origin {{ server {origin_addr}; keepalive 256; }}
  server {{
    listen {addr} reuseport;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache z;
      proxy_cache_valid 200 {ttl}s;
      proxy_cache_use_stale updating error timeout http_500 http_502 http_503 http_504;
      proxy_cache_background_update on;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 30s;
      add_header X-Cache $upstream_cache_status;
    }}
  }}
}}
"#,
                dir = dir.display(),
                cache = cache.display(),
                ttl = setup.ttl_secs,
            );
            std::fs::write(dir.join("nginx.conf"), conf).ok()?;
            let mut command = Command::new("nginx");
            command.args([
                "-p",
                &dir.display().to_string(),
                "-c",
                &dir.join("nginx.conf").display().to_string(),
                "-g",
                "daemon off;",
            ]);
            let proc = spawn_quiet(&mut command, Some(dir))?;
            let pid = proc.pid();
            (Some(proc), vec![pid], Some(cache), None, addr)
        }
        Kind::Varnish => {
            if !installed("varnishd") {
                return None;
            }
            let dir = scratch_dir("varnish");
            let vcl = format!(
                "vcl 4.1;\nbackend default {{ .host = \"{}\"; .port = \"{}\"; }}\n\
                 sub vcl_backend_response {{ set beresp.ttl = {}s; set beresp.grace = {}s; }}\n",
                origin_addr.ip(),
                origin_addr.port(),
                setup.ttl_secs,
                setup.grace_secs
            );
            let vcl_path = dir.join("bench.vcl");
            std::fs::write(&vcl_path, vcl).ok()?;
            let mut command = Command::new("varnishd");
            command.args([
                "-F",
                "-n",
                &dir.join("work").display().to_string(),
                "-a",
                &addr.to_string(),
                "-f",
                &vcl_path.display().to_string(),
                "-s",
                &format!("malloc,{budget}M"),
                "-p",
                "thread_pools=2",
            ]);
            let proc = spawn_quiet(&mut command, Some(dir))?;
            let pid = proc.pid();
            (Some(proc), vec![pid], None, None, addr)
        }
    };
    if !wait_listening(addr).await {
        eprintln!("{} did not start listening on {addr}", kind.name());
        return None;
    }
    let mut pids = pids;
    if kind == Kind::Nginx || kind == Kind::Varnish {
        // The workers (nginx) or the cache child (Varnish) hold the memory.
        pids.extend(children_of(pids[0]));
    }
    Some(Target {
        addr,
        admin,
        _proc: proc,
        _limit_stop: limit_stop,
        pids,
        cache_dir,
    })
}

fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The processes' proportional set size: pages shared between them (a
/// forked parent and child) counted once, not once per process.
pub fn pss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:") * 1024)
        .sum()
}

/// The processes' resident set sizes, summed (a page shared between them
/// counted once per process).
pub fn rss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| proc_kib(&format!("/proc/{pid}/status"), "VmRSS:") * 1024)
        .sum()
}

/// The value (in kB) of the line starting with `field` in a /proc file; 0
/// when the file (a process that has exited) or the line is missing.
fn proc_kib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) the processes have used so far. Read before and
/// after a wrk run, it gives the target's CPU per request: less noisy than
/// req/s on a shared machine, since it does not depend on how the cores were
/// shared with wrk.
fn cpu_time(pids: &[u32]) -> Duration {
    ticks_to_time(
        pids.iter()
            .map(|pid| stat_ticks(&pid.to_string(), UTIME_STIME))
            .sum(),
    )
}

/// utime and stime (the 14th and 15th fields of `/proc/<pid>/stat`), as
/// [`stat_ticks`] counts them.
const UTIME_STIME: [usize; 2] = [11, 12];
/// cutime and cstime (the 16th and 17th fields): reaped children's.
const CUTIME_CSTIME: [usize; 2] = [13, 14];

/// CPU time this process (the harness: the origin, and the limit when it is
/// the target) and its reaped children (wrk, once its run is waited for)
/// have used so far.
fn own_cpu_time() -> (Duration, Duration) {
    (
        ticks_to_time(stat_ticks("self", UTIME_STIME)),
        ticks_to_time(stat_ticks("self", CUTIME_CSTIME)),
    )
}

/// The sum of two fields of `/proc/<pid>/stat`, counted from the one after
/// the command name (which may hold spaces): the state is 0.
fn stat_ticks(pid: &str, at: [usize; 2]) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    at.iter()
        .map(|i| {
            fields
                .get(*i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn ticks_to_time(ticks: u64) -> Duration {
    static TICKS_PER_SEC: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks_per_sec = *TICKS_PER_SEC.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    Duration::from_secs_f64(ticks as f64 / ticks_per_sec)
}

/// Files under `dir`, at any depth.
fn files_in(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => files_in(&entry.path()),
            Ok(kind) if kind.is_file() => 1,
            _ => 0,
        })
        .sum()
}

fn dir_bytes(dir: &Path) -> u64 {
    // Allocated bytes, as tmpfs charges them (whole pages per file).
    let output = Command::new("du").args(["-s", "-B1"]).arg(dir).output();
    output
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

// ---------------------------------------------------------------- clients

/// Requests every key once (`concurrency` at a time), so the cache holds them.
async fn warm(addr: SocketAddr, keys: usize, concurrency: usize) {
    warm_as(addr, &addr.to_string(), keys, concurrency).await;
}

/// [`warm`], with `host` as the requests' `Host`.
async fn warm_as(addr: SocketAddr, host: &str, keys: usize, concurrency: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = Arc::clone(&next);
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let Ok(mut sender) = connect(addr).await else {
                return;
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= keys {
                    return;
                }
                let path = format!("/k/{i}");
                if get_answer(&mut sender, &host, &path).await.is_err() {
                    match connect(addr).await {
                        Ok(s) => sender = s,
                        Err(_) => return,
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

pub type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

pub async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The body of `path`'s answer, as text.
async fn get_text(sender: &mut Sender, addr: SocketAddr, path: &str) -> Result<String, String> {
    let (_, body) = get_answer(sender, &addr.to_string(), path).await?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// The status of `path`'s answer, its body read to the end.
pub async fn get(sender: &mut Sender, addr: SocketAddr, path: &str) -> Result<u16, String> {
    let (status, _) = get_answer(sender, &addr.to_string(), path).await?;
    Ok(status)
}

/// `GET path` on `sender` with `host` as `Host`: the answer's status and
/// whole body (as read: joined only by a caller that wants it in one piece).
async fn get_answer(
    sender: &mut Sender,
    host: &str,
    path: &str,
) -> Result<(u16, Collected<Bytes>), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let request = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

#[derive(Debug, Clone, Default)]
struct WrkResult {
    requests: f64,
    rps: f64,
    p99_ms: f64,
    slow_share: f64,
    errors: u64,
}

fn run_wrk(addr: SocketAddr, traffic: Traffic, duration: Duration) -> Option<WrkResult> {
    run_wrk_as(addr, None, traffic, duration)
}

/// [`run_wrk`], with `host` (when given) as every request's `Host`.
fn run_wrk_as(
    addr: SocketAddr,
    host: Option<&str>,
    traffic: Traffic,
    duration: Duration,
) -> Option<WrkResult> {
    let text = wrk_output(
        WRK_SCRIPT,
        addr,
        duration,
        "5s",
        &[
            ("KEYS", traffic.keys.to_string()),
            ("NEW", traffic.new_share.to_string()),
            ("ZIPF", traffic.zipf.to_string()),
            ("HOST", host.unwrap_or("").to_string()),
        ],
    )?;
    let line = text.lines().find(|l| l.starts_with("RESULT "))?;
    let field = |name: &str| -> f64 { result_field(line, name).unwrap_or(0.0) };
    let duration_s = field("duration_us") / 1e6;
    Some(WrkResult {
        requests: field("requests"),
        rps: if duration_s > 0.0 {
            field("requests") / duration_s
        } else {
            0.0
        },
        p99_ms: field("p99_us") / 1e3,
        slow_share: field("slow100_share"),
        errors: field("errors") as u64,
    })
}

/// The targets in the order a round runs them: each round starts one
/// further along, so that no target always runs first (right after the
/// previous round's last, on a machine still settling) and an A/B pair is
/// not always measured in the same order. An A/A run (the same binary as
/// `swr-proxy` and `--compare`) showed the first slot of a round up to 7%
/// behind on hits-1k with a fixed order.
fn in_turn(kinds: &[Kind], round: usize) -> Vec<Kind> {
    let mut order = kinds.to_vec();
    if !order.is_empty() {
        let by = round % order.len();
        order.rotate_left(by);
    }
    order
}

/// What `wrk -t1 -c64` with the Lua `script` (and `env`) prints to stdout
/// after `duration` against `addr`.
pub fn wrk_output(
    script: &str,
    addr: SocketAddr,
    duration: Duration,
    timeout: &str,
    env: &[(&str, String)],
) -> Option<String> {
    let output = Command::new("wrk")
        .args([
            "-t1",
            "-c64",
            &format!("-d{}s", duration.as_secs()),
            "--timeout",
            timeout,
            "-s",
            script,
            &format!("http://{addr}"),
        ])
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The value of `name=VALUE` in a script's RESULT line.
pub fn result_field<T: std::str::FromStr>(line: &str, name: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------- scenarios

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The `--compare` binary and its `--compare-args`, for the whole run.
static BASELINE: std::sync::OnceLock<(PathBuf, Vec<String>)> = std::sync::OnceLock::new();

fn kinds_available() -> Vec<Kind> {
    let mut kinds = vec![Kind::SwrProxy];
    if BASELINE.get().is_some() {
        kinds.push(Kind::Baseline);
    }
    if installed("nginx") {
        kinds.push(Kind::Nginx);
    } else {
        eprintln!("nginx not installed: its rows are skipped (apt-get install -y nginx-light)");
    }
    if installed("varnishd") {
        kinds.push(Kind::Varnish);
    } else {
        eprintln!("varnishd not installed: its rows are skipped (apt-get install -y varnish)");
    }
    kinds
}

/// What a throughput scenario sends, and how its caches start.
#[derive(Clone, Copy)]
struct Traffic {
    keys: usize,
    body_size: usize,
    /// The share of requests (0 to 1) on URLs never asked before.
    new_share: f64,
    /// The Zipf exponent of the keys' popularity; 0: uniform.
    zipf: f64,
    /// Whether every key is asked once before wrk starts (else wrk starts
    /// on an empty cache: a cold start). Not read with `zipf`: that traffic
    /// fills the cache with an unmeasured run of itself.
    warm: bool,
    /// The caches' memory budget (see [`CacheSetup`]).
    budget_mib: Option<u64>,
}

impl Traffic {
    /// Every request on one of `keys` warmed keys, each as likely, with
    /// answers of `body_size` bytes and room in the caches for every key.
    fn uniform(keys: usize, body_size: usize) -> Traffic {
        Traffic {
            keys,
            body_size,
            new_share: 0.0,
            zipf: 0.0,
            warm: true,
            budget_mib: None,
        }
    }
}

/// Throughput under wrk, rounds interleaved: warm keep-alive traffic over
/// `traffic.keys` keys (the hits), a share of it on new URLs (the mixes),
/// from an empty cache (cold), or by a Zipf law over more keys than the
/// budget holds, after a run of the same traffic to fill the cache (zipf:
/// its hit ratio is `1 - backend requests / requests`, against an LRU of
/// the size swr-proxy ends with, simulated on the same law).
async fn throughput(report: &mut Report, options: &Options, name: &str, traffic: Traffic) {
    let origin = Origin::start(traffic.body_size, Duration::ZERO, None).await;
    let setup = CacheSetup {
        ttl_secs: 3600,
        grace_secs: 60,
        refresh_concurrency: 8,
        budget_mib: traffic.budget_mib,
        redis: None,
    };
    let keys = traffic.keys;
    let mut kinds = kinds_available();
    kinds.push(Kind::Limit);
    if options.wire_limit {
        kinds.push(Kind::LimitWire);
    }
    if options.raw_limit {
        kinds.push(Kind::LimitRaw);
    }
    let mut results: HashMap<&'static str, Vec<(WrkResult, f64)>> = HashMap::new();
    let mut by_round: HashMap<(usize, &'static str), f64> = HashMap::new();
    let mut hit_ratios: HashMap<&'static str, Vec<f64>> = HashMap::new();
    // swr-proxy's entries at the end of each round, for the LRU's size.
    let mut entries_stored: Vec<f64> = Vec::new();
    // What nginx's cache directory held at the end of each zipf run: files
    // and bytes, against the budget it was given.
    let mut nginx_held: Vec<(u64, u64)> = Vec::new();
    for round in 0..options.rounds {
        for kind in in_turn(&kinds, round) {
            let Some(target) = start_target(kind, &origin, setup, keys, traffic.body_size).await
            else {
                report.problem(format!("{name}: {} did not start", kind.name()));
                continue;
            };
            let addr = target.addr;
            let duration = options.duration;
            if traffic.zipf > 0.0 {
                // The same traffic first, unmeasured, so that the cache is
                // in its steady state.
                let _ = tokio::task::spawn_blocking(move || run_wrk(addr, traffic, duration)).await;
            } else if traffic.warm {
                warm(target.addr, keys, 32).await;
            }
            origin.reset_counters();
            let cpu_before = cpu_time(&target.pids);
            let (own_before, wrk_before) = own_cpu_time();
            let result = tokio::task::spawn_blocking(move || run_wrk(addr, traffic, duration))
                .await
                .ok()
                .flatten();
            let cpu = cpu_time(&target.pids).saturating_sub(cpu_before);
            let (own_after, wrk_after) = own_cpu_time();
            let harness_cpu = own_after.saturating_sub(own_before);
            let wrk_cpu = wrk_after.saturating_sub(wrk_before);
            let fetched = origin.requests.load(Ordering::Relaxed) as f64;
            if traffic.zipf > 0.0 && kind == Kind::SwrProxy {
                if let Some(entries) = admin_metric(target.admin, "swr_cache_entries").await {
                    entries_stored.push(entries);
                }
            }
            if let (true, Some(dir)) = (traffic.zipf > 0.0, target.cache_dir.as_deref()) {
                nginx_held.push((files_in(dir), dir_bytes(dir)));
            }
            drop(target);
            check_wrk(report, name, kind.name(), result.as_ref());
            if let Some(r) = result {
                let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / r.requests.max(1.0);
                let cpu_us = per_request(cpu);
                let hit_ratio = 1.0 - fetched / r.requests.max(1.0);
                // The harness's own CPU is the origin's (and the limit's,
                // when it is the target): what a miss costs the backend.
                eprintln!(
                    "  {name} round {} {:<9} {:>9.0} req/s  p99 {:.2} ms  cpu {cpu_us:.1} us/req  (harness {:.1}, wrk {:.1})  errors {}{}",
                    round + 1,
                    kind.name(),
                    r.rps,
                    r.p99_ms,
                    per_request(harness_cpu),
                    per_request(wrk_cpu),
                    r.errors,
                    if traffic.zipf > 0.0 { format!("  hit ratio {hit_ratio:.3}") } else { String::new() },
                );
                by_round.insert((round, kind.name()), r.rps);
                hit_ratios.entry(kind.name()).or_default().push(hit_ratio);
                results.entry(kind.name()).or_default().push((r, cpu_us));
            }
        }
    }
    if traffic.zipf > 0.0 {
        let note = hit_ratio_note(&kinds, &hit_ratios, entries_stored, traffic);
        report.note(format!("{name} {note}"));
        for (files, bytes) in nginx_held {
            report.note(format!(
                "{name} nginx held {files} files, {:.1} MiB on disk, at the end of a run (max_size {} MiB, keys_zone sized to swr-proxy's objects)",
                bytes as f64 / f64::from(1 << 20),
                setup.budget_mib.unwrap_or(0)
            ));
        }
    }
    let median_of = |k: &str, f: fn(&(WrkResult, f64)) -> f64| {
        median(
            results
                .get(k)
                .map(|v| v.iter().map(f).collect())
                .unwrap_or_default(),
        )
    };
    let rps = |k: &str| median_of(k, |r| r.0.rps);
    let p99 = |k: &str| median_of(k, |r| r.0.p99_ms);
    let cpu = |k: &str| median_of(k, |r| r.1);
    let limit = rps("limit");
    for kind in &kinds {
        let k = kind.name();
        report.row(vec![
            name.to_string(),
            k.to_string(),
            format!("{:.0}", rps(k)),
            format!("{:.2}", p99(k)),
            ratio(rps(k), limit),
            ratio(rps(k), rps("nginx")),
            ratio(rps(k), rps("varnish")),
            format!("{:.1}", cpu(k)),
        ]);
    }
    // The ratio to the limit within each round too: the rounds are
    // interleaved, so a pair from one round shares the machine's state.
    let mut pairs: Vec<(&str, &str)> = kinds
        .iter()
        .filter(|k| !matches!(k, Kind::Limit | Kind::LimitWire | Kind::LimitRaw))
        .map(|k| (k.name(), "limit"))
        .collect();
    if options.wire_limit {
        pairs.push((Kind::SwrProxy.name(), Kind::LimitWire.name()));
    }
    if options.raw_limit {
        pairs.push((Kind::LimitRaw.name(), Kind::Limit.name()));
    }
    for (target, against) in pairs {
        let ratios: Vec<f64> = (0..options.rounds)
            .filter_map(|round| {
                let target = by_round.get(&(round, target))?;
                let against = by_round.get(&(round, against)).filter(|l| **l > 0.0)?;
                Some(target / against)
            })
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        report.note(format!(
            "{name} {target} / {against} by round: {} (median {:.2}x)",
            listed.join(", "),
            median(ratios)
        ));
    }
}

/// Records a wrk run that gave no result, or whose answers failed: a
/// problem for swr-proxy and the harness's own servers; for nginx and
/// Varnish a result, noted (nginx under the zipf scenario's eviction churn
/// lets a few requests wait past wrk's 5 s timeout on its cache lock).
fn check_wrk(report: &mut Report, scenario: &str, target: &str, result: Option<&WrkResult>) {
    match result {
        None => report.problem(format!("{scenario}: wrk gave no result for {target}")),
        Some(r) if r.errors > 0 => {
            let text = format!(
                "{scenario}: {} of {:.0} answers from {target} failed",
                r.errors, r.requests
            );
            if target == Kind::Nginx.name() || target == Kind::Varnish.name() {
                report.note(text);
            } else {
                report.problem(text);
            }
        }
        Some(_) => {}
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// The stale storm: 1,000 keys with a 1 s ttl in front of a 200 ms origin.
async fn stale_storm(report: &mut Report, options: &Options) {
    const KEYS: usize = 1000;
    let origin = Origin::start(1024, Duration::from_millis(200), None).await;
    let storm = CacheSetup {
        ttl_secs: 1,
        grace_secs: 60,
        refresh_concurrency: 256,
        redis: None,
        budget_mib: None,
    };
    let calm = CacheSetup {
        ttl_secs: 3600,
        ..storm
    };
    let kinds = kinds_available();
    let mut rows: HashMap<String, Vec<(WrkResult, u64, u64)>> = HashMap::new();
    for round in 0..options.rounds {
        let runs: Vec<(Kind, CacheSetup, String)> = kinds
            .iter()
            .map(|k| (*k, storm, k.name().to_string()))
            .chain(std::iter::once((
                Kind::SwrProxy,
                calm,
                "swr-proxy (hits only, same load)".to_string(),
            )))
            .collect();
        for (kind, setup, label) in runs {
            let Some(target) = start_target(kind, &origin, setup, KEYS, 1024).await else {
                report.problem(format!("stale-storm: {label} did not start"));
                continue;
            };
            warm(target.addr, KEYS, 32).await;
            origin.reset_counters();
            let addr = target.addr;
            let duration = options.duration;
            let traffic = Traffic::uniform(KEYS, 1024);
            let answers_before = answers_by_status(target.admin).await;
            let result = tokio::task::spawn_blocking(move || run_wrk(addr, traffic, duration))
                .await
                .ok()
                .flatten();
            let backend = origin.requests.load(Ordering::Relaxed);
            let max_in_flight = origin.max_in_flight.load(Ordering::Relaxed);
            let served_stale = stale_share(answers_before, answers_by_status(target.admin).await);
            drop(target);
            check_wrk(report, "stale-storm", &label, result.as_ref());
            if let Some(r) = result {
                let stale =
                    served_stale.map_or(String::new(), |s| format!(", served stale {s:.3}"));
                eprintln!(
                    "  stale-storm round {} {label:<9} {:.0} req/s, p99 {:.2} ms, >=100ms {:.5}%, backend {backend}, in flight max {max_in_flight}{stale}",
                    round + 1, r.rps, r.p99_ms, r.slow_share * 100.0
                );
                rows.entry(label)
                    .or_default()
                    .push((r, backend, max_in_flight));
            }
        }
    }
    let ideal = KEYS as f64 * options.duration.as_secs_f64() / storm.ttl_secs as f64;
    let mut labels: Vec<&String> = rows.keys().collect();
    labels.sort();
    for label in labels {
        let runs = &rows[label];
        let p99 = median(runs.iter().map(|r| r.0.p99_ms).collect());
        let slow = median(runs.iter().map(|r| r.0.slow_share * 100.0).collect());
        let backend = median(runs.iter().map(|r| r.1 as f64).collect());
        let max_in_flight = runs.iter().map(|r| r.2).max().unwrap_or(0);
        let rps = median(runs.iter().map(|r| r.0.rps).collect());
        report.row(vec![
            "stale-storm".into(),
            label.clone(),
            format!("{rps:.0}"),
            format!("{p99:.2}"),
            format!("{slow:.4}% >= 100 ms"),
            format!("backend {backend:.0} ({:.2}x ideal)", backend / ideal),
            format!("max in flight {max_in_flight}"),
        ]);
    }
}

/// Fleet mode: three swr-proxy instances on one Redis against three
/// independent ones, 1,000 keys with a 1 s ttl behind a 200 ms backend,
/// one wrk per instance at once (every request with the same `Host`, as
/// behind a load balancer): backend requests per key per ttl (ideal 1;
/// independent instances about 3), and the answers' p99. Then one
/// instance's warm hits with and without `--redis`, rounds interleaved
/// (hits never touch Redis: the two should be level).
async fn fleet(report: &mut Report, options: &Options) {
    const KEYS: usize = 1000;
    const INSTANCES: usize = 3;
    const HOST: &str = "fleet.bench";
    if !installed("redis-server") {
        report.note(
            "fleet: redis-server is not installed (apt-get install -y redis-server); skipped"
                .into(),
        );
        return;
    }
    let origin = Origin::start(1024, Duration::from_millis(200), None).await;
    let storm = CacheSetup {
        ttl_secs: 1,
        grace_secs: 60,
        refresh_concurrency: 256,
        budget_mib: None,
        redis: None,
    };
    let mut rows: HashMap<&'static str, Vec<(f64, f64, f64)>> = HashMap::new();
    let mut hits: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for round in 0..options.rounds {
        for fleet_mode in [round % 2 == 0, round % 2 == 1] {
            let label = if fleet_mode {
                "3 instances, one Redis"
            } else {
                "3 independent instances"
            };
            // A fresh Redis per run: the runs share nothing.
            let redis_addr = free_port();
            let redis = if fleet_mode {
                let mut command = Command::new("redis-server");
                command.args([
                    "--port",
                    &redis_addr.port().to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]);
                let Some(proc) = spawn_quiet(&mut command, None) else {
                    report.problem("fleet: redis-server did not start".into());
                    return;
                };
                if !wait_listening(redis_addr).await {
                    report.problem("fleet: redis-server did not listen".into());
                    return;
                }
                Some(proc)
            } else {
                None
            };
            let setup = CacheSetup {
                redis: redis.as_ref().map(|_| redis_addr),
                ..storm
            };
            let mut targets = Vec::new();
            for _ in 0..INSTANCES {
                match start_target(Kind::SwrProxy, &origin, setup, KEYS, 1024).await {
                    Some(target) => targets.push(target),
                    None => {
                        report.problem(format!("fleet: {label}: swr-proxy did not start"));
                        return;
                    }
                }
            }
            for target in &targets {
                warm_as(target.addr, HOST, KEYS, 32).await;
            }
            origin.reset_counters();
            let duration = options.duration;
            let runs: Vec<_> = targets
                .iter()
                .map(|target| {
                    let addr = target.addr;
                    tokio::task::spawn_blocking(move || {
                        run_wrk_as(addr, Some(HOST), Traffic::uniform(KEYS, 1024), duration)
                    })
                })
                .collect();
            let mut results = Vec::new();
            for run in runs {
                results.push(run.await.ok().flatten());
            }
            let backend = origin.requests.load(Ordering::Relaxed) as f64;
            drop(targets);
            drop(redis);
            for result in &results {
                check_wrk(report, "fleet", label, result.as_ref());
            }
            let results: Vec<WrkResult> = results.into_iter().flatten().collect();
            if results.len() < INSTANCES {
                continue;
            }
            let periods = duration.as_secs_f64() / storm.ttl_secs as f64;
            let per_key_ttl = backend / (KEYS as f64 * periods);
            let p99 = results.iter().map(|r| r.p99_ms).fold(0.0, f64::max);
            let rps: f64 = results.iter().map(|r| r.rps).sum();
            eprintln!(
                "  fleet round {} {label}: backend {backend:.0} ({per_key_ttl:.2} per key per ttl), p99 {p99:.2} ms, {rps:.0} req/s",
                round + 1
            );
            rows.entry(label).or_default().push((per_key_ttl, p99, rps));
        }
        // One instance's warm hits, with and without --redis, in turn.
        let calm = CacheSetup {
            ttl_secs: 3600,
            ..storm
        };
        for fleet_mode in [round % 2 == 1, round % 2 == 0] {
            let redis_addr = free_port();
            let redis = if fleet_mode {
                let mut command = Command::new("redis-server");
                command.args([
                    "--port",
                    &redis_addr.port().to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]);
                let proc = spawn_quiet(&mut command, None);
                if proc.is_none() || !wait_listening(redis_addr).await {
                    report.problem("fleet: redis-server did not start".into());
                    return;
                }
                proc
            } else {
                None
            };
            let setup = CacheSetup {
                redis: redis.as_ref().map(|_| redis_addr),
                ..calm
            };
            let Some(target) = start_target(Kind::SwrProxy, &origin, setup, KEYS, 1024).await
            else {
                report.problem("fleet: swr-proxy did not start".into());
                return;
            };
            warm_as(target.addr, HOST, KEYS, 32).await;
            let addr = target.addr;
            let duration = options.duration;
            let result = tokio::task::spawn_blocking(move || {
                run_wrk_as(addr, Some(HOST), Traffic::uniform(KEYS, 1024), duration)
            })
            .await
            .ok()
            .flatten();
            drop(target);
            drop(redis);
            let label = if fleet_mode {
                "hits, --redis"
            } else {
                "hits, no --redis"
            };
            check_wrk(report, "fleet", label, result.as_ref());
            if let Some(r) = result {
                eprintln!("  fleet round {} {label}: {:.0} req/s", round + 1, r.rps);
                hits.entry(label).or_default().push(r.rps);
            }
        }
    }
    for label in ["3 instances, one Redis", "3 independent instances"] {
        let Some(runs) = rows.get(label) else {
            continue;
        };
        let per_key = median(runs.iter().map(|r| r.0).collect());
        let p99 = median(runs.iter().map(|r| r.1).collect());
        let rps = median(runs.iter().map(|r| r.2).collect());
        report.row(vec![
            "fleet".into(),
            label.into(),
            format!("{rps:.0}"),
            format!("{p99:.2}"),
            format!("{per_key:.2} backend requests per key per ttl (ideal 1)"),
        ]);
    }
    let with = hits.get("hits, --redis").map(|r| median(r.clone()));
    let without = hits.get("hits, no --redis").map(|r| median(r.clone()));
    if let (Some(with), Some(without)) = (with, without) {
        report.row(vec![
            "fleet".into(),
            "one instance's hits, --redis vs none".into(),
            format!("{with:.0} vs {without:.0}"),
            String::new(),
            ratio(with, without),
        ]);
    }
}

/// The herd: 200 clients ask for one cold key at once; the origin takes 500 ms.
async fn herd(report: &mut Report, options: &Options) {
    const CLIENTS: usize = 200;
    let delay = Duration::from_millis(500);
    let setup = CacheSetup {
        ttl_secs: 3600,
        grace_secs: 60,
        refresh_concurrency: 8,
        redis: None,
        budget_mib: None,
    };
    let mut rows: HashMap<&'static str, Vec<(u64, f64, f64)>> = HashMap::new();
    for round in 0..options.rounds {
        for kind in kinds_available() {
            let origin = Origin::start(1024, delay, None).await;
            let Some(target) = start_target(kind, &origin, setup, 1, 1024).await else {
                report.problem(format!("herd: {} did not start", kind.name()));
                continue;
            };
            let addr = target.addr;
            // Connect every client first, so the requests leave together.
            let mut senders = Vec::new();
            for _ in 0..CLIENTS {
                if let Ok(s) = connect(addr).await {
                    senders.push(s);
                }
            }
            let path = format!("/k/{}", 7 + round);
            let tasks: Vec<_> = senders
                .into_iter()
                .map(|mut sender| {
                    let path = path.clone();
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let ok = get(&mut sender, addr, &path).await == Ok(200);
                        (ok, started.elapsed())
                    })
                })
                .collect();
            let mut latencies = Vec::new();
            let mut failures = 0;
            for task in tasks {
                match task.await {
                    Ok((true, took)) => latencies.push(took.as_secs_f64() * 1e3),
                    _ => failures += 1,
                }
            }
            let backend = origin.requests.load(Ordering::Relaxed);
            drop(target);
            let max = latencies.iter().cloned().fold(0.0, f64::max);
            let p50 = median(latencies.clone());
            if failures > 0 {
                report.problem(format!(
                    "herd: {failures} of {CLIENTS} requests to {} failed",
                    kind.name()
                ));
            }
            eprintln!("  herd round {} {:<9} backend {backend}, p50 {p50:.1} ms, max {max:.1} ms, failures {failures}", round + 1, kind.name());
            rows.entry(kind.name())
                .or_default()
                .push((backend, p50, max));
        }
    }
    for kind in kinds_available() {
        let Some(runs) = rows.get(kind.name()) else {
            continue;
        };
        report.row(vec![
            "herd".into(),
            kind.name().into(),
            format!("backend {}", runs.iter().map(|r| r.0).max().unwrap_or(0)),
            format!("p50 {:.1} ms", median(runs.iter().map(|r| r.1).collect())),
            format!("max {:.1} ms", median(runs.iter().map(|r| r.2).collect())),
            format!("origin {} ms", delay.as_millis()),
            String::new(),
        ]);
    }
}

/// The origin of the refresh scenarios: answers `/k/<i>` (with `x-key: i`,
/// an `ETag` and a `Last-Modified`); while `limited`, after `latency` and
/// at most `slots` at once: past `slots / latency` answers a second the
/// others wait, so its latency climbs past its capacity, as a loaded
/// backend's does (before that, at once: the keys are stored in seconds).
/// Counts answers and the time they took.
struct SlowOrigin {
    addr: SocketAddr,
    answers: Arc<AtomicU64>,
    /// Microseconds from each request's arrival to its answer, summed.
    busy_us: Arc<AtomicU64>,
    limited: Arc<std::sync::atomic::AtomicBool>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl SlowOrigin {
    async fn start(latency: Duration, slots: usize) -> SlowOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let answers = Arc::new(AtomicU64::new(0));
        let busy_us = Arc::new(AtomicU64::new(0));
        let limited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let permits = Arc::new(tokio::sync::Semaphore::new(slots));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let last_modified =
            http::HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
                .expect("an HTTP date is a header value");
        let state = (answers.clone(), busy_us.clone(), limited.clone(), permits);
        tokio::spawn(serve(
            listener,
            stopped,
            move |request: Request<Incoming>| {
                let (answers, busy_us, limited, permits) = state.clone();
                let last_modified = last_modified.clone();
                async move {
                    let arrived = Instant::now();
                    if limited.load(Ordering::Relaxed) {
                        let _slot = permits.acquire_owned().await.ok();
                        tokio::time::sleep(latency).await;
                    }
                    let i = key_index(request.uri().path()).unwrap_or(0);
                    let mut response = Response::new(Full::new(body_for(i, 1024)));
                    let headers = response.headers_mut();
                    if let Ok(etag) = http::HeaderValue::from_str(&format!("\"k{i}\"")) {
                        headers.insert("etag", etag);
                    }
                    headers.insert("last-modified", last_modified);
                    headers.insert("x-key", http::HeaderValue::from(i));
                    answers.fetch_add(1, Ordering::Relaxed);
                    busy_us.fetch_add(arrived.elapsed().as_micros() as u64, Ordering::Relaxed);
                    response
                }
            },
        ));
        SlowOrigin {
            addr,
            answers,
            busy_us,
            limited,
            _stop: stop,
        }
    }
}

/// swr-proxy in front of `origin` with `flags`, its admin listener on a
/// port of its own; `listen`: its address (a free port when `None`).
async fn start_swr(
    origin: SocketAddr,
    flags: &[String],
    listen: Option<SocketAddr>,
) -> Option<(Proc, SocketAddr, SocketAddr)> {
    let [free, admin] = free_ports();
    let addr = listen.unwrap_or(free);
    let mut command = Command::new(SWR_PROXY);
    command
        .args(["--upstream", &format!("http://{origin}")])
        .args(["--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(flags)
        .env("RUST_LOG", "warn");
    let proc = spawn_quiet(&mut command, None)?;
    wait_listening(addr).await.then_some((proc, addr, admin))
}

/// Every series of swr-proxy's metrics at `admin`, by its full name.
async fn admin_metrics(admin: SocketAddr) -> HashMap<String, f64> {
    let Ok(mut sender) = connect(admin).await else {
        return HashMap::new();
    };
    let text = get_text(&mut sender, admin, "/metrics")
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile (0 to 1) of `swr_served_age_ttl_ratio{route="default"}`
/// between two scrapes, interpolated within its bucket as Prometheus'
/// `histogram_quantile` does.
fn age_ratio_quantile(before: &HashMap<String, f64>, after: &HashMap<String, f64>, q: f64) -> f64 {
    let prefix = "swr_served_age_ttl_ratio_bucket{route=\"default\",le=\"";
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(name, count)| {
            let le = name.strip_prefix(prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, count - before.get(name).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, cumulative) in &buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return lower.0;
            }
            let within = (cumulative - lower.1).max(1.0);
            return lower.0 + (bound - lower.0) * (rank - lower.1) / within;
        }
        lower = (bound, cumulative);
    }
    f64::NAN
}

/// Issue 20's benchmark: Zipf (s = 1) over `zipf_keys` keys, `--ttl 5s`,
/// a backend of 100 ms that answers 200 a second (20 at once; past that
/// its latency climbs), under `--refresh-duration` of wrk, for four
/// settings of the refresh queue: what users were served (age over ttl,
/// p50 and p99, request-weighted; the share of stale answers for the top 1%
/// of keys) and what the backend did (answers a second, mean latency).
async fn refresh_order(report: &mut Report, options: &Options) {
    let keys = options.zipf_keys;
    let top = (keys / 100).max(1);
    let duration = options.refresh_duration;
    let configs: [(&str, &[&str]); 4] = [
        (
            "ceiling 8, FIFO (the old 8 workers)",
            &[
                "--refresh-concurrency",
                "8",
                "--refresh-priority=false",
                "--refresh-ahead",
                "0",
            ],
        ),
        (
            "adaptive, FIFO",
            &["--refresh-priority=false", "--refresh-ahead", "0"],
        ),
        ("adaptive + priority", &["--refresh-ahead", "0"]),
        ("adaptive + priority + refresh-ahead (defaults)", &[]),
    ];
    for (label, extra) in configs {
        // A new origin per run: no refresh of the run before reaches it.
        let origin = SlowOrigin::start(Duration::from_millis(100), 20).await;
        let mut flags: Vec<String> = ["--ttl", "5s"].iter().map(|s| s.to_string()).collect();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let Some((proc, addr, admin)) = start_swr(origin.addr, &flags, None).await else {
            report.problem(format!("refresh-order: swr-proxy ({label}) did not start"));
            continue;
        };
        // Every key stored at once (the backend unlimited meanwhile), then
        // the backend at its capacity.
        warm(addr, keys, 64).await;
        origin.limited.store(true, Ordering::Relaxed);
        let before = admin_metrics(admin).await;
        let answers_before = origin.answers.load(Ordering::Relaxed);
        let busy_before = origin.busy_us.load(Ordering::Relaxed);
        let env = [
            ("KEYS", keys.to_string()),
            ("ZIPF", "1".to_string()),
            ("TOP", top.to_string()),
        ];
        let text =
            tokio::task::spawn_blocking(move || wrk_output(WRK_SCRIPT, addr, duration, "5s", &env))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
        let after = admin_metrics(admin).await;
        let answers = origin.answers.load(Ordering::Relaxed) - answers_before;
        let busy_us = origin.busy_us.load(Ordering::Relaxed) - busy_before;
        drop(proc);
        let Some(line) = text.lines().find(|l| l.starts_with("RESULT ")) else {
            report.problem(format!("refresh-order: wrk gave no result for {label}"));
            continue;
        };
        let field = |name: &str| result_field::<f64>(line, name).unwrap_or(0.0);
        let requests = field("requests");
        let p50 = age_ratio_quantile(&before, &after, 0.5);
        let p99 = age_ratio_quantile(&before, &after, 0.99);
        let top_stale = field("top_stale") / field("top_answers").max(1.0);
        let per_s = answers as f64 / duration.as_secs_f64();
        let latency_ms = busy_us as f64 / answers.max(1) as f64 / 1e3;
        eprintln!(
            "  refresh-order {label}: age/ttl p50 {p50:.2} p99 {p99:.2}, top 1% stale {:.2}%, backend {per_s:.0}/s at {latency_ms:.0} ms",
            top_stale * 100.0
        );
        report.row(vec![
            "refresh-order".into(),
            label.into(),
            format!("{:.0}", requests / duration.as_secs_f64()),
            format!("{:.2}", field("p99_us") / 1e3),
            format!("age/ttl p50 {p50:.2} p99 {p99:.2}"),
            format!("top 1% stale {:.2}%", top_stale * 100.0),
            format!("backend {per_s:.0}/s at {latency_ms:.0} ms"),
        ]);
    }
}

/// Restart under load: Zipf traffic over `zipf_keys` keys (all stored,
/// a long ttl), swr-proxy stopped (SIGTERM) and started again on the same
/// port, with and without `--snapshot-dir`: the time until the hit ratio
/// (over the last second, from its own counters) is back to 95% of the
/// ratio before the restart.
async fn restart(report: &mut Report, options: &Options) {
    let keys = options.zipf_keys;
    let origin = Origin::start(1024, Duration::from_millis(20), None).await;
    let traffic = Traffic {
        zipf: 1.0,
        ..Traffic::uniform(keys, 1024)
    };
    let hits = |m: &HashMap<String, f64>| {
        ["HIT", "STALE"]
            .iter()
            .map(|c| {
                m.get(&format!("swr_requests_total{{cache=\"{c}\"}}"))
                    .copied()
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let total = |m: &HashMap<String, f64>| {
        m.iter()
            .filter(|(k, _)| k.starts_with("swr_requests_total{"))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let before_for = options.duration.min(Duration::from_secs(5));
    let cap = options.refresh_duration;
    for snapshot in [true, false] {
        let label = if snapshot {
            "with --snapshot-dir"
        } else {
            "without a snapshot"
        };
        let dir = scratch_dir("snapshot");
        let _ = std::fs::create_dir_all(&dir);
        let mut flags: Vec<String> = vec!["--ttl".into(), "3600s".into()];
        if snapshot {
            flags.extend(["--snapshot-dir".into(), dir.display().to_string()]);
        }
        let Some((first, addr, admin)) = start_swr(origin.addr, &flags, None).await else {
            report.problem(format!("restart: swr-proxy ({label}) did not start"));
            continue;
        };
        warm(addr, keys, 64).await;
        let start = admin_metrics(admin).await;
        let run = traffic;
        tokio::task::spawn_blocking(move || run_wrk(addr, run, before_for))
            .await
            .ok()
            .flatten();
        let end = admin_metrics(admin).await;
        let ratio_before = (hits(&end) - hits(&start)) / (total(&end) - total(&start)).max(1.0);
        drop(first); // SIGTERM: the snapshot is written as it stops.
        let stopped = Instant::now();
        let Some((second, _, admin)) = start_swr(origin.addr, &flags, Some(addr)).await else {
            report.problem(format!("restart: swr-proxy ({label}) did not start again"));
            continue;
        };
        let down = stopped.elapsed();
        let run = traffic;
        let load = tokio::task::spawn_blocking(move || run_wrk(addr, run, cap));
        let began = Instant::now();
        let mut samples: Vec<(Instant, f64, f64)> = Vec::new();
        let mut back = None;
        while began.elapsed() < cap {
            let m = admin_metrics(admin).await;
            let now = Instant::now();
            samples.push((now, hits(&m), total(&m)));
            // The ratio over the last second of samples.
            let window = samples
                .iter()
                .find(|s| now.duration_since(s.0) <= Duration::from_secs(1));
            if let Some(&(at, h0, t0)) = window {
                let (h1, t1) = (hits(&m), total(&m));
                if now.duration_since(at) >= Duration::from_millis(900)
                    && t1 - t0 > 100.0
                    && (h1 - h0) / (t1 - t0) >= 0.95 * ratio_before
                {
                    back = Some(at.duration_since(began));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = load.await;
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
        let back_text = back.map_or_else(
            || format!("not within {} s", cap.as_secs()),
            |d| format!("{:.1} s", d.as_secs_f64()),
        );
        eprintln!(
            "  restart {label}: hit ratio before {ratio_before:.3}, down {:.1} s, back to 95% in {back_text}",
            down.as_secs_f64()
        );
        report.row(vec![
            "restart".into(),
            label.into(),
            format!("hit ratio before {ratio_before:.3}"),
            format!("down {:.1} s", down.as_secs_f64()),
            format!("back to 95% in {back_text}"),
        ]);
    }
}

/// Memory per cached 1 KiB object, 100,000 objects: (PSS after - PSS
/// before) / objects, PSS (the process's proportional set size, which
/// counts shared pages once) read from `/proc/<pid>/smaps_rollup`, summed
/// over the target's processes, plus nginx's cache files; RSS the same way
/// beside it.
async fn memory(report: &mut Report, options: &Options) {
    let keys = options.memory_keys;
    let origin = Origin::start(1024, Duration::ZERO, None).await;
    let setup = CacheSetup {
        ttl_secs: 3600,
        grace_secs: 60,
        refresh_concurrency: 8,
        redis: None,
        budget_mib: None,
    };
    for kind in kinds_available() {
        let Some(target) = start_target(kind, &origin, setup, keys, 1024).await else {
            report.problem(format!("memory: {} did not start", kind.name()));
            continue;
        };
        // One key first, so every connection- and thread-related allocation is there.
        warm(target.addr, 1, 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let files = || target.cache_dir.as_deref().map_or(0, dir_bytes);
        let before = (
            pss_bytes(&target.pids) + files(),
            rss_bytes(&target.pids) + files(),
        );
        warm(target.addr, keys, 32).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = (
            pss_bytes(&target.pids) + files(),
            rss_bytes(&target.pids) + files(),
        );
        let per_object =
            |after: u64, before: u64| after.saturating_sub(before) as f64 / keys as f64;
        let pss = per_object(after.0, before.0);
        let rss = per_object(after.1, before.1);
        eprintln!(
            "  memory {:<9} {pss:.0} B per object (PSS), {rss:.0} (RSS)",
            kind.name()
        );
        report.row(vec![
            "memory".into(),
            kind.name().into(),
            format!("{pss:.0} B/object (PSS)"),
            format!("{rss:.0} B/object (RSS), {keys} objects of 1 KiB"),
            String::new(),
            String::new(),
            String::new(),
        ]);
        drop(target);
    }
}

/// The zipf scenario's note: each cache's median hit ratio (`hit_ratios`,
/// by target), and an LRU's on the same traffic, of the size swr-proxy
/// ended its rounds with (`entries_stored`, its entries by round).
fn hit_ratio_note(
    kinds: &[Kind],
    hit_ratios: &HashMap<&'static str, Vec<f64>>,
    entries_stored: Vec<f64>,
    traffic: Traffic,
) -> String {
    let mut listed: Vec<String> = kinds
        .iter()
        .filter(|k| !matches!(k, Kind::Limit | Kind::LimitWire | Kind::LimitRaw))
        .map(|k| {
            let ratio = median(hit_ratios.get(k.name()).cloned().unwrap_or_default());
            format!("{} {ratio:.3}", k.name())
        })
        .collect();
    let capacity = median(entries_stored).max(0.0);
    if capacity.is_finite() && capacity >= 1.0 {
        let lru = lru_hit_ratio(traffic.keys, traffic.zipf, capacity as usize, 42);
        listed.push(format!(
            "LRU {lru:.3} (simulated, of swr-proxy's size: {capacity:.0} objects)"
        ));
    }
    format!(
        "hit ratio (1 - backend requests / requests, median): {}",
        listed.join(", ")
    )
}

/// The hit ratio of an LRU cache of `capacity` objects under requests for
/// `keys` keys by a Zipf law of exponent `s` (key i with weight
/// 1/(i+1)^s), measured over 2,000,000 requests after 1,000,000 that fill
/// it: the reference the zipf scenario's hit ratio is held to.
fn lru_hit_ratio(keys: usize, s: f64, capacity: usize, seed: u64) -> f64 {
    const NONE: usize = usize::MAX;
    let mut cdf = Vec::with_capacity(keys);
    let mut total = 0.0;
    for i in 1..=keys {
        total += 1.0 / (i as f64).powf(s);
        cdf.push(total);
    }
    // splitmix64, for draws in [0, 1).
    let mut state = seed;
    let mut draw = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * total
    };
    // A doubly linked list over the keys, most recent at `head`.
    let (mut prev, mut next) = (vec![NONE; keys], vec![NONE; keys]);
    let mut cached = vec![false; keys];
    let (mut head, mut tail, mut size) = (NONE, NONE, 0usize);
    let (mut hits, mut counted) = (0u64, 0u64);
    for n in 0..3_000_000u64 {
        let u = draw();
        let key = cdf.partition_point(|c| *c < u).min(keys - 1);
        let hit = cached[key];
        if hit {
            // Unlink.
            if prev[key] != NONE {
                next[prev[key]] = next[key];
            } else {
                head = next[key];
            }
            if next[key] != NONE {
                prev[next[key]] = prev[key];
            } else {
                tail = prev[key];
            }
        } else {
            if size == capacity {
                let old = tail;
                tail = prev[old];
                if tail != NONE {
                    next[tail] = NONE;
                } else {
                    head = NONE;
                }
                cached[old] = false;
                size -= 1;
            }
            cached[key] = true;
            size += 1;
        }
        // Link at the head.
        prev[key] = NONE;
        next[key] = head;
        if head != NONE {
            prev[head] = key;
        }
        head = key;
        if tail == NONE {
            tail = key;
        }
        if n >= 1_000_000 {
            counted += 1;
            hits += u64::from(hit);
        }
    }
    hits as f64 / counted.max(1) as f64
}

/// The value of a series in swr-proxy's metrics at `admin`.
/// swr-proxy's answers so far as (stale, all), from its admin listener;
/// `None` for the other caches.
async fn answers_by_status(admin: Option<SocketAddr>) -> Option<(f64, f64)> {
    let metrics = admin_metrics(admin?).await;
    let count = |status: &str| {
        metrics
            .get(&format!("swr_requests_total{{cache=\"{status}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let all = ["HIT", "STALE", "MISS", "EXPIRED", "BYPASS"].map(count);
    Some((count("STALE"), all.iter().sum()))
}

/// The share of answers served stale between two [`answers_by_status`].
fn stale_share(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((stale0, all0), (stale1, all1)) = (before?, after?);
    (all1 > all0).then(|| (stale1 - stale0) / (all1 - all0))
}

async fn admin_metric(admin: Option<SocketAddr>, series: &str) -> Option<f64> {
    let admin = admin?;
    let mut sender = connect(admin).await.ok()?;
    let text = get_text(&mut sender, admin, "/metrics").await.ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------- report

/// The table of results, and what went wrong on the way: a target that
/// did not start, a wrk run without a result, or answers that failed. A run
/// with problems exits with status 1.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Vec<String>>,
    /// Printed under the table: figures that do not fit a row.
    pub notes: Vec<String>,
    pub problems: Vec<String>,
}

impl Report {
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    fn problem(&mut self, text: String) {
        eprintln!("  PROBLEM: {text}");
        self.problems.push(text);
    }

    /// The row of `scenario` for `target`.
    pub fn row_for(&self, scenario: &str, target: &str) -> Option<&[String]> {
        self.rows
            .iter()
            .find(|row| {
                row.first().is_some_and(|s| s == scenario)
                    && row.get(1).is_some_and(|t| t == target)
            })
            .map(Vec::as_slice)
    }

    fn print(&self, options: &Options) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "\nmedians of {} interleaved round(s), wrk -t1 -c64 -d{}s, {} cores\n",
            options.rounds,
            options.duration.as_secs(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(out, "| scenario | target | req/s or result | p99 ms or result | vs limit | vs nginx | vs varnish | CPU us/req |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let mut cells = row.clone();
            cells.resize(8, String::new());
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nproblems:");
            for problem in &self.problems {
                let _ = writeln!(out, "- {problem}");
            }
        }
    }
}

fn main() {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    if !installed("wrk") {
        eprintln!("load: wrk is not installed (apt-get install -y wrk)");
        std::process::exit(1);
    }
    let report = run(&options);
    report.print(&options);
    if !report.problems.is_empty() {
        std::process::exit(1);
    }
}

/// Runs the scenarios `options` asks for and returns their table.
pub fn run(options: &Options) -> Report {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(path) = &options.baseline {
        let _ = BASELINE.set((path.clone(), options.baseline_args.clone()));
    }
    let mut report = Report::default();
    runtime.block_on(async {
        let hit_keys = options.hit_keys;
        if options.wants("hits-1k") {
            let traffic = Traffic::uniform(hit_keys, 1024);
            throughput(&mut report, options, "hits-1k", traffic).await;
        }
        if options.wants("hits-64k") {
            let traffic = Traffic::uniform(hit_keys, 64 * 1024);
            throughput(&mut report, options, "hits-64k", traffic).await;
        }
        if options.wants("hot-1k") {
            throughput(&mut report, options, "hot-1k", Traffic::uniform(1, 1024)).await;
        }
        // Keep-alive connections that meet misses, as a load balancer's
        // or an application's pool does: 1% and 5% of requests on new URLs.
        for (scenario, share) in [("mix-1pct", 0.01), ("mix-5pct", 0.05)] {
            if options.wants(scenario) {
                let traffic = Traffic {
                    new_share: share,
                    ..Traffic::uniform(hit_keys, 1024)
                };
                throughput(&mut report, options, scenario, traffic).await;
            }
        }
        // wrk starts on an empty cache: every key's first request is a miss
        // on a keep-alive connection.
        if options.wants("cold-1k") {
            let traffic = Traffic {
                warm: false,
                ..Traffic::uniform(hit_keys, 1024)
            };
            throughput(&mut report, options, "cold-1k", traffic).await;
        }
        // Popularity by a Zipf law (s = 1) over more keys than the budget
        // holds: about 1/8 of them (at least 8 MiB, swr-proxy's default
        // --max-object-size).
        if options.wants("zipf") {
            let keys = options.zipf_keys;
            let traffic = Traffic {
                zipf: 1.0,
                budget_mib: Some((keys as u64 * 1024 / 8).div_ceil(1 << 20).max(8)),
                ..Traffic::uniform(keys, 1024)
            };
            throughput(&mut report, options, "zipf", traffic).await;
        }
        if options.wants("stale-storm") {
            stale_storm(&mut report, options).await;
        }
        if options.wants("herd") {
            herd(&mut report, options).await;
        }
        if options.wants("fleet") {
            fleet(&mut report, options).await;
        }
        if options.wants("refresh-order") {
            refresh_order(&mut report, options).await;
        }
        if options.wants("restart") {
            restart(&mut report, options).await;
        }
        if options.wants("memory") {
            memory(&mut report, options).await;
        }
    });
    report
}
