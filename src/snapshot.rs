//! Warm restart without Redis (`--snapshot-dir`): the cache's entries are
//! written to a file on shutdown (and every `--snapshot-interval`), and
//! read back at the next start, so a restarted instance answers from
//! memory at once instead of sending its traffic to the backend.
//!
//! The file is `swr-proxy.snapshot` in the directory: written to a
//! temporary file in the same directory (created anew, never through a
//! link found at its name, readable by its owner only: it holds every
//! cached answer), synced, then renamed over the old one, so a crash mid-write leaves the previous snapshot whole. Each entry
//! is encoded as fleet mode encodes it for Redis ([`crate::fleet::codec`]:
//! instants as wall-clock times, so the time the process was down counts
//! in every entry's age), after its key text; the file ends with the entry
//! count and a CRC-32 of everything before it.
//!
//! ```text
//! "SWRSNAP" version(1) { key_len(u32) key value_len(u32) value }* count(u64) crc32(u32)
//! ```
//!
//! A file that is not whole (another program's, a newer version, a
//! truncated or altered one, one larger than the cache could hold) is
//! ignored with a warning: the instance starts empty, as without it. So is
//! one that another user could have written: what the file holds is served
//! to every client, so it is read only when it is a regular file (not a
//! link), owned by this process's user and writable by nobody else. The
//! CRC-32 finds damage, not forgery: the directory must be private. In a
//! whole file, a record that does not decode as an entry (which only a bug
//! in the writer makes) is skipped and counted in the start's warning; the
//! entries around it are kept.
//! Temporary files that a killed writer left behind are removed when the
//! snapshot is read.
//! Entries past every window when read are dropped; stale ones are served
//! stale and refreshed by their next request, so the keys clients ask for
//! first (the hottest) are refreshed first, within the adaptive limit.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::cache::entry::Entry;
use crate::files::{self, Links};
use crate::fleet::codec::{self, Shared};

/// The snapshot's file name in `--snapshot-dir`.
pub const FILE_NAME: &str = "swr-proxy.snapshot";

const MAGIC: &[u8; 7] = b"SWRSNAP";
const VERSION: u8 = 1;
/// The write buffer: entries go to disk in large writes.
const WRITE_BUFFER: usize = 1 << 20;
/// A temporary file older than this is a killed writer's, and removed.
const LEFT_BEHIND: std::time::Duration = std::time::Duration::from_secs(600);

/// The largest snapshot read for a cache of `cache_max_bytes`: twice its
/// budget (a record repeats its entry's key, and the encoding writes header
/// names and instants in full, where the cache counts a byte or eight) and
/// 1 MiB more for a small cache; a larger file is not one of its own.
pub fn size_limit(cache_max_bytes: u64) -> u64 {
    cache_max_bytes.saturating_mul(2).saturating_add(1 << 20)
}

/// The snapshot's path in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// This process's temporary file in `dir`, written before it is renamed
/// to the snapshot (and named so that [`remove_left_behind`] finds it).
fn temporary_path(dir: &Path) -> PathBuf {
    dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()))
}

/// A writer that keeps the CRC-32 of what passed through it.
struct Summed<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Summed<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }
}

/// What writing a snapshot gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Entries written.
    pub entries: u64,
    /// The file's size.
    pub bytes: u64,
}

/// Writes `entries` as the snapshot in `dir` (replacing the last one only
/// once the new one is whole on disk), `now` being `wall`.
pub fn write(
    dir: &Path,
    entries: &[Entry],
    now: Instant,
    wall: SystemTime,
) -> std::io::Result<Written> {
    let final_path = path(dir);
    let temporary = temporary_path(dir);
    match write_synced(&temporary, entries, now, wall) {
        Ok(done) => {
            if let Err(err) = std::fs::rename(&temporary, &final_path) {
                let _ = std::fs::remove_file(&temporary);
                return Err(err);
            }
            // The rename itself reaches the disk with the directory.
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
            Ok(done)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&temporary);
            Err(err)
        }
    }
}

/// Writes `entries` to a new file at `path` and syncs it to disk. Entries
/// past every window at `now`, and any whose key or encoding is longer than
/// a u32 can say, are left out.
fn write_synced(
    path: &Path,
    entries: &[Entry],
    now: Instant,
    wall: SystemTime,
) -> std::io::Result<Written> {
    let file = create_private(path)?;
    let mut out = Summed {
        inner: BufWriter::with_capacity(WRITE_BUFFER, file),
        crc: crc32fast::Hasher::new(),
    };
    out.put(MAGIC)?;
    out.put(&[VERSION])?;
    let mut count: u64 = 0;
    for entry in entries.iter().filter(|e| now < e.evict_at()) {
        let key = entry.key().as_bytes();
        let value = codec::encode_entry(entry, now, wall);
        let (Ok(key_len), Ok(value_len)) = (u32::try_from(key.len()), u32::try_from(value.len()))
        else {
            continue;
        };
        out.put(&key_len.to_le_bytes())?;
        out.put(key)?;
        out.put(&value_len.to_le_bytes())?;
        out.put(&value)?;
        count += 1;
    }
    out.put(&count.to_le_bytes())?;
    let crc = out.crc.clone().finalize();
    out.inner.write_all(&crc.to_le_bytes())?;
    let file = out.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(Written {
        entries: count,
        bytes: file.metadata()?.len(),
    })
}

/// Creates `path` anew, readable and writable by this user only: whatever
/// is there (a temporary file a crash left, or a link someone planted at
/// the predictable name) is removed first, and the file is created only if
/// nothing took its place meanwhile, so the write never goes through a link.
fn create_private(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Why a snapshot in `dir` with `metadata` may not be read, if it may not:
/// it is not a regular file, or (unix) another user owns it or may write it.
fn not_trusted(dir: &Path, metadata: &std::fs::Metadata) -> Option<String> {
    if !metadata.is_file() {
        return Some("not a regular file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = match process_user(dir) {
            Ok(uid) => uid,
            Err(err) => return Some(format!("cannot tell this process's user: {err}")),
        };
        if metadata.uid() != me {
            return Some(format!(
                "owned by user {}, not by this process's user {me}",
                metadata.uid()
            ));
        }
        // A second name for the file (a hard link someone made to an old
        // snapshot, or to one of theirs to keep after its owner changes
        // it): the file swr-proxy writes is renamed into place, one name.
        if metadata.nlink() != 1 {
            return Some(format!("{} names (hard links), not one", metadata.nlink()));
        }
        if metadata.mode() & 0o022 != 0 {
            return Some(format!(
                "writable by other users (mode {:o})",
                metadata.mode() & 0o777
            ));
        }
    }
    None
}

/// This process's (effective) user id. std has no `geteuid` and the crate
/// forbids unsafe code: on Linux it is the owner of `/proc/self`;
/// elsewhere, of a file this process creates in `dir`.
#[cfg(unix)]
fn process_user(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(own) = std::fs::metadata("/proc/self") {
        return Ok(own.uid());
    }
    let probe = temporary_path(dir);
    let probed = create_private(&probe).and_then(|file| file.metadata());
    let _ = std::fs::remove_file(&probe);
    Ok(probed?.uid())
}

/// Removes the temporary files in `dir` that a writer killed mid-write
/// left behind (named as [`write`] names them, and older than
/// [`LEFT_BEHIND`]: a writer at work is never that slow).
fn remove_left_behind(dir: &Path) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{FILE_NAME}.");
    for item in listing.flatten() {
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with(&prefix) && name.ends_with(".tmp")) {
            continue;
        }
        let old = item
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age > LEFT_BEHIND);
        if old && std::fs::remove_file(item.path()).is_ok() {
            tracing::info!(file = %item.path().display(), "removed a snapshot a killed writer left");
        }
    }
}

/// What reading a snapshot gave.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Entries that can still be served or revalidated.
    pub entries: Vec<Entry>,
    /// Entries dropped: past every window when read.
    pub expired: u64,
    /// Records skipped: they did not decode as an entry. The file's
    /// checksum held, so this version's writer wrote them (a bug to report,
    /// not damage); the records around them are whole and are kept.
    pub skipped: u64,
    /// Why the first skipped record did not decode.
    pub first_skipped: Option<String>,
}

impl Loaded {
    /// Counts a skipped record, keeping why the first was.
    fn skip(&mut self, why: String) {
        self.skipped += 1;
        self.first_skipped.get_or_insert(why);
    }
}

/// Reads the snapshot in `dir`, `now` being `wall`: `Ok(None)` when there
/// is none, `Err` (with why) when it is not a whole snapshot of this
/// version or is larger than `max_bytes`. In a whole snapshot, a record
/// that does not decode is skipped and counted ([`Loaded::skipped`]), not
/// a reason to drop every other entry.
pub fn read(
    dir: &Path,
    max_bytes: u64,
    now: Instant,
    wall: SystemTime,
) -> Result<Option<Loaded>, String> {
    remove_left_behind(dir);
    let file = match files::open_regular(&path(dir), Links::Refuse) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("cannot open it: {err}")),
    };
    let metadata = file.metadata().map_err(|e| e.to_string())?;
    if let Some(why) = not_trusted(dir, &metadata) {
        return Err(why);
    }
    let size = metadata.len();
    if size > max_bytes {
        return Err(format!(
            "{size} bytes, more than the cache's budget allows ({max_bytes})"
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
        return Err("truncated".into());
    };
    if !body.starts_with(MAGIC) {
        return Err("not a swr-proxy snapshot".into());
    }
    if body.get(MAGIC.len()) != Some(&VERSION) {
        return Err("written by another version".into());
    }
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err("truncated or altered (checksum)".into());
    }
    let Some((records, count)) = body[MAGIC.len() + 1..].split_last_chunk::<8>() else {
        return Err("truncated".into());
    };
    let count = u64::from_le_bytes(*count);
    let mut loaded = Loaded::default();
    let mut rest = records;
    let mut read_count: u64 = 0;
    while !rest.is_empty() {
        let (key, after) = take_sized(rest).ok_or("truncated record")?;
        let (value, after) = take_sized(after).ok_or("truncated record")?;
        rest = after;
        read_count += 1;
        let Ok(key) = std::str::from_utf8(key) else {
            loaded.skip("a key that is not text".into());
            continue;
        };
        match codec::decode(value, key, now, wall) {
            Ok(Shared::Entry(entry)) if now < entry.evict_at() => loaded.entries.push(entry),
            Ok(Shared::Entry(_)) => loaded.expired += 1,
            Ok(Shared::Vary(_)) => loaded.skip("a record that is not an entry".into()),
            Err(codec::Corrupt(why)) => loaded.skip(format!("a corrupt entry ({why})")),
        }
    }
    if read_count != count {
        return Err(format!("{read_count} entries where it says {count}"));
    }
    Ok(Some(loaded))
}

/// A u32 length and that many bytes, and what follows.
fn take_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    (len <= rest.len()).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Lifetimes;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, StatusCode};
    use std::time::Duration;

    fn entry(key: &str, fresh: u64, now: Instant) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"e\""));
        let lifetimes = Lifetimes {
            fresh: Duration::from_secs(fresh),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(5),
            initial_age: Duration::ZERO,
            keep_for_revalidation: Duration::ZERO,
        };
        Entry::new(
            key,
            StatusCode::OK,
            &headers,
            &[Bytes::from(format!("body of {key}"))],
            now,
            lifetimes,
        )
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("swr-snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_snapshot_round_trips_and_drops_what_expired_meanwhile() {
        let dir = scratch("round-trip");
        let now = Instant::now();
        let entries = [
            entry("h/a", 60, now),
            entry("h/b\nx=1", 60, now),
            entry("h/c", 1, now),
        ];
        let wall = SystemTime::now();
        let written = write(&dir, &entries, now, wall).expect("written");
        assert_eq!(written.entries, 3);
        assert_eq!(
            written.bytes,
            std::fs::metadata(path(&dir)).expect("file").len()
        );
        // Read back 2 s later (as if the process was down that long): the
        // third entry (1 s fresh, 5 s windows) is still usable; 20 s later
        // it is not.
        let later = |secs| {
            (
                now + Duration::from_secs(secs),
                wall + Duration::from_secs(secs),
            )
        };
        let (at, wall_at) = later(2);
        let loaded = read(&dir, 1 << 20, at, wall_at)
            .expect("whole")
            .expect("there");
        assert_eq!(loaded.entries.len(), 3);
        assert_eq!(loaded.entries[1].key(), "h/b\nx=1");
        assert_eq!(&loaded.entries[0].body()[..], b"body of h/a");
        assert_eq!(
            loaded.entries[0].etag(),
            Some(HeaderValue::from_static("\"e\""))
        );
        let (at, wall_at) = later(20);
        let loaded = read(&dir, 1 << 20, at, wall_at)
            .expect("whole")
            .expect("there");
        assert_eq!((loaded.entries.len(), loaded.expired), (2, 1));
        // No temporary file is left behind.
        let files = std::fs::read_dir(&dir).expect("dir").count();
        assert_eq!(files, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The temporary file's name is predictable (the pid): in a directory
    /// others can write to, a link planted there must not make the write
    /// go through it, and the snapshot (every cached answer) is the
    /// owner's to read only.
    #[cfg(unix)]
    #[test]
    fn the_write_follows_no_planted_link_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("planted-link");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let temporary = temporary_path(&dir);
        std::os::unix::fs::symlink(&victim, &temporary).expect("link");
        let now = Instant::now();
        write(&dir, &[entry("h/a", 60, now)], now, SystemTime::now()).expect("written");
        assert_eq!(
            std::fs::read(&victim).expect("victim"),
            b"precious",
            "the write went through the planted link"
        );
        let mode = std::fs::metadata(path(&dir))
            .expect("snapshot")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        assert!(read(&dir, 1 << 20, now, SystemTime::now())
            .expect("whole")
            .is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A FIFO where the snapshot should be (put there by someone who can
    /// write to the directory) is refused at once: opened without
    /// `O_NONBLOCK`, the start waited for a writer that never came.
    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_the_snapshot_is_refused_without_waiting() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = scratch("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(path(&dir))
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "mkfifo");
        let (done, result) = std::sync::mpsc::channel();
        let reader_dir = dir.clone();
        std::thread::spawn(move || {
            let now = Instant::now();
            let _ = done.send(read(&reader_dir, 1 << 20, now, SystemTime::now()));
        });
        // Generous on a loaded machine; the open returns in microseconds.
        let outcome = result.recv_timeout(Duration::from_secs(20));
        // Unblocks a reader still waiting, so the thread ends either way
        // (without a reader, a non-blocking open for writing fails at once).
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path(&dir));
        let err = outcome
            .expect("the read of a FIFO waited for a writer")
            .expect_err("a FIFO is no snapshot");
        assert!(err.contains("not a regular file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What the file holds is served to everyone: a snapshot reached
    /// through a link, or one another user owns or may write, is refused;
    /// a killed writer's old temporary file is removed, a recent one kept.
    #[cfg(unix)]
    #[test]
    fn a_snapshot_others_could_have_written_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("untrusted");
        let now = Instant::now();
        write(&dir, &[entry("h/a", 60, now)], now, SystemTime::now()).expect("written");
        let mode = |m| std::fs::Permissions::from_mode(m);
        let read_now = || read(&dir, 1 << 20, now, SystemTime::now());

        std::fs::set_permissions(path(&dir), mode(0o666)).expect("chmod");
        let err = read_now().expect_err("writable by others");
        assert!(err.contains("writable by other users"), "{err}");
        std::fs::set_permissions(path(&dir), mode(0o600)).expect("chmod");
        assert!(read_now().expect("whole").is_some(), "private again: read");

        let second_name = dir.join("second-name");
        std::fs::hard_link(path(&dir), &second_name).expect("hard link");
        let err = read_now().expect_err("two names");
        assert!(err.contains("hard links"), "{err}");
        std::fs::remove_file(&second_name).expect("unlink");
        assert!(read_now().expect("whole").is_some(), "one name again: read");

        // As root (CI), the file can be given to another user.
        if std::os::unix::fs::chown(path(&dir), Some(54_321), None).is_ok() {
            let err = read_now().expect_err("another user's");
            assert!(err.contains("owned by user 54321"), "{err}");
        }

        let real = dir.join("elsewhere");
        std::fs::rename(path(&dir), &real).expect("move");
        std::fs::set_permissions(&real, mode(0o600)).expect("chmod");
        std::os::unix::fs::symlink(&real, path(&dir)).expect("link");
        let err = read_now().expect_err("a link");
        assert!(err.contains("not a regular file"), "{err}");

        let stale = dir.join(format!(".{FILE_NAME}.1.tmp"));
        let fresh = dir.join(format!(".{FILE_NAME}.2.tmp"));
        for file in [&stale, &fresh] {
            std::fs::write(file, b"half a snapshot").expect("write");
        }
        let long_ago = SystemTime::now() - LEFT_BEHIND - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(long_ago))
            .expect("set mtime");
        let _ = read_now();
        assert!(!stale.exists(), "a killed writer's file is removed");
        assert!(fresh.exists(), "a recent one may be a writer at work");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A snapshot in a read-only directory (a read-only volume of
    /// pre-warmed snapshots) is read: telling this process's user needs no
    /// file of its own there. Needs root, for a read-only bind mount.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_snapshot_in_a_read_only_directory_is_read() {
        let dir = scratch("read-only");
        let now = Instant::now();
        write(&dir, &[entry("h/a", 60, now)], now, SystemTime::now()).expect("written");
        let mount = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .arg(&dir)
                .arg(&dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !mount(&["--bind"]) {
            eprintln!("skipping: cannot bind-mount here (not root?)");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let read_only = std::process::Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        let result = read(&dir, 1 << 20, now, SystemTime::now());
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(read_only, "the bind mount was made read-only");
        assert!(
            matches!(&result, Ok(Some(loaded)) if loaded.entries.len() == 1),
            "{result:?}"
        );
    }

    #[test]
    fn a_record_that_does_not_decode_is_skipped_and_the_others_kept() {
        let dir = scratch("one-bad-record");
        let now = Instant::now();
        let three = [
            entry("h/a", 60, now),
            entry("h/b", 60, now),
            entry("h/c", 60, now),
        ];
        write(&dir, &three, now, SystemTime::now()).expect("written");
        let whole = std::fs::read(path(&dir)).expect("file");
        // Past the first record to the second's value, whose last byte is
        // flipped; the file's checksum is made to hold again, as it would
        // for a record this version's writer got wrong.
        let mut at = MAGIC.len() + 1;
        let sized = |file: &[u8], at: usize| {
            let len = u32::from_le_bytes(file[at..at + 4].try_into().expect("4 bytes"));
            at + 4 + len as usize
        };
        at = sized(&whole, sized(&whole, at));
        let key_end = sized(&whole, at);
        let value_end = sized(&whole, key_end);
        assert_eq!(&whole[at + 4..key_end], b"h/b");
        let mut file = whole.clone();
        file[value_end - 1] ^= 0xff;
        rewrite_with_checksum(&dir, file);
        let loaded = read(&dir, 1 << 20, now, SystemTime::now())
            .expect("a whole file")
            .expect("a snapshot");
        let keys: Vec<&str> = loaded.entries.iter().map(|e| e.key()).collect();
        assert_eq!(keys, ["h/a", "h/c"]);
        assert_eq!(loaded.skipped, 1);
        assert_eq!(
            loaded.first_skipped.as_deref(),
            Some("a corrupt entry (checksum)")
        );

        // A key that is not text is skipped the same way.
        let mut file = whole;
        file[at + 4] = 0xff;
        rewrite_with_checksum(&dir, file.clone());
        let loaded = read(&dir, 1 << 20, now, SystemTime::now())
            .expect("a whole file")
            .expect("a snapshot");
        assert_eq!(loaded.entries.len(), 2);
        assert_eq!(
            loaded.first_skipped.as_deref(),
            Some("a key that is not text")
        );

        // The count at the end still has to match the records read.
        let count_at = file.len() - 4 - 8;
        file[count_at] ^= 1;
        rewrite_with_checksum(&dir, file);
        let err = read(&dir, 1 << 20, now, SystemTime::now()).expect_err("a wrong count");
        assert!(err.contains("entries where it says"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writes `file` as the snapshot in `dir` with its checksum made to hold.
    fn rewrite_with_checksum(dir: &Path, mut file: Vec<u8>) {
        let body = file.len() - 4;
        let crc = crc32fast::hash(&file[..body]);
        file[body..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(path(dir), &file).expect("write");
    }

    #[test]
    fn no_snapshot_is_none_and_a_damaged_one_is_refused_with_why() {
        let dir = scratch("damaged");
        let now = Instant::now();
        assert!(read(&dir, 1 << 20, now, SystemTime::now())
            .expect("no file is fine")
            .is_none());
        let two = [entry("h/a", 60, now), entry("h/b", 60, now)];
        write(&dir, &two, now, SystemTime::now()).expect("written");
        let whole = std::fs::read(path(&dir)).expect("file");
        for cut in [0, 5, whole.len() / 2, whole.len() - 1] {
            std::fs::write(path(&dir), &whole[..cut]).expect("write");
            assert!(
                read(&dir, 1 << 20, now, SystemTime::now()).is_err(),
                "cut at {cut}"
            );
        }
        let mut flipped = whole.clone();
        flipped[whole.len() / 2] ^= 1;
        std::fs::write(path(&dir), &flipped).expect("write");
        let err = read(&dir, 1 << 20, now, SystemTime::now()).expect_err("altered");
        assert!(err.contains("checksum"), "{err}");
        std::fs::write(path(&dir), b"#!/bin/sh\necho not a snapshot\n").expect("write");
        assert_eq!(
            read(&dir, 1 << 20, now, SystemTime::now()).expect_err("foreign"),
            "not a swr-proxy snapshot"
        );
        std::fs::write(path(&dir), &whole).expect("write");
        assert!(read(&dir, 16, now, SystemTime::now())
            .expect_err("too large")
            .contains("budget"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
