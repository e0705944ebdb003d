//! Memory stays inside its bounds whatever clients and backends do, slow
//! clients cost nothing for long, and a misbehaving backend is answered
//! visibly: each bound driven past its limit, read from `/metrics`.

mod support;

use std::time::{Duration, Instant};

use support::raw::exchange;
use support::{eventually, Gate, Origin, Route, TempFile, TestProxy, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// `GET /?n=<counter>` against a backend that varies: the Vary index stays
/// within its share of `--max-size`, and the cache within `--max-size`.
#[tokio::test]
async fn the_vary_index_stays_within_the_budget() {
    let origin = Origin::start().await;
    origin.route(
        "/v",
        Route::default()
            .header("cache-control", "max-age=60")
            .header("vary", "accept-encoding"),
    );
    let proxy = TestProxy::start(
        &origin,
        &["--max-size", "256KiB", "--max-object-size", "4KiB"],
    )
    .await;
    for n in 0..3000 {
        let answer = proxy.get(&format!("/v?n={n}")).await;
        assert_eq!(answer.status, 200);
    }
    let metrics = proxy.metrics().await;
    let vary = metrics["swr_vary_index_bytes"];
    assert!(vary > 0.0, "the index is charged");
    assert!(
        vary <= (256.0 * 1024.0) / 16.0,
        "index {vary} B past 1/16 of the budget"
    );
    assert!(metrics["swr_cache_bytes"] <= 256.0 * 1024.0);
}

/// An origin with a stored `size`-byte answer at `path`, and the proxy in
/// front of it with `--client-write-timeout 1s`.
async fn large_object_behind_a_write_timeout(path: &str, size: usize) -> (Origin, TestProxy) {
    let origin = Origin::start().await;
    origin.route(
        path,
        Route::default()
            .header("cache-control", "max-age=60")
            .body(vec![b'x'; size]),
    );
    let proxy = TestProxy::start(
        &origin,
        &[
            "--max-object-size",
            "32MiB",
            "--max-size",
            "64MiB",
            "--client-write-timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(proxy.get(path).await.body.len(), size, "stored");
    (origin, proxy)
}

/// A client that stops reading an answer is dropped after
/// `--client-write-timeout`, on the fast path and on hyper's, so it cannot
/// keep a large body alive.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped() {
    let size = 16 << 20;
    let (_origin, proxy) = large_object_behind_a_write_timeout("/big", size).await;
    for (path, hits) in [("/big", "a fast hit"), ("/big?pass", "hyper's path")] {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("small receive buffer");
        let mut stream = socket.connect(proxy.addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        // Read nothing for three write timeouts, then everything there is.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got += n,
                Err(_) => panic!("{hits}: the connection is still open"),
            }
        }
        assert!(
            got < size,
            "{hits}: read {got} of {size} bytes: never dropped"
        );
    }
}

/// Refresh jobs hold their request's headers: the queue is bounded in
/// bytes as well as in jobs, and what does not fit is dropped and counted.
#[tokio::test]
async fn the_refresh_queue_is_bounded_in_bytes() {
    let origin = Origin::start().await;
    let stale = "max-age=0, stale-while-revalidate=600";
    origin.route("/r", Route::default().header("cache-control", stale));
    let proxy = TestProxy::start(&origin, &["--refresh-concurrency", "1"]).await;
    for n in 0..1000 {
        proxy.get(&format!("/r?k={n}")).await;
    }
    // Refreshes wait at the backend; each stale hit brings 30 KB of headers.
    let gate = Gate::closed();
    origin.route(
        "/r",
        Route::default().header("cache-control", stale).gate(&gate),
    );
    let padding = "p".repeat(7_000);
    let headers: Vec<(String, String)> = (0..4)
        .map(|i| (format!("x-pad-{i}"), padding.clone()))
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    for n in 0..1000 {
        let answer = proxy
            .send(reqwest::Method::GET, &format!("/r?k={n}"), &headers)
            .await;
        assert_eq!(answer.x_cache(), "STALE");
    }
    let metrics = proxy.metrics().await;
    let held = metrics["swr_refresh_queue_bytes"];
    assert!(held > 16.0 * 1024.0 * 1024.0, "the queue filled: {held}");
    assert!(held <= 32.0 * 1024.0 * 1024.0, "{held} bytes past 32 MiB");
    assert!(metrics["swr_refresh_events_total{event=\"dropped\"}"] > 0.0);
    gate.open();
    eventually(WAIT, "the queue drains", || async {
        proxy.metrics().await["swr_refresh_queue_bytes"] == 0.0
    })
    .await;
}

/// A backend that answers `/hold` after 1.5 s and then never sends its
/// body (a fill of it holds its slot for 1.5 s + the body timeout), and
/// every other path at once (`200`, 5 bytes). Returns its address and the
/// request lines it has read.
async fn slot_holding_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let backend_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let seen = backend_seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                seen.lock().unwrap().push(line.clone());
                if !line.starts_with("GET /hold ") {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                    let _ = stream.write_all(answer).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
                let _ = stream.write_all(head).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (addr, seen)
}

/// With every slot to the backend held, a client waits for one no longer
/// than `--upstream-timeout`: a 503 naming the cause, not a request that
/// hangs.
#[tokio::test]
async fn waiting_for_a_backend_slot_has_a_deadline() {
    let (addr, seen) = slot_holding_backend().await;
    let proxy = TestProxy::start_for(
        &format!("http://{addr}"),
        &["--upstream-concurrency", "1", "--upstream-timeout", "2s"],
    )
    .await;
    let proxy_addr = proxy.addr;
    let holder = tokio::spawn(async move {
        exchange(proxy_addr, b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n").await
    });
    eventually(WAIT, "the slot is held", || async {
        seen.lock().unwrap().len() == 1
    })
    .await;
    let started = Instant::now();
    let waiting = exchange(proxy.addr, b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(waiting.status, 503, "{}", waiting.text());
    assert!(waiting.text().contains("(busy)"), "{}", waiting.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "/other never reached the backend"
    );
    let _ = holder.await;
}

/// A refresh that finds no slot to the backend within `--upstream-timeout`
/// never asked the backend: it is counted as dropped (as one that found
/// the queue full), not as a failed refresh, and says nothing of the key.
#[tokio::test]
async fn a_refresh_that_gets_no_backend_slot_is_dropped_not_failed() {
    let (addr, seen) = slot_holding_backend().await;
    let proxy = TestProxy::start_for(
        &format!("http://{addr}"),
        &[
            "--upstream-concurrency",
            "1",
            "--upstream-timeout",
            "2s",
            "--ttl",
            "300ms",
        ],
    )
    .await;
    assert_eq!(proxy.get("/b").await.x_cache(), "MISS");
    let proxy_addr = proxy.addr;
    let holder = tokio::spawn(async move {
        exchange(proxy_addr, b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n").await
    });
    eventually(WAIT, "the slot is held", || async {
        seen.lock().unwrap().len() == 2
    })
    .await;
    // The slot stays held for 1.5 s + 2 s; the refresh waits 2 s at most.
    eventually(WAIT, "/b turns stale", || async {
        proxy.get("/b").await.x_cache() == "STALE"
    })
    .await;
    eventually(WAIT, "the refresh gives up waiting for a slot", || async {
        proxy
            .counter("swr_refresh_events_total{event=\"dropped\"}")
            .await
            == 1
    })
    .await;
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"failed\"}")
            .await,
        0
    );
    // Seen as what it was: no slot, whichever path asked.
    assert_eq!(
        proxy
            .counter("swr_upstream_errors_total{kind=\"busy\"}")
            .await,
        1
    );
    let asked_for_b = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.starts_with("GET /b "))
        .count();
    assert_eq!(asked_for_b, 1, "only the fill reached the backend");
    // Nor does it back the key off: the next stale answer is not held back.
    assert_eq!(proxy.get("/b").await.x_cache(), "STALE");
    assert_eq!(
        proxy
            .counter("swr_refresh_events_total{event=\"backoff\"}")
            .await,
        0
    );
    let _ = holder.await;
}

/// A backend that sends bytes that are not HTTP, or closes in the middle
/// of a body: 502, nothing stored, the next request asks the backend again.
#[tokio::test]
async fn broken_backend_answers_are_502_and_never_stored() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer: &[u8] = if head.starts_with("GET /garbage") {
                    b"this is not http\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncache-control: max-age=60\r\n\r\nonly a hundred bytes..............................................................................."
                };
                let _ = stream.write_all(answer).await;
            });
        }
    });
    let proxy = TestProxy::start_for(&format!("http://{addr}"), &[]).await;
    for path in ["/garbage", "/cut"] {
        for _ in 0..2 {
            let answer = exchange(
                proxy.addr,
                format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            )
            .await;
            assert_eq!(answer.status, 502, "{path}");
            assert!(
                answer.text().contains("(protocol)"),
                "{path}: {}",
                answer.text()
            );
        }
    }
    let metrics = proxy.metrics().await;
    assert_eq!(metrics["swr_cache_entries"], 0.0, "nothing partial stored");
    assert!(metrics["swr_upstream_errors_total{kind=\"protocol\"}"] >= 4.0);
}

/// Reloads under load lose nothing: every request during 20 reloads gets a
/// whole answer.
#[tokio::test]
async fn reloads_under_load_lose_nothing() {
    let origin = Origin::start().await;
    origin.route("/l", Route::default().header("cache-control", "max-age=1"));
    let file = TempFile::new("[[route]]\npath = \"/l\"\nttl = \"1s\"\n");
    let proxy = TestProxy::start(&origin, &["--config", file.path()]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loads = Vec::new();
    for worker in 0..4 {
        let (client, base, stop) = (proxy.client.clone(), proxy.url("/l"), stop.clone());
        loads.push(tokio::spawn(async move {
            let mut answered = 0u32;
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let url = format!("{base}?w={worker}&k={}", n % 50);
                let response = client.get(url).send().await.expect("an answer");
                assert_eq!(response.status().as_u16(), 200);
                let body = response.bytes().await.expect("a whole body");
                assert!(body.starts_with(b"/l?"));
                answered += 1;
            }
            answered
        }));
    }
    for i in 0..20 {
        let ttl = if i % 2 == 0 { "2s" } else { "1s" };
        file.write(&format!("[[route]]\npath = \"/l\"\nttl = \"{ttl}\"\n"));
        proxy.proxy.reload().expect("the file reloads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for load in loads {
        assert!(load.await.expect("no failed request") > 0);
    }
}

/// An HTTP/2 client that stops reading exhausts its flow-control window,
/// so the socket never blocks: the connection is still dropped after
/// `--client-write-timeout`, since hyper stopped taking the body.
#[tokio::test]
async fn an_http2_client_that_stops_reading_is_dropped() {
    let size = 16 << 20;
    let (_origin, proxy) = large_object_behind_a_write_timeout("/big2", size).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .adaptive_window(false)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{}/big2", proxy.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("a head");
    assert_eq!(response.status(), 200);
    // Take nothing for three write timeouts, then everything there is.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut body = response.into_body();
    let mut got = 0usize;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, http_body_util::BodyExt::frame(&mut body)).await;
        match frame {
            Ok(Some(Ok(frame))) => got += frame.data_ref().map_or(0, |d| d.len()),
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("the HTTP/2 connection is still open"),
        }
    }
    assert!(got < size, "read {got} of {size} bytes: never dropped");
}

/// Refreshes in flight follow the backend (`src/refresh/limit.rs`): with a
/// backend that answers in 50 ms the limit grows from its floor of 4 past
/// the old fixed 8 workers, and more than 8 refreshes run at once; when the
/// backend starts failing, the limit falls back to the floor.
#[tokio::test]
async fn the_refresh_limit_grows_on_a_fast_backend_and_falls_when_it_fails() {
    let origin = Origin::start().await;
    let stale = "max-age=0, stale-while-revalidate=600";
    let answering = || {
        Route::default()
            .header("cache-control", stale)
            .delay(Duration::from_millis(50))
    };
    origin.route("/r", answering());
    let proxy = TestProxy::start(&origin, &[]).await;
    let keys: Vec<String> = (0..64).map(|k| format!("/r?k={k}")).collect();
    for key in &keys {
        assert_eq!(proxy.get(key).await.x_cache(), "MISS");
    }
    assert_eq!(proxy.counter("swr_refresh_limit").await, 4, "the floor");
    // Every key is stale at once: 64 refreshes queued per wave.
    let wave = || futures_util::future::join_all(keys.iter().map(|k| proxy.get(k)));
    eventually(WAIT, "more than 8 refreshes in flight at once", || async {
        wave().await;
        proxy.counter("swr_refresh_limit").await > 8 && origin.max_in_flight() > 8
    })
    .await;
    assert!(
        proxy.counter("swr_refresh_limit").await <= 128,
        "the ceiling"
    );
    let latency = proxy.metrics().await["swr_refresh_latency_baseline_seconds"];
    assert!(latency >= 0.05, "the baseline is the backend's: {latency}");
    // The backend fails (500, not storable): each failure halves the
    // limit, down to the floor.
    origin.route(
        "/r",
        Route::default()
            .status(500)
            .delay(Duration::from_millis(50)),
    );
    eventually(WAIT, "the limit back at the floor", || async {
        wave().await;
        proxy.counter("swr_refresh_limit").await == 4
    })
    .await;
    assert!(
        proxy
            .counter("swr_refresh_events_total{event=\"failed\"}")
            .await
            > 0
    );
}

/// An h2 backend (behind a test CA) that turns away its first `refuse`
/// streams with `RST_STREAM(REFUSED_STREAM)`, unread, then answers each
/// with a stored `ok`. Returns its port and its count of streams.
async fn refusing_h2_backend(
    ca: &support::TestCa,
    refuse: u64,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let streams = std::sync::Arc::new(AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&streams);
    let acceptor = ca.acceptor(&[b"h2"]);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), std::sync::Arc::clone(&counted));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    if counted.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let head = http::Response::builder()
                        .status(200)
                        .header("cache-control", "max-age=60")
                        .body(())
                        .expect("a response head");
                    if let Ok(mut body) = respond.send_response(head, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (port, streams)
}

/// The proxy in front of [`refusing_h2_backend`], trusting its CA.
async fn behind_refusing_h2_backend(
    ca: &support::TestCa,
    refuse: u64,
) -> (TestProxy, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let (port, streams) = refusing_h2_backend(ca, refuse).await;
    let backend = format!("https://127.0.0.1:{port}");
    let ca_file = ca.ca.to_str().expect("a UTF-8 temp path");
    let proxy = TestProxy::start_for(&backend, &["--upstream-ca", ca_file]).await;
    (proxy, streams)
}

/// A bodiless request an h2 backend refused unread (`REFUSED_STREAM`) is
/// sent again, at most twice more, as reqwest did; a request with a body
/// is not (it may have been read in part), and what is not retried, or
/// still refused, is a 502.
#[tokio::test]
async fn a_stream_an_h2_backend_refused_unread_is_sent_again_when_bodiless() {
    use std::sync::atomic::Ordering;
    let ca = support::TestCa::make("h2-refused");
    // Refused once: the GET is answered by the second stream.
    let (proxy, streams) = behind_refusing_h2_backend(&ca, 1).await;
    let answer = proxy.get("/once").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "ok");
    assert_eq!(streams.load(Ordering::SeqCst), 2);

    // Refused every time: three streams, then a 502.
    let (proxy, streams) = behind_refusing_h2_backend(&ca, u64::MAX).await;
    let answer = proxy.get("/always").await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(streams.load(Ordering::SeqCst), 3);

    // A request with a body is not sent again.
    let (proxy, streams) = behind_refusing_h2_backend(&ca, 1).await;
    let posted = proxy
        .client
        .post(proxy.url("/form"))
        .body("a=1")
        .send()
        .await
        .expect("an answer");
    assert_eq!(posted.status(), 502);
    assert_eq!(streams.load(Ordering::SeqCst), 1);
}
