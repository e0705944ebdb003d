//! A shared cache under attack: request heads written as raw bytes, against
//! a raw backend that records the exact bytes it receives. Each test fails
//! when the protection it names is removed.

mod support;

use support::raw::{exchange, RawBackend};
use support::{eventually, TempFile, TestProxy, WAIT};

/// A GET of `path` on `host` with `extra` header lines (each ending CRLF).
fn get(path: &str, host: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").into_bytes()
}

/// The proxy with fast hits (the default) and without, in front of `backend`.
async fn both_paths(backend: &RawBackend, flags: &[&str]) -> [TestProxy; 2] {
    let mut slow = flags.to_vec();
    slow.push("--no-fast-hits");
    [
        TestProxy::start_for(&backend.url(), flags).await,
        TestProxy::start_for(&backend.url(), &slow).await,
    ]
}

/// Framing the client sent with a body the cache does not forward.
const SMUGGLERS: [(&str, &str, &str); 4] = [
    ("GET", "content-length: 10\r\n", "GET /x HTT"),
    (
        "GET",
        "transfer-encoding: chunked\r\n",
        "5\r\nGET /\r\n0\r\n\r\n",
    ),
    (
        "HEAD",
        "content-length: 5\r\nexpect: 100-continue\r\n",
        "GET /",
    ),
    ("GET", "content-length: 4\r\ntrailer: x-t\r\n", "abcd"),
];

/// A fill, whatever body its client sent, reaches the backend without the
/// client's framing: the next request on the pooled connection arrives
/// whole, and nothing is read as a body.
#[tokio::test]
async fn fills_carry_no_client_framing() {
    let backend = RawBackend::start().await;
    // A desynced backend connection would make the next request wait: fail fast.
    let proxy = TestProxy::start_for(&backend.url(), &["--upstream-timeout", "3s"]).await;
    for (i, (method, framing, body)) in SMUGGLERS.iter().enumerate() {
        let path = format!("/fill-{i}");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: shop.example\r\n{framing}\r\n{body}");
        let answer = exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(answer.status, 200, "{method} with {framing:?}");
        let next = format!("/next-{i}");
        let answer = exchange(proxy.addr, &get(&next, "shop.example", "")).await;
        assert_eq!(answer.status, 200);
        assert!(answer.text().starts_with(&format!("{next} #")));
        let fill = &backend.seen_for(&path)[0];
        for name in ["content-length", "transfer-encoding", "expect", "trailer"] {
            assert_eq!(fill.header(name), None, "{name} forwarded: {}", fill.head);
        }
        assert!(fill.body.is_empty());
        assert_eq!(fill.request_line(), format!("GET {path} HTTP/1.1"));
        let next_seen = &backend.seen_for(&next);
        assert_eq!(next_seen.len(), 1, "the next request arrived whole");
        assert_eq!(next_seen[0].request_line(), format!("GET {next} HTTP/1.1"));
    }
    // Nothing else reached the backend (no request made of a body's bytes).
    assert_eq!(backend.seen().len(), 2 * SMUGGLERS.len());
}

/// A stale hit's refresh carries neither the client's framing nor its
/// credentials, and a pass-through keeps its body with its own framing.
#[tokio::test]
async fn refreshes_carry_no_framing_and_no_credentials() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: max-age=0, stale-while-revalidate=60"]);
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let first = exchange(proxy.addr, &get("/r", "shop.example", "")).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    let credentials =
        "cookie: session=alice\r\nauthorization: Bearer alice\r\ncontent-length: 3\r\n";
    let request = [get("/r", "shop.example", credentials), b"abc".to_vec()].concat();
    let stale = exchange(proxy.addr, &request).await;
    assert_eq!(stale.header("x-cache").as_deref(), Some("STALE"));
    eventually(WAIT, "the refresh reaches the backend", || async {
        backend.seen_for("/r").len() == 2
    })
    .await;
    let refresh = &backend.seen_for("/r")[1];
    for name in ["cookie", "authorization", "content-length"] {
        assert_eq!(refresh.header(name), None, "{name} in the refresh");
    }
    // A POST's body goes with its own framing.
    let post = b"POST /p HTTP/1.1\r\nHost: shop.example\r\ncontent-length: 5\r\n\r\nhello";
    assert_eq!(exchange(proxy.addr, post).await.status, 200);
    let seen = &backend.seen_for("/p")[0];
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header("content-length").as_deref(), Some("5"));
}

/// A `Host` that is not `host[:port]`, none in HTTP/1.1, or two, is a 400
/// on both paths and never reaches the backend; so a Host cannot collide
/// with a path.
#[tokio::test]
async fn a_host_that_is_not_a_host_is_refused() {
    let backend = RawBackend::start().await;
    for proxy in both_paths(&backend, &[]).await {
        // Warm the URL the bad heads aim at, so a fast hit is possible.
        let warm = exchange(proxy.addr, &get("/static/app.js", "shop.example", "")).await;
        assert_eq!(warm.status, 200);
        let before = backend.seen().len();
        let bad: [&[u8]; 9] = [
            b"GET /app.js HTTP/1.1\r\nHost: shop.example/static\r\n\r\n",
            b"GET /static/app.js HTTP/1.1\r\n\r\n",
            b"GET /static/app.js HTTP/1.1\r\nHost: shop.example\r\nHost: evil.example\r\n\r\n",
            b"GET /static/app.js HTTP/1.1\r\nHost: shop.example\r\nhost: shop.example\r\n\r\n",
            b"GET /static/app.js HTTP/1.1\r\nHost: user@shop.example\r\n\r\n",
            b"GET /static/app.js HTTP/1.1\r\nHost: shop.example:80:80\r\n\r\n",
            b"GET /static/app.js HTTP/1.1\r\nHost: shop.example?\r\n\r\n",
            b"GET http://user@shop.example/static/app.js HTTP/1.1\r\nHost: shop.example\r\n\r\n",
            b"POST /static/app.js HTTP/1.1\r\nHost: shop.example/x\r\ncontent-length: 0\r\n\r\n",
        ];
        for head in bad {
            let answer = exchange(proxy.addr, head).await;
            assert_eq!(answer.status, 400, "{}", String::from_utf8_lossy(head));
        }
        assert_eq!(backend.seen().len(), before, "nothing was forwarded");
        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics["swr_refused_total{reason=\"bad-host\"}"],
            bad.len() as f64
        );
        // HTTP/1.0 needs no Host.
        let old = exchange(proxy.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
        assert_eq!(old.status, 200);
    }
}

/// `Connection` cannot remove `Host` (or anything else) before swr-proxy
/// sets the forwarding headers: the backend sees the key's host.
#[tokio::test]
async fn connection_cannot_remove_host_or_keyed_headers() {
    let backend = RawBackend::start().await;
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let extra = "Connection: host, x-forwarded-host, accept-language\r\n\
                 X-Forwarded-Host: evil.example\r\nAccept-Language: fr\r\n";
    let answer = exchange(proxy.addr, &get("/c", "shop.example", extra)).await;
    assert_eq!(answer.status, 200);
    let seen = &backend.seen_for("/c")[0];
    assert_eq!(seen.headers("x-forwarded-host"), ["shop.example"]);
    assert_eq!(seen.header("accept-language").as_deref(), Some("fr"));
    assert!(!seen.head.contains("evil.example"));
}

/// Every forwarding header a client sends: absent at the backend, which
/// sees swr-proxy's own; kept and appended to from a trusted peer.
const CLIENT_FORWARDING: [(&str, &str); 19] = [
    ("x-scheme", "https"),
    ("x-forwarded", "for=10.9.9.9"),
    ("front-end-https", "on"),
    ("x-url-scheme", "https"),
    ("x-script-name", "/evil"),
    ("client-ip", "10.9.9.9"),
    ("proxy", "http://10.9.9.9:3128"),
    ("forwarded", "for=10.9.9.9;host=evil.example;proto=https"),
    ("x-forwarded-for", "10.9.9.9"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-scheme", "https"),
    ("x-forwarded-port", "443"),
    ("x-forwarded-prefix", "/evil"),
    ("x-real-ip", "10.9.9.9"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-http-method-override", "DELETE"),
    ("x-original-host", "evil.example"),
];

fn forwarding_lines() -> String {
    CLIENT_FORWARDING
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect()
}

#[tokio::test]
async fn client_forwarding_headers_never_reach_the_backend() {
    let backend = RawBackend::start().await;
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let lines = forwarding_lines();
    exchange(proxy.addr, &get("/f", "shop.example", &lines)).await;
    let post =
        format!("POST /f-post HTTP/1.1\r\nHost: shop.example\r\n{lines}content-length: 0\r\n\r\n");
    exchange(proxy.addr, post.as_bytes()).await;
    for path in ["/f", "/f-post"] {
        let seen = &backend.seen_for(path)[0];
        for (name, value) in CLIENT_FORWARDING {
            assert!(
                !seen.headers(name).iter().any(|v| v.contains(value)),
                "{name}: {value} reached the backend on {path}"
            );
        }
        assert_eq!(seen.headers("x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(seen.headers("x-forwarded-host"), ["shop.example"]);
        assert_eq!(seen.headers("x-forwarded-proto"), ["http"]);
    }
}

#[tokio::test]
async fn a_trusted_peer_keeps_its_forwarding_headers() {
    let backend = RawBackend::start().await;
    let proxy = TestProxy::start_for(&backend.url(), &["--trust-forwarded", "127.0.0.0/8"]).await;
    exchange(proxy.addr, &get("/t", "shop.example", &forwarding_lines())).await;
    let seen = &backend.seen_for("/t")[0];
    assert_eq!(seen.headers("x-forwarded-for"), ["10.9.9.9, 127.0.0.1"]);
    assert_eq!(seen.headers("x-forwarded-host"), ["evil.example"]);
    assert_eq!(seen.headers("x-forwarded-prefix"), ["/evil"]);
    assert!(seen.header("forwarded").is_some());
}

/// What a request's cookies produced is not served to anyone else unless
/// the backend says it may be; routes can ignore cookies or key on some.
#[tokio::test]
async fn answers_to_requests_with_cookies_stay_theirs() {
    let backend = RawBackend::start().await;
    backend.answer_with(&[]);
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    for path in ["/account", "/account/x.css"] {
        let alice = exchange(
            proxy.addr,
            &get(path, "shop.example", "Cookie: s=alice\r\n"),
        )
        .await;
        assert_eq!(alice.header("x-cache").as_deref(), Some("BYPASS"));
        let anonymous = exchange(proxy.addr, &get(path, "shop.example", "")).await;
        assert_eq!(anonymous.header("x-cache").as_deref(), Some("MISS"));
        assert_ne!(anonymous.text(), alice.text(), "alice's answer was shared");
    }
    let authorized = "Authorization: Bearer alice\r\n";
    exchange(proxy.addr, &get("/me", "shop.example", authorized)).await;
    let anonymous = exchange(proxy.addr, &get("/me", "shop.example", "")).await;
    assert_eq!(anonymous.header("x-cache").as_deref(), Some("MISS"));
    // The backend says the answer may be shared: it is.
    backend.answer_with(&["cache-control: public, max-age=60"]);
    exchange(
        proxy.addr,
        &get("/shared", "shop.example", "Cookie: s=a\r\n"),
    )
    .await;
    let hit = exchange(proxy.addr, &get("/shared", "shop.example", "")).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
}

#[tokio::test]
async fn routes_ignore_cookies_or_key_on_some() {
    let backend = RawBackend::start().await;
    let file = TempFile::new(
        "[[route]]\npath = \"/ignore\"\ncookies = \"ignore\"\n\n\
         [[route]]\npath = \"/tiered\"\ncookies = [\"tier\"]\n",
    );
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    let cookie = |value: &str| format!("Cookie: {value}\r\n");
    let first = exchange(proxy.addr, &get("/ignore", "shop.example", &cookie("s=a"))).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(backend.seen_for("/ignore")[0].header("cookie"), None);
    let other = exchange(proxy.addr, &get("/ignore", "shop.example", &cookie("s=b"))).await;
    assert_eq!(other.header("x-cache").as_deref(), Some("HIT"));

    let gold = cookie("tier=gold; session=alice");
    assert_eq!(
        exchange(proxy.addr, &get("/tiered", "shop.example", &gold))
            .await
            .header("x-cache")
            .as_deref(),
        Some("MISS")
    );
    let seen = &backend.seen_for("/tiered")[0];
    assert_eq!(seen.header("cookie").as_deref(), Some("tier=gold"));
    let gold_bob = cookie("session=bob; tier=gold");
    let hit = exchange(proxy.addr, &get("/tiered", "shop.example", &gold_bob)).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    let silver = cookie("tier=silver");
    let miss = exchange(proxy.addr, &get("/tiered", "shop.example", &silver)).await;
    assert_eq!(miss.header("x-cache").as_deref(), Some("MISS"));
}

/// A query parameter a route leaves out of the key does not reach the
/// backend: the backend is asked for the URL as the key has it.
#[tokio::test]
async fn parameters_left_out_of_the_key_are_not_forwarded() {
    let backend = RawBackend::start().await;
    let file = TempFile::new(
        "[[route]]\npath = \"/search\"\nkeep_query = [\"q\", \"page\"]\n\n\
         [[route]]\npath = \"/feed\"\nignore_query = [\"utm_*\", \"callback\"]\nsort_query = true\n",
    );
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    let poisoned = "/search?q=shoes&%71=%3Cscript%3E&callback=evil";
    let first = exchange(proxy.addr, &get(poisoned, "h", "")).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(backend.seen()[0].path(), "/search?q=shoes");
    let clean = exchange(proxy.addr, &get("/search?q=shoes", "h", "")).await;
    assert_eq!(clean.header("x-cache").as_deref(), Some("HIT"));
    exchange(
        proxy.addr,
        &get("/feed?b=2&utm_x=1&callback=evil&a=1", "h", ""),
    )
    .await;
    assert_eq!(backend.seen()[1].path(), "/feed?a=1&b=2");
}

/// The backend is asked for the target exactly as the key holds it: the
/// upstream client neither re-encodes nor decodes a byte (a URL parser that
/// turns `{` into `%7B`, or `'` in a query into `%27`, makes the backend see
/// another URL than the one its answer is stored under), and adds no header
/// the client did not send.
#[tokio::test]
async fn the_backend_sees_the_target_the_key_holds() {
    let backend = RawBackend::start().await;
    for proxy in both_paths(&backend, &[]).await {
        for target in [
            "/a{b}|c^d",
            "/q?x='y'&z=!$*",
            "/w?x=%zz&y=%7e",
            "/%7Euser/%41",
            "/p;v=1,2?a=[1]",
        ] {
            let answer = exchange(proxy.addr, &get(target, "shop.example", "")).await;
            assert_eq!(answer.status, 200, "{target}");
            let seen = backend.seen();
            let last = seen.last().expect("the miss reached the backend");
            assert_eq!(last.request_line(), format!("GET {target} HTTP/1.1"));
            assert_eq!(
                last.header("accept"),
                None,
                "an Accept the client did not send"
            );
        }
    }
    // With a base path, it goes before the target; Host is the backend's.
    let base = format!("{}/api/", backend.url());
    let authority = backend.url().trim_start_matches("http://").to_string();
    let proxy = TestProxy::start_for(&base, &[]).await;
    let answer = exchange(proxy.addr, &get("/a{b}?q=%zz", "shop.example", "")).await;
    assert_eq!(answer.status, 200);
    let seen = backend.seen();
    let last = seen.last().expect("the miss reached the backend");
    assert_eq!(last.request_line(), "GET /api/a{b}?q=%zz HTTP/1.1");
    assert_eq!(last.headers("host"), [authority]);
    assert_eq!(
        last.header("x-forwarded-host").as_deref(),
        Some("shop.example")
    );
}

/// A dot segment or a backslash in the path is a 400 on both paths: the
/// backend, or a server before it, could resolve it into a path the key,
/// the routes and a bypass rule never saw.
#[tokio::test]
async fn dot_segments_are_refused() {
    let backend = RawBackend::start().await;
    let file = TempFile::new("[[route]]\npath = \"/account\"\nbypass = true\n");
    for proxy in both_paths(&backend, &["--config", file.path()]).await {
        exchange(proxy.addr, &get("/x/y", "h", "")).await;
        let before = backend.seen().len();
        for target in [
            "/x/../account",
            "/%2e%2e/admin",
            "/x/./y",
            "/x\\..\\account",
            "/x/y/..",
        ] {
            let answer = exchange(proxy.addr, &get(target, "h", "")).await;
            assert_eq!(answer.status, 400, "{target}");
        }
        assert_eq!(backend.seen().len(), before, "nothing was forwarded");
    }
}

/// Header values in a key keep their identity: bytes a backend may tell
/// apart never share an entry.
#[tokio::test]
async fn keyed_header_values_keep_their_bytes() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: max-age=60", "vary: x-tenant"]);
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let request = |value: &[u8]| {
        [
            b"GET /t HTTP/1.1\r\nHost: h\r\nx-tenant: ".as_slice(),
            value,
            b"\r\n\r\n",
        ]
        .concat()
    };
    let first = exchange(proxy.addr, &request(b"acme\xe9")).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    for other in [&b"acme\xe8"[..], b"acme  x", b"acme\tx"] {
        let answer = exchange(proxy.addr, &request(other)).await;
        assert_ne!(answer.text(), first.text(), "{other:?}");
    }
    let same = exchange(proxy.addr, &request(b"acme\xe9")).await;
    assert_eq!(same.header("x-cache").as_deref(), Some("HIT"));
}

/// A route's cookie rule applies to the variant lookup as to the fetch: a
/// `Vary: Cookie` answer on a route that keys on a cookie is found again.
#[tokio::test]
async fn vary_cookie_on_a_cookie_route_hits() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: max-age=60", "vary: cookie"]);
    let file = TempFile::new("[[route]]\npath = \"/key\"\ncookies = [\"a\"]\n");
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    exchange(
        proxy.addr,
        &get("/key/v", "h", "Cookie: a=1; _ga=GA1.2\r\n"),
    )
    .await;
    let again = exchange(
        proxy.addr,
        &get("/key/v", "h", "Cookie: _ga=other; a=1\r\n"),
    )
    .await;
    assert_eq!(again.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(backend.seen().len(), 1);
}

/// A fill led by a request with credentials whose answer was private to
/// them does not send every waiting anonymous client to the backend: they
/// go round again and share one fill.
#[tokio::test]
async fn anonymous_followers_of_a_credentialed_fill_share_one_fetch() {
    let origin = support::Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    let gate = support::Gate::closed();
    origin.route(
        "/slow",
        support::Route::default()
            .header("cache-control", "max-age=60")
            .gate(&gate),
    );
    let leader = proxy.send(reqwest::Method::GET, "/slow", &[("cookie", "s=alice")]);
    let followers = futures_util::future::join_all((0..3).map(|_| proxy.get("/slow")));
    let opener = async {
        eventually(
            WAIT,
            "the leader's fetch and three followers wait",
            || async {
                origin.hits("/slow") == 1 && proxy.counter("swr_coalesced_waiters_total").await >= 3
            },
        )
        .await;
        gate.open();
    };
    let (leader, answers, ()) = tokio::join!(leader, followers, opener);
    assert_eq!(leader.x_cache(), "BYPASS");
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(
        origin.hits("/slow"),
        2,
        "the leader's fetch and one shared fill"
    );
    assert_eq!(proxy.get("/slow").await.x_cache(), "HIT");
}

/// Without a token, the admin API answers only requests addressed to an IP
/// or localhost: a DNS-rebound page names the listener by its own domain.
#[tokio::test]
async fn the_admin_api_refuses_rebound_host_names() {
    let backend = RawBackend::start().await;
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let body = r#"{"all": true}"#;
    let purge = |host: &str| {
        format!(
            "POST /purge HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let rebound = exchange(
        proxy.admin_addr,
        purge("rebind.attacker.example:6180").as_bytes(),
    )
    .await;
    assert_eq!(rebound.status, 403);
    let stats = exchange(
        proxy.admin_addr,
        b"GET /stats HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(stats.status, 403);
    let local = exchange(
        proxy.admin_addr,
        purge(&proxy.admin_addr.to_string()).as_bytes(),
    )
    .await;
    assert_eq!(local.status, 200);
}

/// Request heads over the limits: 414 / 431 on both paths, never forwarded.
#[tokio::test]
async fn heads_over_the_limits_are_refused() {
    let backend = RawBackend::start().await;
    for proxy in both_paths(&backend, &[]).await {
        let long_target = format!("/l?{}", "q".repeat(9 * 1024));
        let long_line = format!("x-big: {}\r\n", "b".repeat(9 * 1024));
        let many_lines: String = (0..6)
            .map(|i| format!("x-part-{i}: {}\r\n", "p".repeat(7 * 1024)))
            .collect();
        // Within the limits: answered; `/l` warm, so a fast hit is possible.
        let near = format!("/l?{}", "q".repeat(7 * 1024));
        assert_eq!(exchange(proxy.addr, &get(&near, "h", "")).await.status, 200);
        assert_eq!(exchange(proxy.addr, &get("/l", "h", "")).await.status, 200);
        let before = backend.seen().len();
        assert_eq!(
            exchange(proxy.addr, &get(&long_target, "h", ""))
                .await
                .status,
            414
        );
        assert_eq!(
            exchange(proxy.addr, &get("/l", "h", &long_line))
                .await
                .status,
            431
        );
        assert_eq!(
            exchange(proxy.addr, &get("/l", "h", &many_lines))
                .await
                .status,
            431
        );
        assert_eq!(backend.seen().len(), before, "nothing was forwarded");
    }
    // The limits are settings.
    let proxy = TestProxy::start_for(&backend.url(), &["--max-request-line", "1KiB"]).await;
    let target = format!("/l?{}", "q".repeat(2048));
    assert_eq!(
        exchange(proxy.addr, &get(&target, "h", "")).await.status,
        414
    );
}

/// 502 and 504 bodies name the failure class, not the backend's address.
#[tokio::test]
async fn error_bodies_do_not_name_the_backend() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let upstream = format!("http://127.0.0.1:{port}");
    let proxy = TestProxy::start_for(&upstream, &[]).await;
    let answer = exchange(proxy.addr, &get("/down", "shop.example", "")).await;
    assert_eq!(answer.status, 502);
    let text = answer.text();
    assert!(text.contains("(connect)"), "{text}");
    assert!(!text.contains(&port.to_string()), "{text}");
    assert!(!text.contains("127.0.0.1"), "{text}");
}

/// An `Age` or `max-age` near `u64::MAX` neither panics nor makes an entry
/// fresh for longer than a year.
#[tokio::test]
async fn huge_ages_and_lifetimes_are_capped() {
    let backend = RawBackend::start().await;
    let max = u64::MAX.to_string();
    backend.answer_with(&[&format!(
        "cache-control: max-age={max}, stale-while-revalidate={max}"
    )]);
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    assert_eq!(
        exchange(proxy.addr, &get("/forever", "h", "")).await.status,
        200
    );
    let hit = exchange(proxy.addr, &get("/forever", "h", "")).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    let status = hit.header("cache-status").unwrap_or_default();
    let ttl: u64 = status
        .rsplit("ttl=")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(ttl <= 365 * 24 * 3600, "{status}");
    backend.answer_with(&["cache-control: max-age=60", &format!("age: {max}")]);
    assert_eq!(
        exchange(proxy.addr, &get("/old", "h", "")).await.status,
        200
    );
    let old = exchange(proxy.addr, &get("/old", "h", "")).await;
    assert_eq!(old.status, 200);
    assert_eq!(
        old.header("x-cache").as_deref(),
        Some("STALE"),
        "never fresh"
    );
    let age: u64 = old.header("age").and_then(|a| a.parse().ok()).unwrap_or(0);
    assert!((1 << 31..(1 << 31) + 60).contains(&age), "age {age}");
}

/// A 304 adds the fields it names to the stored answer (RFC 9111 §3.2). A
/// backend whose 304s name new fields every time grew one entry without a
/// bound (4.4 MB of head after 12 renewals), and past 24,576 values every
/// answer made from it panicked (found by the attack review of 35f624f).
/// An answer whose headers pass what an entry holds is passed on once, not
/// stored: every request is answered and no answer carries more than the
/// stored head and one 304's.
#[tokio::test]
async fn renewals_that_add_fields_keep_an_entry_bounded() {
    use support::{Origin, Route};
    let origin = Origin::start().await;
    // 90 new fields of 4 KB a round: about 370 KB, what one head may carry.
    let round = |n: usize| {
        (0..90).fold(
            Route::default()
                .etag("\"v\"")
                .header("cache-control", "max-age=0, stale-while-revalidate=0")
                .body("b"),
            |route, i| route.header(&format!("x-r{n}-{i}"), &"v".repeat(4000)),
        )
    };
    let proxy = TestProxy::start(&origin, &[]).await;
    let largest = largest_head_over_rounds(&origin, &proxy, 8, round).await;
    // Unbounded, the eighth answer carried 8 x 370 KB.
    assert!(largest < 1 << 20, "an answer's head of {largest} bytes");
    let stored = proxy.counter("swr_cache_bytes").await;
    assert!(stored < 1 << 20, "{stored} bytes stored");
}

/// Asks for `/grow` once a round, the origin answering `round(n)` (a 304
/// to the stored answer from the second round on), and returns the
/// largest answer head a client got.
async fn largest_head_over_rounds(
    origin: &support::Origin,
    proxy: &TestProxy,
    rounds: usize,
    round: impl Fn(usize) -> support::Route,
) -> usize {
    let mut largest = 0;
    for n in 0..rounds {
        origin.route("/grow", round(n));
        let answer = exchange(proxy.addr, &get("/grow", "h", "")).await;
        assert_eq!(
            (answer.status, answer.text().as_str()),
            (200, "b"),
            "round {n}"
        );
        largest = largest.max(answer.head.len());
    }
    assert!(
        origin.hits("/grow") >= rounds as u64,
        "each round asked the backend"
    );
    largest
}

/// The bound holds for what is stored, not only for what a 304 carries:
/// a 304 whose `Connection` names the fields earlier rounds added keeps
/// them stored (they are hop-by-hop fields of that 304, RFC 9110 §7.6.1)
/// while it adds a new one.
#[tokio::test]
async fn renewals_whose_connection_names_stored_fields_keep_an_entry_bounded() {
    use support::{Origin, Route};
    let origin = Origin::start().await;
    let round = |n: usize| {
        let earlier: Vec<String> = (0..n).map(|k| format!("x-r{k}")).collect();
        let mut route = Route::default()
            .etag("\"v\"")
            .header("cache-control", "max-age=0, stale-while-revalidate=0")
            .body("b");
        if n > 0 {
            route = route.header("connection", &earlier.join(", "));
        }
        for name in &earlier {
            route = route.header(name, "a");
        }
        route.header(&format!("x-r{n}"), &"v".repeat(300_000))
    };
    let proxy = TestProxy::start(&origin, &[]).await;
    let largest = largest_head_over_rounds(&origin, &proxy, 5, round).await;
    // Checked on the 304 as sent, the fifth answer carried 5 x 300 KB.
    assert!(largest < 1 << 20, "an answer's head of {largest} bytes");
}

/// A 304's `private="x-user"` leaves that field out of the shared entry
/// even when the `Cache-Control` carrying it is named in the 304's
/// `Connection`, as it does for a 200.
#[tokio::test]
async fn a_304_private_field_stays_out_of_the_shared_entry() {
    use support::{eventually, Origin, Route, WAIT};
    let origin = Origin::start().await;
    let per_user = |route: Route| {
        route
            .header("cache-control", "max-age=60, private=\"x-user\"")
            .header("connection", "cache-control")
            .header("x-user", "alice")
    };
    // A 200: the field is not stored.
    origin.route("/user-200", per_user(Route::default()));
    let proxy = TestProxy::start(&origin, &[]).await;
    let first = exchange(proxy.addr, &get("/user-200", "h", "")).await;
    assert_eq!(first.status, 200);
    let hit = exchange(proxy.addr, &get("/user-200", "h", "")).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(hit.header("x-user"), None);
    // A 304 renewing a stored answer: neither is it.
    origin.route(
        "/user-304",
        Route::default()
            .etag("\"v\"")
            .header("cache-control", "max-age=0"),
    );
    exchange(proxy.addr, &get("/user-304", "h", "")).await;
    origin.route("/user-304", per_user(Route::default().etag("\"v\"")));
    eventually(WAIT, "the 304 renews the entry", || async {
        exchange(proxy.addr, &get("/user-304", "h", "")).await;
        proxy.counter("swr_revalidated_total").await == 1
    })
    .await;
    let renewed = exchange(proxy.addr, &get("/user-304", "h", "")).await;
    assert_eq!(renewed.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(renewed.header("x-user"), None);
}

/// A field a targeted `private="..."` left out of the shared entry cannot
/// come back with a 304 that does not repeat the directive: the
/// `CDN-Cache-Control` carrying it is not stored, so a renewal would see
/// nothing against storing the 304's field. Neither an ordinary field nor
/// a validator the stored answer lacks.
#[tokio::test]
async fn a_304_cannot_bring_back_a_field_a_targeted_private_left_out() {
    use support::{eventually, Origin, Route, WAIT};
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    let fields = [
        ("/user", "x-user", "alice", "bob"),
        (
            "/modified",
            "last-modified",
            "Mon, 01 Jan 2024 00:00:00 GMT",
            "Tue, 02 Jan 2024 00:00:00 GMT",
        ),
    ];
    for (round, (path, field, stored, renewed)) in fields.into_iter().enumerate() {
        let private = format!("max-age=1, private=\"{field}\"");
        origin.route(
            path,
            Route::default()
                .etag("\"v\"")
                .header("cache-control", "max-age=1")
                .header("cdn-cache-control", &private)
                .header(field, stored)
                .body("b"),
        );
        assert_eq!(exchange(proxy.addr, &get(path, "h", "")).await.status, 200);
        let hit = exchange(proxy.addr, &get(path, "h", "")).await;
        assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"), "{field}");
        assert_eq!(hit.header(field), None);
        // The renewal's 304 names the field, without the directive.
        origin.route(path, Route::default().etag("\"v\"").header(field, renewed));
        eventually(WAIT, "a 304 renews the entry", || async {
            exchange(proxy.addr, &get(path, "h", "")).await;
            proxy.counter("swr_revalidated_total").await == round as u64 + 1
        })
        .await;
        let other = exchange(proxy.addr, &get(path, "h", "")).await;
        assert_eq!(other.text(), "b");
        assert_eq!(
            other.header(field),
            None,
            "the 304's {field} on a shared answer"
        );
    }
}

/// A 304 with another `ETag` than the stored answer's, or two, validates
/// another body (RFC 9111 §4.3.4): the stored one is not relabelled with
/// it, and the next request fetches the answer whole.
#[tokio::test]
async fn a_304_with_another_etag_does_not_renew() {
    use support::{eventually, Origin, Route, WAIT};
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/e",
        Route::default()
            .etag("\"v\"")
            .header("cache-control", "max-age=1"),
    );
    assert_eq!(
        exchange(proxy.addr, &get("/e", "h", "")).await.text(),
        "/e #1"
    );
    // Matches If-None-Match "v", but also names "w".
    origin.route(
        "/e",
        Route::default()
            .etag("\"v\"")
            .header("etag", "\"w\"")
            .header("cache-control", "max-age=60"),
    );
    eventually(WAIT, "the 304 is fetched", || async {
        exchange(proxy.addr, &get("/e", "h", "")).await;
        origin.hits("/e") >= 2
    })
    .await;
    // The entry ended: the next fetch is whole, not conditional.
    eventually(WAIT, "the next fetch", || async {
        exchange(proxy.addr, &get("/e", "h", "")).await;
        origin.hits("/e") >= 3
    })
    .await;
    assert!(!origin.seen("/e")[2].headers.contains_key("if-none-match"));
    assert_eq!(proxy.counter("swr_revalidated_total").await, 0);
}

/// A 304 that names a `Vary` the stored answer did not have ends the
/// entry: renewed under the URL's key, the answer made for one variant
/// would be served to every other.
#[tokio::test]
async fn a_304_that_adds_vary_does_not_renew_for_every_variant() {
    use support::{eventually, Origin, Route, WAIT};
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &[]).await;
    origin.route(
        "/plan",
        Route::default()
            .etag("\"v\"")
            .header("cache-control", "max-age=1")
            .echo("x-tenant"),
    );
    let tenant = |t: &str| format!("x-tenant: {t}\r\n");
    let first = exchange(proxy.addr, &get("/plan", "h", &tenant("a"))).await;
    assert_eq!(first.text(), "/plan #1 a");
    origin.route(
        "/plan",
        Route::default()
            .etag("\"v\"")
            .header("cache-control", "max-age=60")
            .header("vary", "x-tenant")
            .echo("x-tenant"),
    );
    eventually(WAIT, "the 304 naming Vary is fetched", || async {
        exchange(proxy.addr, &get("/plan", "h", &tenant("a"))).await;
        origin.hits("/plan") >= 2
    })
    .await;
    assert_eq!(
        origin.seen("/plan")[1].headers["if-none-match"],
        "\"v\"",
        "the second fetch was the revalidation"
    );
    // Tenant b gets the answer made for b, never the one stored for a.
    eventually(WAIT, "tenant b's own answer", || async {
        let b = exchange(proxy.addr, &get("/plan", "h", &tenant("b"))).await;
        assert!(
            !b.text().ends_with(" a"),
            "tenant a's answer for b: {}",
            b.text()
        );
        b.text().ends_with(" b")
    })
    .await;
}

/// State-changing admin requests need JSON (a web page cannot send it
/// without a preflight); the token can come from a file.
#[tokio::test]
async fn admin_posts_need_json_and_the_token_can_be_a_file() {
    let backend = RawBackend::start().await;
    let token = TempFile::new("s3cret\n");
    let proxy = TestProxy::start_for(&backend.url(), &["--admin-token-file", token.path()]).await;
    exchange(proxy.addr, &get("/kept", "shop.example", "")).await;
    let admin = |request: String| {
        let addr = proxy.admin_addr;
        async move { exchange(addr, request.as_bytes()).await }
    };
    let unauthorized = admin("GET /stats HTTP/1.1\r\nHost: a\r\n\r\n".into()).await;
    assert_eq!(unauthorized.status, 401);
    let wrong =
        admin("GET /stats HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cres\r\n\r\n".into());
    assert_eq!(wrong.await.status, 401);
    let auth = "Authorization: Bearer s3cret\r\n";
    assert_eq!(
        admin(format!("GET /stats HTTP/1.1\r\nHost: a\r\n{auth}\r\n"))
            .await
            .status,
        200
    );
    let body = r#"{"all": true}"#;
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let form = format!(
            "POST /purge HTTP/1.1\r\nHost: a\r\n{auth}content-type: {content_type}\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(admin(form).await.status, 415);
    }
    let reload = format!("POST /reload HTTP/1.1\r\nHost: a\r\n{auth}content-length: 0\r\n\r\n");
    assert_eq!(admin(reload).await.status, 415);
    let hit = exchange(proxy.addr, &get("/kept", "shop.example", "")).await;
    assert_eq!(
        hit.header("x-cache").as_deref(),
        Some("HIT"),
        "nothing was purged"
    );
    let json = format!(
        "POST /purge HTTP/1.1\r\nHost: a\r\n{auth}content-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(admin(json).await.status, 200);
    let miss = exchange(proxy.addr, &get("/kept", "shop.example", "")).await;
    assert_eq!(miss.header("x-cache").as_deref(), Some("MISS"));
}

/// The same random request head, sent to the fast path and to hyper's,
/// gets the same status, and the backend receives the same bytes.
mod differential {
    use super::*;
    use proptest::prelude::*;

    fn host() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(Some("shop.example".to_string())),
            Just(Some("SHOP.example".to_string())),
            Just(Some("shop.example:8080".to_string())),
            Just(Some("shop.example/static".to_string())),
            Just(Some("user@shop.example".to_string())),
            Just(Some("shop example".to_string())),
            Just(Some("[::1]".to_string())),
            Just(Some(String::new())),
            Just(None),
        ]
    }

    fn extra() -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(
            prop_oneof![
                Just("Host: other.example\r\n"),
                Just("Connection: keep-alive\r\n"),
                Just("Connection: host\r\n"),
                Just("Connection: close\r\n"),
                Just("X-Forwarded-Host: evil.example\r\n"),
                Just("Forwarded: host=evil.example\r\n"),
                Just("Cookie: s=1\r\n"),
                Just("Authorization: Bearer x\r\n"),
                Just("Cache-Control: no-cache\r\n"),
                Just("Range: bytes=0-1\r\n"),
                Just("If-None-Match: \"x\"\r\n"),
                Just("Content-Length: 0\r\n"),
                Just("Expect: 100-continue\r\n"),
                Just("Accept: text/plain\r\n"),
                Just("Cookie: a=1\r\nCookie: b=2\r\n"),
                Just("Connection: keep-alive, close\r\n"),
                Just("Transfer-Encoding: identity\r\n"),
                Just("Pragma: no-cache\r\n"),
                Just("X-Tenant: a,\r\n"),
                Just("Host: shop.example.\r\n"),
                Just("If-Match: *\r\n"),
                Just("Upgrade: h2c\r\n"),
                Just("TE: trailers\r\n"),
                Just("Keep-Alive: timeout=5\r\n"),
                Just("X-Empty:\r\n"),
                Just("X-Obs: caf\u{e9}\r\n"),
            ],
            0..4,
        )
    }

    fn target() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/warm".to_string()),
            Just("/warm?x=1".to_string()),
            // With the Host `shop.example/static`, the key text of the warm
            // `/static/app.js`.
            Just("/app.js".to_string()),
            "/[a-z]{1,8}",
            Just(format!("/warm?{}", "q".repeat(9000))),
            Just("/warm#frag".to_string()),
            Just("/warm?".to_string()),
            Just("//warm".to_string()),
            Just("/warm/".to_string()),
            Just("/%77arm".to_string()),
            Just("/warm?x=%zz".to_string()),
            Just("/w\u{e9}".to_string()),
            Just("*".to_string()),
            Just("http://shop.example/warm".to_string()),
        ]
    }

    /// The backend's view of a request, without what differs between the
    /// two proxies' backends (the backend's own address in `Host`).
    fn seen_bytes(backend: &RawBackend) -> Vec<String> {
        backend
            .seen()
            .into_iter()
            .map(|r| {
                let head: Vec<&str> = r
                    .head
                    .lines()
                    .filter(|l| !l.to_ascii_lowercase().starts_with("host:"))
                    .collect();
                format!("{}\n{}", head.join("\n"), String::from_utf8_lossy(&r.body))
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn the_fast_path_answers_as_hyper_does(
            target in target(),
            host in host(),
            extra in extra(),
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let fast_backend = RawBackend::start().await;
                let slow_backend = RawBackend::start().await;
                // Stale at once: a hit queues a refresh, whose bytes count too.
                for backend in [&fast_backend, &slow_backend] {
                    backend.answer_with(&["cache-control: max-age=0, stale-while-revalidate=60"]);
                }
                let fast = TestProxy::start_for(&fast_backend.url(), &[]).await;
                let slow = TestProxy::start_for(&slow_backend.url(), &["--no-fast-hits"]).await;
                let mut head = format!("GET {target} HTTP/1.1\r\n");
                if let Some(host) = &host {
                    head.push_str(&format!("Host: {host}\r\n"));
                }
                for line in &extra {
                    head.push_str(line);
                }
                head.push_str("\r\n");
                let mut statuses = Vec::new();
                for (proxy, backend) in [(&fast, &fast_backend), (&slow, &slow_backend)] {
                    for path in ["/warm", "/static/app.js"] {
                        let warm = exchange(proxy.addr, &get(path, "shop.example", "")).await;
                        assert_eq!(warm.status, 200);
                    }
                    statuses.push(exchange(proxy.addr, head.as_bytes()).await.status);
                    assert!(!backend.seen().is_empty());
                }
                assert_eq!(statuses[0], statuses[1], "{head:?}");
                eventually(WAIT, "both backends saw the same bytes", || async {
                    seen_bytes(&fast_backend) == seen_bytes(&slow_backend)
                })
                .await;
            });
        }
    }
}

// ---------------------------------------------------------------------
// Review of d1e073b (attack worktree): findings, each a failing test.
// ---------------------------------------------------------------------

/// One request from a client bound to `local` (any 127.0.0.0/8 address).
async fn exchange_from(
    local: &str,
    addr: std::net::SocketAddr,
    request: &[u8],
) -> support::raw::RawAnswer {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{local}:0").parse().unwrap())
        .expect("bind local address");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    support::raw::read_answer(&mut stream, false).await
}

/// The backend is sent `X-Forwarded-For` as swr-proxy sets it (the peer's
/// address), and says its answer varies on it. A key could only hold what
/// the client sent (dropped), not what the backend saw: keyed that way,
/// the answer made for one client's address was served to every client
/// that sends no X-Forwarded-For (found by the attack review). Such an
/// answer is not stored (`vary-client`).
#[tokio::test]
async fn a_vary_on_the_client_address_is_never_shared() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: public, max-age=60", "vary: x-forwarded-for"]);
    for proxy in both_paths(&backend, &[]).await {
        let path = format!("/geo{}", proxy.addr.port());
        let first = exchange_from("127.0.0.2", proxy.addr, &get(&path, "h", "")).await;
        assert_eq!(first.header("x-cache").as_deref(), Some("BYPASS"));
        let status = first.header("cache-status").unwrap_or_default();
        assert!(status.contains("detail=vary-client"), "{status}");
        assert_eq!(
            backend.seen_for(&path)[0].headers("x-forwarded-for"),
            ["127.0.0.2"]
        );
        // Another client, another address: the backend said the answer
        // depends on it, so this one must not get 127.0.0.2's answer.
        let other = exchange_from("127.0.0.1", proxy.addr, &get(&path, "h", "")).await;
        assert_ne!(
            other.header("x-cache").as_deref(),
            Some("HIT"),
            "127.0.0.1 was served the answer made for X-Forwarded-For: 127.0.0.2 ({})",
            other.text()
        );
    }
}

/// A route that keys on `Authorization` (key_headers): a stale entry's
/// background refresh drops Authorization (it is not in the entry's Vary)
/// and stores the backend's answer to an anonymous request under the key
/// of alice's token, where alice is then served it.
#[tokio::test]
async fn a_refresh_keeps_the_credentials_a_route_keys_on() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: public, max-age=0, stale-while-revalidate=60"]);
    let file = TempFile::new("[[route]]\npath = \"/me\"\nkey_headers = [\"authorization\"]\n");
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    let alice = "authorization: Bearer alice\r\n";
    let first = exchange(proxy.addr, &get("/me", "h", alice)).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(
        backend.seen_for("/me")[0]
            .header("authorization")
            .as_deref(),
        Some("Bearer alice")
    );
    let stale = exchange(proxy.addr, &get("/me", "h", alice)).await;
    assert_eq!(stale.header("x-cache").as_deref(), Some("STALE"));
    eventually(WAIT, "the refresh reaches the backend", || async {
        backend.seen_for("/me").len() == 2
    })
    .await;
    // Wait until the refresh is stored (the next answer is its body).
    eventually(WAIT, "the refresh is stored", || async {
        exchange(proxy.addr, &get("/me", "h", alice)).await.text() == "/me #2"
    })
    .await;
    // What is now stored under alice's key was fetched as...
    assert_eq!(
        backend.seen_for("/me")[1]
            .header("authorization")
            .as_deref(),
        Some("Bearer alice"),
        "alice's entry was replaced by the answer to a request without her Authorization"
    );
}

/// POST/PUT/DELETE invalidate what is stored for their URI (RFC 9111
/// §4.4). On a route that shapes its key (key_headers, sort_query) the
/// stored key is not the raw target, and nothing is invalidated.
#[tokio::test]
async fn unsafe_methods_invalidate_the_key_their_route_makes() {
    let backend = RawBackend::start().await;
    let file = TempFile::new(
        "[[route]]\npath = \"/t\"\nkey_headers = [\"x-tenant\"]\n\n\
         [[route]]\npath = \"/s\"\nsort_query = true\n\n",
    );
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    // Control: an unshaped URL is invalidated.
    exchange(proxy.addr, &get("/plain", "h", "")).await;
    let post = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n").into_bytes()
    };
    assert_eq!(exchange(proxy.addr, &post("/plain")).await.status, 200);
    let again = exchange(proxy.addr, &get("/plain", "h", "")).await;
    assert_eq!(again.header("x-cache").as_deref(), Some("MISS"), "control");

    let tenant = "x-tenant: a\r\n";
    assert_eq!(
        exchange(proxy.addr, &get("/t", "h", tenant))
            .await
            .header("x-cache")
            .as_deref(),
        Some("MISS")
    );
    // Another tenant's write leaves tenant a's entry (its key holds
    // `x-tenant=a`); tenant a's own write removes it.
    let post_as = |path: &str, extra: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: h\r\n{extra}content-length: 0\r\n\r\n").into_bytes()
    };
    assert_eq!(
        exchange(proxy.addr, &post_as("/t", "x-tenant: b\r\n"))
            .await
            .status,
        200
    );
    let kept = exchange(proxy.addr, &get("/t", "h", tenant)).await;
    assert_eq!(kept.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(
        exchange(proxy.addr, &post_as("/t", tenant)).await.status,
        200
    );
    let after = exchange(proxy.addr, &get("/t", "h", tenant)).await;
    assert_eq!(
        after.header("x-cache").as_deref(),
        Some("MISS"),
        "POST /t did not invalidate the key_headers entry ({})",
        after.text()
    );

    exchange(proxy.addr, &get("/s?b=2&a=1", "h", "")).await;
    assert_eq!(exchange(proxy.addr, &post("/s?b=2&a=1")).await.status, 200);
    let after = exchange(proxy.addr, &get("/s?b=2&a=1", "h", "")).await;
    assert_eq!(
        after.header("x-cache").as_deref(),
        Some("MISS"),
        "POST /s?b=2&a=1 did not invalidate the sorted key"
    );
}

/// A response that varies on Cookie in a second `Vary` line: the refresh
/// of alice's variant must keep her cookie (the entry varies on it), as it
/// does for `Vary: accept-encoding, cookie` in one line.
#[tokio::test]
async fn a_refresh_keeps_a_field_named_in_any_vary_line() {
    let backend = RawBackend::start().await;
    backend.answer_with(&[
        "cache-control: public, max-age=0, stale-while-revalidate=60",
        "vary: accept-encoding",
        "vary: cookie",
    ]);
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let alice = "cookie: s=alice\r\n";
    let first = exchange(proxy.addr, &get("/v", "h", alice)).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    let stale = exchange(proxy.addr, &get("/v", "h", alice)).await;
    assert_eq!(stale.header("x-cache").as_deref(), Some("STALE"));
    eventually(WAIT, "the refresh reaches the backend", || async {
        backend.seen_for("/v").len() == 2
    })
    .await;
    assert_eq!(
        backend.seen_for("/v")[1].header("cookie").as_deref(),
        Some("s=alice"),
        "the refresh of alice's variant went without her cookie: it refreshes another variant"
    );
}

// ---------------------------------------------------------------------
// Review of 088055c..8a8ffdf and 1051d62 (attack worktree): findings,
// each a failing test before its fix.
// ---------------------------------------------------------------------

/// Which backend request made an answer (the raw backend's body is
/// `<path> #<n>`, n counting its requests): the values of `name` it carried.
fn made_with(backend: &RawBackend, answer: &support::raw::RawAnswer, name: &str) -> Vec<String> {
    let text = answer.text();
    let n: usize = text
        .rsplit('#')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a backend body: {text:?}"));
    backend.seen()[n - 1].headers(name)
}

/// The values of a keyed field (a `Vary` name, a route's `key_headers`)
/// were merged when a backend can tell them apart: a trailing comma, an
/// empty second field line. The backend is sent the client's bytes as they
/// are, so the answer to `x-tenant: acme,` was stored under the key of
/// `x-tenant: acme` and served to every acme client.
#[tokio::test]
async fn keyed_values_a_backend_tells_apart_never_share_a_key() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: max-age=60", "vary: x-tenant"]);
    let file = TempFile::new("[[route]]\npath = \"/keyed\"\nkey_headers = [\"x-tenant\"]\n");
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    let attacks = [
        "x-tenant: acme,\r\n",
        "x-tenant: ,acme\r\n",
        "x-tenant: acme\r\nx-tenant:\r\n",
    ];
    for (i, attack) in attacks.iter().enumerate() {
        for base in ["/vary", "/keyed"] {
            let path = format!("{base}/{i}");
            let first = exchange(proxy.addr, &get(&path, "h", attack)).await;
            assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
            let victim = exchange(proxy.addr, &get(&path, "h", "x-tenant: acme\r\n")).await;
            assert_eq!(victim.status, 200);
            assert_eq!(
                made_with(&backend, &victim, "x-tenant"),
                ["acme"],
                "{path}: `x-tenant: acme` was served the answer made for {attack:?} ({})",
                victim.header("x-cache").unwrap_or_default()
            );
        }
    }
}

/// A `Vary` line that is not plain ASCII cannot be matched; it was
/// skipped, and the answer stored as if it did not vary on what it names:
/// alice's answer, which the backend said varies on her cookie (and was
/// shareable as such), was served to bob.
#[tokio::test]
async fn a_vary_the_cache_cannot_read_is_never_shared() {
    let backend = RawBackend::start().await;
    let proxy = TestProxy::start_for(&backend.url(), &[]).await;
    let cases: [&[&str]; 2] = [
        &["vary: cookie, x-caf\u{e9}"],
        &["vary: accept-encoding", "vary: x-caf\u{e9}, cookie"],
    ];
    for (i, vary) in cases.iter().enumerate() {
        let mut lines = vec!["cache-control: public, max-age=60"];
        lines.extend_from_slice(vary);
        backend.answer_with(&lines);
        let path = format!("/unreadable-vary/{i}");
        let alice = exchange(proxy.addr, &get(&path, "h", "cookie: s=alice\r\n")).await;
        assert_eq!(alice.status, 200);
        let bob = exchange(proxy.addr, &get(&path, "h", "cookie: s=bob\r\n")).await;
        assert_eq!(bob.status, 200);
        assert_eq!(
            made_with(&backend, &bob, "cookie"),
            ["s=bob"],
            "{vary:?}: bob was served alice's answer ({})",
            bob.header("x-cache").unwrap_or_default()
        );
    }
}

/// `targeted_cache_control` is read at start: a reload that changes it says
/// so ("at next start"), yet the reloaded rules read the new field while
/// answers still hide the old one. The field the backend writes for this
/// proxy (`swr-cache-control: no-store`) stopped counting, and its
/// `Cache-Control: public` answer was stored and shared.
#[tokio::test]
async fn a_reload_keeps_the_targeted_field_it_started_with() {
    let backend = RawBackend::start().await;
    backend.answer_with(&[
        "cache-control: public, max-age=60",
        "swr-cache-control: no-store",
    ]);
    let file = TempFile::new("ttl = \"10s\"\n");
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    let before = exchange(proxy.addr, &get("/targeted/before", "h", "")).await;
    assert_eq!(before.header("x-cache").as_deref(), Some("BYPASS"));
    file.write("ttl = \"10s\"\ntargeted_cache_control = \"x-edge-control\"\n");
    let reloaded = proxy.proxy.reload().expect("the file reloads");
    assert_eq!(reloaded.at_next_start, ["targeted_cache_control"]);
    for _ in 0..2 {
        let after = exchange(proxy.addr, &get("/targeted/after", "h", "")).await;
        assert_eq!(
            after.header("x-cache").as_deref(),
            Some("BYPASS"),
            "after the reload, swr-cache-control: no-store no longer counted"
        );
    }
}

/// A route's `key_headers` naming `X-Forwarded-For`: swr-proxy writes that
/// field itself, from each client's address, so the key holds what the
/// client sent (usually nothing) while the backend answers for the
/// client's address, and that answer was shared by every client sending
/// none (the `vary-client` hole of 1051d62, through a route). Such a route
/// is refused when the configuration loads.
#[tokio::test]
async fn a_route_cannot_key_on_a_field_written_per_client() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: public, max-age=60"]);
    let file = TempFile::new("[[route]]\npath = \"/geo\"\nkey_headers = [\"x-forwarded-for\"]\n");
    let flags = ["--config", file.path()];
    let url = backend.url();
    let args = [&["swr-proxy", "--upstream", url.as_str()][..], &flags[..]].concat();
    let cli = <swr_proxy::config::Cli as clap::Parser>::try_parse_from(args).expect("flags");
    let loaded = swr_proxy::config::Config::from_args(
        &cli.proxy,
        None,
        swr_proxy::config::Config::DEFAULT_TTL,
    );
    if let Err(err) = loaded {
        assert!(err.0.contains("route[0].key_headers"), "{err}");
        return;
    }
    let proxy = TestProxy::start_for(&backend.url(), &flags).await;
    let first = exchange_from("127.0.0.2", proxy.addr, &get("/geo", "h", "")).await;
    assert_eq!(first.status, 200);
    let other = exchange_from("127.0.0.1", proxy.addr, &get("/geo", "h", "")).await;
    assert_eq!(
        made_with(&backend, &other, "x-forwarded-for"),
        ["127.0.0.1"],
        "127.0.0.1 was served the answer made for 127.0.0.2 ({})",
        other.header("x-cache").unwrap_or_default()
    );
}

/// Flags over the environment over the file: an empty `--admin-token`
/// (what `SWR_ADMIN_TOKEN=` in a service's environment gives, the same
/// layer) counted as "no token" and hid the file's `admin_token`, so the
/// admin API (purge, reload) answered without one.
#[tokio::test]
async fn an_empty_admin_token_does_not_hide_the_files() {
    let backend = RawBackend::start().await;
    let file = TempFile::new("admin_token = \"s3cret\"\n");
    let proxy =
        TestProxy::start_for(&backend.url(), &["--config", file.path(), "--admin-token="]).await;
    let stats = exchange(
        proxy.admin_addr,
        b"GET /stats HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(
        stats.status, 401,
        "the admin API answered without the file's token"
    );
    let authorized = exchange(
        proxy.admin_addr,
        b"GET /stats HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret\r\n\r\n",
    )
    .await;
    assert_eq!(authorized.status, 200);
}

/// Route patterns come from the configuration file and become label
/// values of `swr_route_requests_total`: a quote, a backslash or a newline
/// in one is escaped, and no series can be written through it. (Held.)
#[tokio::test]
async fn route_patterns_cannot_write_metric_lines() {
    let backend = RawBackend::start().await;
    let file = TempFile::new("[[route]]\npath = \"/m\\\"} 1\\nswr_injected_total 7\\n#\\\\\"\n");
    let proxy = TestProxy::start_for(&backend.url(), &["--config", file.path()]).await;
    let path = "/m%22%7D%201";
    exchange(proxy.addr, &get(path, "h", "")).await;
    let text = proxy
        .client
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        !text.lines().any(|l| l.starts_with("swr_injected")),
        "a route pattern wrote a series:\n{text}"
    );
    let escaped = "route=\"/m\\\"} 1\\nswr_injected_total 7\\n#\\\\\"";
    assert!(text.contains(escaped), "{text}");
}

/// A `bypass` route (or any route) is chosen by the request path as
/// written, while a backend routes on the decoded path: `%61` is `a`
/// (RFC 3986 §6.2.2.2: percent-encoded unreserved characters are the
/// characters). `/%61ccount` missed the `/account` bypass route, and the
/// account page, fetched with the client's credentials and marked
/// shareable by a backend that marks everything so (the reason for the
/// bypass route), was stored for everyone who asks for `/%61ccount`.
#[tokio::test]
async fn routes_match_percent_encoded_unreserved_characters() {
    let backend = RawBackend::start().await;
    backend.answer_with(&["cache-control: max-age=60, must-revalidate"]);
    let file = TempFile::new("[[route]]\npath = \"/account\"\nbypass = true\n");
    for proxy in both_paths(&backend, &["--config", file.path()]).await {
        for path in ["/%61ccount", "/%61%63count/me", "/acc%6Funt"] {
            let victim = exchange(
                proxy.addr,
                &get(path, "h", "authorization: Bearer alice\r\n"),
            )
            .await;
            assert_eq!(victim.status, 200);
            let status = victim.header("cache-status").unwrap_or_default();
            assert!(
                status.contains("detail=route"),
                "{path} missed the bypass route: {status}"
            );
            let attacker = exchange(proxy.addr, &get(path, "h", "")).await;
            assert_ne!(
                attacker.header("x-cache").as_deref(),
                Some("HIT"),
                "{path}: alice's account page was served to another client"
            );
        }
    }
}
