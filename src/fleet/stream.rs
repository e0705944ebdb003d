//! The refresh stream (`--refresh-mode stream`): instances put refresh
//! jobs on a Redis Stream, and `swr-proxy worker` processes anywhere take
//! them through a consumer group.
//!
//! - An instance queues at most one job per key while one is pending: one
//!   script sets the key's pending mark (`SET NX PX`) and, only when it
//!   was not set, adds the job (`XADD ... MAXLEN ~ --refresh-stream-max-len`).
//! - A worker reads new jobs (`XREADGROUP ... >`, on a connection of its
//!   own, since the read blocks), and acknowledges one when it is done
//!   (`XACK`, and the pending mark deleted).
//! - A job a worker took and never acknowledged (the worker died, or the
//!   backend failed) is idle in the group's pending list; after
//!   `--refresh-visibility-timeout` any worker takes it over (`XAUTOCLAIM`),
//!   and after `--refresh-max-attempts` deliveries it is moved to the
//!   dead-letter stream instead (`swr:1:refresh:dead`, also capped).
//!
//! A job carries what a refresh sends: the key and URL, the path, and the
//! headers, already without any client's credentials (see
//! `FetchTarget::without_credentials`); and whether the instance's entry
//! was stale (not a refresh-ahead). Between a worker's acknowledgement
//! (the pending mark goes) and its refresh's event reaching an instance,
//! that instance can still answer stale and queue a job for the old entry;
//! a worker that finds the shared entry fresh for a stale job fetches
//! nothing, and tells the instances again (`Replaced`: one that missed the
//! first event catches up).

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamReadReply};
use redis::Script;

use super::{redis_key, Fleet};

/// The refresh stream, its consumer group, and the dead letters.
pub const STREAM: &str = "swr:1:refresh";
pub const GROUP: &str = "swr-workers";
pub const DEAD_LETTERS: &str = "swr:1:refresh:dead";
const PENDING_PREFIX: &[u8] = b"swr:1:p:";

/// Sets the key's pending mark and adds the job, unless the mark was set.
/// KEYS: mark, stream. ARGV: mark's life (ms), max length, then the job's
/// field-value pairs. Returns the job's id, or nil for a duplicate.
const QUEUE: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
";

/// What a worker needs to refresh one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshJob {
    /// The entry's key text (a variant's, when the URL varies).
    pub key: String,
    /// The URL's key text.
    pub url: String,
    /// What the backend is asked for.
    pub path_and_query: String,
    /// The request's headers as the key sees them (for Vary).
    pub client_headers: HeaderMap,
    /// What is sent to the backend.
    pub upstream_headers: HeaderMap,
    /// The route's key holds the cookies left, `Authorization`, `Cookie`.
    pub keyed_cookies: bool,
    pub keyed_authorization: bool,
    pub keyed_cookie_header: bool,
    /// The instance's entry was stale when it queued the job (not a
    /// refresh-ahead): a worker that finds the shared entry fresh has
    /// nothing left to do. Absent on the stream: false.
    pub stale: bool,
}

/// A job as a worker took it from the stream.
#[derive(Debug)]
pub struct Delivery {
    pub id: String,
    /// `None`: the entry's fields are not a job this version wrote.
    pub job: Option<RefreshJob>,
    /// How many times it was delivered (1 the first time).
    pub attempts: usize,
}

/// Headers as `name: value` lines (a value never holds a line break).
fn header_lines(headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

fn parse_header_lines(bytes: &[u8]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let at = line.windows(2).position(|w| w == b": ")?;
        let name = HeaderName::from_bytes(&line[..at]).ok()?;
        let value = HeaderValue::from_bytes(&line[at + 2..]).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

impl RefreshJob {
    /// The job's field-value pairs on the stream.
    fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let flags = [
            self.keyed_cookies,
            self.keyed_authorization,
            self.keyed_cookie_header,
        ]
        .map(|on| if on { b'1' } else { b'0' });
        let mut fields = vec![
            ("v", b"1".to_vec()),
            ("key", self.key.clone().into_bytes()),
            ("url", self.url.clone().into_bytes()),
            ("path", self.path_and_query.clone().into_bytes()),
            ("client", header_lines(&self.client_headers)),
            ("upstream", header_lines(&self.upstream_headers)),
            ("flags", flags.to_vec()),
        ];
        if self.stale {
            fields.push(("stale", b"1".to_vec()));
        }
        fields
    }

    /// Reads a stream entry's fields as a job.
    fn from_entry(entry: &StreamId) -> Option<RefreshJob> {
        let field = |name: &str| entry.get::<Vec<u8>>(name);
        let text = |name: &str| field(name).and_then(|b| String::from_utf8(b).ok());
        if field("v")? != b"1" {
            return None;
        }
        let flags = field("flags")?;
        let [c, a, h] = <[u8; 3]>::try_from(flags.as_slice()).ok()?;
        let path_and_query = text("path")?;
        let key = text("key")?;
        let url = text("url")?;
        // The key is the URL's, or one of its variants'.
        let variant = key
            .strip_prefix(url.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('\n'));
        // A target the upstream client could not send is refused here, as
        // one the proxy would answer 400 is when a client sends it.
        let target = http::uri::PathAndQuery::try_from(path_and_query.as_str()).ok()?;
        if !path_and_query.starts_with('/')
            || !variant
            || !crate::cache::key::valid_target(target.as_str())
        {
            return None;
        }
        Some(RefreshJob {
            key,
            url,
            path_and_query,
            client_headers: parse_header_lines(&field("client")?)?,
            upstream_headers: parse_header_lines(&field("upstream")?)?,
            keyed_cookies: c == b'1',
            keyed_authorization: a == b'1',
            keyed_cookie_header: h == b'1',
            stale: field("stale").is_some_and(|v| v == b"1"),
        })
    }
}

/// What queueing a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Added,
    /// A job for the key is already pending.
    Duplicate,
    /// Redis did not answer: refresh here instead.
    Unavailable,
}

impl Fleet {
    /// Puts `job` on the refresh stream, unless one for its key is pending.
    pub async fn queue_job(&self, job: &RefreshJob) -> Queued {
        let stream = &self.settings.stream;
        // The mark outlives every delivery a job can have.
        let deliveries = u32::try_from(stream.max_attempts.saturating_add(1)).unwrap_or(u32::MAX);
        let mark_life = stream
            .visibility
            .saturating_mul(deliveries)
            .min(Duration::from_secs(30 * 86_400));
        let script = Script::new(QUEUE);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(redis_key(PENDING_PREFIX, &job.key))
            .key(STREAM)
            .arg(mark_life.as_millis() as u64)
            .arg(stream.max_len);
        for (name, value) in job.fields() {
            invocation.arg(name).arg(value);
        }
        let mut conn = self.conn.clone();
        let queued = match self
            .bounded(invocation.invoke_async::<Option<String>>(&mut conn))
            .await
        {
            Some(Some(_)) => Queued::Added,
            Some(None) => Queued::Duplicate,
            None => Queued::Unavailable,
        };
        let result = match queued {
            Queued::Added => "queued",
            Queued::Duplicate => "duplicate",
            Queued::Unavailable => "error",
        };
        self.metrics
            .stream_jobs
            .get_or_create(&[("result", result)])
            .inc();
        queued
    }

    /// Creates the consumer group (and the stream) unless it exists.
    pub async fn ensure_group(&self) -> bool {
        let mut conn = self.conn.clone();
        let create = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .to_owned();
        match tokio::time::timeout(self.settings.timeout, create.query_async::<()>(&mut conn)).await
        {
            Ok(Ok(())) => true,
            Ok(Err(err)) if err.code() == Some("BUSYGROUP") => true,
            _ => false,
        }
    }

    /// Waits up to `block` for new jobs for `consumer`, on `conn` (a
    /// connection of the worker's own: the read blocks it).
    pub async fn read_jobs(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>, redis::RedisError> {
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .to_owned();
        let reply: Option<StreamReadReply> = read.query_async(conn).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| Delivery {
                job: RefreshJob::from_entry(&entry),
                id: entry.id,
                attempts: 1,
            })
            .collect())
    }

    /// Takes over jobs idle past the visibility timeout (their worker died
    /// or failed them), with how many times each was delivered.
    pub async fn reclaim(&self, consumer: &str, count: usize) -> Vec<Delivery> {
        let idle = self.settings.stream.visibility.as_millis() as u64;
        let mut conn = self.conn.clone();
        let claim = redis::cmd("XAUTOCLAIM")
            .arg(STREAM)
            .arg(GROUP)
            .arg(consumer)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .to_owned();
        let Some(reply) = self
            .bounded(claim.query_async::<StreamAutoClaimReply>(&mut conn))
            .await
        else {
            return Vec::new();
        };
        let mut deliveries = Vec::with_capacity(reply.claimed.len());
        for entry in reply.claimed {
            let pending = redis::cmd("XPENDING")
                .arg(STREAM)
                .arg(GROUP)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .to_owned();
            let attempts = self
                .bounded(pending.query_async::<redis::streams::StreamPendingCountReply>(&mut conn))
                .await
                .and_then(|p| p.ids.first().map(|p| p.times_delivered))
                .unwrap_or(1);
            deliveries.push(Delivery {
                job: RefreshJob::from_entry(&entry),
                id: entry.id,
                attempts,
            });
        }
        deliveries
    }

    /// A job is done (or given up): acknowledged, and its key's pending
    /// mark deleted so the next stale answer can queue another.
    pub async fn ack(&self, id: &str, job: Option<&RefreshJob>) {
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(STREAM).arg(GROUP).arg(id).ignore();
        if let Some(job) = job {
            pipe.cmd("DEL")
                .arg(redis_key(PENDING_PREFIX, &job.key))
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async::<()>(&mut conn)).await;
    }

    /// Moves a job that failed every attempt to the dead-letter stream.
    pub async fn dead_letter(&self, delivery: &Delivery) {
        let mut add = redis::cmd("XADD");
        add.arg(DEAD_LETTERS)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.settings.stream.max_len)
            .arg("*")
            .arg("id")
            .arg(&delivery.id)
            .arg("attempts")
            .arg(delivery.attempts);
        if let Some(job) = &delivery.job {
            for (name, value) in job.fields() {
                add.arg(name).arg(value);
            }
        }
        let mut conn = self.conn.clone();
        if self
            .bounded(add.query_async::<String>(&mut conn))
            .await
            .is_some()
        {
            self.count_worker("dead-letter");
            tracing::warn!(
                id = %delivery.id,
                key = delivery.job.as_ref().map_or("-", |j| j.key.as_str()),
                attempts = delivery.attempts,
                "refresh job failed every attempt; moved to the dead letters"
            );
            self.ack(&delivery.id, delivery.job.as_ref()).await;
        }
    }

    /// Counts a worker's job by its result.
    pub fn count_worker(&self, result: &'static str) {
        self.metrics
            .worker_jobs
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Reads the group's lag and pending count into the gauges.
    pub async fn observe_stream(&self) {
        let mut conn = self.conn.clone();
        let info = redis::cmd("XINFO").arg("GROUPS").arg(STREAM).to_owned();
        let Some(reply) = self
            .bounded(info.query_async::<StreamInfoGroupsReply>(&mut conn))
            .await
        else {
            return;
        };
        if let Some(group) = reply.groups.iter().find(|g| g.name == GROUP) {
            self.metrics.stream_pending.set(group.pending as i64);
            self.metrics
                .stream_lag
                .set(group.lag.map_or(-1, |lag| lag as i64));
        }
    }

    /// A connection for the worker's blocking reads.
    pub async fn reader(&self) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_round_trips_through_its_fields() {
        let mut client = HeaderMap::new();
        client.insert("accept-encoding", HeaderValue::from_static("gzip"));
        client.append("x-v", HeaderValue::from_static("1"));
        client.append("x-v", HeaderValue::from_static("2: two"));
        let mut upstream = client.clone();
        upstream.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let job = RefreshJob {
            key: "h/p?q=1".into(),
            url: "h/p?q=1".into(),
            path_and_query: "/p?q=1".into(),
            client_headers: client,
            upstream_headers: upstream,
            keyed_cookies: true,
            keyed_authorization: false,
            keyed_cookie_header: true,
            stale: true,
        };
        let mut entry = StreamId {
            id: "1-0".into(),
            ..StreamId::default()
        };
        for (name, value) in job.fields() {
            entry
                .map
                .insert(name.to_string(), redis::Value::BulkString(value));
        }
        assert_eq!(RefreshJob::from_entry(&entry), Some(job.clone()));
        // Another version's job, or a hand-written one, is not a job.
        entry
            .map
            .insert("v".into(), redis::Value::BulkString(b"2".to_vec()));
        assert_eq!(RefreshJob::from_entry(&entry), None);
        entry
            .map
            .insert("v".into(), redis::Value::BulkString(b"1".to_vec()));
        entry.map.insert(
            "path".into(),
            redis::Value::BulkString(b"http://x/".to_vec()),
        );
        assert_eq!(RefreshJob::from_entry(&entry), None);
    }
}
