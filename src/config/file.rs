//! The configuration file: reading it (errors name the file, the line and
//! the field) and its `[[route]]` tables, checked and compiled into
//! [`Route`]s. The file's other keys are [`Settings`], read by the same
//! parsers as the flags.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::settings::{LiveSettings, Settings};
use super::values::{de_duration, de_percent, parse_header_name};
use super::ConfigError;
use crate::cache::policy::CacheControlMode;
use crate::routes::{Cookies, Glob, PathMatcher, Route};

/// Reads and parses a configuration file; errors name the file, the line and
/// the field.
pub fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
    parse_file(&text, path)
}

/// Parses the text of a configuration file read from `path`; errors name
/// `path`, the line and the field.
pub fn parse_file(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    toml::from_str::<Settings>(text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        let Some(span) = e.span() else {
            return ConfigError(format!("{}: {message}", path.display()));
        };
        let start = span.start.min(text.len());
        let line = text[..start].matches('\n').count() + 1;
        // Name the field: the key on the error's line, when the message does not.
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(key, _)| key.trim())
            .filter(|key| !key.is_empty() && !message.contains(key));
        // Inside the n-th `[[route]]` table: `route[n-1].key`.
        let routes_above = text
            .lines()
            .take(line)
            .filter(|l| l.trim_start().starts_with("[[route]]"))
            .count();
        let key = key.map(|key| match routes_above {
            0 => key.to_string(),
            n => format!("route[{}].{key}", n - 1),
        });
        match key {
            Some(key) => ConfigError(format!("{}: line {line}: {key}: {message}", path.display())),
            None => ConfigError(format!("{}: line {line}: {message}", path.display())),
        }
    })
}

/// One `[[route]]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// A path prefix (`/ranking`), or a glob with `*` (`/users/*/similar`).
    pub path: String,
    #[serde(default, deserialize_with = "de_duration")]
    pub ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_percent")]
    pub heuristic_freshness: Option<u8>,
    #[serde(default, deserialize_with = "de_duration")]
    pub stale_while_revalidate: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub stale_if_error: Option<Duration>,
    pub cache_control: Option<CacheControlMode>,
    /// Refresh-ahead threshold of the route, in requests a minute (0: off).
    pub refresh_ahead: Option<usize>,
    /// Pass every request through, never store.
    #[serde(default)]
    pub bypass: bool,
    /// Query parameters left out of the cache key (`utm_*` globs allowed).
    #[serde(default)]
    pub ignore_query: Vec<String>,
    /// Only these query parameters are part of the key (globs allowed).
    #[serde(default)]
    pub keep_query: Vec<String>,
    /// Sort the query parameters in the key (`?b=1&a=2` is `?a=2&b=1`).
    #[serde(default)]
    pub sort_query: bool,
    /// Request headers whose values are part of the key.
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// What a request's `Cookie` does: `"private"` (the default: an answer
    /// to a request with cookies is stored only when the backend says it may
    /// be shared), `"ignore"` (cookies are removed before forwarding and the
    /// answer is shared), or a list of cookie names (only those are
    /// forwarded, and their values are part of the key).
    pub cookies: Option<CookiesFile>,
}

/// `cookies = "private" | "ignore" | ["name", ...]` in a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CookiesFile {
    Mode(String),
    Names(Vec<String>),
}

/// The `index`-th route of the file, checked, its unset values taken from
/// `live`.
pub(super) fn validate_route(
    index: usize,
    route: &RouteFile,
    live: &LiveSettings,
) -> Result<Route, ConfigError> {
    let at = |field: &str| format!("route[{index}].{field}");
    if !route.path.starts_with('/') {
        return Err(ConfigError(format!(
            "{} = {:?} in the config file: expected a path starting with /",
            at("path"),
            route.path
        )));
    }
    if !route.ignore_query.is_empty() && !route.keep_query.is_empty() {
        return Err(ConfigError(format!(
            "{} and {} in the config file: give one or the other",
            at("ignore_query"),
            at("keep_query")
        )));
    }
    let key_headers = route
        .key_headers
        .iter()
        .map(|name| {
            parse_header_name(name).map_err(|e| {
                ConfigError(format!(
                    "{} = {name:?} in the config file: {e}",
                    at("key_headers")
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // swr-proxy writes X-Forwarded-For itself, from each client's address
    // (appended to a trusted peer's): the key could only hold what the
    // client sent, not what the backend answers for, and one client's
    // answer would be shared with every client sending the same (none).
    if let Some(name) = key_headers.iter().find(|n| *n == "x-forwarded-for") {
        return Err(ConfigError(format!(
            "{} = {:?} in the config file: swr-proxy sets {name} per client (its address), \
             so a key cannot hold it; an answer for each client address is not shared",
            at("key_headers"),
            name.as_str()
        )));
    }
    let cookies = match &route.cookies {
        None => Cookies::Private,
        Some(CookiesFile::Mode(mode)) if mode == "private" => Cookies::Private,
        Some(CookiesFile::Mode(mode)) if mode == "ignore" => Cookies::Ignore,
        Some(CookiesFile::Mode(mode)) => {
            return Err(ConfigError(format!(
                "{}: expected \"private\", \"ignore\" or a list of cookie names, not {mode:?}",
                at("cookies")
            )))
        }
        Some(CookiesFile::Names(names)) => {
            let valid = |n: &String| {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
            };
            if let Some(bad) = names.iter().find(|n| !valid(n)) {
                return Err(ConfigError(format!(
                    "{}: {bad:?} is not a cookie name",
                    at("cookies")
                )));
            }
            let mut names = names.clone();
            names.sort();
            names.dedup();
            Cookies::Key(names)
        }
    };
    Ok(Route {
        heuristic_freshness: route.heuristic_freshness.or(live.heuristic_freshness),
        pattern: route.path.clone(),
        matcher: PathMatcher::new(&route.path),
        ttl: route.ttl.unwrap_or(live.ttl),
        stale_while_revalidate: route
            .stale_while_revalidate
            .unwrap_or(live.stale_while_revalidate),
        stale_if_error: route.stale_if_error.unwrap_or(live.stale_if_error),
        cache_control: route.cache_control.unwrap_or(live.cache_control),
        refresh_ahead: route.refresh_ahead.unwrap_or(live.refresh_ahead),
        bypass: route.bypass,
        ignore_query: route.ignore_query.iter().map(|p| Glob::new(p)).collect(),
        keep_query: route.keep_query.iter().map(|p| Glob::new(p)).collect(),
        sort_query: route.sort_query,
        key_headers,
        cookies,
    })
}
