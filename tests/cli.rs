//! The binary as a user runs it: bad flags, and graceful shutdown on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{eventually, Origin, Route, WAIT};

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
        (&["--upstream-concurrency", "-1"], "--upstream-concurrency"),
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
    let (code, stderr) = run(&[], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--upstream is required"), "{stderr}");
    // Flags also come from SWR_<FLAG>, and are checked the same way.
    let (code, stderr) = run(&up, &[("SWR_TTL", "forever")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--ttl"), "{stderr}");
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
    /// Every log line it has written so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Child {
    fn start(upstream: &str, extra: &[&str]) -> Child {
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
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            let line = lines.next().expect("a log line").expect("readable");
            if line.contains("listening") {
                // text: `listen=127.0.0.1:1234`; json: `"listen":"127.0.0.1:1234"`
                let found = line
                    .split("listen=")
                    .nth(1)
                    .or_else(|| line.split("\"listen\":\"").nth(1))
                    .map(|rest| {
                        rest.split(|c: char| c.is_whitespace() || c == '"')
                            .next()
                            .unwrap_or("")
                            .to_string()
                    });
                if let Some(found) = found {
                    break found;
                }
            }
            assert!(Instant::now() < deadline, "no listening line");
        };
        // Keep draining the log so the child never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Child { child, addr, log }
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        assert_eq!(send_signal(pid, signal), 0);
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
