//! The one load loop: a [`Stage`] lands extents, a [`Sink`] takes them, an [`Observer`] reports
//! progress, honours cancellation and records the trace; and the one place where a stage's raw
//! failure becomes an error naming the file and the tensor.

use std::time::Instant;

use crate::cancel::CancelToken;
use crate::error::{Error, RemoteFault, Result};
use crate::plan::{Plan, Schedule};
use crate::progress::{Progress, ProgressFn};
use crate::sink::{Delivery, Sink};
use crate::stage::{Stage, StageError, StageFault};
use crate::trace::TraceRecorder;

/// Progress, cancellation and trace of one load.
pub(crate) struct Observer<'a> {
    pub progress: Option<&'a ProgressFn>,
    pub cancel: Option<&'a CancelToken>,
    pub trace: Option<&'a mut TraceRecorder>,
    /// A load made of several runs (a stream's batches): the bytes the earlier runs read and the
    /// bytes of all runs, so that progress counts the whole load, not each run.
    pub runs: Option<(u64, u64)>,
}

impl<'a> Observer<'a> {
    /// One run that is the whole load.
    pub(crate) fn new(
        progress: Option<&'a ProgressFn>,
        cancel: Option<&'a CancelToken>,
        trace: Option<&'a mut TraceRecorder>,
    ) -> Self {
        Observer { progress, cancel, trace, runs: None }
    }

    fn check_cancel(&self) -> Result<()> {
        match self.cancel {
            Some(t) if t.is_cancelled() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

/// Run every extent of `sched` through `stage` into `sink`. Returns the bytes read from the
/// files: the schedule's extents, gaps read through included, O_DIRECT alignment not.
///
/// On every path, even when a callback panics, the sink finishes (nothing still reads staged
/// memory) and then the stage stops (no read still writes into memory), in that order.
pub(crate) fn run(
    plan: &Plan,
    sched: &Schedule,
    stage: &mut dyn Stage,
    sink: &mut dyn Sink,
    obs: &mut Observer<'_>,
) -> Result<u64> {
    struct Cleanup<'s, 'k> {
        stage: &'s mut dyn Stage,
        sink: &'k mut dyn Sink,
        finished: bool,
    }
    impl Drop for Cleanup<'_, '_> {
        fn drop(&mut self) {
            if !self.finished {
                let _ = self.sink.finish();
            }
            self.stage.stop();
        }
    }
    let mut cx = Cleanup { stage, sink, finished: false };
    let total = sched.bytes_to_read();
    let mut done = 0u64;
    // A read that ended because the load was cancelled (a remote engine drops its requests) is
    // the cancellation, not a read error.
    let cancel = obs.cancel;
    let failed = |e: StageError| match cancel {
        Some(t) if t.is_cancelled() => Error::Cancelled,
        _ => name(plan, sched, e),
    };
    loop {
        obs.check_cancel()?;
        cx.stage.fill().map_err(failed)?;
        let Some(landed) = cx.stage.next().map_err(failed)? else { break };
        let first = &sched.extents[landed.extents.start];
        let file = &plan.files[first.file].path;
        let delivering = Instant::now();
        let delivery = Delivery {
            plan,
            schedule: sched,
            extents: landed.extents.clone(),
            slot: landed.slot,
            bytes: landed.staged(),
        };
        let fence = cx.sink.deliver(&delivery).map_err(|e| with_file(e, file))?;
        cx.stage.recycle(landed.slot, fence);
        let bytes: u64 = sched.extents[landed.extents.clone()].iter().map(|e| e.len).sum();
        if let (Some(tr), Some(t)) = (obs.trace.as_deref_mut(), &landed.timing) {
            tr.span("read", t.track.clone(), t.started, t.read_done, bytes);
            if let Some(converted) = t.converted {
                let converted_bytes = converted_bytes(plan, sched, landed.extents.clone());
                tr.span("convert", t.track.clone(), t.read_done, converted, converted_bytes);
            }
            tr.span("deliver", t.track.clone(), delivering, Instant::now(), bytes);
        }
        done += bytes;
        if let Some(p) = obs.progress {
            let (bytes_done, bytes_total) = match obs.runs {
                Some((before, all)) => (before + done, all),
                None => (done, total),
            };
            p(&Progress { bytes_done, bytes_total, file: file.clone() });
        }
    }
    cx.finished = true;
    cx.sink.finish()?;
    Ok(done)
}

/// Stored bytes of the converted tensors' pieces in `extents`.
fn converted_bytes(plan: &Plan, sched: &Schedule, extents: std::ops::Range<usize>) -> u64 {
    sched.extents[extents]
        .iter()
        .flat_map(|e| sched.pieces_of(e))
        .filter(|p| plan.tensors[p.tensor].converts())
        .map(|p| p.len)
        .sum()
}

/// A stage's failure as an error naming its file and, where known, its tensor.
pub(crate) fn name(plan: &Plan, sched: &Schedule, e: StageError) -> Error {
    let Some(extent) = sched.extents.get(e.extent) else {
        return match e.fault {
            StageFault::Named(err) => err,
            StageFault::Engine(source) => Error::ReadEngine { source },
            other => Error::internal(format!("a stage failed past the last extent: {other:?}")),
        };
    };
    let file = plan.files[extent.file].path.clone();
    let tensor = || sched.tensor_at(plan, e.extent, e.at).map(str::to_string);
    match e.fault {
        StageFault::Io(source) => match RemoteFault::inside(&source) {
            Some(f) => Error::Remote { file, tensor: tensor(), failure: f.failure, message: f.message.clone() },
            None => Error::Io { file, tensor: tensor(), source },
        },
        StageFault::Eof => Error::UnexpectedEof { file, tensor: tensor(), what: "tensor data", at: e.at },
        StageFault::Engine(source) => Error::ReadEngine { source },
        StageFault::Convert => {
            let t = sched.pieces_of(extent).first().map(|p| &plan.tensors[p.tensor]);
            match t {
                Some(t) => Error::UnsupportedConversion {
                    file,
                    tensor: t.name.clone(),
                    from: t.stored_dtype.name(),
                    to: t.dtype.name(),
                },
                None => Error::internal("a conversion failed in an extent with no tensor"),
            }
        }
        StageFault::Named(err) => with_file(err, &file),
    }
}

/// A driver error without a file gets the file being loaded.
fn with_file(e: Error, file: &std::path::Path) -> Error {
    match e {
        Error::Cuda { call, code, message, file: None } => {
            Error::Cuda { call, code, message, file: Some(file.to_path_buf()) }
        }
        other => other,
    }
}
