//! Bytes of memory per stored 1 KiB object, for one store per run (issue
//! 17, item 6): inserts 100,000 distinct entries (built as a fill builds
//! them, the same as `benches/store_compare.rs`) and prints (PSS after -
//! PSS before) / 100,000, PSS read from `/proc/self/smaps_rollup`. The
//! allocator is the proxy's (mimalloc, `no_thp`), so the figure is the one
//! the proxy would see.
//!
//! cargo run --release --example store_memory -- store
//! cargo run --release --example store_memory -- qc-hash
//! cargo run --release --example store_memory -- qc-text
//! cargo run --release --example store_memory -- store 150000   # another count

use std::time::Instant;

use swr_proxy::cache::key::KeyHasher;

#[path = "../benches/support/stores.rs"]
#[allow(dead_code)]
mod stores;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Objects stored unless the second argument says otherwise.
const OBJECTS: usize = 100_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let objects = match args.next().map(|n| n.parse::<usize>()) {
        None => Some(OBJECTS),
        Some(Ok(n)) if n > 0 => Some(n),
        Some(_) => None,
    };
    let known = stores::AnyStore::NAMES.contains(&name.as_str());
    let (true, Some(objects)) = (known, objects) else {
        eprintln!(
            "usage: store_memory <{}> [objects, {OBJECTS} by default]",
            stores::AnyStore::NAMES.join("|")
        );
        std::process::exit(2);
    };
    let keys = KeyHasher::new();
    let response = stores::Response::new();
    let weight = stores::entry_weight(&response, &keys);
    let mut path = String::with_capacity(32);

    // Before the store exists: whatever it allocates up front is counted.
    let before = pss_bytes();
    let Some(store) = stores::AnyStore::new(&name, weight) else {
        unreachable!("checked above");
    };
    let now = Instant::now();
    for i in 0..objects {
        stores::write_path(&mut path, i);
        let key = keys.key(stores::HOST, &path);
        store.insert(&key, response.entry(&key, now));
    }
    let after = pss_bytes();

    // Every object is there and readable (nothing was evicted).
    assert_eq!(store.len(), objects as u64);
    let last = stores::path(objects - 1);
    assert!(store.get(&keys.key(stores::HOST, &last), now).is_some());
    let per_object = after.saturating_sub(before) as f64 / objects as f64;
    println!(
        "{name}: {per_object:.0} B per object (PSS {before} -> {after} B, {objects} objects, \
         {} B charged, entry weight {weight} B)",
        store.charged()
    );
}

/// Proportional set size of this process, from `/proc/self/smaps_rollup`.
fn pss_bytes() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    rollup
        .lines()
        .find_map(|line| {
            let kib = line.strip_prefix("Pss:")?.trim().strip_suffix("kB")?;
            kib.trim().parse::<u64>().ok()
        })
        .expect("a Pss line")
        * 1024
}
