//! Plain HTTP/1.1 `GET`s answered without hyper's connection
//! (`src/fast_hits.rs`): hits from the entry, misses and passes with hyper's
//! path's own answer, each the answer hyper's path gives; every other
//! request handed to hyper with the bytes already read.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{eventually, take_answer, Gate, Origin, Route, TestProxy, Wire};

const WAIT: Duration = Duration::from_secs(10);

/// Reads `count` answers from `stream`, failing the test if they do not
/// come within [`WAIT`] or more come.
async fn read_answers(stream: &mut TcpStream, count: usize) -> Vec<Wire> {
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while answers.len() < count {
        if let Some(answer) = take_answer(&mut buf) {
            answers.push(answer);
            continue;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{} of {count} answers in time", answers.len()))
            .expect("read");
        assert!(n > 0, "closed after {} of {count} answers", answers.len());
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(buf.is_empty(), "more than {count} answers");
    answers
}

/// Every answer sent on `stream` until the proxy closes it (within [`WAIT`]).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<Wire> {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .expect("read");
    let answers: Vec<Wire> = std::iter::from_fn(|| take_answer(&mut buf)).collect();
    assert_eq!(String::from_utf8_lossy(&buf), "", "only whole answers");
    answers
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// A GET for `path` with the proxy's address as `Host`, as the test
/// client's requests that fill the cache have.
fn get(proxy: &TestProxy, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr).into_bytes()
}

async fn metric(proxy: &TestProxy, name: &str) -> f64 {
    proxy.metrics().await.get(name).copied().unwrap_or(-1.0)
}

/// What of an answer both paths give alike: everything but `Date`'s value
/// and the origin's own count of its requests.
fn comparable(wire: &Wire) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let headers = wire
        .headers
        .iter()
        .map(|(n, v)| {
            let varies = n == "date" || n == "x-origin-count";
            (n.clone(), if varies { String::new() } else { v.clone() })
        })
        .collect();
    (wire.status, headers, wire.body.clone())
}

/// Each answer's status, `X-Cache` and body (as text), in order.
fn summary(answers: &[Wire]) -> Vec<(u16, &str, String)> {
    answers
        .iter()
        .map(|a| {
            (
                a.status,
                a.header("x-cache"),
                String::from_utf8_lossy(&a.body).into_owned(),
            )
        })
        .collect()
}

/// A hit on the fast path is the answer hyper's path gives (status, every
/// header but `Date`'s value, in order, and body), and is counted as a hit.
#[tokio::test]
async fn a_fast_hit_is_the_answer_hyper_gives() {
    let origin = Origin::start().await;
    origin.route(
        "/ranking",
        Route::default()
            .header("cache-control", "max-age=600")
            .header("x-generation", "7")
            .header("content-type", "application/json")
            .etag("\"r1\"")
            .body("{\"items\":[1,2,3]}"),
    );
    let fast = TestProxy::start(&origin, &[]).await;
    let hyper_only = TestProxy::start(&origin, &["--no-fast-hits"]).await;
    let mut answers = Vec::new();
    for proxy in [&fast, &hyper_only] {
        assert_eq!(proxy.get("/ranking").await.x_cache(), "MISS");
        let mut stream = connect(proxy.addr).await;
        // Two requests in one write (pipelined).
        let requests = [get(proxy, "/ranking"), get(proxy, "/ranking")].concat();
        stream.write_all(&requests).await.expect("write");
        answers.push(read_answers(&mut stream, 2).await);
    }
    let (fast_answers, hyper_answers) = (&answers[0], &answers[1]);
    for (fast, hyper) in fast_answers.iter().zip(hyper_answers) {
        assert_eq!(fast.status, 200);
        assert_eq!(fast.body, b"{\"items\":[1,2,3]}");
        assert_eq!(comparable(fast), comparable(hyper));
        assert_eq!(fast.header("x-cache"), "HIT");
        assert_eq!(fast.header("x-generation"), "7");
        assert_eq!(fast.header("etag"), "\"r1\"");
        assert!(fast
            .header("cache-status")
            .starts_with("swr-proxy; hit; ttl="));
        assert!(!fast.header("date").is_empty());
    }
    assert_eq!(metric(&fast, "swr_fast_hits_total").await, 2.0);
    // The fill (a miss) was answered on the fast path too.
    assert_eq!(metric(&fast, "swr_fast_hit_handoffs_total").await, 0.0);
    assert_eq!(
        metric(&fast, "swr_requests_total{cache=\"HIT\"}").await,
        2.0
    );
    assert_eq!(metric(&hyper_only, "swr_fast_hits_total").await, 0.0);
    assert_eq!(
        metric(&hyper_only, "swr_requests_total{cache=\"HIT\"}").await,
        2.0
    );
    assert_eq!(origin.hits("/ranking"), 2, "one fill per proxy");
}

/// The first request the fast path does not answer (here a POST with a
/// body, pipelined between two hits) goes to hyper with the bytes read
/// after it, and hyper answers the rest in order.
#[tokio::test]
async fn a_connection_goes_to_hyper_at_the_first_request_that_is_not_a_plain_get() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "10m"]).await;
    assert_eq!(proxy.get("/a").await.x_cache(), "MISS");
    let mut stream = connect(proxy.addr).await;
    let post = format!(
        "POST /form HTTP/1.1\r\nHost: {}\r\nContent-Length: 5\r\n\r\nhello",
        proxy.addr
    );
    let requests = [
        get(&proxy, "/a"),
        post.into_bytes(),
        get(&proxy, "/a"),
        get(&proxy, "/cold"),
    ]
    .concat();
    stream.write_all(&requests).await.expect("write");
    let answers = read_answers(&mut stream, 4).await;
    assert_eq!(
        summary(&answers),
        [
            (200, "HIT", "/a #1".to_string()),
            (200, "BYPASS", "/form #1".to_string()),
            (200, "HIT", "/a #1".to_string()),
            (200, "MISS", "/cold #1".to_string()),
        ]
    );
    let seen = origin.seen("/form");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        &seen[0].body[..],
        b"hello",
        "the body read before the handoff reaches the origin"
    );
    assert_eq!(metric(&proxy, "swr_fast_hits_total").await, 1.0);
    // This connection only (the fill's miss was answered on the fast path).
    assert_eq!(metric(&proxy, "swr_fast_hit_handoffs_total").await, 1.0);
}

/// A GET that frames a body is never answered here: were its
/// Content-Length or chunked body ignored, the body (itself a request)
/// would be read and answered as the next request, the shape of request
/// smuggling.
#[tokio::test]
async fn a_get_with_a_body_is_left_to_hyper() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "10m"]).await;
    assert_eq!(proxy.get("/a").await.x_cache(), "MISS");
    let smuggled = get(&proxy, "/b");
    let last = format!(
        "GET /a HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        proxy.addr
    )
    .into_bytes();
    let with_length = [
        format!(
            "GET /a HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            proxy.addr,
            smuggled.len()
        )
        .into_bytes(),
        smuggled.clone(),
        last.clone(),
    ]
    .concat();
    let chunked = [
        format!(
            "GET /a HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            proxy.addr
        )
        .into_bytes(),
        format!("{:x}\r\n", smuggled.len()).into_bytes(),
        smuggled,
        b"\r\n0\r\n\r\n".to_vec(),
        last,
    ]
    .concat();
    for requests in [with_length, chunked] {
        let mut stream = connect(proxy.addr).await;
        stream.write_all(&requests).await.expect("write");
        // hyper answers from the cache, then either reads past the body to
        // the last request (whose `Connection: close` ends the connection)
        // or closes the connection rather than read the body.
        let answers = read_until_closed(&mut stream).await;
        assert!(matches!(answers.len(), 1 | 2), "{answers:?}");
        for answer in &answers {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(answer.body, b"/a #1", "{answer:?}");
        }
    }
    assert_eq!(origin.hits("/b"), 0, "the body is never a request");
    assert_eq!(metric(&proxy, "swr_fast_hits_total").await, 0.0);
}

/// A head that arrives in pieces is answered once whole, not before; the
/// `Host` is matched as the hyper path matches it (case-insensitively).
#[tokio::test]
async fn a_head_in_pieces_is_answered_once_whole() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "10m"]).await;
    let filled = proxy
        .send(reqwest::Method::GET, "/a?x=1", &[("host", "example")])
        .await;
    assert_eq!(filled.x_cache(), "MISS");
    let mut stream = connect(proxy.addr).await;
    let request = b"GET /a?x=1 HTTP/1.1\r\nHost: EXAMPLE\r\nUser-Agent: pieces\r\n\r\n";
    let (first, rest) = request.split_at(30);
    stream.write_all(first).await.expect("write");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "nothing is answered before the head is whole"
    );
    stream.write_all(rest).await.expect("write");
    let answers = read_answers(&mut stream, 1).await;
    assert_eq!(answers[0].header("x-cache"), "HIT");
    assert_eq!(answers[0].body, b"/a?x=1 #1");
    assert_eq!(metric(&proxy, "swr_fast_hits_total").await, 1.0);
}

/// Found by fuzz/fuzz_targets/keys.rs: a target with a character of more
/// than one byte across the third byte of a segment (`/ab\u{e9}`) made
/// `valid_target` slice inside it, and the fast path's connection task
/// panicked without an answer. Such a target (hyper's path takes UTF-8) is
/// fetched and stored as any other, and its next request is a fast hit.
#[tokio::test]
async fn a_target_that_is_not_ascii_is_answered() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "10m"]).await;
    for target in ["/ab\u{e9}", "/x/%2e\u{61d}y", "/\u{1f600}"] {
        let mut stream = connect(proxy.addr).await;
        let mut request = get(&proxy, target);
        request.extend_from_slice(&get(&proxy, "/after"));
        stream.write_all(&request).await.expect("write");
        let answers = read_answers(&mut stream, 2).await;
        assert_eq!(answers[0].status, 200, "{target:?}");
        assert_eq!(answers[0].header("x-cache"), "MISS", "{target:?}");
        assert_eq!(answers[1].status, 200, "the connection serves on");
        let mut again = connect(proxy.addr).await;
        again.write_all(&get(&proxy, target)).await.expect("write");
        let hit = read_answers(&mut again, 1).await;
        assert_eq!(hit[0].header("x-cache"), "HIT", "{target:?}");
    }
    // The three targets' hits, and the second and third `/after`.
    assert_eq!(metric(&proxy, "swr_fast_hits_total").await, 5.0);
}

/// A connection that has only had fast hits is closed when idle for the
/// client header timeout, and at once at shutdown.
#[tokio::test]
async fn fast_connections_close_when_idle_and_at_shutdown() {
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--client-header-timeout", "400ms"]).await;
    assert_eq!(proxy.get("/a").await.x_cache(), "MISS");
    let mut idle = connect(proxy.addr).await;
    idle.write_all(&get(&proxy, "/a")).await.expect("write");
    assert_eq!(read_answers(&mut idle, 1).await[0].header("x-cache"), "HIT");
    let answered = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, idle.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "an idle fast connection is closed");
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "closed {took:?} after its answer"
    );
    assert!(rest.is_empty());

    let patient = TestProxy::start(&origin, &[]).await;
    assert_eq!(patient.get("/a").await.x_cache(), "MISS");
    let mut kept = connect(patient.addr).await;
    kept.write_all(&get(&patient, "/a")).await.expect("write");
    assert_eq!(read_answers(&mut kept, 1).await[0].header("x-cache"), "HIT");
    assert_eq!(metric(&patient, "swr_fast_hits_total").await, 1.0);
    patient.shut_down();
    let closed = tokio::time::timeout(Duration::from_secs(3), kept.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "closed at shutdown, not after the 60 s timeout"
    );
    assert!(rest.is_empty(), "nothing more is sent");
}

/// A stale entry is answered on the fast path too, at once, and its
/// refresh is queued with the client's headers, as on hyper's path.
#[tokio::test]
async fn a_stale_hit_on_the_fast_path_queues_its_refresh() {
    let origin = Origin::start().await;
    let flags = ["--ttl", "1s", "--stale-while-revalidate", "1m"];
    let proxy = TestProxy::start(&origin, &flags).await;
    assert_eq!(proxy.get("/feed").await.x_cache(), "MISS");
    let handoffs = metric(&proxy, "swr_fast_hit_handoffs_total").await;
    let mut stream = connect(proxy.addr).await;
    let request = format!(
        "GET /feed HTTP/1.1\r\nHost: {}\r\nX-Client: fast\r\n\r\n",
        proxy.addr
    );
    // HITs on one connection until the entry turns stale (after 1 s).
    let deadline = tokio::time::Instant::now() + WAIT;
    let stale = loop {
        assert!(tokio::time::Instant::now() < deadline, "never stale");
        stream.write_all(request.as_bytes()).await.expect("write");
        let answer = read_answers(&mut stream, 1).await.remove(0);
        assert_eq!(answer.body, b"/feed #1");
        if answer.header("x-cache") == "STALE" {
            break answer;
        }
        assert_eq!(answer.header("x-cache"), "HIT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        stale
            .header("cache-status")
            .ends_with("detail=refresh-queued"),
        "{stale:?}"
    );
    eventually(WAIT, "the refresh reaches the origin", || async {
        origin.hits("/feed") == 2
    })
    .await;
    let refresh = &origin.seen("/feed")[1];
    assert_eq!(
        refresh.headers["x-client"], "fast",
        "sent on with the refresh"
    );
    eventually(WAIT, "the refreshed entry is served", || async {
        proxy.get("/feed").await.text() == "/feed #2"
    })
    .await;
    assert_eq!(
        metric(&proxy, "swr_requests_total{cache=\"STALE\"}").await,
        1.0
    );
    assert_eq!(
        metric(&proxy, "swr_fast_hit_handoffs_total").await,
        handoffs,
        "the stale answer stayed on the fast path"
    );
}

/// Every strict prefix of a request head waits for more bytes; the whole
/// head is answered; a head with any one byte replaced is answered,
/// declined (for hyper) or waited on, never anything else, and only what
/// is answered is counted.
#[tokio::test]
async fn prefixes_and_corruptions_of_a_head_are_waited_on_declined_or_answered() {
    use swr_proxy::fast_hits::{answer, Answer};
    let origin = Origin::start().await;
    let proxy = TestProxy::start(&origin, &["--ttl", "10m"]).await;
    assert_eq!(proxy.get("/a?b=1").await.x_cache(), "MISS");
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("peer");
    let request = format!(
        "GET /a?b=1 HTTP/1.1\r\nHost: {}\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
        proxy.addr
    )
    .into_bytes();
    let mut head = Vec::new();
    for end in 0..request.len() {
        let got = answer(&proxy.proxy, &request[..end], peer, &mut head);
        assert!(matches!(got, Answer::Partial), "{end} bytes: {got:?}");
    }
    assert!(head.is_empty());
    let Answer::Ready { len, body } = answer(&proxy.proxy, &request, peer, &mut head) else {
        panic!("the whole head is answered");
    };
    assert_eq!(len, request.len());
    assert_eq!(&body[..], b"/a?b=1 #1");
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
    let mut answered = 1;
    for at in 0..request.len() {
        for byte in [0u8, b' ', b'\n', b':', b'?', b'A', 0xff] {
            let mut corrupted = request.clone();
            corrupted[at] = byte;
            head.clear();
            match answer(&proxy.proxy, &corrupted, peer, &mut head) {
                Answer::Ready { len, .. } => {
                    answered += 1;
                    assert!(len <= corrupted.len());
                    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
                }
                // Another plain GET: hyper's path's answer (not awaited here).
                Answer::Later { len, .. } => {
                    assert!(len <= corrupted.len());
                    assert!(head.is_empty());
                }
                Answer::Partial | Answer::Hyper => assert!(head.is_empty()),
            }
        }
    }
    assert_eq!(proxy.counter("swr_fast_hits_total").await, answered);
    assert!(
        answered > 1,
        "some corruptions (a header's value) still ask for the same entry"
    );
}

/// Every kind of answer to a plain GET that is not a hit (a miss stored, one
/// not stored, an empty body, a status hyper gives no reason phrase, a
/// backend failure, a local 504, a pass whose body streams, a 204) is the
/// answer hyper's path gives, header by header, whether the fast path
/// writes it or hands it to hyper with the connection; and the backend is
/// asked once for each.
#[tokio::test]
async fn every_answer_on_the_fast_path_is_the_answer_hyper_gives() {
    // One origin per proxy: its bodies count its requests.
    let origins = [Origin::start().await, Origin::start().await];
    for origin in &origins {
        let stored = Route::default()
            .header("cache-control", "max-age=600")
            .header("x-generation", "7")
            .header("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")
            .etag("\"r1\"")
            .body("{\"items\":[1,2,3]}");
        origin.route("/stored", stored);
        origin.route(
            "/private",
            Route::default()
                .header("cache-control", "private")
                .body("mine"),
        );
        origin.route(
            "/cookie",
            Route::default()
                .header("set-cookie", "s=1")
                .header("set-cookie", "t=2")
                .body("c"),
        );
        origin.route(
            "/empty",
            Route::default()
                .header("cache-control", "max-age=600")
                .body(""),
        );
        origin.route("/odd", Route::default().status(599).body("odd"));
        origin.route("/missing", Route::default().status(404).body("no"));
        origin.route("/reset", Route::default().reset());
        origin.route("/nothing", Route::default().status(204));
        origin.route("/big", Route::default().chunked().body(vec![b'x'; 300_000]));
    }
    let honor = "--honor-client-cache-control";
    let fast = TestProxy::start(&origins[0], &[honor]).await;
    let hyper_only = TestProxy::start(&origins[1], &[honor, "--no-fast-hits"]).await;
    let requests: Vec<(&str, &str)> = vec![
        ("/stored", ""),
        ("/private", ""),
        ("/cookie", ""),
        ("/empty", ""),
        ("/odd", ""),
        ("/missing", ""),
        ("/reset", ""),
        ("/never", "Cache-Control: only-if-cached\r\n"),
        ("/big", ""),
        ("/stored?pass", "Authorization: Bearer t\r\n"),
        ("/nothing", ""),
    ];
    let mut answers: [Vec<Wire>; 2] = [Vec::new(), Vec::new()];
    for (i, proxy) in [&fast, &hyper_only].into_iter().enumerate() {
        for (path, extra) in &requests {
            // Each on its own connection.
            let mut stream = connect(proxy.addr).await;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n", proxy.addr);
            stream.write_all(request.as_bytes()).await.expect("write");
            answers[i].extend(read_answers(&mut stream, 1).await);
        }
    }
    for (((path, _), fast), hyper) in requests.iter().zip(&answers[0]).zip(&answers[1]) {
        assert_eq!(comparable(fast), comparable(hyper), "{path}");
    }
    let statuses: Vec<(u16, &str)> = answers[0]
        .iter()
        .map(|a| (a.status, a.header("x-cache")))
        .collect();
    assert_eq!(
        statuses,
        [
            (200, "MISS"),
            (200, "BYPASS"),
            (200, "BYPASS"),
            (200, "MISS"),
            (599, "BYPASS"),
            (404, "MISS"),
            (502, "MISS"),
            (504, "MISS"),
            (200, "MISS"),
            (200, "BYPASS"),
            (204, "MISS"),
        ]
    );
    assert_eq!(answers[0][8].body.len(), 300_000);
    for origin in &origins {
        for (path, _) in &requests {
            let expected = match *path {
                "/never" => 0,
                "/stored?pass" => 1,
                // Retried or not, alike on both paths (compared above).
                "/reset" => origins[1].hits(path),
                _ => 1,
            };
            assert_eq!(origin.hits(path), expected, "{path}: asked once");
        }
    }
    // Only what hyper must write went to it: the answers not stored and the
    // pass (their bodies stream from the backend) and the 204; none was
    // asked for twice (above).
    assert_eq!(metric(&fast, "swr_fast_hit_handoffs_total").await, 5.0);
    assert_eq!(metric(&hyper_only, "swr_fast_hits_total").await, 0.0);
}

/// A keep-alive connection that meets misses stays on the fast path: the
/// hits after them are fast hits, and pipelined requests around a miss,
/// and around one hyper must answer, are answered in order.
#[tokio::test]
async fn misses_keep_a_connection_on_the_fast_path() {
    let origin = Origin::start().await;
    origin.route("/slow", Route::default().delay(Duration::from_millis(200)));
    let proxy = TestProxy::start(&origin, &["--ttl", "10m"]).await;
    let mut stream = connect(proxy.addr).await;
    for round in 0..3 {
        stream
            .write_all(&[get(&proxy, &format!("/new{round}")), get(&proxy, "/new0")].concat())
            .await
            .expect("write");
        let answers = read_answers(&mut stream, 2).await;
        assert_eq!(answers[0].header("x-cache"), "MISS", "round {round}");
        assert_eq!(answers[1].header("x-cache"), "HIT", "round {round}");
    }
    assert_eq!(metric(&proxy, "swr_fast_hits_total").await, 3.0);
    assert_eq!(metric(&proxy, "swr_fast_hit_handoffs_total").await, 0.0);
    // Pipelined: a hit, a slow miss, a hit, a pass hyper must stream, a hit.
    let pass = format!(
        "GET /pass HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer t\r\n\r\n",
        proxy.addr
    );
    let requests = [
        get(&proxy, "/new0"),
        get(&proxy, "/slow"),
        get(&proxy, "/new1"),
        pass.into_bytes(),
        get(&proxy, "/new2"),
    ]
    .concat();
    stream.write_all(&requests).await.expect("write");
    let answers = read_answers(&mut stream, 5).await;
    assert_eq!(
        summary(&answers),
        [
            (200, "HIT", "/new0 #1".to_string()),
            (200, "MISS", "/slow #1".to_string()),
            (200, "HIT", "/new1 #1".to_string()),
            (200, "BYPASS", "/pass #1".to_string()),
            (200, "HIT", "/new2 #1".to_string()),
        ]
    );
    assert_eq!(origin.hits("/pass"), 1, "the pass was sent once");
    assert_eq!(metric(&proxy, "swr_fast_hit_handoffs_total").await, 1.0);
}

/// A target with a fragment (`/p#x`: httparse takes it, hyper's `Uri`
/// drops the fragment) whose answer streams is sent to the backend once:
/// the answer made on the fast path is the one hyper's service uses when
/// it reads the same request again, not thrown away for a second fetch.
#[tokio::test]
async fn a_target_with_a_fragment_is_fetched_once() {
    let origins = [Origin::start().await, Origin::start().await];
    let fast = TestProxy::start(&origins[0], &[]).await;
    let hyper_only = TestProxy::start(&origins[1], &["--no-fast-hits"]).await;
    let mut answers = Vec::new();
    for proxy in [&fast, &hyper_only] {
        let mut stream = connect(proxy.addr).await;
        // A pass (credentials): its body streams, so hyper writes it.
        let request = format!(
            "GET /p#frag HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer t\r\n\r\n",
            proxy.addr
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        answers.push(read_answers(&mut stream, 1).await.remove(0));
    }
    assert_eq!(comparable(&answers[0]), comparable(&answers[1]));
    assert_eq!(answers[0].header("x-cache"), "BYPASS");
    assert_eq!(answers[0].body, b"/p #1");
    for origin in &origins {
        assert_eq!(origin.hits("/p"), 1, "the backend is asked once");
    }
}

/// Every answer sent on `stream` until the proxy closes it (within
/// [`WAIT`]), a reset (a request left unread) ending it as a close does.
async fn answers_then_closed(stream: &mut TcpStream) -> Vec<Wire> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    let answers: Vec<Wire> = std::iter::from_fn(|| take_answer(&mut buf)).collect();
    assert_eq!(String::from_utf8_lossy(&buf), "", "only whole answers");
    answers
}

/// A request in flight when shutdown begins is answered as hyper answers
/// it (with `Connection: close`, the pipelined request after it left
/// unanswered) and its connection then closes, whether its answer is
/// written on the fast path (a miss stored) or by hyper (a pass, which
/// streams): the connection is not left serving on after shutdown.
#[tokio::test]
async fn an_answer_made_during_shutdown_closes_its_connection_as_hyper_does() {
    for pass in [false, true] {
        let gate = Gate::closed();
        let origins = [Origin::start().await, Origin::start().await];
        for origin in &origins {
            origin.route("/slow", Route::default().gate(&gate));
        }
        let fast = TestProxy::start(&origins[0], &["--ttl", "10m"]).await;
        let hyper_only = TestProxy::start(&origins[1], &["--ttl", "10m", "--no-fast-hits"]).await;
        let mut streams = Vec::new();
        for (proxy, origin) in [&fast, &hyper_only].into_iter().zip(&origins) {
            let credentials = if pass {
                "Authorization: Bearer t\r\n"
            } else {
                ""
            };
            let requests = [
                format!(
                    "GET /slow HTTP/1.1\r\nHost: {}\r\n{credentials}\r\n",
                    proxy.addr
                )
                .into_bytes(),
                get(proxy, "/next"),
            ]
            .concat();
            let mut stream = connect(proxy.addr).await;
            stream.write_all(&requests).await.expect("write");
            eventually(WAIT, "the request reaches the origin", || async {
                origin.hits("/slow") == 1
            })
            .await;
            proxy.shut_down();
            // Refused once the listener is gone, which is when every
            // connection has been told to finish.
            let addr = proxy.addr;
            eventually(WAIT, "the proxy stops accepting", || async move {
                TcpStream::connect(addr).await.is_err()
            })
            .await;
            streams.push(stream);
        }
        gate.open();
        let mut answers = Vec::new();
        for stream in &mut streams {
            let mut got = answers_then_closed(stream).await;
            assert_eq!(got.len(), 1, "pass {pass}: one answer, then closed");
            answers.push(got.remove(0));
        }
        assert_eq!(
            comparable(&answers[0]),
            comparable(&answers[1]),
            "pass {pass}"
        );
        assert_eq!(answers[0].header("connection"), "close", "pass {pass}");
        assert_eq!(answers[0].body, b"/slow #1");
        for origin in &origins {
            assert_eq!(origin.hits("/slow"), 1, "pass {pass}");
            assert_eq!(origin.hits("/next"), 0, "pass {pass}");
        }
    }
}

/// A client that goes away while its pass (a request that is never
/// coalesced: here `Cache-Control: no-store`, honored) waits on the
/// backend has it dropped, as hyper drops it with the connection: the
/// backend request does not run on for a client that is gone.
#[tokio::test]
async fn a_client_that_leaves_during_a_pass_cancels_it_as_hyper_does() {
    for flags in [&["--no-fast-hits"][..], &[][..]] {
        let gate = Gate::closed();
        let origin = Origin::start().await;
        origin.route("/slow", Route::default().gate(&gate));
        let flags = [flags, &["--honor-client-cache-control"]].concat();
        let proxy = TestProxy::start(&origin, &flags).await;
        let mut stream = connect(proxy.addr).await;
        let request = format!(
            "GET /slow HTTP/1.1\r\nHost: {}\r\nCache-Control: no-store\r\n\r\n",
            proxy.addr
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        eventually(WAIT, "the pass reaches the origin", || async {
            origin.hits("/slow") == 1
        })
        .await;
        assert_eq!(metric(&proxy, "swr_upstream_in_flight").await, 1.0);
        drop(stream);
        let what = format!("{flags:?}: the pass is dropped with its client");
        eventually(WAIT, &what, || async {
            metric(&proxy, "swr_upstream_in_flight").await == 0.0
        })
        .await;
        gate.open();
        assert_eq!(origin.hits("/slow"), 1, "{flags:?}");
    }
}

/// Odd backend answers (its own `Date`, a second `Content-Length` of the
/// same value, bytes past ASCII and empty values in fields, repeated
/// fields, a status with no reason phrase, no-store) give the same bytes on
/// the fast path as on hyper's (but `Date`'s value), on the miss and on the
/// hit after it, with the connection kept alive for a request after them.
#[tokio::test]
async fn odd_backend_answers_are_written_as_hyper_writes_them() {
    use support::raw::RawBackend;
    let variants: [&[&str]; 6] = [
        &[
            "cache-control: max-age=60",
            "date: Tue, 01 Dec 2026 10:00:00 GMT",
        ],
        &["cache-control: max-age=60", "content-length: 0"],
        &[
            "cache-control: max-age=60",
            "x-odd: a\u{e9}b",
            "x-empty:",
            "x-sp:   ",
        ],
        &[
            "cache-control: max-age=60",
            "vary: a",
            "x-r: 1",
            "vary: b",
            "x-r: 2",
        ],
        &["cache-control: no-store", "x-a: 1"],
        &[
            "cache-control: max-age=60, must-revalidate",
            "age: 5",
            "x-cache: LIE",
        ],
    ];
    for (i, lines) in variants.iter().enumerate() {
        let backends = [RawBackend::start().await, RawBackend::start().await];
        let fast = TestProxy::start_for(&backends[0].url(), &[]).await;
        let hyper_only = TestProxy::start_for(&backends[1].url(), &["--no-fast-hits"]).await;
        let mut wires = Vec::new();
        for (proxy, backend) in [&fast, &hyper_only].into_iter().zip(&backends) {
            let mut lines = lines.to_vec();
            // The second Content-Length: RawBackend's own is the body's.
            let body = format!("/v{i} #1");
            let second = format!("content-length: {}", body.len());
            if lines.contains(&"content-length: 0") {
                lines.retain(|l| *l != "content-length: 0");
                lines.push(&second);
            }
            backend.answer_with(&lines);
            let mut stream = connect(proxy.addr).await;
            let requests = [
                get(proxy, &format!("/v{i}")),
                get(proxy, &format!("/v{i}")),
                get(proxy, "/after"),
            ]
            .concat();
            stream.write_all(&requests).await.expect("write");
            let mut buf = Vec::new();
            let deadline = tokio::time::Instant::now() + WAIT;
            let mut got = 0;
            let mut copy = Vec::new();
            while got < 3 {
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(n > 0, "variant {i}: closed");
                buf.extend_from_slice(&chunk[..n]);
                copy.extend_from_slice(&chunk[..n]);
                while take_answer(&mut buf).is_some() {
                    got += 1;
                }
            }
            // Date's value (the backend's own is kept) masked.
            let text = String::from_utf8_lossy(&copy).into_owned();
            let masked: Vec<String> = text
                .split("\r\n")
                .map(|l| {
                    if l.starts_with("date: ") && !l.contains("2026 10:00:00") {
                        "date: *".to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            wires.push(masked.join("\r\n"));
        }
        assert_eq!(wires[0], wires[1], "variant {i}: {lines:?}");
    }
}

/// What the backend receives for a plain GET that misses is the same
/// whether the fast path built the request or hyper read it: repeated,
/// empty, non-ASCII and tabbed fields, and the key it is stored
/// under (the hit after it is found on either path).
#[tokio::test]
async fn a_miss_reaches_the_backend_as_hyper_would_send_it() {
    use support::raw::RawBackend;
    let backends = [RawBackend::start().await, RawBackend::start().await];
    let fast = TestProxy::start_for(&backends[0].url(), &[]).await;
    let hyper_only = TestProxy::start_for(&backends[1].url(), &["--no-fast-hits"]).await;
    let head = b"GET /r?q=1&b=%20 HTTP/1.1\r\nHost: Example.TEST:8080\r\nX-A: 1\r\nx-a: 2\r\nX-Empty:\r\nX-Odd: caf\xc3\xa9 \xff\r\nX-Tab: a\tb\t\r\nAccept: */*\r\nx-A: 3\r\nConnection: keep-alive\r\nUser-Agent: t\r\n\r\n";
    let mut answers = Vec::new();
    for proxy in [&fast, &hyper_only] {
        let mut stream = connect(proxy.addr).await;
        stream
            .write_all(&[&head[..], &head[..]].concat())
            .await
            .expect("write");
        answers.push(read_answers(&mut stream, 2).await);
    }
    for answers in &answers {
        assert_eq!(answers[0].header("x-cache"), "MISS");
        assert_eq!(answers[1].header("x-cache"), "HIT");
    }
    let seen: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            let heads = b.seen().into_iter().map(|r| r.head);
            // Each backend's own address as `Host`.
            heads
                .map(|h| h.replace(&format!("host: {}", b.addr), "host: *"))
                .collect()
        })
        .collect();
    assert_eq!(seen[0].len(), 1);
    assert_eq!(seen[0], seen[1]);
    assert_eq!(
        comparable(&answers[0][0]),
        comparable(&answers[1][0]),
        "the miss"
    );
    assert_eq!(
        comparable(&answers[0][1]),
        comparable(&answers[1][1]),
        "the hit"
    );
}

/// Closes `stream`'s sending side and waits for the proxy to close the
/// connection in turn: it has dropped the request in flight by then. No
/// answer comes before.
async fn leave(mut stream: TcpStream) {
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection in time")
        .expect("read");
    assert!(rest.is_empty(), "no answer to a client that left");
}

/// A client whose GET for `path` leads a fill, once the fill has reached
/// the origin.
async fn lead_fill(proxy: &TestProxy, origin: &Origin, path: &str) -> TcpStream {
    let mut leader = connect(proxy.addr).await;
    leader.write_all(&get(proxy, path)).await.expect("write");
    eventually(WAIT, "the fill reaches the origin", || async {
        origin.hits(path) == 1
    })
    .await;
    leader
}

/// A client that goes away while the fill it leads waits on the backend
/// does not cancel the fill: its waiter gets the answer, the answer is
/// stored, and the backend is asked once. Then a leader that leaves alone:
/// its fill still ends in the store. On both paths (the fill runs in the
/// leader's task and goes on in a task of its own when that is dropped).
#[tokio::test]
async fn a_fill_outlives_the_client_that_led_it() {
    for flags in [&["--no-fast-hits"][..], &[][..]] {
        let origin = Origin::start().await;
        let slow = |gate: &Gate| {
            Route::default()
                .gate(gate)
                .header("cache-control", "max-age=60")
        };
        let gate = Gate::closed();
        origin.route("/slow", slow(&gate));
        let proxy = TestProxy::start(&origin, flags).await;
        let leader = lead_fill(&proxy, &origin, "/slow").await;
        let mut waiter = connect(proxy.addr).await;
        waiter
            .write_all(&get(&proxy, "/slow"))
            .await
            .expect("write");
        eventually(WAIT, "the second request waits on the fill", || async {
            metric(&proxy, "swr_coalesced_waiters_total").await == 1.0
        })
        .await;
        leave(leader).await;
        assert_eq!(metric(&proxy, "swr_upstream_in_flight").await, 1.0);
        gate.open();
        let answers = read_answers(&mut waiter, 1).await;
        assert_eq!(answers[0].status, 200, "{flags:?}");
        assert_eq!(answers[0].body, b"/slow #1", "{flags:?}");
        assert_eq!(proxy.get("/slow").await.x_cache(), "HIT", "{flags:?}");
        assert_eq!(origin.hits("/slow"), 1, "{flags:?}");

        // A leader alone: its fill still stores the answer.
        let gate = Gate::closed();
        origin.route("/alone", slow(&gate));
        let leader = lead_fill(&proxy, &origin, "/alone").await;
        leave(leader).await;
        assert_eq!(metric(&proxy, "swr_upstream_in_flight").await, 1.0);
        gate.open();
        eventually(WAIT, "the fill is stored without its client", || async {
            metric(&proxy, "swr_cache_entries").await == 2.0
        })
        .await;
        assert_eq!(proxy.get("/alone").await.x_cache(), "HIT", "{flags:?}");
        assert_eq!(origin.hits("/alone"), 1, "{flags:?}");
    }
}
