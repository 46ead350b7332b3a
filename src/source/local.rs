//! Local files beyond the open itself (which is `crate::regular_file`'s): the O_DIRECT reopen, and
//! the confinement of an index's shards checked on the open descriptors.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::CheckpointFile;
use crate::error::{Error, Result};
use crate::format::ShardIndex;

/// A second descriptor of `file` opened with O_DIRECT, through `/proc/self/fd` (the open file,
/// not the path, which may name another file by now); its device and inode are checked.
pub(super) fn reopen_direct(file: &File, path: &Path) -> Result<File> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(&proc_path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                Error::Io {
                    file: path.into(),
                    tensor: None,
                    source: std::io::Error::new(e.kind(), "this filesystem does not support O_DIRECT (--direct)"),
                }
            } else {
                Error::io(path, e)
            }
        })?;
    let (a, b) = (file.metadata(), direct.metadata());
    match (a, b) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => Ok(direct),
        (Err(e), _) | (_, Err(e)) => Err(Error::io(path, e)),
        _ => Err(Error::BadSource { file: path.into(), message: "reopening for O_DIRECT gave another file".into() }),
    }
}

/// Every shard of `index`, as opened, lies inside the index's tree (its directory, or the
/// Hugging Face cache repo folder for a snapshot): checked on the open descriptor, so a symlink
/// swapped in after the index was read cannot lead outside.
pub(super) fn check_confined(index: &ShardIndex, files: &[CheckpointFile]) -> Result<()> {
    let dir = index.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let root = crate::format::index::confinement_root(&canon_dir);
    for f in files {
        let real = std::fs::read_link(format!("/proc/self/fd/{}", f.local_file("an index's shard")?.as_raw_fd()))
            .map_err(|e| Error::io(&f.path, e))?;
        if !real.starts_with(&root) {
            return Err(Error::BadIndex {
                file: index.path.clone(),
                tensor: None,
                message: format!("shard {} leads outside {} (to {})", f.path.display(), root.display(), real.display()),
            });
        }
    }
    Ok(())
}
