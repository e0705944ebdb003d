//! HTTP caching semantics (RFC 9111, RFC 5861, RFC 9211, RFC 9213) against
//! the real origin, asserting on the origin's counters and on Cache-Status.
//! Tests marked "both modes" run with the defaults and as a strict RFC 9111
//! shared cache (`--ttl 0 --stale-while-revalidate 0 --stale-if-error 0`).

mod support;

use std::time::Duration;

use reqwest::Method;
use support::{eventually, Origin, Route, TestProxy, WAIT};

const STRICT: &[&str] = &[
    "--ttl",
    "0",
    "--stale-while-revalidate",
    "0",
    "--stale-if-error",
    "0",
];
const DEFAULTS: &[&str] = &[];

async fn proxy_with(origin: &Origin, base: &[&str], extra: &[&str]) -> TestProxy {
    let flags: Vec<&str> = base.iter().chain(extra).copied().collect();
    TestProxy::start(origin, &flags).await
}

// 1. Freshness from the backend.

#[tokio::test]
async fn backend_max_age_decides_freshness_in_both_modes() {
    for mode in [&["--stale-while-revalidate", "0"][..], STRICT] {
        let origin = Origin::start().await;
        let proxy = proxy_with(&origin, mode, &[]).await;
        origin.route("/m", Route::default().header("cache-control", "max-age=1"));
        origin.route(
            "/s",
            Route::default().header("cache-control", "max-age=1, s-maxage=60"),
        );
        assert_eq!(proxy.get("/m").await.x_cache(), "MISS");
        let hit = proxy.get("/m").await;
        assert_eq!(hit.x_cache(), "HIT", "{mode:?}");
        assert!(
            hit.cache_status().contains("ttl=1"),
            "{}",
            hit.cache_status()
        );
        proxy.get("/s").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // max-age=1 is past; s-maxage=60 wins over max-age.
        assert_ne!(proxy.get("/m").await.x_cache(), "HIT", "{mode:?}");
        assert_eq!(proxy.get("/s").await.x_cache(), "HIT", "{mode:?}");
        assert_eq!(origin.hits("/s"), 1);
    }
}

#[tokio::test]
async fn expires_heuristics_and_the_configured_default() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "42s"]).await;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let in_a_minute =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    let a_while_ago =
        httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(3000));
    origin.route(
        "/exp",
        Route::default()
            .header("date", &date)
            .header("expires", &in_a_minute),
    );
    origin.route(
        "/lm",
        Route::default()
            .header("date", &date)
            .header("last-modified", &a_while_ago),
    );
    origin.route("/none", Route::default());
    let exp = ttl_of(&proxy.get("/exp").await);
    assert!((115..=120).contains(&exp), "Expires - Date: {exp}");
    let lm = ttl_of(&proxy.get("/lm").await);
    assert_eq!(lm, 42, "Last-Modified alone: the configured ttl");
    assert_eq!(ttl_of(&proxy.get("/none").await), 42, "the configured ttl");
    // Asked for, the heuristic: 10% of the time since, at most the ttl.
    let asked = TestProxy::start(&origin, &["--ttl", "1h", "--heuristic-freshness", "10"]).await;
    let lm = ttl_of(&asked.get("/lm").await);
    assert!((295..=300).contains(&lm), "10% of 3000 s: {lm}");
}

/// The ttl of an answer, from its `Cache-Status`.
fn ttl_of(answer: &support::Answer) -> i64 {
    answer
        .cache_status()
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {:?}", answer.cache_status()))
}

/// `--ttl` is the freshness of a response without explicit freshness,
/// whatever its `Last-Modified` says: just now (a computed ranking) or a
/// month ago (a static file).
#[tokio::test]
async fn the_ttl_applies_whatever_last_modified_says() {
    let origin = Origin::start().await;
    let proxy =
        TestProxy::start(&origin, &["--ttl", "5s", "--stale-while-revalidate", "30s"]).await;
    let now = std::time::SystemTime::now();
    let month_ago = now - Duration::from_secs(30 * 24 * 3600);
    for (path, modified) in [("/now", now), ("/month", month_ago)] {
        origin.route(
            path,
            Route::default()
                .header("date", &httpdate::fmt_http_date(now))
                .header("last-modified", &httpdate::fmt_http_date(modified)),
        );
        assert_eq!(proxy.get(path).await.x_cache(), "MISS");
        let hit = proxy.get(path).await;
        assert_eq!(hit.x_cache(), "HIT", "{path}: fresh for --ttl");
        let ttl = ttl_of(&hit);
        assert!(
            (4..=5).contains(&ttl),
            "{path}: ttl={ttl}, not the heuristic"
        );
    }
}

/// RFC 9111 §5.1: an `Age` that is a list, or two `Age` lines, is invalid
/// and must not make the response fresher than it is.
#[tokio::test]
async fn an_invalid_age_never_makes_a_response_fresher() {
    let origin = Origin::start().await;
    let proxy = proxy_with(&origin, STRICT, &[]).await;
    origin.route(
        "/list",
        Route::default()
            .header("cache-control", "max-age=100")
            .header("age", "7200, 0"),
    );
    origin.route(
        "/two",
        Route::default()
            .header("cache-control", "max-age=100")
            .header("age", "0")
            .header("age", "7200"),
    );
    for path in ["/list", "/two"] {
        proxy.get(path).await;
        assert_ne!(proxy.get(path).await.x_cache(), "HIT", "{path}");
        assert_eq!(origin.hits(path), 2, "{path}: not served as fresh");
    }
}

/// RFC 9111 §4.4: a response to any method not known to be safe
/// invalidates, extension methods included.
#[tokio::test]
async fn unknown_methods_invalidate() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/doc",
        Route::default().header("cache-control", "max-age=60"),
    );
    for method in ["PURGE", "LOCK", "X-REINDEX"] {
        proxy.get("/doc").await;
        assert_eq!(proxy.get("/doc").await.x_cache(), "HIT");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let answer = proxy.send(method.clone(), "/doc", &[]).await;
        assert_eq!(answer.x_cache(), "BYPASS");
        assert_eq!(
            proxy.get("/doc").await.x_cache(),
            "MISS",
            "{method} invalidated"
        );
    }
}

/// RFC 9213 §2.2: a valid targeted field replaces Cache-Control entirely
/// for this cache, `no-store` and `private` included; an invalid one is
/// ignored.
#[tokio::test]
async fn a_targeted_field_replaces_cache_control() {
    let origin = Origin::start().await;
    let proxy = proxy_with(&origin, STRICT, &[]).await;
    for (path, general) in [("/ns", "no-store"), ("/pv", "private")] {
        origin.route(
            path,
            Route::default()
                .header("cache-control", general)
                .header("cdn-cache-control", "max-age=60"),
        );
        proxy.get(path).await;
        let hit = proxy.get(path).await;
        assert_eq!(hit.x_cache(), "HIT", "{path}");
        assert_eq!(hit.header("cache-control"), general, "clients still see it");
    }
    origin.route(
        "/invalid",
        Route::default()
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "Max-Age=60"),
    );
    proxy.get("/invalid").await;
    assert_eq!(proxy.get("/invalid").await.x_cache(), "BYPASS");
}

/// RFC 9111 §4.2.3: the apparent age from `Date` counts.
#[tokio::test]
async fn apparent_age_from_date_counts() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    let then = std::time::SystemTime::now() - Duration::from_secs(30);
    origin.route(
        "/dated",
        Route::default()
            .header("cache-control", "max-age=100")
            .header("date", &httpdate::fmt_http_date(then)),
    );
    proxy.get("/dated").await;
    let hit = proxy.get("/dated").await;
    let age: u64 = hit.header("age").parse().unwrap();
    assert!((29..=32).contains(&age), "age {age}");
    let ttl = ttl_of(&hit);
    assert!((68..=71).contains(&ttl), "ttl {ttl}");
}

/// RFC 9110 §5.6.7: `Expires` in the three date formats, in any case.
#[tokio::test]
async fn expires_in_every_date_format_and_case() {
    let origin = Origin::start().await;
    let proxy = proxy_with(&origin, STRICT, &[]).await;
    let now = std::time::SystemTime::now();
    let date = httpdate::fmt_http_date(now);
    let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
    // `Sun, 06 Nov 1994 08:49:37 GMT` as RFC 850 and asctime.
    let parts: Vec<&str> = later.split([' ', ',']).filter(|p| !p.is_empty()).collect();
    let (day, dd, mon, yyyy, time) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    let long_day = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ]
    .into_iter()
    .find(|d| d.starts_with(day))
    .unwrap();
    let rfc850 = format!("{long_day}, {dd}-{mon}-{} {time} GMT", &yyyy[2..]);
    let asctime = format!(
        "{day} {mon} {:>2} {time} {yyyy}",
        dd.trim_start_matches('0')
    );
    for (i, expires) in [
        later.to_lowercase(),
        later.to_uppercase(),
        rfc850.to_lowercase(),
        asctime.to_uppercase(),
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/exp{i}");
        origin.route(
            &path,
            Route::default()
                .header("date", &date)
                .header("expires", expires),
        );
        proxy.get(&path).await;
        let hit = proxy.get(&path).await;
        assert_eq!(hit.x_cache(), "HIT", "{expires}");
        let ttl = ttl_of(&hit);
        assert!((118..=120).contains(&ttl), "{expires}: ttl {ttl}");
    }
}

/// RFC 9111 §4.1: Vary matching normalises white space and the case of
/// tokens, without merging different values.
#[tokio::test]
async fn vary_matching_normalises_without_merging() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/v",
        Route::default()
            .header("cache-control", "max-age=60")
            .header("vary", "accept-encoding"),
    );
    let with = |value: &'static str| [("accept-encoding", value)];
    assert_eq!(
        proxy
            .send(Method::GET, "/v", &with("gzip,br"))
            .await
            .x_cache(),
        "MISS"
    );
    for same in ["gzip, br", "GZIP ,  BR"] {
        assert_eq!(
            proxy.send(Method::GET, "/v", &with(same)).await.x_cache(),
            "HIT",
            "{same}"
        );
    }
    assert_eq!(
        proxy.send(Method::GET, "/v", &with("br")).await.x_cache(),
        "MISS"
    );
    assert_eq!(
        proxy
            .send(Method::GET, "/v", &with("br, gzip"))
            .await
            .x_cache(),
        "MISS"
    );
}

/// RFC 9111 §5.2.2.4 and §5.2.2.7: `no-cache="field"` and
/// `private="field"` are stored, less the named fields.
#[tokio::test]
async fn qualified_no_cache_and_private_store_without_their_fields() {
    let origin = Origin::start().await;
    let proxy = proxy_with(&origin, STRICT, &[]).await;
    origin.route(
        "/q",
        Route::default()
            .header(
                "cache-control",
                "max-age=60, private=\"set-cookie\", no-cache=\"x-debug\"",
            )
            .header("set-cookie", "session=alice")
            .header("x-debug", "backend-7")
            .header("x-kept", "yes"),
    );
    let first = proxy.get("/q").await;
    assert_eq!(first.x_cache(), "MISS");
    let hit = proxy.get("/q").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(origin.hits("/q"), 1);
    assert_eq!(hit.header("set-cookie"), "", "not stored");
    assert_eq!(hit.header("x-debug"), "", "not stored");
    assert_eq!(hit.header("x-kept"), "yes");
}

/// Coalesced followers of a fill whose answer may not be shared are
/// labelled with the real reason, not `status`.
#[tokio::test]
async fn followers_of_an_unshareable_fill_carry_its_reason() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    let gate = support::Gate::closed();
    origin.route(
        "/mine",
        Route::default()
            .header("cache-control", "private")
            .gate(&gate),
    );
    let requests = futures_util::future::join_all((0..4).map(|_| proxy.get("/mine")));
    let opener = async {
        eventually(WAIT, "the fill and its followers wait", || async {
            proxy.counter("swr_coalesced_waiters_total").await >= 3
        })
        .await;
        gate.open();
    };
    let (answers, ()) = tokio::join!(requests, opener);
    for answer in &answers {
        assert_eq!(answer.x_cache(), "BYPASS");
        assert!(
            answer.cache_status().contains("detail=private"),
            "{}",
            answer.cache_status()
        );
    }
}

/// The uncoalesced fetch (a key remembered as uncacheable) treats a
/// backend 5xx as the coalesced fill does: a stale copy within
/// stale-if-error stands in.
#[tokio::test]
async fn the_uncoalesced_fetch_serves_stale_on_a_backend_error() {
    let origin = Origin::start().await;
    let proxy = proxy_with(&origin, STRICT, &[]).await;
    origin.route(
        "/sie",
        Route::default().header("cache-control", "max-age=0, stale-if-error=60"),
    );
    assert_eq!(proxy.get("/sie").await.x_cache(), "MISS");
    // Not storable this time: the key is remembered as uncacheable.
    origin.route("/sie", Route::default().header("cache-control", "private"));
    assert_eq!(proxy.get("/sie").await.x_cache(), "BYPASS");
    origin.route("/sie", Route::default().status(500));
    let answer = proxy.get("/sie").await;
    assert_eq!(proxy.counter("swr_hit_for_miss_total").await, 1);
    assert_eq!(answer.status, 200, "{}", answer.cache_status());
    assert_eq!(answer.x_cache(), "STALE");
    assert!(answer.cache_status().contains("stale-if-error-status"));
}

#[tokio::test]
async fn upstream_age_is_counted() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/aged",
        Route::default()
            .header("cache-control", "max-age=100")
            .header("age", "30"),
    );
    let first = proxy.get("/aged").await;
    let age: u64 = first.header("age").parse().unwrap();
    assert!((30..=31).contains(&age), "Age sent: {age}");
    assert!(
        first.cache_status().contains("ttl=70"),
        "{}",
        first.cache_status()
    );
}

// 2. Stale windows from the backend.

#[tokio::test]
async fn backend_stale_while_revalidate_overrides_the_default() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, STRICT).await;
    origin.route(
        "/swr",
        Route::default().header("cache-control", "max-age=1, stale-while-revalidate=30"),
    );
    proxy.get("/swr").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = proxy.get("/swr").await;
    assert_eq!(
        stale.x_cache(),
        "STALE",
        "even in strict mode, the response allows it"
    );
    assert_eq!(stale.text(), "/swr #1");
    eventually(WAIT, "the refresh lands", || async {
        origin.hits("/swr") == 2
    })
    .await;
}

#[tokio::test]
async fn must_revalidate_gets_no_default_stale_windows() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(
        &origin,
        &["--stale-while-revalidate", "60s", "--stale-if-error", "60s"],
    )
    .await;
    origin.route(
        "/mr",
        Route::default().header("cache-control", "max-age=1, must-revalidate"),
    );
    origin.route(
        "/mr-sie",
        Route::default().header(
            "cache-control",
            "max-age=1, must-revalidate, stale-if-error=60",
        ),
    );
    origin.route(
        "/sm",
        Route::default().header("cache-control", "s-maxage=1"),
    );
    for path in ["/mr", "/mr-sie", "/sm"] {
        proxy.get(path).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Not served stale while revalidating: fetched before answering.
    let answer = proxy.get("/sm").await;
    assert_ne!(answer.x_cache(), "STALE");
    assert_eq!(answer.text(), "/sm #2");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    origin.stop();
    // Not served stale on error either, unless the response said so.
    assert_eq!(proxy.get("/mr").await.status, 502);
    let sie = proxy.get("/mr-sie").await;
    assert_eq!(sie.status, 200);
    assert_eq!(sie.x_cache(), "STALE");
}

#[tokio::test]
async fn no_cache_is_stored_but_revalidated_before_every_use() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/nc",
        Route::default()
            .header("cache-control", "no-cache")
            .etag("\"v1\""),
    );
    assert_eq!(proxy.get("/nc").await.text(), "/nc #1");
    for n in 2..=3 {
        let answer = proxy.get("/nc").await;
        assert_eq!(
            answer.x_cache(),
            "EXPIRED",
            "validated, not served as fresh"
        );
        assert_eq!(answer.text(), "/nc #1", "a 304 kept the stored body");
        assert_eq!(origin.hits("/nc"), n);
    }
    let seen = origin.seen("/nc");
    assert_eq!(seen[1].headers["if-none-match"], "\"v1\"");
    assert_eq!(proxy.counter("swr_revalidated_total").await, 2);
}

// 3. The policy switch.

#[tokio::test]
async fn override_mode_applies_the_configured_lifetimes() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--cache-control", "override", "--ttl", "60s"]).await;
    origin.route(
        "/careless",
        Route::default().header("cache-control", "no-cache, max-age=0"),
    );
    origin.route(
        "/private",
        Route::default().header("cache-control", "private"),
    );
    proxy.get("/careless").await;
    let hit = proxy.get("/careless").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(origin.hits("/careless"), 1);
    proxy.get("/private").await;
    assert_eq!(proxy.get("/private").await.x_cache(), "BYPASS");
    assert_eq!(
        origin.hits("/private"),
        2,
        "private is never shared, even in override mode"
    );
}

#[tokio::test]
async fn strict_mode_stores_nothing_without_freshness_or_validators() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, STRICT).await;
    for n in 1..=2 {
        let answer = proxy.get("/plain").await;
        assert_eq!(answer.x_cache(), "BYPASS");
        assert_eq!(answer.text(), format!("/plain #{n}"));
    }
    origin.route(
        "/fresh",
        Route::default().header("cache-control", "max-age=60"),
    );
    proxy.get("/fresh").await;
    assert_eq!(proxy.get("/fresh").await.x_cache(), "HIT");
}

// 4. Never share private answers.

#[tokio::test]
async fn answers_to_authorized_requests_are_shared_only_when_allowed() {
    for mode in [DEFAULTS, STRICT] {
        let origin = Origin::start().await;
        let proxy = proxy_with(&origin, mode, &[]).await;
        origin.route(
            "/mine",
            Route::default().header("cache-control", "max-age=60"),
        );
        origin.route(
            "/shared",
            Route::default().header("cache-control", "public, max-age=60"),
        );
        let auth = [("authorization", "Bearer alice")];
        let first = proxy.send(Method::GET, "/mine", &auth).await;
        assert_eq!(first.x_cache(), "BYPASS");
        assert!(
            first.cache_status().contains("detail=authorization"),
            "{}",
            first.cache_status()
        );
        // Bob does not get Alice's answer.
        let bob = proxy
            .send(Method::GET, "/mine", &[("authorization", "Bearer bob")])
            .await;
        assert_eq!(bob.text(), "/mine #2");
        proxy.send(Method::GET, "/shared", &auth).await;
        assert_eq!(
            proxy.send(Method::GET, "/shared", &auth).await.x_cache(),
            "HIT"
        );
        assert_eq!(origin.hits("/shared"), 1);
    }
}

#[tokio::test]
async fn vary_star_is_never_stored() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route("/any", Route::default().header("vary", "*"));
    proxy.get("/any").await;
    let second = proxy.get("/any").await;
    assert_eq!(second.x_cache(), "BYPASS");
    assert!(second.cache_status().contains("detail=vary-star"));
    assert_eq!(origin.hits("/any"), 2);
}

// 5. Vary.

#[tokio::test]
async fn variants_live_side_by_side() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    origin.route(
        "/v",
        Route::default()
            .header("vary", "Accept-Language")
            .echo("accept-language"),
    );
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(proxy.send(Method::GET, "/v", &en).await.text(), "/v #1 en");
    let fr_first = proxy.send(Method::GET, "/v", &fr).await;
    assert_eq!(fr_first.text(), "/v #2 fr");
    assert!(
        fr_first.cache_status().contains("fwd=vary-miss"),
        "{}",
        fr_first.cache_status()
    );
    for _ in 0..3 {
        let a = proxy.send(Method::GET, "/v", &en).await;
        assert_eq!((a.x_cache(), a.text().as_str()), ("HIT", "/v #1 en"));
        // Whitespace does not make another variant.
        let b = proxy
            .send(Method::GET, "/v", &[("accept-language", "  fr ")])
            .await;
        assert_eq!((b.x_cache(), b.text().as_str()), ("HIT", "/v #2 fr"));
    }
    assert_eq!(origin.hits("/v"), 2);
    let de = proxy
        .send(Method::GET, "/v", &[("accept-language", "de")])
        .await;
    assert_eq!(de.x_cache(), "MISS");
    assert!(de.cache_status().contains("fwd=vary-miss"));
}

// 6. Revalidation.

#[tokio::test]
async fn a_background_refresh_revalidates_with_the_etag() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "300ms"]).await;
    let body = "x".repeat(5000);
    origin.route("/etag", Route::default().etag("\"r1\"").body(body.clone()));
    proxy.get("/etag").await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(proxy.get("/etag").await.x_cache(), "STALE");
    eventually(WAIT, "the 304 renews the entry", || async {
        proxy.counter("swr_revalidated_total").await == 1
    })
    .await;
    assert_eq!(origin.seen("/etag")[1].headers["if-none-match"], "\"r1\"");
    assert_eq!(
        proxy.counter("swr_revalidation_saved_bytes_total").await,
        5000
    );
    let renewed = proxy.get("/etag").await;
    assert_eq!(renewed.x_cache(), "HIT");
    assert_eq!(renewed.text(), body);
    assert_eq!(renewed.header("etag"), "\"r1\"");
}

/// RFC 9110 §7.6.1: the fields a 304's `Connection` names are hop-by-hop
/// fields of that 304; they do not remove the stored answer's own.
#[tokio::test]
async fn a_304_connection_header_does_not_strip_stored_fields() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "300ms"]).await;
    origin.route(
        "/hop",
        Route::default().etag("\"v1\"").header("x-kept", "yes"),
    );
    assert_eq!(proxy.get("/hop").await.x_cache(), "MISS");
    // From now on a revalidation gets a 304 whose Connection names the
    // ETag it carries and the stored answer's X-Kept.
    origin.route(
        "/hop",
        Route::default()
            .etag("\"v1\"")
            .header("connection", "etag, x-kept"),
    );
    eventually(WAIT, "a 304 renews the entry", || async {
        proxy.get("/hop").await;
        proxy.counter("swr_revalidated_total").await == 1
    })
    .await;
    assert_eq!(origin.seen("/hop")[1].headers["if-none-match"], "\"v1\"");
    let renewed = proxy.get("/hop").await;
    assert_eq!(renewed.text(), "/hop #1", "served from the renewed entry");
    assert_eq!(renewed.header("etag"), "\"v1\"");
    assert_eq!(renewed.header("x-kept"), "yes");
    // The stored ETag still makes the next revalidation conditional.
    eventually(WAIT, "the renewed entry is revalidated", || async {
        proxy.get("/hop").await;
        origin.hits("/hop") == 3
    })
    .await;
    assert_eq!(origin.seen("/hop")[2].headers["if-none-match"], "\"v1\"");
}

/// What the backend says against storing an answer counts wherever it
/// says it: a `Cache-Control` its `Connection` names is not sent on (a
/// hop-by-hop field, RFC 9110 §7.6.1), but its `private` or `no-store`
/// still keeps the answer, or its renewal, out of the shared cache.
#[tokio::test]
async fn a_directive_against_storing_counts_even_named_in_connection() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "300ms"]).await;
    origin.route(
        "/hop-private",
        Route::default()
            .header("cache-control", "private")
            .header("connection", "cache-control"),
    );
    for _ in 0..2 {
        let answer = proxy.get("/hop-private").await;
        assert_eq!(answer.x_cache(), "BYPASS");
        assert!(
            answer.cache_status().contains("detail=private"),
            "{}",
            answer.cache_status()
        );
        assert_eq!(answer.header("cache-control"), "");
    }
    assert_eq!(origin.hits("/hop-private"), 2);

    // A 304 that says no-store in a field its Connection names ends the
    // stored answer instead of renewing it.
    origin.route("/hop-304", Route::default().etag("\"v1\""));
    assert_eq!(proxy.get("/hop-304").await.x_cache(), "MISS");
    origin.route(
        "/hop-304",
        Route::default()
            .etag("\"v1\"")
            .header("cache-control", "no-store")
            .header("connection", "cache-control"),
    );
    eventually(WAIT, "the 304 is fetched", || async {
        proxy.get("/hop-304").await;
        origin.hits("/hop-304") == 2
    })
    .await;
    assert_eq!(
        origin.seen("/hop-304")[1].headers["if-none-match"],
        "\"v1\""
    );
    // The entry is gone: the next fetch is not conditional.
    eventually(WAIT, "the next fetch", || async {
        proxy.get("/hop-304").await;
        origin.hits("/hop-304") == 3
    })
    .await;
    assert!(!origin.seen("/hop-304")[2]
        .headers
        .contains_key("if-none-match"));
}

// 7. Client conditional requests.

#[tokio::test]
async fn client_conditionals_get_304_from_the_cache() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    origin.route(
        "/c",
        Route::default()
            .etag("\"c1\"")
            .header("last-modified", "Sat, 28 Nov 2026 10:00:00 GMT"),
    );
    proxy.get("/c").await;
    let nm = proxy
        .send(Method::GET, "/c", &[("if-none-match", "\"c1\"")])
        .await;
    assert_eq!(nm.status, 304);
    assert!(nm.body.is_empty());
    assert_eq!(nm.header("etag"), "\"c1\"");
    let other = proxy
        .send(Method::GET, "/c", &[("if-none-match", "\"c0\"")])
        .await;
    assert_eq!(other.status, 200);
    let ims = proxy
        .send(
            Method::GET,
            "/c",
            &[("if-modified-since", "Sat, 28 Nov 2026 11:00:00 GMT")],
        )
        .await;
    assert_eq!(ims.status, 304);
    let head = proxy.send(Method::HEAD, "/c", &[]).await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(origin.hits("/c"), 1, "all answered from the cache");
    assert_eq!(proxy.counter("swr_not_modified_total").await, 2);
}

// 8. Request directives.

#[tokio::test]
async fn client_directives_are_ignored_by_default() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    proxy.get("/d").await;
    for (name, value) in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        assert_eq!(
            proxy
                .send(Method::GET, "/d", &[(name, value)])
                .await
                .x_cache(),
            "HIT"
        );
    }
    assert_eq!(
        origin.hits("/d"),
        1,
        "a client cannot push traffic onto the backend"
    );
}

#[tokio::test]
async fn client_directives_with_honor_client_cache_control() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s", "--honor-client-cache-control"]).await;
    proxy.get("/d").await;
    let forced = proxy
        .send(Method::GET, "/d", &[("cache-control", "no-cache")])
        .await;
    assert!(
        forced.cache_status().contains("fwd=request"),
        "{}",
        forced.cache_status()
    );
    assert_eq!(forced.text(), "/d #2");
    let pragma = proxy
        .send(Method::GET, "/d", &[("pragma", "no-cache")])
        .await;
    assert_eq!(pragma.text(), "/d #3");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let max_age = proxy
        .send(Method::GET, "/d", &[("cache-control", "max-age=0")])
        .await;
    assert_eq!(max_age.text(), "/d #4");
    let min_fresh = proxy
        .send(Method::GET, "/d", &[("cache-control", "min-fresh=600")])
        .await;
    assert_eq!(min_fresh.text(), "/d #5");
    assert_eq!(proxy.get("/d").await.x_cache(), "HIT");
    let only = proxy
        .send(
            Method::GET,
            "/absent",
            &[("cache-control", "only-if-cached")],
        )
        .await;
    assert_eq!(only.status, 504);
    assert_eq!(origin.hits("/absent"), 0);
    let cached = proxy
        .send(Method::GET, "/d", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(cached.status, 200);
    let no_store = proxy
        .send(Method::GET, "/ns", &[("cache-control", "no-store")])
        .await;
    assert_eq!(no_store.x_cache(), "BYPASS");
    assert_eq!(
        proxy.get("/ns").await.x_cache(),
        "MISS",
        "nothing was stored"
    );
}

#[tokio::test]
async fn max_stale_allows_an_expired_entry() {
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
            "--honor-client-cache-control",
        ],
    )
    .await;
    proxy.get("/ms").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let answer = proxy
        .send(Method::GET, "/ms", &[("cache-control", "max-stale=60")])
        .await;
    assert_eq!(answer.x_cache(), "STALE");
    assert_eq!(answer.text(), "/ms #1");
}

// 9. Invalidation.

#[tokio::test]
async fn unsafe_methods_invalidate_the_uri_and_its_locations() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    for path in ["/item", "/list", "/other"] {
        proxy.get(path).await;
        assert_eq!(proxy.get(path).await.x_cache(), "HIT");
    }
    // A failed POST invalidates nothing.
    origin.route("/item", Route::default().status(500));
    proxy.send(Method::POST, "/item", &[]).await;
    origin.route("/item", Route::default());
    assert_eq!(proxy.get("/item").await.x_cache(), "HIT");
    // A successful one invalidates the URI, and its Location / Content-Location.
    let host = proxy.addr.to_string();
    origin.route(
        "/item",
        Route::default()
            .status(201)
            .header("location", "/list")
            .header("content-location", &format!("http://{host}/other")),
    );
    proxy.send(Method::PUT, "/item", &[]).await;
    origin.route("/item", Route::default());
    for path in ["/item", "/list", "/other"] {
        assert_eq!(proxy.get(path).await.x_cache(), "MISS", "{path}");
    }
    assert_eq!(proxy.counter("swr_invalidations_total").await, 3);
}

// 10. Status codes.

#[tokio::test]
async fn status_codes_follow_rfc_9111() {
    for mode in [DEFAULTS, STRICT] {
        let origin = Origin::start().await;
        let proxy = proxy_with(&origin, mode, &[]).await;
        origin.route(
            "/404",
            Route::default()
                .status(404)
                .header("cache-control", "max-age=60"),
        );
        origin.route("/500", Route::default().status(500));
        origin.route("/302", Route::default().status(302));
        origin.route(
            "/302f",
            Route::default()
                .status(302)
                .header("cache-control", "max-age=60"),
        );
        origin.route(
            "/206",
            Route::default()
                .status(206)
                .header("cache-control", "max-age=60"),
        );
        for path in ["/404", "/500", "/302", "/302f", "/206"] {
            proxy.get(path).await;
            proxy.get(path).await;
        }
        assert_eq!(origin.hits("/404"), 1, "{mode:?}");
        assert_eq!(origin.hits("/500"), 2);
        assert_eq!(origin.hits("/302"), 2, "not heuristically cacheable");
        assert_eq!(
            origin.hits("/302f"),
            1,
            "explicit freshness makes it storable"
        );
        assert_eq!(origin.hits("/206"), 2, "partial answers are never stored");
    }
}

#[tokio::test]
async fn range_requests_are_passed_through() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    proxy.get("/r").await;
    let ranged = proxy
        .send(Method::GET, "/r", &[("range", "bytes=0-1")])
        .await;
    assert_eq!(ranged.x_cache(), "BYPASS");
    assert!(ranged.cache_status().contains("detail=range"));
    assert_eq!(origin.seen("/r")[1].headers["range"], "bytes=0-1");
}

// 11. Cache-Status, CDN-Cache-Control and the targeted field.

#[tokio::test]
async fn targeted_fields_override_and_are_not_forwarded() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/t",
        Route::default()
            .header("cache-control", "no-cache")
            .header("cdn-cache-control", "max-age=5")
            .header("swr-cache-control", "max-age=120"),
    );
    let first = proxy.get("/t").await;
    assert!(
        first.cache_status().contains("ttl=120"),
        "{}",
        first.cache_status()
    );
    assert_eq!(first.header("swr-cache-control"), "");
    assert_eq!(first.header("cdn-cache-control"), "");
    assert_eq!(
        first.header("cache-control"),
        "no-cache",
        "the client still gets its own field"
    );
    assert_eq!(proxy.get("/t").await.x_cache(), "HIT");
    assert_eq!(origin.hits("/t"), 1);

    let custom = Origin::start().await;
    let proxy = TestProxy::start(&custom, &["--targeted-cache-control", "edge-control"]).await;
    custom.route(
        "/e",
        Route::default()
            .header("cache-control", "max-age=0")
            .header("edge-control", "max-age=60"),
    );
    proxy.get("/e").await;
    let hit = proxy.get("/e").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.header("edge-control"), "");
}

#[tokio::test]
async fn cache_status_names_what_happened() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "60s"]).await;
    let miss = proxy.get("/cs").await;
    assert_eq!(
        miss.cache_status(),
        "swr-proxy; fwd=uri-miss; fwd-status=200; stored; ttl=60"
    );
    let hit = proxy.get("/cs").await;
    assert_eq!(hit.cache_status(), "swr-proxy; hit; ttl=60");
    origin.route(
        "/nostore",
        Route::default().header("cache-control", "no-store"),
    );
    let bypass = proxy.get("/nostore").await;
    assert_eq!(
        bypass.cache_status(),
        "swr-proxy; fwd=bypass; fwd-status=200; detail=no-store"
    );
    let post = proxy.send(Method::POST, "/cs", &[]).await;
    assert_eq!(
        post.cache_status(),
        "swr-proxy; fwd=method; fwd-status=200; detail=method"
    );
}
