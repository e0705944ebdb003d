//! The core path end to end: a real origin, the real proxy, real HTTP.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::{eventually, Gate, Origin, Route, TestCa, TestProxy, WAIT};

#[tokio::test]
async fn fresh_hits_are_served_from_memory() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;

    let first = proxy.get("/rank?user=1").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.text(), "/rank?user=1 #1");
    assert!(
        first.cache_status().contains("fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    assert!(first.cache_status().contains("stored"));

    for _ in 0..20 {
        let hit = proxy.get("/rank?user=1").await;
        assert_eq!(hit.x_cache(), "HIT");
        assert_eq!(hit.text(), "/rank?user=1 #1");
        assert!(
            hit.cache_status().starts_with("swr-proxy; hit; ttl="),
            "{}",
            hit.cache_status()
        );
        assert!(hit.header("age").parse::<u64>().is_ok());
    }
    assert_eq!(origin.hits("/rank?user=1"), 1, "the origin saw one request");
    // Another query is another key.
    assert_eq!(proxy.get("/rank?user=2").await.x_cache(), "MISS");
    assert_eq!(origin.hits("/rank?user=2"), 1);
    assert_eq!(proxy.counter("swr_requests_total{cache=\"HIT\"}").await, 20);
}

#[tokio::test]
async fn head_is_answered_from_a_cached_get() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    origin.route("/h", Route::default().body("0123456789"));

    // A HEAD miss fills the cache with a GET.
    let head = proxy.send(reqwest::Method::HEAD, "/h", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "10");
    assert_eq!(origin.seen("/h")[0].method, "GET");

    let get = proxy.get("/h").await;
    assert_eq!(get.x_cache(), "HIT");
    assert_eq!(get.text(), "0123456789");
    let head = proxy.send(reqwest::Method::HEAD, "/h", &[]).await;
    assert_eq!(head.x_cache(), "HIT");
    assert_eq!(head.header("content-length"), "10");
    assert_eq!(origin.hits("/h"), 1);
}

/// Fetches `path` until the proxy answers STALE (the entry aged past its ttl).
async fn until_stale(proxy: &TestProxy, path: &str) -> support::Answer {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = proxy.get(path).await;
        if answer.x_cache() == "STALE" {
            return answer;
        }
        assert_eq!(
            answer.x_cache(),
            "HIT",
            "before it turns stale the entry is a hit"
        );
        assert!(Instant::now() < deadline, "the entry never turned stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stale_is_served_at_once_while_the_refresh_runs() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &["--ttl", "300ms", "--stale-while-revalidate", "60s"],
    )
    .await;
    assert_eq!(proxy.get("/feed").await.text(), "/feed #1");

    // The refresh will be held at the origin until the gate opens: a stale
    // answer arriving meanwhile proves the request did not wait for it.
    let gate = Gate::closed();
    origin.route("/feed", Route::default().gate(&gate));
    let stale = until_stale(&proxy, "/feed").await;
    assert_eq!(stale.text(), "/feed #1");
    assert!(
        stale.cache_status().contains("ttl=-"),
        "{}",
        stale.cache_status()
    );
    assert!(stale.cache_status().contains("detail=refresh-queued"));
    eventually(WAIT, "the refresh reaches the origin", || async {
        origin.hits("/feed") == 2
    })
    .await;
    // Still held: more stale answers, no second refresh.
    let again = proxy.get("/feed").await;
    assert_eq!(again.x_cache(), "STALE");
    assert_eq!(again.text(), "/feed #1");
    assert!(again.cache_status().contains("detail=refresh-pending"));

    gate.open();
    eventually(WAIT, "the refreshed entry is served", || async {
        let answer = proxy.get("/feed").await;
        answer.text() == "/feed #2" && answer.x_cache() == "HIT"
    })
    .await;
    assert_eq!(origin.hits("/feed"), 2);
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"succeeded\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn a_stale_answer_is_far_faster_than_a_slow_origin() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "300ms"]).await;
    proxy.get("/slow").await;
    let delay = Duration::from_millis(500);
    origin.route("/slow", Route::default().delay(delay));

    tokio::time::sleep(Duration::from_millis(350)).await; // past the ttl
    let started = Instant::now();
    let stale = proxy.get("/slow").await;
    let took = started.elapsed();
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(stale.text(), "/slow #1");
    assert!(
        took < delay / 2,
        "a stale answer took {took:?}, the origin takes {delay:?}"
    );
    eventually(WAIT, "the refreshed body is served", || async {
        proxy.get("/slow").await.text() == "/slow #2"
    })
    .await;
}

#[tokio::test]
async fn fifty_concurrent_stale_requests_cause_one_refresh() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "300ms"]).await;
    proxy.get("/hot").await;
    let gate = Gate::closed();
    origin.route("/hot", Route::default().gate(&gate));
    until_stale(&proxy, "/hot").await;

    let answers = join_all((0..50).map(|_| proxy.get("/hot"))).await;
    for answer in &answers {
        assert_eq!(answer.x_cache(), "STALE");
        assert_eq!(answer.text(), "/hot #1");
    }
    gate.open();
    eventually(WAIT, "the refresh completes", || async {
        proxy
            .counter("swr_refresh_events_total{event=\"succeeded\"}")
            .await
            == 1
    })
    .await;
    assert_eq!(origin.hits("/hot"), 2, "one fill and exactly one refresh");
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"queued\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_origin_request() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    let gate = Gate::closed();
    origin.route("/cold", Route::default().gate(&gate));

    let requests = join_all((0..100).map(|_| proxy.get("/cold")));
    let opener = async {
        // Let every client arrive before the origin answers.
        eventually(WAIT, "99 clients wait on the fill", || async {
            proxy.counter("swr_coalesced_waiters_total").await == 99
        })
        .await;
        gate.open();
    };
    let (answers, ()) = tokio::join!(requests, opener);
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "/cold #1");
    }
    assert_eq!(origin.hits("/cold"), 1);
    let collapsed = answers
        .iter()
        .filter(|a| a.cache_status().contains("collapsed"))
        .count();
    assert_eq!(collapsed, 99);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_old_entry() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "300ms"]).await;
    proxy.get("/r").await;
    origin.route("/r", Route::default().status(500));
    until_stale(&proxy, "/r").await;
    eventually(WAIT, "the refresh fails", || async {
        proxy
            .counter("swr_refresh_events_total{event=\"failed\"}")
            .await
            == 1
    })
    .await;
    let answer = proxy.get("/r").await;
    assert_eq!(answer.x_cache(), "STALE");
    assert_eq!(answer.text(), "/r #1", "the old entry is kept");

    // The key can be queued again, and a good refresh replaces the entry.
    origin.route("/r", Route::default());
    eventually(WAIT, "a later refresh succeeds", || async {
        proxy.get("/r").await.text().starts_with("/r #")
            && proxy
                .counter("swr_refresh_events_total{event=\"succeeded\"}")
                .await
                == 1
    })
    .await;
    let refreshed = proxy.get("/r").await;
    assert_eq!(refreshed.x_cache(), "HIT");
    assert_ne!(refreshed.text(), "/r #1");
}

#[tokio::test]
async fn stale_if_error_serves_stale_when_the_origin_is_down() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &[
            "--ttl",
            "200ms",
            "--stale-while-revalidate",
            "0",
            "--stale-if-error",
            "60s",
        ],
    )
    .await;
    proxy.get("/e").await;
    origin.stop();
    tokio::time::sleep(Duration::from_millis(250)).await; // expired: no stale-while-revalidate window
    let answer = proxy.get("/e").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.x_cache(), "STALE");
    assert_eq!(answer.text(), "/e #1");
    assert!(
        answer
            .cache_status()
            .contains("detail=stale-if-error-connect"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(proxy.counter("swr_stale_if_error_total").await, 1);
    assert!(
        proxy
            .counter("swr_upstream_errors_total{kind=\"connect\"}")
            .await
            >= 1
    );
}

#[tokio::test]
async fn stale_if_error_covers_backend_5xx_answers() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &[
            "--ttl",
            "200ms",
            "--stale-while-revalidate",
            "0",
            "--stale-if-error",
            "60s",
        ],
    )
    .await;
    proxy.get("/e5").await;
    origin.route("/e5", Route::default().status(503));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let answer = proxy.get("/e5").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.x_cache(), "STALE");
    assert_eq!(answer.text(), "/e5 #1");
    assert!(answer.cache_status().contains("stale-if-error-status"));
}

#[tokio::test]
async fn expired_with_the_origin_down_answers_502_with_a_body() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &[
            "--ttl",
            "200ms",
            "--stale-while-revalidate",
            "0",
            "--stale-if-error",
            "0",
        ],
    )
    .await;
    proxy.get("/gone").await;
    origin.stop();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let answer = proxy.get("/gone").await;
    assert_eq!(answer.status, 502);
    // Past every window the entry could be served in, it was evicted: a miss.
    assert_eq!(answer.x_cache(), "MISS");
    assert!(
        answer
            .text()
            .starts_with("swr-proxy: could not connect to the backend"),
        "{}",
        answer.text()
    );
    assert_eq!(answer.text().lines().count(), 1);
    // A miss with the origin down is a 502 too.
    let miss = proxy.get("/never-seen").await;
    assert_eq!(miss.status, 502);
    assert_eq!(miss.x_cache(), "MISS");
}

#[tokio::test]
async fn an_expired_entry_is_fetched_before_answering() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &[
            "--ttl",
            "200ms",
            "--stale-while-revalidate",
            "0",
            "--stale-if-error",
            "60s",
        ],
    )
    .await;
    proxy.get("/x").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let answer = proxy.get("/x").await;
    assert_eq!(answer.x_cache(), "EXPIRED");
    assert_eq!(answer.text(), "/x #2", "the answer waited for the new body");
    assert!(
        answer
            .cache_status()
            .contains("fwd=stale; fwd-status=200; stored"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(proxy.get("/x").await.x_cache(), "HIT");
    // Expired, and the backend fails while stale-if-error still covers the entry.
    origin.route("/x", Route::default().status(502));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let failed = proxy.get("/x").await;
    assert_eq!(failed.x_cache(), "STALE");
    assert_eq!(failed.text(), "/x #2");
}

#[tokio::test]
async fn a_slow_origin_answers_504_and_a_reset_502() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--upstream-timeout", "200ms"]).await;
    origin.route("/slow", Route::default().delay(Duration::from_secs(3)));
    origin.route("/reset", Route::default().reset());
    let slow = proxy.get("/slow").await;
    assert_eq!(slow.status, 504);
    assert!(
        slow.text().contains("did not answer in time"),
        "{}",
        slow.text()
    );
    let reset = proxy.get("/reset").await;
    assert_eq!(reset.status, 502);
    assert!(reset.text().starts_with("swr-proxy: "), "{}", reset.text());
}

#[tokio::test]
async fn post_is_passed_through_and_never_cached() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    for n in 1..=2 {
        let response = proxy
            .client
            .post(proxy.url("/orders?x=1"))
            .header("x-custom", "kept")
            .body(format!("order {n}"))
            .send()
            .await
            .unwrap();
        let answer = support::Answer::read(response).await;
        assert_eq!(answer.x_cache(), "BYPASS");
        assert!(answer.cache_status().contains("fwd=method"));
        assert_eq!(answer.text(), format!("/orders?x=1 #{n}"));
    }
    let seen = origin.seen("/orders?x=1");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(&seen[1].body[..], b"order 2");
    assert_eq!(seen[1].headers["x-custom"], "kept");
    assert_eq!(
        proxy.counter("swr_bypass_total{reason=\"method\"}").await,
        2
    );
    // A GET for the same URL was not answered from the POSTs.
    assert_eq!(proxy.get("/orders?x=1").await.x_cache(), "MISS");
}

#[tokio::test]
async fn responses_that_may_not_be_shared_are_not_stored() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    origin.route(
        "/no-store",
        Route::default().header("cache-control", "no-store"),
    );
    origin.route(
        "/private",
        Route::default().header("cache-control", "private, max-age=60"),
    );
    origin.route(
        "/cookie",
        Route::default().header("set-cookie", "session=abc"),
    );
    for (path, reason) in [
        ("/no-store", "no-store"),
        ("/private", "private"),
        ("/cookie", "set-cookie"),
    ] {
        for n in 1..=2 {
            let answer = proxy.get(path).await;
            assert_eq!(answer.x_cache(), "BYPASS", "{path}");
            assert_eq!(
                answer.text(),
                format!("{path} #{n}"),
                "each answer comes from the origin"
            );
            assert!(
                answer.cache_status().contains(&format!("detail={reason}")),
                "{}",
                answer.cache_status()
            );
        }
        assert_eq!(origin.hits(path), 2);
    }
    assert_eq!(
        proxy.get("/cookie").await.header("set-cookie"),
        "session=abc"
    );
    assert_eq!(
        proxy
            .counter("swr_bypass_total{reason=\"set-cookie\"}")
            .await,
        3
    );
}

#[tokio::test]
async fn concurrent_waiters_never_share_a_private_answer() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    let gate = Gate::closed();
    origin.route(
        "/me",
        Route::default()
            .header("cache-control", "private")
            .gate(&gate),
    );
    let requests = join_all((0..5).map(|_| proxy.get("/me")));
    let opener = async {
        eventually(WAIT, "4 clients wait on the fill", || async {
            proxy.counter("swr_coalesced_waiters_total").await == 4
        })
        .await;
        gate.open();
    };
    let (answers, ()) = tokio::join!(requests, opener);
    let mut bodies: Vec<String> = answers.iter().map(|a| a.text()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        5,
        "every client got its own answer: {bodies:?}"
    );
    assert_eq!(origin.hits("/me"), 5);
}

#[tokio::test]
async fn an_oversize_response_is_streamed_and_not_stored() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s", "--max-object-size", "1KiB"]).await;
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    origin.route("/big", Route::default().body(big.clone()));
    origin.route("/big-chunked", Route::default().body(big.clone()).chunked());
    for path in ["/big", "/big-chunked"] {
        for _ in 0..2 {
            let answer = proxy.get(path).await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.x_cache(), "BYPASS");
            assert!(answer.cache_status().contains("detail=too-large"));
            assert_eq!(answer.body.len(), big.len());
            assert!(
                answer.body[..] == big[..],
                "{path}: the body arrives intact"
            );
        }
        assert_eq!(origin.hits(path), 2, "{path} was not stored");
    }
    // A small response is still stored.
    proxy.get("/small").await;
    assert_eq!(proxy.get("/small").await.x_cache(), "HIT");
}

#[tokio::test]
async fn a_full_refresh_queue_still_serves_stale_and_counts_the_drop() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &[
            "--ttl",
            "300ms",
            "--refresh-queue",
            "1",
            "--refresh-concurrency",
            "1",
        ],
    )
    .await;
    let keys: Vec<String> = (0..6).map(|i| format!("/q?k={i}")).collect();
    for key in &keys {
        proxy.get(key).await;
    }
    let gate = Gate::closed();
    origin.route("/q", Route::default().gate(&gate));
    tokio::time::sleep(Duration::from_millis(350)).await;

    // The first stale key's refresh occupies the only worker.
    assert_eq!(proxy.get(&keys[0]).await.x_cache(), "STALE");
    eventually(WAIT, "the worker is busy", || async {
        proxy.counter("swr_refresh_in_flight").await == 1
    })
    .await;
    // The second fills the queue; the rest are dropped (or, asked for a
    // little more as the sampled counts go, take the queued one's place),
    // and still served at once.
    let mut dropped = 0;
    for key in &keys[1..] {
        let answer = proxy.get(key).await;
        assert_eq!(answer.x_cache(), "STALE");
        assert_eq!(answer.status, 200);
        if answer.cache_status().contains("detail=refresh-dropped") {
            dropped += 1;
        }
    }
    assert!(dropped >= 3, "{dropped}");
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"dropped\"}")
            .await,
        4
    );
    assert_eq!(proxy.counter("swr_refresh_queue_depth").await, 1);
    gate.open();
    // A dropped key can be queued again later.
    eventually(
        WAIT,
        "a dropped key is refreshed on a later stale hit",
        || async { proxy.get(&keys[5]).await.text() == "/q?k=5 #2" },
    )
    .await;
}

#[tokio::test]
async fn the_cache_is_bounded_in_bytes() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &[
            "--ttl",
            "60s",
            "--max-size",
            "64KiB",
            "--max-object-size",
            "8KiB",
        ],
    )
    .await;
    origin.route("/obj", Route::default().body(vec![b'x'; 4096]));
    for i in 0..100 {
        proxy.get(&format!("/obj?i={i}")).await;
    }
    let (bytes, entries) = (
        proxy.counter("swr_cache_bytes").await,
        proxy.counter("swr_cache_entries").await,
    );
    assert!(bytes <= 64 * 1024, "{bytes} bytes held");
    assert!(entries < 20, "{entries} entries held");
    assert!(entries > 0);
}

/// An https backend with a private CA: trusted through `--upstream-ca`,
/// asked over h2 (ALPN), its answer stored and served again. Refused (a
/// 502, counted as a connect error, the handshake failed and the backend
/// not asked) by a proxy with the compiled-in roots, by one given another
/// CA (the file's certificates replace the roots), and when the backend's
/// name is not the certificate's.
#[tokio::test]
async fn an_https_backend_is_verified_against_the_upstream_ca() {
    let ca = TestCa::make("https-backend");
    let origin = Origin::start_tls(&ca).await;
    let ca_file = ca.ca.to_str().expect("a UTF-8 temp path");
    let proxy = TestProxy::start_for(
        &origin.https_url(),
        &["--ttl", "60s", "--upstream-ca", ca_file],
    )
    .await;
    let first = proxy.get("/feed?u=1").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.text(), "/feed?u=1 #1");
    let again = proxy.get("/feed?u=1").await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.text(), "/feed?u=1 #1");
    let seen = origin.seen("/feed?u=1");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_2, "h2 by ALPN");
    assert_eq!(origin.tls_failures(), 0);

    let other = TestCa::make("https-other");
    let other_file = other.ca.to_str().expect("a UTF-8 temp path");
    let by_name = format!("https://localhost:{}", origin.addr.port());
    let refusing = [
        ("the compiled-in roots", origin.https_url(), vec![]),
        (
            "another CA",
            origin.https_url(),
            vec!["--upstream-ca", other_file],
        ),
        (
            "a name the certificate does not hold",
            by_name,
            vec!["--upstream-ca", ca_file],
        ),
    ];
    for (n, (what, backend, flags)) in refusing.iter().enumerate() {
        let failures = origin.tls_failures();
        let flags = [&["--ttl", "60s"][..], flags].concat();
        let untrusting = TestProxy::start_for(backend, &flags).await;
        let path = format!("/feed?u=r{n}");
        let refused = untrusting.get(&path).await;
        assert_eq!(refused.status, 502, "{what}: {}", refused.text());
        assert!(
            refused.text().contains("could not connect to the backend"),
            "{what}: the cause is named: {}",
            refused.text()
        );
        let errors = untrusting
            .counter("swr_upstream_errors_total{kind=\"connect\"}")
            .await;
        assert_eq!(errors, 1, "{what}: counted as a connect error");
        assert!(
            origin.tls_failures() > failures,
            "{what}: the handshake failed"
        );
        assert_eq!(origin.hits(&path), 0, "{what}");
    }
}
