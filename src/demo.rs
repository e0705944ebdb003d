//! The demo backend behind `swr-proxy demo`: a "ranking" endpoint that takes
//! about 300 ms per answer and says when it computed it and how many answers
//! it has computed (the generation), so the effect of the cache is visible.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long the demo backend takes to compute one answer.
pub const COMPUTE_TIME: Duration = Duration::from_millis(300);

/// Serves the demo backend on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, cancel: CancellationToken) {
    let generation = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "demo backend: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let generation = Arc::clone(&generation);
        let service = service_fn(move |request: Request<hyper::body::Incoming>| {
            let generation = Arc::clone(&generation);
            async move { Ok::<_, Infallible>(answer(&request, &generation).await) }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: &Request<hyper::body::Incoming>,
    generation: &AtomicU64,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/ranking" {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"demo backend: try /ranking?user=42\n",
        )));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    tokio::time::sleep(COMPUTE_TIME).await;
    let generation = generation.fetch_add(1, Ordering::Relaxed) + 1;
    let computed_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let user = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("user=")))
        .unwrap_or("anonymous");
    let user: String = user
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    // A stand-in for an expensive ranking: stable per user, rotating per generation.
    let seed = user.bytes().fold(generation, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    let items: Vec<String> = (0..5)
        .map(|i| format!("\"item-{}\"", (seed.wrapping_add(i * 7919)) % 1000))
        .collect();
    let body = format!(
        "{{\"user\":\"{user}\",\"generation\":{generation},\"computed_at_ms\":{computed_at_ms},\"items\":[{}]}}\n",
        items.join(",")
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    // Like a real ranking backend: validators, and Last-Modified stamped
    // when the answer was computed. No Cache-Control, so --ttl decides how
    // long it is fresh (not a heuristic from Last-Modified).
    let stamped = [
        (
            header::LAST_MODIFIED,
            httpdate::fmt_http_date(SystemTime::now()),
        ),
        (header::ETAG, format!("\"g{generation}\"")),
    ];
    for (name, value) in stamped {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}
