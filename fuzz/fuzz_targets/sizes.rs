//! `parse_duration` and `parse_size` over arbitrary text.
//!
//! Checked, besides "no panic": every value accepted is the number times
//! its unit, computed here in 128 bits (so one too large for the type is
//! an error, never a wrapped value), and reads back the same when written
//! in the smallest unit.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use swr_proxy::config::{parse_duration, parse_size};

/// `digits` followed by `unit`, when `text` (trimmed) is exactly that.
fn split(text: &str) -> Option<(u128, &str)> {
    let text = text.trim();
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let digits = &text[..end];
    if digits.is_empty() {
        return None;
    }
    let mut value: u128 = 0;
    for d in digits.bytes() {
        value = value.checked_mul(10)?.checked_add(u128::from(d - b'0'))?;
    }
    Some((value, &text[end..]))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(duration) = parse_duration(text) {
        let millis = duration.as_millis();
        if text.trim() != "0" {
            let (value, unit) = split(text).expect("digits and a unit");
            let per_unit: u128 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                other => panic!("accepted the unit {other:?}"),
            };
            assert_eq!(millis, value * per_unit, "{text:?}");
        }
        assert!(millis <= u128::from(u64::MAX));
        assert_eq!(parse_duration(&format!("{millis}ms")), Ok(duration));
        assert_eq!(duration, Duration::from_millis(millis as u64));
    }
    if let Ok(size) = parse_size(text) {
        let (value, unit) = split(text).expect("digits");
        let scale: u128 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => panic!("accepted the unit {other:?}"),
        };
        assert_eq!(u128::from(size), value * scale, "{text:?}");
        assert_eq!(parse_size(&size.to_string()), Ok(size));
    }
});
