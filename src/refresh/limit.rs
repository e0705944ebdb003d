//! How many refreshes may be in flight: a limit that adapts to the backend
//! between a floor and `--refresh-concurrency` (the ceiling).
//!
//! A fixed number of refresh workers is either too few (a backend that
//! could answer more sits idle while stale answers age in the queue:
//! issue 20 measured 560 refreshes where 15,000 were needed) or too many
//! (a backend past its capacity is pushed further). So the limit moves with
//! what the backend shows, as TCP Vegas and Netflix's concurrency-limits
//! do it (read for their ideas; this is our own, smaller):
//!
//! - **Latency against a baseline.** Each refresh that the backend
//!   answered is a latency sample. `recent` is their moving average;
//!   `baseline` the lowest `recent` seen. It rises only while the limit
//!   is at its floor, drifting towards `recent`: latency still past the
//!   tolerance when swr-proxy sends as few refreshes as it may is the
//!   backend's own (it became slower for good), not load, and is learnt
//!   rather than read as overload forever. A baseline that drifted with
//!   every answer learnt the overload it caused: in the `refresh-order`
//!   benchmark (a 100 ms backend of 200 answers/s) it crept up within
//!   seconds and the backend's latency with it, to 570 ms after 60 s.
//! - **Growth.** While `recent` stays within [`TOLERANCE`] times the
//!   baseline, every answer raises the limit: by one while it has never
//!   been cut (slow start: it doubles per round trip), by one per
//!   `limit` answers afterwards (about one per round trip).
//! - **Cuts.** `recent` past the tolerance cuts the limit to [`LATENCY_CUT`]
//!   of itself, a failed refresh (an error, a timeout, a 5xx) to
//!   [`FAILURE_CUT`]; at most one cut per `recent` latency, so one slow
//!   burst is one cut, not one per refresh in it.
//! - A refresh that never reached the backend (no slot within
//!   `--upstream-timeout`) says nothing of it and changes nothing.
//!
//! [`Adaptive`] is the arithmetic, on instants passed in (tests drive it
//! with a clock of their own); [`Gate`] admits refreshes under its limit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Latency up to this many times the baseline counts as an unloaded backend.
pub const TOLERANCE: f64 = 2.0;
/// What a latency cut keeps of the limit.
pub const LATENCY_CUT: f64 = 0.75;
/// What a failure cut keeps of the limit.
pub const FAILURE_CUT: f64 = 0.5;
/// The weight of a new sample in `recent`.
const SMOOTHING: f64 = 0.2;
/// How fast the baseline follows `recent` up while the limit is at its
/// floor: 1/64 of the gap per sample (a few seconds at the floor).
const DRIFT: f64 = 1.0 / 64.0;
/// The floor, unless the ceiling is lower.
pub const FLOOR: usize = 4;
/// The calm after a cut before the first latency is known.
const FIRST_CALM: Duration = Duration::from_millis(100);

/// How a refresh ended, as the limit reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// The backend answered (any status below 500) after this long.
    Answered(Duration),
    /// The backend failed: an error, a timeout, a 5xx.
    Failed,
    /// The backend was never asked.
    NotSent,
}

/// The adaptive limit's state.
#[derive(Debug, Clone)]
pub struct Adaptive {
    limit: f64,
    floor: f64,
    ceiling: f64,
    baseline: Option<Duration>,
    recent: Option<Duration>,
    /// Never cut yet: grow by one per answer.
    slow_start: bool,
    /// No cut before this instant.
    calm_until: Option<Instant>,
}

impl Adaptive {
    /// A limit between [`FLOOR`] (or `ceiling` when lower) and `ceiling`,
    /// starting at the floor.
    pub fn new(ceiling: usize) -> Adaptive {
        let ceiling = ceiling.max(1) as f64;
        let floor = (FLOOR as f64).min(ceiling);
        Adaptive {
            limit: floor,
            floor,
            ceiling,
            baseline: None,
            recent: None,
            slow_start: true,
            calm_until: None,
        }
    }

    /// Refreshes that may be in flight now.
    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The lowest recent latency, drifting up while the limit is at its
    /// floor (see the module doc).
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// The moving average of answered refreshes' latency.
    pub fn recent(&self) -> Option<Duration> {
        self.recent
    }

    /// Takes the outcome of one refresh, which ended at `now`.
    pub fn record(&mut self, sample: Sample, now: Instant) {
        match sample {
            Sample::NotSent => {}
            Sample::Failed => self.cut(FAILURE_CUT, now),
            Sample::Answered(latency) => {
                let recent = match self.recent {
                    None => latency,
                    Some(recent) => recent.mul_f64(1.0 - SMOOTHING) + latency.mul_f64(SMOOTHING),
                };
                self.recent = Some(recent);
                let baseline = match self.baseline {
                    Some(baseline) if baseline <= recent && self.limit <= self.floor => {
                        baseline + (recent - baseline).mul_f64(DRIFT)
                    }
                    Some(baseline) if baseline <= recent => baseline,
                    _ => recent,
                };
                self.baseline = Some(baseline);
                if recent.as_secs_f64() > baseline.as_secs_f64() * TOLERANCE {
                    self.cut(LATENCY_CUT, now);
                } else {
                    let step = if self.slow_start {
                        1.0
                    } else {
                        1.0 / self.limit
                    };
                    self.limit = (self.limit + step).min(self.ceiling);
                }
            }
        }
    }

    fn cut(&mut self, keep: f64, now: Instant) {
        if self.calm_until.is_some_and(|until| now < until) {
            return;
        }
        self.slow_start = false;
        self.limit = (self.limit * keep).max(self.floor);
        self.calm_until = Some(now + self.recent.unwrap_or(FIRST_CALM));
    }
}

/// Admits refreshes while fewer than the adaptive limit are in flight.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    /// Wakes one waiting worker per slot a finished refresh frees (its own,
    /// and one more when its answer raised the limit): waking every
    /// waiter, up to `--refresh-concurrency` of them, per refresh would
    /// have all but one go back to sleep.
    freed: Notify,
}

#[derive(Debug)]
struct GateState {
    adaptive: Adaptive,
    running: usize,
}

impl Gate {
    pub fn new(ceiling: usize) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                adaptive: Adaptive::new(ceiling),
                running: 0,
            }),
            freed: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a refresh may start; it counts as in flight until the
    /// permit is finished or dropped.
    pub async fn admit(self: &Arc<Self>) -> Permit {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut state = self.state();
                if state.running < state.adaptive.limit() {
                    state.running += 1;
                    return Permit {
                        gate: Arc::clone(self),
                        sample: Sample::NotSent,
                    };
                }
            }
            freed.await;
        }
    }

    /// The most refreshes it may ever admit at once.
    pub fn ceiling(&self) -> usize {
        self.state().adaptive.ceiling as usize
    }

    /// Refreshes admitted and not yet finished.
    pub fn running(&self) -> usize {
        self.state().running
    }

    /// The limit, and the latencies it was set from.
    pub fn snapshot(&self) -> Adaptive {
        self.state().adaptive.clone()
    }
}

/// A refresh in flight under the [`Gate`]; its sample is recorded when it
/// is dropped (a refresh that panicked or was cancelled records nothing).
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    sample: Sample,
}

impl Permit {
    /// How the refresh ended.
    pub fn finish(mut self, sample: Sample) {
        self.sample = sample;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let free = {
            let mut state = self.gate.state();
            state.running = state.running.saturating_sub(1);
            state.adaptive.record(self.sample, Instant::now());
            state.adaptive.limit().saturating_sub(state.running)
        };
        // A notification with no waiter is kept for the next one, which
        // checks the limit again: one spare wake-up at most.
        for _ in 0..free.min(2) {
            self.gate.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `n` answers of `latency`, one per millisecond from `*now`.
    fn answers(limit: &mut Adaptive, now: &mut Instant, n: usize, latency: Duration) {
        for _ in 0..n {
            *now += MS;
            limit.record(Sample::Answered(latency), *now);
        }
    }

    #[test]
    fn the_limit_grows_to_the_ceiling_on_a_fast_backend() {
        let mut limit = Adaptive::new(256);
        let mut now = Instant::now();
        assert_eq!(limit.limit(), FLOOR, "starts at the floor");
        answers(&mut limit, &mut now, 50, 100 * MS);
        assert_eq!(limit.limit(), FLOOR + 50, "slow start: one per answer");
        answers(&mut limit, &mut now, 1000, 100 * MS);
        assert_eq!(limit.limit(), 256, "never past the ceiling");
        assert_eq!(limit.baseline(), Some(100 * MS));
    }

    #[test]
    fn the_limit_shrinks_when_the_backend_slows_and_grows_slowly_after() {
        let mut limit = Adaptive::new(256);
        let mut now = Instant::now();
        answers(&mut limit, &mut now, 200, 100 * MS);
        let before = limit.limit();
        assert_eq!(before, 204);
        // The backend slows to 5x: the average passes 2x the baseline.
        answers(&mut limit, &mut now, 5, 500 * MS);
        let cut = limit.limit();
        assert_eq!(cut, (204.0 * LATENCY_CUT) as usize, "one cut");
        // Within the calm after the cut (the recent latency, ~250 ms here),
        // more slow answers cut nothing more.
        answers(&mut limit, &mut now, 20, 500 * MS);
        assert_eq!(limit.limit(), cut);
        // Past it, the next slow answers cut again, down to the floor at most.
        for _ in 0..40 {
            now += Duration::from_secs(1);
            limit.record(Sample::Answered(500 * MS), now);
        }
        assert_eq!(limit.limit(), FLOOR, "at the floor, not below");
        // Fast again: growth is one per `limit` answers now, not slow start.
        answers(&mut limit, &mut now, 100, 100 * MS);
        assert!(limit.limit() < FLOOR + 100, "{}", limit.limit());
        assert!(limit.limit() > FLOOR, "{}", limit.limit());
    }

    #[test]
    fn failures_cut_by_half_once_per_latency() {
        let mut limit = Adaptive::new(256);
        let mut now = Instant::now();
        answers(&mut limit, &mut now, 96, 50 * MS);
        assert_eq!(limit.limit(), 100);
        limit.record(Sample::Failed, now);
        assert_eq!(limit.limit(), 50);
        now += 10 * MS;
        limit.record(Sample::Failed, now);
        assert_eq!(limit.limit(), 50, "a burst of failures is one cut");
        now += 100 * MS;
        limit.record(Sample::Failed, now);
        assert_eq!(limit.limit(), 25);
        // A refresh that never reached the backend changes nothing.
        limit.record(Sample::NotSent, now + Duration::from_secs(5));
        assert_eq!(limit.limit(), 25);
    }

    #[test]
    fn a_backend_slower_for_good_is_learnt_again() {
        let mut limit = Adaptive::new(64);
        let mut now = Instant::now();
        answers(&mut limit, &mut now, 60, 20 * MS);
        // From now on the backend takes 3x as long, whatever the load.
        for _ in 0..3000 {
            now += 10 * MS;
            limit.record(Sample::Answered(60 * MS), now);
        }
        let baseline = limit.baseline().expect("a baseline");
        assert!(
            baseline.mul_f64(TOLERANCE) >= 60 * MS,
            "the baseline followed until 60 ms is no longer overload: {baseline:?}"
        );
        assert_eq!(limit.limit(), 64, "and the limit grew back to the ceiling");
    }

    #[test]
    fn a_loaded_backend_does_not_raise_its_own_baseline() {
        // 100 ms unloaded, 200 answers a second at most: past 20 in
        // flight, each one more waits its turn (latency = in flight / 200/s).
        let latency = |in_flight: f64| Duration::from_secs_f64((in_flight / 200.0).max(0.1));
        let mut limit = Adaptive::new(256);
        let mut now = Instant::now();
        let mut worst = Duration::ZERO;
        for i in 0..20_000 {
            let took = latency(limit.limit() as f64);
            if i > 10_000 {
                worst = worst.max(limit.recent().unwrap_or_default());
            }
            now += Duration::from_secs_f64(1.0 / 200.0);
            limit.record(Sample::Answered(took), now);
        }
        let baseline = limit.baseline().expect("a baseline");
        assert!(baseline < 110 * MS, "the baseline stayed put: {baseline:?}");
        assert!(
            worst < 300 * MS,
            "latency kept near the tolerance (2x), 100 s in: {worst:?}"
        );
        assert!(
            limit.limit() >= 20,
            "the backend is kept busy: {}",
            limit.limit()
        );
    }

    #[test]
    fn a_ceiling_below_the_floor_is_the_limit() {
        let mut limit = Adaptive::new(1);
        let mut now = Instant::now();
        assert_eq!(limit.limit(), 1);
        answers(&mut limit, &mut now, 10, MS);
        limit.record(Sample::Failed, now);
        assert_eq!(limit.limit(), 1);
    }

    #[tokio::test]
    async fn the_gate_admits_up_to_the_limit_and_wakes_a_waiter() {
        let gate = Gate::new(256);
        let mut permits = Vec::new();
        for _ in 0..FLOOR {
            permits.push(gate.admit().await);
        }
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the limit is reached");
        permits
            .pop()
            .expect("a permit")
            .finish(Sample::Answered(MS));
        let admitted = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(admitted.is_ok(), "a finished refresh lets the next in");
        assert_eq!(
            gate.snapshot().limit(),
            FLOOR + 1,
            "and its answer grew the limit"
        );
    }
}
