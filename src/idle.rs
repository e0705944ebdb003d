//! Closing client connections that have no request in progress for too
//! long: a client slower than the timeout to send a request's headers (a
//! slowloris), or a keep-alive connection left idle, is disconnected, as
//! nginx's `client_header_timeout` and `keepalive_timeout` do.
//!
//! hyper can do this for HTTP/1 (`header_read_timeout`), but it arms a new
//! timer for every request, which cost a hot key about 10% of its
//! throughput (BENCHMARKS.md). Here a connection has one timer, which
//! sleeps until the connection could first be overdue; a request costs two
//! counter updates on the connection's own memory and one clock read when
//! its answer ends. The timer also covers HTTP/2: a connection with no
//! stream open for the timeout is closed.

use std::pin::Pin;
use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// One connection's requests in progress, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Requests whose answer has not ended (been sent, or dropped).
    busy: AtomicUsize,
    /// When the last answer ended, in nanoseconds since `opened`.
    idle_since: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
        })
    }

    /// Marks a request begun; it ends when the guard is dropped (with the
    /// answer's body: see [`Tracked`]).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Relaxed);
        Busy(Arc::clone(self))
    }

    /// When the connection will have been idle for `timeout`, if it is idle.
    fn overdue_at(&self, timeout: Duration) -> Option<Instant> {
        if self.busy.load(Acquire) > 0 {
            return None;
        }
        let since = Duration::from_nanos(self.idle_since.load(Relaxed));
        Some(self.opened + since + timeout)
    }
}

/// A request in progress on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        let since = u64::try_from(activity.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Stored before the count drops: whoever sees the count at zero
        // sees this instant too.
        activity.idle_since.store(since, Relaxed);
        activity.busy.fetch_sub(1, Release);
    }
}

/// Completes once the connection has had no request in progress for
/// `timeout`: from when it opened, or from when its last answer ended.
pub async fn idle_for(activity: &Activity, timeout: Duration) {
    loop {
        let wake = activity
            .overdue_at(timeout)
            .unwrap_or_else(|| Instant::now() + timeout);
        tokio::time::sleep_until(wake).await;
        if activity
            .overdue_at(timeout)
            .is_some_and(|at| at <= Instant::now())
        {
            return;
        }
    }
}

/// An answer's body that ends its request when it is dropped: sent, or its
/// connection gone.
pub struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B> Tracked<B> {
    pub fn new(body: B, busy: Busy) -> Tracked<B> {
        Tracked { body, _busy: busy }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
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

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_request_in_progress() {
        let timeout = Duration::from_secs(60);
        let activity = Activity::new();
        let opened = Instant::now();

        // Idle from the start: overdue a timeout after opening.
        let limit = timeout * 10;
        tokio::time::timeout(limit, idle_for(&activity, timeout))
            .await
            .expect("an idle connection is overdue");
        assert_eq!(Instant::now() - opened, timeout);

        // A request in progress keeps it open however long it takes.
        let busy = activity.begin();
        let started = Instant::now();
        let watch = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { idle_for(&activity, timeout).await }
        });
        tokio::time::sleep(timeout * 3).await;
        assert!(
            !watch.is_finished(),
            "closed while a request was in progress"
        );

        // Once its answer ends, a full timeout of idleness again.
        drop(busy);
        let ended = Instant::now();
        tokio::time::timeout(limit, watch)
            .await
            .expect("idle again after the answer")
            .expect("the watch ends");
        assert!(Instant::now() - ended >= timeout);
        assert!(Instant::now() - started >= timeout * 4);
    }
}
