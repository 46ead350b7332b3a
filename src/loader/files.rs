//! The loader's side of reading: opening a checkpoint with its remote options, and the files
//! of a plan opened for reading with its options (the source knows local from remote).

use super::Loader;
use crate::error::Result;
use crate::plan::Plan;
use crate::source::read::ReadOptions;
pub(crate) use crate::source::read::{ReadFiles, Requests};
use crate::source::{Checkpoint, RemoteOptions};

impl Loader {
    /// Open the checkpoint at `path` as this loader would: a local path, or a remote URL reached
    /// with the loader's storage options. [`Loader::load_checkpoint`] then loads it; a remote
    /// object that changed in between is an [`crate::Error::Remote`] of kind `Changed`.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// # weightstream::format::write_file(&p, &[weightstream::format::WriteTensor::new("w", weightstream::Dtype::U8, vec![1], &[1])], &Default::default())?;
    /// let loader = weightstream::Loader::new().device(weightstream::Device::Cpu);
    /// let ckpt = loader.open(&p)?;
    /// assert_eq!(loader.load_checkpoint(&ckpt)?.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(&self, path: impl AsRef<std::path::Path>) -> Result<Checkpoint> {
        // The loader's token stops a remote open too (a stalled server must not hold a Ctrl-C).
        let remote = RemoteOptions { cancel: self.cancel.clone(), ..self.remote.clone() };
        Checkpoint::open_with(path, &remote)
    }

    /// [`Loader::open`], also returning the headers as read, for the other ranks of a group
    /// ([`Checkpoint::open_sharing`]).
    pub fn open_sharing(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<(Checkpoint, Vec<crate::source::SharedFile>)> {
        let remote = RemoteOptions { cancel: self.cancel.clone(), ..self.remote.clone() };
        Checkpoint::open_sharing(path, &remote)
    }

    /// The checkpoint a peer opened with [`Loader::open_sharing`], reached with this loader's
    /// storage options ([`Checkpoint::from_shared`]).
    pub fn open_shared(&self, files: Vec<crate::source::SharedFile>) -> Result<Checkpoint> {
        let remote = RemoteOptions { cancel: self.cancel.clone(), ..self.remote.clone() };
        Checkpoint::from_shared(files, &remote)
    }

    /// The files of `plan`, open for reading as this loader's options ask.
    pub(super) fn read_files(&self, ckpt: &Checkpoint, plan: &Plan) -> Result<ReadFiles> {
        let opts = ReadOptions {
            io: self.io,
            direct: self.direct,
            zero_copy: self.zero_copy,
            threads: self.threads,
            fault: self.fault,
            requests: self.requests(),
            // Reads that wait on a server end when the caller cancels, or a stream is dropped.
            cancel: self.cancel.iter().chain(&self.stream_stop).cloned().collect(),
        };
        ckpt.read_files(plan.files.iter().map(|f| f.source), &opts)
    }
}
