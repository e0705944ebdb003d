//! Opening a file this process reads at start (a snapshot, a CA file)
//! without blocking and without reading anything but a regular file.
//!
//! On unix the open uses `O_NONBLOCK`, so a FIFO put at the path returns at
//! once instead of holding the start until a writer comes (the flag does
//! nothing to a regular file's reads), and the check is of the file opened
//! (its `fstat`), so nothing swapped in after a check is read.

use std::fs::File;
use std::path::Path;

/// Whether the path may be a symbolic link to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Read through a link (CA files are often links: `/etc/ssl/certs`,
    /// mounted secrets).
    Follow,
    /// Refuse a link: on unix the open itself does (`O_NOFOLLOW`); elsewhere
    /// an `lstat` before the open does (with a window between the two).
    Refuse,
}

/// Opens `path` for reading; the file opened must be a regular file.
pub fn open_regular(path: &Path, links: Links) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        match links {
            Links::Follow => libc::O_NONBLOCK,
            Links::Refuse => libc::O_NOFOLLOW | libc::O_NONBLOCK,
        },
    );
    #[cfg(not(unix))]
    if links == Links::Refuse && !std::fs::symlink_metadata(path)?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file (a link?)"));
    }
    let file = options.open(path).map_err(|err| {
        // What O_NOFOLLOW answers for a link.
        #[cfg(unix)]
        if links == Links::Refuse && err.raw_os_error() == Some(libc::ELOOP) {
            return std::io::Error::other("a link, not a regular file");
        }
        err
    })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}
