//! The path of a cache hit, without the network: key hashing, the store
//! read with key check, the state decision, and building the answer's
//! headers; and the policy decision made on every fetched response.
//!
//! cargo bench --bench lookup

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::StatusCode;
use swr_proxy::cache::key::KeyHasher;
use swr_proxy::cache::policy::{self, RequestFacts};
use swr_proxy::cache::store::Store;

#[path = "support/stores.rs"]
#[allow(dead_code)]
mod stores;

const KEYS: usize = 10_000;

fn filled_store(keys: &KeyHasher) -> Store {
    let store = Store::new(stores::MAX_BYTES);
    let response = stores::Response::new();
    let now = Instant::now();
    for i in 0..KEYS {
        let path = stores::path(i);
        let key = keys.key(stores::HOST, &path);
        store.insert(key.hash, response.entry(&key, now));
    }
    store
}

fn lookup(c: &mut Criterion) {
    let keys = KeyHasher::new();
    let store = filled_store(&keys);
    let paths: Vec<String> = (0..KEYS).map(stores::path).collect();

    c.bench_function("key_hash", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(keys.key(black_box(stores::HOST), &paths[i]).hash)
        })
    });

    c.bench_function("lookup_hit_10k_keys", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let key = keys.key(stores::HOST, &paths[i]);
            let now = Instant::now();
            let entry = store.get(&key, now).expect("stored");
            black_box(policy::entry_state(&entry, now))
        })
    });

    c.bench_function("hit_answer_headers", |b| {
        let key = keys.key(stores::HOST, &paths[42]);
        let entry = store.get(&key, Instant::now()).expect("stored");
        b.iter(|| {
            let (headers, body) = black_box(&entry).answer(3);
            black_box((headers.len(), body.len()))
        })
    });

    c.bench_function("storability", |b| {
        let defaults = stores::defaults();
        let headers = stores::response_headers();
        let arrival = std::time::SystemTime::now();
        b.iter(|| {
            black_box(policy::storability(
                StatusCode::OK,
                black_box(&headers),
                RequestFacts::default(),
                Duration::from_millis(20),
                arrival,
                &defaults,
            ))
        })
    });

    c.bench_function("lookup_miss", |b| {
        b.iter(|| {
            let key = keys.key(stores::HOST, black_box("/absent"));
            black_box(store.get(&key, Instant::now()).is_none())
        })
    });
}

criterion_group!(benches, lookup);
criterion_main!(benches);
