//! Operations: the admin API (health, metrics, stats, purge), origin
//! protection (upstream concurrency cap, refresh backoff, hit-for-miss), and
//! the Grafana dashboard's metrics.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::{eventually, Gate, Origin, Route, TestProxy, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn admin_post(proxy: &TestProxy, path: &str, body: &str) -> (u16, String) {
    let response = proxy
        .client
        .post(proxy.admin_url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("admin answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn admin_get(proxy: &TestProxy, path: &str) -> (u16, String) {
    let response = proxy
        .client
        .get(proxy.admin_url(path))
        .send()
        .await
        .expect("admin answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn health_and_unknown_paths() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    assert_eq!(admin_get(&proxy, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(admin_get(&proxy, "/readyz").await.0, 200);
    assert_eq!(admin_get(&proxy, "/nope").await.0, 404);
    assert_eq!(admin_post(&proxy, "/metrics", "").await.0, 405);
}

#[tokio::test]
async fn the_admin_token_is_required_when_set() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--admin-token", "s3cret"]).await;
    assert_eq!(admin_get(&proxy, "/metrics").await.0, 401);
    let wrong = proxy
        .client
        .get(proxy.admin_url("/metrics"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = proxy
        .client
        .get(proxy.admin_url("/metrics"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    origin.route(
        "/private",
        Route::default().header("cache-control", "private"),
    );
    proxy.get("/a").await;
    proxy.get("/a").await;
    proxy.get("/a").await;
    proxy.get("/private").await;
    proxy.send(reqwest::Method::POST, "/a", &[]).await;
    let m = proxy.metrics().await;
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(get("swr_requests_total{cache=\"MISS\"}"), 1.0);
    assert_eq!(get("swr_requests_total{cache=\"HIT\"}"), 2.0);
    assert_eq!(get("swr_requests_total{cache=\"BYPASS\"}"), 2.0);
    assert_eq!(get("swr_bypass_total{reason=\"private\"}"), 1.0);
    assert_eq!(get("swr_bypass_total{reason=\"method\"}"), 1.0);
    assert_eq!(get("swr_upstream_requests_total{cause=\"miss\"}"), 2.0);
    assert_eq!(get("swr_upstream_requests_total{cause=\"pass\"}"), 1.0);
    assert_eq!(get("swr_served_age_seconds_count"), 3.0);
    assert_eq!(get("swr_upstream_latency_seconds_count"), 3.0);
    // "/a" was invalidated by the POST; nothing else is stored.
    assert_eq!(get("swr_cache_entries"), 0.0);
    assert_eq!(get("swr_invalidations_total"), 1.0);
    assert!(get("swr_cache_max_bytes") > 0.0);
}

#[tokio::test]
async fn stats_summarise_the_cache() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    proxy.get("/s").await;
    for _ in 0..3 {
        proxy.get("/s").await;
    }
    let (status, body) = admin_get(&proxy, "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["requests"]["HIT"], 3);
    assert_eq!(stats["hit_ratio"], 0.75);
    assert_eq!(stats["entries"], 1);
    assert!(stats["bytes"].as_u64().unwrap() > 0);
    assert_eq!(stats["refresh"]["queue_depth"], 0);
    // Top keys are sampled (about one answer from the cache in 16, at
    // random gaps): 644 answers give ~40 samples (sd ~3.5); 20 is more
    // than 5 deviations below.
    for _ in 0..640 {
        proxy.get("/s").await;
    }
    let (_, body) = admin_get(&proxy, "/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["top_keys"][0]["key"], proxy.key("/s"));
    let answers = stats["top_keys"][0]["answers"].as_u64().unwrap();
    assert!((320..=1280).contains(&answers), "{answers} of 644");
}

#[tokio::test]
async fn a_hard_purge_makes_the_next_request_a_miss() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    for path in ["/p/1", "/p/2", "/q/1"] {
        proxy.get(path).await;
    }
    let key = proxy.key("/p/1");
    let (status, body) = admin_post(&proxy, "/purge", &format!("{{\"key\": \"{key}\"}}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"purged\": 1"), "{body}");
    assert_eq!(proxy.get("/p/1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/p/2").await.x_cache(), "HIT");
    let prefix = proxy.key("/p/");
    let (_, body) = admin_post(&proxy, "/purge", &format!("{{\"prefix\": \"{prefix}\"}}")).await;
    assert!(body.contains("\"purged\": 2"), "{body}");
    assert_eq!(proxy.get("/q/1").await.x_cache(), "HIT");
    let (_, body) = admin_post(&proxy, "/purge", "{\"all\": true}").await;
    assert!(body.contains("\"purged\": 1"), "only /q/1 was left: {body}");
    assert_eq!(proxy.get("/q/1").await.x_cache(), "MISS");
    // Bad requests are refused, and name what is expected.
    for bad in [
        "",
        "{}",
        "{\"key\": \"x\", \"all\": true}",
        "{\"all\": false}",
        "{\"keys\": []}",
    ] {
        let (status, body) = admin_post(&proxy, "/purge", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn a_soft_purge_serves_stale_and_refreshes_exactly_once() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    assert_eq!(proxy.get("/model").await.text(), "/model #1");
    let gate = Gate::closed();
    origin.route("/model", Route::default().gate(&gate));
    let (status, body) = admin_post(&proxy, "/purge", "{\"all\": true, \"soft\": true}").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"purged\": 1"), "{body}");
    // A burst after the purge: every answer at once from the stale copy.
    let answers = join_all((0..20).map(|_| proxy.get("/model"))).await;
    for answer in &answers {
        assert_eq!(answer.x_cache(), "STALE");
        assert_eq!(answer.text(), "/model #1");
    }
    gate.open();
    eventually(WAIT, "the refreshed entry is served", || async {
        proxy.get("/model").await.text() == "/model #2"
    })
    .await;
    assert_eq!(
        origin.hits("/model"),
        2,
        "exactly one refresh after the purge"
    );
}

#[tokio::test]
async fn the_upstream_concurrency_cap_holds_under_200_misses() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--upstream-concurrency", "8"]).await;
    origin.route("/cap", Route::default().delay(Duration::from_millis(50)));
    let answers = join_all((0..200).map(|i| {
        let path = format!("/cap?k={i}");
        let proxy = &proxy;
        async move { proxy.get(&path).await }
    }))
    .await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(origin.total_hits(), 200);
    let max = origin.max_in_flight();
    assert!(max <= 8, "the origin saw {max} requests at once");
    assert!(max >= 2, "the cap is not a serialisation: {max}");
}

#[tokio::test]
async fn a_failing_backend_gets_sparser_refreshes() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "200ms"]).await;
    proxy.get("/fail").await;
    origin.route("/fail", Route::default().status(500));
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Stale hits every 20 ms for 2.5 s while every refresh fails.
    let started = Instant::now();
    let mut answers = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let answer = proxy.get("/fail").await;
        assert_eq!(answer.x_cache(), "STALE");
        assert_eq!(answer.text(), "/fail #1");
        answers += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Without backoff, each failure would be followed by a refresh on the next
    // stale hit (about one per answer). With it: at 0 s, after 1 s, after 2 s more.
    let attempts = origin.hits("/fail") - 1;
    assert!(answers > 50, "{answers} answers");
    assert!((2..=4).contains(&attempts), "{attempts} refresh attempts");
    assert!(
        proxy
            .counter("swr_refresh_events_total{event=\"backoff\"}")
            .await
            > 40
    );
}

#[tokio::test]
async fn uncacheable_keys_skip_coalescing() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route("/me", Route::default().header("cache-control", "private"));
    proxy.get("/me").await; // learns that /me is not storable
    let gate = Gate::closed();
    origin.route(
        "/me",
        Route::default()
            .header("cache-control", "private")
            .gate(&gate),
    );
    let requests = join_all((0..5).map(|_| proxy.get("/me")));
    let opener = async {
        // All five reach the origin at once: none waits on another's fetch.
        eventually(WAIT, "five requests at the origin together", || async {
            origin.hits("/me") == 6
        })
        .await;
        gate.open();
    };
    let (answers, ()) = tokio::join!(requests, opener);
    assert!(answers.iter().all(|a| a.x_cache() == "BYPASS"));
    assert_eq!(proxy.counter("swr_hit_for_miss_total").await, 5);
    assert_eq!(proxy.counter("swr_coalesced_waiters_total").await, 0);
}

/// A connection to `addr` on which `bytes` have been sent.
async fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

/// Reads from `stream` until the peer closes it (or resets it); `None` if it
/// is still open at `limit`. What was read comes back too.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<(Duration, String)> {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((started.elapsed(), String::from_utf8_lossy(&seen).into()))
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that sends its headers too slowly, or keeps a connection idle
/// after an answer, is disconnected after --client-header-timeout; one
/// within it is not.
#[tokio::test]
async fn slow_and_idle_clients_are_disconnected_after_the_header_timeout() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--client-header-timeout", "300ms"]).await;

    // Half a request head, then nothing.
    let mut slow = send(
        proxy.addr,
        b"GET /slow HTTP/1.1\r\nHost: example\r\nX-Slow: ",
    )
    .await;
    let (took, answer) = closed_within(&mut slow, WAIT)
        .await
        .expect("a slow client is disconnected");
    assert!(
        took >= Duration::from_millis(250),
        "closed after {took:?}, before the timeout"
    );
    assert!(!answer.contains("200 OK"), "{answer}");
    assert_eq!(
        origin.total_hits(),
        0,
        "an incomplete request never reaches the backend"
    );

    // A whole request is answered; the idle connection is then closed.
    let whole = b"GET /idle HTTP/1.1\r\nHost: example\r\n\r\n";
    let mut idle = send(proxy.addr, whole).await;
    let (took, answer) = closed_within(&mut idle, WAIT)
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");

    // With the default (60 s), the same idle connection stays open.
    let patient = TestProxy::start(&origin, &[]).await;
    let mut kept = send(patient.addr, whole).await;
    assert_eq!(
        closed_within(&mut kept, Duration::from_secs(1)).await,
        None,
        "closed before the default timeout"
    );
}

/// An HTTP/2 connection with no stream open for --client-header-timeout is
/// closed too, after its answer, with a GOAWAY.
#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_header_timeout() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--client-header-timeout", "300ms"]).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    let opened = Instant::now();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{}/h2", proxy.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let answered = Instant::now();
    let ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .expect("connection task");
    // Closed gracefully (a GOAWAY first), so the client's side ends cleanly.
    assert!(ended.is_ok(), "{ended:?}");
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(250),
        "closed {idle:?} after the answer ({:?} after opening)",
        opened.elapsed()
    );
    assert_eq!(origin.hits("/h2"), 1);
}

/// At shutdown an idle keep-alive connection is closed at once, and one
/// with a request in progress is closed after its answer.
#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_busy_ones() {
    let origin = Origin::start().await;
    origin.route("/slow", Route::default().delay(Duration::from_millis(1000)));
    let proxy = TestProxy::start(&origin, &[]).await;

    let mut idle = send(proxy.addr, b"GET /idle HTTP/1.1\r\nHost: example\r\n\r\n").await;
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, idle.read(&mut buf))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
    let mut busy = send(proxy.addr, b"GET /slow HTTP/1.1\r\nHost: example\r\n\r\n").await;
    eventually(WAIT, "the slow request reaches the origin", || async {
        origin.hits("/slow") == 1
    })
    .await;

    proxy.shut_down();
    let (took, _) = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("the idle connection is closed at shutdown, not after 60 s");
    assert!(took < Duration::from_secs(5));
    let (_, answer) = closed_within(&mut busy, WAIT)
        .await
        .expect("the busy connection is closed after its answer");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("/slow #1"), "{answer}");
}

#[tokio::test]
async fn shutdown_closes_connections_still_busy_at_the_deadline() {
    let origin = Origin::start().await;
    origin.route("/hang", Route::default().delay(Duration::from_secs(60)));
    let proxy = TestProxy::start(&origin, &["--shutdown-timeout", "300ms"]).await;
    let mut busy = send(proxy.addr, b"GET /hang HTTP/1.1\r\nHost: example\r\n\r\n").await;
    eventually(WAIT, "the request reaches the origin", || async {
        origin.hits("/hang") == 1
    })
    .await;

    proxy.shut_down();
    // Closed soon after the 300 ms deadline, not when the backend answers
    // a minute later; no answer was sent.
    let (took, answer) = closed_within(&mut busy, Duration::from_secs(20))
        .await
        .expect("the busy connection is closed at the shutdown deadline");
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    assert_eq!(answer, "", "no answer on a connection cut at the deadline");
}

/// Every metric the dashboard queries is one the proxy exports.
#[tokio::test]
async fn the_grafana_dashboard_queries_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/grafana/swr-proxy.json"
        ))
        .expect("the dashboard is shipped"),
    )
    .expect("the dashboard is JSON");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("swr_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    proxy.get("/x").await;
    let (_, text) = admin_get(&proxy, "/metrics").await;
    // A family is exported when it has a TYPE line (a per-route counter has
    // no samples until routes are configured); histograms add suffixes.
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            exported.insert(name.to_string());
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    let sampled: BTreeSet<String> = proxy
        .metrics()
        .await
        .keys()
        .map(|k| k.split('{').next().unwrap_or(k).to_string())
        .collect();
    assert!(
        sampled.is_subset(&exported),
        "every sample belongs to a declared family"
    );
    for name in &queried {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which is not exported"
        );
    }
}

/// Keys hold the Host: a restarted instance listens on another test port,
/// but its clients ask for the same site.
const SNAP_HOST: (&str, &str) = ("host", "snapshot.test");

/// A directory of its own for a test's snapshot, removed on drop. A test
/// ends with [`stop_and_snapshot`] of its last proxy: one still writing its
/// shutdown snapshot as the directory is removed leaves it behind.
struct SnapshotDir(std::path::PathBuf);

impl SnapshotDir {
    fn new(name: &str) -> SnapshotDir {
        let dir = std::env::temp_dir().join(format!("swr-ops-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("snapshot dir");
        SnapshotDir(dir)
    }

    fn flag(&self) -> String {
        self.0.display().to_string()
    }

    fn file(&self) -> std::path::PathBuf {
        self.0.join(swr_proxy::snapshot::FILE_NAME)
    }
}

/// Shuts `proxy` down and waits until it has written its snapshot.
async fn stop_and_snapshot(proxy: TestProxy, dir: &SnapshotDir) {
    // The file read at start (a restart's) is not this proxy's.
    let _ = std::fs::remove_file(dir.file());
    proxy.stop(WAIT).await;
    assert!(dir.file().exists(), "no snapshot written at shutdown");
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_snapshot_answers_from_memory_at_once() {
    let origin = Origin::start().await;
    let dir = SnapshotDir::new("restart");
    let flags = ["--snapshot-dir", &dir.flag(), "--ttl", "1h"];
    let first = TestProxy::start(&origin, &flags).await;
    for path in ["/a", "/b?x=1"] {
        assert_eq!(
            first
                .send(reqwest::Method::GET, path, &[SNAP_HOST])
                .await
                .x_cache(),
            "MISS"
        );
    }
    stop_and_snapshot(first, &dir).await;

    let second = TestProxy::start(&origin, &flags).await;
    for path in ["/a", "/b?x=1"] {
        let answer = second.send(reqwest::Method::GET, path, &[SNAP_HOST]).await;
        assert_eq!(answer.x_cache(), "HIT", "{path}: {}", answer.cache_status());
        assert_eq!(answer.text(), format!("{path} #1"));
    }
    assert_eq!(
        origin.total_hits(),
        2,
        "the restart asked the origin nothing"
    );
    stop_and_snapshot(second, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_ignored_and_the_proxy_starts_empty() {
    let origin = Origin::start().await;
    let dir = SnapshotDir::new("damaged");
    let flags = ["--snapshot-dir", &dir.flag()];
    let first = TestProxy::start(&origin, &flags).await;
    assert_eq!(
        first
            .send(reqwest::Method::GET, "/d", &[SNAP_HOST])
            .await
            .x_cache(),
        "MISS"
    );
    stop_and_snapshot(first, &dir).await;
    // Cut short, as a full disk or a crash of another writer would leave it.
    let whole = std::fs::read(dir.file()).expect("snapshot");
    std::fs::write(dir.file(), &whole[..whole.len() - 3]).expect("truncate");

    let second = TestProxy::start(&origin, &flags).await;
    let answer = second.send(reqwest::Method::GET, "/d", &[SNAP_HOST]).await;
    assert_eq!((answer.status, answer.x_cache()), (200, "MISS"));
    assert_eq!(answer.text(), "/d #2");
    stop_and_snapshot(second, &dir).await;
}

/// A hard purge must not come back with the next start: a snapshot written
/// before the purge (every --snapshot-interval) is what a crash, or a kill
/// past the shutdown deadline, leaves on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_entry_does_not_come_back_from_an_earlier_snapshot() {
    let origin = Origin::start().await;
    let dir = SnapshotDir::new("purged");
    let flags = [
        "--snapshot-dir",
        &dir.flag(),
        "--snapshot-interval",
        "1s",
        "--ttl",
        "1h",
    ];
    let first = TestProxy::start(&origin, &flags).await;
    let answer = first
        .send(reqwest::Method::GET, "/secret", &[SNAP_HOST])
        .await;
    assert_eq!(answer.x_cache(), "MISS");
    eventually(WAIT, "a periodic snapshot", || async {
        dir.file().exists()
    })
    .await;
    let (status, _) = admin_post(&first, "/purge", "{\"key\": \"snapshot.test/secret\"}").await;
    assert_eq!(status, 200);
    // What a crash now leaves behind.
    let crashed = SnapshotDir::new("purged-crash");
    if dir.file().exists() {
        std::fs::copy(dir.file(), crashed.file()).expect("copy");
    }
    first.stop(WAIT).await;

    let flags = ["--snapshot-dir", &crashed.flag(), "--ttl", "1h"];
    let second = TestProxy::start(&origin, &flags).await;
    let answer = second
        .send(reqwest::Method::GET, "/secret", &[SNAP_HOST])
        .await;
    assert_eq!(
        answer.x_cache(),
        "MISS",
        "the purged answer came back from the snapshot"
    );
    stop_and_snapshot(second, &crashed).await;
}

/// A route's key headers put a newline in the URL's own key text: the
/// variants of such a key (its answers carry Vary) come back from a
/// snapshot under that key, not under the bare path's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_the_variants_of_a_keyed_route() {
    let origin = Origin::start().await;
    origin.route("/t", Route::default().header("vary", "accept-language"));
    let dir = SnapshotDir::new("keyed-variants");
    let file = support::TempFile::new(
        "ttl = \"1h\"\n[[route]]\npath = \"/t\"\nkey_headers = [\"x-tenant\"]\n",
    );
    let flags = ["--snapshot-dir", &dir.flag(), "--config", file.path()];
    let asked = [SNAP_HOST, ("x-tenant", "acme"), ("accept-language", "en")];
    let first = TestProxy::start(&origin, &flags).await;
    assert_eq!(
        first
            .send(reqwest::Method::GET, "/t", &asked)
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        first
            .send(reqwest::Method::GET, "/t", &asked)
            .await
            .x_cache(),
        "HIT"
    );
    stop_and_snapshot(first, &dir).await;

    let second = TestProxy::start(&origin, &flags).await;
    let answer = second.send(reqwest::Method::GET, "/t", &asked).await;
    assert_eq!(answer.x_cache(), "HIT", "{}", answer.cache_status());
    assert_eq!(origin.total_hits(), 1);
    stop_and_snapshot(second, &dir).await;
}
