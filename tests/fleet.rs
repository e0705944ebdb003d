//! Fleet mode (`--redis`): several real proxies on one real `redis-server`
//! (started here on a free loopback port, without persistence, stopped by
//! PID) in front of one counting origin. Every request carries the same
//! `Host`, as it would behind a load balancer, so the instances share keys.
//!
//! Without `redis-server` on the PATH these tests say so and pass, unless
//! `SWR_REQUIRE_REDIS=1` (which `.ci/run` sets, after installing it).

mod support;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::{eventually, Origin, Route, TestProxy, WAIT};

const HOST: (&str, &str) = ("host", "fleet.test");
const BIN: &str = env!("CARGO_BIN_EXE_swr-proxy");

/// A `redis-server` of the test's own, stopped (by PID) on drop.
struct Redis {
    port: u16,
    child: Child,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Redis {
    /// Starts one, or `None` (the test then passes, saying why) when
    /// `redis-server` is not installed and not required.
    fn start() -> Option<Redis> {
        Redis::start_on(free_port())
    }

    fn start_on(port: u16) -> Option<Redis> {
        Redis::start_with(port, &[], port)
    }

    /// Starts one on `port` (0: none) with more `redis-server` arguments,
    /// and waits until it listens on `ready`.
    fn start_with(port: u16, args: &[&str], ready: u16) -> Option<Redis> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(err) => {
                assert!(
                    std::env::var("SWR_REQUIRE_REDIS").is_err(),
                    "redis-server is required (SWR_REQUIRE_REDIS) but cannot start: {err}"
                );
                eprintln!("skipping: redis-server not found ({err}); apt-get install redis-server");
                return None;
            }
        };
        let redis = Redis { port, child };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", ready)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connects")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `n` proxies on `redis` in front of `origin`, with `flags`.
async fn fleet(origin: &Origin, redis: &Redis, n: usize, flags: &[&str]) -> Vec<TestProxy> {
    let url = redis.url();
    let mut all = vec!["--redis", url.as_str()];
    all.extend_from_slice(flags);
    let mut proxies = Vec::new();
    for _ in 0..n {
        proxies.push(TestProxy::start(origin, &all).await);
    }
    proxies
}

async fn get(proxy: &TestProxy, path: &str) -> support::Answer {
    proxy.send(reqwest::Method::GET, path, &[HOST]).await
}

/// `count` concurrent GETs of `path`, spread over `proxies` in turn.
async fn spread(proxies: &[TestProxy], path: &str, count: usize) -> Vec<support::Answer> {
    join_all((0..count).map(|i| get(&proxies[i % proxies.len()], path))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_requests_across_three_instances_make_one_origin_request() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    origin.route("/feed", Route::default().delay(Duration::from_millis(300)));
    let proxies = fleet(&origin, &redis, 3, &[]).await;

    let answers = spread(&proxies, "/feed", 300).await;
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "/feed #1", "{}", answer.cache_status());
    }
    assert_eq!(origin.hits("/feed"), 1, "one origin request for the fleet");
    // The instances that did not fetch answered from the shared level.
    let from_l2 = answers
        .iter()
        .filter(|a| a.cache_status().contains("detail=l2"))
        .count();
    assert!(from_l2 >= 2, "{from_l2} answers from the shared level");
    let mut waited = 0;
    for proxy in &proxies {
        waited += proxy
            .counter("swr_fleet_leases_total{result=\"lost\"}")
            .await;
    }
    assert!(waited >= 1, "an instance found the lease taken and waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_requests_across_three_instances_make_one_refresh() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    origin.route("/rank", Route::default().delay(Duration::from_millis(200)));
    let proxies = fleet(
        &origin,
        &redis,
        3,
        &["--ttl", "1s", "--stale-while-revalidate", "60s"],
    )
    .await;
    for proxy in &proxies {
        assert_eq!(get(proxy, "/rank").await.text(), "/rank #1");
    }
    assert_eq!(
        origin.hits("/rank"),
        1,
        "the 2nd and 3rd instance read Redis"
    );
    // Past the ttl on every instance (the shared entry's clock is the
    // writer's, carried as wall-clock time).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let answers = spread(&proxies, "/rank", 90).await;
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.x_cache(), "STALE", "{}", answer.cache_status());
        assert_eq!(answer.text(), "/rank #1", "served at once, the old answer");
    }
    eventually(WAIT, "one refresh", || async { origin.hits("/rank") == 2 }).await;
    // Every instance gets the refreshed answer without asking the origin:
    // by the event, or from Redis.
    for proxy in &proxies {
        eventually(WAIT, "the refreshed answer everywhere", || async {
            let answer = get(proxy, "/rank").await;
            answer.text() == "/rank #2"
        })
        .await;
    }
    assert_eq!(origin.hits("/rank"), 2, "exactly one refresh for the fleet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_answers_a_stored_key_without_the_origin() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let first = fleet(&origin, &redis, 1, &[]).await;
    assert_eq!(get(&first[0], "/warm?x=1").await.x_cache(), "MISS");
    drop(first);

    // A restarted (or new) instance: empty memory, the same Redis.
    let second = fleet(&origin, &redis, 1, &[]).await;
    let answer = get(&second[0], "/warm?x=1").await;
    assert_eq!(answer.text(), "/warm?x=1 #1");
    assert_eq!(answer.x_cache(), "HIT");
    assert!(
        answer.cache_status().contains("detail=l2"),
        "{}",
        answer.cache_status()
    );
    assert!(answer.header("age").parse::<u64>().is_ok());
    assert_eq!(origin.hits("/warm?x=1"), 1);
    // Now in its memory: a plain hit.
    let again = get(&second[0], "/warm?x=1").await;
    assert_eq!(again.x_cache(), "HIT");
    assert!(
        !again.cache_status().contains("l2"),
        "{}",
        again.cache_status()
    );
    assert_eq!(
        second[0]
            .counter("swr_fleet_reads_total{result=\"hit\"}")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_instance_is_seen_by_all() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxies = fleet(&origin, &redis, 3, &[]).await;
    for proxy in &proxies {
        assert_eq!(get(proxy, "/p").await.text(), "/p #1");
        assert_eq!(get(proxy, "/keep").await.text(), "/keep #1");
    }
    let purged = proxies[1]
        .client
        .post(proxies[1].admin_url("/purge"))
        .header("content-type", "application/json")
        .body(r#"{"key": "fleet.test/p"}"#)
        .send()
        .await
        .expect("admin answers");
    assert_eq!(purged.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&purged.bytes().await.expect("body")).expect("json");
    assert_eq!(body["purged"], 1);
    assert_eq!(body["shared"], 1, "the shared entry too: {body}");
    for proxy in &proxies {
        eventually(WAIT, "the purge reaches every instance", || async {
            proxy.proxy.store().entry_count() == 1
        })
        .await;
    }
    // The next request anywhere is a miss for the fleet: one origin request.
    assert_eq!(get(&proxies[2], "/p").await.text(), "/p #2");
    assert_eq!(get(&proxies[0], "/p").await.text(), "/p #2");
    assert_eq!(origin.hits("/p"), 2);
    assert_eq!(origin.hits("/keep"), 1, "other keys are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_value_in_redis_is_ignored_and_counted() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxies = fleet(&origin, &redis, 1, &[]).await;
    let mut conn = redis.connection().await;
    for (key, value) in [
        ("swr:1:e:fleet.test/g", &b"not an entry"[..]),
        // The right magic and version, then nonsense.
        (
            "swr:1:e:fleet.test/h",
            &b"SWR\x01E\x00\x01\x02\x03\x04\x05"[..],
        ),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut conn)
            .await
            .expect("SET");
    }
    for path in ["/g", "/h"] {
        let answer = get(&proxies[0], path).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), format!("{path} #1"), "the origin's answer");
        assert_eq!(answer.x_cache(), "MISS");
    }
    assert_eq!(
        proxies[0]
            .counter("swr_fleet_reads_total{result=\"corrupt\"}")
            .await,
        2
    );
    // And the fetched answer (written back in the background) replaced
    // the garbage for the next instance.
    eventually(WAIT, "the garbage replaced", || {
        let mut conn = conn.clone();
        async move {
            let value: Vec<u8> = redis::cmd("GET")
                .arg("swr:1:e:fleet.test/g")
                .query_async(&mut conn)
                .await
                .expect("GET");
            value.starts_with(b"SWR\x01E")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_instances_keep_serving_and_recover_when_it_is_back() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let origin = Origin::start().await;
    let proxies = fleet(
        &origin,
        &redis,
        2,
        &["--ttl", "1s", "--redis-timeout", "200ms"],
    )
    .await;
    assert_eq!(get(&proxies[0], "/s").await.text(), "/s #1");
    assert_eq!(get(&proxies[1], "/s").await.x_cache(), "HIT");

    redis.stop();
    let readyz = |proxy: &TestProxy| {
        let request = proxy.client.get(proxy.admin_url("/readyz")).send();
        async move {
            let response = request.await.expect("admin answers");
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };
    for proxy in &proxies {
        eventually(WAIT, "/readyz says redis is down", || async {
            readyz(proxy).await == (200, "ready\nredis: down\n".to_string())
        })
        .await;
    }
    // Hits, stale hits and their refreshes, and misses, from memory and
    // the origin alone.
    assert_eq!(get(&proxies[0], "/s").await.x_cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&proxies[0], "/s").await.x_cache(), "STALE");
    eventually(WAIT, "a local refresh", || async { origin.hits("/s") == 2 }).await;
    let miss = get(&proxies[1], "/new").await;
    assert_eq!((miss.status, miss.text()), (200, "/new #1".to_string()));
    assert_eq!(
        proxies[1].counter("swr_fleet_redis_up").await,
        0,
        "the gauge says so"
    );

    let redis = Redis::start_on(redis.port).expect("redis restarts");
    for proxy in &proxies {
        eventually(WAIT, "/readyz says redis is up", || async {
            readyz(proxy).await == (200, "ready\nredis: up\n".to_string())
        })
        .await;
    }
    // Shared again: a key fetched by one is read by the other.
    assert_eq!(get(&proxies[0], "/after").await.x_cache(), "MISS");
    let shared = get(&proxies[1], "/after").await;
    assert_eq!(shared.text(), "/after #1");
    assert!(
        shared.cache_status().contains("detail=l2"),
        "{}",
        shared.cache_status()
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_required_makes_readyz_fail_while_it_is_down() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let origin = Origin::start().await;
    let proxies = fleet(&origin, &redis, 1, &["--redis-required"]).await;
    redis.stop();
    let proxy = &proxies[0];
    eventually(WAIT, "/readyz answers 503", || async {
        let response = proxy
            .client
            .get(proxy.admin_url("/readyz"))
            .send()
            .await
            .expect("admin answers");
        response.status() == 503
            && response.text().await.unwrap_or_default() == "not ready\nredis: down\n"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_leaves_instances_answering_from_memory_and_the_origin() {
    // `maxmemory` below what an empty redis-server uses, without eviction:
    // every write (a lease, an entry) is refused with an OOM error, reads
    // still answer.
    let port = free_port();
    let args = ["--maxmemory", "1", "--maxmemory-policy", "noeviction"];
    let Some(redis) = Redis::start_with(port, &args, port) else {
        return;
    };
    let origin = Origin::start().await;
    let proxies = fleet(&origin, &redis, 2, &["--ttl", "1s"]).await;
    let first = get(&proxies[0], "/full").await;
    assert_eq!((first.status, first.text()), (200, "/full #1".to_string()));
    assert_eq!(get(&proxies[0], "/full").await.x_cache(), "HIT");
    // Nothing could be shared: the other instance fills on its own.
    let other = get(&proxies[1], "/full").await;
    assert_eq!((other.status, other.text()), (200, "/full #2".to_string()));
    assert!(
        proxies[0]
            .counter("swr_fleet_errors_total{cause=\"reply\"}")
            .await
            > 0,
        "the refused calls are counted"
    );
    // Stale answers and their refreshes go on, from the origin.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&proxies[0], "/full").await.x_cache(), "STALE");
    eventually(WAIT, "a local refresh", || async {
        origin.hits("/full") == 3
    })
    .await;
    let mut conn = redis.connection().await;
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg("swr:1:e:fleet.test/full")
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(stored, None, "Redis was full: nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_killed_mid_fetch_frees_the_key_when_its_lease_runs_out() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    origin.route("/slow", Route::default().delay(Duration::from_secs(30)));
    // The holder: a real process, killed with SIGKILL mid-fetch. Its
    // lease lives --upstream-timeout + 1 s: 6 s, room for the second
    // instance to start and find it held on a loaded machine.
    let port = free_port();
    let mut holder = Command::new(BIN)
        .args(["--upstream", &origin.url(), "--redis", &redis.url()])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "off",
        ])
        .args(["--upstream-timeout", "5s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("swr-proxy starts");
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the holder did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = reqwest::Client::new();
    let request = client
        .get(format!("http://127.0.0.1:{port}/slow"))
        .header(HOST.0, HOST.1)
        .send();
    let pending = tokio::spawn(request);
    eventually(WAIT, "the holder asks the origin", || async {
        origin.hits("/slow") == 1
    })
    .await;
    holder.kill().expect("SIGKILL");
    let _ = holder.wait();
    let _ = pending.await;

    origin.route("/slow", Route::default());
    let proxies = fleet(&origin, &redis, 1, &["--upstream-timeout", "5s"]).await;
    let answer = get(&proxies[0], "/slow").await;
    assert_eq!(
        (answer.status, answer.text()),
        (200, "/slow #2".to_string())
    );
    assert_eq!(origin.hits("/slow"), 2);
    let metrics = proxies[0].metrics().await;
    let lost = metrics
        .get("swr_fleet_leases_total{result=\"lost\"}")
        .copied()
        .unwrap_or(0.0);
    let won = metrics
        .get("swr_fleet_leases_total{result=\"won\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(lost >= 1.0, "it found the dead holder's lease and waited");
    assert_eq!(won, 1.0, "then took the lease over when it ran out");
}

/// A `swr-proxy worker` process on `redis` for `origin`, killed (SIGKILL)
/// on drop.
struct Worker(Child);

impl Worker {
    fn start(origin: &Origin, redis: &Redis, flags: &[&str]) -> Worker {
        let child = Command::new(BIN)
            .args([
                "worker",
                "--upstream",
                &origin.url(),
                "--redis",
                &redis.url(),
            ])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swr-proxy worker starts");
        Worker(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An instance in stream mode with a ttl of 1 s, holding `path`'s first
/// answer, now stale: its refresh is a job on the stream.
async fn stale_in_stream_mode(origin: &Origin, redis: &Redis, path: &str) -> TestProxy {
    let proxies = fleet(
        origin,
        redis,
        1,
        &[
            "--refresh-mode",
            "stream",
            "--ttl",
            "1s",
            "--stale-while-revalidate",
            "60s",
        ],
    )
    .await;
    let proxy = proxies.into_iter().next().expect("one instance");
    assert_eq!(get(&proxy, path).await.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get(&proxy, path).await;
    assert_eq!(stale.x_cache(), "STALE");
    eventually(WAIT, "the refresh job on the stream", || async {
        proxy
            .counter("swr_fleet_stream_jobs_total{result=\"queued\"}")
            .await
            == 1
    })
    .await;
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_stream_mode_a_worker_refreshes_and_the_instance_gets_its_entry() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxy = stale_in_stream_mode(&origin, &redis, "/s").await;
    assert_eq!(
        origin.hits("/s"),
        1,
        "the instance does not refresh it itself"
    );

    // #2 stays fresh: no later stale answer asks for another refresh.
    origin.route(
        "/s",
        Route::default().header("cache-control", "max-age=3600"),
    );
    let _worker = Worker::start(&origin, &redis, &[]);
    // Exactly its first refresh: a stale answer given before that
    // refresh's event arrived here queues another job, which the worker
    // finds nothing left to do for (the key fresh) instead of fetching #3.
    eventually(
        WAIT,
        "the worker's refresh reaches the instance",
        || async { get(&proxy, "/s").await.text() == "/s #2" },
    )
    .await;
    assert_eq!(origin.hits("/s"), 2);
    assert_eq!(
        proxy
            .counter("swr_upstream_requests_total{cause=\"refresh\"}")
            .await,
        0,
        "the worker refreshed it, not the instance"
    );
}

/// An instance that has not yet heard of a refresh (its event is on the
/// way) answers stale and queues another job. The worker finds the key
/// fresh in the shared level: the job is acknowledged without asking the
/// backend again. The late job is a copy of the first (a stale entry's),
/// added to the stream after the worker's refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entrys_job_for_a_key_refreshed_since_asks_the_backend_nothing() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxy = stale_in_stream_mode(&origin, &redis, "/twice").await;
    let mut conn = redis.connection().await;
    let queued: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("swr:1:refresh")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let [job] = queued.ids.as_slice() else {
        panic!("one job queued: {:?}", queued.ids.len());
    };
    // #2 stays fresh however slowly the late job comes.
    origin.route(
        "/twice",
        Route::default().header("cache-control", "max-age=3600"),
    );
    let _worker = Worker::start(&origin, &redis, &[]);
    eventually(
        WAIT,
        "the worker's refresh reaches the instance",
        || async { get(&proxy, "/twice").await.text() == "/twice #2" },
    )
    .await;

    let mut late = redis::cmd("XADD");
    late.arg("swr:1:refresh").arg("*");
    for (field, value) in &job.map {
        let bytes: Vec<u8> = redis::from_redis_value(value.clone()).expect("a job's field");
        late.arg(field).arg(bytes);
    }
    let late_id: String = late.query_async(&mut conn).await.expect("XADD");
    eventually(WAIT, "the late job taken and acknowledged", || {
        let mut conn = conn.clone();
        let late_id = late_id.clone();
        async move {
            let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg("swr:1:refresh")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            groups
                .groups
                .first()
                .is_some_and(|g| g.last_delivered_id == late_id && g.pending == 0)
        }
    })
    .await;
    assert_eq!(
        origin.hits("/twice"),
        2,
        "the late job refreshed the key again"
    );
    assert_eq!(get(&proxy, "/twice").await.text(), "/twice #2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_has_its_job_taken_over() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxy = stale_in_stream_mode(&origin, &redis, "/k").await;
    origin.route("/k", Route::default().delay(Duration::from_secs(30)));
    // Its lease runs out 3 s after it asks the origin (--upstream-timeout + 1 s).
    let flags = [
        "--refresh-visibility-timeout",
        "500ms",
        "--refresh-max-attempts",
        "20",
        "--upstream-timeout",
        "2s",
    ];
    let mut first = Worker::start(&origin, &redis, &flags);
    eventually(WAIT, "the first worker asks the origin", || async {
        origin.hits("/k") == 2
    })
    .await;
    first.kill();
    origin.route("/k", Route::default());

    let _second = Worker::start(&origin, &redis, &flags);
    eventually(WAIT, "the job taken over and done", || async {
        get(&proxy, "/k").await.text() == "/k #3"
    })
    .await;
    assert_eq!(origin.hits("/k"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_every_attempt_lands_in_the_dead_letters() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxy = stale_in_stream_mode(&origin, &redis, "/d").await;
    origin.route("/d", Route::default().status(503));
    let _worker = Worker::start(
        &origin,
        &redis,
        &[
            "--refresh-visibility-timeout",
            "200ms",
            "--refresh-max-attempts",
            "2",
        ],
    );
    let mut conn = redis.connection().await;
    eventually(WAIT, "one dead letter", || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("XLEN")
                .arg("swr:1:refresh:dead")
                .query_async::<u64>(&mut conn)
                .await
                .unwrap_or(0)
                == 1
        }
    })
    .await;
    assert_eq!(origin.hits("/d"), 3, "the fill, then two attempts");
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("swr:1:refresh:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let letter = &dead.ids[0];
    assert_eq!(letter.get::<String>("key").as_deref(), Some("fleet.test/d"));
    assert_eq!(letter.get::<String>("attempts").as_deref(), Some("2"));
    // Nothing left pending; the stale answer is still served.
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg("swr:1:refresh")
        .arg("swr-workers")
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    assert_eq!(pending.count(), 0);
    assert_eq!(get(&proxy, "/d").await.text(), "/d #1");
}

/// Calls of `command` Redis has answered so far (`INFO commandstats`).
async fn command_calls(redis: &Redis, command: &str) -> u64 {
    let mut conn = redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    let field = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&field))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A client's POST (any 2xx to an unsafe method) invalidates one URL. In
/// the shared level that must cost a bounded number of Redis calls, not a
/// SCAN of the whole keyspace per request: otherwise any client turns a
/// stream of POSTs into full-keyspace scans (and a pile of tasks running
/// them) on the Redis the whole fleet depends on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_post_does_not_scan_the_whole_shared_level() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    origin.route("/v", Route::default().header("vary", "x-tenant"));
    let proxies = fleet(&origin, &redis, 2, &[]).await;
    let mut conn = redis.connection().await;
    // Other keys: what a busy fleet's Redis holds.
    let _: () = redis::cmd("EVAL")
        .arg("for i = 1, 20000 do redis.call('SET', 'swr:1:e:other.test/' .. i, 'x') end")
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("EVAL");
    // Two variants of /v in the shared level.
    for tenant in ["a", "b"] {
        let answer = proxies[0]
            .send(reqwest::Method::GET, "/v", &[HOST, ("x-tenant", tenant)])
            .await;
        assert_eq!(answer.x_cache(), "MISS");
    }
    // Written back in the background: both variants and the URL's Vary
    // record are there before the POST.
    eventually(WAIT, "the variants in redis", || async {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("swr:1:e:fleet.test/v*")
            .query_async(&mut redis.connection().await)
            .await
            .expect("KEYS");
        keys.len() == 3
    })
    .await;
    let scans = command_calls(&redis, "scan").await;
    let posted = proxies[0].send(reqwest::Method::POST, "/v", &[HOST]).await;
    assert_eq!(posted.status, 200);
    // The shared level forgets both variants: another instance fetches.
    eventually(WAIT, "the variants are gone from redis", || async {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("swr:1:e:fleet.test/v*")
            .query_async(&mut redis.connection().await)
            .await
            .expect("KEYS");
        keys.is_empty()
    })
    .await;
    for (tenant, n) in [("a", 4), ("b", 5)] {
        let answer = proxies[1]
            .send(reqwest::Method::GET, "/v", &[HOST, ("x-tenant", tenant)])
            .await;
        assert_eq!(answer.text(), format!("/v #{n}"), "{tenant}");
    }
    let scanned = command_calls(&redis, "scan").await - scans;
    assert!(
        scanned <= 1,
        "one POST made {scanned} SCAN calls over the whole keyspace"
    );
}

/// With --honor-client-cache-control, a client's `no-cache` refuses what
/// is stored: its answer comes from the backend. The shared level is
/// stored too: a fill must not answer it with the very entry the client
/// refused, read back from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_no_cache_is_not_answered_from_the_shared_level() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxies = fleet(&origin, &redis, 2, &["--honor-client-cache-control"]).await;
    assert_eq!(get(&proxies[0], "/nc").await.text(), "/nc #1");
    for (proxy, n) in [(&proxies[0], 2), (&proxies[1], 3)] {
        let answer = proxy
            .send(
                reqwest::Method::GET,
                "/nc",
                &[HOST, ("cache-control", "no-cache")],
            )
            .await;
        assert_eq!(
            answer.text(),
            format!("/nc #{n}"),
            "{}",
            answer.cache_status()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_with_a_password_is_used_with_it_in_the_url_and_the_password_is_not_shown() {
    let port = free_port();
    let Some(redis) = Redis::start_with(port, &["--requirepass", "s3cret-pw"], port) else {
        return;
    };
    let origin = Origin::start().await;
    let with_password = format!("redis://:s3cret-pw@127.0.0.1:{}", redis.port);
    let a = TestProxy::start(&origin, &["--redis", &with_password]).await;
    let b = TestProxy::start(&origin, &["--redis", &with_password]).await;
    assert_eq!(get(&a, "/auth").await.x_cache(), "MISS");
    let shared = get(&b, "/auth").await;
    assert_eq!(shared.text(), "/auth #1");
    assert!(
        shared.cache_status().contains("detail=l2"),
        "{}",
        shared.cache_status()
    );
    // The settings as logged or compared never show it.
    let shown = format!("{:?}", a.proxy.config().start.redis);
    assert!(
        shown.contains("***") && !shown.contains("s3cret-pw"),
        "{shown}"
    );

    // Without it, Redis refuses every call: the instance serves alone and says so.
    let without = TestProxy::start(&origin, &["--redis", &redis.url()]).await;
    let alone = get(&without, "/auth").await;
    assert_eq!((alone.status, alone.text()), (200, "/auth #2".to_string()));
    eventually(WAIT, "redis: down without the password", || async {
        without.proxy.redis_up() == Some(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_prefix_purge_marks_every_copy_stale_and_a_purge_of_all_empties_the_fleet() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start().await;
    let proxies = fleet(&origin, &redis, 2, &[]).await;
    for path in ["/feeds/a", "/feeds/b", "/other"] {
        assert_eq!(get(&proxies[0], path).await.x_cache(), "MISS");
        assert_eq!(get(&proxies[1], path).await.x_cache(), "HIT");
    }
    let purge = |proxy: &TestProxy, body: &'static str| {
        let request = proxy
            .client
            .post(proxy.admin_url("/purge"))
            .header("content-type", "application/json")
            .body(body)
            .send();
        async move {
            let response = request.await.expect("admin answers");
            assert_eq!(response.status(), 200);
            let bytes = response.bytes().await.expect("body");
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("json")
        }
    };
    let soft = purge(
        &proxies[1],
        r#"{"prefix": "fleet.test/feeds/", "soft": true}"#,
    )
    .await;
    assert_eq!(
        (soft["purged"].clone(), soft["shared"].clone()),
        (2.into(), 2.into()),
        "{soft}"
    );
    // The other instance marks its copies stale too: served at once, refreshed.
    eventually(
        WAIT,
        "the soft purge reaches the other instance",
        || async { get(&proxies[0], "/feeds/a").await.x_cache() == "STALE" },
    )
    .await;
    assert_eq!(
        get(&proxies[0], "/other").await.x_cache(),
        "HIT",
        "outside the prefix"
    );
    // A new instance finds the shared copies stale as well.
    let newcomer = fleet(&origin, &redis, 1, &[]).await;
    let answer = get(&newcomer[0], "/feeds/b").await;
    assert_eq!(answer.x_cache(), "STALE", "{}", answer.cache_status());
    assert!(
        answer.cache_status().contains("detail=l2-"),
        "{}",
        answer.cache_status()
    );

    // The two refreshes written back (3 misses + 2 refreshes), so that no
    // write lands after the purge below.
    eventually(WAIT, "the refreshes written back", || async {
        let mut written = 0;
        for proxy in proxies.iter().chain(&newcomer) {
            written += proxy.counter("swr_fleet_writes_total{result=\"ok\"}").await;
        }
        written == 5
    })
    .await;
    let all = purge(&proxies[0], r#"{"all": true}"#).await;
    assert_eq!(all["purged"], 3, "{all}");
    for proxy in proxies.iter().chain(&newcomer) {
        eventually(WAIT, "everything purged everywhere", || async {
            proxy.proxy.store().entry_count() == 0
        })
        .await;
    }
    let mut conn = redis.connection().await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("swr:1:e:*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_over_tls_is_shared_through_a_rediss_url() {
    // A certificate for 127.0.0.1 from a test CA (`support::TestCa`); the
    // instances trust the CA through SSL_CERT_FILE (rediss:// uses the
    // system's roots, where an operator's private CA would be installed).
    let test_ca = support::TestCa::make("fleet-tls");
    let (ca, cert, key) = (&test_ca.ca, &test_ca.cert, &test_ca.key);
    let port = free_port();
    let (cert_path, key_path) = (cert.display().to_string(), key.display().to_string());
    let tls_args = [
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &cert_path,
        "--tls-key-file",
        &key_path,
        "--tls-ca-cert-file",
        &ca.display().to_string(),
        "--tls-auth-clients",
        "no",
    ];
    // No plain port: only TLS clients get in.
    let Some(redis) = Redis::start_with(0, &tls_args, port) else {
        return;
    };
    let origin = Origin::start().await;
    let url = format!("rediss://127.0.0.1:{port}");
    let instances: Vec<(u16, Worker)> = (0..2)
        .map(|_| {
            let listen = free_port();
            let child = Command::new(BIN)
                .args(["--upstream", &origin.url(), "--redis", &url])
                .args([
                    "--listen",
                    &format!("127.0.0.1:{listen}"),
                    "--admin-listen",
                    "off",
                ])
                .env("SSL_CERT_FILE", ca)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swr-proxy starts");
            (listen, Worker(child))
        })
        .collect();
    let client = reqwest::Client::new();
    let fetch = |listen: u16, path: String| {
        let request = client
            .get(format!("http://127.0.0.1:{listen}{path}"))
            .header(HOST.0, HOST.1)
            .send();
        async move { support::Answer::read(request.await.expect("answers")).await }
    };
    for (listen, _) in &instances {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", *listen)).is_err() {
            assert!(Instant::now() < deadline, "swr-proxy did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The connection to Redis is made lazily, by the first call: on a
    // loaded machine the TLS handshake may outlast --redis-timeout, and
    // that first fill is then this instance's alone (Redis marked down
    // until the next ping). So a new key each round, until one that the
    // first instance fetched is read by the second from Redis.
    let mut round = 0;
    eventually(WAIT, "an entry shared over TLS", || {
        round += 1;
        let path = format!("/tls/{round}");
        let (first, second) = (instances[0].0, instances[1].0);
        let fetch = &fetch;
        let origin = &origin;
        async move {
            assert_eq!(fetch(first, path.clone()).await.x_cache(), "MISS");
            // Written back in the background: wait for it a little.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let answer = fetch(second, path.clone()).await;
            answer.cache_status().contains("detail=l2")
                && answer.text() == format!("{path} #1")
                && origin.hits(&path) == 1
        }
    })
    .await;
    drop(instances);
    drop(redis);
}
