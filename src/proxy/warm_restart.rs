//! Warm restart (`--snapshot-dir`): the proxy's side of [`crate::snapshot`].
//! The snapshot is read into the store at start, written every
//! `--snapshot-interval` and at shutdown, and removed by a purge (which it
//! would otherwise undo after a crash).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{shared, Proxy};
use crate::snapshot::{self, Written};

impl Proxy {
    /// Writes the snapshot every `--snapshot-interval` (when set) and once
    /// more at shutdown, after the servers stopped taking requests.
    pub(super) fn keep_snapshots(
        self: &Arc<Self>,
        dir: PathBuf,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) {
        let every = self.config.start.snapshot_interval;
        let saver = Arc::clone(self);
        tracker.spawn(async move {
            if !every.is_zero() {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => saver.save_snapshot(&dir).await,
                        () = stop.cancelled() => break,
                    }
                }
            } else {
                stop.cancelled().await;
            }
            saver.save_snapshot(&dir).await;
        });
    }

    /// Stores the entries of the snapshot in `dir` (`--snapshot-dir`), if
    /// there is a whole one; says what it did.
    pub(super) fn load_snapshot(&self, dir: &Path) {
        let started = Instant::now();
        let max_bytes = snapshot::size_limit(self.store.max_bytes());
        match snapshot::read(dir, max_bytes, started, SystemTime::now()) {
            Ok(None) => tracing::info!(dir = %dir.display(), "no snapshot to start from"),
            Ok(Some(loaded)) => {
                let count = loaded.entries.len();
                for entry in &loaded.entries {
                    let url = shared::url_text_of(entry);
                    self.adopt(entry, url, self.keys.hash_text(url));
                }
                tracing::info!(
                    dir = %dir.display(),
                    entries = count,
                    expired = loaded.expired,
                    took_ms = started.elapsed().as_millis() as u64,
                    "started from the snapshot"
                );
                if let Some(why) = &loaded.first_skipped {
                    tracing::warn!(
                        file = %snapshot::path(dir).display(),
                        skipped = loaded.skipped,
                        why = %why,
                        "skipped snapshot records that do not decode (a writer's bug; the others were loaded)"
                    );
                }
            }
            Err(why) => tracing::warn!(
                file = %snapshot::path(dir).display(),
                why,
                "ignoring the snapshot; starting empty"
            ),
        }
    }

    /// Writes the cache's entries as the snapshot in `dir`, off the serving
    /// threads; says what it did.
    async fn save_snapshot(&self, dir: &Path) {
        // Read before the entries are: a purge after this point (whose
        // entries this snapshot may still hold) is seen below.
        let purges = self.purges.load(SeqCst);
        let now = Instant::now();
        let entries = self.store.entries(now);
        let dir = dir.to_path_buf();
        let shown = dir.display().to_string();
        let wall = SystemTime::now();
        let written =
            tokio::task::spawn_blocking(move || snapshot::write(&dir, &entries, now, wall)).await;
        if self.purges.load(SeqCst) != purges {
            // A purge while it was written: it may hold what was purged.
            self.snapshot_outdated();
            return;
        }
        match written {
            Ok(Ok(Written { entries, bytes })) => tracing::info!(
                dir = %shown,
                entries,
                bytes,
                took_ms = now.elapsed().as_millis() as u64,
                "snapshot written"
            ),
            Ok(Err(err)) => tracing::warn!(dir = %shown, error = %err, "cannot write the snapshot"),
            Err(err) => tracing::warn!(dir = %shown, error = %err, "the snapshot writer failed"),
        }
    }

    /// After a purge (the store purged first): the snapshot on disk may hold
    /// what was purged, and would bring it back at the next start after a
    /// crash; it is removed (the next one is written without it).
    pub(super) fn snapshot_outdated(&self) {
        let Some(dir) = &self.config.start.snapshot_dir else {
            return;
        };
        self.purges.fetch_add(1, SeqCst);
        match std::fs::remove_file(snapshot::path(dir)) {
            Ok(()) => tracing::info!(
                dir = %dir.display(),
                "snapshot removed: a purge made it outdated"
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot remove the outdated snapshot")
            }
        }
    }
}
