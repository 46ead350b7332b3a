//! The files of a plan as the read engines reach them: local descriptors (a second, O_DIRECT
//! one where asked) or remote objects, and the engine that reads them.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
#[cfg(feature = "remote")]
use std::sync::Arc;

use super::Loader;
use crate::error::{Error, Result};
#[cfg(feature = "remote")]
use crate::io::IoKind;
use crate::io::{open_engine, EngineOptions, FaultyEngine, RawEngine};
use crate::plan::Plan;
#[cfg(feature = "remote")]
use crate::source::FileAccess;
use crate::source::{Checkpoint, RemoteOptions};

/// The planned files, open for reading.
pub(super) struct ReadFiles {
    /// Per planned file: its descriptor, or, for remote objects, its index in `remote`.
    pub handles: Vec<RawFd>,
    /// `Some` when the files are read by requests (remote objects).
    requests: Option<Requests>,
    /// O_DIRECT descriptors, open while the reads run.
    _direct: Vec<File>,
    #[cfg(feature = "remote")]
    remote: Option<Vec<Arc<crate::source::RemoteObject>>>,
}

/// How a source read by requests (an object store's GETs) rather than by system calls wants
/// to be read: requests of `size` bytes, `concurrency` of them in flight. It shapes the
/// strategy, the staging ring and the read sizes; local files have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Requests {
    pub size: usize,
    pub concurrency: usize,
}

impl ReadFiles {
    /// `Some` for a source read by requests.
    pub fn requests(&self) -> Option<Requests> {
        self.requests
    }
}

impl Loader {
    /// Open the checkpoint at `path` as this loader would: a local path, or a remote URL reached
    /// with the loader's storage options. [`Loader::load_checkpoint`] then loads it; a remote
    /// object that changed in between is an [`Error::Remote`] of kind `Changed`.
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

    /// The files of `plan` (of `ckpt`) open for reading under these options; an option that
    /// remote objects cannot honour (O_DIRECT, zero-copy, a named local engine) is an error.
    pub(super) fn read_files(&self, ckpt: &Checkpoint, plan: &Plan) -> Result<ReadFiles> {
        let files: Vec<_> = plan.files.iter().map(|f| &ckpt.files[f.source]).collect();
        if files.iter().any(|f| f.is_remote()) {
            return self.remote_files(&files);
        }
        let direct = match self.direct {
            true => files.iter().map(|f| f.reopen_direct()).collect::<Result<Vec<File>>>()?,
            false => Vec::new(),
        };
        let handles = match self.direct {
            true => direct.iter().map(File::as_raw_fd).collect(),
            false => {
                files.iter().map(|f| f.local_file("a local read").map(|f| f.as_raw_fd())).collect::<Result<_>>()?
            }
        };
        Ok(ReadFiles {
            handles,
            requests: None,
            _direct: direct,
            #[cfg(feature = "remote")]
            remote: None,
        })
    }

    #[cfg(feature = "remote")]
    fn remote_files(&self, files: &[&crate::source::CheckpointFile]) -> Result<ReadFiles> {
        let refuse =
            |what: &str| Err(Error::usage(format!("{what} applies to local files, not {}", files[0].path.display())));
        if self.direct {
            return refuse("O_DIRECT");
        }
        if self.zero_copy {
            return refuse("--zero-copy");
        }
        if self.io != IoKind::Auto {
            return refuse(&format!("--io {:?}", self.io));
        }
        let objects = files
            .iter()
            .map(|f| match &f.access {
                FileAccess::Remote(o) => Ok(Arc::clone(o)),
                _ => Err(Error::internal("a checkpoint of local and remote files")),
            })
            .collect::<Result<Vec<_>>>()?;
        let requests = Some(self.requests());
        let handles = (0..objects.len() as RawFd).collect();
        Ok(ReadFiles { handles, requests, _direct: Vec::new(), remote: Some(objects) })
    }

    #[cfg(not(feature = "remote"))]
    fn remote_files(&self, _: &[&crate::source::CheckpointFile]) -> Result<ReadFiles> {
        Err(Error::internal("a remote file without the `remote` feature"))
    }

    /// The engine that reads `files`, with `depth` reads in flight.
    pub(super) fn engine(&self, depth: usize, files: &ReadFiles) -> Result<Box<dyn RawEngine>> {
        #[cfg(feature = "remote")]
        if let Some(objects) = &files.remote {
            // Reads are sized to the request size by the stages' schedules (run.rs).
            let tokens = self.cancel.iter().chain(&self.stream_stop).cloned().collect();
            let engine = Box::new(crate::io::RemoteEngine::new(objects.clone(), self.remote.concurrency, tokens)?);
            return Ok(self.with_fault(engine));
        }
        let _ = files;
        let opts = EngineOptions { kind: self.io, queue_depth: depth.max(64), threads: self.threads };
        let engine = open_engine(&opts, self.direct)
            .map_err(|e| Error::usage(format!("cannot start the {:?} read engine: {e}", self.io)))?;
        Ok(self.with_fault(engine))
    }

    fn with_fault(&self, engine: Box<dyn RawEngine>) -> Box<dyn RawEngine> {
        match self.fault {
            Some(f) => Box::new(FaultyEngine::new(engine, f)),
            None => engine,
        }
    }
}
