//! The configuration file: checking it, routes with their own lifetimes and
//! key options, and reloading it (POST /reload, SIGHUP) without losing the cache.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use support::{eventually, Origin, TempFile, TestProxy, WAIT};
use swr_proxy::config::{
    parse_file, Config, Settings, MAX_QUEUED_REFRESHES, MAX_REFRESH_CONCURRENCY,
    MAX_UPSTREAM_CONCURRENCY,
};
use swr_proxy::proxy::Proxy;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const BIN: &str = env!("CARGO_BIN_EXE_swr-proxy");

fn check(path: &str) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", path])
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/swr.toml");
    let (code, stdout, stderr) = check(example);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok (5 routes)"), "{stdout}");
}

#[test]
fn check_names_the_bad_field_and_line() {
    let cases = [
        ("upstream = \"http://x\"\nttll = \"1s\"\n", "line 2", "ttll"),
        ("upstream = \"http://x\"\n\nttl = 5\n", "line 3", "ttl"),
        ("upstream = \"http://x\"\nttl = \"soon\"\n", "", "ttl"),
        (
            "[[route]]\npath = \"/a\"\nbypas = true\n",
            "line 3",
            "bypas",
        ),
        (
            "[[route]]\npath = \"/a\"\nttl = \"5\"\n",
            "",
            "route[0].ttl",
        ),
        ("[[route]]\npath = \"a\"\n", "", "route[0].path"),
        ("threads = 0\n", "", "threads"),
        (
            "max_size = \"1MiB\"\nmax_object_size = \"2MiB\"\n",
            "",
            "max-object-size",
        ),
        ("not toml at all", "line 1", ""),
    ];
    for (text, line, field) in cases {
        let file = TempFile::new(text);
        let (code, _, stderr) = check(file.path());
        assert_eq!(code, 2, "{text:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
        assert!(
            stderr.contains(line),
            "{text:?}: {stderr:?} should name {line}"
        );
        assert!(
            stderr.contains(field),
            "{text:?}: {stderr:?} should name {field}"
        );
    }
    let (code, _, stderr) = check("/no/such/file.toml");
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

/// Found by fuzz/fuzz_targets/config_file.rs: counts that `Proxy::start`
/// sizes a semaphore, a channel or a set of tasks by were accepted up to
/// `usize::MAX`, and start panicked (tokio's limit is 2^61) or spawned
/// workers until memory ran out. Past their bounds they are refused, naming
/// the setting; at their bounds the proxy starts.
#[tokio::test]
async fn counts_that_size_what_start_builds_are_bounded() {
    let merge = |text: &str| {
        let file = parse_file(text, Path::new("fuzz.toml")).expect("toml");
        let upstream = "http://127.0.0.1:9".parse().expect("url");
        Config::merge(
            &Settings::default(),
            &file,
            Some(upstream),
            Duration::from_secs(10),
        )
    };
    for (field, value) in [
        ("upstream_concurrency", "18446744073709551615"),
        ("refresh_queue", "18446744073709551615"),
        ("refresh_concurrency", "100000000000"),
    ] {
        let err = merge(&format!("{field} = {value}\n")).expect_err(field);
        let flag = format!("--{}", field.replace('_', "-"));
        assert!(err.0.contains(&flag), "{field}: {err}");
    }
    let config = merge(&format!(
        "upstream_concurrency = {MAX_UPSTREAM_CONCURRENCY}\n\
         refresh_queue = {MAX_QUEUED_REFRESHES}\n\
         refresh_concurrency = {MAX_REFRESH_CONCURRENCY}\n"
    ))
    .expect("the largest values are accepted");
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let proxy = Proxy::start(config, cancel.clone(), &tracker).expect("starts");
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait())
        .await
        .expect("the workers stop");
    drop(proxy);
}

#[tokio::test]
async fn routes_apply_their_own_lifetimes() {
    let origin = Origin::start().await;
    let file = TempFile::new(
        "ttl = \"60s\"\n[[route]]\npath = \"/rank\"\nttl = \"300ms\"\n\
         [[route]]\npath = \"/account\"\nbypass = true\n",
    );
    let proxy = TestProxy::start(&origin, &["--config", file.path()]).await;
    proxy.get("/rank").await;
    proxy.get("/other").await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(proxy.get("/rank").await.x_cache(), "STALE");
    assert_eq!(proxy.get("/other").await.x_cache(), "HIT");
    for _ in 0..2 {
        let account = proxy.get("/account").await;
        assert_eq!(account.x_cache(), "BYPASS");
        assert!(account.cache_status().contains("detail=route"));
    }
    assert_eq!(origin.hits("/account"), 2);
    // Answers are counted per route.
    let metrics = proxy.metrics().await;
    let route = |route: &str, cache: &str| {
        metrics[&format!("swr_route_requests_total{{route=\"{route}\",cache=\"{cache}\"}}")]
    };
    assert_eq!(route("/account", "BYPASS"), 2.0);
    assert_eq!(route("/rank", "MISS"), 1.0);
    assert_eq!(route("/rank", "STALE"), 1.0);
    assert_eq!(route("/rank", "HIT"), 0.0);
}

#[tokio::test]
async fn key_options_share_or_split_entries() {
    let origin = Origin::start().await;
    let file = TempFile::new(
        "[[route]]\npath = \"/p\"\nignore_query = [\"utm_*\"]\nsort_query = true\n\
         [[route]]\npath = \"/t\"\nkey_headers = [\"x-tenant\"]\n\
         [[route]]\npath = \"/s\"\nkeep_query = [\"q\"]\n",
    );
    let proxy = TestProxy::start(&origin, &["--config", file.path()]).await;
    proxy.get("/p?id=1&utm_source=a").await;
    let same = proxy.get("/p?utm_medium=b&id=1").await;
    assert_eq!(same.x_cache(), "HIT", "utm_* ignored");
    // The backend gets the URL as the key has it (tests/security.rs says why).
    assert_eq!(origin.seen("/p?id=1").len(), 1);
    assert_eq!(origin.seen("/p?id=1&utm_source=a").len(), 0);
    proxy.get("/p?b=1&a=2").await;
    assert_eq!(proxy.get("/p?a=2&b=1").await.x_cache(), "HIT", "sorted");
    assert_eq!(proxy.get("/p?id=2").await.x_cache(), "MISS");

    let acme = [("x-tenant", "acme")];
    let globex = [("x-tenant", "globex")];
    assert_eq!(proxy.send(Method::GET, "/t", &acme).await.text(), "/t #1");
    assert_eq!(proxy.send(Method::GET, "/t", &globex).await.text(), "/t #2");
    assert_eq!(proxy.send(Method::GET, "/t", &acme).await.text(), "/t #1");

    proxy.get("/s?q=shoes&session=1").await;
    assert_eq!(proxy.get("/s?q=shoes&session=2").await.x_cache(), "HIT");
    assert_eq!(proxy.get("/s?q=boots&session=1").await.x_cache(), "MISS");
}

/// `POST /reload`: its status and body.
async fn reload(proxy: &TestProxy) -> (u16, String) {
    let answer = proxy
        .client
        .post(proxy.admin_url("/reload"))
        .header("content-type", "application/json")
        .send()
        .await
        .expect("the admin port answers");
    let status = answer.status().as_u16();
    (status, answer.text().await.expect("a body"))
}

#[tokio::test]
async fn reload_applies_a_good_file_and_rejects_a_bad_one() {
    let origin = Origin::start().await;
    let file = TempFile::new("ttl = \"60s\"\n");
    let proxy = TestProxy::start(&origin, &["--config", file.path()]).await;
    proxy.get("/kept").await;
    file.write("ttl = \"60s\"\n[[route]]\npath = \"/new\"\nbypass = true\n");
    let (status, body) = reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["routes"], 1);
    assert_eq!(answer["at_next_start"], serde_json::json!([]));
    assert_eq!(
        proxy.get("/new").await.x_cache(),
        "BYPASS",
        "the new route applies"
    );
    assert_eq!(
        proxy.get("/kept").await.x_cache(),
        "HIT",
        "the cache survived"
    );

    // Settings a reload cannot apply are named in its answer.
    file.write(
        "ttl = \"60s\"\nthreads = 999\nrefresh_queue = 5\n[[route]]\npath = \"/new\"\nbypass = true\n",
    );
    let (status, body) = reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        answer["at_next_start"],
        serde_json::json!(["threads", "refresh_queue"])
    );

    file.write("ttl = \"60s\"\n[[route]]\npath = \"/new\"\nbypass = maybe\n");
    let (status, body) = reload(&proxy).await;
    assert_eq!(status, 422);
    assert!(body.contains("line 4"), "{body}");
    assert_eq!(
        proxy.get("/new").await.x_cache(),
        "BYPASS",
        "the old configuration stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    let origin = Origin::start().await;
    let file = TempFile::new(&format!("upstream = \"{}\"\nttl = \"60s\"\n", origin.url()));
    let mut child = Command::new(BIN)
        .args([
            "--config",
            file.path(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a log line")
            .expect("open");
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap_or("").to_string();
        }
    };
    let url = |path: &str| format!("http://{addr}{path}");
    let x_cache = |url: String| async move {
        let response = reqwest::get(url).await.expect("answered");
        response.headers()["x-cache"]
            .to_str()
            .unwrap_or("")
            .to_string()
    };
    x_cache(url("/h")).await;
    assert_eq!(x_cache(url("/h")).await, "HIT");
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    file.write(&format!(
        "upstream = \"{}\"\nttl = \"60s\"\n[[route]]\npath = \"/h\"\nbypass = true\n",
        origin.url()
    ));
    hup(child.id());
    eventually(WAIT, "the reloaded route applies", || {
        x_cache(url("/h")).then_bypass()
    })
    .await;
    file.write("this is not toml");
    hup(child.id());
    let rejected = loop {
        let line = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a log line")
            .expect("open");
        if line.contains("reload rejected") {
            break line;
        }
    };
    assert!(rejected.contains("line 1"), "{rejected}");
    assert_eq!(
        x_cache(url("/h")).await,
        "BYPASS",
        "the old configuration stays"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `eventually` wants a bool: whether an X-Cache answer is BYPASS.
trait ThenBypass {
    async fn then_bypass(self) -> bool;
}

impl<F: std::future::Future<Output = String>> ThenBypass for F {
    async fn then_bypass(self) -> bool {
        self.await == "BYPASS"
    }
}
