//! The cache key of a request: host + path + query.
//!
//! The key text is the host followed by the target, with nothing between
//! them. That is unambiguous because the host is checked first
//! ([`valid_host`]): a `uri-host [":" port]` has no `/`, and every target
//! the cache keys starts with one, so the first `/` of a key text is where
//! the target starts and no two (host, target) pairs share key text. A Host
//! such as `shop.example/static` is a 400, never a key.
//!
//! The hot path never builds a `String` for the key: it hashes the request's
//! host and path-and-query in place. The stored entry keeps the full key text,
//! and a lookup compares it, so two keys whose hashes collide are never
//! confused (the second is a miss, not the first one's answer).

use std::hash::{BuildHasher, Hasher};

/// Hashes keys with one seed per process.
#[derive(Debug, Clone, Default)]
pub struct KeyHasher {
    seed: std::hash::RandomState,
}

/// The key of one request, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    /// The host, lowercase.
    pub host: &'a str,
    /// The path and query as the client sent them.
    pub path_and_query: &'a str,
    /// Hash of `host` followed by `path_and_query`.
    pub hash: u64,
}

impl KeyHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes `host` and `path_and_query` as if they were one string, so
    /// [`KeyHasher::hash_text`] of the joined text gives the same value.
    pub fn hash_parts(&self, host: &str, path_and_query: &str) -> u64 {
        let mut hasher = self.seed.build_hasher();
        hasher.write(host.as_bytes());
        hasher.write(path_and_query.as_bytes());
        hasher.finish()
    }

    /// Hashes a whole key text, as stored on an entry (`host` + `path?query`).
    pub fn hash_text(&self, key: &str) -> u64 {
        let mut hasher = self.seed.build_hasher();
        hasher.write(key.as_bytes());
        hasher.finish()
    }

    pub fn key<'a>(&self, host: &'a str, path_and_query: &'a str) -> RequestKey<'a> {
        RequestKey {
            host,
            path_and_query,
            hash: self.hash_parts(host, path_and_query),
        }
    }
}

impl RequestKey<'_> {
    /// The key text stored on an entry.
    pub fn to_text(&self) -> Box<str> {
        let mut text = String::with_capacity(self.host.len() + self.path_and_query.len());
        text.push_str(self.host);
        text.push_str(self.path_and_query);
        text.into_boxed_str()
    }

    /// Whether a stored key text is this key.
    pub fn matches(&self, text: &[u8]) -> bool {
        text.len() == self.host.len() + self.path_and_query.len()
            && text.starts_with(self.host.as_bytes())
            && &text[self.host.len()..] == self.path_and_query.as_bytes()
    }
}

/// Whether `host` is a `Host` field value (or a URI authority) that names a
/// host: `uri-host [":" port]` of RFC 9110 §7.2 / RFC 3986 §3.2.2, where
/// `uri-host` is an IP literal in brackets or a non-empty reg-name
/// (unreserved characters, percent-encodings and sub-delims; an IPv4
/// address is one) and the port is 1 to 5 digits. No user information, no
/// path, no white space.
pub fn valid_host(host: &[u8]) -> bool {
    let (name, port) = if host.first() == Some(&b'[') {
        let Some(end) = host.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &host[1..end];
        let literal_ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !literal_ok {
            return false;
        }
        match &host[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&[][..], Some(port)),
            _ => return false,
        }
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => (&host[..colon], Some(&host[colon + 1..])),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return false;
        }
        if host.first() == Some(&b'[') {
            return true;
        }
    }
    valid_reg_name(name)
}

/// Whether a request target's path may be forwarded as it is: no dot
/// segment (`.` or `..`, percent-encoded or not) and no backslash. The
/// upstream client sends the target byte for byte, but the backend, or a
/// server before it, may resolve those (`/x/../account` as `/account`):
/// its answer would be for a path other than the one the key, the route
/// and a bypass rule were chosen by.
pub fn valid_target(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    // Most paths have no byte that can start a dot segment or be a
    // backslash: one pass over the bytes, on the hit path.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    if path.contains('\\') {
        return false;
    }
    !path.split('/').any(|segment| {
        let mut rest = segment;
        let mut dots = 0;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                rest = after;
            } else if rest
                .as_bytes()
                .get(..3)
                .is_some_and(|b| b.eq_ignore_ascii_case(b"%2e"))
            {
                // Three ASCII bytes: the rest starts on a char boundary.
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

/// `reg-name` of RFC 3986 §3.2.2, not empty.
fn valid_reg_name(name: &[u8]) -> bool {
    if name.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            b'%' => {
                let hex = name.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 2;
            }
            _ => return false,
        }
        i += 1;
    }
    true
}

/// The cookies named in `names` (sorted) from a request's `Cookie` fields,
/// as one `Cookie` value in the order of `names`: `a=1; b=2`. Empty when
/// the request has none of them.
pub fn keyed_cookies(headers: &http::HeaderMap, names: &[String]) -> String {
    let pairs: Vec<(&str, &str)> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| names.iter().any(|n| n == name))
        .collect();
    let mut out = String::new();
    for name in names {
        for (_, value) in pairs.iter().filter(|(n, _)| n == name) {
            if !out.is_empty() {
                out.push_str("; ");
            }
            out.push_str(name);
            out.push('=');
            out.push_str(value);
        }
    }
    out
}

/// Passes a `u64` key (already a hash) through unchanged, so the store does
/// not hash it a second time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is expected; fold anything else in rather than panic.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Builds [`PassThroughHasher`]s for the store's map.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildPassThrough;

impl BuildHasher for BuildPassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_hash_like_the_joined_text() {
        let hasher = KeyHasher::new();
        let key = hasher.key("example.com", "/rank?user=1");
        assert_eq!(key.hash, hasher.hash_text("example.com/rank?user=1"));
        assert_eq!(&*key.to_text(), "example.com/rank?user=1");
    }

    #[test]
    fn targets_with_dot_segments_are_not_forwarded() {
        for good in [
            "/",
            "/a/b",
            "/a.b/c",
            "/...",
            "/a/.well-known/x",
            "/x?y=/../z",
            "/.x",
            // Found by fuzz/fuzz_targets/keys.rs: a character of more than
            // one byte across a segment's third byte was sliced inside.
            "/ab\u{e9}",
            "/x/%2e\u{61d}y",
            "/%2E.\u{1f600}",
            "/\u{1f600}",
        ] {
            assert!(valid_target(good), "{good}");
        }
        for bad in [
            "/..",
            "/../admin",
            "/x/../account",
            "/./a",
            "/a/.",
            "/%2e%2e/admin",
            "/%2E./a",
            "/a/%2e",
            "/a\\b",
            "/..?q",
        ] {
            assert!(!valid_target(bad), "{bad}");
        }
    }

    #[test]
    fn only_named_cookies_are_kept_in_name_order() {
        let mut headers = http::HeaderMap::new();
        headers.append("cookie", "session=s3cret; tier=gold".parse().unwrap());
        headers.append("cookie", "ab=b;  _ga=GA1".parse().unwrap());
        let names = ["ab".to_string(), "tier".to_string()];
        assert_eq!(keyed_cookies(&headers, &names), "ab=b; tier=gold");
        assert_eq!(keyed_cookies(&http::HeaderMap::new(), &names), "");
    }

    #[test]
    fn hosts_are_uri_host_and_port() {
        for good in [
            "shop.example",
            "Shop.Example:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "xn--bcher-kva.example",
            "a%2Db.example",
            "localhost:1",
        ] {
            assert!(valid_host(good.as_bytes()), "{good} is a host");
        }
        for bad in [
            "",
            "shop.example/static",
            "shop.example?x",
            "shop.example#x",
            "user@shop.example",
            "shop.example:",
            "shop.example:80:80",
            "shop.example:123456",
            "shop.example:8o",
            ":80",
            "shop example",
            "shop.example\t",
            "[::1",
            "[::1]x",
            "[]",
            "[::g]",
            "a%zz.example",
            "a%2",
            "/static",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is not a host");
        }
    }

    #[test]
    fn matches_only_the_same_key() {
        let hasher = KeyHasher::new();
        let key = hasher.key("a.com", "/x?1");
        assert!(key.matches(b"a.com/x?1"));
        assert!(!key.matches(b"a.com/x?2"));
        assert!(!key.matches(b"a.co/mx?1"));
        assert!(!key.matches(b"a.com/x?10"));
        assert_ne!(key.hash, hasher.key("a.com", "/x?2").hash);
    }
}
