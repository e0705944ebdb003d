//! The path of a cache hit, without the network: key hashing, the store
//! read with key check, the state decision, and building the answer's
//! headers; and the policy decision made on every fetched response.
//!
//! cargo bench --bench lookup

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use swr_proxy::cache::entry::Entry;
use swr_proxy::cache::key::KeyHasher;
use swr_proxy::cache::policy::{self, CacheControlMode, Defaults, RequestFacts, Storability};
use swr_proxy::cache::store::Store;

const KEYS: usize = 10_000;

fn defaults() -> Defaults {
    Defaults {
        ttl: Duration::from_secs(3600),
        stale_while_revalidate: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(300),
        mode: CacheControlMode::Honor,
        targeted: http::HeaderName::from_static("swr-cache-control"),
        heuristic_percent: None,
    }
}

/// A backend response's headers, as a recommendations backend sends them.
fn response_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=60, stale-while-revalidate=300"),
    );
    headers.insert("etag", HeaderValue::from_static("\"r-8f2a91\""));
    headers.insert(
        "date",
        HeaderValue::from_static("Sat, 28 Nov 2026 12:00:00 GMT"),
    );
    headers
}

fn filled_store(keys: &KeyHasher) -> Store {
    let store = Store::new(256 << 20);
    let defaults = defaults();
    let headers = response_headers();
    let Storability::Store(lifetimes) = policy::storability(
        StatusCode::OK,
        &headers,
        RequestFacts::default(),
        Duration::ZERO,
        std::time::SystemTime::now(),
        &defaults,
    ) else {
        unreachable!("a plain 200 is storable")
    };
    let now = Instant::now();
    for i in 0..KEYS {
        let path = format!("/rank?user={i}");
        let key = keys.key("127.0.0.1:8080", &path);
        let entry = Entry::new(
            &key.to_text(),
            StatusCode::OK,
            &headers,
            &[Bytes::from(vec![b'x'; 1024])],
            now,
            lifetimes,
        );
        store.insert(key.hash, entry);
    }
    store
}

fn lookup(c: &mut Criterion) {
    let keys = KeyHasher::new();
    let store = filled_store(&keys);
    let paths: Vec<String> = (0..KEYS).map(|i| format!("/rank?user={i}")).collect();

    c.bench_function("key_hash", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(keys.key(black_box("127.0.0.1:8080"), &paths[i]).hash)
        })
    });

    c.bench_function("lookup_hit_10k_keys", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let key = keys.key("127.0.0.1:8080", &paths[i]);
            let now = Instant::now();
            let entry = store.get(&key, now).expect("stored");
            black_box(policy::entry_state(&entry, now))
        })
    });

    c.bench_function("hit_answer_headers", |b| {
        let key = keys.key("127.0.0.1:8080", &paths[42]);
        let entry = store.get(&key, Instant::now()).expect("stored");
        b.iter(|| {
            let (headers, body) = black_box(&entry).answer(3);
            black_box((headers.len(), body.len()))
        })
    });

    c.bench_function("storability", |b| {
        let defaults = defaults();
        let headers = response_headers();
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
            let key = keys.key("127.0.0.1:8080", black_box("/absent"));
            black_box(store.get(&key, Instant::now()).is_none())
        })
    });
}

criterion_group!(benches, lookup);
criterion_main!(benches);
