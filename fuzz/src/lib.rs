//! What the fuzz targets share: turning the fuzzer's bytes into the inputs
//! swr-proxy's functions take. The targets are in `fuzz_targets/`, and
//! `run.sh` runs each (README, "Fuzzing").

use http::{HeaderMap, HeaderName, HeaderValue};

/// The parts of `data` between NUL bytes. NUL is never part of a header
/// value, a host or a request target, so it separates them without taking
/// any input away.
pub fn fields(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == 0).collect()
}

/// A header map from `name: value` lines separated by `\n` (one space after
/// the colon is dropped, as written by hand; further white space is kept).
/// Lines whose name or value `http` refuses are left out, as hyper's parser
/// would never hand them over.
pub fn header_map(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// The first `n` bytes of `data` (fewer if it is shorter) as a little-endian
/// number, and the rest.
pub fn take_number(data: &[u8], n: usize) -> (u64, &[u8]) {
    let n = n.min(data.len()).min(8);
    let mut bytes = [0u8; 8];
    bytes[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(bytes), &data[n..])
}
