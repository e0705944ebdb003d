//! Where log lines go, and how many there are.
//!
//! Whoever logs (a request's access line, a refresh, the shutdown) formats
//! its line on its own thread and hands it to a bounded queue without
//! waiting; one thread of its own (`swr-log`) takes lines from the queue and
//! writes them to stderr. When the sink stalls (a stuck log shipper, a
//! throttled journald, a full disk behind a redirect and a blocked container
//! log driver all look like a `write` that never returns), the queue fills
//! and further lines are dropped and counted (`swr_log_lines_dropped_total`),
//! never waited for. Before this, a stalled stderr pipe stopped every answer
//! and SIGTERM with it (issue 21). Varnish makes the same trade with its
//! shared-memory log: readers may fall behind and lose records, the server
//! never waits for them.
//!
//! The queue is bounded in lines and in bytes, since a line carries a URL or
//! an error of any length. A line that does not fit is dropped whole: a
//! reader never sees half a line.
//!
//! Our own writer on std's `sync_channel` rather than tracing-appender's
//! lossy `non_blocking`: that one counts drops too (`ErrorCounter`), but its
//! queue is bounded in lines only, and its guard, dropped while the queue is
//! full, reports it with `println!`, a write that blocks on a stalled stdout
//! (which container log drivers often share with stderr). The guard here
//! waits a bounded time and writes nothing itself, and the whole writer is a
//! few dozen lines with no new dependency.
//!
//! Also here, what keeps the volume down at info: failure lines rate-limited
//! per cause ([`RateLimit`]) and the periodic summary ([`Summary`]).

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting for the writer thread, at most: about two seconds of an
/// access log at 4,000 answers a second, before lines are dropped.
pub const QUEUE_LINES: usize = 8192;
/// Bytes waiting for the writer thread, at most.
pub const QUEUE_BYTES: usize = 2 << 20;
/// The writer thread writes what it has taken from the queue once it holds
/// this much, or the queue is empty: one system call for many lines.
const BATCH_BYTES: usize = 64 << 10;
/// A flush gives up when the sink has written nothing for this long: it is
/// stalled, and waiting longer would hold up the exit for nothing.
const STALLED: Duration = Duration::from_millis(500);
/// How often a waiting flush looks at the writer's progress.
const POLL: Duration = Duration::from_millis(10);
/// The longest a [`LogGuard`] waits for the queue to be written when dropped.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Lines dropped by every writer in the process: the queue was full, or
/// the sink refused them.
static LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far (`swr_log_lines_dropped_total`).
pub fn lines_dropped() -> u64 {
    LINES_DROPPED.load(Relaxed)
}

enum Msg {
    Line(Vec<u8>),
    /// Write everything before this, flush the sink, then answer.
    Flush(SyncSender<()>),
}

/// What the senders and the writer thread share.
#[derive(Debug)]
struct Shared {
    /// Bytes of the lines in the queue.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Writes the writer thread has finished: a flush sees the sink move.
    writes: AtomicU64,
    /// This writer's dropped lines (also added to [`LINES_DROPPED`]).
    dropped: AtomicU64,
}

impl Shared {
    fn drop_lines(&self, lines: u64) {
        self.dropped.fetch_add(lines, Relaxed);
        LINES_DROPPED.fetch_add(lines, Relaxed);
    }
}

/// Hands lines to the writer thread without waiting: the `MakeWriter` the
/// tracing subscriber writes its events through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogWriter {
    /// std's bounded channel: `try_send` never waits, and the writer thread
    /// blocks in `recv` (a tokio channel would need a runtime there).
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

/// Flushes the queue, a bounded time, when dropped (at the process's exit).
#[derive(Debug)]
pub struct LogGuard {
    writer: LogWriter,
}

/// Starts the writer thread over `sink`, with a queue of at most
/// `max_lines` lines and `max_bytes` bytes.
pub fn start(
    sink: impl Write + Send + 'static,
    max_lines: usize,
    max_bytes: usize,
) -> io::Result<(LogWriter, LogGuard)> {
    let (tx, rx) = mpsc::sync_channel(max_lines.max(1));
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        writes: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    let thread_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("swr-log".into())
        .spawn(move || write_lines(&rx, sink, &thread_shared))?;
    let writer = LogWriter { tx, shared };
    let guard = LogGuard {
        writer: writer.clone(),
    };
    Ok((writer, guard))
}

impl LogWriter {
    /// Queues one whole line, or drops and counts it if the queue is full.
    pub fn send(&self, line: Vec<u8>) {
        let len = line.len();
        let queued = self.shared.queued_bytes.fetch_add(len, Relaxed) + len;
        if queued > self.shared.max_bytes {
            self.shared.queued_bytes.fetch_sub(len, Relaxed);
            self.shared.drop_lines(1);
            return;
        }
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.shared.queued_bytes.fetch_sub(len, Relaxed);
            self.shared.drop_lines(1);
        }
    }

    /// Lines this writer has dropped.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            to: self,
            text: Vec::new(),
        }
    }
}

/// One event's text, queued whole when the subscriber drops it.
/// tracing-subscriber formats an event into one buffer and writes it with
/// one `write_all`, so this costs one allocation, of the line's size.
#[derive(Debug)]
pub struct Line<'a> {
    to: &'a LogWriter,
    text: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if !self.text.is_empty() {
            self.to.send(std::mem::take(&mut self.text));
        }
    }
}

impl LogGuard {
    /// Queues `text` as a line of its own (a message outside tracing, such
    /// as why the process failed), without waiting.
    pub fn print(&self, text: &str) {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.writer.send(line);
    }

    /// Waits until the lines queued before this call are written and the
    /// sink flushed, for at most `limit`, and less when the sink makes no
    /// progress for half a second (it is stalled). Whether they were.
    pub fn flush(&self, limit: Duration) -> bool {
        let shared = &self.writer.shared;
        let started = Instant::now();
        let mut last_writes = shared.writes.load(Relaxed);
        let mut moved_at = started;
        // Whether to give up: past `limit`, or no write finished lately.
        let mut give_up = || {
            let now = Instant::now();
            let writes = shared.writes.load(Relaxed);
            if writes != last_writes {
                last_writes = writes;
                moved_at = now;
            }
            now.duration_since(started) >= limit || now.duration_since(moved_at) >= STALLED
        };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let mut flush = Msg::Flush(done_tx);
        loop {
            match self.writer.tx.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if !give_up() => {
                    flush = again;
                    std::thread::sleep(POLL);
                }
                Err(_) => return false,
            }
        }
        loop {
            match done_rx.recv_timeout(POLL) {
                Ok(()) => return true,
                Err(RecvTimeoutError::Timeout) if !give_up() => {}
                Err(_) => return false,
            }
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.flush(EXIT_FLUSH);
    }
}

/// The writer thread: takes lines from the queue, writes them in batches,
/// until every sender is gone. A write the sink refuses (its reader closed
/// the pipe) counts the batch's lines as dropped.
fn write_lines(rx: &Receiver<Msg>, mut sink: impl Write, shared: &Shared) {
    let mut batch = Batch {
        bytes: Vec::with_capacity(BATCH_BYTES),
        lines: 0,
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    shared.queued_bytes.fetch_sub(line.len(), Relaxed);
                    batch.bytes.extend_from_slice(&line);
                    batch.lines += 1;
                    if batch.bytes.len() >= BATCH_BYTES {
                        batch.write(&mut sink, shared);
                    }
                }
                Msg::Flush(done) => {
                    batch.write(&mut sink, shared);
                    let _ = sink.flush();
                    let _ = done.try_send(());
                }
            }
            next = rx.try_recv().ok();
        }
        batch.write(&mut sink, shared);
    }
}

/// Lines taken from the queue and not yet written.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

impl Batch {
    fn write(&mut self, sink: &mut impl Write, shared: &Shared) {
        if self.lines == 0 {
            return;
        }
        if sink.write_all(&self.bytes).is_err() {
            shared.drop_lines(self.lines);
        }
        shared.writes.fetch_add(1, Relaxed);
        self.bytes.clear();
        self.lines = 0;
    }
}

/// What a failure line is about: what failed, and how (a static pair, so
/// the set of causes, and the map of them, stays small).
pub type Cause = (&'static str, &'static str);

/// Lets one line per cause through every `every` and counts the rest: a
/// failure that repeats on every request or refresh (the backend is down)
/// writes one line per cause per interval, which says how many like it
/// were not written since the last.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    /// A std `Mutex`: taken on failure paths only, for one map operation.
    causes: Mutex<HashMap<Cause, Window>>,
    /// Lines suppressed so far, every cause.
    suppressed: AtomicU64,
}

#[derive(Debug)]
struct Window {
    written_at: Instant,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            causes: Mutex::new(HashMap::new()),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: write the line, and say that `n` lines of this cause were
    /// suppressed since the last one written. `None`: don't (it is counted).
    pub fn admit(&self, cause: Cause, now: Instant) -> Option<u64> {
        let mut causes = self.causes.lock().unwrap_or_else(|e| e.into_inner());
        match causes.get_mut(&cause) {
            Some(window) if now.saturating_duration_since(window.written_at) < self.every => {
                window.suppressed += 1;
                self.suppressed.fetch_add(1, Relaxed);
                None
            }
            Some(window) => {
                window.written_at = now;
                Some(std::mem::take(&mut window.suppressed))
            }
            None => {
                causes.insert(
                    cause,
                    Window {
                        written_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// Lines suppressed so far, every cause.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Relaxed)
    }
}

/// Totals the periodic summary line reports the change of.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub refreshed: u64,
    pub refresh_failed: u64,
    /// Refreshes not queued: the queue was full.
    pub refresh_dropped: u64,
    pub log_lines_dropped: u64,
    pub failure_lines_suppressed: u64,
}

impl Totals {
    fn since(self, last: Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(last.requests),
            refreshed: self.refreshed.saturating_sub(last.refreshed),
            refresh_failed: self.refresh_failed.saturating_sub(last.refresh_failed),
            refresh_dropped: self.refresh_dropped.saturating_sub(last.refresh_dropped),
            log_lines_dropped: self
                .log_lines_dropped
                .saturating_sub(last.log_lines_dropped),
            failure_lines_suppressed: self
                .failure_lines_suppressed
                .saturating_sub(last.failure_lines_suppressed),
        }
    }
}

/// The periodic summary at info: what happened since the last one, so that
/// info shows the refresh traffic without a line per refresh.
#[derive(Debug, Default)]
pub struct Summary {
    last: Totals,
}

impl Summary {
    /// The change since the last call, or `None` when nothing happened (an
    /// idle proxy writes no summaries).
    pub fn next(&mut self, now: Totals) -> Option<Totals> {
        let change = now.since(self.last);
        self.last = now;
        (change != Totals::default()).then_some(change)
    }

    /// Logs the change since the last call, unless nothing happened.
    pub fn log(&mut self, now: Totals) {
        if let Some(change) = self.next(now) {
            tracing::info!(
                requests = change.requests,
                refreshed = change.refreshed,
                refresh_failed = change.refresh_failed,
                refresh_dropped = change.refresh_dropped,
                log_lines_dropped = change.log_lines_dropped,
                failure_lines_suppressed = change.failure_lines_suppressed,
                "summary"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that writes into a channel; a stalled one says when its first
    /// write begins, and blocks it until `open` is sent (a stalled pipe).
    struct Sink {
        lines: mpsc::Sender<Vec<u8>>,
        stall: Option<(mpsc::Sender<()>, Receiver<()>)>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some((entered, gate)) = self.stall.take() {
                let _ = entered.send(());
                let _ = gate.recv();
            }
            let _ = self.lines.send(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The sink, what it wrote, and for a stalled one: a receiver told when
    /// the writer is stuck in its first write, and the sender that ends it.
    type Stall = (Receiver<()>, mpsc::Sender<()>);

    fn sink(stalled: bool) -> (Sink, Receiver<Vec<u8>>, Option<Stall>) {
        let (lines, written) = mpsc::channel();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (open, gate) = mpsc::channel();
        let sink = Sink {
            lines,
            stall: stalled.then_some((entered_tx, gate)),
        };
        (sink, written, stalled.then_some((entered_rx, open)))
    }

    fn written(rx: &Receiver<Vec<u8>>) -> String {
        let mut text = Vec::new();
        while let Ok(bytes) = rx.try_recv() {
            text.extend_from_slice(&bytes);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    #[test]
    fn lines_are_written_in_order_and_flushed() {
        let (sink, rx, _) = sink(false);
        let (writer, guard) = start(sink, 16, 1 << 20).expect("thread starts");
        for i in 0..10 {
            writer.send(format!("line {i}\n").into_bytes());
        }
        guard.print("swr-proxy: the end");
        assert!(guard.flush(Duration::from_secs(10)));
        let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(written(&rx), format!("{expected}swr-proxy: the end\n"));
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_and_flush_gives_up() {
        let (sink, rx, stall) = sink(true);
        let (entered, open) = stall.expect("stalled");
        let (writer, guard) = start(sink, 4, 1 << 20).expect("thread starts");
        writer.send(b"line 0\n".to_vec());
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer is stuck in its first write");
        let started = Instant::now();
        for i in 1..100 {
            writer.send(format!("line {i}\n").into_bytes());
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "sending never waits"
        );
        assert_eq!(writer.dropped(), 95, "the queue holds 4 lines");
        assert!(lines_dropped() >= 95);
        let started = Instant::now();
        assert!(!guard.flush(Duration::from_secs(30)), "the sink is stalled");
        assert!(
            started.elapsed() < STALLED + Duration::from_secs(2),
            "flush gave up after {:?}",
            started.elapsed()
        );
        // The sink moves again: what was queued is written, in order.
        let _ = open.send(());
        assert!(guard.flush(Duration::from_secs(10)));
        assert_eq!(written(&rx), "line 0\nline 1\nline 2\nline 3\nline 4\n");
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let (sink, _rx, stall) = sink(true);
        let (entered, open) = stall.expect("stalled");
        let (writer, _guard) = start(sink, 1000, 100).expect("thread starts");
        writer.send(vec![b'x'; 10]);
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer is stuck in its first write");
        writer.send(vec![b'a'; 60]);
        writer.send(vec![b'b'; 60]);
        assert_eq!(writer.dropped(), 1, "60 + 60 is over 100 bytes");
        writer.send(vec![b'c'; 40]);
        assert_eq!(writer.dropped(), 1, "60 + 40 fits");
        drop(open);
    }

    #[test]
    fn one_line_per_cause_per_interval_with_the_count_suppressed() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let cause = ("refresh failed", "connect");
        assert_eq!(limit.admit(cause, t0), Some(0));
        assert_eq!(limit.admit(cause, t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.admit(cause, t0 + Duration::from_secs(9)), None);
        assert_eq!(
            limit.admit(("refresh failed", "timeout"), t0),
            Some(0),
            "another cause has its own window"
        );
        assert_eq!(limit.admit(cause, t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(limit.admit(cause, t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.suppressed(), 3);
    }

    #[test]
    fn the_summary_reports_changes_and_skips_idle_intervals() {
        let mut summary = Summary::default();
        let mut totals = Totals {
            requests: 100,
            refreshed: 10,
            ..Totals::default()
        };
        assert_eq!(summary.next(totals), Some(totals));
        assert_eq!(summary.next(totals), None, "nothing happened");
        totals.refresh_failed = 3;
        totals.log_lines_dropped = 7;
        assert_eq!(
            summary.next(totals),
            Some(Totals {
                refresh_failed: 3,
                log_lines_dropped: 7,
                ..Totals::default()
            })
        );
    }
}
