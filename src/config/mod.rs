//! Configuration: every setting declared once (`settings.rs`), read from
//! flags (each also from `SWR_<FLAG>`) and an optional TOML file
//! (`--config`, `file.rs`) by the same parsers (`values.rs`), layered flags >
//! environment > file > defaults in [`Config::merge`], then checked by
//! [`Config::validate`] before anything binds.

mod file;
mod settings;
mod tls;
mod values;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::routes::Route;

use file::read_file;
pub use file::{parse_file, CookiesFile, RouteFile};
pub use settings::{LiveSettings, Settings, StartSettings};
use values::MAX_THREADS;
pub use values::{
    parse_duration, parse_size, Listen, RedisUrl, MAX_DURATION, MAX_QUEUED_REFRESHES,
    MAX_REFRESH_CONCURRENCY, MAX_UPSTREAM_CONCURRENCY,
};

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
    pub proxy: Settings,
}

#[derive(Debug, Subcommand)]
// Parsed once at start: the size of the demo's flags does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Start a built-in demo backend (a slow "ranking" endpoint) with the proxy in front of it.
    Demo(DemoArgs),
    /// Validate a configuration file: exit 0, or 2 naming the bad field and line.
    Check(CheckArgs),
    /// Refresh entries from the fleet's refresh stream (--refresh-mode
    /// stream): needs --redis and --upstream, and takes the proxy's caching
    /// flags and file; serves no clients.
    Worker(WorkerArgs),
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub proxy: Settings,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub proxy: Settings,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The file to check.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Read at start; a reload that changes one says so and keeps it.
    pub start: StartSettings,
    /// Applied again by every reload.
    pub live: LiveSettings,
    /// First match wins; a request no route matches uses `live`.
    pub routes: Vec<Route>,
    /// The layer under the file: the demo's backend and ttl, or none.
    program: Settings,
    /// The flags it was built from, applied again over the file on reload.
    flags: Settings,
    /// `--upstream-ca`'s certificates, read once at start (a reload keeps
    /// them); `None`: the compiled-in webpki roots.
    pub upstream_roots: Option<Arc<rustls::RootCertStore>>,
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

/// Who refreshes stale entries (`--refresh-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshMode {
    /// This instance's refresh workers.
    #[default]
    Local,
    /// `swr-proxy worker` processes, through a Redis Stream (needs --redis).
    Stream,
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
    /// Whether `--admin-listen` was given (by the flag or `SWR_ADMIN_LISTEN`),
    /// not left to its default: a worker serves its admin API only then.
    pub fn admin_given(&self) -> bool {
        self.flags.admin_listen.is_some()
    }

    /// The default freshness when neither the flag nor the command sets one.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    /// Builds and validates the configuration from the flags, over the file
    /// named by `--config` if any. `upstream` stands in for a missing
    /// `--upstream` (the demo passes its own backend).
    pub fn from_args(
        flags: &Settings,
        upstream: Option<url::Url>,
        default_ttl: Duration,
    ) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        Config::merge(flags, &file, upstream, default_ttl)
    }

    /// Flags (and the environment) over the file over `upstream` and
    /// `default_ttl` over the defaults, then `validate()`.
    pub fn merge(
        flags: &Settings,
        file: &Settings,
        upstream: Option<url::Url>,
        default_ttl: Duration,
    ) -> Result<Config, ConfigError> {
        let program = Settings {
            upstream,
            ttl: Some(default_ttl),
            ..Settings::default()
        };
        let mut config = Config::layered(flags, file, program)?;
        config.upstream_roots = config
            .start
            .upstream_ca
            .as_deref()
            .map(tls::read_roots)
            .transpose()?;
        Ok(config)
    }

    fn layered(
        flags: &Settings,
        file: &Settings,
        program: Settings,
    ) -> Result<Config, ConfigError> {
        let settings = flags.clone().over(file.clone()).over(program.clone());
        let (mut start, live) = settings.resolve()?;
        start.admin_token = admin_token(flags, file)?;
        let routes = settings
            .routes
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, route)| file::validate_route(i, route, &live))
            .collect::<Result<Vec<Route>, ConfigError>>()?;
        let config = Config {
            start,
            live,
            routes,
            program,
            flags: flags.clone(),
            upstream_roots: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// The configuration file re-read, under the same flags: what a reload
    /// applies. The backend this one runs with stands in for a file that
    /// no longer names one.
    pub fn reread(&self) -> Result<Config, ConfigError> {
        let Some(path) = &self.flags.config else {
            return Err(ConfigError("no --config file to reload".into()));
        };
        let file = read_file(path)?;
        let program = Settings {
            upstream: Some(self.start.upstream.clone()),
            ..self.program.clone()
        };
        let mut config = Config::layered(&self.flags, &file, program)?;
        // Read at start, as the upstream client they built.
        config.upstream_roots = self.upstream_roots.clone();
        Ok(config)
    }

    /// The file this came from, re-read on reload.
    pub fn file(&self) -> Option<&Path> {
        self.flags.config.as_deref()
    }

    /// Checks the relations between values that a single flag's parser cannot see.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let upstream = &self.start.upstream;
        // Checked here, not when parsed: clap's error would show the value.
        if !upstream.username().is_empty() || upstream.password().is_some() {
            return Err(ConfigError(
                "--upstream must not hold user@ or user:password@: swr-proxy sends no \
                 credentials of its own to the backend (and settings are logged)"
                    .into(),
            ));
        }
        if self.start.upstream_ca.is_some() && upstream.scheme() != "https" {
            return Err(ConfigError(format!(
                "--upstream-ca is for an https backend, and --upstream is {}://",
                upstream.scheme()
            )));
        }
        if self.start.max_object_size > self.start.max_size {
            return Err(ConfigError(format!(
                "--max-object-size ({} bytes) must not exceed --max-size ({} bytes)",
                self.start.max_object_size, self.start.max_size
            )));
        }
        if self.start.max_buffered < self.start.max_object_size {
            return Err(ConfigError(format!(
                "--max-buffered ({} bytes) must be at least --max-object-size ({} bytes)",
                self.start.max_buffered, self.start.max_object_size
            )));
        }
        if self.start.max_object_size > u64::from(u32::MAX) {
            return Err(ConfigError("--max-object-size must be below 4GiB".into()));
        }
        if let Some(admin) = self.start.admin_listen.address() {
            if !admin.ip().is_loopback() && self.start.admin_token.is_none() {
                return Err(ConfigError(format!(
                    "--admin-listen {admin} is not a loopback address: set --admin-token too"
                )));
            }
        }
        if self.start.redis.is_some() && self.start.redis_timeout.is_zero() {
            return Err(ConfigError(
                "--redis-timeout must be above zero, e.g. 100ms".into(),
            ));
        }
        if self.start.refresh_mode == RefreshMode::Stream && self.start.redis.is_none() {
            return Err(ConfigError(
                "--refresh-mode stream needs --redis: the stream is in Redis".into(),
            ));
        }
        if let Some(dir) = &self.start.snapshot_dir {
            if !dir.is_dir() {
                return Err(ConfigError(format!(
                    "--snapshot-dir {}: not a directory (create it first)",
                    dir.display()
                )));
            }
        }
        if self.start.refresh_visibility_timeout.is_zero() {
            return Err(ConfigError(
                "--refresh-visibility-timeout must be above zero, e.g. 30s".into(),
            ));
        }
        if self.start.upstream_timeout.is_zero() {
            return Err(ConfigError(
                "--upstream-timeout must be above zero, e.g. 30s".into(),
            ));
        }
        if self.start.threads > MAX_THREADS {
            return Err(ConfigError(format!(
                "--threads {} is more than {MAX_THREADS}: one per core is the most that helps",
                self.start.threads
            )));
        }
        // Each of these sizes something at start (tasks, a semaphore, a
        // channel): past its bound it is a typo that would panic or exhaust
        // memory there, so it is refused here.
        for (flag, value, max) in [
            (
                "--refresh-concurrency",
                self.start.refresh_concurrency,
                MAX_REFRESH_CONCURRENCY,
            ),
            (
                "--refresh-queue",
                self.start.refresh_queue,
                MAX_QUEUED_REFRESHES,
            ),
            (
                "--upstream-concurrency",
                self.start.upstream_concurrency,
                MAX_UPSTREAM_CONCURRENCY,
            ),
        ] {
            if value > max {
                return Err(ConfigError(format!(
                    "{flag} {value} is more than {max}, the most it may be"
                )));
            }
        }
        if !(256..=(1 << 20)).contains(&self.start.max_request_line) {
            return Err(ConfigError(
                "--max-request-line must be between 256 and 1MiB, e.g. 8KiB".into(),
            ));
        }
        if !(self.start.max_request_line..=(4 << 20)).contains(&self.start.max_request_headers()) {
            return Err(ConfigError(
                "--max-request-headers must be at least --max-request-line and at most 4MiB, e.g. 32KiB"
                    .into(),
            ));
        }
        if self.start.client_write_timeout.is_zero() {
            return Err(ConfigError(
                "--client-write-timeout must be above zero, e.g. 60s".into(),
            ));
        }
        if self.start.client_header_timeout.is_zero() {
            return Err(ConfigError(
                "--client-header-timeout must be above zero, e.g. 60s".into(),
            ));
        }
        if !self.start.log_summary_interval.is_zero()
            && self.start.log_summary_interval < Duration::from_secs(1)
        {
            return Err(ConfigError(
                "--log-summary-interval must be 0 (no summary) or at least 1s, e.g. 60s".into(),
            ));
        }
        Ok(())
    }

    /// The settings that differ in `other` and that a reload does not
    /// apply: they take effect at the next start. A reload applies the
    /// routes and the caching rules (`live`).
    pub fn start_only_changes(&self, other: &Config) -> Vec<&'static str> {
        self.start.changes(&other.start)
    }

    /// The route for a request path: the first that matches (as the
    /// proxy matches them: [`crate::routes::route_path`]).
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        let path = crate::routes::route_path(path);
        self.routes.iter().find(|r| r.matches(&path))
    }
}

/// The admin token: `--admin-token`, else `--admin-token-file`, else the
/// file's `admin_token` or `admin_token_file`. A token and a token file
/// given together are an error, as is an empty or unreadable token file.
/// An empty token is no token given (`SWR_ADMIN_TOKEN=` in a service's
/// environment, say): it never hides the file's.
fn admin_token(flags: &Settings, file: &Settings) -> Result<Option<String>, ConfigError> {
    let given = |token: &Option<String>| token.clone().filter(|t| !t.is_empty());
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
    match (given(&flags.admin_token), &flags.admin_token_file) {
        (Some(_), Some(_)) => Err(ConfigError(
            "--admin-token and --admin-token-file: give one of them".into(),
        )),
        (Some(token), None) => Ok(Some(token)),
        (None, Some(path)) => read(path, "--admin-token-file"),
        (None, None) => match (given(&file.admin_token), &file.admin_token_file) {
            (Some(_), Some(_)) => Err(ConfigError(
                "admin_token and admin_token_file in the config file: give one of them".into(),
            )),
            (Some(token), None) => Ok(Some(token)),
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
            line: usize::try_from(config.start.max_request_line).unwrap_or(usize::MAX),
            headers: usize::try_from(config.start.max_request_headers()).unwrap_or(usize::MAX),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn file_values_and_flag_overrides() {
        let f = file(
            "upstream = \"http://127.0.0.1:3000\"\nttl = \"30s\"\nmax_size = \"64MiB\"\n\
             [[route]]\npath = \"/similar\"\nttl = \"1h\"\nignore_query = [\"utm_*\"]\n",
        )
        .unwrap();
        let config = Config::merge(&Settings::default(), &f, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(config.live.ttl, Duration::from_secs(30));
        assert_eq!(config.start.max_size, 64 << 20);
        assert_eq!(
            config.live.stale_while_revalidate,
            Duration::from_secs(60),
            "default"
        );
        assert_eq!(config.routes[0].ttl, Duration::from_secs(3600));
        assert_eq!(config.routes[0].stale_if_error, Duration::from_secs(300));
        assert!(config.route_for("/similar/42").is_some());
        assert!(config.route_for("/ranking").is_none());
        let args = Settings {
            ttl: Some(Duration::from_secs(5)),
            ..Settings::default()
        };
        let config = Config::merge(&args, &f, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(config.live.ttl, Duration::from_secs(5), "the flag wins");
        assert!(config.start.fast_hits, "on by default");
        let off = file("upstream = \"http://127.0.0.1:3000\"\nfast_hits = false\n").unwrap();
        let config = Config::merge(&Settings::default(), &off, None, Config::DEFAULT_TTL).unwrap();
        assert!(!config.start.fast_hits, "off in the file");
        let args = Settings {
            fast_hits: Some(false),
            ..Settings::default()
        };
        let config = Config::merge(&args, &f, None, Config::DEFAULT_TTL).unwrap();
        assert!(!config.start.fast_hits, "off by flag");
    }

    #[test]
    fn log_summary_interval_from_file_or_flag_zero_is_off() {
        let none = file("upstream = \"http://127.0.0.1:3000\"\n").unwrap();
        let config = Config::merge(&Settings::default(), &none, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(
            config.start.log_summary_interval,
            Duration::from_secs(60),
            "default"
        );
        let f =
            file("upstream = \"http://127.0.0.1:3000\"\nlog_summary_interval = \"0\"\n").unwrap();
        let config = Config::merge(&Settings::default(), &f, None, Config::DEFAULT_TTL).unwrap();
        assert!(config.start.log_summary_interval.is_zero(), "off");
        let args = Settings {
            log_summary_interval: Some(Duration::from_secs(5)),
            ..Settings::default()
        };
        let config = Config::merge(&args, &f, None, Config::DEFAULT_TTL).unwrap();
        assert_eq!(
            config.start.log_summary_interval,
            Duration::from_secs(5),
            "the flag wins"
        );
        let short = file("upstream = \"http://x\"\nlog_summary_interval = \"10ms\"\n").unwrap();
        let err = Config::merge(&Settings::default(), &short, None, Config::DEFAULT_TTL)
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
            Config::merge(&Settings::default(), &f, None, Config::DEFAULT_TTL)
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
    fn switches_from_the_command_line() {
        let flags = |args: &[&str]| {
            let cli =
                Cli::try_parse_from([&["swr-proxy", "--upstream", "http://x"], args].concat())
                    .unwrap();
            Config::merge(&cli.proxy, &Settings::default(), None, Config::DEFAULT_TTL).unwrap()
        };
        let config = flags(&[]);
        assert!(config.start.fast_hits && !config.start.access_log);
        assert!(!config.live.honor_client_cache_control);
        let config = flags(&[
            "--no-fast-hits",
            "--access-log",
            "--honor-client-cache-control",
        ]);
        assert!(!config.start.fast_hits && config.start.access_log);
        assert!(config.live.honor_client_cache_control);
        let config = flags(&["--no-fast-hits=false", "--access-log=0"]);
        assert!(config.start.fast_hits && !config.start.access_log);
        // A flag without `=` takes no value: the next word is not eaten.
        assert!(Cli::try_parse_from(["swr-proxy", "--access-log", "true"]).is_err());
    }

    #[test]
    fn reload_names_every_start_setting_that_changed() {
        let merge = |text: &str| {
            let f = file(text).unwrap();
            Config::merge(&Settings::default(), &f, None, Config::DEFAULT_TTL).unwrap()
        };
        let before = merge("upstream = \"http://x\"\nttl = \"5s\"\n");
        let after = merge(
            "upstream = \"http://y\"\nttl = \"9s\"\nmax_request_headers = \"64KiB\"\nfast_hits = false\n",
        );
        assert_eq!(
            before.start_only_changes(&after),
            ["upstream", "fast_hits", "max_request_headers"]
        );
        assert!(before.start_only_changes(&before).is_empty());
    }
}
