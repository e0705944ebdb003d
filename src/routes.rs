//! Routes: per-path caching rules, first match wins. A route's patterns
//! (its path and its query-parameter globs) are compiled once, when the
//! configuration loads, so matching a request allocates nothing. Built and
//! validated by `config.rs`; read by the proxy's rules.

use std::borrow::Cow;
use std::time::Duration;

use http::HeaderMap;

use crate::cache::key::keyed_cookies;
use crate::cache::policy::CacheControlMode;
use crate::cache::vary::vary_key;

/// A glob compiled once: `*` matches any run of characters (none
/// included), everything else matches itself, and the glob must match the
/// whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    /// The text between the stars: `a*b*c` is `[a, b, c]`, `*` is `["", ""]`,
    /// a glob without a star is one part.
    parts: Box<[Box<str>]>,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            parts: pattern.split('*').map(Box::from).collect(),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        let (first, middles, last) = match &self.parts[..] {
            [] => return text.is_empty(),
            [only] => return **only == *text,
            [first, middles @ .., last] => (&**first, middles, &**last),
        };
        if text.len() < first.len() + last.len()
            || !text.starts_with(first)
            || !text.ends_with(last)
        {
            return false;
        }
        let mut rest = &text[first.len()..text.len() - last.len()];
        for middle in middles {
            match rest.find(&**middle) {
                Some(at) => rest = &rest[at + middle.len()..],
                None => return false,
            }
        }
        true
    }
}

/// What request paths a route takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatcher {
    /// A path without `*`: every path that starts with it.
    Prefix(String),
    /// A path with `*`: every path the glob matches whole.
    Glob(Glob),
}

impl PathMatcher {
    pub fn new(pattern: &str) -> PathMatcher {
        if pattern.contains('*') {
            PathMatcher::Glob(Glob::new(pattern))
        } else {
            PathMatcher::Prefix(pattern.to_string())
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatcher::Glob(glob) => glob.matches(path),
        }
    }
}

/// A request path as routes match it: percent-encoded unreserved
/// characters decoded (`%61` is `a`: RFC 3986 §6.2.2.2), as a backend
/// decodes them before it routes. Otherwise `/%61ccount` would miss the
/// `/account` route (a `bypass`, say) and reach the backend's `/account`.
/// Other escapes (`%2F`, `%25`, non-ASCII bytes) are left as they are.
pub fn route_path(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                let hex = |d: u8| char::from(d).to_digit(16).unwrap_or(0) as u8;
                Some(hex(*hi) << 4 | hex(*lo))
            }
            _ => None,
        };
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // Only `%XX` (ASCII) became ASCII bytes: still UTF-8.
    String::from_utf8(out).map_or(Cow::Borrowed(path), Cow::Owned)
}

/// What a route does with a request's `Cookie`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cookies {
    /// Forwarded; the answer is stored only when the backend says it may be
    /// shared (`public`, `s-maxage`, or a targeted field).
    #[default]
    Private,
    /// Removed before forwarding; the answer is shared.
    Ignore,
    /// Only these cookies are forwarded, and their values are part of the key.
    Key(Vec<String>),
}

/// One validated route: what requests it matches and how they are cached.
#[derive(Debug, Clone)]
pub struct Route {
    /// The pattern as written, for logs and metrics.
    pub pattern: String,
    /// The pattern, compiled.
    pub matcher: PathMatcher,
    pub ttl: Duration,
    /// `heuristic_freshness` of the route, else of the top level.
    pub heuristic_freshness: Option<u8>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub cache_control: CacheControlMode,
    /// Requests a minute from which a key is refreshed ahead (0: never).
    pub refresh_ahead: usize,
    pub bypass: bool,
    pub ignore_query: Vec<Glob>,
    pub keep_query: Vec<Glob>,
    pub sort_query: bool,
    pub key_headers: Vec<http::HeaderName>,
    pub cookies: Cookies,
}

impl Route {
    /// Whether the route matches a request path: a prefix, or a glob where
    /// `*` matches any run of characters (and the glob must match it all).
    pub fn matches(&self, path: &str) -> bool {
        self.matcher.matches(path)
    }

    /// Whether the cache key of this route differs from the plain URL's.
    pub fn shapes_key(&self) -> bool {
        !self.ignore_query.is_empty()
            || !self.keep_query.is_empty()
            || self.sort_query
            || !self.key_headers.is_empty()
            || matches!(self.cookies, Cookies::Key(_))
    }

    /// The key path of a request on this route (`path`, `query`,
    /// `headers`), when the route has key options: see [`ShapedKey`].
    pub fn shaped_key(&self, path: &str, query: Option<&str>, headers: &HeaderMap) -> ShapedKey {
        let mut params: Vec<&str> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| self.keeps_param(p.split('=').next().unwrap_or("")))
            .collect();
        if self.sort_query {
            params.sort_unstable();
        }
        let mut key = String::with_capacity(path.len() + query.map_or(0, str::len) + 16);
        key.push_str(path);
        if !params.is_empty() {
            key.push('?');
            key.push_str(&params.join("&"));
        }
        let len = key.len();
        if !self.key_headers.is_empty() {
            key.push_str(&vary_key(&self.key_headers, headers));
        }
        if let Cookies::Key(names) = &self.cookies {
            key.push_str("\ncookie=");
            key.push_str(&keyed_cookies(headers, names));
        }
        ShapedKey { text: key, len }
    }

    /// Whether a query parameter name takes part in the key.
    pub fn keeps_param(&self, name: &str) -> bool {
        if !self.keep_query.is_empty() {
            return self.keep_query.iter().any(|g| g.matches(name));
        }
        !self.ignore_query.iter().any(|g| g.matches(name))
    }
}

/// The key path of a route with key options: the path, the query with
/// parameters dropped or kept and maybe sorted, then the key headers' values
/// (after a newline, so purging the URL's key purges these too). The first
/// `len` bytes (path and shaped query) are also what the backend is sent:
/// a parameter the key leaves out must not reach the backend, or a client
/// could change the answer stored for everyone who shares the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapedKey {
    text: String,
    len: usize,
}

impl ShapedKey {
    /// The key path: what follows the host in the key text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The path and query sent to the backend.
    pub fn target(&self) -> &str {
        &self.text[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let glob = |pattern: &str, text: &str| Glob::new(pattern).matches(text);
        assert!(glob("utm_*", "utm_source"));
        assert!(!glob("utm_*", "xutm_source"));
        assert!(glob("/users/*/similar", "/users/42/similar"));
        assert!(!glob("/users/*/similar", "/users/42/similar/x"));
        assert!(glob("*", "anything"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "a-b-c"));
        assert!(!glob("a*b*c", "a-c"));
        assert!(!glob("ab*ba", "aba"), "the ends may not overlap");
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    #[test]
    fn routes_see_unreserved_characters_decoded() {
        assert_eq!(route_path("/account"), "/account");
        assert_eq!(route_path("/%61ccount"), "/account");
        assert_eq!(route_path("/%41%7e%2D%5f%2e%30"), "/A~-_.0");
        for kept in [
            "/a%2Fb",
            "/a%25",
            "/a%",
            "/a%6",
            "/a%zz",
            "/a%+6",
            "/caf%C3%A9",
        ] {
            assert_eq!(route_path(kept), kept);
        }
        assert_eq!(route_path("/é%61"), "/éa");
    }

    #[test]
    fn paths_match_by_prefix_or_whole_glob() {
        assert!(PathMatcher::new("/api").matches("/api/v1"));
        assert!(!PathMatcher::new("/api").matches("/ap"));
        assert!(PathMatcher::new("/u/*/x").matches("/u/1/x"));
        assert!(!PathMatcher::new("/u/*/x").matches("/u/1/x/y"));
    }
}
