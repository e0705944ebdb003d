//! Sampling on the hit path: about one answer in [`MEAN_GAP`] per thread,
//! at random gaps, so a hot key does not make two cores write the same
//! counters on every answer.
//!
//! The gap between two samples is uniform in 1..=2·[`MEAN_GAP`]−1: bounded
//! (never more than 31 answers between samples) and drawn without floating
//! point. A fixed gap phase-locks with periodic traffic: with a connection
//! that asks /a then /b, every 16th answer is always the same one of the
//! two, and the other is never counted, never refreshed ahead and never
//! listed among the top keys. An answer that is not sampled costs one
//! thread-local decrement; the random number is drawn only per sample.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};

/// Answers per sample, on average; a sample stands for this many answers.
pub const MEAN_GAP: u64 = 16;

/// Answers until the next sample, for one thread and one use. Declare it in
/// a `thread_local!` per use: two uses sharing one would split its samples,
/// and each would count half of what it sees.
#[derive(Debug, Default)]
pub struct Countdown(Cell<u32>);

impl Countdown {
    /// Starts at 0, "no gap drawn yet": `new` is `const` (for
    /// `thread_local!`'s `const` initializer), so it cannot draw one; the
    /// thread's first answer does, and is not sampled.
    pub const fn new() -> Countdown {
        Countdown(Cell::new(0))
    }

    /// Whether this answer is sampled.
    #[inline]
    pub fn due(&self) -> bool {
        self.due_drawing(gap)
    }

    /// [`Countdown::due`] with the gaps drawn by `draw`: the sampled answer
    /// is the one the last gap counted down to.
    #[inline]
    fn due_drawing(&self, draw: impl FnOnce() -> u32) -> bool {
        let left = self.0.get();
        if left > 1 {
            self.0.set(left - 1);
            false
        } else {
            self.0.set(draw());
            left == 1
        }
    }
}

/// A gap uniform in 1..=2·[`MEAN_GAP`]−1, from a per-thread xorshift64
/// seeded from the standard library's per-thread random hash keys. Cold
/// (once per sample): kept out of line, so [`Countdown::due`] inlines to a
/// decrement and a branch.
#[cold]
fn gap() -> u32 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            // `| 1`: xorshift must not start at 0.
            RandomState::new().hash_one(0u64) | 1,
        );
    }
    let x = STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    });
    // The high 32 bits; the modulo's bias over 2^32 values is below 1e-8.
    1 + ((x >> 32) % (2 * MEAN_GAP - 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_uniform_with_the_mean_gap() {
        let max = 2 * MEAN_GAP as u32 - 1;
        let draws = 1000 * max;
        let mut seen = vec![0u32; max as usize + 1];
        for _ in 0..draws {
            seen[gap() as usize] += 1;
        }
        assert_eq!(seen[0], 0);
        for (value, count) in seen.iter().enumerate().skip(1) {
            // 1,000 expected, standard deviation about 31.
            assert!((800..=1200).contains(count), "{value} drawn {count} times");
        }
        let mean = seen
            .iter()
            .enumerate()
            .map(|(v, c)| v as f64 * f64::from(*c))
            .sum::<f64>()
            / f64::from(draws);
        assert!((mean - MEAN_GAP as f64).abs() < 0.3, "mean gap {mean}");
    }

    #[test]
    fn the_answer_a_gap_counts_down_to_is_sampled() {
        // The first answer draws 1 (and is not sampled); the gaps 2, 31
        // and 5 follow the samples at answers 2, 4 and 35. A gap counted
        // one answer long (mean 17, weight 16: every count 6% low) moves
        // them.
        let countdown = Countdown::new();
        let mut gaps = [1, 2, 31, 5].into_iter();
        let sampled: Vec<usize> = (1..=40)
            .filter(|_| countdown.due_drawing(|| gaps.next().unwrap_or(99)))
            .collect();
        assert_eq!(sampled, [2, 4, 35, 40]);
    }

    #[test]
    fn one_answer_in_about_mean_gap_is_sampled() {
        let countdown = Countdown::new();
        let answers = 32_000;
        let samples = (0..answers).filter(|_| countdown.due()).count();
        // 2,000 expected; the gaps' spread moves it by about 1.25%.
        assert!((1800..=2200).contains(&samples), "{samples} of {answers}");
    }

    #[test]
    fn every_position_of_a_cycle_is_sampled() {
        // With a fixed gap of 16, a cycle of 2, 4 or 16 answers had every
        // sample on one position.
        for cycle in [2usize, 4, 16] {
            let countdown = Countdown::new();
            let mut per_position = vec![0u32; cycle];
            for answer in 0..cycle * 3200 {
                if countdown.due() {
                    per_position[answer % cycle] += 1;
                }
            }
            // 200 expected per position.
            for (position, samples) in per_position.iter().enumerate() {
                assert!(
                    (100..=300).contains(samples),
                    "position {position} of {cycle}: {samples} samples"
                );
            }
        }
    }
}
