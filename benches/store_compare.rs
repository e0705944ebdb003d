//! Our store against `quick_cache::sync::Cache` on the same entries
//! (issue 17, item 6): 10,000 keys of 1 KiB entries, built as a fill builds
//! them, in a store of 256 MiB; every entry charged what our store charges
//! it. `quick_cache` two ways (see `benches/support/stores.rs`): keyed by the
//! key's hash with the key text checked after the read (`qc_hash`, our
//! store's scheme) and keyed by the key text (`qc_text`).
//!
//! - `hit/*`: a read of a present key (key hash precomputed, as the proxy
//!   has it; `qc_text` hashes the text itself) with the checks a hit needs
//!   (key text, still servable), keys visited in a scattered order.
//! - `hit_2_threads/*`: the same read on two threads at once, each over its
//!   own half of the keys; the time is per read per thread (the slower
//!   thread's time over its reads), so equal to `hit/*` means no contention.
//! - `replace/*`: an insert over an existing key (a refresh), with a clone
//!   of the entry already there, so the map's work is measured and not the
//!   building or freeing of an entry.
//!
//! cargo bench --bench store_compare

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use swr_proxy::cache::entry::Entry;
use swr_proxy::cache::key::{KeyHasher, RequestKey};
use swr_proxy::cache::store::Store;

#[path = "support/stores.rs"]
#[allow(dead_code)]
mod stores;

use stores::{QcByHash, QcByText};

const KEYS: usize = 10_000;
/// A stride through the keys that visits all of them in a scattered order.
const STRIDE: usize = 7919;

struct Fixture {
    paths: Vec<String>,
    texts: Vec<Box<str>>,
    entries: Vec<Entry>,
    store: Store,
    by_hash: QcByHash,
    by_text: QcByText,
    now: Instant,
}

impl Fixture {
    fn new(keys: &KeyHasher) -> Fixture {
        let response = stores::Response::new();
        let weight = stores::entry_weight(&response, keys);
        let now = Instant::now();
        let paths: Vec<String> = (0..KEYS).map(stores::path).collect();
        let texts = paths
            .iter()
            .map(|p| keys.key(stores::HOST, p).to_text())
            .collect();
        let entries: Vec<Entry> = paths
            .iter()
            .map(|p| response.entry(&keys.key(stores::HOST, p), now))
            .collect();
        let fixture = Fixture {
            paths,
            texts,
            entries,
            store: Store::new(stores::MAX_BYTES),
            by_hash: stores::qc_by_hash(weight),
            by_text: stores::qc_by_text(weight),
            now,
        };
        for (i, entry) in fixture.entries.iter().enumerate() {
            let key = fixture.key(keys, i);
            fixture.store.insert(key.hash, entry.clone());
            fixture.by_hash.insert(key.hash, entry.clone());
            fixture.by_text.insert(key.to_text(), entry.clone());
        }
        // Every store holds every key and charges the same bytes.
        assert_eq!(fixture.store.entry_count(), KEYS as u64);
        assert_eq!(fixture.by_hash.len(), KEYS);
        assert_eq!(fixture.by_text.len(), KEYS);
        assert_eq!(fixture.store.weighted_size(), fixture.by_hash.weight());
        assert_eq!(fixture.store.weighted_size(), fixture.by_text.weight());
        fixture
    }

    fn key<'a>(&'a self, keys: &KeyHasher, i: usize) -> RequestKey<'a> {
        keys.key(stores::HOST, &self.paths[i])
    }
}

/// Which store a read goes to.
#[derive(Clone, Copy)]
enum Which {
    Store,
    QcHash,
    QcText,
}

impl Which {
    const ALL: [Which; 3] = [Which::Store, Which::QcHash, Which::QcText];

    fn name(self) -> &'static str {
        match self {
            Which::Store => "store",
            Which::QcHash => "qc_hash",
            Which::QcText => "qc_text",
        }
    }
}

/// One read of key `i`, with the checks a hit makes.
#[inline]
fn read(f: &Fixture, keys: &[RequestKey<'_>], which: Which, i: usize) -> Option<Entry> {
    match which {
        Which::Store => f.store.get(&keys[i], f.now),
        Which::QcHash => stores::get_by_hash(&f.by_hash, &keys[i], f.now),
        Which::QcText => stores::get_by_text(&f.by_text, &f.texts[i], f.now),
    }
}

/// One insert over key `i` (a refresh), of a clone of the entry already there.
#[inline]
fn replace(f: &Fixture, keys: &[RequestKey<'_>], which: Which, i: usize) {
    match which {
        Which::Store => f.store.insert(keys[i].hash, f.entries[i].clone()),
        Which::QcHash => f.by_hash.insert(keys[i].hash, f.entries[i].clone()),
        // The key is the text: a refresh builds it (the proxy holds a
        // borrowed key, not a `Box<str>`).
        Which::QcText => f.by_text.insert(f.texts[i].clone(), f.entries[i].clone()),
    }
}

fn compare(c: &mut Criterion) {
    let hasher = KeyHasher::new();
    let f = Fixture::new(&hasher);
    let keys: Vec<RequestKey<'_>> = (0..KEYS).map(|i| f.key(&hasher, i)).collect();

    let mut group = c.benchmark_group("hit");
    for which in Which::ALL {
        group.bench_function(which.name(), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + STRIDE) % KEYS;
                black_box(read(&f, &keys, which, black_box(i)).expect("stored"))
            })
        });
    }
    group.finish();

    // Two readers at once: each thread times its own reads after a barrier
    // (thread start-up left out); a sample takes the slower thread's time.
    let mut group = c.benchmark_group("hit_2_threads");
    for which in Which::ALL {
        group.bench_function(BenchmarkId::from_parameter(which.name()), |b| {
            b.iter_custom(|iters| {
                let start = Barrier::new(2);
                std::thread::scope(|scope| {
                    let readers: Vec<_> = (0..2)
                        .map(|t| {
                            let (f, keys, start) = (&f, &keys, &start);
                            scope.spawn(move || {
                                let mut i = t * KEYS / 2;
                                start.wait();
                                let began = Instant::now();
                                for _ in 0..iters {
                                    i = (i + STRIDE) % KEYS;
                                    black_box(read(f, keys, which, black_box(i)).expect("stored"));
                                }
                                began.elapsed()
                            })
                        })
                        .collect();
                    readers
                        .into_iter()
                        .map(|r| r.join().expect("reader"))
                        .max()
                        .unwrap_or(Duration::ZERO)
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("replace");
    for which in Which::ALL {
        group.bench_function(which.name(), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + STRIDE) % KEYS;
                replace(&f, &keys, which, i);
            })
        });
    }
    group.finish();

    // Nothing was evicted: the replaces kept every key.
    assert_eq!(f.store.entry_count(), KEYS as u64);
    assert_eq!(f.by_hash.len(), KEYS);
    assert_eq!(f.by_text.len(), KEYS);
}

criterion_group!(benches, compare);
criterion_main!(benches);
