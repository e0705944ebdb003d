//! How swr-proxy decides what to refresh: the queue takes the most valuable
//! refresh first (popularity times staleness) and drops the least valuable
//! when full, hot keys are refreshed ahead of staleness, and the age of
//! every answer against its ttl is visible per route.

mod support;

use std::time::{Duration, Instant};

use support::{eventually, Gate, Origin, Route, TempFile, TestProxy, WAIT};

/// Stale from the first answer on, and served stale for ten minutes.
const STALE: &str = "max-age=0, stale-while-revalidate=600";

/// Holds the one refresh worker at the backend on `/block` (stored and
/// stale already) until the returned gate opens.
async fn hold_the_worker(origin: &Origin, proxy: &TestProxy) -> Gate {
    let gate = Gate::closed();
    origin.route(
        "/block",
        Route::default().header("cache-control", STALE).gate(&gate),
    );
    assert_eq!(proxy.get("/block").await.x_cache(), "STALE");
    eventually(WAIT, "the worker holds /block", || async {
        origin.hits("/block") == 2
    })
    .await;
    gate
}

/// One refresh worker (`--refresh-concurrency 1`), held at the backend by
/// `gate` on `/block`, with `cold` keys queued behind it in that order,
/// then a `/hot` key asked for `hot_asks` times: the position of the hot
/// key's refresh among the refreshes that follow, once the gate opens.
async fn refresh_order(flags: &[&str], cold: usize, hot_asks: usize) -> (usize, Vec<String>) {
    let origin = Origin::start().await;
    for path in ["/block", "/cold", "/hot"] {
        origin.route(path, Route::default().header("cache-control", STALE));
    }
    let mut all = vec!["--refresh-concurrency", "1"];
    all.extend_from_slice(flags);
    let proxy = TestProxy::start(&origin, &all).await;
    let cold_keys: Vec<String> = (0..cold).map(|k| format!("/cold?k={k}")).collect();
    for key in cold_keys
        .iter()
        .map(String::as_str)
        .chain(["/block", "/hot"])
    {
        assert_eq!(proxy.get(key).await.x_cache(), "MISS", "{key}");
    }
    // The one worker waits at the backend on /block...
    let gate = hold_the_worker(&origin, &proxy).await;
    assert!(proxy
        .get("/block")
        .await
        .cache_status()
        .contains("detail=refresh-pending"));
    // ...while every cold key queues a refresh, then the hot key one.
    for key in &cold_keys {
        let answer = proxy.get(key).await;
        assert!(
            answer.cache_status().contains("detail=refresh-queued"),
            "{key}: {}",
            answer.cache_status()
        );
    }
    let again = proxy.get(&cold_keys[0]).await;
    assert!(
        again.cache_status().contains("detail=refresh-backlog"),
        "a stale answer whose refresh waits in the backlog says so: {}",
        again.cache_status()
    );
    for _ in 0..hot_asks {
        assert_eq!(proxy.get("/hot").await.x_cache(), "STALE");
    }
    let before = origin.log().len();
    gate.open();
    eventually(WAIT, "every queued refresh ran", || async {
        origin.log().len() > before + cold
    })
    .await;
    let after: Vec<String> = origin.log()[before..].to_vec();
    let position = after
        .iter()
        .position(|p| p == "/hot")
        .expect("the hot key was refreshed");
    (position, after)
}

/// A hot key's refresh queued after 40 cold keys' runs before them.
#[tokio::test]
async fn a_hot_key_is_refreshed_before_cold_keys_queued_first() {
    let (position, order) = refresh_order(&[], 40, 400).await;
    assert_eq!(position, 0, "the hot key first: {order:?}");
}

/// Without priorities (`--refresh-priority=false`), the same queue is
/// first in, first out: the hot key waits behind every cold one (this is
/// what the test above would see if the order were not by value).
#[tokio::test]
async fn without_priority_the_queue_is_first_in_first_out() {
    let (position, order) = refresh_order(&["--refresh-priority=false"], 40, 400).await;
    assert_eq!(position, 40, "behind the 40 cold keys: {order:?}");
}

/// A full queue drops its least valuable job for a more valuable one; a
/// job worth no more than the least queued is the one dropped.
#[tokio::test]
async fn a_full_queue_drops_the_least_valuable_refresh() {
    let origin = Origin::start().await;
    for path in ["/block", "/cold", "/hot"] {
        origin.route(path, Route::default().header("cache-control", STALE));
    }
    let proxy = TestProxy::start(
        &origin,
        &["--refresh-concurrency", "1", "--refresh-queue", "10"],
    )
    .await;
    // The hot key is asked for often (its refreshes run at once).
    for _ in 0..400 {
        proxy.get("/hot").await;
    }
    let cold_keys: Vec<String> = (0..11).map(|k| format!("/cold?k={k}")).collect();
    for key in cold_keys.iter().map(String::as_str).chain(["/block"]) {
        assert_eq!(proxy.get(key).await.x_cache(), "MISS", "{key}");
    }
    eventually(WAIT, "the hot key's refreshes are done", || async {
        proxy.proxy.refresh_claims() == 0
    })
    .await;
    let gate = Gate::closed();
    origin.route(
        "/block",
        Route::default().header("cache-control", STALE).gate(&gate),
    );
    proxy.get("/block").await;
    eventually(WAIT, "the worker holds /block", || async {
        origin.hits("/block") == 2
    })
    .await;
    for key in &cold_keys[..10] {
        assert!(proxy
            .get(key)
            .await
            .cache_status()
            .contains("detail=refresh-queued"));
    }
    let dropped = "swr_refresh_events_total{event=\"dropped\"}";
    assert_eq!(proxy.counter(dropped).await, 0);
    // Full: a cold key is dropped, or (asked for a little more than
    // another, as the sampled counts go) takes that one's place...
    let answer = proxy.get(&cold_keys[10]).await;
    assert_eq!(answer.x_cache(), "STALE", "still served at once");
    assert_eq!(proxy.counter(dropped).await, 1);
    // ...and the hot key takes a cold key's place.
    let answer = proxy.get("/hot").await;
    assert!(
        answer.cache_status().contains("detail=refresh-queued"),
        "{}",
        answer.cache_status()
    );
    assert_eq!(proxy.counter(dropped).await, 2, "the displaced job counts");
    let before = origin.log().len();
    gate.open();
    eventually(WAIT, "the queue ran", || async {
        origin.log().len() >= before + 10
    })
    .await;
    let after = &origin.log()[before..];
    assert_eq!(after[0], "/hot", "{after:?}");
    let cold_run = after.iter().filter(|p| p.starts_with("/cold")).count();
    assert_eq!(cold_run, 9, "one of ten queued cold keys was displaced");
}

/// How often a hot key is asked for: about 150 times a second.
const HOT_EVERY: Duration = Duration::from_millis(5);

/// Asks for `path`, pausing `every` between answers, for `lasting`, and
/// returns every answer's `Cache-Status`.
async fn keep_asking(
    proxy: &TestProxy,
    path: &str,
    every: Duration,
    lasting: Duration,
) -> Vec<String> {
    let mut statuses = Vec::new();
    let until = Instant::now() + lasting;
    while Instant::now() < until {
        statuses.push(proxy.get(path).await.cache_status().to_string());
        tokio::time::sleep(every).await;
    }
    statuses
}

/// A key asked for about 150 times a second is refreshed before it turns
/// stale, over three lifetimes, with the default flags: no answer is stale.
/// A key asked for every 2 s (30 a minute, below the default 60) is not
/// refreshed ahead: it turns stale. The sketch samples about one answer in
/// 16, at random gaps, with weight 16, so a key is refreshed ahead once 4
/// of its requests are sampled (64): for the cold key's 5 requests that is
/// about one run in 13,000 (at every 0.7 s, 14 requests, it was one in a
/// hundred; at every 1.2 s, 8 requests, one in 1,000).
#[tokio::test]
async fn a_hot_key_is_refreshed_ahead_and_a_cold_key_is_not() {
    let origin = Origin::start().await;
    let fresh = "max-age=3, stale-while-revalidate=600";
    for path in ["/hot", "/cold"] {
        origin.route(path, Route::default().header("cache-control", fresh));
    }
    let proxy = TestProxy::start(&origin, &[]).await;
    let lasting = Duration::from_millis(9_500);
    let (statuses, cold) = tokio::join!(
        keep_asking(&proxy, "/hot", HOT_EVERY, lasting),
        keep_asking(&proxy, "/cold", Duration::from_secs(2), lasting),
    );
    assert!(
        cold.iter().all(|s| !s.contains("refresh-ahead")),
        "{cold:?}"
    );
    assert!(
        cold.iter().filter(|s| s.contains("ttl=-")).count() >= 2,
        "the cold key turned stale, lifetime after lifetime: {cold:?}"
    );
    let not_hits = statuses.iter().filter(|s| !s.contains("; hit")).count();
    assert!(
        statuses.iter().all(|s| !s.contains("ttl=-")),
        "a hot key was served stale: {:?}",
        statuses
            .iter()
            .filter(|s| s.contains("ttl=-"))
            .collect::<Vec<_>>()
    );
    assert_eq!(not_hits, 1, "only the first answer came from the backend");
    assert!(
        statuses.iter().any(|s| s.contains("detail=refresh-ahead")),
        "an answer queued the refresh"
    );
    assert!(origin.hits("/hot") >= 4, "refreshed once per lifetime");
    assert!(
        proxy
            .counter("swr_refresh_events_total{event=\"ahead\"}")
            .await
            >= 3
    );
}

/// `--refresh-ahead 0` turns it off: the same hot key is served stale once
/// a lifetime (the test above would fail this way without refresh-ahead).
#[tokio::test]
async fn refresh_ahead_off_serves_the_hot_key_stale() {
    let origin = Origin::start().await;
    let fresh = "max-age=2, stale-while-revalidate=600";
    origin.route("/hot", Route::default().header("cache-control", fresh));
    let proxy = TestProxy::start(&origin, &["--refresh-ahead", "0"]).await;
    let statuses = keep_asking(&proxy, "/hot", HOT_EVERY, Duration::from_millis(4_500)).await;
    assert!(statuses.iter().any(|s| s.contains("ttl=-")));
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"ahead\"}")
            .await,
        0
    );
}

/// A route's threshold applies to its keys only: `refresh_ahead = 0` on
/// `/off` leaves its hot key to turn stale while `/on` is refreshed ahead;
/// and every answer from the cache is counted in its route's age/ttl
/// histogram, stale ones above 1.
#[tokio::test]
async fn routes_set_refresh_ahead_and_count_served_age_over_ttl() {
    let origin = Origin::start().await;
    let fresh = "max-age=2, stale-while-revalidate=600";
    for path in ["/on", "/off", "/other"] {
        origin.route(path, Route::default().header("cache-control", fresh));
    }
    let config = TempFile::new(
        "[[route]]\npath = \"/on\"\nrefresh_ahead = 30\n\n[[route]]\npath = \"/off\"\nrefresh_ahead = 0\n",
    );
    let proxy = TestProxy::start(&origin, &["--config", config.path()]).await;
    let (on, off) = tokio::join!(
        keep_asking(&proxy, "/on", HOT_EVERY, Duration::from_millis(4_500)),
        keep_asking(&proxy, "/off", HOT_EVERY, Duration::from_millis(4_500)),
    );
    assert!(on.iter().all(|s| !s.contains("ttl=-")), "{on:?}");
    assert!(off.iter().any(|s| s.contains("ttl=-")));
    proxy.get("/other").await;
    proxy.get("/other").await;
    let metrics = proxy.metrics().await;
    let series = |route: &str, what: &str| {
        let name = format!("swr_served_age_ttl_ratio_{what}{{route=\"{route}\"}}");
        metrics.get(&name).copied().unwrap_or_else(|| {
            let names: Vec<&String> = metrics
                .keys()
                .filter(|k| k.starts_with("swr_served_age_ttl"))
                .collect();
            panic!("{name} not in {names:?}")
        })
    };
    // Every answer came from a stored entry (the first, as it was stored).
    assert_eq!(series("/on", "count") as usize, on.len());
    assert_eq!(series("/off", "count") as usize, off.len());
    assert_eq!(series("default", "count"), 2.0, "/other's miss and hit");
    let fresh_off = series("/off\",le=\"1", "bucket");
    let stale_off = off.iter().filter(|s| s.contains("ttl=-")).count();
    assert_eq!(
        (series("/off", "count") - fresh_off) as usize,
        stale_off,
        "the stale answers are the ones above 1"
    );
}

/// A refresh whose entry is purged while the job waits in the queue does
/// not run: the backend is not asked for it (the job holds the entry's key,
/// not the entry, which the purge freed).
#[tokio::test]
async fn a_queued_refresh_of_a_purged_entry_does_not_run() {
    let origin = Origin::start().await;
    for path in ["/block", "/purged"] {
        origin.route(path, Route::default().header("cache-control", STALE));
    }
    let proxy = TestProxy::start(&origin, &["--refresh-concurrency", "1"]).await;
    for key in ["/block", "/purged"] {
        assert_eq!(proxy.get(key).await.x_cache(), "MISS", "{key}");
    }
    let gate = hold_the_worker(&origin, &proxy).await;
    let queued = proxy.get("/purged").await;
    assert!(
        queued.cache_status().contains("detail=refresh-queued"),
        "{}",
        queued.cache_status()
    );
    let purge = proxy
        .client
        .post(proxy.admin_url("/purge"))
        .header("content-type", "application/json")
        .body(format!("{{\"key\": \"{}\"}}", proxy.key("/purged")))
        .send()
        .await
        .expect("admin answers");
    assert_eq!(purge.status(), 200);
    assert!(purge
        .text()
        .await
        .unwrap_or_default()
        .contains("\"purged\": 1"));
    gate.open();
    eventually(WAIT, "the queue is empty and no refresh runs", || async {
        proxy.counter("swr_refresh_queue_depth").await == 0
            && proxy.counter("swr_refresh_in_flight").await == 0
            && origin.hits("/block") == 2
    })
    .await;
    assert_eq!(
        origin.hits("/purged"),
        1,
        "the purged entry was not refreshed"
    );
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"dropped\"}")
            .await,
        1,
        "its job counted as dropped"
    );
    assert_eq!(proxy.get("/purged").await.x_cache(), "MISS");
}
