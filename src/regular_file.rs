//! The one regular-file guard: every local file the crate reads (checkpoint files, shard
//! indexes, [`crate::format::read_header`]'s file) is first opened here. A leaf under both
//! `format` and `source`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Open `path` for reading if it is a regular file (or a symlink to one).
///
/// The open itself does not block (`O_NONBLOCK`: a FIFO would wait for a writer forever), and
/// the check is made on what was opened, so a path swapped for a FIFO or a device between a
/// check and the open is still refused.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let err = weightstream::source::open_regular(dir.path()).unwrap_err();
/// assert!(err.to_string().contains("not a regular file"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_regular(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::BadSource {
            file: path.into(),
            message: "not a regular file (a FIFO, socket, device or directory cannot be a checkpoint file)".into(),
        });
    }
    // The data is read through this descriptor: clear O_NONBLOCK, which io_uring honours on
    // some kernels with EAGAIN for reads that miss the page cache.
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| Error::io(path, e.into()))?;
    let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(blocking)).map_err(|e| Error::io(path, e.into()))?;
    Ok(file)
}
