//! Cache-Control, targeted-field (RFC 9213) and storability parsing over
//! arbitrary response and request header maps, and the entry built from
//! what storability decides.
//!
//! Input: 8 bytes of parameters (status, request facts, mode, which
//! configured lifetimes, heuristic, response delay), then response header
//! lines, then a NUL and request header lines.
//!
//! Checked, besides "no panic": every lifetime storability returns is at
//! most `MAX_LIFETIME` and the initial age at most `MAX_AGE`; `no-store`
//! and `private` in the directives that apply are never stored; the `Age`
//! read is at most `MAX_AGE`; Vary names come sorted, lowercase and
//! unique; an entry's instants are in order (stored, fresh, stale and
//! error windows) and its state at each of them is the documented one.

#![no_main]

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, StatusCode};
use libfuzzer_sys::fuzz_target;
use swr_proxy::cache::entry::Entry;
use swr_proxy::cache::policy::{
    self, age_value, omitted_fields, storability, CacheControl, CacheControlMode, Defaults,
    EntryState, RequestDirectives, RequestFacts, Storability, KEEP_FOR_REVALIDATION, MAX_AGE,
    MAX_LIFETIME,
};
use swr_proxy::cache::vary::{vary_names, Vary};
use swr_proxy_fuzz::{fields, header_map, take_number};

/// Configured lifetimes to pick from: `parse_duration` accepts up to
/// `u64::MAX` milliseconds.
const LIFETIMES: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_millis(1),
    Duration::from_secs(1),
    Duration::from_secs(10),
    Duration::from_secs(300),
    Duration::from_secs(365 * 24 * 3600),
    Duration::from_secs(u32::MAX as u64),
    Duration::from_millis(u64::MAX),
];

fuzz_target!(|data: &[u8]| {
    let (status, data) = take_number(data, 2);
    let (flags, data) = take_number(data, 1);
    let (picks, data) = take_number(data, 2);
    let (heuristic, data) = take_number(data, 1);
    let (delay_ms, data) = take_number(data, 2);
    let parts = fields(data);
    let response = header_map(parts[0]);
    let request = header_map(parts.get(1).copied().unwrap_or_default());

    let status = StatusCode::from_u16(100 + (status as u16) % 900).expect("100..=999");
    let pick = |shift: u32| LIFETIMES[((picks >> shift) & 7) as usize];
    let targeted = if flags & 4 == 0 {
        HeaderName::from_static("swr-cache-control")
    } else {
        HeaderName::from_static("cdn-cache-control")
    };
    let defaults = Defaults {
        ttl: pick(0),
        stale_while_revalidate: pick(3),
        stale_if_error: pick(6),
        mode: if flags & 8 == 0 {
            CacheControlMode::Honor
        } else {
            CacheControlMode::Override
        },
        targeted: targeted.clone(),
        heuristic_percent: (flags & 16 != 0).then_some(heuristic as u8),
    };
    let facts = RequestFacts {
        authorization: flags & 1 != 0,
        cookie: flags & 2 != 0,
    };
    // A fixed wall clock, so a crash replays: 2026-01-01.
    let response_time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let delay = Duration::from_millis(delay_ms);

    let cc = CacheControl::of_response(&response, &targeted);
    let _ = CacheControl::parse(&response, &http::header::CACHE_CONTROL);
    let omitted = omitted_fields(&response, &targeted);
    assert!(omitted
        .iter()
        .all(|n| n.as_str() == n.as_str().to_ascii_lowercase()));
    assert!(age_value(&response) <= MAX_AGE);
    if let Vary::Names(names) = vary_names(&response) {
        assert!(
            names.windows(2).all(|w| w[0].as_str() < w[1].as_str()),
            "{names:?}"
        );
    }
    let directives = RequestDirectives::parse(&request);

    let decision = storability(status, &response, facts, delay, response_time, &defaults);
    let Storability::Store(lifetimes) = decision else {
        return;
    };
    assert!(!cc.no_store && !cc.private, "stored despite {cc:?}");
    assert!(lifetimes.fresh <= MAX_LIFETIME, "{lifetimes:?}");
    assert!(
        lifetimes.stale_while_revalidate <= MAX_LIFETIME,
        "{lifetimes:?}"
    );
    assert!(lifetimes.stale_if_error <= MAX_LIFETIME, "{lifetimes:?}");
    assert!(lifetimes.initial_age <= MAX_AGE, "{lifetimes:?}");
    assert!(lifetimes.keep_for_revalidation <= KEEP_FOR_REVALIDATION);

    let now = Instant::now();
    let entry = Entry::new(
        "h/x",
        status,
        &response,
        &[Bytes::from_static(b"body")],
        now,
        lifetimes,
    );
    assert_eq!(entry.status(), status);
    assert_eq!(&entry.body()[..], b"body");
    assert!(entry.stored_at() <= entry.fresh_until());
    assert!(entry.fresh_until() <= entry.stale_until());
    assert!(entry.fresh_until() <= entry.error_until());
    assert!(entry.stale_until() <= entry.evict_at() && entry.error_until() <= entry.evict_at());
    if entry.fresh_until() > now {
        assert_eq!(policy::entry_state(&entry, now), EntryState::Fresh);
    }
    for at in [
        entry.fresh_until(),
        entry.stale_until(),
        entry.error_until(),
    ] {
        let state = policy::entry_state(&entry, at);
        if at == entry.stale_until() {
            assert_eq!(state, EntryState::Expired);
        }
        let _ = policy::decide(&entry, at, Some(&directives));
        let _ = policy::usable_on_error(&entry, at);
        let _ = entry.ttl_secs(at);
        let _ = entry.age(at);
        let _ = entry.marked_stale(at);
    }
    let _ = policy::client_not_modified(&entry, &request);
    let _ = entry.renewed_headers(&request);
    let _ = entry.header_map(3);
});
