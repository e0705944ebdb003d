//! The cache key of a request: host + path + query.
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
