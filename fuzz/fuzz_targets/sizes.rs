//! `parse_duration` and `parse_size` over arbitrary text.
//!
//! Checked, besides "no panic": a duration is accepted exactly when
//! humantime accepts it and it is at most `MAX_DURATION`, with humantime's
//! value, and reads back the same from its humantime text; a size is the
//! number times its unit, computed here in 128 bits (so one too large for
//! the type is an error, never a wrapped value), and reads back the same
//! when written in bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use swr_proxy::config::{parse_duration, parse_size, MAX_DURATION};

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
    // Durations are humantime's grammar, at most MAX_DURATION; whatever is
    // accepted reads back the same from its humantime text.
    match (parse_duration(text), humantime::parse_duration(text.trim())) {
        (Ok(duration), Ok(expected)) => {
            assert_eq!(duration, expected, "{text:?}");
            assert!(duration <= MAX_DURATION, "{text:?}");
            let written = humantime::format_duration(duration).to_string();
            assert_eq!(parse_duration(&written), Ok(duration), "{written:?}");
        }
        (Err(_), Ok(expected)) => assert!(expected > MAX_DURATION, "{text:?} refused"),
        (Ok(duration), Err(_)) => panic!("{text:?} accepted as {duration:?}"),
        (Err(_), Err(_)) => {}
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
