//! Reading a checkpoint's data: the files of a plan as a read engine reaches them, and the
//! engine. The one place that knows local files from remote objects; the loader asks what it
//! needs to know (how the source wants to be read: [`ReadFiles::requests`]) and gets an engine.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
#[cfg(feature = "remote")]
use std::sync::Arc;

use super::Checkpoint;
#[cfg(feature = "remote")]
use super::FileAccess;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::io::{open_engine, EngineOptions, Fault, FaultyEngine, IoKind, RawEngine};

/// How a source read by requests (an object store's GETs) rather than by system calls wants
/// to be read: requests of `size` bytes, `concurrency` of them in flight. It shapes the
/// strategy, the staging ring and the read sizes; local files have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Requests {
    pub size: usize,
    pub concurrency: usize,
}

/// How a load reads: the loader's options that the source and its engine honour.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "remote"), allow(dead_code))] // zero_copy, requests, cancel: remote only
pub(crate) struct ReadOptions {
    pub io: IoKind,
    pub direct: bool,
    pub zero_copy: bool,
    pub threads: usize,
    pub fault: Option<Fault>,
    /// Requests of a remote source.
    pub requests: Requests,
    /// Tokens that end waits on a server (the caller's, a stream's).
    pub cancel: Vec<CancelToken>,
}

/// The files of a plan, open for reading: local descriptors (a second, O_DIRECT one where
/// asked) or remote objects.
pub(crate) struct ReadFiles {
    /// Per planned file: its descriptor, or, for remote objects, its index in the engine's table.
    pub handles: Vec<RawFd>,
    opts: ReadOptions,
    /// O_DIRECT descriptors, open while the reads run.
    _direct: Vec<File>,
    #[cfg(feature = "remote")]
    remote: Option<Vec<Arc<super::RemoteObject>>>,
}

impl Checkpoint {
    /// Open the files `which` (indices into [`Checkpoint::files`]) for reading with `opts`. Data
    /// is read through the descriptors the headers were read from (O_DIRECT: a second
    /// descriptor of the same open file), or from the objects as their headers found them.
    /// Options a remote object cannot honour are usage errors.
    pub(crate) fn read_files(&self, which: impl Iterator<Item = usize>, opts: &ReadOptions) -> Result<ReadFiles> {
        let files: Vec<_> = which.map(|i| &self.files[i]).collect();
        #[cfg(feature = "remote")]
        if let Some(first) = files.iter().find(|f| matches!(f.access, FileAccess::Remote(_))) {
            let refuse =
                |what: &str| Err(Error::usage(format!("{what} applies to local files, not {}", first.path.display())));
            if opts.direct {
                return refuse("O_DIRECT");
            }
            if opts.zero_copy {
                return refuse("--zero-copy");
            }
            if opts.io != IoKind::Auto {
                return refuse(&format!("--io {:?}", opts.io));
            }
            let objects = files
                .iter()
                .map(|f| match &f.access {
                    FileAccess::Remote(o) => Ok(Arc::clone(o)),
                    FileAccess::Local(_) => Err(Error::internal("a checkpoint of local and remote files")),
                })
                .collect::<Result<Vec<_>>>()?;
            let handles = (0..objects.len() as RawFd).collect();
            return Ok(ReadFiles { handles, opts: opts.clone(), _direct: Vec::new(), remote: Some(objects) });
        }
        let direct = match opts.direct {
            true => files.iter().map(|f| f.reopen_direct()).collect::<Result<Vec<File>>>()?,
            false => Vec::new(),
        };
        let handles = match opts.direct {
            true => direct.iter().map(File::as_raw_fd).collect(),
            false => {
                files.iter().map(|f| f.local_file("a local read").map(|f| f.as_raw_fd())).collect::<Result<_>>()?
            }
        };
        Ok(ReadFiles {
            handles,
            opts: opts.clone(),
            _direct: direct,
            #[cfg(feature = "remote")]
            remote: None,
        })
    }
}

impl ReadFiles {
    /// `Some` for a source read by requests.
    pub fn requests(&self) -> Option<Requests> {
        #[cfg(feature = "remote")]
        if self.remote.is_some() {
            return Some(self.opts.requests);
        }
        None
    }

    /// A read engine for these files, at most `depth` reads in flight (a remote engine: the
    /// requests' concurrency), with the injected fault when one is set.
    pub fn engine(&self, depth: usize) -> Result<Box<dyn RawEngine>> {
        let opts = &self.opts;
        #[cfg(feature = "remote")]
        if let Some(objects) = &self.remote {
            // Reads are sized to the request size by the driver's schedules.
            let engine =
                super::remote::RemoteEngine::new(objects.clone(), opts.requests.concurrency, opts.cancel.clone());
            return Ok(self.with_fault(Box::new(engine?)));
        }
        let eo = EngineOptions { kind: opts.io, queue_depth: depth.max(64), threads: opts.threads };
        let engine = open_engine(&eo, opts.direct)
            .map_err(|e| Error::usage(format!("cannot start the {:?} read engine: {e}", opts.io)))?;
        Ok(self.with_fault(engine))
    }

    fn with_fault(&self, engine: Box<dyn RawEngine>) -> Box<dyn RawEngine> {
        match self.opts.fault {
            Some(f) => Box::new(FaultyEngine::new(engine, f)),
            None => engine,
        }
    }
}
