//! The configuration file: arbitrary text through TOML into `FileConfig`,
//! `Config::merge` (flags unset) and what the proxy builds from a
//! configuration at start (`Proxy::start`: the upstream client, its
//! limiter, the store, the refresh queue and workers), without binding.
//!
//! Checked, besides "no panic": a merged configuration passes `validate()`
//! and differs from itself in no start-only setting; an error names the
//! file; `admin_token_file` is pointed at a missing file, so that no input
//! reads the machine's files.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use swr_proxy::config::{parse_file, Config, HeadLimits, Settings};
use swr_proxy::proxy::Proxy;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let mut file = match parse_file(text, path) {
        Ok(file) => file,
        Err(err) => {
            assert!(err.0.starts_with("fuzz.toml: "), "{err}");
            return;
        }
    };
    if file.admin_token_file.is_some() {
        file.admin_token_file = Some(PathBuf::from("/nonexistent/swr-proxy-fuzz-token"));
    }
    let upstream = "http://127.0.0.1:9".parse().expect("url");
    let Ok(config) = Config::merge(
        &Settings::default(),
        &file,
        Some(upstream),
        Duration::from_secs(10),
    ) else {
        return;
    };
    assert!(config.validate().is_ok());
    assert!(config.start_only_changes(&config).is_empty());
    for path in ["/", "/ranking", "/users/1/similar", "/a?b"] {
        let _ = config.route_for(path);
    }
    let _ = HeadLimits::of(&config).buffer();

    let runtime = runtime();
    let _enter = runtime.enter();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let started = Proxy::start(config, cancel.clone(), &tracker);
    cancel.cancel();
    tracker.close();
    runtime.block_on(tracker.wait());
    drop(started);
});
