//! How one setting's value is read, the same from a flag, the environment
//! and the configuration file: durations, sizes, counts, addresses, the
//! backend's URL. Each parser names what it expects. In the file, a value
//! written as a string (a duration, a size, an address, a header name, the
//! URL, a CIDR) is read by its flag's parser (`de_*`), so it means one
//! thing wherever it is written; a count or a percentage is a TOML integer,
//! held to its flag's bounds (`de_count`, `de_percent`). Owns no defaults
//! and no relations between settings (those are in
//! [`super::Config::validate`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::cache::policy::CacheControlMode;

/// The longest duration a setting takes: past it, a value is a typo, and
/// one near `u64::MAX` milliseconds would overflow what is derived from it.
/// 100 years of humantime's 365.25 days.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// More serving threads than this is a typo, not a machine.
pub const MAX_THREADS: usize = 1024;
/// Refresh workers: each is a task started with the proxy.
pub const MAX_REFRESH_CONCURRENCY: usize = 4096;
/// Refreshes waiting for a worker (tokio's channel panics past 2^61).
pub const MAX_QUEUED_REFRESHES: usize = 1 << 20;
/// Requests in flight to the backend (tokio's semaphore panics past 2^61).
pub const MAX_UPSTREAM_CONCURRENCY: usize = 1 << 20;

/// The admin API's default address. Not 9090 (Prometheus' own, which a
/// host that scrapes swr-proxy often runs) nor any common exporter's
/// (9100-9999), Varnish's (6081, 6082) or a web server's.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6180);

/// Parses `250ms`, `10s`, `5m`, `1h`, `1d`, `1h 30m`, or `0` (humantime's
/// forms: whole numbers, each with a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const FORM: &str = "expected a duration like 250ms, 10s, 5m or 1h";
    let duration = humantime::parse_duration(text.trim()).map_err(|e| format!("{FORM} ({e})"))?;
    if duration > MAX_DURATION {
        return Err(format!("{FORM} (at most 100 years)"));
    }
    Ok(duration)
}

/// Parses `512`, `64KiB`, `256MiB`, `1GiB` (also `KB`/`MB`/`GB`, powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    const FORM: &str = "expected a size like 512, 64KiB, 256MiB or 1GiB";
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| FORM.to_string())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(FORM.to_string()),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("{FORM} (too large)"))
}

/// Parses `honor` or `override`.
pub fn parse_mode(text: &str) -> Result<CacheControlMode, String> {
    match text.trim() {
        "honor" => Ok(CacheControlMode::Honor),
        "override" => Ok(CacheControlMode::Override),
        _ => Err("expected honor or override".into()),
    }
}

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl Listen {
    pub fn address(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(addr) => Some(addr),
        }
    }
}

/// `127.0.0.1:6180`, `[::1]:6180`, or `off`.
pub fn parse_listen(text: &str) -> Result<Listen, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(Listen::Off);
    }
    text.parse()
        .map(Listen::At)
        .map_err(|_| "expected an address like 127.0.0.1:6180, or off".to_string())
}

/// An address (`10.0.0.1`, `::1`) or a network (`10.0.0.0/8`).
pub fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("expected an address or CIDR like 10.0.0.0/8, not {text:?}"))
}

/// Parses a header name, e.g. swr-cache-control.
pub fn parse_header_name(text: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| "expected a header name like swr-cache-control".to_string())
}

/// Parses a count of at least one.
pub fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(COUNT.into()),
    }
}

const COUNT: &str = "expected a whole number of at least 1";

/// Parses a count, zero allowed.
pub fn parse_count_or_zero(text: &str) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .map_err(|_| "expected a whole number (0 for no cap)".into())
}

/// Parses a percentage, 0 to 100.
pub fn parse_percent(text: &str) -> Result<u8, String> {
    match text.trim().parse::<u8>() {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(PERCENT.into()),
    }
}

const PERCENT: &str = "expected a percentage from 0 to 100";

/// A switch's value: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`
/// (a flag given without one is `true`).
/// A rate in requests per minute; 0 turns the feature off.
pub fn parse_per_minute(text: &str) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .map_err(|_| "expected requests per minute, a whole number (0: off)".into())
}

pub fn parse_switch(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" | "" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A switch named for turning something off (`--no-fast-hits`): its value
/// read as [`parse_switch`], negated.
pub fn parse_negated_switch(text: &str) -> Result<bool, String> {
    parse_switch(text).map(|on| !on)
}

/// Parses the backend URL: `http` or `https`, with a host, an optional base
/// path, no query or fragment. User info is refused by `Config::validate`,
/// whose error, unlike a parser's, does not repeat the value.
pub fn parse_upstream(text: &str) -> Result<url::Url, String> {
    const FORM: &str = "expected an http(s) URL like http://127.0.0.1:3000";
    let url = url::Url::parse(text.trim()).map_err(|e| format!("{FORM} ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(FORM.into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{FORM}, without a query or fragment"));
    }
    Ok(url)
}

/// A Redis URL (`--redis`): its password is never shown (`Debug`,
/// `Display`), since settings are logged and compared.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(url::Url);

impl RedisUrl {
    /// The URL as the Redis client takes it, password included.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        f.write_str(shown.as_str())
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

/// Parses the fleet's Redis: `redis://` or `rediss://` (TLS), with a host,
/// and optionally a user, a password and a database number.
pub fn parse_redis(text: &str) -> Result<RedisUrl, String> {
    const FORM: &str = "expected redis://[user:password@]host[:port][/db] or rediss://...";
    let url = url::Url::parse(text.trim()).map_err(|e| format!("{FORM} ({e})"))?;
    if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none() {
        return Err(FORM.into());
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(format!("{FORM}: the path is a database number"));
    }
    Ok(RedisUrl(url))
}

pub(super) fn de_redis<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<RedisUrl>, D::Error> {
    text_value(d, parse_redis)
}

/// A file value written as its flag is (a string), read by the flag's own
/// parser. A bad value fails the file's parse, which names its line and
/// field.
fn text_value<'de, D, T>(
    deserializer: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    match Option::<String>::deserialize(deserializer)? {
        Some(text) => parse(&text).map(Some).map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

pub(super) fn de_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    text_value(d, parse_duration)
}

pub(super) fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    text_value(d, parse_size)
}

pub(super) fn de_upstream<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<url::Url>, D::Error> {
    text_value(d, parse_upstream)
}

pub(super) fn de_header_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<http::HeaderName>, D::Error> {
    text_value(d, parse_header_name)
}

pub(super) fn de_listen<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Listen>, D::Error> {
    text_value(d, parse_listen)
}

pub(super) fn de_cidrs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ipnet::IpNet>>, D::Error> {
    match Option::<Vec<String>>::deserialize(d)? {
        Some(texts) => texts
            .iter()
            .map(|text| parse_cidr(text).map_err(serde::de::Error::custom))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        None => Ok(None),
    }
}

/// A count in the file (a TOML integer): at least one.
pub(super) fn de_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<usize>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom(COUNT)),
        other => Ok(other),
    }
}

/// A percentage in the file (a TOML integer): 0 to 100.
pub(super) fn de_percent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(p) => u8::try_from(p)
            .ok()
            .filter(|p| *p <= 100)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(PERCENT)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_listen_is_an_address_or_off() {
        assert_eq!(parse_listen("off"), Ok(Listen::Off));
        assert_eq!(parse_listen("OFF").map(Listen::address), Ok(None));
        assert_eq!(
            parse_listen("127.0.0.1:7000").map(Listen::address),
            Ok(Some("127.0.0.1:7000".parse().unwrap()))
        );
        assert!(parse_listen("nowhere").is_err());
        assert_ne!(DEFAULT_ADMIN_LISTEN.port(), 9090, "Prometheus' port");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse_duration("100y"), Ok(MAX_DURATION));
        assert!(parse_duration("101y")
            .unwrap_err()
            .contains("at most 100 years"));
        for bad in ["", "10", "ten", "10x", "s", "-1s", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        for bad in ["", "MiB", "12XB", "-1", "1.5MiB", "99999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn switches() {
        for on in ["true", "1", "yes", "ON"] {
            assert_eq!(parse_switch(on), Ok(true), "{on}");
            assert_eq!(parse_negated_switch(on), Ok(false), "{on}");
        }
        for off in ["false", "0", "no", "off"] {
            assert_eq!(parse_switch(off), Ok(false), "{off}");
        }
        assert!(parse_switch("maybe").is_err());
        assert_eq!(parse_percent("100"), Ok(100));
        assert!(parse_percent("101").is_err());
    }

    #[test]
    fn upstream_urls() {
        assert!(parse_upstream("http://127.0.0.1:3000").is_ok());
        assert!(parse_upstream("https://backend.internal/api").is_ok());
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("127.0.0.1:3000").is_err());
        assert!(parse_upstream("http://x/?a=1").is_err());
    }
}
