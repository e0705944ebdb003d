//! Sampling on the hit path: "one answer in about [`MEAN_GAP`]", at random
//! gaps, per thread, so a hot key does not make two cores write the same
//! counters on every hit.
//!
//! The gap between two samples is uniform in 1..=2·[`MEAN_GAP`]−1. A fixed
//! gap (every 16th answer, as before) phase-locks with periodic traffic: a
//! connection that always asks /a then /b had every sample land on the same
//! one of the two, so the other was never counted, never refreshed ahead
//! and never listed among the top keys. An answer that is not sampled costs
//! one thread-local decrement; the random number is drawn only per sample.

use std::cell::Cell;
use std::hash::BuildHasher;

/// Answers per sample, on average; a sample stands for this many answers.
pub const MEAN_GAP: u32 = 16;

/// Answers until the next sample, for one thread and one use. Declare it in
/// a `thread_local!` per use: two uses sharing one would each see every
/// other sample.
pub struct Countdown(Cell<u32>);

impl Countdown {
    pub const fn new() -> Countdown {
        // 0: no gap drawn yet (the thread's first answer draws one).
        Countdown(Cell::new(0))
    }

    /// Whether this answer is sampled.
    #[inline]
    pub fn due(&self) -> bool {
        match self.0.get() {
            0 => {
                self.0.set(gap());
                false
            }
            1 => {
                self.0.set(gap());
                true
            }
            n => {
                self.0.set(n - 1);
                false
            }
        }
    }
}

impl Default for Countdown {
    fn default() -> Countdown {
        Countdown::new()
    }
}

/// A gap uniform in 1..=2·[`MEAN_GAP`]−1, from a per-thread xorshift64
/// seeded from the standard library's per-thread random hash keys.
#[cold]
fn gap() -> u32 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            // `| 1`: xorshift must not start at 0.
            std::collections::hash_map::RandomState::new().hash_one(0u64) | 1,
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
    1 + ((x >> 32) % u64::from(2 * MEAN_GAP - 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_uniform_with_the_mean_gap() {
        let max = 2 * MEAN_GAP - 1;
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
        assert!((mean - f64::from(MEAN_GAP)).abs() < 0.3, "mean gap {mean}");
    }

    #[test]
    fn one_answer_in_about_mean_gap_is_sampled() {
        let countdown = Countdown::new();
        let answers = 32_000;
        let samples = (0..answers).filter(|_| countdown.due()).count();
        // 2,000 expected; the gaps' spread moves it by about 1%.
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
