//! What fleet mode writes to Redis, and reads back: an entry, or the
//! record that a URL's answers vary (the header names its variants are
//! keyed by).
//!
//! A versioned binary encoding, checked on the way in. Instants are local
//! to a process (`Instant`), so an entry travels with its store time as
//! wall-clock nanoseconds since the Unix epoch and every other instant as
//! an offset from it. A value is read as an entry only when it is whole:
//! the magic and version, every length within the value, the key equal to
//! the key it was read for, valid header names and values, a valid status,
//! nothing left over, and a CRC-32 of it all. Anything else (another
//! program's value, a newer version, a truncated write) is
//! [`Corrupt`], counted and never served.
//!
//! ```text
//! "SWR" version(1) kind('E' | 'V') body crc32(LE, of everything before it)
//! E: stored_at_unix_ns(i64) initial_age_ns(u64)
//!    fresh, stale, error, keep: offsets from stored_at in ns (i64 each)
//!    status(u16) key_len(u32) key header_count(u16)
//!    per header: name_len(u16) name value_len(u32, top bit: sensitive) value
//!    body_len(u64) body
//! V: key_len(u32) key name_count(u16) per name: name_len(u16) name
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use crate::cache::entry::{Entry, Instants};
use crate::cache::policy;

const MAGIC: &[u8; 3] = b"SWR";
const VERSION: u8 = 1;
const KIND_ENTRY: u8 = b'E';
const KIND_VARY: u8 = b'V';
const SENSITIVE: u32 = 1 << 31;
/// The most header fields (and Vary names) a value read back may hold.
/// A backend's answer holds far fewer (hyper's client takes 100); a
/// `HeaderMap` panics past 24,576 distinct names, and the CRC is no
/// signature: anyone who can write to Redis can seal such a value.
const MAX_FIELDS: u16 = policy::MAX_STORED_FIELDS as u16;
const _: () = assert!(policy::MAX_STORED_FIELDS <= u16::MAX as usize);

/// A value read from Redis for a key.
#[derive(Debug)]
pub enum Shared {
    /// The stored answer.
    Entry(Entry),
    /// The URL's answers vary on these request headers: the answer is
    /// under the variant's key.
    Vary(Vec<HeaderName>),
}

/// A value that is not one this version wrote for the key asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt(pub &'static str);

/// Nanoseconds from `from` to `to`, negative when `to` is earlier;
/// saturating.
fn signed_nanos(from: Instant, to: Instant) -> i64 {
    let clamp = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    if to >= from {
        clamp(to - from)
    } else {
        -clamp(from - to)
    }
}

/// `at` moved by `nanos`, saturating at `at` when the clock cannot hold it.
fn shifted(at: Instant, nanos: i64) -> Instant {
    let d = Duration::from_nanos(nanos.unsigned_abs());
    let moved = if nanos >= 0 {
        at.checked_add(d)
    } else {
        at.checked_sub(d)
    };
    moved.unwrap_or(at)
}

fn unix_nanos(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// The wall-clock time of an entry's `instant`, given that `now` is
/// `wall_now`.
fn wall_time(instant: Instant, now: Instant, wall_now: SystemTime) -> SystemTime {
    let nanos = signed_nanos(now, instant);
    let d = Duration::from_nanos(nanos.unsigned_abs());
    let at = if nanos >= 0 {
        wall_now.checked_add(d)
    } else {
        wall_now.checked_sub(d)
    };
    at.unwrap_or(wall_now)
}

/// The bytes Redis keeps for `entry`, `now` being `wall_now`.
pub fn encode_entry(entry: &Entry, now: Instant, wall_now: SystemTime) -> Vec<u8> {
    let at = entry.instants();
    let headers = entry.header_map(0);
    let body = entry.body();
    let key = entry.key().as_bytes();
    let mut out = Vec::with_capacity(96 + key.len() + body.len() + headers.len() * 48);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(KIND_ENTRY);
    let stored_wall = wall_time(at.stored_at, now, wall_now);
    out.extend_from_slice(&unix_nanos(stored_wall).to_le_bytes());
    let initial_age = u64::try_from(at.initial_age.as_nanos()).unwrap_or(u64::MAX);
    out.extend_from_slice(&initial_age.to_le_bytes());
    for instant in [
        at.fresh_until,
        at.stale_until,
        at.error_until,
        at.keep_until,
    ] {
        out.extend_from_slice(&signed_nanos(at.stored_at, instant).to_le_bytes());
    }
    out.extend_from_slice(&entry.status().as_u16().to_le_bytes());
    put_bytes32(&mut out, key);
    let count = u16::try_from(headers.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for (name, value) in headers.iter().take(usize::from(count)) {
        put_bytes16(&mut out, name.as_str().as_bytes());
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX) & !SENSITIVE;
        let flagged = if value.is_sensitive() {
            len | SENSITIVE
        } else {
            len
        };
        out.extend_from_slice(&flagged.to_le_bytes());
        out.extend_from_slice(&value.as_bytes()[..len as usize]);
    }
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    seal(out)
}

/// The bytes Redis keeps under `url_text` when its answers vary on `names`.
pub fn encode_vary(url_text: &str, names: &[HeaderName]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + url_text.len() + names.len() * 16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(KIND_VARY);
    put_bytes32(&mut out, url_text.as_bytes());
    let count = u16::try_from(names.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for name in names.iter().take(usize::from(count)) {
        put_bytes16(&mut out, name.as_str().as_bytes());
    }
    seal(out)
}

fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// Appends the CRC-32 of everything written.
fn seal(mut out: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads the value Redis holds under `key_text`, `now` being `wall_now`.
pub fn decode(
    value: &[u8],
    key_text: &str,
    now: Instant,
    wall_now: SystemTime,
) -> Result<Shared, Corrupt> {
    let Some((sealed, crc)) = value.split_last_chunk::<4>() else {
        return Err(Corrupt("short"));
    };
    let mut r = Reader(sealed);
    if r.take(3)? != MAGIC {
        return Err(Corrupt("foreign"));
    }
    if r.u8()? != VERSION {
        return Err(Corrupt("version"));
    }
    if crc32fast::hash(sealed) != u32::from_le_bytes(*crc) {
        return Err(Corrupt("checksum"));
    }
    let shared = match r.u8()? {
        KIND_ENTRY => Shared::Entry(read_entry(&mut r, key_text, now, wall_now)?),
        KIND_VARY => {
            if r.bytes32()? != key_text.as_bytes() {
                return Err(Corrupt("key"));
            }
            let count = r.u16()?;
            if count > MAX_FIELDS {
                return Err(Corrupt("headers"));
            }
            let mut names = Vec::with_capacity(usize::from(count).min(64));
            for _ in 0..count {
                let name = HeaderName::from_bytes(r.bytes16()?).map_err(|_| Corrupt("name"))?;
                names.push(name);
            }
            Shared::Vary(names)
        }
        _ => return Err(Corrupt("kind")),
    };
    if !r.0.is_empty() {
        return Err(Corrupt("trailing"));
    }
    Ok(shared)
}

fn read_entry(
    r: &mut Reader<'_>,
    key_text: &str,
    now: Instant,
    wall_now: SystemTime,
) -> Result<Entry, Corrupt> {
    let stored_unix = r.i64()?;
    let initial_age = Duration::from_nanos(r.u64()?);
    let offsets = [r.i64()?, r.i64()?, r.i64()?, r.i64()?];
    // As every entry is built: stale and error windows after freshness,
    // kept until both are over.
    let [fresh, stale, error, keep] = offsets;
    if stale < fresh || error < fresh || keep < stale.max(error) {
        return Err(Corrupt("instants"));
    }
    let status = StatusCode::from_u16(r.u16()?).map_err(|_| Corrupt("status"))?;
    if r.bytes32()? != key_text.as_bytes() {
        return Err(Corrupt("key"));
    }
    let count = r.u16()?;
    if count > MAX_FIELDS {
        return Err(Corrupt("headers"));
    }
    let mut headers = HeaderMap::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        let name = HeaderName::from_bytes(r.bytes16()?).map_err(|_| Corrupt("name"))?;
        let flagged = r.u32()?;
        let bytes = r.take((flagged & !SENSITIVE) as usize)?;
        let mut value = HeaderValue::from_bytes(bytes).map_err(|_| Corrupt("value"))?;
        value.set_sensitive(flagged & SENSITIVE != 0);
        headers.append(name, value);
    }
    let body_len = usize::try_from(r.u64()?).map_err(|_| Corrupt("short"))?;
    let body = Bytes::copy_from_slice(r.take(body_len)?);
    // The store time on this process's clock: as long ago as the wall
    // clocks say (a clock ahead of ours counts as now).
    let since = unix_nanos(wall_now).saturating_sub(stored_unix).max(0);
    let stored_at = shifted(now, -since);
    let [fresh, stale, error, keep] = offsets.map(|nanos| shifted(stored_at, nanos));
    Ok(Entry::with_instants(
        key_text,
        status,
        &headers,
        &[body],
        Instants {
            stored_at,
            initial_age,
            fresh_until: fresh,
            stale_until: stale,
            error_until: error,
            keep_until: keep,
        },
    ))
}

/// Reads a value front to back; every read checks the length left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if n > self.0.len() {
            return Err(Corrupt("short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, Corrupt> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, Corrupt> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], Corrupt> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn bytes32(&mut self) -> Result<&'a [u8], Corrupt> {
        let len = self.u32()?;
        self.take(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Lifetimes;
    use http::header;
    use proptest::prelude::*;

    fn sample(now: Instant) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::ETAG, HeaderValue::from_static("\"v7\""));
        headers.append("x-gen", HeaderValue::from_static("1"));
        headers.append("x-gen", HeaderValue::from_static("2"));
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        headers.insert("x-secret", secret);
        let lifetimes = Lifetimes {
            fresh: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(300),
            initial_age: Duration::from_secs(2),
            keep_for_revalidation: Duration::from_secs(600),
        };
        Entry::new(
            "example.com/feed?u=1",
            StatusCode::OK,
            &headers,
            &[Bytes::from_static(b"the body")],
            now,
            lifetimes,
        )
    }

    #[test]
    fn an_entry_round_trips_with_its_instants_moved_to_the_readers_clock() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let entry = sample(now);
        let bytes = encode_entry(&entry, now, wall);
        // Read 3 s later, by a process whose Instant is another one.
        let reader_now = now + Duration::from_secs(100);
        let reader_wall = wall + Duration::from_secs(3);
        let Ok(Shared::Entry(read)) = decode(&bytes, entry.key(), reader_now, reader_wall) else {
            panic!("not read back");
        };
        let back = reader_now - Duration::from_secs(3);
        assert_eq!(read.stored_at(), back);
        assert_eq!(read.fresh_until(), back + Duration::from_secs(8));
        assert_eq!(read.stale_until(), back + Duration::from_secs(68));
        assert_eq!(read.error_until(), back + Duration::from_secs(308));
        assert_eq!(read.evict_at(), back + Duration::from_secs(608));
        assert_eq!(read.initial_age(), Duration::from_secs(2));
        assert_eq!(read.status(), StatusCode::OK);
        assert_eq!(&read.body()[..], b"the body");
        let map = read.header_map(0);
        let gens: Vec<_> = map.get_all("x-gen").iter().collect();
        assert_eq!(gens, ["1", "2"]);
        assert!(map["x-secret"].is_sensitive());
        assert_eq!(read.etag(), Some(HeaderValue::from_static("\"v7\"")));
        assert_eq!(map, entry.header_map(0));
    }

    #[test]
    fn a_vary_record_round_trips() {
        let names = vec![header::ACCEPT_ENCODING, HeaderName::from_static("x-tenant")];
        let bytes = encode_vary("h/p", &names);
        let now = Instant::now();
        match decode(&bytes, "h/p", now, SystemTime::now()) {
            Ok(Shared::Vary(read)) => assert_eq!(read, names),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn foreign_truncated_altered_or_misplaced_values_are_corrupt() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let entry = sample(now);
        let bytes = encode_entry(&entry, now, wall);
        let read = |b: &[u8], key: &str| decode(b, key, now, wall).err();
        assert_eq!(read(b"hello, world", entry.key()), Some(Corrupt("foreign")));
        assert_eq!(read(b"", entry.key()), Some(Corrupt("short")));
        // Stored under another key (a collision, or a hand-written SET).
        assert_eq!(read(&bytes, "example.com/other"), Some(Corrupt("key")));
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut], entry.key()).is_some(), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x20;
            assert!(read(&flipped, entry.key()).is_some(), "byte {at} flipped");
        }
        let mut newer = bytes.clone();
        newer[3] = VERSION + 1;
        assert_eq!(read(&newer, entry.key()), Some(Corrupt("version")));
    }

    #[test]
    fn a_sealed_value_with_too_many_headers_is_corrupt_not_a_panic() {
        // The CRC is not a signature: anyone who can SET a key can seal a
        // value. 30,000 distinct header names overflow a HeaderMap.
        let mut out = b"SWR\x01E".to_vec();
        out.extend_from_slice(&0i64.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for _ in 0..4 {
            out.extend_from_slice(&1_000_000_000i64.to_le_bytes());
        }
        out.extend_from_slice(&200u16.to_le_bytes());
        put_bytes32(&mut out, b"k");
        let count: u16 = 30_000;
        out.extend_from_slice(&count.to_le_bytes());
        for i in 0..count {
            put_bytes16(&mut out, format!("x{i}").as_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            out.push(b'v');
        }
        out.extend_from_slice(&0u64.to_le_bytes());
        let value = seal(out);
        let read = std::panic::catch_unwind(|| {
            decode(&value, "k", Instant::now(), SystemTime::now()).err()
        });
        assert_eq!(read.ok(), Some(Some(Corrupt("headers"))));
    }

    proptest! {
        #[test]
        fn any_bytes_are_read_without_a_panic(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&value, "k", Instant::now(), SystemTime::now());
            // A valid frame around random insides: the checksum passes, the
            // parse must still refuse or accept without a panic.
            let mut framed = b"SWR\x01E".to_vec();
            framed.extend_from_slice(&value);
            let framed = seal(framed);
            let _ = decode(&framed, "k", Instant::now(), SystemTime::now());
        }
    }
}
