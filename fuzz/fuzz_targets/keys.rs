//! Key building: `valid_host`, `valid_target`, the key text, `vary_key`,
//! `keyed_cookies` and a route's patterns, over arbitrary bytes.
//!
//! Input: NUL-separated fields: host, target, a second host and target, a
//! header name, two values, cookie names (comma-separated), Cookie lines,
//! a route pattern.
//!
//! Checked, besides "no panic":
//! - a valid host is non-empty printable ASCII with no `/ ? # @` or white
//!   space; two valid (host, target) pairs share key text only when equal,
//!   and `matches` agrees;
//! - a target `valid_target` accepts is sent to the backend byte for byte
//!   (as a URI's path and query), with no dot segment to resolve;
//! - `vary_key`: two single values with no surrounding white space or
//!   comma give different keys when their bytes differ (ASCII case aside,
//!   for the `Accept*` fields); any two values of another field differ
//!   when their bytes do; with two names, equal keys mean equal keys
//!   name by name (the names' parts cannot run into each other); repeated
//!   `Accept*` fields are keyed as their comma-joined value, repeated
//!   fields of another name never are (a backend may tell them apart);
//! - `keyed_cookies`: only listed names, and two single cookies of one
//!   listed name with different (visible ASCII) values give different keys;
//! - a route's key shaping (`Route::shaped_key`, the route built from field
//!   10: `k` keeps the comma-separated globs that follow, `s` ignores them
//!   and sorts, anything else ignores them; it keys `x-tenant` and the
//!   cookies of field 7): the target sent to the backend is the key path's
//!   own prefix, followed in it by nothing or a newline; it holds exactly
//!   the query parameters the route keeps, each as the client sent it.

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use swr_proxy::cache::key::{keyed_cookies, valid_host, valid_target, KeyHasher};
use swr_proxy::cache::vary::vary_key;
use swr_proxy::cache::policy::CacheControlMode;
use swr_proxy::routes::{Cookies, Glob, PathMatcher, Route};
use swr_proxy_fuzz::{fields, header_map};

fn field<'a>(parts: &[&'a [u8]], i: usize) -> &'a [u8] {
    parts.get(i).copied().unwrap_or_default()
}

fn check_host(host: &[u8]) -> bool {
    if !valid_host(host) {
        return false;
    }
    assert!(!host.is_empty());
    assert!(
        host.iter()
            .all(|b| b.is_ascii_graphic() && !b"/?#@".contains(b)),
        "{host:?}"
    );
    true
}

/// `target` as the upstream client sends it: one that `valid_target` lets
/// through and that parses as a URI's path and query (as hyper parsed it
/// when it was received) reaches the backend byte for byte, and has no dot
/// segment that the backend or a server before it could resolve.
fn check_target(target: &str) {
    // A fragment is cut when the request is parsed: the key never has one.
    if !target.starts_with('/') || !valid_target(target) || target.contains('#') {
        return;
    }
    let Ok(sent) = http::uri::PathAndQuery::try_from(target) else {
        return;
    };
    assert_eq!(sent.as_str(), target);
    assert!(
        !sent.path().split('/').any(|s| s == "." || s == ".."),
        "{target:?}"
    );
}

fn one(name: &HeaderName, value: &[u8]) -> Option<HeaderMap> {
    let value = HeaderValue::from_bytes(value).ok()?;
    let mut map = HeaderMap::new();
    map.append(name.clone(), value);
    Some(map)
}

fn cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// A route with key options, from `spec` (see the module doc).
fn route_of(spec: &str, cookies: Vec<String>) -> Route {
    let mut chars = spec.chars();
    let mode = chars.next().unwrap_or('i');
    let globs: Vec<Glob> = chars
        .as_str()
        .split(',')
        .filter(|g| !g.is_empty())
        .map(Glob::new)
        .collect();
    let (keep_query, ignore_query) = if mode == 'k' {
        (globs, Vec::new())
    } else {
        (Vec::new(), globs)
    };
    Route {
        pattern: "/".into(),
        matcher: PathMatcher::new("/"),
        ttl: std::time::Duration::ZERO,
        heuristic_freshness: None,
        stale_while_revalidate: std::time::Duration::ZERO,
        stale_if_error: std::time::Duration::ZERO,
        cache_control: CacheControlMode::default(),
        bypass: false,
        ignore_query,
        keep_query,
        sort_query: mode == 's',
        key_headers: vec![HeaderName::from_static("x-tenant")],
        cookies: Cookies::Key(cookies),
        refresh_ahead: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let parts = fields(data);
    let (host1, target1, host2, target2) = (
        field(&parts, 0),
        field(&parts, 1),
        field(&parts, 2),
        field(&parts, 3),
    );

    // Hosts, targets and the key text.
    let valid1 = check_host(host1);
    let valid2 = check_host(host2);
    let targets = (std::str::from_utf8(target1), std::str::from_utf8(target2));
    if let Ok(t) = targets.0 {
        check_target(t);
    }
    if let (true, true, Ok(t1), Ok(t2)) = (valid1, valid2, targets.0, targets.1) {
        if t1.starts_with('/') && t2.starts_with('/') {
            let h1 = std::str::from_utf8(host1).expect("ascii");
            let h2 = std::str::from_utf8(host2).expect("ascii");
            let hasher = KeyHasher::new();
            let (k1, k2) = (hasher.key(h1, t1), hasher.key(h2, t2));
            let same = (h1, t1) == (h2, t2);
            assert_eq!(*k1.to_text() == *k2.to_text(), same, "{h1}{t1} / {h2}{t2}");
            assert_eq!(k1.matches(k2.to_text().as_bytes()), same);
            if same {
                assert_eq!(k1.hash, k2.hash);
            }
            assert_eq!(k1.hash, hasher.hash_text(&k1.to_text()));
        }
    }

    // Vary keys.
    if let Ok(name) = HeaderName::from_bytes(field(&parts, 4)) {
        let (v1, v2) = (field(&parts, 5), field(&parts, 6));
        let plain = |v: &[u8]| !v.is_empty() && v.trim_ascii() == v && !v.contains(&b',');
        let names = std::slice::from_ref(&name);
        if let (Some(a), Some(b)) = (one(&name, v1), one(&name, v2)) {
            let (ka, kb) = (vary_key(names, &a), vary_key(names, &b));
            let folds = [
                "accept",
                "accept-charset",
                "accept-encoding",
                "accept-language",
            ]
            .contains(&name.as_str());
            let differ = if folds {
                !v1.eq_ignore_ascii_case(v2)
            } else {
                v1 != v2
            };
            if (plain(v1) && plain(v2) || !folds) && differ {
                assert_ne!(ka, kb, "{v1:?} / {v2:?}");
            }
            // Two `Accept*` fields are keyed as their comma-joined value;
            // two fields of another name are not.
            if !v1.contains(&b'"') && !v2.contains(&b'"') {
                let mut joined = v1.to_vec();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(v2);
                if let Some(single) = one(&name, &joined) {
                    let mut both = a.clone();
                    both.append(name.clone(), b[&name].clone());
                    let same = vary_key(names, &both) == vary_key(names, &single);
                    assert_eq!(same, folds, "{v1:?} / {v2:?}");
                }
            }
            // With a second name, the parts of each stay apart.
            let other = if name == "x-b" {
                HeaderName::from_static("x-c")
            } else {
                HeaderName::from_static("x-b")
            };
            let mut pair = vec![name.clone(), other.clone()];
            pair.sort_by(|x, y| x.as_str().cmp(y.as_str()));
            let mut a2 = a.clone();
            if let Ok(v) = HeaderValue::from_bytes(v2) {
                a2.append(other.clone(), v);
            }
            let mut b2 = b.clone();
            if let Ok(v) = HeaderValue::from_bytes(v1) {
                b2.append(other.clone(), v);
            }
            let whole = vary_key(&pair, &a2) == vary_key(&pair, &b2);
            let each = pair.iter().all(|n| {
                vary_key(std::slice::from_ref(n), &a2) == vary_key(std::slice::from_ref(n), &b2)
            });
            assert_eq!(whole, each);
        }
        let _ = vary_key(names, &header_map(field(&parts, 8)));
    }

    // Cookies a route keys.
    let mut names: Vec<String> = std::str::from_utf8(field(&parts, 7))
        .unwrap_or("")
        .split(',')
        .filter(|n| cookie_name(n))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    let cookies = header_map(field(&parts, 8));
    let kept = keyed_cookies(&cookies, &names);
    for pair in kept.split("; ").filter(|p| !p.is_empty()) {
        let (name, _) = pair.split_once('=').expect("name=value");
        assert!(names.iter().any(|n| n == name), "{name:?} not keyed");
    }
    if let Some(name) = names.first() {
        let (v1, v2) = (field(&parts, 5), field(&parts, 6));
        let cookie_value =
            |v: &[u8]| v.iter().all(|b| b.is_ascii_graphic() && *b != b';') && !v.is_empty();
        if cookie_value(v1) && cookie_value(v2) && v1 != v2 {
            let jar = |v: &[u8]| {
                let mut map = HeaderMap::new();
                let mut text = format!("{name}=").into_bytes();
                text.extend_from_slice(v);
                map.append(
                    http::header::COOKIE,
                    HeaderValue::from_bytes(&text).expect("visible"),
                );
                keyed_cookies(&map, &names)
            };
            assert_ne!(jar(v1), jar(v2));
        }
    }

    // A route's pattern against the targets.
    if let (Ok(pattern), Ok(t1)) = (std::str::from_utf8(field(&parts, 9)), targets.0) {
        if Glob::new(pattern).matches(t1) {
            let literal: String = pattern.split('*').collect();
            assert!(t1.len() >= literal.len());
        }
    }

    // A route's key shaping: the backend is sent the key's own prefix.
    if let (Ok(spec), Ok(t1)) = (std::str::from_utf8(field(&parts, 10)), targets.0) {
        if t1.starts_with('/') && t1.bytes().all(|b| b.is_ascii_graphic()) {
            let route = route_of(spec, names.clone());
            let (path, query) = match t1.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (t1, None),
            };
            let shaped = route.shaped_key(path, query, &header_map(field(&parts, 8)));
            let target = shaped.target();
            assert!(shaped.text().starts_with(target));
            let rest = &shaped.text()[target.len()..];
            assert!(rest.is_empty() || rest.starts_with('\n'), "{rest:?}");
            assert!(!target.contains('\n'));
            let (sent_path, sent_query) = match target.split_once('?') {
                Some((p, q)) => (p, q),
                None => (target, ""),
            };
            assert_eq!(sent_path, path);
            let mut sent: Vec<&str> = sent_query.split('&').filter(|p| !p.is_empty()).collect();
            let mut kept: Vec<&str> = query
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .filter(|p| route.keeps_param(p.split('=').next().unwrap_or("")))
                .collect();
            sent.sort_unstable();
            kept.sort_unstable();
            assert_eq!(sent, kept, "{t1:?} shaped as {target:?}");
        }
    }
});
