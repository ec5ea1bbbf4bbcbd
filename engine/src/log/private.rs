//! Files only Herald's user may read: the log holds events, subscription records and (without
//! a secret key) their secrets, so its directories are created `0700` and its files `0600`,
//! whatever the process's umask.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and any missing parents as `0700`; an existing directory is left as it is.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Takes the data directory `dir` for this process: an exclusive lock on `dir/herald.lock`,
/// held while the returned file is open (the kernel lets go of it when the process ends, however
/// it ends). A second server on one directory would rewrite the first one's live files as it
/// opens the log (the catalog's compaction, the journal's restore) before anything else noticed.
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    let file = options().create(true).truncate(false).write(true).open(dir.join("herald.lock"))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            io::Error::new(io::ErrorKind::WouldBlock, "in use by another herald process (herald.lock is held)")
        } else {
            e.into()
        }
    })?;
    Ok(file)
}

/// Options that create a file as `0600`.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Creates (or truncates) `path` as `0600` for writing.
pub fn create(path: &Path) -> io::Result<File> {
    options().write(true).create(true).truncate(true).open(path)
}

/// Whether users other than the owner can read or enter `dir`.
pub fn open_to_others(dir: &Path) -> bool {
    std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}
