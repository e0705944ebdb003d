//! The load harness (benches/load.rs), run at a small scale: every scenario,
//! one short round, against the debug build. It checks the harness itself
//! (its origin and limit servers, the nginx and Varnish setups where they are
//! installed, wrk and its script, the table), not speed: speed is measured
//! by `cargo bench --bench load`, in BENCHMARKS.md.
//!
//! Needs wrk (`apt-get install -y wrk`). Without it the test says what to
//! install and passes, so that `cargo test` passes on a machine with only
//! Rust; `.ci/run` installs wrk (with nginx and Varnish) and sets
//! `SWR_REQUIRE_WRK=1`, under which a missing wrk fails the test.

use std::time::Duration;

#[allow(dead_code)]
#[path = "../benches/load.rs"]
mod load;

use load::installed;

/// The first number in a table cell ("backend 12 (0.98x ideal)" -> 12).
fn number(cell: &str) -> f64 {
    let start = cell.find(|c: char| c.is_ascii_digit());
    start
        .map(|i| {
            let rest = &cell[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            rest[..end].parse().unwrap_or(f64::NAN)
        })
        .unwrap_or(f64::NAN)
}

#[test]
fn the_load_harness_runs_every_scenario_against_every_installed_target() {
    if !installed("wrk") {
        let required = std::env::var_os("SWR_REQUIRE_WRK").is_some_and(|v| v == "1");
        assert!(
            !required,
            "wrk is not installed: apt-get install -y wrk (.ci/run installs it)"
        );
        eprintln!(
            "SKIPPED: the load harness needs wrk: apt-get install -y wrk \
             (and nginx-light, varnish for their rows); .ci/run installs them"
        );
        return;
    }
    let options = load::Options {
        rounds: 1,
        duration: Duration::from_secs(2),
        only: None,
        hit_keys: 200,
        memory_keys: 5_000,
        // More than the 8 MiB budget holds.
        zipf_keys: 20_000,
        // The same binary again, as the `--compare` baseline, on one thread.
        baseline: Some(env!("CARGO_BIN_EXE_swr-proxy").into()),
        baseline_args: vec!["--threads".into(), "1".into()],
        wire_limit: true,
        raw_limit: true,
        refresh_duration: Duration::from_secs(3),
    };
    let report = load::run(&options);
    assert!(
        report.problems.is_empty(),
        "the harness reported problems: {:#?}",
        report.problems
    );

    let mut caches = vec!["swr-proxy", "baseline"];
    if installed("nginx") {
        caches.push("nginx");
    }
    if installed("varnishd") {
        caches.push("varnish");
    }
    let row = |scenario: &str, target: &str| -> Vec<String> {
        report
            .row_for(scenario, target)
            .unwrap_or_else(|| panic!("no {scenario} row for {target}: {:#?}", report.rows))
            .to_vec()
    };

    for scenario in ["hits-1k", "hits-64k", "hot-1k"] {
        for target in caches.iter().chain(&["limit", "limit-wire", "limit-raw"]) {
            let cells = row(scenario, target);
            assert!(number(&cells[2]) > 0.0, "{scenario} {target}: {cells:?}");
            assert!(
                cells[4].ends_with('x'),
                "{scenario} {target}: no ratio to the limit: {cells:?}"
            );
            assert!(
                number(&cells[7]) > 0.0,
                "{scenario} {target}: no CPU per request: {cells:?}"
            );
        }
    }

    // Each cache's ratio to the limit, round by round.
    for scenario in ["hits-1k", "hits-64k", "hot-1k"] {
        for target in &caches {
            let prefix = format!("{scenario} {target} / limit by round: ");
            let note = report.notes.iter().find(|n| n.starts_with(&prefix));
            let note = note.unwrap_or_else(|| panic!("no note {prefix:?}: {:#?}", report.notes));
            assert!(note.contains("(median ") && note.ends_with("x)"), "{note}");
        }
        for prefix in [
            format!("{scenario} swr-proxy / limit-wire by round: "),
            format!("{scenario} limit-raw / limit by round: "),
        ] {
            let note = report.notes.iter().find(|n| n.starts_with(&prefix));
            let note = note.unwrap_or_else(|| panic!("no note {prefix:?}: {:#?}", report.notes));
            assert!(note.ends_with("x)"), "{note}");
        }
    }

    // The mixes, the cold start and the Zipf law, each beside the limit.
    for scenario in ["mix-1pct", "mix-5pct", "cold-1k", "zipf"] {
        for target in caches.iter().chain(&["limit"]) {
            let cells = row(scenario, target);
            assert!(number(&cells[2]) > 0.0, "{scenario} {target}: {cells:?}");
        }
    }
    // The Zipf law's hit ratios: every cache's, and the LRU reference's.
    let prefix = "zipf hit ratio (1 - backend requests / requests, median): ";
    let note = report.notes.iter().find(|n| n.starts_with(prefix));
    let note = note.unwrap_or_else(|| panic!("no note {prefix:?}: {:#?}", report.notes));
    for target in caches.iter().chain(&["LRU"]) {
        let ratio = note[prefix.len()..]
            .split(", ")
            .find_map(|part| part.strip_prefix(*target))
            .map(number)
            .unwrap_or(f64::NAN);
        assert!((0.0..1.0).contains(&ratio), "{target} in {note}");
    }

    // The stale storm refreshed entries in the background, within
    // --refresh-concurrency; the hits-only run beside it saw no refresh.
    for target in &caches {
        row("stale-storm", target);
    }
    let storm = row("stale-storm", "swr-proxy");
    assert!(
        number(&storm[5]) > 0.0,
        "no refresh reached the origin: {storm:?}"
    );
    assert!(number(&storm[6]) <= 256.0, "{storm:?}");
    let calm = row("stale-storm", "swr-proxy (hits only, same load)");
    assert_eq!(number(&calm[5]), 0.0, "{calm:?}");

    // One backend request for the herd.
    for target in &caches {
        row("herd", target);
    }
    for target in ["swr-proxy", "baseline"] {
        let herd = row("herd", target);
        assert_eq!(number(&herd[2]), 1.0, "{herd:?}");
    }

    // Fleet mode: three instances on one Redis ask the backend less per
    // key than three independent ones; one instance's hits are measured
    // with and without --redis.
    if installed("redis-server") {
        let shared = row("fleet", "3 instances, one Redis");
        let independent = row("fleet", "3 independent instances");
        assert!(
            number(&shared[4]) < number(&independent[4]),
            "{shared:?} against {independent:?}"
        );
        let hits = row("fleet", "one instance's hits, --redis vs none");
        assert!(hits[4].ends_with('x'), "{hits:?}");
    }

    // The refresh scenarios: four settings of the queue, each with what
    // users were served; a restart with and without a snapshot.
    for label in [
        "ceiling 8, FIFO (the old 8 workers)",
        "adaptive, FIFO",
        "adaptive + priority",
        "adaptive + priority + refresh-ahead (defaults)",
    ] {
        let cells = row("refresh-order", label);
        assert!(cells[4].starts_with("age/ttl p50 "), "{cells:?}");
        assert!(number(&cells[2]) > 0.0, "{cells:?}");
    }
    let with = row("restart", "with --snapshot-dir");
    let without = row("restart", "without a snapshot");
    assert!(number(&with[2]) > 0.5, "{with:?}");
    assert!(without[4].starts_with("back to 95% in"), "{without:?}");

    // Memory was measured from the proportional set: each cached 1 KiB
    // object costs at least its body.
    for target in &caches {
        row("memory", target);
    }
    let memory = row("memory", "swr-proxy");
    assert!(number(&memory[2]) > 1024.0, "{memory:?}");
}
