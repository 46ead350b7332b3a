//! Reading a header from a file: the 8-byte length checked against the limit and the file size
//! before anything is allocated, then the JSON read with `pread` (no mmap) and handed to the
//! parser ([`parse_header`]).

use std::fs::File;
use std::path::Path;

use super::header::{parse_header, Header, MAX_HEADER_LEN};
use crate::error::{Error, Result};

/// Read and validate the header of the regular file at `path` (a FIFO or a directory is
/// [`Error::BadSource`]). Allocates at most the header length, and only after that length was
/// checked against [`MAX_HEADER_LEN`] and against the file size. Does not use mmap.
pub fn read_header(path: impl AsRef<Path>) -> Result<Header> {
    let path = path.as_ref();
    let mut file = crate::regular_file::open_regular(path)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_header_from(path, &mut file, file_len)
}

/// Like [`read_header`] on an open file whose length is known.
pub fn read_header_from(path: &Path, file: &mut File, file_len: u64) -> Result<Header> {
    read_header_keeping(path, file, file_len).map(|(header, _)| header)
}

/// Like [`read_header_from`], also returning the header's JSON bytes as the file holds them
/// (what a process hands its peers so that they need not read it: `Checkpoint::from_shared`).
pub(crate) fn read_header_keeping(path: &Path, file: &mut File, file_len: u64) -> Result<(Header, Vec<u8>)> {
    let header_len = check_prefix(path, file, file_len)?;
    // Checked above: header_len <= MAX_HEADER_LEN and <= file_len - 8.
    let mut buf = vec![0u8; header_len as usize];
    read_exact_at(file, &mut buf, 8).map_err(|e| eof_or_io(path, e, "the header", 8))?;
    let header = parse_header(path, &buf, file_len)?;
    Ok((header, buf))
}

fn check_prefix(path: &Path, file: &mut File, file_len: u64) -> Result<u64> {
    if file_len < 8 {
        return Err(Error::FileTooSmall { file: path.into(), len: file_len });
    }
    let mut prefix = [0u8; 8];
    read_exact_at(file, &mut prefix, 0).map_err(|e| eof_or_io(path, e, "the header length", 0))?;
    header_len_of(path, prefix, file_len)
}

/// The header length that the 8-byte `prefix` of a file of `file_len` bytes (at least 8)
/// declares, checked against [`MAX_HEADER_LEN`] and the file size before anything is allocated.
pub(crate) fn header_len_of(path: &Path, prefix: [u8; 8], file_len: u64) -> Result<u64> {
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::HeaderTooLarge { file: path.into(), len: header_len, limit: MAX_HEADER_LEN });
    }
    if header_len > file_len - 8 {
        return Err(Error::HeaderPastEnd { file: path.into(), len: header_len, file_len });
    }
    Ok(header_len)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

fn eof_or_io(path: &Path, e: std::io::Error, what: &'static str, at: u64) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::UnexpectedEof { file: path.into(), tensor: None, what, at }
    } else {
        Error::io(path, e)
    }
}
