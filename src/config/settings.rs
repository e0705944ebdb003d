//! Every setting, declared once: its flag (and `SWR_<FLAG>`), its name in
//! the configuration file, how its value is read, its default, and whether
//! a reload applies it. The `settings!` macro turns the one list into
//! [`Settings`] (what clap and serde both read: every value optional, so a
//! layer that leaves one out does not hide a lower layer's),
//! [`Settings::over`] (layering), and the resolved [`StartSettings`] and
//! [`LiveSettings`]. A reload compares two `StartSettings` field by field
//! ([`StartSettings::changes`]): a new setting is compared because it is
//! declared, not because someone remembered a list.
//!
//! Owns no relation between settings: [`super::Config::validate`] checks
//! those once the layers are resolved.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::file::RouteFile;
use super::values::*;
use super::{ConfigError, LogFormat, RefreshMode};
use crate::cache::policy::CacheControlMode;

/// The resolved type of a setting: itself when it has a default, optional
/// when it has none.
macro_rules! resolved {
    ($ty:ty) => { Option<$ty> };
    ($ty:ty, $default:expr) => { $ty };
}

/// A layer's value, or the default (which may `return` an error).
macro_rules! resolve {
    ($value:expr) => {
        $value.clone()
    };
    ($value:expr, $default:expr) => {
        match $value.clone() {
            Some(value) => value,
            None => $default,
        }
    };
}

macro_rules! settings {
    (
        $(#[$start_doc:meta])*
        start { $( $(#[$sm:meta])* $sname:ident : $sty:ty $(= $sdefault:expr)? ),* $(,)? }
        $(#[$live_doc:meta])*
        live { $( $(#[$lm:meta])* $lname:ident : $lty:ty $(= $ldefault:expr)? ),* $(,)? }
        other { $( $(#[$om:meta])* $oname:ident : $oty:ty ),* $(,)? }
    ) => {
        /// The proxy's settings as one layer gives them: the command line
        /// (flags and `SWR_*`), or the configuration file (every flag by the
        /// same name with `_` for `-`, and a `[[route]]` list; unknown
        /// fields are errors). Durations read like `250ms`, `10s`, `5m`,
        /// `1h`; sizes like `512`, `64KiB`, `256MiB`, `1GiB`.
        #[derive(Debug, Clone, Default, Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[$sm])* pub $sname: Option<$sty>, )*
            $( $(#[$lm])* pub $lname: Option<$lty>, )*
            $( $(#[$om])* pub $oname: Option<$oty>, )*
        }

        $(#[$start_doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct StartSettings {
            $( pub $sname: resolved!($sty $(, $sdefault)?), )*
        }

        $(#[$live_doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct LiveSettings {
            $( pub $lname: resolved!($lty $(, $ldefault)?), )*
        }

        impl Settings {
            /// This layer over `lower`: each value from this layer if it
            /// gives one, else from `lower`.
            pub fn over(self, lower: Settings) -> Settings {
                Settings {
                    $( $sname: self.$sname.or(lower.$sname), )*
                    $( $lname: self.$lname.or(lower.$lname), )*
                    $( $oname: self.$oname.or(lower.$oname), )*
                }
            }

            /// The values, with the defaults where no layer gave one.
            pub fn resolve(&self) -> Result<(StartSettings, LiveSettings), ConfigError> {
                Ok((
                    StartSettings { $( $sname: resolve!(self.$sname $(, $sdefault)?), )* },
                    LiveSettings { $( $lname: resolve!(self.$lname $(, $ldefault)?), )* },
                ))
            }
        }

        impl StartSettings {
            /// The names of the settings that differ in `other`.
            pub fn changes(&self, other: &StartSettings) -> Vec<&'static str> {
                let mut names = Vec::new();
                $( if self.$sname != other.$sname { names.push(stringify!($sname)); } )*
                names
            }
        }
    };
}

settings! {
    /// The settings read once, at start: a reload that changes one says so
    /// and keeps the running value.
    start {
        /// Address to accept client connections on [default: 127.0.0.1:8080].
        #[arg(long, env = "SWR_LISTEN", value_name = "ADDR")]
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),

        /// The backend, e.g. http://127.0.0.1:3000 (required, except for `demo`).
        #[arg(long, env = "SWR_UPSTREAM", value_name = "URL", value_parser = parse_upstream)]
        #[serde(default, deserialize_with = "de_upstream")]
        upstream: url::Url = return Err(ConfigError(
            "--upstream is required: the backend's URL, e.g. --upstream http://127.0.0.1:3000"
                .into(),
        )),

        /// An https backend is verified against the CA certificates in this
        /// PEM file only (a private CA); read at start [default: the
        /// compiled-in webpki roots].
        #[arg(long, env = "SWR_UPSTREAM_CA", value_name = "FILE")]
        upstream_ca: PathBuf,

        /// Address of the admin API (metrics, health, purge, stats), or `off`.
        /// A non-loopback address needs --admin-token [default: 127.0.0.1:6180].
        #[arg(long, env = "SWR_ADMIN_LISTEN", value_name = "ADDR|off", value_parser = parse_listen)]
        #[serde(default, deserialize_with = "de_listen")]
        admin_listen: Listen = Listen::At(DEFAULT_ADMIN_LISTEN),

        /// Every admin request must carry `Authorization: Bearer <TOKEN>`.
        #[arg(long, env = "SWR_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
        admin_token: String,

        /// Read the admin token from this file (its first line), so that it is
        /// not in the process list; instead of --admin-token.
        #[arg(long, env = "SWR_ADMIN_TOKEN_FILE", value_name = "FILE")]
        admin_token_file: PathBuf,

        /// Threads that serve requests (nginx's worker_processes) [default: one
        /// per core]. Leave a load generator on the same machine its own cores.
        #[arg(long, env = "SWR_THREADS", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_count")]
        threads: usize = default_threads(),

        /// Memory budget of the cache: keys, headers and bodies [default: 256MiB].
        #[arg(long, env = "SWR_MAX_SIZE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_size")]
        max_size: u64 = 256 << 20,

        /// Larger responses are streamed through and not stored [default: 8MiB].
        #[arg(long, env = "SWR_MAX_OBJECT_SIZE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_size")]
        max_object_size: u64 = 8 << 20,

        /// Most body bytes read to store at once, across every fill and refresh;
        /// a body that would pass it is streamed through, not stored
        /// [default: 64MiB].
        #[arg(long, env = "SWR_MAX_BUFFERED", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_size")]
        max_buffered: u64 = 64 << 20,

        /// Most background refreshes running at once, at most 4096: the
        /// ceiling of the limit that adapts to the backend's latency and
        /// errors, from 4 up [default: 256].
        #[arg(long, env = "SWR_REFRESH_CONCURRENCY", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_count")]
        refresh_concurrency: usize = 256,

        /// Refreshes waiting for a worker; past this, refreshes are dropped (and
        /// counted); at most 1048576 [default: 10000].
        #[arg(long, env = "SWR_REFRESH_QUEUE", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_count")]
        refresh_queue: usize = 10_000,

        /// Take the most valuable refresh first (a key's recent requests times
        /// how far past its ttl it is), and drop the least valuable when the
        /// queue is full (`=false`: first in, first out, the newest dropped)
        /// [default: true].
        #[arg(long, env = "SWR_REFRESH_PRIORITY", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_switch)]
        refresh_priority: bool = true,

        /// Time allowed for the backend to answer (connect, headers, and a
        /// stored body) [default: 30s].
        #[arg(long, env = "SWR_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        upstream_timeout: Duration = Duration::from_secs(30),

        /// Most requests in flight to the backend at once (0: no cap; at most
        /// 1048576). Client
        /// misses go first: refreshes never take the last slot [default: 512].
        #[arg(long, env = "SWR_UPSTREAM_CONCURRENCY", value_name = "N", value_parser = parse_count_or_zero, allow_hyphen_values = true)]
        upstream_concurrency: usize = 512,

        /// On SIGINT/SIGTERM, how long in-flight requests may take to finish [default: 30s].
        #[arg(long, env = "SWR_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        shutdown_timeout: Duration = Duration::from_secs(30),

        /// How long a client may take to send a request's headers, counted from
        /// when its connection opens or its last answer ends; a slower or idle
        /// keep-alive connection is closed (nginx's client_header_timeout and
        /// keepalive_timeout) [default: 60s].
        #[arg(long, env = "SWR_CLIENT_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        client_header_timeout: Duration = Duration::from_secs(60),

        /// How long an answer's write to a client may make no progress (a client
        /// that stopped reading) before the connection is dropped (nginx's
        /// send_timeout) [default: 60s].
        #[arg(long, env = "SWR_CLIENT_WRITE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        client_write_timeout: Duration = Duration::from_secs(60),

        /// A response header that overrides Cache-Control for this proxy only
        /// (RFC 9213), and is not forwarded to clients; read at start
        /// [default: swr-cache-control].
        #[arg(long, env = "SWR_TARGETED_CACHE_CONTROL", value_name = "HEADER", value_parser = parse_header_name)]
        #[serde(default, deserialize_with = "de_header_name")]
        targeted_cache_control: http::HeaderName = http::HeaderName::from_static("swr-cache-control"),

        /// Log format: text or json [default: text].
        #[arg(long, env = "SWR_LOG_FORMAT", value_name = "FORMAT", value_enum)]
        log_format: LogFormat = LogFormat::Text,

        /// Log one line per request at info level (cache status, age, time taken).
        #[arg(long, env = "SWR_ACCESS_LOG", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_switch)]
        access_log: bool = false,

        /// How often an info line sums up what happened since the last one
        /// (answers; refreshes done, failed, dropped; log lines dropped), or 0
        /// for never; at least 1s [default: 60s].
        #[arg(long, env = "SWR_LOG_SUMMARY_INTERVAL", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        log_summary_interval: Duration = Duration::from_secs(60),

        /// Serve every request through hyper. By default plain HTTP/1.1 GET
        /// hits are answered without it, from the entry's stored bytes
        /// (`fast_hits = false` in the file).
        #[arg(long = "no-fast-hits", env = "SWR_NO_FAST_HITS", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_negated_switch)]
        fast_hits: bool = true,

        /// Fleet mode: share the cache and its refreshes with every instance on
        /// this Redis (redis:// or rediss://, with a password if it needs one).
        /// Memory stays the first level; hits never touch Redis [default: off].
        #[arg(long, env = "SWR_REDIS", value_name = "URL", value_parser = parse_redis, hide_env_values = true)]
        #[serde(default, deserialize_with = "de_redis")]
        redis: RedisUrl,

        /// Longest any one Redis call may take; past it the call counts as
        /// failed, and Redis is treated as down (answers come from memory and
        /// the backend) until it answers a ping again [default: 100ms].
        #[arg(long, env = "SWR_REDIS_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        redis_timeout: Duration = Duration::from_millis(100),

        /// Entries with a larger body stay in this instance's memory only
        /// [default: 1MiB].
        #[arg(long, env = "SWR_REDIS_MAX_OBJECT_SIZE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_size")]
        redis_max_object_size: u64 = 1 << 20,

        /// `/readyz` answers 503 while Redis is down (by default it answers
        /// 200 and says `redis: down`: the instance still serves).
        #[arg(long, env = "SWR_REDIS_REQUIRED", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_switch)]
        redis_required: bool = false,

        /// Who refreshes stale entries: `local` (this instance), or `stream`
        /// (jobs on a Redis Stream for `swr-proxy worker` processes; needs
        /// --redis; while Redis is down, this instance refreshes) [default: local].
        #[arg(long, env = "SWR_REFRESH_MODE", value_name = "MODE", value_enum)]
        refresh_mode: RefreshMode = RefreshMode::Local,

        /// A refresh job a worker took and did not finish in this long is
        /// taken over by another worker [default: 30s].
        #[arg(long, env = "SWR_REFRESH_VISIBILITY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        refresh_visibility_timeout: Duration = Duration::from_secs(30),

        /// Deliveries of a refresh job before it goes to the dead-letter
        /// stream [default: 5].
        #[arg(long, env = "SWR_REFRESH_MAX_ATTEMPTS", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_count")]
        refresh_max_attempts: usize = 5,

        /// The refresh stream's (and its dead letters') approximate cap
        /// [default: 100000].
        #[arg(long, env = "SWR_REFRESH_STREAM_MAX_LEN", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_count")]
        refresh_stream_max_len: usize = 100_000,

        /// Warm restart: the cache's entries are written to this directory at
        /// shutdown (and every --snapshot-interval) and read back at start
        /// [default: off].
        #[arg(long, env = "SWR_SNAPSHOT_DIR", value_name = "DIR")]
        snapshot_dir: PathBuf,

        /// With --snapshot-dir, also write a snapshot this often (0: only at
        /// shutdown) [default: 0].
        #[arg(long, env = "SWR_SNAPSHOT_INTERVAL", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        snapshot_interval: Duration = Duration::ZERO,

        /// Longest request target, and longest header line; longer is answered
        /// 414 (target) or 431 (header) and never forwarded [default: 8KiB].
        #[arg(long, env = "SWR_MAX_REQUEST_LINE", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_size")]
        max_request_line: u64 = 8 << 10,

        /// Largest request header block; larger is answered 431 and never
        /// forwarded [default: 32KiB, or --max-request-line if larger].
        #[arg(long, env = "SWR_MAX_REQUEST_HEADERS", value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_size")]
        max_request_headers: u64,
    }

    /// The settings a reload applies: how long answers are fresh and
    /// usable, and how the backend's and clients' headers are treated.
    live {
        /// How long an entry is fresh [default: 10s; 3s for `demo`].
        #[arg(long, env = "SWR_TTL", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        ttl: Duration = super::Config::DEFAULT_TTL,

        /// Freshness of a response with `Last-Modified` and no explicit
        /// freshness: this percentage of the time since it was modified, at
        /// most --ttl [default: off, the ttl applies; 10 with --ttl 0].
        #[arg(long, env = "SWR_HEURISTIC_FRESHNESS", value_name = "PERCENT", value_parser = parse_percent)]
        #[serde(default, deserialize_with = "de_percent")]
        heuristic_freshness: u8,

        /// How long after it turns stale an entry is still served at once while
        /// it is refreshed [default: 60s].
        #[arg(long, env = "SWR_STALE_WHILE_REVALIDATE", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        stale_while_revalidate: Duration = Duration::from_secs(60),

        /// Refresh-ahead: an entry whose key is asked for about this many times a
        /// minute or more is refreshed shortly before it turns stale (at a moment
        /// spread over the last 5-20% of its freshness), so a hot key is almost
        /// never served stale; 0: off [default: 60].
        #[arg(long, env = "SWR_REFRESH_AHEAD", value_name = "PER_MINUTE", value_parser = parse_per_minute, allow_hyphen_values = true)]
        refresh_ahead: usize = 60,

        /// How long after it turns stale an entry may be served when the backend
        /// fails [default: 5m].
        #[arg(long, env = "SWR_STALE_IF_ERROR", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        #[serde(default, deserialize_with = "de_duration")]
        stale_if_error: Duration = Duration::from_secs(300),

        /// `honor`: the backend's Cache-Control decides (RFC 9111), the ttl and
        /// windows above are defaults. `override`: they apply whatever the backend
        /// says about freshness (no-store, private and Set-Cookie still prevent
        /// storing) [default: honor].
        #[arg(long, env = "SWR_CACHE_CONTROL", value_name = "MODE", value_parser = parse_mode, allow_hyphen_values = true)]
        cache_control: CacheControlMode = CacheControlMode::default(),

        /// Let clients' Cache-Control (no-cache, max-age, max-stale, min-fresh,
        /// only-if-cached, no-store) and Pragma: no-cache steer the cache. Off by
        /// default: a client cannot force traffic onto the backend.
        #[arg(long, env = "SWR_HONOR_CLIENT_CACHE_CONTROL", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_switch)]
        honor_client_cache_control: bool = false,

        /// Peers (addresses or CIDRs, comma-separated) whose `Forwarded` and
        /// `X-Forwarded-*` headers are kept and appended to: a load balancer in
        /// front. From anyone else they are dropped [default: none].
        #[arg(long, env = "SWR_TRUST_FORWARDED", value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
        #[serde(default, deserialize_with = "de_cidrs")]
        trust_forwarded: Vec<ipnet::IpNet> = Vec::new(),
    }

    // Not settings of the proxy's behaviour: where they come from. In
    // `Settings` only, neither resolved nor compared on reload.
    other {
        /// A TOML configuration file (every flag has a file equivalent; flags win).
        #[arg(long, env = "SWR_CONFIG", value_name = "FILE")]
        #[serde(skip)]
        config: PathBuf,

        /// The file's `[[route]]` tables.
        #[arg(skip)]
        #[serde(rename = "route")]
        routes: Vec<RouteFile>,
    }
}

impl StartSettings {
    /// `--max-request-headers`, or at least one line's worth when only the
    /// line limit is raised.
    pub fn max_request_headers(&self) -> u64 {
        self.max_request_headers
            .unwrap_or_else(|| self.max_request_line.max(32 << 10))
    }
}

/// One thread per core the process may run on.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}
