//! `--upstream-ca`: the CA certificates an https backend is verified
//! against, read once at start into the roots the upstream client is built
//! with ([`Config::upstream_roots`](super::Config)). A reload keeps them
//! (the setting is read at start; a new file needs a restart).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use super::ConfigError;
use crate::files::{self, Links};

/// A CA file larger than this is refused: Mozilla's whole bundle is about
/// 220 KB, and a path to `/dev/zero` must not fill memory.
const MAX_CA_FILE: u64 = 4 << 20;

/// The roots in the PEM file `path` (`--upstream-ca`): every certificate in
/// it, and only those. A file that cannot be read, is not a regular file
/// (a FIFO would hold the start waiting for a writer), is larger than
/// [`MAX_CA_FILE`], holds no certificate or one that cannot be a root is
/// an error naming the flag.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, ConfigError> {
    let fail = |why: String| ConfigError(format!("--upstream-ca {}: {why}", path.display()));
    let pem = read_regular(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for (n, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| fail(format!("not a PEM file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("certificate {} is not usable: {e}", n + 1)))?;
    }
    if roots.is_empty() {
        return Err(fail("holds no certificate (BEGIN CERTIFICATE)".into()));
    }
    Ok(Arc::new(roots))
}

/// The bytes of `path`, a regular file (links followed) of at most
/// [`MAX_CA_FILE`] bytes.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = files::open_regular(path, Links::Follow)?;
    // Read up to one byte past the limit: a file that grew since its
    // `fstat` is caught as well.
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE + 1).read_to_end(&mut pem)?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_CA_FILE >> 20
        )));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_past_the_limit_is_refused_unread() {
        let path = std::env::temp_dir().join(format!("swr-ca-large-{}.pem", std::process::id()));
        std::fs::write(&path, vec![b'-'; MAX_CA_FILE as usize + 1]).expect("write");
        let refused = read_roots(&path);
        let _ = std::fs::remove_file(&path);
        let Err(ConfigError(why)) = refused else {
            panic!("a file over the limit is refused");
        };
        assert!(why.contains("larger than 4 MiB"), "{why}");
        assert!(why.starts_with("--upstream-ca "), "{why}");
    }
}
