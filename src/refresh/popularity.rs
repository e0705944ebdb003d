//! How often each key is asked for: a decayed request count per key, in
//! fixed memory, read to order refreshes ([`super`]) and to pick the keys
//! worth refreshing before they turn stale (refresh-ahead).
//!
//! A count-min sketch (Cormode and Muthukrishnan; the frequency sketch of
//! TinyLFU and Caffeine works the same way): four rows of 65,536 16-bit
//! counters (512 KiB, whatever the number of keys), a key's counters picked
//! by four slices of its hash, its estimate the smallest of the four. Each
//! record raises only the counters at that smallest value ("conservative
//! update"), so keys that share a counter with a hot key are overestimated
//! less. Every [`DECAY_EVERY`] the counters are halved: a count is about
//! the requests of the last minute or two, and a key that was hot an hour
//! ago is not hot now.
//!
//! The hit path records about one answer in [`SAMPLE`] per thread, at
//! random gaps ([`crate::sampling`]), weighted by [`SAMPLE`], so a hot key
//! does not make two cores write the same counters on every hit. Estimates
//! are in steps of [`SAMPLE`] requests: fine for telling a key asked
//! hundreds of times a minute from one asked a few times.

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sampling::{self, Countdown};

const ROWS: usize = 4;
/// Bits of the (mixed) hash that pick a key's counter in each row.
const ROW_BITS: usize = 16;
const WIDTH: usize = 1 << ROW_BITS;
// Every row takes its own bits of the 64-bit mixed hash.
const _: () = assert!(ROWS * ROW_BITS <= 64);
/// 2^64 over the golden ratio: multiplying by it spreads a hash's bits over
/// the whole word (Fibonacci hashing).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// About one answer in this many (per thread, at random gaps) is
/// recorded, with this weight.
pub const SAMPLE: u64 = sampling::MEAN_GAP;
/// How often the counters are halved.
pub const DECAY_EVERY: Duration = Duration::from_secs(60);

/// Decayed request counts per key hash. Lock-free to record and to read;
/// the halving takes a `Mutex` only to decide which caller does it.
pub struct Popularity {
    counters: Box<[AtomicU16]>,
    last_decay: Mutex<Instant>,
}

impl Popularity {
    pub fn new(now: Instant) -> Popularity {
        Popularity {
            counters: (0..ROWS * WIDTH).map(|_| AtomicU16::new(0)).collect(),
            last_decay: Mutex::new(now),
        }
    }

    /// Bytes the sketch holds (fixed).
    pub const BYTES: usize = ROWS * WIDTH * std::mem::size_of::<AtomicU16>();

    /// The counter of `hash` in each row: [`ROW_BITS`] of the hash per row.
    fn slots(hash: u64) -> [usize; ROWS] {
        // Mixed first, so that hashes differing only in their low bits
        // (none of ours do, but a caller's could) spread over every row.
        let mixed = hash.wrapping_mul(GOLDEN) ^ (hash >> 29);
        std::array::from_fn(|row| {
            row * WIDTH + ((mixed >> (row * ROW_BITS)) as usize & (WIDTH - 1))
        })
    }

    /// Counts one answer for `hash`, as [`SAMPLE`] of them, about one time
    /// in [`SAMPLE`] per thread (at random gaps: see [`crate::sampling`]).
    #[inline]
    pub fn record(&self, hash: u64) {
        thread_local! {
            static UNTIL_SAMPLE: Countdown = const { Countdown::new() };
        }
        if UNTIL_SAMPLE.with(Countdown::due) {
            self.add(hash);
        }
    }

    /// Counts one sample (of [`SAMPLE`] requests) for `hash`.
    pub fn add(&self, hash: u64) {
        let slots = Self::slots(hash);
        let values = slots.map(|slot| self.counters[slot].load(Relaxed));
        let min = values.iter().copied().min().unwrap_or(0);
        if min == u16::MAX {
            return;
        }
        for (slot, value) in slots.iter().zip(values) {
            if value == min {
                // A race with another record may skip or repeat one step:
                // an estimate, not a ledger.
                self.counters[*slot].fetch_add(1, Relaxed);
            }
        }
    }

    /// Requests for `hash` recently: about the last minute's, up to twice
    /// that just before a halving; in steps of [`SAMPLE`].
    pub fn estimate(&self, hash: u64) -> u64 {
        let min = Self::slots(hash)
            .iter()
            .map(|slot| self.counters[*slot].load(Relaxed))
            .min()
            .unwrap_or(0);
        u64::from(min) * SAMPLE
    }

    /// Halves every counter if [`DECAY_EVERY`] has passed since the last
    /// halving; returns whether it did.
    pub fn decay_if_due(&self, now: Instant) -> bool {
        {
            let mut last = self.last_decay.lock().unwrap_or_else(|e| e.into_inner());
            if now.saturating_duration_since(*last) < DECAY_EVERY {
                return false;
            }
            *last = now;
        }
        self.halve();
        true
    }

    fn halve(&self) {
        for counter in self.counters.iter() {
            let value = counter.load(Relaxed);
            if value != 0 {
                // A record between the load and the store is lost: harmless.
                counter.store(value / 2, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_halves() {
        let t0 = Instant::now();
        let sketch = Popularity::new(t0);
        for _ in 0..10 {
            sketch.add(42);
        }
        sketch.add(7);
        assert_eq!(sketch.estimate(42), 10 * SAMPLE);
        assert_eq!(sketch.estimate(7), SAMPLE);
        assert_eq!(sketch.estimate(8), 0);
        assert!(!sketch.decay_if_due(t0 + DECAY_EVERY - Duration::from_millis(1)));
        assert!(sketch.decay_if_due(t0 + DECAY_EVERY));
        assert_eq!(sketch.estimate(42), 5 * SAMPLE);
        assert_eq!(sketch.estimate(7), 0);
        assert!(!sketch.decay_if_due(t0 + DECAY_EVERY + Duration::from_secs(1)));
    }

    #[test]
    fn record_estimates_the_answers_at_their_weight() {
        let sketch = Popularity::new(Instant::now());
        let asked = SAMPLE * 2000;
        for _ in 0..asked {
            sketch.record(3);
        }
        // 2,000 samples expected; their count varies by about 1.25%.
        let estimate = sketch.estimate(3);
        assert!(
            (asked * 9 / 10..=asked * 11 / 10).contains(&estimate),
            "{estimate} for {asked} answers"
        );
    }

    #[test]
    fn two_keys_asked_in_turn_are_both_counted() {
        // With every 16th answer sampled, one of the two got every sample.
        let sketch = Popularity::new(Instant::now());
        let rounds = 3200;
        for _ in 0..rounds {
            sketch.record(1);
            sketch.record(2);
        }
        for key in [1, 2] {
            // 200 samples expected, about 11 either way.
            let estimate = sketch.estimate(key);
            assert!(
                (rounds / 2..=rounds * 3 / 2).contains(&estimate),
                "key {key}: {estimate} for {rounds} answers"
            );
        }
    }

    #[test]
    fn a_hot_key_stands_out_among_many_cold_ones() {
        let sketch = Popularity::new(Instant::now());
        // 200,000 cold keys seen once each, one key seen 100 times.
        for key in 0..200_000u64 {
            sketch.add(key.wrapping_mul(0x2545_F491_4F6C_DD1D));
            if key % 2000 == 0 {
                sketch.add(u64::MAX / 3);
            }
        }
        let hot = sketch.estimate(u64::MAX / 3);
        assert!(hot >= 100 * SAMPLE, "{hot}");
        let cold: Vec<u64> = (0..1000u64)
            .map(|key| sketch.estimate(key.wrapping_mul(0x2545_F491_4F6C_DD1D)))
            .collect();
        let worst = cold.iter().copied().max().unwrap_or(0);
        assert!(
            worst < hot / 10,
            "a cold key estimated at {worst}, hot {hot}"
        );
    }

    #[test]
    fn counters_saturate() {
        let sketch = Popularity::new(Instant::now());
        for _ in 0..70_000 {
            sketch.add(1);
        }
        assert_eq!(sketch.estimate(1), u64::from(u16::MAX) * SAMPLE);
    }
}
