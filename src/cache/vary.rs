//! Vary: what a response's (or a stored entry's) `Vary` names, the key of
//! one variant of a URL, and the index of the URLs whose answers vary.
//! The variant key's encoding is known here only: the URL's key text, then
//! `\nname=value` for each field the answers vary on (`value` as
//! [`vary_key`] writes it), so that every variant of a URL starts with the
//! URL's key and a newline, which no URL contains.
//!
//! The index is the store's (it is charged to the store's byte budget and
//! pruned against its entries); this file says what a record holds and
//! what it weighs.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderName};

use super::entry::Entry;
use super::key::BuildPassThrough;
use super::policy::split_list_bytes;

/// The key text of one variant: the URL's key text and the values of the
/// fields its answers vary on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantKey(String);

impl VariantKey {
    /// The variant of the URL keyed `url_text` that `request`'s fields select,
    /// for answers varying on `names`.
    pub fn new(url_text: &str, names: &[HeaderName], request: &HeaderMap) -> VariantKey {
        let mut text = String::with_capacity(url_text.len() + 32);
        text.push_str(url_text);
        text.push_str(&vary_key(names, request));
        VariantKey(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// Whether the stored key `key` is a variant of the URL keyed `url_text`.
    pub fn is_variant_of(key: &[u8], url_text: &str) -> bool {
        key.len() > url_text.len()
            && key.starts_with(url_text.as_bytes())
            && key[url_text.len()] == b'\n'
    }
}

/// Whether a stored entry under `key` answers a request for `url_text`
/// with `request`'s headers: it is the URL's own entry, or the variant
/// those headers select among `names` (what the URL is known to vary on).
pub fn answers(
    key: &[u8],
    url_text: &str,
    names: Option<&[HeaderName]>,
    request: &HeaderMap,
) -> bool {
    if key == url_text.as_bytes() {
        return true;
    }
    names.is_some_and(|names| {
        key == VariantKey::new(url_text, names, request)
            .as_str()
            .as_bytes()
    })
}

/// What a response's `Vary` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// `Vary: *`, or a `Vary` the cache cannot read (a line that is not
    /// visible ASCII, a member that is not a field name): no later request
    /// can be known to match. Skipping what cannot be read would store the
    /// answer as if it did not vary on it (on `Cookie`, say) and share it.
    Star,
    /// The request header names it varies on, lowercase, deduplicated and
    /// sorted; empty when it does not vary.
    Names(Vec<HeaderName>),
}

/// What a response's `Vary` fields (all of them) say.
pub fn vary_names(headers: &HeaderMap) -> Vary {
    let mut names: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else {
            return Vary::Star;
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Vary::Star;
            }
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                return Vary::Star;
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Vary::Names(names)
}

/// Whether a stored entry's `Vary` fields name the request field `name`
/// (lowercase): every client the entry answers sent the same value of it.
pub fn stored_varies_on(entry: &Entry, name: &str) -> bool {
    entry.wire_headers().any(|(field, value)| {
        field == b"vary"
            && value
                .split(|&b| b == b',')
                .any(|n| n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    })
}

/// The values of the named request headers, as one text for the cache
/// key: `\nname=value` for each name the request carries, `\nname` alone
/// for one it does not (a field sent empty is not a field left out). The
/// key must tell apart every two requests a backend may answer
/// differently, since the backend is sent the fields as the client wrote
/// them:
/// - the `Accept*` fields are lists of case-insensitive tokens (RFC 9110
///   §12.5): their members across repeated fields, trimmed (§5.6.1),
///   empty ones left out, lowercased, joined with `, `;
/// - any other field is not known to be a list (`x-tenant: acme,` is not
///   `acme` to every backend, nor are two field lines one line joined with
///   a comma): each field line's bytes as sent, joined with `, `, a comma
///   inside a line written `%2C`.
///
/// A byte that is not printable ASCII, and `%`, is written as `%XX`.
pub fn vary_key(names: &[HeaderName], request: &HeaderMap) -> String {
    let mut key = String::new();
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        let mut lines = request.get_all(name).iter().peekable();
        if lines.peek().is_none() {
            continue;
        }
        key.push('=');
        let list = LIST_VALUES.contains(&name.as_str());
        let mut first = true;
        for value in lines {
            if !list {
                if !first {
                    key.push_str(", ");
                }
                first = false;
                push_escaped(&mut key, value.as_bytes(), false, true);
                continue;
            }
            for member in split_list_bytes(value.as_bytes()) {
                let member = member.trim_ascii();
                if member.is_empty() {
                    continue;
                }
                if !first {
                    key.push_str(", ");
                }
                first = false;
                push_escaped(&mut key, member, true, false);
            }
        }
    }
    key
}

/// Request fields whose values are lists of case-insensitive tokens
/// (content codings, media types, language tags, charsets: RFC 9110
/// §12.5): keyed by their members, whatever the white space and case.
const LIST_VALUES: [&str; 4] = [
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
];

/// Appends `bytes`: printable ASCII as it is (lowercase with `fold_case`),
/// `%`, a comma with `comma`, and anything else as `%XX`.
fn push_escaped(key: &mut String, bytes: &[u8], fold_case: bool, comma: bool) {
    for &b in bytes {
        match b {
            b',' if comma => key.push_str("%2C"),
            b' '..=b'~' if b != b'%' => {
                key.push(char::from(if fold_case {
                    b.to_ascii_lowercase()
                } else {
                    b
                }));
            }
            _ => {
                let _ = write!(key, "%{b:02X}");
            }
        }
    }
}

/// The URLs whose answers vary, by the hash of the URL's key: the names
/// they vary on and the variants stored. Records are charged like entries
/// (see `VaryRecord::weight`); [`VaryIndex::bytes`] is their sum, which
/// the store keeps within its share of the budget.
#[derive(Default)]
pub struct VaryIndex {
    records: HashMap<u64, VaryRecord, BuildPassThrough>,
    bytes: u64,
}

/// The variants of one URL.
pub struct VaryRecord {
    names: Arc<[HeaderName]>,
    /// Hashes of the variants stored (the most recent `MAX_VARIANTS`).
    variants: VecDeque<u64>,
}

/// Variants remembered per URL for invalidation; older ones age out normally.
const MAX_VARIANTS: usize = 64;

impl VaryRecord {
    /// What a record is charged: the map slot, the names, the variant hashes.
    fn weight(&self) -> u64 {
        let names: usize = self.names.iter().map(|n| n.as_str().len() + 24).sum();
        (96 + names + 8 * self.variants.capacity()) as u64
    }

    /// The hashes of the variants stored.
    pub fn variants(self) -> VecDeque<u64> {
        self.variants
    }
}

impl VaryIndex {
    /// The header names the answers for the URL `url_hash` vary on, if they do.
    pub fn names(&self, url_hash: u64) -> Option<Arc<[HeaderName]>> {
        self.records.get(&url_hash).map(|r| Arc::clone(&r.names))
    }

    /// Bytes the records are charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// URLs with a record.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records that the URL `url_hash` varies on `names`, with a variant
    /// stored under `variant_hash`; then, while the index is charged more
    /// than `budget`, drops other URLs' records. Returns the hashes of the
    /// variants those records held (unreachable now: the store drops them).
    pub fn record(
        &mut self,
        url_hash: u64,
        names: &[HeaderName],
        variant_hash: u64,
        budget: u64,
    ) -> Vec<u64> {
        let before = self.records.get(&url_hash).map_or(0, VaryRecord::weight);
        let record = self.records.entry(url_hash).or_insert_with(|| VaryRecord {
            names: names.into(),
            variants: VecDeque::new(),
        });
        if *record.names != *names {
            record.names = names.into();
        }
        if !record.variants.contains(&variant_hash) {
            if record.variants.len() == MAX_VARIANTS {
                record.variants.pop_front();
            }
            record.variants.push_back(variant_hash);
        }
        let after = record.weight();
        self.bytes = self.bytes.saturating_add(after).saturating_sub(before);
        let mut orphans = Vec::new();
        while self.bytes > budget {
            let Some(other) = self.records.keys().copied().find(|h| *h != url_hash) else {
                break;
            };
            if let Some(record) = self.remove(other) {
                orphans.extend(record.variants);
            }
        }
        orphans
    }

    /// Removes the URL's record (its answers no longer vary, or it is
    /// purged), returning it.
    pub fn remove(&mut self, url_hash: u64) -> Option<VaryRecord> {
        let record = self.records.remove(&url_hash)?;
        self.bytes = self.bytes.saturating_sub(record.weight());
        Some(record)
    }

    /// Keeps only the variants `stored` says are still stored, and the
    /// records left with any.
    pub fn prune(&mut self, stored: impl Fn(u64) -> bool) {
        let mut freed = 0;
        self.records.retain(|_, record| {
            let before = record.weight();
            record.variants.retain(|hash| stored(*hash));
            record.variants.shrink_to_fit();
            if record.variants.is_empty() {
                freed += before;
                return false;
            }
            freed += before - record.weight();
            true
        });
        self.bytes = self.bytes.saturating_sub(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn vary_keys_are_normalised() {
        let Vary::Names(names) = vary_names(&headers(&[
            ("vary", "Accept-Encoding,  accept"),
            ("vary", "X-Tenant"),
        ])) else {
            panic!("names")
        };
        let names_text: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        assert_eq!(names_text, ["accept", "accept-encoding", "x-tenant"]);
        let a = vary_key(
            &names,
            &headers(&[("accept", "text/html"), ("accept-encoding", "gzip,   br")]),
        );
        let b = vary_key(
            &names,
            &headers(&[("Accept-Encoding", "gzip, br"), ("accept", " text/html ")]),
        );
        assert_eq!(a, b);
        let c = vary_key(
            &names,
            &headers(&[("accept", "text/html"), ("accept-encoding", "br")]),
        );
        assert_ne!(a, c);
        // Separators and the case of Accept* tokens are normalised...
        for same in ["gzip,br", "GZIP , Br", "gzip,\tbr"] {
            let d = vary_key(
                &names,
                &headers(&[("accept", "TEXT/HTML"), ("accept-encoding", same)]),
            );
            assert_eq!(a, d, "{same:?}");
        }
        // ...other fields' case and different values are not merged.
        let tenant = |t: &'static str| vary_key(&names, &headers(&[("x-tenant", t)]));
        assert_ne!(tenant("Acme"), tenant("acme"));
        assert_ne!(tenant("a, b"), tenant("a b"));
        assert_ne!(
            tenant("a   b"),
            tenant("a b"),
            "white space inside a value is kept"
        );
        // Only the Accept* lists are read as lists: a field not known to
        // be one keeps its commas, its empty lines, and its lines apart.
        let lines = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-tenant", HeaderValue::from_static(v));
            }
            vary_key(&names, &h)
        };
        let acme = lines(&["acme"]);
        for other in [
            &["acme,"][..],
            &[",acme"],
            &["acme", ""],
            &["", "acme"],
            &["acme%2C"],
        ] {
            assert_ne!(lines(other), acme, "{other:?}");
        }
        assert_ne!(lines(&["a", "b"]), lines(&["a, b"]));
        assert_ne!(lines(&[""]), lines(&[]), "sent empty is not left out");
        let encodings = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("accept-encoding", HeaderValue::from_static(v));
            }
            vary_key(&names, &h)
        };
        assert_eq!(encodings(&["gzip", "br"]), encodings(&["gzip, br,"]));
        assert_ne!(encodings(&[""]), encodings(&[]), "identity only is not any");
        // Bytes that are not UTF-8 keep their identity.
        let raw = |bytes: &'static [u8]| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", HeaderValue::from_bytes(bytes).unwrap());
            vary_key(&names, &h)
        };
        assert_ne!(raw(b"acme\xe8"), raw(b"acme\xe9"));
        assert_ne!(raw(b"acme%E8"), raw(b"acme\xe8"));
        assert_eq!(vary_names(&headers(&[("vary", "*")])), Vary::Star);
        // What cannot be read cannot be matched.
        for unreadable in ["cookie, x/tenant", "cookie, \"x\""] {
            assert_eq!(
                vary_names(&headers(&[("vary", "accept"), ("vary", unreadable)])),
                Vary::Star,
                "{unreadable}"
            );
        }
        let mut h = headers(&[("vary", "accept")]);
        h.append(
            "vary",
            http::HeaderValue::from_bytes(b"cookie, x-caf\xe9").unwrap(),
        );
        assert_eq!(vary_names(&h), Vary::Star);
    }

    #[test]
    fn a_variant_key_starts_with_its_url_and_a_newline() {
        let Vary::Names(names) = vary_names(&headers(&[("vary", "accept")])) else {
            panic!("names")
        };
        let key = VariantKey::new("h/p", &names, &headers(&[("accept", "a")]));
        assert_eq!(key.as_str(), "h/p\naccept=a");
        assert!(VariantKey::is_variant_of(key.as_str().as_bytes(), "h/p"));
        assert!(!VariantKey::is_variant_of(key.as_str().as_bytes(), "h/"));
        assert!(!VariantKey::is_variant_of(b"h/p", "h/p"));
    }
}
