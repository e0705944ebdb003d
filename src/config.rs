//! Configuration: clap flags (each also from `SWR_<FLAG>`), an optional TOML
//! file (`--config`) with the same settings and per-route rules, the
//! defaults, and `validate()`, which runs before anything binds. A flag given
//! on the command line (or in the environment) overrides the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::cache::policy::CacheControlMode;
use crate::routes::{Cookies, Glob, PathMatcher, Route};

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
// Parsed once at start: the size of the demo's flags does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Start a built-in demo backend (a slow "ranking" endpoint) with the proxy in front of it.
    Demo(DemoArgs),
    /// Validate a configuration file: exit 0, or 2 naming the bad field and line.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The file to check.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// The proxy's flags. Durations read like `250ms`, `10s`, `5m`, `1h`;
/// sizes like `512`, `64KiB`, `256MiB`, `1GiB`. Defaults are applied after
/// the configuration file, so a flag left out does not hide the file's value.
#[derive(Debug, Args, Clone, Default)]
pub struct ProxyArgs {
    /// A TOML configuration file (every flag has a file equivalent; flags win).
    #[arg(long, env = "SWR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to accept client connections on [default: 127.0.0.1:8080].
    #[arg(long, env = "SWR_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The backend, e.g. http://127.0.0.1:3000 (required, except for `demo`).
    #[arg(long, env = "SWR_UPSTREAM", value_name = "URL", value_parser = parse_upstream)]
    pub upstream: Option<url::Url>,

    /// How long an entry is fresh [default: 10s; 3s for `demo`].
    #[arg(long, env = "SWR_TTL", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub ttl: Option<Duration>,

    /// Freshness of a response with `Last-Modified` and no explicit
    /// freshness: this percentage of the time since it was modified, at
    /// most --ttl [default: off, the ttl applies; 10 with --ttl 0].
    #[arg(long, env = "SWR_HEURISTIC_FRESHNESS", value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub heuristic_freshness: Option<u8>,

    /// How long after it turns stale an entry is still served at once while
    /// it is refreshed [default: 60s].
    #[arg(long, env = "SWR_STALE_WHILE_REVALIDATE", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub stale_while_revalidate: Option<Duration>,

    /// How long after it turns stale an entry may be served when the backend
    /// fails [default: 5m].
    #[arg(long, env = "SWR_STALE_IF_ERROR", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub stale_if_error: Option<Duration>,

    /// Memory budget of the cache: keys, headers and bodies [default: 256MiB].
    #[arg(long, env = "SWR_MAX_SIZE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_size: Option<u64>,

    /// Larger responses are streamed through and not stored [default: 8MiB].
    #[arg(long, env = "SWR_MAX_OBJECT_SIZE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_object_size: Option<u64>,

    /// Most body bytes read to store at once, across every fill and refresh;
    /// a body that would pass it is streamed through, not stored
    /// [default: 64MiB].
    #[arg(long, env = "SWR_MAX_BUFFERED", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_buffered: Option<u64>,

    /// Background refreshes running at once, at most 4096 [default: 8].
    #[arg(long, env = "SWR_REFRESH_CONCURRENCY", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub refresh_concurrency: Option<usize>,

    /// Refreshes waiting for a worker; past this, refreshes are dropped (and
    /// counted); at most 1048576 [default: 10000].
    #[arg(long, env = "SWR_REFRESH_QUEUE", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub refresh_queue: Option<usize>,

    /// Time allowed for the backend to answer (connect, headers, and a
    /// stored body) [default: 30s].
    #[arg(long, env = "SWR_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub upstream_timeout: Option<Duration>,

    /// `honor`: the backend's Cache-Control decides (RFC 9111), the ttl and
    /// windows above are defaults. `override`: they apply whatever the backend
    /// says about freshness (no-store, private and Set-Cookie still prevent
    /// storing) [default: honor].
    #[arg(long, env = "SWR_CACHE_CONTROL", value_name = "MODE", value_parser = parse_mode, allow_hyphen_values = true)]
    pub cache_control: Option<CacheControlMode>,

    /// Let clients' Cache-Control (no-cache, max-age, max-stale, min-fresh,
    /// only-if-cached, no-store) and Pragma: no-cache steer the cache. Off by
    /// default: a client cannot force traffic onto the backend.
    #[arg(long, env = "SWR_HONOR_CLIENT_CACHE_CONTROL")]
    pub honor_client_cache_control: bool,

    /// A response header that overrides Cache-Control for this proxy only
    /// (RFC 9213), and is not forwarded to clients [default: swr-cache-control].
    #[arg(long, env = "SWR_TARGETED_CACHE_CONTROL", value_name = "HEADER", value_parser = parse_header_name)]
    pub targeted_cache_control: Option<http::HeaderName>,

    /// Address of the admin API (metrics, health, purge, stats), or `off`.
    /// A non-loopback address needs --admin-token [default: 127.0.0.1:6180].
    #[arg(long, env = "SWR_ADMIN_LISTEN", value_name = "ADDR|off", value_parser = parse_listen)]
    pub admin_listen: Option<Listen>,

    /// Every admin request must carry `Authorization: Bearer <TOKEN>`.
    #[arg(
        long,
        env = "SWR_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Read the admin token from this file (its first line), so that it is
    /// not in the process list; instead of --admin-token.
    #[arg(long, env = "SWR_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Most requests in flight to the backend at once (0: no cap; at most
    /// 1048576). Client
    /// misses go first: refreshes never take the last slot [default: 256].
    #[arg(long, env = "SWR_UPSTREAM_CONCURRENCY", value_name = "N", value_parser = parse_count_or_zero, allow_hyphen_values = true)]
    pub upstream_concurrency: Option<usize>,

    /// Log format: text or json [default: text].
    #[arg(long, env = "SWR_LOG_FORMAT", value_name = "FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log one line per request at info level (cache status, age, time taken).
    #[arg(long, env = "SWR_ACCESS_LOG")]
    pub access_log: bool,

    /// How often an info line sums up what happened since the last one
    /// (answers; refreshes done, failed, dropped; log lines dropped), or 0
    /// for never; at least 1s [default: 60s].
    #[arg(long, env = "SWR_LOG_SUMMARY_INTERVAL", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub log_summary_interval: Option<Duration>,

    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish [default: 30s].
    #[arg(long, env = "SWR_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub shutdown_timeout: Option<Duration>,

    /// How long a client may take to send a request's headers, counted from
    /// when its connection opens or its last answer ends; a slower or idle
    /// keep-alive connection is closed (nginx's client_header_timeout and
    /// keepalive_timeout) [default: 60s].
    #[arg(long, env = "SWR_CLIENT_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub client_header_timeout: Option<Duration>,

    /// How long an answer's write to a client may make no progress (a client
    /// that stopped reading) before the connection is dropped (nginx's
    /// send_timeout) [default: 60s].
    #[arg(long, env = "SWR_CLIENT_WRITE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub client_write_timeout: Option<Duration>,

    /// Threads that serve requests (nginx's worker_processes) [default: one
    /// per core]. Leave a load generator on the same machine its own cores.
    #[arg(long, env = "SWR_THREADS", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub threads: Option<usize>,

    /// Serve every request through hyper. By default plain HTTP/1.1 GET
    /// hits are answered without it, from the entry's stored bytes.
    #[arg(long, env = "SWR_NO_FAST_HITS")]
    pub no_fast_hits: bool,

    /// Peers (addresses or CIDRs, comma-separated) whose `Forwarded` and
    /// `X-Forwarded-*` headers are kept and appended to: a load balancer in
    /// front. From anyone else they are dropped [default: none].
    #[arg(long, env = "SWR_TRUST_FORWARDED", value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub trust_forwarded: Option<Vec<ipnet::IpNet>>,

    /// Longest request target, and longest header line; longer is answered
    /// 414 (target) or 431 (header) and never forwarded [default: 8KiB].
    #[arg(long, env = "SWR_MAX_REQUEST_LINE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_request_line: Option<u64>,

    /// Largest request header block; larger is answered 431 and never
    /// forwarded [default: 32KiB].
    #[arg(long, env = "SWR_MAX_REQUEST_HEADERS", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub max_request_headers: Option<u64>,
}

/// The configuration file: every flag, by the same name with `_` for `-`,
/// and a `[[route]]` list. Unknown fields are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "file_upstream")]
    pub upstream: Option<url::Url>,
    #[serde(default, deserialize_with = "file_duration")]
    pub ttl: Option<Duration>,
    pub heuristic_freshness: Option<u8>,
    #[serde(default, deserialize_with = "file_duration")]
    pub stale_while_revalidate: Option<Duration>,
    #[serde(default, deserialize_with = "file_duration")]
    pub stale_if_error: Option<Duration>,
    #[serde(default, deserialize_with = "file_size")]
    pub max_size: Option<u64>,
    #[serde(default, deserialize_with = "file_size")]
    pub max_object_size: Option<u64>,
    #[serde(default, deserialize_with = "file_size")]
    pub max_buffered: Option<u64>,
    pub refresh_concurrency: Option<usize>,
    pub refresh_queue: Option<usize>,
    #[serde(default, deserialize_with = "file_duration")]
    pub upstream_timeout: Option<Duration>,
    pub cache_control: Option<CacheControlMode>,
    pub honor_client_cache_control: Option<bool>,
    #[serde(default, deserialize_with = "file_header_name")]
    pub targeted_cache_control: Option<http::HeaderName>,
    #[serde(default, deserialize_with = "file_listen")]
    pub admin_listen: Option<Listen>,
    pub admin_token: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    pub upstream_concurrency: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub access_log: Option<bool>,
    #[serde(default, deserialize_with = "file_duration")]
    pub log_summary_interval: Option<Duration>,
    #[serde(default, deserialize_with = "file_duration")]
    pub shutdown_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "file_duration")]
    pub client_header_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "file_duration")]
    pub client_write_timeout: Option<Duration>,
    pub threads: Option<usize>,
    pub fast_hits: Option<bool>,
    #[serde(default, deserialize_with = "file_cidrs")]
    pub trust_forwarded: Option<Vec<ipnet::IpNet>>,
    #[serde(default, deserialize_with = "file_size")]
    pub max_request_line: Option<u64>,
    #[serde(default, deserialize_with = "file_size")]
    pub max_request_headers: Option<u64>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteFile>,
}

/// One `[[route]]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// A path prefix (`/ranking`), or a glob with `*` (`/users/*/similar`).
    pub path: String,
    #[serde(default, deserialize_with = "file_duration")]
    pub ttl: Option<Duration>,
    pub heuristic_freshness: Option<u8>,
    #[serde(default, deserialize_with = "file_duration")]
    pub stale_while_revalidate: Option<Duration>,
    #[serde(default, deserialize_with = "file_duration")]
    pub stale_if_error: Option<Duration>,
    pub cache_control: Option<CacheControlMode>,
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

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: url::Url,
    pub ttl: Duration,
    /// `--heuristic-freshness`: unset, the ttl applies (10% with a ttl of 0).
    pub heuristic_freshness: Option<u8>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub max_size_bytes: u64,
    pub max_object_size_bytes: u64,
    /// `--max-buffered`: body bytes read to store at once.
    pub max_buffered_bytes: u64,
    pub refresh_concurrency: usize,
    pub refresh_queue: usize,
    pub upstream_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub client_header_timeout: Duration,
    /// `--client-write-timeout`: a blocked write to a client, at most.
    pub client_write_timeout: Duration,
    /// Worker threads of the runtime; read once at start (a reload keeps them).
    pub threads: usize,
    pub cache_control: CacheControlMode,
    pub honor_client_cache_control: bool,
    pub targeted_cache_control: http::HeaderName,
    /// `None`: `--admin-listen off`.
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
    pub upstream_concurrency: usize,
    pub log_format: LogFormat,
    pub access_log: bool,
    /// How often the summary line is logged; zero: never. Read at start.
    pub log_summary_interval: Duration,
    /// Answer plain HTTP/1.1 GET hits without hyper (see `fast_hits`);
    /// read once at start.
    pub fast_hits: bool,
    /// Peers whose forwarding headers are kept (`--trust-forwarded`).
    pub trust_forwarded: Vec<ipnet::IpNet>,
    /// Longest request target and header line (414 / 431 past it).
    pub max_request_line: u64,
    /// Largest request header block (431 past it).
    pub max_request_headers: u64,
    /// First match wins; a request no route matches uses the values above.
    pub routes: Vec<Route>,
    /// The file this came from, re-read on reload.
    pub config_file: Option<PathBuf>,
    /// The flags it was built from, applied again over the file on reload.
    pub source: ProxyArgs,
    /// The ttl used when neither a flag nor the file sets one.
    pub default_ttl: Duration,
}

/// A configuration error: names the flag (or the file's field and line) and
/// what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses a configuration file; errors name the file, the line and
/// the field.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
    parse_file(&text, path)
}

/// Parses the text of a configuration file read from `path`; errors name
/// `path`, the line and the field.
pub fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
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

/// A file value written as its flag is, read by the flag's own parser: one
/// parser per setting, whichever way the value comes in. A bad value fails
/// the file's parse, and [`parse_file`] names its line and field.
fn file_value<'de, D, T>(
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

fn file_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    file_value(d, parse_duration)
}

fn file_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    file_value(d, parse_size)
}

fn file_upstream<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<url::Url>, D::Error> {
    file_value(d, parse_upstream)
}

fn file_header_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<http::HeaderName>, D::Error> {
    file_value(d, parse_header_name)
}

fn file_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Listen>, D::Error> {
    file_value(d, parse_listen)
}

fn file_cidrs<'de, D: serde::Deserializer<'de>>(
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

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The default freshness when neither the flag nor the command sets one.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    /// Builds and validates the configuration from the flags, over the file
    /// named by `--config` if any. `upstream` stands in for a missing
    /// `--upstream` (the demo passes its own backend).
    pub fn from_args(
        args: &ProxyArgs,
        upstream: Option<url::Url>,
        default_ttl: Duration,
    ) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::merge(args, &file, upstream, default_ttl)
    }

    /// Flags over file over defaults, then `validate()`.
    pub fn merge(
        args: &ProxyArgs,
        file: &FileConfig,
        upstream: Option<url::Url>,
        default_ttl: Duration,
    ) -> Result<Config, ConfigError> {
        let upstream = match args.upstream.clone().or(file.upstream.clone()).or(upstream) {
            Some(url) => url,
            None => return Err(ConfigError(
                "--upstream is required: the backend's URL, e.g. --upstream http://127.0.0.1:3000"
                    .into(),
            )),
        };
        let targeted = args
            .targeted_cache_control
            .clone()
            .or_else(|| file.targeted_cache_control.clone())
            .unwrap_or_else(|| http::HeaderName::from_static("swr-cache-control"));
        let log_format = args.log_format.or(file.log_format).unwrap_or_default();
        let ttl = args.ttl.or(file.ttl).unwrap_or(default_ttl);
        let stale_while_revalidate = args
            .stale_while_revalidate
            .or(file.stale_while_revalidate)
            .unwrap_or(Duration::from_secs(60));
        let stale_if_error = args
            .stale_if_error
            .or(file.stale_if_error)
            .unwrap_or(Duration::from_secs(300));
        let heuristic_freshness = args.heuristic_freshness.or(file.heuristic_freshness);
        let percent = |value: Option<u8>, name: &str| match value {
            Some(p) if p > 100 => Err(ConfigError(format!(
                "{name} = {p} in the config file: expected a percentage from 0 to 100"
            ))),
            _ => Ok(()),
        };
        percent(file.heuristic_freshness, "heuristic_freshness")?;
        for (i, route) in file.routes.iter().enumerate() {
            percent(
                route.heuristic_freshness,
                &format!("route[{i}].heuristic_freshness"),
            )?;
        }
        let cache_control = args
            .cache_control
            .or(file.cache_control)
            .unwrap_or_default();
        let routes = file
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                validate_route(
                    i,
                    route,
                    ttl,
                    stale_while_revalidate,
                    stale_if_error,
                    cache_control,
                )
                .map(|mut route| {
                    route.heuristic_freshness = route.heuristic_freshness.or(heuristic_freshness);
                    route
                })
            })
            .collect::<Result<Vec<Route>, ConfigError>>()?;
        let trust_forwarded = args
            .trust_forwarded
            .clone()
            .or_else(|| file.trust_forwarded.clone())
            .unwrap_or_default();
        let count = |value: Option<usize>, name: &str| match value {
            Some(0) => Err(ConfigError(format!(
                "{name} = 0 in the config file: expected a whole number of at least 1"
            ))),
            other => Ok(other),
        };
        let config = Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            upstream,
            ttl,
            heuristic_freshness,
            stale_while_revalidate,
            stale_if_error,
            max_size_bytes: args.max_size.or(file.max_size).unwrap_or(256 << 20),
            max_object_size_bytes: args
                .max_object_size
                .or(file.max_object_size)
                .unwrap_or(8 << 20),
            max_buffered_bytes: args.max_buffered.or(file.max_buffered).unwrap_or(64 << 20),
            refresh_concurrency: args
                .refresh_concurrency
                .or(count(file.refresh_concurrency, "refresh_concurrency")?)
                .unwrap_or(8),
            refresh_queue: args
                .refresh_queue
                .or(count(file.refresh_queue, "refresh_queue")?)
                .unwrap_or(10_000),
            upstream_timeout: args
                .upstream_timeout
                .or(file.upstream_timeout)
                .unwrap_or(Duration::from_secs(30)),
            shutdown_timeout: args
                .shutdown_timeout
                .or(file.shutdown_timeout)
                .unwrap_or(Duration::from_secs(30)),
            client_header_timeout: args
                .client_header_timeout
                .or(file.client_header_timeout)
                .unwrap_or(Duration::from_secs(60)),
            client_write_timeout: args
                .client_write_timeout
                .or(file.client_write_timeout)
                .unwrap_or(Duration::from_secs(60)),
            threads: args
                .threads
                .or(count(file.threads, "threads")?)
                .unwrap_or_else(default_threads),
            cache_control,
            honor_client_cache_control: args.honor_client_cache_control
                || file.honor_client_cache_control.unwrap_or(false),
            targeted_cache_control: targeted,
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(Listen::At(DEFAULT_ADMIN_LISTEN))
                .address(),
            admin_token: admin_token(args, file)?,
            upstream_concurrency: args
                .upstream_concurrency
                .or(file.upstream_concurrency)
                .unwrap_or(256),
            log_format,
            access_log: args.access_log || file.access_log.unwrap_or(false),
            log_summary_interval: args
                .log_summary_interval
                .or(file.log_summary_interval)
                .unwrap_or(Duration::from_secs(60)),
            fast_hits: !args.no_fast_hits && file.fast_hits.unwrap_or(true),
            trust_forwarded,
            max_request_line: args
                .max_request_line
                .or(file.max_request_line)
                .unwrap_or(8 << 10),
            max_request_headers: args
                .max_request_headers
                .or(file.max_request_headers)
                .unwrap_or(
                    // At least one line's worth when only the line limit is raised.
                    args.max_request_line
                        .or(file.max_request_line)
                        .unwrap_or(0)
                        .max(32 << 10),
                ),
            routes,
            config_file: args.config.clone(),
            source: args.clone(),
            default_ttl,
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
        if self.max_buffered_bytes < self.max_object_size_bytes {
            return Err(ConfigError(format!(
                "--max-buffered ({} bytes) must be at least --max-object-size ({} bytes)",
                self.max_buffered_bytes, self.max_object_size_bytes
            )));
        }
        if self.max_object_size_bytes > u64::from(u32::MAX) {
            return Err(ConfigError("--max-object-size must be below 4GiB".into()));
        }
        if let Some(admin) = self.admin_listen {
            if !admin.ip().is_loopback() && self.admin_token.is_none() {
                return Err(ConfigError(format!(
                    "--admin-listen {admin} is not a loopback address: set --admin-token too"
                )));
            }
        }
        if self.upstream_timeout.is_zero() {
            return Err(ConfigError(
                "--upstream-timeout must be above zero, e.g. 30s".into(),
            ));
        }
        if self.threads > MAX_THREADS {
            return Err(ConfigError(format!(
                "--threads {} is more than {MAX_THREADS}: one per core is the most that helps",
                self.threads
            )));
        }
        // Each of these sizes something at start (tasks, a semaphore, a
        // channel): past its bound it is a typo that would panic or exhaust
        // memory there, so it is refused here.
        for (flag, value, max) in [
            (
                "--refresh-concurrency",
                self.refresh_concurrency,
                MAX_REFRESH_CONCURRENCY,
            ),
            ("--refresh-queue", self.refresh_queue, MAX_QUEUED_REFRESHES),
            (
                "--upstream-concurrency",
                self.upstream_concurrency,
                MAX_UPSTREAM_CONCURRENCY,
            ),
        ] {
            if value > max {
                return Err(ConfigError(format!(
                    "{flag} {value} is more than {max}, the most it may be"
                )));
            }
        }
        if !(256..=(1 << 20)).contains(&self.max_request_line) {
            return Err(ConfigError(
                "--max-request-line must be between 256 and 1MiB, e.g. 8KiB".into(),
            ));
        }
        if !(self.max_request_line..=(4 << 20)).contains(&self.max_request_headers) {
            return Err(ConfigError(
                "--max-request-headers must be at least --max-request-line and at most 4MiB, e.g. 32KiB"
                    .into(),
            ));
        }
        if self.client_write_timeout.is_zero() {
            return Err(ConfigError(
                "--client-write-timeout must be above zero, e.g. 60s".into(),
            ));
        }
        if self.client_header_timeout.is_zero() {
            return Err(ConfigError(
                "--client-header-timeout must be above zero, e.g. 60s".into(),
            ));
        }
        if !self.log_summary_interval.is_zero()
            && self.log_summary_interval < Duration::from_secs(1)
        {
            return Err(ConfigError(
                "--log-summary-interval must be 0 (no summary) or at least 1s, e.g. 60s".into(),
            ));
        }
        Ok(())
    }

    /// The settings that differ in `other` and that a reload does not
    /// apply: they take effect at the next start. A reload applies the
    /// routes and the caching rules (lifetimes, Cache-Control handling).
    pub fn start_only_changes(&self, other: &Config) -> Vec<&'static str> {
        [
            ("listen", self.listen != other.listen),
            ("admin_listen", self.admin_listen != other.admin_listen),
            ("admin_token", self.admin_token != other.admin_token),
            ("upstream", self.upstream != other.upstream),
            ("threads", self.threads != other.threads),
            ("max_size", self.max_size_bytes != other.max_size_bytes),
            (
                "max_object_size",
                self.max_object_size_bytes != other.max_object_size_bytes,
            ),
            (
                "max_buffered",
                self.max_buffered_bytes != other.max_buffered_bytes,
            ),
            (
                "refresh_concurrency",
                self.refresh_concurrency != other.refresh_concurrency,
            ),
            ("refresh_queue", self.refresh_queue != other.refresh_queue),
            (
                "upstream_timeout",
                self.upstream_timeout != other.upstream_timeout,
            ),
            (
                "upstream_concurrency",
                self.upstream_concurrency != other.upstream_concurrency,
            ),
            (
                "shutdown_timeout",
                self.shutdown_timeout != other.shutdown_timeout,
            ),
            (
                "client_header_timeout",
                self.client_header_timeout != other.client_header_timeout,
            ),
            (
                "client_write_timeout",
                self.client_write_timeout != other.client_write_timeout,
            ),
            ("log_format", self.log_format != other.log_format),
            ("access_log", self.access_log != other.access_log),
            (
                "log_summary_interval",
                self.log_summary_interval != other.log_summary_interval,
            ),
            ("fast_hits", self.fast_hits != other.fast_hits),
            (
                "max_request_line",
                self.max_request_line != other.max_request_line,
            ),
            (
                "max_request_headers",
                self.max_request_headers != other.max_request_headers,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// The route for a request path: the first that matches.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

fn validate_route(
    index: usize,
    route: &RouteFile,
    ttl: Duration,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    cache_control: CacheControlMode,
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
        heuristic_freshness: route.heuristic_freshness,
        pattern: route.path.clone(),
        matcher: PathMatcher::new(&route.path),
        ttl: route.ttl.unwrap_or(ttl),
        stale_while_revalidate: route
            .stale_while_revalidate
            .unwrap_or(stale_while_revalidate),
        stale_if_error: route.stale_if_error.unwrap_or(stale_if_error),
        cache_control: route.cache_control.unwrap_or(cache_control),
        bypass: route.bypass,
        ignore_query: route.ignore_query.iter().map(|p| Glob::new(p)).collect(),
        keep_query: route.keep_query.iter().map(|p| Glob::new(p)).collect(),
        sort_query: route.sort_query,
        key_headers,
        cookies,
    })
}

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

/// The longest duration a setting takes: past it, a value is a typo, and
/// one near `u64::MAX` milliseconds would overflow what is derived from it.
/// 100 years of humantime's 365.25 days.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

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

/// The admin token: `--admin-token`, else `--admin-token-file`, else the
/// file's `admin_token` or `admin_token_file`. A token and a token file
/// given together are an error, as is an empty or unreadable token file.
fn admin_token(args: &ProxyArgs, file: &FileConfig) -> Result<Option<String>, ConfigError> {
    let read = |path: &Path, name: &str| {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{name} {}: cannot read: {e}", path.display())))?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(ConfigError(format!(
                "{name} {}: the file holds no token",
                path.display()
            )));
        }
        Ok(Some(token))
    };
    match (&args.admin_token, &args.admin_token_file) {
        (Some(_), Some(_)) => Err(ConfigError(
            "--admin-token and --admin-token-file: give one of them".into(),
        )),
        (Some(token), None) => Ok(Some(token.clone()).filter(|t| !t.is_empty())),
        (None, Some(path)) => read(path, "--admin-token-file"),
        (None, None) => match (&file.admin_token, &file.admin_token_file) {
            (Some(_), Some(_)) => Err(ConfigError(
                "admin_token and admin_token_file in the config file: give one of them".into(),
            )),
            (Some(token), None) => Ok(Some(token.clone()).filter(|t| !t.is_empty())),
            (None, Some(path)) => read(path, "admin_token_file"),
            (None, None) => Ok(None),
        },
    }
}

/// `--max-request-line` and `--max-request-headers`: one check that the
/// fast path and hyper's path both make, so that a head one refuses is
/// never answered by the other.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Longest request target, and longest header line (`name: value`).
    pub line: usize,
    /// Largest header block (every `name: value\r\n`).
    pub headers: usize,
}

impl HeadLimits {
    pub fn of(config: &Config) -> HeadLimits {
        HeadLimits {
            line: usize::try_from(config.max_request_line).unwrap_or(usize::MAX),
            headers: usize::try_from(config.max_request_headers).unwrap_or(usize::MAX),
        }
    }

    /// Checks a target's length and the (name, value) lengths of the
    /// header fields: 414 for the target, 431 for a line or the block.
    pub fn check(
        &self,
        target: usize,
        fields: impl Iterator<Item = (usize, usize)>,
    ) -> Result<(), crate::error::ProxyError> {
        if target > self.line {
            return Err(crate::error::ProxyError::UriTooLong);
        }
        let mut block: usize = 0;
        for (name, value) in fields {
            let line = name + 2 + value;
            block = block.saturating_add(line + 2);
            if line > self.line || block > self.headers {
                return Err(crate::error::ProxyError::HeadersTooLarge);
            }
        }
        Ok(())
    }

    /// What hyper may buffer of a request head: a target, the header block
    /// and the line endings (at least hyper's minimum, 8 KiB).
    pub fn buffer(&self) -> usize {
        self.line
            .saturating_add(self.headers)
            .saturating_add(1024)
            .max(8192)
    }
}

/// The admin API's default address. Not 9090 (Prometheus' own, which a
/// host that scrapes swr-proxy often runs) nor any common exporter's
/// (9100-9999), Varnish's (6081, 6082) or a web server's.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6180);

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
fn parse_listen(text: &str) -> Result<Listen, String> {
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

/// More serving threads than this is a typo, not a machine.
const MAX_THREADS: usize = 1024;
/// Refresh workers: each is a task started with the proxy.
pub const MAX_REFRESH_CONCURRENCY: usize = 4096;
/// Refreshes waiting for a worker (tokio's channel panics past 2^61).
pub const MAX_QUEUED_REFRESHES: usize = 1 << 20;
/// Requests in flight to the backend (tokio's semaphore panics past 2^61).
pub const MAX_UPSTREAM_CONCURRENCY: usize = 1 << 20;

/// One thread per core the process may run on.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}

/// Parses a count of at least one.
fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// Parses the backend URL: `http` or `https`, with a host.
fn parse_upstream(text: &str) -> Result<url::Url, String> {
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

    fn file(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn file_values_and_flag_overrides() {
        let f = file(
            "upstream = \"http://127.0.0.1:3000\"\nttl = \"30s\"\nmax_size = \"64MiB\"\n\
             [[route]]\npath = \"/similar\"\nttl = \"1h\"\nignore_query = [\"utm_*\"]\n",
        )
        .unwrap();
        let config = Config::merge(&ProxyArgs::default(), &f, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(config.ttl, Duration::from_secs(30));
        assert_eq!(config.max_size_bytes, 64 << 20);
        assert_eq!(
            config.stale_while_revalidate,
            Duration::from_secs(60),
            "default"
        );
        assert_eq!(config.routes[0].ttl, Duration::from_secs(3600));
        assert_eq!(config.routes[0].stale_if_error, Duration::from_secs(300));
        assert!(config.route_for("/similar/42").is_some());
        assert!(config.route_for("/ranking").is_none());
        let args = ProxyArgs {
            ttl: Some(Duration::from_secs(5)),
            ..ProxyArgs::default()
        };
        let config = Config::merge(&args, &f, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(config.ttl, Duration::from_secs(5), "the flag wins");
        assert!(config.fast_hits, "on by default");
        let off = file("upstream = \"http://127.0.0.1:3000\"\nfast_hits = false\n").unwrap();
        let config = Config::merge(&ProxyArgs::default(), &off, None, Config::DEFAULT_TTL).unwrap();
        assert!(!config.fast_hits, "off in the file");
        let args = ProxyArgs {
            no_fast_hits: true,
            ..ProxyArgs::default()
        };
        let config = Config::merge(&args, &f, None, Config::DEFAULT_TTL).unwrap();
        assert!(!config.fast_hits, "off by flag");
    }

    #[test]
    fn log_summary_interval_from_file_or_flag_zero_is_off() {
        let none = file("upstream = \"http://127.0.0.1:3000\"\n").unwrap();
        let config =
            Config::merge(&ProxyArgs::default(), &none, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(
            config.log_summary_interval,
            Duration::from_secs(60),
            "default"
        );
        let f =
            file("upstream = \"http://127.0.0.1:3000\"\nlog_summary_interval = \"0\"\n").unwrap();
        let config = Config::merge(&ProxyArgs::default(), &f, None, Config::DEFAULT_TTL).unwrap();
        assert!(config.log_summary_interval.is_zero(), "off");
        let args = ProxyArgs {
            log_summary_interval: Some(Duration::from_secs(5)),
            ..ProxyArgs::default()
        };
        let config = Config::merge(&args, &f, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(
            config.log_summary_interval,
            Duration::from_secs(5),
            "the flag wins"
        );
        let short = file("upstream = \"http://x\"\nlog_summary_interval = \"10ms\"\n").unwrap();
        let err = Config::merge(&ProxyArgs::default(), &short, None, Config::DEFAULT_TTL)
            .unwrap_err()
            .0;
        assert!(err.contains("log-summary-interval"), "{err}");
    }

    #[test]
    fn file_errors_name_the_field() {
        assert!(file("ttll = \"1s\"").unwrap_err().contains("ttll"));
        // A value is checked by its flag's parser as the file is read, and
        // `parse_file` names the line and the field.
        let unreadable = |text: &str| {
            parse_file(text, Path::new("swr.toml"))
                .map(|_| ())
                .unwrap_err()
                .0
        };
        let ttl = unreadable("upstream = \"http://x\"\nttl = \"soon\"");
        assert!(ttl.contains("line 2: ttl: expected a duration"), "{ttl}");
        let upstream = unreadable("upstream = \"ftp://x\"");
        assert!(upstream.contains("line 1: upstream: "), "{upstream}");
        let size = unreadable("max_size = \"lots\"");
        assert!(size.contains("line 1: max_size: expected a size"), "{size}");
        let route = unreadable("[[route]]\npath = \"/\"\nstale_if_error = \"-1s\"");
        assert!(
            route.contains("line 3: route[0].stale_if_error: "),
            "{route}"
        );
        let bad = |text: &str| {
            let f = file(text).unwrap();
            Config::merge(&ProxyArgs::default(), &f, None, Config::DEFAULT_TTL)
                .unwrap_err()
                .0
        };
        let route = bad("upstream = \"http://x\"\n[[route]]\npath = \"x\"");
        assert!(route.contains("route[0].path"), "{route}");
        let both = bad(
            "upstream = \"http://x\"\n[[route]]\npath = \"/x\"\nignore_query = [\"a\"]\nkeep_query = [\"b\"]",
        );
        assert!(both.contains("route[0].ignore_query"), "{both}");
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
