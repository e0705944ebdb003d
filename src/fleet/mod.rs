//! Fleet mode (`--redis`): instances share a second level of the cache in
//! Redis, take a per-key lease before they ask the backend, and tell each
//! other when an entry was replaced or purged.
//!
//! Memory stays the first level: a hit never touches Redis (nothing here
//! is on the hit path). On a local miss or expiry, and before a refresh,
//! an instance runs one script that reads the key's shared entry and, when
//! there is none it can use, takes the key's lease (`SET NX PX`); only the
//! lease holder asks the backend, writes the answer back and releases the
//! lease (compare-and-delete, so a holder whose lease ran out never frees
//! another's). An instance that finds the lease taken serves its stale copy
//! (a refresh) or waits, bounded, for the entry to appear (a miss).
//!
//! Every call is bounded by `--redis-timeout`. A call that fails to reach
//! Redis marks it down: until a ping answers again (every
//! [`PROBE_EVERY`]) no call is made, and the instance fills and refreshes
//! from the backend alone, as without `--redis`. What Redis holds is read
//! by [`codec`]: a value that is not an entry this version wrote for that
//! key is counted and never served.
//!
//! Keys: `swr:1:e:<key text>` (entry or vary record), `swr:1:l:<key text>`
//! (lease), `swr:1:v:<URL key text>` (the set of the URL's variant keys
//! written, so that invalidating a URL finds them without a SCAN); events
//! go on the channel `swr:1:events` ([`events`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::header::HeaderName;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use redis::aio::ConnectionManager;
use redis::{Client, RedisError, Script};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::entry::Entry;
use crate::config::RedisUrl;

pub mod codec;
pub mod events;
pub mod stream;

use self::codec::Shared;
pub use self::events::Event;

/// How often a Redis marked down is pinged.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Added to `--upstream-timeout` for a lease's life: a holder that died
/// mid-fetch frees its key this long after the backend would have timed out.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

const ENTRY_PREFIX: &[u8] = b"swr:1:e:";
const LEASE_PREFIX: &[u8] = b"swr:1:l:";
const VARIANTS_PREFIX: &[u8] = b"swr:1:v:";
const CHANNEL: &str = "swr:1:events";

/// Room for an entry's key, headers and instants next to its body, in the
/// largest value read from Redis.
const MAX_HEAD: u64 = 1 << 20;

/// The longest a shared entry is kept in Redis, whatever its windows.
const MAX_SHARED_LIFE: Duration = Duration::from_secs(365 * 86_400);

/// Reads the key's value; takes the lease when there is none or when
/// asked to anyway (ARGV[3] = 1). Returns `{value or nil, 1 if taken}`.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v and ARGV[3] == '0' then return {v, 0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {v, 1} end
return {v, 0}
";

/// Adds a variant's key text (ARGV[1]) to its URL's set, which lives at
/// least as long as the variant (ARGV[2] ms).
const ADD_VARIANT: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes a URL's entry (or vary record), its variants (ARGV[1] is the
/// entries' prefix) and their set. Returns how many entries.
const DELETE_URL: &str = r"
local n = redis.call('DEL', KEYS[1])
for _, v in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  n = n + redis.call('DEL', ARGV[1] .. v)
end
redis.call('DEL', KEYS[2])
return n
";

/// Deletes the lease only if it is still this owner's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// At most one warning per this long of calls Redis refused.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// What fleet mode is given at start.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub url: RedisUrl,
    pub timeout: Duration,
    pub max_object: u64,
    pub lease: Duration,
    pub stream: StreamSettings,
}

/// The refresh stream's settings (`--refresh-mode stream` and workers).
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// A job not acknowledged this long is taken over by another worker.
    pub visibility: Duration,
    /// Deliveries before a job goes to the dead letters.
    pub max_attempts: usize,
    /// The stream's (and the dead letters') approximate cap.
    pub max_len: usize,
}

/// The result of [`Fleet::claim`].
#[derive(Debug)]
pub enum Claim {
    /// The key's shared value (the lease was taken too when `won`).
    Value { bytes: Vec<u8>, won: bool },
    /// Nothing shared; the lease is this instance's.
    Won,
    /// Nothing shared; another instance holds the lease.
    Held,
    /// Redis did not answer (down, slow, or an error).
    Unavailable,
}

/// The connection to the fleet's Redis, and what it counts.
pub struct Fleet {
    client: Client,
    conn: ConnectionManager,
    /// This instance's name on leases and events.
    owner: Arc<str>,
    settings: FleetSettings,
    up: AtomicBool,
    /// When a refused call (Redis up, answering with an error: out of
    /// memory, say) was last logged: at most one warning per
    /// [`REFUSAL_LOG_EVERY`], not one per call.
    refusal_logged: Mutex<Option<Instant>>,
    claim: Script,
    release: Script,
    metrics: FleetMetrics,
}

/// Fleet mode's series in `/metrics`.
struct FleetMetrics {
    registry: Registry,
    reads: Family<[(&'static str, &'static str); 1], Counter>,
    writes: Family<[(&'static str, &'static str); 1], Counter>,
    leases: Family<[(&'static str, &'static str); 1], Counter>,
    events: Family<[(&'static str, &'static str); 2], Counter>,
    errors: Family<[(&'static str, &'static str); 1], Counter>,
    up: Gauge,
    stream_jobs: Family<[(&'static str, &'static str); 1], Counter>,
    worker_jobs: Family<[(&'static str, &'static str); 1], Counter>,
    stream_pending: Gauge,
    stream_lag: Gauge,
}

impl FleetMetrics {
    fn new() -> FleetMetrics {
        let mut registry = Registry::default();
        let reads = Family::default();
        let writes = Family::default();
        let leases = Family::default();
        let events = Family::default();
        let errors = Family::default();
        let up = Gauge::default();
        let stream_jobs = Family::default();
        let worker_jobs = Family::default();
        let stream_pending = Gauge::default();
        let stream_lag = Gauge::default();
        registry.register(
            "swr_fleet_stream_jobs",
            "Refresh jobs an instance put on the stream (--refresh-mode stream), by result (queued, duplicate: one was pending for the key, error)",
            stream_jobs.clone(),
        );
        registry.register(
            "swr_fleet_worker_jobs",
            "Refresh jobs a worker took, by result (refreshed; adopted: another had refreshed it; already-fresh: a stale entry's job, the key refreshed since; leased-elsewhere: left for a later delivery; not-storable, failed, dead-letter, invalid)",
            worker_jobs.clone(),
        );
        registry.register(
            "swr_fleet_stream_pending",
            "Refresh jobs delivered to a worker and not yet acknowledged (as of this worker's last look)",
            stream_pending.clone(),
        );
        registry.register(
            "swr_fleet_stream_lag",
            "Refresh jobs on the stream no worker has read yet (as of this worker's last look; -1: unknown)",
            stream_lag.clone(),
        );
        registry.register(
            "swr_fleet_reads",
            "Shared-level reads on a local miss, expiry or refresh, by result (hit, stale, expired, miss, corrupt)",
            reads.clone(),
        );
        registry.register(
            "swr_fleet_writes",
            "Entries written to the shared level, by result (ok, error, too-large)",
            writes.clone(),
        );
        registry.register(
            "swr_fleet_leases",
            "Per-key leases, by result (won; lost: another instance held it; expired: ran out before its release; timeout: a miss stopped waiting for the holder)",
            leases.clone(),
        );
        registry.register(
            "swr_fleet_events",
            "Replacement and purge events, by kind and direction (sent, received)",
            events.clone(),
        );
        registry.register(
            "swr_fleet_errors",
            "Redis calls that failed, by cause (timeout, connection, reply, down: not tried while Redis is down)",
            errors.clone(),
        );
        registry.register(
            "swr_fleet_redis_up",
            "1 while Redis answers, 0 while it is treated as down",
            up.clone(),
        );
        // Every series exists from the start (0), so that a dashboard or an
        // alert sees a count that has not happened yet.
        for result in ["hit", "stale", "expired", "miss", "corrupt"] {
            let _ = reads.get_or_create(&[("result", result)]);
        }
        for result in ["ok", "error", "too-large"] {
            let _ = writes.get_or_create(&[("result", result)]);
        }
        for result in ["won", "lost", "expired", "timeout"] {
            let _ = leases.get_or_create(&[("result", result)]);
        }
        for cause in ["timeout", "connection", "reply", "down", "release"] {
            let _ = errors.get_or_create(&[("cause", cause)]);
        }
        FleetMetrics {
            registry,
            reads,
            writes,
            leases,
            events,
            errors,
            up,
            stream_jobs,
            worker_jobs,
            stream_pending,
            stream_lag,
        }
    }
}

/// The bytes of `prefix` + `text`.
fn redis_key(prefix: &[u8], text: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + text.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(text.as_bytes());
    key
}

/// A name for this instance, unique enough across a fleet: host name
/// (when the environment says it), process id, and start time.
fn owner_name() -> Arc<str> {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{host}:{}:{nanos:x}", std::process::id()).into()
}

impl Fleet {
    /// Connects lazily (an instance starts whether Redis is up or not) and
    /// starts the ping that brings a Redis marked down back.
    pub fn start(
        settings: FleetSettings,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Fleet>, String> {
        let client = Client::open(settings.url.as_str())
            .map_err(|e| format!("--redis {}: {e}", settings.url))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("--redis {}: {e}", settings.url))?;
        let fleet = Arc::new(Fleet {
            client,
            conn,
            owner: owner_name(),
            settings,
            up: AtomicBool::new(true),
            refusal_logged: Mutex::new(None),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            metrics: FleetMetrics::new(),
        });
        fleet.metrics.up.set(1);
        let probe = Arc::clone(&fleet);
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => probe.probe().await,
                    () = cancel.cancelled() => break,
                }
            }
        });
        Ok(fleet)
    }

    /// This instance's name on leases and events.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether Redis answers (as of the last call or ping).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A lease's life: the backend's timeout and a margin.
    pub fn lease(&self) -> Duration {
        self.settings.lease
    }

    /// The fleet's series, in the Prometheus text format.
    pub fn render(&self, out: &mut String) -> std::fmt::Result {
        prometheus_text::encode(out, &self.metrics.registry)
    }

    /// Pings Redis: one that stops answering is marked down (even when
    /// nothing else calls it, so `/readyz` says so), one marked down that
    /// answers is up again.
    async fn probe(&self) {
        let ping = redis::cmd("PING");
        let mut conn = self.conn.clone();
        let answered =
            tokio::time::timeout(self.settings.timeout, ping.query_async::<String>(&mut conn))
                .await;
        match answered {
            Ok(Ok(_)) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    self.metrics.up.set(1);
                    tracing::info!(redis = %self.settings.url, "redis answers again; fleet mode resumes");
                }
            }
            Ok(Err(err)) => self.went_down("connection", &err.to_string()),
            Err(_) => self.went_down("timeout", "no answer to a ping within --redis-timeout"),
        }
    }

    /// Runs one Redis call within `--redis-timeout`; `None` when Redis is
    /// down or the call failed (counted, and a connection failure marks
    /// Redis down).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Option<T> {
        if !self.is_up() {
            self.count_error("down");
            return None;
        }
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) if err.is_timeout() => {
                self.went_down("timeout", &err.to_string());
                None
            }
            Ok(Err(err))
                if err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal()
                    || err.is_unrecoverable_error() =>
            {
                self.went_down("connection", &err.to_string());
                None
            }
            Ok(Err(err)) => {
                // Redis answered with an error (out of memory, a script
                // refused): it is up, this call failed.
                self.count_error("reply");
                self.log_refusal(&err);
                None
            }
            Err(_) => {
                self.went_down("timeout", "no answer within --redis-timeout");
                None
            }
        }
    }

    /// Counts a lease by what became of it (won, lost, expired, timeout).
    fn count_lease(&self, result: &'static str) {
        self.metrics
            .leases
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts a write to the shared level by its result.
    fn count_write(&self, result: &'static str) {
        self.metrics
            .writes
            .get_or_create(&[("result", result)])
            .inc();
    }

    fn count_error(&self, cause: &'static str) {
        self.metrics.errors.get_or_create(&[("cause", cause)]).inc();
    }

    /// Warns of a call Redis refused (a full Redis refuses every write), at
    /// most once per [`REFUSAL_LOG_EVERY`]; the others at debug level.
    fn log_refusal(&self, err: &RedisError) {
        let now = Instant::now();
        let mut logged = self
            .refusal_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if logged.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
            tracing::debug!(error = %err, "redis refused a call");
            return;
        }
        *logged = Some(now);
        tracing::warn!(redis = %self.settings.url, error = %err,
            "redis refuses calls (full?); filling and refreshing from the backend where it does (swr_fleet_errors_total{{cause=\"reply\"}} counts them)");
    }

    fn went_down(&self, cause: &'static str, error: &str) {
        self.count_error(cause);
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.up.set(0);
            tracing::warn!(redis = %self.settings.url, cause, error,
                "redis unavailable; serving from memory and the backend until it answers again");
        }
    }

    /// Reads what Redis holds for `key_text`, taking its lease when there
    /// is nothing (or, with `take_anyway`, in any case).
    pub async fn claim(&self, key_text: &str, take_anyway: bool) -> Claim {
        let lease_ms = self.settings.lease.as_millis().max(1) as u64;
        let mut conn = self.conn.clone();
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .key(redis_key(ENTRY_PREFIX, key_text))
            .key(redis_key(LEASE_PREFIX, key_text))
            .arg(&*self.owner)
            .arg(lease_ms)
            .arg(if take_anyway { "1" } else { "0" });
        let Some((value, won)) = self
            .bounded(invocation.invoke_async::<(Option<Vec<u8>>, i64)>(&mut conn))
            .await
        else {
            return Claim::Unavailable;
        };
        let won = won == 1;
        if won {
            self.count_lease("won");
        }
        match value {
            Some(bytes) => Claim::Value { bytes, won },
            None if won => Claim::Won,
            None => {
                self.count_lease("lost");
                Claim::Held
            }
        }
    }

    /// Counts a lease another instance held (a claim that found a value it
    /// could not use and did not get the lease).
    pub fn lease_lost(&self) {
        self.count_lease("lost");
    }

    /// Counts a miss that stopped waiting for another instance's fetch.
    pub fn wait_timed_out(&self) {
        self.count_lease("timeout");
    }

    /// Releases this instance's lease on `key_text`; one that ran out (and
    /// may be another's now) is left alone, and counted. Tried even while
    /// Redis is marked down (one slow write must not leave the key leased
    /// for the fleet until the lease runs out), within `--redis-timeout`.
    pub async fn release(&self, key_text: &str) {
        let mut conn = self.conn.clone();
        let mut invocation = self.release.prepare_invoke();
        invocation
            .key(redis_key(LEASE_PREFIX, key_text))
            .arg(&*self.owner);
        let released = tokio::time::timeout(
            self.settings.timeout,
            invocation.invoke_async::<i64>(&mut conn),
        )
        .await;
        match released {
            Ok(Ok(0)) => self.count_lease("expired"),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => self.count_error("release"),
        }
    }

    /// Reads the shared value under `key_text` (`None`: nothing, or Redis
    /// did not answer).
    pub async fn read(&self, key_text: &str) -> Option<Vec<u8>> {
        let mut conn = self.conn.clone();
        let get = redis::cmd("GET")
            .arg(redis_key(ENTRY_PREFIX, key_text))
            .to_owned();
        self.bounded(get.query_async::<Option<Vec<u8>>>(&mut conn))
            .await
            .flatten()
    }

    /// Reads a value from Redis as what it holds for `key_text`: counted and
    /// dropped when it is not one this version wrote for that key, or is
    /// larger than any this instance would write (`--redis-max-object-size`
    /// and room for its head).
    pub fn decode(&self, bytes: &[u8], key_text: &str, now: Instant) -> Option<Shared> {
        let largest = self.settings.max_object.saturating_add(MAX_HEAD);
        let decoded = if bytes.len() as u64 > largest {
            Err(codec::Corrupt("too-large"))
        } else {
            codec::decode(bytes, key_text, now, SystemTime::now())
        };
        match decoded {
            Ok(shared) => Some(shared),
            Err(codec::Corrupt(why)) => {
                self.count_read("corrupt");
                tracing::warn!(
                    key = key_text,
                    why,
                    "ignoring a value in redis this version did not write for its key"
                );
                None
            }
        }
    }

    /// Counts a shared-level read by what it found.
    pub fn count_read(&self, result: &'static str) {
        self.metrics
            .reads
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Writes `entry` to the shared level, with a Redis expiry at the end
    /// of its last usable window, and, when it is a variant of `url_text`
    /// (it varies on `vary`), the URL's vary record; then tells the other
    /// instances it was replaced. An entry with a body past
    /// `--redis-max-object-size` stays local.
    pub async fn write(&self, entry: &Entry, url_text: &str, vary: Option<&[HeaderName]>) {
        if entry.body_len() as u64 > self.settings.max_object {
            self.count_write("too-large");
            return;
        }
        let now = Instant::now();
        let life = entry
            .evict_at()
            .saturating_duration_since(now)
            .min(MAX_SHARED_LIFE);
        let ms = life.as_millis() as u64;
        if ms == 0 {
            return;
        }
        let bytes = codec::encode_entry(entry, now, SystemTime::now());
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(redis_key(ENTRY_PREFIX, entry.key()))
            .arg(bytes)
            .arg("PX")
            .arg(ms)
            .ignore();
        if let Some(names) = vary.filter(|_| entry.key() != url_text) {
            pipe.cmd("SET")
                .arg(redis_key(ENTRY_PREFIX, url_text))
                .arg(codec::encode_vary(url_text, names))
                .arg("PX")
                .arg(ms)
                .ignore();
            pipe.cmd("EVAL")
                .arg(ADD_VARIANT)
                .arg(1)
                .arg(redis_key(VARIANTS_PREFIX, url_text))
                .arg(entry.key())
                .arg(ms)
                .ignore();
        }
        pipe.cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(events::Event::Replaced(entry.key().to_string()).to_wire(&self.owner))
            .ignore();
        let mut conn = self.conn.clone();
        let written = self.bounded(pipe.query_async::<()>(&mut conn)).await;
        self.count_write(if written.is_some() { "ok" } else { "error" });
        if written.is_some() {
            self.count_event("replaced", "sent");
        }
    }

    /// Counts an event by kind and direction.
    pub fn count_event(&self, kind: &'static str, direction: &'static str) {
        self.metrics
            .events
            .get_or_create(&[("kind", kind), ("direction", direction)])
            .inc();
    }

    /// Tells every other instance of `event`.
    pub async fn publish(&self, event: &Event) {
        let mut conn = self.conn.clone();
        let publish = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(event.to_wire(&self.owner))
            .to_owned();
        if self
            .bounded(publish.query_async::<i64>(&mut conn))
            .await
            .is_some()
        {
            self.count_event(event.kind(), "sent");
        }
    }

    /// Deletes the shared entries whose key text `selects` picks among
    /// those starting with `prefix` (every entry for `""`), or with
    /// `soft`, marks them stale as [`Entry::marked_stale`] does. Returns
    /// how many; `None` when Redis did not answer.
    pub async fn purge(
        &self,
        prefix: &str,
        selects: impl Fn(&str) -> bool,
        soft: bool,
    ) -> Option<usize> {
        let mut pattern = ENTRY_PREFIX.to_vec();
        for b in prefix.bytes() {
            if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                pattern.push(b'\\');
            }
            pattern.push(b);
        }
        pattern.push(b'*');
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut affected = 0;
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, keys): (u64, Vec<Vec<u8>>) =
                self.bounded(scan.query_async(&mut conn)).await?;
            for key in keys {
                let Some(text) = key
                    .strip_prefix(ENTRY_PREFIX)
                    .and_then(|t| std::str::from_utf8(t).ok())
                else {
                    continue;
                };
                if !selects(text) {
                    continue;
                }
                if soft {
                    affected += usize::from(self.mark_stale(text).await);
                } else {
                    let del = redis::cmd("DEL").arg(&key).to_owned();
                    affected += self
                        .bounded(del.query_async::<usize>(&mut conn))
                        .await
                        .unwrap_or(0);
                }
            }
            cursor = next;
            if cursor == 0 {
                return Some(affected);
            }
        }
    }

    /// Deletes (or with `soft`, marks stale) the shared entry of the URL
    /// keyed `url_text` and its variants, found in the URL's set of
    /// variants: a few calls, whatever Redis holds. Returns how many;
    /// `None` when Redis did not answer.
    pub async fn purge_url(&self, url_text: &str, soft: bool) -> Option<usize> {
        let mut conn = self.conn.clone();
        let variants = redis_key(VARIANTS_PREFIX, url_text);
        if !soft {
            let delete = redis::cmd("EVAL")
                .arg(DELETE_URL)
                .arg(2)
                .arg(redis_key(ENTRY_PREFIX, url_text))
                .arg(variants)
                .arg(ENTRY_PREFIX)
                .to_owned();
            return self.bounded(delete.query_async::<usize>(&mut conn)).await;
        }
        let members = redis::cmd("SMEMBERS").arg(variants).to_owned();
        let members: Vec<Vec<u8>> = self.bounded(members.query_async(&mut conn)).await?;
        let mut affected = usize::from(self.mark_stale(url_text).await);
        for member in &members {
            let Ok(text) = std::str::from_utf8(member) else {
                continue;
            };
            if crate::cache::vary::VariantKey::is_variant_of(member, url_text) {
                affected += usize::from(self.mark_stale(text).await);
            }
        }
        Some(affected)
    }

    /// Rewrites the shared entry under `key_text` as stale from now on.
    async fn mark_stale(&self, key_text: &str) -> bool {
        let now = Instant::now();
        let Some(bytes) = self.read(key_text).await else {
            return false;
        };
        let Some(Shared::Entry(entry)) = self.decode(&bytes, key_text, now) else {
            return false;
        };
        let marked = entry.marked_stale(now);
        let mut conn = self.conn.clone();
        let set = redis::cmd("SET")
            .arg(redis_key(ENTRY_PREFIX, key_text))
            .arg(codec::encode_entry(&marked, now, SystemTime::now()))
            .arg("KEEPTTL")
            .arg("XX")
            .to_owned();
        self.bounded(set.query_async::<Option<String>>(&mut conn))
            .await
            .flatten()
            .is_some()
    }

    /// A dedicated connection for the events channel.
    async fn subscribe(&self) -> Result<redis::aio::PubSub, RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok(pubsub)
    }
}
