//! The accept loop: serves HTTP/1.1 and HTTP/2 connections until told to
//! stop, then shuts down gracefully with a deadline.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::Either;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

/// A client connection's socket, its blocked writes watched for
/// `--client-write-timeout`.
pub type ClientStream = WriteWatched<TcpStream>;
use tokio_util::task::TaskTracker;

use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::config::Config;
use crate::connections::{Connections, Control, Ended, Graceful, Tracked, WriteWatched};
use crate::fast_hits::{Early, FastConnection, Prefixed};
use crate::proxy::Proxy;
use crate::upstream::BoxError;

/// How long a connection may take over its parts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a client to send a request's headers, from when its connection
    /// opens or falls idle after an answer (see [`crate::connections`]).
    pub client_header: Duration,
    /// For an answer's write to make progress (`--client-write-timeout`).
    pub client_write: Duration,
    /// After shutdown begins, for in-flight requests to finish.
    pub grace: Duration,
}

impl Timeouts {
    pub fn from_config(config: &Config) -> Timeouts {
        Timeouts {
            client_header: config.start.client_header_timeout,
            client_write: config.start.client_write_timeout,
            grace: config.start.shutdown_timeout,
        }
    }
}

/// How long closing the connections left at the shutdown deadline may take.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Serves the proxy on `listener` until `shutdown` completes; then stops
/// accepting, asks every connection to finish its in-flight requests, and
/// waits up to `timeouts.grace`.
///
/// Plain HTTP/1.1 `GET`s are answered by [`crate::fast_hits`] (unless
/// `--no-fast-hits` or `--access-log`, whose lines hyper's path writes);
/// everything else by hyper.
///
/// It never binds sockets or installs signal handlers: `main` passes the
/// real signal, tests pass a future they control.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
) {
    let fast = proxy.config().start.fast_hits && !proxy.config().start.access_log;
    let handler = {
        let proxy = Arc::clone(&proxy);
        move |request, peer| proxy.handle(request, Some(peer))
    };
    let builder = Arc::new(limited_builder(proxy.config()));
    let connect = move |stream, peer, control: Arc<Control>| {
        let builder = Arc::clone(&builder);
        let handler = handler.clone();
        let control_for_hyper = Arc::clone(&control);
        let handoff = move |io: Prefixed, early: Option<Early>| {
            hyper_connection(&builder, io, handler, peer, control_for_hyper, early)
        };
        if fast {
            FastConnection::new(stream, peer, Arc::clone(&proxy), control, handoff)
        } else {
            FastConnection::hyper_only(stream, handoff)
        }
    };
    accept(listener, connect, shutdown, timeouts).await;
}

/// Hyper's server, holding no more of a request head than the limits need:
/// `Proxy::handle` answers a head over `--max-request-line` or
/// `--max-request-headers` with 414 / 431, and one too large to buffer at
/// all gets hyper's own 431.
fn limited_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let limits = crate::config::HeadLimits::of(config);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(limits.buffer());
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.headers).unwrap_or(u32::MAX));
    builder
}

/// Serves `handler` on `listener` (HTTP/1.1 and HTTP/2) with the graceful
/// shutdown of [`run`].
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let connect = move |stream, peer, control| {
        hyper_connection(&builder, stream, handler.clone(), peer, control, None)
    };
    accept(listener, connect, shutdown, timeouts).await;
}

/// Hyper's connection on `io`, each request counted on `control` as in
/// progress until its answer's body ends. The first request is answered
/// with `early` when the fast path made its answer already.
fn hyper_connection<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    handler: H,
    peer: SocketAddr,
    control: Arc<Control>,
    early: Option<Early>,
) -> impl Future<Output = Result<(), BoxError>> + Graceful + Send + 'static
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // Taken once, by a service hyper calls through `&self` and may move
    // between threads: a std Mutex, never contended (one connection's
    // requests are read one at a time) and never held across an await.
    let early = early.map(|early| Mutex::new(Some(early)));
    let service = service_fn(move |request: Request<Incoming>| {
        let (answer, busy) = match early.as_ref().and_then(|e| take_early(e, &request)) {
            Some(Early { response, busy, .. }) => (Either::Left(ready(response)), busy),
            None => (Either::Right(handler(request, peer)), control.begin()),
        };
        async move { Ok::<_, Infallible>(answer.await.map(|body| Tracked::new(body, busy))) }
    });
    builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned()
}

/// The answer the fast path made for `request`, the first one hyper reads
/// on a connection it handed over: taken at the first request, whatever
/// it is, and used only when that request is the one it answers (the same
/// bytes, read again; anything else is answered afresh).
fn take_early(early: &Mutex<Option<Early>>, request: &Request<Incoming>) -> Option<Early> {
    let early = early.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    let same = request.method() == http::Method::GET
        && request.uri().path_and_query().map(|pq| pq.as_str()) == Some(&*early.target);
    if !same {
        tracing::debug!(target = %early.target, "an early answer not for the request hyper read");
    }
    same.then_some(early)
}

/// Accepts connections until `shutdown` completes, each served by the
/// future `connect` makes, then shuts down as [`run`] says.
async fn accept<M, C, E>(
    listener: TcpListener,
    mut connect: M,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
) where
    M: FnMut(ClientStream, SocketAddr, Arc<Control>) -> C,
    C: Future<Output = Result<(), E>> + Graceful + Send + 'static,
    E: std::fmt::Display,
{
    let connections = Connections::new();
    let tasks = TaskTracker::new();
    let sweeper = tokio::spawn({
        let connections = Arc::clone(&connections);
        let (timeout, write_timeout) = (timeouts.client_header, timeouts.client_write);
        async move { connections.close_idle(timeout, write_timeout).await }
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let registration = connections.open();
        let control = Arc::clone(registration.control());
        let stream = WriteWatched::new(stream, Arc::clone(&control));
        let connection = registration.supervise(connect(stream, peer, control));
        let timeout = timeouts.client_header;
        tasks.spawn(async move {
            match connection.await {
                Ok(Ended::Closed) => {}
                Ok(Ended::Idle) => {
                    tracing::debug!(%peer, timeout_ms = timeout.as_millis() as u64, "closing a connection with no request in progress");
                }
                Ok(Ended::Aborted) => {
                    tracing::debug!(%peer, "closed a connection still open at the shutdown deadline");
                }
                Err(err) => tracing::debug!(error = %err, %peer, "connection ended with an error"),
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = connections.count(),
        "shutting down: no new connections; waiting for in-flight requests"
    );
    connections.finish_all();
    tasks.close();
    tokio::select! {
        () = tasks.wait() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(timeouts.grace) => {
            tracing::warn!(
                grace_ms = timeouts.grace.as_millis() as u64,
                connections = connections.count(),
                "shutdown deadline reached; closing remaining connections"
            );
            connections.abort_all();
            // Each ends at its next poll, which the signal wakes.
            if tokio::time::timeout(ABORT_WAIT, tasks.wait()).await.is_err() {
                tracing::warn!(connections = connections.count(), "connections still open after closing");
            }
        }
    }
    sweeper.abort();
}

/// Completes on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; waiting for Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
