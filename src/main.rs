use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;

use swr_proxy::config::{Cli, Command, Config, LogFormat};
use swr_proxy::logs::{self, LogGuard};
use swr_proxy::proxy::Proxy;
use swr_proxy::{admin, demo, server};

/// The process allocator (measured in BENCHMARKS.md). glibc's malloc held
/// about 300 B per cached object in free holes between entries (159 MB from
/// the system for 130 MB in use, 100,000 objects of 1 KiB); mimalloc keeps
/// each size class on its own pages. Built with `no_thp`: mimalloc otherwise
/// asks for transparent huge pages, which grow the resident set in 2 MiB
/// steps. And its version 2 (`v2`): version 3, the crate's default since
/// 0.1.49, held 1,654 B per stored 1 KiB object against 1,404 B (PSS,
/// 100,000 objects fetched by wrk from an nginx origin; BENCHMARKS.md,
/// "What changed the numbers").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad flags or configuration, as clap uses.
const USAGE_ERROR: u8 = 2;

/// After the servers stop, how long the runtime may take to drop its tasks:
/// a blocking task (a DNS lookup) is not waited for past this.
const RUNTIME_STOP: Duration = Duration::from_millis(500);

/// After the servers stop, how long refreshes still running may take to
/// finish. They were told to stop at the signal (see [`run`]).
const REFRESH_STOP: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return clap_error(&err),
    };
    // Configuration errors end the process before anything binds.
    let mut worker = false;
    let (config, demo_args) = match cli.command {
        Some(Command::Check(args)) => return check(&args.config),
        Some(Command::Demo(args)) => (None, Some(args.proxy)),
        Some(Command::Worker(args)) => {
            worker = true;
            match Config::from_args(&args.proxy, None, Config::DEFAULT_TTL) {
                Ok(config) if config.start.redis.is_none() => {
                    eprintln!(
                        "swr-proxy: worker needs --redis URL: the fleet's Redis, where the refresh stream is"
                    );
                    return ExitCode::from(USAGE_ERROR);
                }
                Ok(config) => (Some(config), None),
                Err(err) => {
                    eprintln!("swr-proxy: {err}");
                    return ExitCode::from(USAGE_ERROR);
                }
            }
        }
        None => match Config::from_args(&cli.proxy, None, Config::DEFAULT_TTL) {
            Ok(config) => (Some(config), None),
            Err(err) => {
                eprintln!("swr-proxy: {err}");
                return ExitCode::from(USAGE_ERROR);
            }
        },
    };
    let log_format = match (&config, &demo_args) {
        (Some(config), _) => config.start.log_format,
        (None, Some(args)) => args.log_format.unwrap_or_default(),
        (None, None) => LogFormat::Text,
    };
    // Held to the end of `main`: dropping it flushes the log, a bounded time.
    let log_guard = match init_logs(log_format) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("swr-proxy: cannot start the log writer: {err}");
            return ExitCode::FAILURE;
        }
    };
    let threads = match (&config, &demo_args) {
        (Some(config), _) => config.start.threads,
        // The demo's configuration is checked again, with its backend, in run_demo.
        (None, Some(args)) => without_upstream(args).map_or(1, |config| config.start.threads),
        (None, None) => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("swr-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log_guard.print(&format!("swr-proxy: cannot start the runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let result = match (config, demo_args) {
        (Some(config), _) if worker => runtime.block_on(run_worker(config)),
        (Some(config), _) => runtime.block_on(run(config, None)),
        (None, Some(args)) => runtime.block_on(run_demo(args)),
        (None, None) => Ok(()),
    };
    runtime.shutdown_timeout(RUNTIME_STOP);
    // From here on, nothing waits on stderr: the failure goes through the
    // log writer, and `log_guard` is flushed a bounded time when dropped.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            log_guard.print(&format!("swr-proxy: {message}"));
            ExitCode::from(USAGE_ERROR)
        }
        Err(Failure::Runtime(message)) => {
            log_guard.print(&format!("swr-proxy: {message}"));
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP re-reads the configuration file; a bad one is logged and the
/// running configuration kept.
fn spawn_reload_on_sighup(proxy: Arc<Proxy>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; reload with POST /reload");
            return;
        };
        while hangups.recv().await.is_some() {
            if let Err(err) = proxy.reload() {
                tracing::warn!(error = %err, "reload rejected; keeping the running configuration");
            }
        }
    });
    #[cfg(not(unix))]
    let _ = proxy;
}

/// The configuration of `args` before the upstream is known (a file checked
/// on its own, the demo before its backend starts): a placeholder stands in.
fn without_upstream(
    args: &swr_proxy::config::Settings,
) -> Result<Config, swr_proxy::config::ConfigError> {
    // https: a file's `upstream_ca` is checked as it would be with an https
    // backend given by a flag.
    let placeholder = url::Url::parse("https://127.0.0.1:1").ok();
    Config::from_args(args, placeholder, Config::DEFAULT_TTL)
}

/// `swr-proxy check --config F`: exit 0, or 2 with one line naming the problem.
fn check(path: &std::path::Path) -> ExitCode {
    let args = swr_proxy::config::Settings {
        config: Some(path.to_path_buf()),
        ..Default::default()
    };
    match without_upstream(&args) {
        Ok(config) => {
            println!(
                "{}: ok ({} route{})",
                path.display(),
                config.routes.len(),
                if config.routes.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("swr-proxy: {err}");
            ExitCode::from(USAGE_ERROR)
        }
    }
}

/// Logs go to stderr through [`logs`]' writer thread: no thread that
/// serves, refreshes or shuts down ever waits on a log write. Panics are
/// logged the same way (the default hook writes to stderr directly, and
/// would block a serving thread on a stalled sink).
fn init_logs(format: LogFormat) -> std::io::Result<LogGuard> {
    let (writer, guard) = logs::start(std::io::stderr(), logs::QUEUE_LINES, logs::QUEUE_BYTES)?;
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(writer);
    if format == LogFormat::Json {
        subscriber.json().init();
    } else {
        subscriber
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    std::panic::set_hook(Box::new(|panic| {
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(%panic, %backtrace, "panicked");
        } else {
            tracing::error!(%panic, "panicked");
        }
    }));
    Ok(guard)
}

enum Failure {
    Usage(String),
    Runtime(String),
}

/// Prints clap's error as one line (help and version as clap renders them).
fn clap_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let rendered = err.render().to_string();
    let line = rendered
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid arguments");
    let line = line.strip_prefix("error: ").unwrap_or(line);
    eprintln!("swr-proxy: {line} (see --help)");
    ExitCode::from(USAGE_ERROR)
}

/// Runs the proxy until SIGINT/SIGTERM. `on_ready` is printed once listening.
///
/// The signal stops the refresh workers at once (an entry refreshed now
/// would die with the process) and starts the servers' shutdown; every wait
/// after it is bounded, so the process exits within `--shutdown-timeout`
/// and about 4.5 s more (the connections left at the deadline, refreshes
/// still running, the runtime, the log's flush), whatever the log sink does.
async fn run(config: Config, on_ready: Option<String>) -> Result<(), Failure> {
    let listener = TcpListener::bind(config.start.listen).await.map_err(|e| {
        Failure::Runtime(format!(
            "cannot listen on {} (--listen): {e}",
            config.start.listen
        ))
    })?;
    let listen = listener.local_addr().unwrap_or(config.start.listen);
    let admin_listener = match config.start.admin_listen.address() {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Failure::Runtime(format!(
                "cannot listen on {addr} (--admin-listen): {e}; another swr-proxy or \
                 service may hold it: choose another with --admin-listen ADDR, or \
                 --admin-listen off"
            ))
        })?),
        None => None,
    };
    let admin = admin_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "off".to_string(), |addr| addr.to_string());
    let shutdown = CancellationToken::new();
    let cancel = shutdown.child_token();
    let tracker = TaskTracker::new();
    let proxy = Proxy::start(config.clone(), cancel.clone(), &tracker).map_err(Failure::Runtime)?;
    let signal = shutdown.clone();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        signal.cancel();
    });
    spawn_reload_on_sighup(Arc::clone(&proxy));
    let token: Option<Arc<str>> = config.start.admin_token.as_deref().map(Arc::from);
    let admin_proxy = Arc::clone(&proxy);
    let admin_shutdown = shutdown.clone();
    let admin_timeouts = server::Timeouts {
        grace: config.start.shutdown_timeout.min(Duration::from_secs(5)),
        ..server::Timeouts::from_config(&config)
    };
    let admin_task = admin_listener.map(|admin_listener| {
        tokio::spawn(server::serve(
            admin_listener,
            move |request, _peer| admin::handle(Arc::clone(&admin_proxy), token.clone(), request),
            async move { admin_shutdown.cancelled().await },
            admin_timeouts,
        ))
    });
    tracing::info!(
        %listen,
        %admin,
        upstream = %config.start.upstream,
        threads = config.start.threads,
        ttl_ms = config.live.ttl.as_millis() as u64,
        stale_while_revalidate_ms = config.live.stale_while_revalidate.as_millis() as u64,
        stale_if_error_ms = config.live.stale_if_error.as_millis() as u64,
        "swr-proxy listening"
    );
    if let Some(text) = on_ready {
        println!("{text}");
    }
    server::run(
        listener,
        proxy,
        async move { shutdown.cancelled().await },
        server::Timeouts::from_config(&config),
    )
    .await;
    if let Some(admin_task) = admin_task {
        let _ = admin_task.await;
    }
    cancel.cancel();
    tracker.close();
    // The snapshot (--snapshot-dir) is written now: it may take longer
    // than the refreshes' second, up to --shutdown-timeout.
    let stop = match config.start.snapshot_dir {
        Some(_) => config.start.shutdown_timeout.max(REFRESH_STOP),
        None => REFRESH_STOP,
    };
    if tokio::time::timeout(stop, tracker.wait()).await.is_err() {
        tracing::warn!("refresh workers (or the snapshot) did not stop in time");
    }
    tracing::info!("stopped");
    Ok(())
}

/// `swr-proxy worker`: refreshes entries from the fleet's refresh stream
/// until SIGINT/SIGTERM. It serves no clients; its admin API (metrics,
/// health) runs only when `--admin-listen` is given.
async fn run_worker(mut config: Config) -> Result<(), Failure> {
    // It fetches for the fleet: its own memory keeps next to nothing, and
    // its own refreshes are the jobs.
    config.start.refresh_mode = swr_proxy::config::RefreshMode::Local;
    config.start.max_size = config.start.max_object_size;
    let admin_listener = match (config.start.admin_listen.address(), config.admin_given()) {
        (Some(addr), true) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Failure::Runtime(format!("cannot listen on {addr} (--admin-listen): {e}"))
        })?),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let cancel = shutdown.child_token();
    let tracker = TaskTracker::new();
    let proxy =
        Proxy::start_worker(config.clone(), cancel.clone(), &tracker).map_err(Failure::Runtime)?;
    let signal = shutdown.clone();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        signal.cancel();
    });
    if let Some(admin_listener) = admin_listener {
        let token: Option<Arc<str>> = config.start.admin_token.as_deref().map(Arc::from);
        let admin_proxy = Arc::clone(&proxy);
        let admin_shutdown = shutdown.clone();
        tokio::spawn(server::serve(
            admin_listener,
            move |request, _peer| admin::handle(Arc::clone(&admin_proxy), token.clone(), request),
            async move { admin_shutdown.cancelled().await },
            server::Timeouts::from_config(&config),
        ));
    }
    tracing::info!(
        upstream = %config.start.upstream,
        redis = %config.start.redis.as_ref().map_or_else(String::new, ToString::to_string),
        refresh_concurrency = config.start.refresh_concurrency,
        "swr-proxy worker started"
    );
    let result = Arc::clone(&proxy).run_worker(cancel.clone()).await;
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(REFRESH_STOP, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("refresh jobs did not stop in time; other workers take them over");
    }
    tracing::info!("stopped");
    result.map_err(Failure::Usage)
}

async fn run_demo(args: swr_proxy::config::Settings) -> Result<(), Failure> {
    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Failure::Runtime(format!("cannot start the demo backend: {e}")))?;
    let backend_addr = backend
        .local_addr()
        .map_err(|e| Failure::Runtime(format!("cannot start the demo backend: {e}")))?;
    let upstream = url::Url::parse(&format!("http://{backend_addr}"))
        .map_err(|e| Failure::Runtime(format!("demo backend address: {e}")))?;
    let config = Config::from_args(&args, Some(upstream), Duration::from_secs(3))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let cancel = CancellationToken::new();
    tokio::spawn(demo::serve(backend, cancel.clone()));
    let url = format!("http://{}/ranking?user=42", config.start.listen);
    let ttl = config.live.ttl.as_secs_f64();
    let text = format!(
        "\nswr-proxy demo\n\
         backend: http://{backend_addr} (takes {} ms per answer)\n\
         proxy:   http://{} (ttl {ttl}s, stale-while-revalidate {}s; the backend sends\n\
         \x20        Last-Modified and ETag but no Cache-Control, so --ttl decides freshness)\n\
         admin:   {}\n\n\
         In another terminal:\n\
         \x20 curl -si '{url}'   # X-Cache: MISS, ~300 ms, generation 1\n\
         \x20 curl -si '{url}'   # X-Cache: HIT, at once, same generation\n\
         \x20 sleep {ttl}; curl -si '{url}'   # X-Cache: STALE, at once; a refresh is queued\n\
         \x20 curl -si '{url}'   # X-Cache: HIT, at once, the next generation\n\n\
         Ctrl-C stops it.",
        demo::COMPUTE_TIME.as_millis(),
        config.start.listen,
        config.live.stale_while_revalidate.as_secs_f64(),
        config.start.admin_listen.address().map_or_else(
            || "off (--admin-listen off)".to_string(),
            |addr| format!("http://{addr}/stats, /metrics, POST /purge")
        ),
    );
    let result = run(config, Some(text)).await;
    cancel.cancel();
    result
}
