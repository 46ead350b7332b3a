//! A checkpoint opened once for a group of processes: one reads the headers
//! ([`Checkpoint::open_sharing`]), the others open the same files from them
//! ([`Checkpoint::from_shared`]) without reading a header, each header validated again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{is_remote, local, open_regular, resolve, Checkpoint, CheckpointFile, FileAccess, RemoteOptions};
use crate::error::{Error, Result};
use crate::format::parse_header;

/// One file of a checkpoint as a process of a group opened it ([`Checkpoint::open_sharing`]):
/// what the others need to open it without reading its header ([`Checkpoint::from_shared`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    /// Path or URL.
    pub path: PathBuf,
    /// The header's JSON bytes, as the file holds them.
    pub header: Vec<u8>,
    /// The file's length.
    pub file_len: u64,
    /// A remote object's ETag, when the store gave one.
    pub etag: Option<String>,
    /// A remote object's last-modification time (empty for a local file).
    pub last_modified: String,
}

impl SharedFile {
    fn of(f: &CheckpointFile, header: Vec<u8>) -> Self {
        let (path, etag, last_modified) = match &f.access {
            // Absolute: a peer with another working directory opens this file, not its namesake.
            FileAccess::Local(_) => {
                (std::path::absolute(&f.path).unwrap_or_else(|_| f.path.clone()), None, String::new())
            }
            #[cfg(feature = "remote")]
            FileAccess::Remote(o) => (f.path.clone(), o.etag().map(str::to_string), o.last_modified().to_string()),
        };
        SharedFile { path, header, file_len: f.header.file_len, etag, last_modified }
    }
}

impl Checkpoint {
    /// [`Checkpoint::open_with`], also returning each file's header as it read it: what one
    /// process of a group hands the others ([`Checkpoint::from_shared`]) so that the group reads
    /// each header once (on an object store: one GET per header per group, not per process).
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, Checkpoint, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("x", Dtype::U8, vec![3], &[1, 2, 3])], &Default::default())?;
    /// let (ckpt, shared) = Checkpoint::open_sharing(&p, &Default::default())?;
    /// let again = Checkpoint::from_shared(shared, &Default::default())?;
    /// assert_eq!(again.files[0].header.tensors, ckpt.files[0].header.tensors);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_sharing(path: impl AsRef<Path>, remote: &RemoteOptions) -> Result<(Checkpoint, Vec<SharedFile>)> {
        let path = path.as_ref();
        let (files, index) = if is_remote(path) {
            Self::open_remote_keeping(path, remote)?
        } else {
            let (paths, index) = resolve(path)?;
            let files = paths
                .into_iter()
                .map(|p| {
                    let mut file = open_regular(&p)?;
                    let len = file.metadata().map_err(|e| Error::io(&p, e))?.len();
                    let (header, raw) = crate::format::read_header_keeping(&p, &mut file, len)?;
                    Ok((CheckpointFile { path: p, header, access: FileAccess::Local(Arc::new(file)) }, raw))
                })
                .collect::<Result<Vec<_>>>()?;
            (files, index)
        };
        let (plain, raws): (Vec<CheckpointFile>, Vec<Vec<u8>>) = files.into_iter().unzip();
        if let Some(index) = index.as_ref().filter(|_| !is_remote(path)) {
            local::check_confined(index, &plain)?;
        }
        let shared = plain.iter().zip(raws).map(|(f, raw)| SharedFile::of(f, raw)).collect();
        Ok((Self::checked(plain, index)?, shared))
    }

    /// The checkpoint that a peer opened with [`Checkpoint::open_sharing`], from the headers it
    /// read: each is parsed and validated again here (a peer's bytes are no more trusted than a
    /// file's), local files are opened and must have the length the peer saw, remote objects
    /// are reached without a request (their first GET checks size and ETag). No header is read.
    pub fn from_shared(files: Vec<SharedFile>, remote: &RemoteOptions) -> Result<Checkpoint> {
        let files = files
            .into_iter()
            .map(|s| {
                let header = parse_header(&s.path, &s.header, s.file_len)?;
                let access = if is_remote(&s.path) {
                    Self::adopt_remote(&s, remote)?
                } else {
                    let file = open_regular(&s.path)?;
                    let len = file.metadata().map_err(|e| Error::io(&s.path, e))?.len();
                    if len != s.file_len {
                        return Err(Error::BadSource {
                            file: s.path.clone(),
                            message: format!(
                                "{len} bytes here, {} bytes where the group's first process read its header \
                                 (not the same file?)",
                                s.file_len
                            ),
                        });
                    }
                    FileAccess::Local(Arc::new(file))
                };
                Ok(CheckpointFile { path: s.path, header, access })
            })
            .collect::<Result<Vec<_>>>()?;
        // The index was checked where it was read; the files are checked together again.
        Self::checked(files, None)
    }

    #[cfg(feature = "remote")]
    fn adopt_remote(s: &SharedFile, remote: &RemoteOptions) -> Result<FileAccess> {
        let url =
            s.path.to_str().ok_or_else(|| Error::BadSource { file: s.path.clone(), message: "not UTF-8".into() })?;
        let object = super::remote::adopt(url, s.file_len, s.etag.clone(), s.last_modified.clone(), remote)?;
        Ok(FileAccess::Remote(Arc::new(object)))
    }

    #[cfg(not(feature = "remote"))]
    fn adopt_remote(s: &SharedFile, _: &RemoteOptions) -> Result<FileAccess> {
        Err(Error::BadSource {
            file: s.path.clone(),
            message: "weightstream was built without the `remote` feature".into(),
        })
    }
}
