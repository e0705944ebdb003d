//! swr-proxy: a stale-while-revalidate caching reverse proxy.
//!
//! A fresh entry is served from memory; a stale one is still served at once
//! while a background refresh replaces it; a miss is fetched from the backend
//! once however many clients ask; a backend failure is answered with a stale
//! copy when one is within its stale-if-error window.
//!
//! # Layout
//! In request-flow order:
//! - [`config`]: every setting declared once, read from flags and the file,
//!   layered, and `validate()`d before anything binds.
//! - [`routes`]: per-path rules, their patterns compiled at load.
//! - [`server`]: the accept loop and graceful shutdown.
//! - [`connections`]: open connections: closing idle ones and clients that
//!   stop reading, finishing all at shutdown.
//! - [`fast_hits`]: plain HTTP/1.1 `GET`s answered from the socket (hits from
//!   the entry, the rest with hyper's path's answer); every other request to hyper.
//! - [`proxy`]: the request flow: lookup -> fill or pass -> respond, one
//!   file per step, and fleet mode's part in fill and refresh.
//! - [`cache::key`]: the cache key of a request (host, path, query).
//! - [`cache::policy`]: pure rules: storable? lifetimes; state of an entry at `now`.
//! - [`cache::entry`]: the stored response and its instants.
//! - [`cache::store`]: the byte-bounded sharded map (CLOCK eviction) and
//!   coalesced fills; it charges the Vary index to its budget.
//! - [`cache::vary`]: variant keys and the Vary index.
//! - [`cache::status_field`]: the `Cache-Status` value, built in one place.
//! - [`fleet`]: fleet mode (`--redis`): the shared second level in Redis,
//!   per-key leases, the instances' events, and their encoding.
//! - [`refresh`]: bounded refresh queue, adaptive workers, per-key claim.
//! - [`upstream`]: the one upstream client, header shaping, body reading.
//! - [`body`]: the response body type (stored bytes or a passed-through stream).
//! - [`error`]: one error type tagged by source, mapped to a status.
//! - [`metrics`]: the counters and their Prometheus text.
//! - [`sampling`]: about one answer in sixteen per thread, at random gaps,
//!   for the popularity sketch and the top keys.
//! - [`admin`]: the admin listener: health, metrics, stats, purge.
//! - [`logs`]: log lines off the request path (bounded, lossy, counted),
//!   failure lines rate-limited per cause, the periodic summary.
//! - [`files`]: opening a file read at start (snapshot, CA file): regular
//!   files only, never blocking on a FIFO.
//! - [`snapshot`]: warm restart without Redis: the cache written to a file
//!   at shutdown and read back at start.
//! - [`demo`]: the built-in slow backend behind `swr-proxy demo`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod cache;
pub mod config;
pub mod connections;
pub mod demo;
pub mod error;
pub mod fast_hits;
pub mod files;
pub mod fleet;
pub mod logs;
pub mod metrics;
pub mod proxy;
pub mod refresh;
pub mod routes;
pub mod sampling;
pub mod server;
pub mod snapshot;
pub mod upstream;
