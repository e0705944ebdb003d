//! The open client connections: one with no request in progress for the
//! client header timeout is closed (a slowloris, or a keep-alive connection
//! left idle, as nginx's `client_header_timeout` and `keepalive_timeout`
//! do), and all are asked to finish when the server shuts down.
//!
//! A hit is a few microseconds of work, so what a connection costs on its
//! request path matters: one request is two counter updates on the
//! connection's own memory, and one poll of the connection one atomic load.
//! Two cheaper-looking designs cost more (BENCHMARKS.md):
//! - hyper's `header_read_timeout` arms a timer for every request (-10% on a
//!   hot key);
//! - hyper-util's `GracefulShutdown` and a per-connection `Sleep` are polled
//!   on every wake of the connection; the first locks one mutex shared by
//!   every connection each time, and the second needs a clock read when each
//!   answer ends.
//!
//! Instead one task sweeps every connection a few times per timeout
//! ([`close_idle`]): a connection seen with no request in progress and no
//! answer ended since the sweep before, [`SWEEPS`] sweeps in a row, has been
//! idle for at least the timeout and is told to close. So a connection is
//! closed between the timeout and a quarter more after its last answer
//! ended (or after it opened).
//!
//! Told to close, a connection first closes gracefully, as at shutdown: an
//! HTTP/2 client gets a GOAWAY, an idle HTTP/1 connection closes at once.
//! One still open at the next sweep (a client still sending its request's
//! head, which hyper's graceful close waits for) is dropped.
//!
//! The same sweep enforces the client write deadline: a connection whose
//! answer has not been able to write a byte for `--client-write-timeout`
//! (a client that stopped reading; nginx's `send_timeout`) is dropped, so a
//! slow reader cannot keep an evicted entry's body alive for long. The
//! socket wrapper ([`WriteWatched`]) touches shared state only when a write
//! blocks or unblocks, never on a write that goes through.
//!
//! [`close_idle`]: Connections::close_idle

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;

/// Sweeps per timeout: a connection is closed after between the timeout and
/// `1 + 1 / SWEEPS` times it.
pub const SWEEPS: u32 = 4;

/// `Control::signal` bits.
const FINISH: u8 = 1;
const CLOSE: u8 = 2;
const ABORT: u8 = 4;

/// Every open connection, for the idle sweep and for shutdown.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, Watched>>,
    next_id: AtomicU64,
}

/// A connection as the sweep last saw it.
#[derive(Debug)]
struct Watched {
    control: Arc<Control>,
    /// Answers ended when last swept; `None` before the first sweep.
    ended: Option<u64>,
    /// Sweeps in a row that found the connection idle.
    quiet: u32,
    /// The stall (see [`Control::stalls`]) last seen blocked, and for how
    /// many sweeps in a row.
    stall: u64,
    stalled_sweeps: u32,
}

/// What a connection shares with the sweep: its requests in progress, and
/// the signal the sweep (or shutdown) sends it.
#[derive(Debug, Default)]
pub struct Control {
    /// Requests whose answer has not ended (been sent, or dropped).
    busy: AtomicUsize,
    /// Answers ended so far.
    ended: AtomicU64,
    /// `FINISH`, `CLOSE` and `ABORT` bits.
    signal: AtomicU8,
    /// The connection's task, woken when a signal is sent.
    waker: AtomicWaker,
    /// A write to the client is waiting for the socket to drain.
    write_blocked: AtomicBool,
    /// Writes that have blocked so far: a new stall has a new number.
    stalls: AtomicU64,
    /// Answer bodies whose last frame was handed to hyper and not yet
    /// followed by the next poll: with HTTP/2, a client that stops reading
    /// exhausts its flow-control window and hyper stops polling the body,
    /// though the socket never blocks.
    handed: AtomicUsize,
    /// Frames hyper has come back for after taking one: progress.
    taken: AtomicU64,
}

impl Connections {
    pub fn new() -> Arc<Connections> {
        Arc::new(Connections::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Watched>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection; it is forgotten when the returned
    /// registration is dropped (with the [`Supervised`] connection that
    /// takes it).
    pub fn open(self: &Arc<Self>) -> Registration {
        let id = self.next_id.fetch_add(1, Relaxed);
        let control = Arc::new(Control::default());
        self.lock().insert(
            id,
            Watched {
                control: Arc::clone(&control),
                ended: None,
                quiet: 0,
                stall: 0,
                stalled_sweeps: 0,
            },
        );
        Registration {
            id,
            control,
            connections: Arc::clone(self),
        }
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Tells every connection to finish: answer what is in progress, take
    /// no new request, then close.
    pub fn finish_all(&self) {
        for watched in self.lock().values() {
            watched.control.send(FINISH);
        }
    }

    /// Tells every connection to close now, whatever it is doing: for the
    /// ones still open when shutdown's grace period ends.
    pub fn abort_all(&self) {
        for watched in self.lock().values() {
            watched.control.send(ABORT);
        }
    }

    /// One sweep, every `period` of [`Connections::close_idle`]: drops each
    /// connection whose write has been blocked for more than `write_sweeps`
    /// sweeps; with `check_idle`, tells each connection found idle for the
    /// last [`SWEEPS`] idle checks to close.
    fn sweep(&self, check_idle: bool, write_sweeps: u32) {
        for watched in self.lock().values_mut() {
            let control = &watched.control;
            let stuck = control.write_blocked.load(Acquire) || control.handed.load(Acquire) > 0;
            if stuck {
                // Any write that went through, or frame taken, is progress.
                let stall = control.stalls.load(Relaxed) + control.taken.load(Relaxed);
                if stall == watched.stall {
                    watched.stalled_sweeps += 1;
                } else {
                    watched.stall = stall;
                    watched.stalled_sweeps = 1;
                }
                if watched.stalled_sweeps > write_sweeps {
                    control.send(ABORT);
                    continue;
                }
            } else {
                watched.stalled_sweeps = 0;
            }
            if !check_idle {
                continue;
            }
            // `ended` before `busy`: an answer that ends in between shows in
            // `ended` next time; a request that begins in between is seen by
            // the connection itself before it closes (see `Supervised`).
            let ended = control.ended.load(Acquire);
            let idle = control.busy.load(Acquire) == 0;
            if idle && watched.ended == Some(ended) {
                watched.quiet += 1;
            } else {
                watched.quiet = 0;
            }
            watched.ended = Some(ended);
            if watched.quiet >= SWEEPS {
                // Told again at the next sweep if still idle: see `Supervised`.
                watched.quiet = SWEEPS - 1;
                control.send(CLOSE);
            }
        }
    }

    /// Sweeps every `period`, forever: the smaller of `timeout / SWEEPS`
    /// and `write_timeout / SWEEPS`. A connection idle for `timeout` is
    /// closed (checked every `timeout / SWEEPS`), one whose write has been
    /// blocked for `write_timeout` dropped. Run it as a task and abort it
    /// when serving ends.
    pub async fn close_idle(&self, timeout: Duration, write_timeout: Duration) {
        let idle_period = (timeout / SWEEPS).max(Duration::from_millis(1));
        let period = (write_timeout / SWEEPS)
            .max(Duration::from_millis(1))
            .min(idle_period);
        // Rounded up: an idle connection is never closed before its
        // timeout, nor a blocked one dropped before the write timeout.
        let idle_every = idle_period.as_nanos().div_ceil(period.as_nanos()).max(1);
        let write_sweeps = write_timeout.as_nanos().div_ceil(period.as_nanos()).max(1);
        let write_sweeps = u32::try_from(write_sweeps).unwrap_or(u32::MAX);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is at once
        let mut tick: u128 = 0;
        loop {
            ticks.tick().await;
            tick += 1;
            self.sweep(tick % idle_every == 0, write_sweeps);
        }
    }
}

impl Control {
    fn send(&self, signal: u8) {
        self.signal.fetch_or(signal, Release);
        self.waker.wake();
    }

    /// Marks a request begun; it ends when the guard is dropped (with the
    /// answer's body: see [`Tracked`]). Call it from the connection's own
    /// task (hyper calls the service there, for HTTP/1 and HTTP/2).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Relaxed);
        Busy(Arc::clone(self))
    }
}

/// A client socket whose blocked writes the sweep can see: a write that
/// returns `Pending` marks the connection's [`Control`] blocked (a new
/// stall), the next write that goes through clears it. Writes that go
/// through at once touch nothing shared.
pub struct WriteWatched<S> {
    inner: S,
    control: Arc<Control>,
    blocked: bool,
}

impl<S> WriteWatched<S> {
    pub fn new(inner: S, control: Arc<Control>) -> WriteWatched<S> {
        WriteWatched {
            inner,
            control,
            blocked: false,
        }
    }

    fn note<T>(&mut self, polled: Poll<T>) -> Poll<T> {
        match (&polled, self.blocked) {
            (Poll::Pending, false) => {
                self.blocked = true;
                self.control.stalls.fetch_add(1, Relaxed);
                self.control.write_blocked.store(true, Release);
            }
            (Poll::Ready(_), true) => {
                self.blocked = false;
                self.control.write_blocked.store(false, Release);
            }
            _ => {}
        }
        polled
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteWatched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteWatched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.note(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection's place in [`Connections`].
#[derive(Debug)]
pub struct Registration {
    id: u64,
    control: Arc<Control>,
    connections: Arc<Connections>,
}

impl Registration {
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// `connection`, closed when the sweep finds it idle and finished when
    /// the server shuts down; forgotten when it ends.
    pub fn supervise<C>(self, connection: C) -> Supervised<C> {
        Supervised {
            connection: Box::pin(connection),
            registration: self,
            waker: None,
            shutting_down: false,
            told_idle: false,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// A request in progress on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Control>);

impl Drop for Busy {
    fn drop(&mut self) {
        // Counted before `busy` drops: whoever sees `busy` at zero sees this
        // answer in `ended` too.
        self.0.ended.fetch_add(1, Relaxed);
        self.0.busy.fetch_sub(1, Release);
    }
}

/// How a supervised connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it, or the server after its answers at shutdown.
    Closed,
    /// It had no request in progress for the client header timeout.
    Idle,
    /// Still open when shutdown's grace period ended.
    Aborted,
}

/// A connection future that closes when told to and finishes gracefully
/// when the server shuts down.
pub struct Supervised<C> {
    connection: Pin<Box<C>>,
    registration: Registration,
    /// The waker last registered with `control`: registering again only
    /// when the task's waker changes, or after a signal (whose wake took
    /// it), keeps the poll at one atomic load.
    waker: Option<Waker>,
    /// Hyper's graceful shutdown has been asked for.
    shutting_down: bool,
    /// Told to close while idle.
    told_idle: bool,
}

/// A connection that can be told to finish: answer what is in progress,
/// take no new request, then close.
pub trait Graceful {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Graceful for C {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        GracefulConnection::graceful_shutdown(self);
    }
}

impl<C: Graceful> Supervised<C> {
    fn shut_down(&mut self) {
        if !self.shutting_down {
            self.shutting_down = true;
            self.connection.as_mut().graceful_shutdown();
        }
    }
}

impl<C, E> Future for Supervised<C>
where
    C: Graceful + Future<Output = Result<(), E>>,
{
    type Output = Result<Ended, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let control = &this.registration.control;
        let mut signal = control.signal.load(Acquire);
        let registered = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if signal != 0 || !registered {
            control.waker.register(cx.waker());
            this.waker = Some(cx.waker().clone());
            signal = control.signal.load(Acquire);
        }
        if signal & ABORT != 0 {
            return Poll::Ready(Ok(Ended::Aborted));
        }
        if signal & CLOSE != 0 {
            control.signal.fetch_and(!CLOSE, Relaxed);
            // Requests begin on this task, so none begins before the check
            // below; one that began since the sweep keeps the connection.
            if control.busy.load(Acquire) == 0 {
                if this.told_idle {
                    // Still open a sweep after a graceful close.
                    return Poll::Ready(Ok(Ended::Idle));
                }
                this.told_idle = true;
                this.shut_down();
            }
        }
        if signal & FINISH != 0 {
            this.shut_down();
        }
        let told_idle = this.told_idle;
        this.connection.as_mut().poll(cx).map(|ended| {
            ended.map(|()| {
                if told_idle {
                    Ended::Idle
                } else {
                    Ended::Closed
                }
            })
        })
    }
}

/// An answer's body that ends its request when it is dropped: sent, or its
/// connection gone.
pub struct Tracked<B> {
    body: B,
    busy: Busy,
    /// A frame was handed to hyper and it has not polled since.
    handed: bool,
}

impl<B> Tracked<B> {
    pub fn new(body: B, busy: Busy) -> Tracked<B> {
        Tracked {
            body,
            busy,
            handed: false,
        }
    }

    fn taken(&mut self) {
        if self.handed {
            self.handed = false;
            self.busy.0.handed.fetch_sub(1, Release);
            self.busy.0.taken.fetch_add(1, Relaxed);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.handed {
            self.busy.0.handed.fetch_sub(1, Release);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        this.taken();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.handed = true;
            this.busy.0.handed.fetch_add(1, Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const STEP: Duration = Duration::from_millis(100);

    /// Waits (on paused time) until `control` is told to close; how long
    /// that took, to within `STEP`.
    async fn close_signal(control: &Control, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if control.signal.load(Acquire) & CLOSE != 0 {
                return Some(started.elapsed());
            }
            tokio::time::sleep(STEP).await;
        }
        None
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_told_to_close_only_after_a_timeout_with_no_request() {
        let timeout = Duration::from_secs(60);
        let most = timeout + timeout / SWEEPS + STEP;
        let connections = Connections::new();
        let sweeper = tokio::spawn({
            let connections = Arc::clone(&connections);
            async move { connections.close_idle(timeout, timeout).await }
        });

        // Idle from the start: told to close a timeout after opening, not before.
        let opened = connections.open();
        let control = Arc::clone(opened.control());
        let took = close_signal(&control, most * 2).await.expect("closed");
        assert!(took >= timeout && took <= most, "closed after {took:?}");
        control.signal.store(0, Relaxed);

        // A request in progress keeps it open however long it takes.
        let busy = control.begin();
        assert_eq!(close_signal(&control, timeout * 3).await, None);

        // Once its answer ends, a full timeout of idleness again.
        drop(busy);
        let took = close_signal(&control, most * 2).await.expect("idle again");
        assert!(took >= timeout && took <= most, "closed after {took:?}");
        control.signal.store(0, Relaxed);

        // Still open (a graceful close waiting on a slow client): told
        // again at the next sweep.
        let sweep = timeout / SWEEPS;
        let took = close_signal(&control, sweep * 2).await.expect("told again");
        assert!(took <= sweep + STEP, "told again after {took:?}");
        control.signal.store(0, Relaxed);
        drop(control.begin());

        // Answers ending now and then keep it open.
        for _ in 0..6 {
            tokio::time::sleep(timeout / 2).await;
            drop(control.begin());
            assert_eq!(control.signal.load(Acquire) & CLOSE, 0);
        }

        // Shutdown reaches every open connection; a closed one is forgotten.
        let other = connections.open();
        connections.finish_all();
        assert_eq!(control.signal.load(Acquire) & FINISH, FINISH);
        assert_eq!(other.control().signal.load(Acquire) & FINISH, FINISH);
        connections.abort_all();
        assert_eq!(other.control().signal.load(Acquire) & ABORT, ABORT);
        drop(other);
        assert_eq!(connections.count(), 1);
        sweeper.abort();
    }
}
