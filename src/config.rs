//! Command line and configuration: clap flags (each also from `SWR_<FLAG>`),
//! the defaults, and `validate()`, which runs before anything binds.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::policy::CacheControlMode;

/// The command line. Without a subcommand it runs the proxy.
#[derive(Debug, Parser)]
#[command(
    name = "swr-proxy",
    version,
    about = "A stale-while-revalidate caching reverse proxy",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a built-in demo backend (a slow "ranking" endpoint) with the proxy in front of it.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// The proxy's flags. Durations read like `250ms`, `10s`, `5m`, `1h`;
/// sizes like `512`, `64KiB`, `256MiB`, `1GiB`.
#[derive(Debug, Args, Clone)]
pub struct ProxyArgs {
    /// Address to accept client connections on.
    #[arg(
        long,
        env = "SWR_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// The backend, e.g. http://127.0.0.1:3000 (required, except for `demo`).
    #[arg(long, env = "SWR_UPSTREAM", value_name = "URL", value_parser = parse_upstream)]
    pub upstream: Option<reqwest::Url>,

    /// How long an entry is fresh [default: 10s; 3s for `demo`].
    #[arg(long, env = "SWR_TTL", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub ttl: Option<Duration>,

    /// How long after it turns stale an entry is still served at once while it is refreshed.
    #[arg(long, env = "SWR_STALE_WHILE_REVALIDATE", default_value = "60s", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub stale_while_revalidate: Duration,

    /// How long after it turns stale an entry may be served when the backend fails.
    #[arg(long, env = "SWR_STALE_IF_ERROR", default_value = "5m", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub stale_if_error: Duration,

    /// Memory budget of the cache (keys, headers and bodies).
    #[arg(long, env = "SWR_MAX_SIZE", default_value = "256MiB", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_size: u64,

    /// Larger responses are streamed through and not stored.
    #[arg(long, env = "SWR_MAX_OBJECT_SIZE", default_value = "8MiB", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_object_size: u64,

    /// Background refreshes running at once.
    #[arg(long, env = "SWR_REFRESH_CONCURRENCY", default_value_t = 8, value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub refresh_concurrency: usize,

    /// Refreshes waiting for a worker; past this, refreshes are dropped (and counted).
    #[arg(long, env = "SWR_REFRESH_QUEUE", default_value_t = 10_000, value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub refresh_queue: usize,

    /// Time allowed for the backend to answer (connect, headers, and a stored body).
    #[arg(long, env = "SWR_UPSTREAM_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub upstream_timeout: Duration,

    /// `honor`: the backend's Cache-Control decides (RFC 9111), the ttl and
    /// windows above are defaults. `override`: they apply whatever the backend
    /// says about freshness (no-store, private and Set-Cookie still prevent storing).
    #[arg(long, env = "SWR_CACHE_CONTROL", default_value = "honor", value_name = "MODE", value_parser = parse_mode, allow_hyphen_values = true)]
    pub cache_control: CacheControlMode,

    /// Let clients' Cache-Control (no-cache, max-age, max-stale, min-fresh,
    /// only-if-cached, no-store) and Pragma: no-cache steer the cache. Off by
    /// default: a client cannot force traffic onto the backend.
    #[arg(long, env = "SWR_HONOR_CLIENT_CACHE_CONTROL")]
    pub honor_client_cache_control: bool,

    /// A response header that overrides Cache-Control for this proxy only
    /// (RFC 9213), and is not forwarded to clients.
    #[arg(long, env = "SWR_TARGETED_CACHE_CONTROL", default_value = "swr-cache-control", value_name = "HEADER", value_parser = parse_header_name)]
    pub targeted_cache_control: http::HeaderName,

    /// Address of the admin API (metrics, health, purge, stats). A
    /// non-loopback address needs --admin-token.
    #[arg(
        long,
        env = "SWR_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,

    /// Every admin request must carry `Authorization: Bearer <TOKEN>`.
    #[arg(
        long,
        env = "SWR_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Most requests in flight to the backend at once (0: no cap). Client
    /// misses go first: refreshes never take the last slot.
    #[arg(long, env = "SWR_UPSTREAM_CONCURRENCY", default_value_t = 256, value_name = "N", value_parser = parse_count_or_zero, allow_hyphen_values = true)]
    pub upstream_concurrency: usize,

    /// Log format: text or json.
    #[arg(long, env = "SWR_LOG_FORMAT", default_value = "text", value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log one line per request at info level (cache status, age, time taken).
    #[arg(long, env = "SWR_ACCESS_LOG")]
    pub access_log: bool,

    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SWR_SHUTDOWN_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub shutdown_timeout: Duration,
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: reqwest::Url,
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub max_size_bytes: u64,
    pub max_object_size_bytes: u64,
    pub refresh_concurrency: usize,
    pub refresh_queue: usize,
    pub upstream_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub cache_control: CacheControlMode,
    pub honor_client_cache_control: bool,
    pub targeted_cache_control: http::HeaderName,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub upstream_concurrency: usize,
    pub access_log: bool,
}

/// A configuration error: names the flag and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The default freshness when neither the flag nor the command sets one.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    /// Builds and validates the configuration. `upstream` stands in for a
    /// missing `--upstream` (the demo passes its own backend).
    pub fn from_args(
        args: &ProxyArgs,
        upstream: Option<reqwest::Url>,
        default_ttl: Duration,
    ) -> Result<Config, ConfigError> {
        let upstream = match args.upstream.clone().or(upstream) {
            Some(url) => url,
            None => return Err(ConfigError(
                "--upstream is required: the backend's URL, e.g. --upstream http://127.0.0.1:3000"
                    .into(),
            )),
        };
        let config = Config {
            listen: args.listen,
            upstream,
            ttl: args.ttl.unwrap_or(default_ttl),
            stale_while_revalidate: args.stale_while_revalidate,
            stale_if_error: args.stale_if_error,
            max_size_bytes: args.max_size,
            max_object_size_bytes: args.max_object_size,
            refresh_concurrency: args.refresh_concurrency,
            refresh_queue: args.refresh_queue,
            upstream_timeout: args.upstream_timeout,
            shutdown_timeout: args.shutdown_timeout,
            cache_control: args.cache_control,
            honor_client_cache_control: args.honor_client_cache_control,
            targeted_cache_control: args.targeted_cache_control.clone(),
            admin_listen: args.admin_listen,
            admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
            upstream_concurrency: args.upstream_concurrency,
            access_log: args.access_log,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between values that a single flag's parser cannot see.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_object_size_bytes > self.max_size_bytes {
            return Err(ConfigError(format!(
                "--max-object-size ({} bytes) must not exceed --max-size ({} bytes)",
                self.max_object_size_bytes, self.max_size_bytes
            )));
        }
        if self.max_object_size_bytes > u64::from(u32::MAX) {
            return Err(ConfigError("--max-object-size must be below 4GiB".into()));
        }
        if !self.admin_listen.ip().is_loopback() && self.admin_token.is_none() {
            return Err(ConfigError(format!(
                "--admin-listen {} is not a loopback address: set --admin-token too",
                self.admin_listen
            )));
        }
        if self.upstream_timeout.is_zero() {
            return Err(ConfigError(
                "--upstream-timeout must be above zero, e.g. 30s".into(),
            ));
        }
        Ok(())
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`, `1d`, or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const FORM: &str = "expected a duration like 250ms, 10s, 5m or 1h";
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{FORM} (a unit is required)"))?;
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| FORM.to_string())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(FORM.to_string()),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{FORM} (too large)"))
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
fn parse_mode(text: &str) -> Result<CacheControlMode, String> {
    match text.trim() {
        "honor" => Ok(CacheControlMode::Honor),
        "override" => Ok(CacheControlMode::Override),
        _ => Err("expected honor or override".into()),
    }
}

/// Parses a header name, e.g. swr-cache-control.
fn parse_header_name(text: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| "expected a header name like swr-cache-control".to_string())
}

/// Parses a count, zero allowed.
fn parse_count_or_zero(text: &str) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .map_err(|_| "expected a whole number (0 for no cap)".into())
}

/// Parses a count of at least one.
fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// Parses the backend URL: `http` or `https`, with a host.
fn parse_upstream(text: &str) -> Result<reqwest::Url, String> {
    const FORM: &str = "expected an http(s) URL like http://127.0.0.1:3000";
    let url = reqwest::Url::parse(text.trim()).map_err(|e| format!("{FORM} ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(FORM.into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{FORM}, without a query or fragment"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "10",
            "ten",
            "10x",
            "s",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
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
    fn upstream_urls() {
        assert!(parse_upstream("http://127.0.0.1:3000").is_ok());
        assert!(parse_upstream("https://backend.internal/api").is_ok());
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("127.0.0.1:3000").is_err());
        assert!(parse_upstream("http://x/?a=1").is_err());
    }
}
