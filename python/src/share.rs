//! `RawShare`: one rank's share of a group load (`weightstream::GroupLoad`), which
//! `weightstream.distributed` drives window by window: it reads this rank's parts here and
//! moves the bytes between the ranks with `torch.distributed`.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use weightstream::{CancelToken, GroupLoad, PartPlace, SharedFile};

use crate::errors::usage;
use crate::interrupt;
use crate::loader::{destination_of, finish, import_place, Opts, RawLoader};

/// A file's header as the group's first rank read it: `(path, header bytes, file length,
/// etag, last modified)`.
type SharedTuple = (String, Py<PyBytes>, u64, Option<String>, String);

/// A [`SharedTuple`] as Python passes it in.
type SharedIn<'py> = (String, Bound<'py, PyBytes>, u64, Option<String>, String);

/// One rank's share of a group load.
#[pyclass(module = "weightstream._weightstream", name = "RawShare", frozen)]
pub struct RawShare {
    share: GroupLoad,
    token: CancelToken,
    /// The headers read here, until handed to the group.
    headers: Mutex<Option<Vec<SharedFile>>>,
}

/// Plan group rank `rank`'s share of the load of `path` by `len(shards)` ranks (`shards[r]`:
/// rank r's `(rank, world)` or `None`). Without `shared`, this rank reads the headers (and
/// keeps them for `take_headers`); with it, the headers are the first rank's.
#[allow(clippy::too_many_arguments)] // Python keyword arguments
#[pyfunction]
#[pyo3(signature = (loader, path, shared, opts, shards, rank, window))]
pub fn group_share(
    py: Python<'_>,
    loader: &RawLoader,
    path: PathBuf,
    shared: Option<Vec<SharedIn<'_>>>,
    opts: Opts,
    shards: Vec<Option<(usize, usize)>>,
    rank: usize,
    window: u64,
) -> PyResult<RawShare> {
    if window == 0 {
        return Err(usage(py, "window must be at least 1 byte"));
    }
    let token = CancelToken::new();
    let loader = loader.configured(py, &opts, &token)?;
    let shared: Option<Vec<SharedFile>> = shared.map(|files| {
        files
            .into_iter()
            .map(|(path, header, file_len, etag, last_modified)| SharedFile {
                path: path.into(),
                header: header.as_bytes().to_vec(),
                file_len,
                etag,
                last_modified,
            })
            .collect()
    });
    let work = move || -> weightstream::Result<_> {
        let (ckpt, kept) = match shared {
            Some(files) => (loader.open_shared(files)?, None),
            None => {
                let (ckpt, kept) = loader.open_sharing(&path)?;
                (ckpt, Some(kept))
            }
        };
        Ok((loader.plan_group(ckpt, &shards, rank, window)?, kept))
    };
    let (share, kept) = finish(py, interrupt::run(py, &token, work)?)?;
    Ok(RawShare { share, token, headers: Mutex::new(kept) })
}

#[pymethods]
impl RawShare {
    /// The headers this rank read (once; `None` after, or when it read none).
    fn take_headers(&self, py: Python<'_>) -> Option<Vec<SharedTuple>> {
        let taken = self.headers.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(
            taken
                .into_iter()
                .map(|f| {
                    let path = f.path.to_string_lossy().into_owned();
                    (path, PyBytes::new(py, &f.header).unbind(), f.file_len, f.etag, f.last_modified)
                })
                .collect(),
        )
    }

    /// Per key: `(name, dtype, shape, loaded bytes, needers, reader)`; `reader` is `None` for
    /// a key every rank needs (read in chunks).
    #[allow(clippy::type_complexity)]
    fn keys(&self) -> Vec<(String, &'static str, Vec<u64>, u64, Vec<usize>, Option<usize>)> {
        let plan = self.share.plan();
        (0..plan.keys.len())
            .map(|k| {
                let info = self.share.key_info(k);
                let key = &plan.keys[k];
                (info.name, info.dtype.name(), info.shape, info.byte_len, key.needers.clone(), key.reader)
            })
            .collect()
    }

    /// Per window: `(first key, end key, buffer bytes, per key its buffer offset or None,
    /// chunks as (reader, buffer start, buffer end))`.
    #[allow(clippy::type_complexity)]
    fn windows(&self) -> Vec<(usize, usize, u64, Vec<Option<u64>>, Vec<(usize, u64, u64)>)> {
        self.share
            .plan()
            .windows
            .iter()
            .map(|w| {
                let chunks = w.chunks.iter().map(|c| (c.reader, c.buffer.start, c.buffer.end)).collect();
                (w.keys.start, w.keys.end, w.buffer_len, w.offsets.clone(), chunks)
            })
            .collect()
    }

    /// Stored bytes each rank reads in all.
    #[getter]
    fn reads_per_rank(&self) -> Vec<u64> {
        self.share.plan().reads_per_rank.clone()
    }

    /// This rank's reads in window `w`: `(key, in the buffer?, offset, loaded bytes)`, the
    /// offset in the window's buffer or in the key's own tensor.
    fn reads(&self, w: usize) -> PyResult<Vec<(usize, bool, u64, u64)>> {
        self.check_window(w)?;
        Ok(self
            .share
            .reads(w)
            .into_iter()
            .map(|r| match r.place {
                PartPlace::Buffer(at) => (r.key, true, at, r.len),
                PartPlace::Key(at) => (r.key, false, at, r.len),
            })
            .collect())
    }

    /// Read this rank's parts of window `w` into `places` (objects with `__dlpack__`, one per
    /// `reads(w)` entry, each exactly its bytes); returns the stored bytes read.
    fn read(&self, py: Python<'_>, w: usize, places: Vec<Bound<'_, PyAny>>) -> PyResult<u64> {
        self.check_window(w)?;
        let device = self.share.device();
        let mut imported = Vec::with_capacity(places.len());
        for (i, obj) in places.iter().enumerate() {
            imported.push(import_place(obj, device, &|m| usage(py, format!("window {w}, part {i}: {m}")))?);
        }
        let mut ranges: Vec<(u64, u64)> =
            imported.iter().filter(|(_, len)| *len > 0).map(|(im, len)| (im.data, im.data + *len as u64)).collect();
        ranges.sort_unstable();
        if ranges.windows(2).any(|p| p[1].0 < p[0].1) {
            return Err(usage(py, format!("window {w}: two places overlap")));
        }
        // SAFETY: each was imported for this device, contiguous and writable, and stays alive
        // until `imported` drops (after the read); no two overlap (checked above).
        let dests = imported.iter().map(|(im, len)| unsafe { destination_of(im, *len, device) }).collect();
        let share = &self.share;
        let out = finish(py, interrupt::run(py, &self.token, move || share.read(w, dests))?);
        drop(imported);
        out
    }
}

impl RawShare {
    fn check_window(&self, w: usize) -> PyResult<()> {
        let n = self.share.plan().windows.len();
        if w >= n {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("window {w} of {n}")));
        }
        Ok(())
    }
}
