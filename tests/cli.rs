//! The binary as a user runs it: bad flags, graceful shutdown on SIGTERM,
//! logs, and serving on while nobody reads the logs.

mod support;

use std::io::{BufRead, BufReader, Lines};
use std::process::{ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{eventually, scrape_metrics, take_answer, Origin, Route, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_swr-proxy");

/// Runs the binary with `args` (and `env`), expecting it to exit at once.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(BIN);
    command.args(args).stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_values_exit_2_with_one_line_naming_the_flag() {
    let up = ["--upstream", "http://127.0.0.1:9"];
    let cases: &[(&[&str], &str)] = &[
        (&["--ttl", "10x"], "--ttl"),
        (&["--ttl", "10"], "--ttl"),
        (
            &["--stale-while-revalidate", "soon"],
            "--stale-while-revalidate",
        ),
        (&["--stale-if-error", "-5s"], "--stale-if-error"),
        (&["--max-size", "lots"], "--max-size"),
        (&["--max-object-size", "1.5MiB"], "--max-object-size"),
        (&["--refresh-concurrency", "0"], "--refresh-concurrency"),
        (&["--refresh-queue", "many"], "--refresh-queue"),
        (&["--upstream-timeout", "0"], "--upstream-timeout"),
        (&["--client-header-timeout", "0"], "--client-header-timeout"),
        (
            &["--client-header-timeout", "soon"],
            "--client-header-timeout",
        ),
        (&["--listen", "localhost"], "--listen"),
        (&["--threads", "0"], "--threads"),
        (&["--threads", "all"], "--threads"),
        (&["--threads", "100000"], "--threads"),
        (
            &["--max-size", "1MiB", "--max-object-size", "2MiB"],
            "--max-object-size",
        ),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--cache-control", "sometimes"], "--cache-control"),
        (&["--admin-listen", "0.0.0.0:9090"], "--admin-listen"),
        (&["--admin-listen", "nowhere"], "--admin-listen"),
        (&["--heuristic-freshness", "150"], "--heuristic-freshness"),
        (&["--max-request-line", "10"], "--max-request-line"),
        (&["--trust-forwarded", "10.0.0.0/33"], "--trust-forwarded"),
        (
            &["--admin-token-file", "/nonexistent/token"],
            "--admin-token-file",
        ),
        (&["--log-format", "xml"], "--log-format"),
        (
            &["--log-summary-interval", "often"],
            "--log-summary-interval",
        ),
        (
            &["--log-summary-interval", "500ms"],
            "--log-summary-interval",
        ),
        (&["--upstream-concurrency", "-1"], "--upstream-concurrency"),
        // Found by fuzz/fuzz_targets/config_file.rs: these panicked at start
        // (tokio's semaphore and channel) or spawned workers until memory
        // ran out.
        (
            &["--upstream-concurrency", "18446744073709551615"],
            "--upstream-concurrency",
        ),
        (
            &["--refresh-queue", "18446744073709551615"],
            "--refresh-queue",
        ),
        (
            &["--refresh-concurrency", "100000000000"],
            "--refresh-concurrency",
        ),
        (
            &["--targeted-cache-control", "bad name"],
            "--targeted-cache-control",
        ),
    ];
    for (flags, named) in cases {
        let mut args: Vec<&str> = up.to_vec();
        args.extend_from_slice(flags);
        let (code, stderr) = run(&args, &[]);
        assert_eq!(code, 2, "{flags:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{flags:?}: one line, got {stderr:?}"
        );
        assert!(
            stderr.contains(named),
            "{flags:?}: {stderr:?} should name {named}"
        );
    }
    let (code, stderr) = run(&["--upstream", "ftp://x"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--upstream"), "{stderr}");
    // Credentials in the backend URL are refused, without being shown.
    for url in [
        "http://user:s3cret@127.0.0.1:9/",
        "http://s3cret@127.0.0.1:9/",
    ] {
        let (code, stderr) = run(&["--upstream", url], &[]);
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
        assert!(stderr.contains("--upstream must not hold user"), "{stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
    let (code, stderr) = run(&[], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--upstream is required"), "{stderr}");
    // Flags also come from SWR_<FLAG>, and are checked the same way.
    let (code, stderr) = run(&up, &[("SWR_TTL", "forever")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--ttl"), "{stderr}");
    // --upstream-ca: each refusal with its own cause.
    let ca = support::TestCa::make("cli-ca");
    let ca_file = ca.ca.to_str().expect("a UTF-8 temp path");
    let key_only = ca.key.to_str().expect("a UTF-8 temp path");
    let no_cert = support::TempFile::new("not a certificate\n");
    let dir = ca.dir.to_str().expect("a UTF-8 temp path");
    for (backend, file, cause) in [
        ("https://127.0.0.1:9", "/nonexistent/ca.pem", "cannot read"),
        (
            "https://127.0.0.1:9",
            no_cert.path(),
            "holds no certificate",
        ),
        ("https://127.0.0.1:9", key_only, "holds no certificate"),
        ("https://127.0.0.1:9", dir, "not a regular file"),
        ("http://127.0.0.1:9", ca_file, "is for an https backend"),
    ] {
        let (code, stderr) = run(&["--upstream", backend, "--upstream-ca", file], &[]);
        assert_eq!(code, 2, "{backend} {file}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
        assert!(stderr.contains("--upstream-ca"), "{stderr}");
        assert!(stderr.contains(cause), "{file}: {cause}: {stderr}");
    }
    // A file that names the CA and leaves the backend to a flag checks out.
    let config = support::TempFile::new(&format!("upstream_ca = {ca_file:?}\n"));
    let (code, stderr) = run(&["check", "--config", config.path()], &[]);
    assert_eq!(code, 0, "{stderr}");
}

/// An admin port already taken (a Prometheus server, a second instance) is
/// one line naming the flag and what to do.
#[test]
fn a_busy_admin_port_names_the_flag_and_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let (code, stderr) = run(
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &addr,
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.contains("--admin-listen"), "{stderr}");
    assert!(last.contains("--admin-listen off"), "{stderr}");
}

#[test]
fn help_exits_0() {
    let (code, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
}

/// The threads of process `pid` named `name` (Linux names them in /proc).
#[cfg(target_os = "linux")]
fn threads_named(pid: u32, name: &str) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc lists the threads");
    tasks
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .count()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_sets_how_many_threads_serve() {
    let origin = Origin::start().await;
    for (flag, expected) in [("1", 1), ("3", 3)] {
        let child = Child::start(&origin.url(), &["--threads", flag]);
        // A new thread takes its name when it first runs, which may be
        // after the listening line is out (written by the log thread).
        let pid = child.child.id();
        eventually(WAIT, "the serving threads run", || async move {
            threads_named(pid, "swr-worker") >= expected
        })
        .await;
        assert_eq!(
            threads_named(child.child.id(), "swr-worker"),
            expected,
            "--threads {flag}"
        );
        // And they serve: the answer comes from the backend through the proxy.
        let url = format!("http://{}/threads-{flag}", child.addr);
        let response = reqwest::get(&url).await.expect("answered");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response.text().await.expect("body"),
            format!("/threads-{flag} #1")
        );
    }
}

/// A running `swr-proxy` child process; killed on drop if still running.
struct Child {
    child: std::process::Child,
    addr: String,
    admin: String,
    /// Every log line it has written so far (none with `Stderr::NeverRead`).
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// With `Stderr::NeverRead`: the pipe's reading end, held open and never read.
    _unread: Option<Lines<BufReader<ChildStderr>>>,
}

/// What the test does with the child's stderr after its listening line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stderr {
    /// Read every line (into `Child::log`), so the child never meets a full pipe.
    Drained,
    /// Keep the pipe open and never read it again: a stalled log sink.
    NeverRead,
}

/// The value of `name` in a log line: text `name=value`, json `"name":"value"`.
fn log_field(line: &str, name: &str) -> Option<String> {
    line.split(&format!(" {name}="))
        .nth(1)
        .or_else(|| line.split(&format!("\"{name}\":\"")).nth(1))
        .map(|rest| {
            rest.split(|c: char| c.is_whitespace() || c == '"')
                .next()
                .unwrap_or("")
                .to_string()
        })
}

impl Child {
    fn start(upstream: &str, extra: &[&str]) -> Child {
        Child::start_with(upstream, extra, "info", Stderr::Drained)
    }

    fn start_with(upstream: &str, extra: &[&str], rust_log: &str, reading: Stderr) -> Child {
        let mut child = Command::new(BIN)
            .args([
                "--upstream",
                upstream,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + WAIT;
        let (addr, admin) = loop {
            let line = lines.next().expect("a log line").expect("readable");
            if line.contains("listening") {
                if let (Some(addr), Some(admin)) =
                    (log_field(&line, "listen"), log_field(&line, "admin"))
                {
                    break (addr, admin);
                }
            }
            assert!(Instant::now() < deadline, "no listening line");
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let unread = match reading {
            Stderr::NeverRead => Some(lines),
            Stderr::Drained => {
                let sink = std::sync::Arc::clone(&log);
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        sink.lock().unwrap().push(line);
                    }
                });
                None
            }
        };
        Child {
            child,
            addr,
            admin,
            log,
            _unread: unread,
        }
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        assert_eq!(send_signal(pid, signal), 0);
    }

    /// Sends SIGTERM and waits up to `limit` for the exit: its code, and
    /// how long it took.
    async fn terminate(mut self, limit: Duration) -> (Option<i32>, Duration) {
        self.signal(15);
        let signalled = Instant::now();
        let code = tokio::task::spawn_blocking(move || self.wait_exit(limit))
            .await
            .expect("join");
        (code, signalled.elapsed())
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_signal(pid: i32, signal: i32) -> i32 {
    // `kill(1)` keeps this crate free of `unsafe`.
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill runs");
    if status.success() {
        0
    } else {
        -1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let origin = Origin::start().await;
    origin.route("/slow", Route::default().delay(Duration::from_millis(1500)));
    let mut child = Child::start(&origin.url(), &["--shutdown-timeout", "20s"]);
    let url = format!("http://{}/slow", child.addr);
    let request = tokio::spawn(async move {
        let response = reqwest::get(url).await.expect("answered");
        (
            response.status().as_u16(),
            response.text().await.expect("body"),
        )
    });
    eventually(WAIT, "the request reaches the origin", || async {
        origin.hits("/slow") == 1
    })
    .await;
    child.signal(15);
    let (status, body) = request.await.expect("request task");
    assert_eq!(status, 200);
    assert_eq!(body, "/slow #1", "the in-flight request completed");
    let code = tokio::task::spawn_blocking(move || child.wait_exit(WAIT))
        .await
        .expect("join");
    assert_eq!(code, Some(0), "the process exits 0 after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_an_access_log_line_per_request() {
    let origin = Origin::start().await;
    let child = Child::start(&origin.url(), &["--log-format", "json", "--access-log"]);
    let url = format!("http://{}/logged?x=1", child.addr);
    // A miss (answered after the backend) and a hit (answered at once, on
    // the synchronous path): each gets its line.
    for _ in 0..2 {
        let response = reqwest::get(&url).await.expect("answered");
        assert_eq!(response.status().as_u16(), 200);
    }
    let log = std::sync::Arc::clone(&child.log);
    let logged = |cache: &'static str, upstream: fn(u64) -> bool| {
        let log = std::sync::Arc::clone(&log);
        async move {
            log.lock().unwrap().iter().any(|line| {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                    return false;
                };
                value["target"] == "swr_proxy::access"
                    && value["fields"]["cache"] == cache
                    && value["fields"]["uri"] == "/logged?x=1"
                    && value["fields"]["status"] == 200
                    && value["fields"]["upstream_us"]
                        .as_u64()
                        .is_some_and(upstream)
            })
        }
    };
    eventually(WAIT, "a MISS line with upstream time", || {
        logged("MISS", |us| us > 0)
    })
    .await;
    eventually(WAIT, "a HIT line without upstream time", || {
        logged("HIT", |us| us == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summary_line_per_interval_says_what_happened() {
    let origin = Origin::start().await;
    let child = Child::start(&origin.url(), &["--log-summary-interval", "1s"]);
    for _ in 0..3 {
        let response = reqwest::get(format!("http://{}/summed", child.addr))
            .await
            .expect("answered");
        assert_eq!(response.status().as_u16(), 200);
    }
    let log = Arc::clone(&child.log);
    eventually(WAIT, "a summary line counting the 3 answers", || {
        let log = Arc::clone(&log);
        async move {
            log.lock().unwrap().iter().any(|line| {
                line.contains("summary") && log_field(line, "requests").as_deref() == Some("3")
            })
        }
    })
    .await;
}

/// Sends `total` GETs (and more, until `at_least` has passed) over the keys
/// `/k/0` to `/k/{keys - 1}` in turn, from `connections` tasks each with a
/// connection of its own. Returns how many were answered and the slowest
/// answer, or the first request that failed. Plain HTTP/1.1 over a socket:
/// the test's client costs a fraction of an HTTP library's CPU.
async fn load(
    addr: &str,
    keys: usize,
    total: usize,
    at_least: Duration,
    connections: usize,
) -> Result<(usize, Duration), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let next = Arc::clone(&next);
            let addr = addr.to_string();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut stream = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut buf = Vec::with_capacity(4096);
                let mut slowest = Duration::ZERO;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total && started.elapsed() >= at_least {
                        return Ok(slowest);
                    }
                    let path = format!("/k/{}", i % keys);
                    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                    let sent = Instant::now();
                    stream
                        .write_all(request.as_bytes())
                        .await
                        .map_err(|e| format!("{path}: write: {e}"))?;
                    let status = next_answer(&mut stream, &mut buf, &path)
                        .await?
                        .ok_or_else(|| format!("{path}: connection closed"))?
                        .status;
                    if status != 200 {
                        return Err(format!("{path}: status {status}"));
                    }
                    slowest = slowest.max(sent.elapsed());
                }
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for task in tasks {
        slowest = slowest.max(task.await.map_err(|e| e.to_string())??);
    }
    // Each task took one index past the end when it stopped.
    let answered = next.load(Ordering::Relaxed) - connections;
    Ok((answered, slowest))
}

/// Issue 21: with stderr a pipe nobody reads (a stuck log shipper), every
/// request is still answered at once, the lines that do not fit are
/// dropped and counted, and SIGTERM still ends the process in time. With a
/// blocking log writer this test fails (the answers stop once the pipe's
/// 64 KiB are full), and so it does when the exit waits on the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_sink_nobody_reads_never_stalls_serving_or_shutdown() {
    const KEYS: usize = 1000;
    const REQUESTS: usize = 20_000;
    // Generous for a loaded 2-core machine; a stalled writer stalls
    // answers for good, so the bound only has to be finite.
    const SLOWEST: Duration = Duration::from_secs(2);
    const SHUTDOWN: Duration = Duration::from_secs(2);
    let origin = Origin::start().await;
    // An access line per request (about 200 bytes each) fills the pipe and
    // then the log queue within the first 10,000 requests. Refresh lines are
    // debug, and off here as in production.
    let child = Child::start_with(
        &origin.url(),
        &[
            "--ttl",
            "1s",
            "--stale-while-revalidate",
            "60s",
            "--cache-control",
            "override",
            "--access-log",
            "--threads",
            "2",
            "--shutdown-timeout",
            "2s",
        ],
        "info",
        Stderr::NeverRead,
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let (warmed, _) = load(&child.addr, KEYS, KEYS, Duration::ZERO, 8)
        .await
        .expect("every key warmed");
    assert_eq!(warmed, KEYS);
    assert_eq!(origin.total_hits(), KEYS as u64);
    // Past the 1 s ttl several times over: refreshes run all along.
    let (answered, slowest) = load(&child.addr, KEYS, REQUESTS, Duration::from_secs(3), 8)
        .await
        .expect("every request answered");
    assert!(answered >= REQUESTS, "{answered}");
    assert!(slowest < SLOWEST, "the slowest answer took {slowest:?}");
    let metrics = scrape_metrics(&client, &format!("http://{}/metrics", child.admin)).await;
    let metric = |name: &str| metrics.get(name).copied().unwrap_or(0.0);
    let refreshed = metric("swr_refresh_events_total{event=\"succeeded\"}");
    assert!(refreshed >= KEYS as f64, "refreshed {refreshed}");
    let dropped = metric("swr_log_lines_dropped_total");
    assert!(dropped > 0.0, "no log line dropped: was the pipe read?");
    let (code, took) = child.terminate(SHUTDOWN + WAIT).await;
    eprintln!(
        "{answered} answers, slowest {slowest:?}; {refreshed} refreshes; \
         {dropped} log lines dropped; exit {took:?} after SIGTERM"
    );
    assert_eq!(code, Some(0), "exit after SIGTERM ({took:?})");
    assert!(
        took < SHUTDOWN + Duration::from_secs(5),
        "SIGTERM took {took:?} to end the process"
    );
}

/// The next whole answer on `stream` (read into `buf`) to the request for
/// `path`, within 5 s; `None` when the server closed the connection before
/// any byte of it. A partial answer or a wait of 5 s is the error.
async fn next_answer(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    path: &str,
) -> Result<Option<support::Wire>, String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(answer) = take_answer(buf) {
            return Ok(Some(answer));
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk));
        match read.await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) if buf.is_empty() => return Ok(None),
            Ok(_) => return Err(format!("{path}: partial answer {buf:?}")),
            Err(_) => return Err(format!("{path}: no answer in 5 s")),
        }
    }
}

/// How one client connection of [`until_closed`] ended.
#[derive(Debug, Default)]
struct Ended {
    /// Whole 200 answers.
    answered: usize,
    /// The server closed the connection before any byte of an answer to a
    /// request written on it: the keep-alive race RFC 9112 §9.3.1 lets a
    /// client retry (the server had not read the request, or sent
    /// `Connection: close` on the answer before).
    closed_unanswered: usize,
    /// The paths answered.
    paths: Vec<String>,
}

/// One keep-alive connection to `addr` sending GETs over `/k/0` to
/// `/k/{keys - 1}` (or, with `slow`, each time a new `/slow/<n>`) until the
/// server stops taking connections. A
/// `Connection: close` answer makes it connect again, as clients do. An
/// answer that is partial, not 200 or later than 5 s is the error.
async fn until_closed(
    addr: String,
    keys: usize,
    seed: usize,
    slow: Option<Arc<AtomicUsize>>,
) -> Result<Ended, String> {
    use tokio::io::AsyncWriteExt;
    let mut ended = Ended::default();
    let mut i = seed;
    loop {
        let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
            return Ok(ended); // the listener is closed: shutdown
        };
        let mut buf = Vec::with_capacity(4096);
        loop {
            i += 7;
            let path = match &slow {
                Some(next) => format!("/slow/{}", next.fetch_add(1, Ordering::Relaxed)),
                None => format!("/k/{}", i % keys),
            };
            let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            if stream.write_all(request.as_bytes()).await.is_err() {
                ended.closed_unanswered += 1;
                break;
            }
            let Some(answer) = next_answer(&mut stream, &mut buf, &path).await? else {
                ended.closed_unanswered += 1;
                break;
            };
            if answer.status != 200 || answer.body.is_empty() {
                return Err(format!(
                    "{path}: status {} {:?}",
                    answer.status, answer.body
                ));
            }
            ended.answered += 1;
            ended.paths.push(path);
            if answer.header("connection").eq_ignore_ascii_case("close") {
                break;
            }
        }
    }
}

/// Issue 16: a reload and then a shutdown under load lose nothing. Clients
/// on 16 keep-alive connections send GETs without pause over keys whose
/// 1 s ttl keeps refreshes and misses (each a 20 ms backend fetch) in
/// flight; SIGHUP changes the configuration mid-load, SIGTERM ends it.
/// Every answer is a whole 200; a connection is closed without an answer
/// only in the keep-alive race (at most once per connection, as it then
/// finds the listener closed); the process exits 0 within
/// `--shutdown-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_shutdown_under_load_lose_no_request() {
    const KEYS: usize = 200;
    const CONNECTIONS: usize = 16;
    const SLOW_CLIENTS: usize = 4;
    const SLOW_PATHS: usize = 1000;
    const SHUTDOWN: Duration = Duration::from_secs(5);
    let origin = Origin::start().await;
    for k in 0..KEYS {
        origin.route(
            &format!("/k/{k}"),
            Route::default().delay(Duration::from_millis(20)),
        );
    }
    // Misses that take 300 ms each: always one in flight on each of the
    // slow clients' connections when SIGTERM comes.
    for n in 0..SLOW_PATHS {
        origin.route(
            &format!("/slow/{n}"),
            Route::default().delay(Duration::from_millis(300)),
        );
    }
    let slow_next = Arc::new(AtomicUsize::new(0));
    let file = support::TempFile::new("ttl = \"1s\"\nstale_while_revalidate = \"30s\"\n");
    let child = Child::start(
        &origin.url(),
        &["--config", file.path(), "--shutdown-timeout", "5s"],
    );
    let log = Arc::clone(&child.log);
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let slow = (c < SLOW_CLIENTS).then(|| Arc::clone(&slow_next));
            tokio::spawn(until_closed(child.addr.clone(), KEYS, c * 13, slow))
        })
        .collect();
    eventually(WAIT, "every key fetched and some refreshed", || async {
        origin.total_hits() >= KEYS as u64 * 2
    })
    .await;
    file.write("ttl = \"2s\"\nstale_while_revalidate = \"30s\"\n");
    child.signal(1);
    eventually(WAIT, "the reload is logged", || async {
        log.lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("configuration reloaded"))
    })
    .await;
    let fetched_at_reload = origin.total_hits();
    eventually(WAIT, "refreshes go on after the reload", || async {
        origin.total_hits() >= fetched_at_reload + KEYS as u64 / 2
    })
    .await;
    let (code, took) = child.terminate(SHUTDOWN + WAIT).await;
    let mut answered = 0;
    let mut answered_paths = std::collections::HashSet::new();
    for client in clients {
        let ended = client
            .await
            .expect("client task")
            .unwrap_or_else(|e| panic!("a request lost: {e}"));
        assert!(
            ended.closed_unanswered <= 1,
            "closed unanswered more than once on one client: {:?}",
            (ended.answered, ended.closed_unanswered)
        );
        answered += ended.answered;
        answered_paths.extend(ended.paths);
    }
    // A slow request that reached the backend had been read by swr-proxy:
    // it was accepted, so its client got the answer (a request closed
    // unanswered in the keep-alive race never reached the backend).
    let mut in_backend = 0;
    for n in 0..slow_next.load(Ordering::Relaxed) {
        let path = format!("/slow/{n}");
        if origin.hits(&path) > 0 {
            in_backend += 1;
            assert!(
                answered_paths.contains(&path),
                "{path} reached the backend but its answer was dropped"
            );
        }
    }
    assert!(
        in_backend >= SLOW_CLIENTS,
        "slow requests ran: {in_backend}"
    );
    eprintln!(
        "{answered} answers, {} backend fetches; exit {took:?} after SIGTERM",
        origin.total_hits()
    );
    assert!(answered > KEYS * 2, "the load ran: {answered}");
    assert_eq!(code, Some(0), "exit after SIGTERM ({took:?})");
    assert!(
        took < SHUTDOWN + Duration::from_secs(5),
        "SIGTERM took {took:?} to end the process"
    );
}
