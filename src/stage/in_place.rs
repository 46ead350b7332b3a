//! The in-place stage: reads land straight in the sink's host memory, one tensor's piece per
//! read, so nothing is copied twice. Pieces to convert are read by worker threads into a small
//! buffer of their own and converted into place on the same core, while the bytes are still in
//! its caches (`crate::convert::workers`).

use std::os::fd::RawFd;
use std::time::Instant;

use super::{Landed, LandedBytes, Stage, StageError, StageFault, Timing};
use crate::convert::workers::{JobError, ReadConvertJob, ReadConvertWorkers};
use crate::error::Error;
use crate::io::{ReadQueue, ReadRequest};
use crate::memory::{Fence, HostRegion};
use crate::plan::{Plan, Schedule};

/// What performs the reads.
pub(crate) enum InPlaceReader {
    /// A read engine (pread pool or io_uring): no piece converts.
    Engine(ReadQueue),
    /// Read-and-convert workers (pread on each worker), with their buffer size.
    Workers(ReadConvertWorkers, usize),
}

/// Reads a per-tensor schedule into a [`HostRegion`].
pub(crate) struct InPlaceStage<'a> {
    plan: &'a Plan,
    sched: &'a Schedule,
    fds: Vec<RawFd>,
    region: HostRegion,
    reader: InPlaceReader,
    trace: bool,
    started: Vec<Option<Instant>>,
    next: usize,
    in_flight: usize,
}

impl<'a> InPlaceStage<'a> {
    /// A stage writing into `region`, which must stay valid until `stop` returned (the sink's
    /// contract); `sched` must carry one piece per extent.
    pub(crate) fn new(
        plan: &'a Plan,
        sched: &'a Schedule,
        fds: Vec<RawFd>,
        region: HostRegion,
        reader: InPlaceReader,
        trace: bool,
    ) -> Self {
        let started = vec![None; if trace { sched.extents.len() } else { 0 }];
        InPlaceStage { plan, sched, fds, region, reader, trace, started, next: 0, in_flight: 0 }
    }

    fn room(&self) -> bool {
        match &self.reader {
            InPlaceReader::Engine(q) => q.has_room(),
            // Enough queued to keep every worker busy, few enough that a cancel stops soon.
            InPlaceReader::Workers(w, _) => self.in_flight < 2 * w.threads().max(1),
        }
    }

    fn landed(&mut self, extent: usize, worker: Option<(usize, Instant, Instant, Instant)>) -> Landed {
        self.in_flight -= 1;
        let timing = match worker {
            _ if !self.trace => None,
            Some((w, started, read_done, finished)) => {
                let converts = self
                    .sched
                    .pieces_of(&self.sched.extents[extent])
                    .iter()
                    .any(|p| self.plan.tensors[p.tensor].converts());
                Some(Timing {
                    track: format!("worker {w}"),
                    started,
                    read_done,
                    converted: converts.then_some(finished),
                })
            }
            None => self.started.get(extent).copied().flatten().map(|started| Timing {
                track: format!("read {}", extent % 16),
                started,
                read_done: Instant::now(),
                converted: None,
            }),
        };
        Landed { extents: extent..extent + 1, slot: 0, bytes: LandedBytes::InPlace, timing }
    }
}

impl Stage for InPlaceStage<'_> {
    fn fill(&mut self) -> Result<(), StageError> {
        while self.next < self.sched.extents.len() && self.room() {
            let k = self.next;
            let e = &self.sched.extents[k];
            let internal = |what: String| StageError::named(k, e.offset, Error::internal(what));
            let [p] = self.sched.pieces_of(e) else {
                return Err(internal(format!("in-place extent {k} carries {} pieces", e.pieces.len())));
            };
            let t = &self.plan.tensors[p.tensor];
            let dst = t.dst_range(p.tensor_offset, p.len);
            let Some(dst_ptr) = self.region.destination(p.tensor, t.dst_offset, &dst) else {
                return Err(internal(format!("tensor `{}` planned outside the destination", t.name)));
            };
            let fd = self.fds[e.file];
            match &mut self.reader {
                InPlaceReader::Engine(queue) => {
                    if t.converts() {
                        return Err(internal(format!("tensor `{}` converts but the reads cannot", t.name)));
                    }
                    let req = ReadRequest { fd, offset: e.offset, buf: dst_ptr, len: e.len as usize, tag: k as u64 };
                    // SAFETY: this range of the region is this read's alone (pieces of a
                    // per-tensor schedule never overlap, destinations never overlap); the
                    // region stays valid and the fd open until `stop` drained the queue.
                    unsafe { queue.submit(req) }.map_err(|err| StageError {
                        extent: k,
                        at: e.offset,
                        fault: StageFault::Io(err),
                    })?;
                }
                InPlaceReader::Workers(workers, _) => {
                    let job = ReadConvertJob {
                        fd,
                        offset: e.offset,
                        len: e.len as usize,
                        from: t.stored_dtype,
                        to: t.dtype,
                        dst: dst_ptr,
                        dst_len: (dst.end - dst.start) as usize,
                        tag: k as u64,
                    };
                    // SAFETY: as for the engine: the destination range is this job's alone and
                    // outlives it (`stop` waits for every job), the fd stays open.
                    unsafe { workers.submit(job) }.map_err(|_| StageError {
                        extent: k,
                        at: e.offset,
                        fault: StageFault::Engine(std::io::Error::other("no read-and-convert worker could be started")),
                    })?;
                }
            }
            if let Some(s) = self.started.get_mut(k) {
                *s = Some(Instant::now());
            }
            self.next += 1;
            self.in_flight += 1;
        }
        Ok(())
    }

    fn next(&mut self) -> Result<Option<Landed>, StageError> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        match &mut self.reader {
            InPlaceReader::Engine(queue) => {
                let c = queue.wait().map_err(|err| StageError {
                    extent: self.next,
                    at: 0,
                    fault: StageFault::Engine(err),
                })?;
                let k = c.tag as usize;
                let n = c.result.map_err(|err| StageError { extent: k, at: c.offset, fault: StageFault::Io(err) })?;
                if n < c.len {
                    return Err(StageError { extent: k, at: c.offset + n as u64, fault: StageFault::Eof });
                }
                Ok(Some(self.landed(k, None)))
            }
            InPlaceReader::Workers(workers, _) => {
                let Some(d) = workers.wait() else {
                    let what = "the read-and-convert workers stopped";
                    return Err(StageError::named(self.next, 0, Error::internal(what)));
                };
                let k = d.tag as usize;
                let at = self.sched.extents[k].offset;
                match d.result {
                    Ok(()) => {}
                    Err(JobError::Read(err)) => return Err(StageError { extent: k, at, fault: StageFault::Io(err) }),
                    Err(JobError::Eof { at }) => return Err(StageError { extent: k, at, fault: StageFault::Eof }),
                    Err(JobError::Convert) => return Err(StageError { extent: k, at, fault: StageFault::Convert }),
                }
                Ok(Some(self.landed(k, Some((d.worker, d.started, d.read_done, d.finished)))))
            }
        }
    }

    fn recycle(&mut self, _slot: usize, fence: Fence) {
        // In-place deliveries hold no stage memory; the sink's fence is for its own region.
        let _ = fence.wait();
    }

    fn stop(&mut self) {
        match &mut self.reader {
            InPlaceReader::Engine(queue) => queue.drain(),
            InPlaceReader::Workers(workers, _) => while workers.wait().is_some() {},
        }
        self.in_flight = 0;
    }

    fn staging_bytes(&self) -> u64 {
        match &self.reader {
            InPlaceReader::Engine(_) => 0,
            InPlaceReader::Workers(w, read_size) => (w.threads() * read_size) as u64,
        }
    }
}

impl Drop for InPlaceStage<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}
