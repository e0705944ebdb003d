//! The soak: swr-proxy (the release binary) under wrk for minutes, against a
//! backend whose answers live one second and fail one time in five, with
//! slow readers that request large objects and never read.
//!
//! ```sh
//! cargo bench --bench soak                        # 5 minutes
//! cargo bench --bench soak -- --duration 60       # 1 minute
//! cargo bench --bench soak -- --duration 600 --slow-readers 32
//! cargo bench --bench soak -- --duration 40 --unique 0  # no new URLs: nothing evicted
//! ```
//!
//! - The origin runs in this process: every answer has `Cache-Control:
//!   max-age=1`, an `ETag` (which changes every 10 s; a matching
//!   `If-None-Match` is a 304) and `Last-Modified`, and an `X-Path` naming
//!   the URL it answers; every fifth request to `/k/` and `/u/` is a 500
//!   (without `Cache-Control`). `/big/N` is 6 MiB, for the slow readers,
//!   and does not fail.
//! - swr-proxy runs with its defaults and `--stale-if-error 1h`.
//! - The keys `/k/0` .. `/k/999` are fetched (until a 200) before the run.
//!   wrk (`benches/soak.lua`) then asks for them, and with probability 5% for
//!   a URL never asked before (`/u/...`, 16 KiB each, so that the cache
//!   reaches its 256 MiB budget within the first minute and what RSS does
//!   after is not the cache filling).
//! - Slow readers: raw sockets with a 4 KiB receive buffer that request a
//!   `/big/N` each and never read; replaced by new ones on new objects every
//!   minute (the old ones closed).
//!
//! At the end it prints and checks:
//! - no 5xx for the warmed keys (each had a stale copy, so the origin's
//!   500s are covered by stale-if-error), and none without `X-Path` (made
//!   by swr-proxy itself, so not attributable to a key);
//! - RSS (`VmRSS`) at the end of the load within 10% of RSS at minute 1:
//!   the highest of the minute from minute 1 to 2 against the highest of
//!   the last minute, sampled every 200 ms (the slow readers' rounds swing
//!   it by tens of MiB within a minute, so two single samples compare
//!   points of a round, not minutes; the first minute is the cache filling);
//!   the single samples at minute 1 and at the end are printed too;
//! - once the load and the slow readers are gone: the refresh queue
//!   drained and no refresh or upstream request in flight
//!   (`swr_refresh_queue_depth`, `swr_refresh_in_flight`,
//!   `swr_upstream_in_flight` on the admin `/metrics`), no client
//!   connection open (swr-proxy's sockets on its listening port, from
//!   `/proc/PID/fd` and `/proc/net/tcp`) and its thread count back at its
//!   baseline (taken after warming: the runtime's threads, tokio's
//!   blocking pool included).
//!
//! It exits with status 1 when a check fails. Not run by `cargo test`.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

// The origin's server loop, process and socket helpers of the load harness.
#[allow(dead_code)]
#[path = "load.rs"]
mod load;

const SWR_PROXY: &str = env!("CARGO_BIN_EXE_swr-proxy");
const WRK_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/soak.lua");

const KEYS: usize = 1000;
const KEY_BODY: usize = 1024;
const UNIQUE_BODY: usize = 16 * 1024;
const BIG_BODY: usize = 6 << 20;
/// One request in this many to `/k/` and `/u/` fails.
const FAIL_EVERY: u64 = 5;
/// The ETag changes this often.
const GENERATION: Duration = Duration::from_secs(10);
/// Slow readers are replaced this often.
const SLOW_READER_ROUND: Duration = Duration::from_secs(60);
/// How long the counts may take to settle once the load stops.
const SETTLE: Duration = Duration::from_secs(30);

struct Options {
    duration: Duration,
    slow_readers: usize,
    /// The share of requests for URLs never asked before.
    unique: f64,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options {
            duration: Duration::from_secs(300),
            slow_readers: 8,
            unique: 0.05,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {} // passed by `cargo bench`
                "--duration" => {
                    let secs: u64 = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| *n >= 10)
                        .ok_or("--duration takes whole seconds, at least 10")?;
                    options.duration = Duration::from_secs(secs);
                }
                "--slow-readers" => {
                    options.slow_readers = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--slow-readers takes a whole number")?;
                }
                "--unique" => {
                    options.unique = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|s| (0.0..=1.0).contains(s))
                        .ok_or("--unique takes a share from 0 to 1, e.g. 0.05")?;
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(options)
    }
}

// ---------------------------------------------------------------- origin

#[derive(Default)]
struct OriginCounts {
    requests: AtomicU64,
    failures: AtomicU64,
    not_modified: AtomicU64,
}

/// The origin's answer to `request`, the `n`th request it got.
fn origin_answer(
    request: &Request<Incoming>,
    n: u64,
    started: Instant,
    counts: &OriginCounts,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let big = path.starts_with("/big/");
    let mut response = Response::builder().header("x-path", path);
    if !big && n % FAIL_EVERY == 0 {
        counts.failures.fetch_add(1, Relaxed);
        return response
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Full::new(Bytes::from_static(b"backend failure\n")))
            .unwrap_or_default();
    }
    let generation = started.elapsed().as_secs() / GENERATION.as_secs();
    let etag = format!("\"{generation}\"");
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + generation * 10);
    response = response
        .header("cache-control", "max-age=1")
        .header("etag", &etag)
        .header("last-modified", httpdate::fmt_http_date(modified));
    let matches = request
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    if matches {
        counts.not_modified.fetch_add(1, Relaxed);
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    let size = if big {
        BIG_BODY
    } else if path.starts_with("/u/") {
        UNIQUE_BODY
    } else {
        KEY_BODY
    };
    let mut body = format!("{path} generation {generation}\n").into_bytes();
    body.resize(size.max(body.len()), b'x');
    response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn start_origin(counts: Arc<OriginCounts>) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    tokio::spawn(load::serve(listener, stopped, move |request| {
        let counts = Arc::clone(&counts);
        async move {
            let n = counts.requests.fetch_add(1, Relaxed) + 1;
            origin_answer(&request, n, started, &counts)
        }
    }));
    (addr, stop)
}

// ---------------------------------------------------------------- the proxy, seen from outside

/// The admin `/metrics` text.
async fn metrics(admin: SocketAddr) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
        return String::new();
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of an unlabelled metric (or the sum of a labelled one's
/// series whose labels contain `labels`).
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// swr-proxy's sockets: (client connections on `listen`, connections to
/// `origin`), from its file descriptors and the kernel's TCP tables.
fn sockets(pid: u32, listen: SocketAddr, origin: SocketAddr) -> (usize, usize) {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    link.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let (mut clients, mut upstream) = (0, 0);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let port = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            let listening = *state == "0A";
            if listening || !inode.parse().is_ok_and(|i: u64| inodes.contains(&i)) {
                continue;
            }
            if port(local) == Some(listen.port()) {
                clients += 1;
            } else if port(remote) == Some(origin.port()) {
                upstream += 1;
            }
        }
    }
    (clients, upstream)
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}

// ---------------------------------------------------------------- clients

/// Fetches every warmed key until it answers 200, so each has a stored copy.
async fn warm(addr: SocketAddr) -> Result<(), String> {
    let mut sender = load::connect(addr).await?;
    for i in 0..KEYS {
        let path = format!("/k/{i}");
        let mut tries = 0;
        loop {
            match load::get(&mut sender, addr, &path).await {
                Ok(200) => break,
                Ok(_) => {}
                Err(_) => sender = load::connect(addr).await?,
            }
            tries += 1;
            if tries == 20 {
                return Err(format!("{path} never answered 200"));
            }
        }
    }
    Ok(())
}

/// A client that requests `/big/{n}` and never reads the answer.
async fn slow_reader(addr: SocketAddr, n: u64) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_recv_buffer_size(4096).ok()?;
    let mut stream = socket.connect(addr).await.ok()?;
    let request = format!("GET /big/{n} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    Some(stream)
}

struct WrkResult {
    line: String,
}

impl WrkResult {
    fn field(&self, name: &str) -> u64 {
        load::result_field(&self.line, name).unwrap_or(0)
    }
}

fn run_wrk(addr: SocketAddr, duration: Duration, unique: f64) -> Result<WrkResult, String> {
    let env = [("KEYS", KEYS.to_string()), ("UNIQUE", unique.to_string())];
    let text =
        load::wrk_output(WRK_SCRIPT, addr, duration, "10s", &env).ok_or("wrk did not run")?;
    // The first few 5xx on warmed keys, with their X-Cache and Cache-Status.
    for line in text.lines().filter(|l| l.starts_with("WARM5XX ")) {
        println!("{line}");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| format!("wrk printed no RESULT line: {text}"))?;
    Ok(WrkResult {
        line: line.to_string(),
    })
}

// ---------------------------------------------------------------- the run

/// What the run measured, and which checks failed.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    failed: Vec<String>,
}

impl Report {
    fn say(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }

    fn check(&mut self, ok: bool, what: String) {
        let line = format!("{} {what}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failed.push(what);
        }
        self.say(line);
    }
}

async fn soak(options: &Options) -> Result<Report, String> {
    let mut report = Report::default();
    let counts = Arc::new(OriginCounts::default());
    let (origin, _stop_origin) = start_origin(Arc::clone(&counts)).await;
    let [listen, admin] = load::free_ports();
    let log_path = std::env::temp_dir().join(format!("swr-soak-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).map_err(|e| format!("log file: {e}"))?;
    let child = Command::new(SWR_PROXY)
        .args([
            "--upstream",
            &format!("http://{origin}"),
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--stale-if-error",
            "1h",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {SWR_PROXY}: {e}"))?;
    let proxy = load::Proc { child, dir: None };
    let pid = proxy.pid();
    if !load::wait_listening(listen).await || !load::wait_listening(admin).await {
        return Err(format!(
            "swr-proxy did not listen (log: {})",
            log_path.display()
        ));
    }
    warm(listen).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_threads = threads(pid);
    let (baseline_clients, _) = sockets(pid, listen, origin);
    report.say(format!(
        "swr-proxy {SWR_PROXY} (pid {pid}), defaults and --stale-if-error 1h; log {}",
        log_path.display()
    ));
    report.say(format!(
        "baseline after warming {KEYS} keys: RSS {}, {baseline_threads} threads, {baseline_clients} client connections",
        mib(load::rss_bytes(&[pid]) as f64)
    ));

    let duration = options.duration;
    let unique = options.unique;
    let wrk = tokio::task::spawn_blocking(move || run_wrk(listen, duration, unique));
    let started = Instant::now();
    let minute_one = Duration::from_secs(60).min(duration / 2);
    let mut readers = Vec::new();
    let mut next_big = 0u64;
    let mut next_round = Instant::now();
    let mut rss_minute_one = None;
    // The highest RSS of each minute (the slow readers' round), sampled
    // every 200 ms: RSS swings by tens of MiB within a round, as each
    // round's objects are stored, evicted and held by the readers.
    let mut peaks: Vec<u64> = Vec::new();
    let mut last_print = Instant::now();
    while !wrk.is_finished() {
        if Instant::now() >= next_round {
            readers.clear(); // closes the last round's sockets
            for _ in 0..options.slow_readers {
                if let Some(stream) = slow_reader(listen, next_big).await {
                    readers.push(stream);
                }
                next_big += 1;
            }
            next_round += SLOW_READER_ROUND;
        }
        if rss_minute_one.is_none() && started.elapsed() >= minute_one {
            let text = metrics(admin).await;
            let rss = load::rss_bytes(&[pid]);
            rss_minute_one = Some(rss);
            report.say(format!(
                "at {}s (minute 1): RSS {}, cache {} of {}",
                minute_one.as_secs(),
                mib(rss as f64),
                mib(metric(&text, "swr_cache_bytes", "")),
                mib(metric(&text, "swr_cache_max_bytes", "")),
            ));
        }
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            let text = metrics(admin).await;
            let (clients, upstream) = sockets(pid, listen, origin);
            report.say(format!(
                "  {:>4}s: RSS {}, cache {} ({} entries), refresh queue {}, {clients} client / {upstream} upstream connections, stale-if-error {}",
                started.elapsed().as_secs(),
                mib(load::rss_bytes(&[pid]) as f64),
                mib(metric(&text, "swr_cache_bytes", "")),
                metric(&text, "swr_cache_entries", ""),
                metric(&text, "swr_refresh_queue_depth", ""),
                metric(&text, "swr_stale_if_error_total", ""),
            ));
        }
        let period = (started.elapsed().as_millis() / minute_one.as_millis()) as usize;
        if peaks.len() <= period {
            peaks.resize(period + 1, 0);
        }
        peaks[period] = peaks[period].max(load::rss_bytes(&[pid]));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_end = load::rss_bytes(&[pid]);
    let result = wrk.await.map_err(|e| format!("wrk task: {e}"))??;
    let readers_open = readers.len();
    drop(readers);

    // Let what is in flight finish: refreshes, connections closing.
    let settle_start = Instant::now();
    let (mut text, mut clients, mut upstream_sockets);
    loop {
        text = metrics(admin).await;
        (clients, upstream_sockets) = sockets(pid, listen, origin);
        let settled = metric(&text, "swr_refresh_queue_depth", "") == 0.0
            && metric(&text, "swr_refresh_in_flight", "") == 0.0
            && metric(&text, "swr_upstream_in_flight", "") == 0.0
            && clients <= baseline_clients
            && threads(pid) <= baseline_threads;
        if settled || settle_start.elapsed() >= SETTLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled_in = settle_start.elapsed();

    let requests = result.field("requests");
    let secs = result.field("duration_us") as f64 / 1e6;
    report.say(format!(
        "wrk -t1 -c64 -d{}s: {requests} requests ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} socket errors, {} timeouts",
        duration.as_secs(),
        requests as f64 / secs.max(1e-9),
        result.field("p50_us") as f64 / 1e3,
        result.field("p99_us") as f64 / 1e3,
        result.field("max_us") as f64 / 1e3,
        result.field("socket_errors"),
        result.field("timeouts"),
    ));
    report.say(format!(
        "origin: {} requests, {} answered 500, {} answered 304; swr-proxy: stale-if-error {}, refreshes failed {}, revalidated {}, evictions {}; {} slow readers on {next_big} objects of {}",
        counts.requests.load(Relaxed),
        counts.failures.load(Relaxed),
        counts.not_modified.load(Relaxed),
        metric(&text, "swr_stale_if_error_total", ""),
        metric(&text, "swr_refresh_events_total", "event=\"failed\""),
        metric(&text, "swr_revalidated_total", ""),
        metric(&text, "swr_cache_evictions_total", ""),
        readers_open,
        mib(BIG_BODY as f64),
    ));
    report.say(format!(
        "5xx answers: {} on warmed keys ({} of them with X-Cache MISS or BYPASS: swr-proxy no longer held the key, evicted), {} on never-seen URLs (no stale copy: expected), {} without X-Path",
        result.field("warm_5xx"),
        result.field("warm_5xx_no_copy"),
        result.field("unique_5xx"),
        result.field("unknown_5xx"),
    ));
    report.check(
        counts.failures.load(Relaxed) > 0 && result.field("answers") > 0,
        format!(
            "the origin failed {} times under {} answers",
            counts.failures.load(Relaxed),
            result.field("answers")
        ),
    );
    report.check(
        result.field("warm_5xx") == 0 && result.field("unknown_5xx") == 0,
        format!(
            "zero 5xx for keys with a stale copy ({} on warmed keys, {} from swr-proxy itself)",
            result.field("warm_5xx"),
            result.field("unknown_5xx")
        ),
    );
    let with_copy = result.field("warm_5xx") - result.field("warm_5xx_no_copy");
    report.check(
        with_copy == 0,
        format!("zero 5xx answered while swr-proxy held a copy of the key: {with_copy}"),
    );
    let rss_one = rss_minute_one.unwrap_or(rss_end) as f64;
    report.say(format!(
        "RSS at {}s and at the end: {} -> {} ({:+.1}%; one sample each, at whatever point of a round)",
        minute_one.as_secs(),
        mib(rss_one),
        mib(rss_end as f64),
        (rss_end as f64 - rss_one) / rss_one * 100.0
    ));
    report.say(format!(
        "RSS peak of each {}s: {}",
        minute_one.as_secs(),
        peaks
            .iter()
            .map(|p| mib(*p as f64))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // The minute from minute 1 on against the last whole minute. Not the
    // first minute: the cache fills in it, and its slow readers' objects
    // are stored in a cache not yet full, so none is evicted and held.
    let whole =
        ((duration.as_millis() / minute_one.as_millis()) as usize).clamp(1, peaks.len().max(1));
    let first = peaks.get(1.min(whole - 1)).copied().unwrap_or(0) as f64;
    let last = peaks.get(whole - 1).copied().unwrap_or(0) as f64;
    let change = (last - first) / first.max(1.0);
    report.check(
        change.abs() <= 0.10,
        format!(
            "RSS within 10% between minute 1 and the end (peak of minute 1-2 and of the last whole minute): {} -> {} ({:+.1}%)",
            mib(first),
            mib(last),
            change * 100.0
        ),
    );
    report.check(
        metric(&text, "swr_refresh_queue_depth", "") == 0.0
            && metric(&text, "swr_refresh_in_flight", "") == 0.0,
        format!(
            "refresh queue drained {:.1}s after the load: depth {}, in flight {}",
            settled_in.as_secs_f64(),
            metric(&text, "swr_refresh_queue_depth", ""),
            metric(&text, "swr_refresh_in_flight", ""),
        ),
    );
    report.check(
        metric(&text, "swr_upstream_in_flight", "") == 0.0,
        format!(
            "no upstream request in flight: {}",
            metric(&text, "swr_upstream_in_flight", "")
        ),
    );
    report.check(
        clients <= baseline_clients,
        format!(
            "client connections back to baseline: {clients} (baseline {baseline_clients}); {upstream_sockets} idle upstream connections pooled"
        ),
    );
    let threads_end = threads(pid);
    report.check(
        threads_end <= baseline_threads,
        format!("threads back to baseline: {threads_end} (baseline {baseline_threads})"),
    );
    report.say(format!(
        "RSS after settling: {}",
        mib(load::rss_bytes(&[pid]) as f64)
    ));
    drop(proxy);
    Ok(report)
}

fn main() {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    if !load::installed("wrk") {
        eprintln!("soak: wrk is not installed (apt-get install -y wrk)");
        std::process::exit(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = match runtime.block_on(soak(&options)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    };
    let _ = std::io::stdout().flush();
    if !report.failed.is_empty() {
        eprintln!("soak: failed: {}", report.failed.join("; "));
        std::process::exit(1);
    }
}
