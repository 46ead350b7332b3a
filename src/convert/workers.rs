//! Threads that read a piece of a file and convert it into its final place in host memory.
//!
//! The cpu target's converted loads go through here. Each worker reads a piece (one read size)
//! into its own small buffer and converts it into the arena right away, on the same core, while
//! the bytes are still in that core's caches: the conversion then costs its arithmetic, not
//! another pass over memory. Handing pieces from reader threads to separate converter threads
//! measured 10-20% slower on two cores, and converting out of the staging ring twice the time of
//! a plain load (BENCHMARKS.md). A piece that keeps its dtype is read straight into place.

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use crate::format::Dtype;
use crate::io::pool::WorkerPool;
use crate::io::Fault;

/// One piece: `len` bytes of `fd` at `offset`, as `from`, to land as `to` in `dst_len` bytes at
/// `dst`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadConvertJob {
    pub fd: RawFd,
    pub offset: u64,
    pub len: usize,
    pub from: Dtype,
    pub to: Dtype,
    pub dst: *mut u8,
    pub dst_len: usize,
    /// The caller's tag, returned with the outcome.
    pub tag: u64,
}

// SAFETY: a job is a description of a read and a destination; the pointer is only dereferenced
// by a worker under the contract of `ReadConvertWorkers::submit`, which the submitter upholds.
unsafe impl Send for ReadConvertJob {}

/// Why a job failed.
#[derive(Debug)]
pub(crate) enum JobError {
    /// The read failed.
    Read(io::Error),
    /// The file ended at this offset before the piece did.
    Eof { at: u64 },
    /// The lengths do not fit the dtypes (a planning bug), or the conversion panicked.
    Convert,
}

/// The outcome of one job.
#[derive(Debug)]
pub(crate) struct JobDone {
    pub tag: u64,
    /// Which worker ran it (a trace track).
    pub worker: usize,
    pub started: Instant,
    pub read_done: Instant,
    pub finished: Instant,
    pub result: Result<(), JobError>,
}

/// Worker threads running [`ReadConvertJob`]s, in any order.
pub(crate) struct ReadConvertWorkers {
    pool: WorkerPool<ReadConvertJob, JobDone>,
    pending: usize,
}

impl ReadConvertWorkers {
    /// Start `threads` workers (at least one; fewer where the OS refuses more), each with a
    /// buffer of `read_size` bytes, injecting `fault` into their reads (tests).
    pub fn new(threads: usize, read_size: usize, fault: Option<Fault>) -> Self {
        let pool = WorkerPool::new("ws-convert", threads, |index| {
            // Allocated on the first conversion: a worker that only reads in place needs none.
            let mut buf: Vec<u8> = Vec::new();
            move |job| run_job(index, job, &mut buf, read_size, fault)
        });
        ReadConvertWorkers { pool, pending: 0 }
    }

    /// Workers running.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Queue a job. `job.len` must be at most the workers' read size when `from != to`.
    ///
    /// # Safety
    /// `job.dst` must be valid for writes of `job.dst_len` bytes and not otherwise accessed, and
    /// `job.fd` must stay open, until this job's outcome was returned by
    /// [`ReadConvertWorkers::wait`] or the pool was dropped (dropping waits for every queued job).
    pub unsafe fn submit(&mut self, job: ReadConvertJob) -> Result<(), JobError> {
        if !self.pool.send(job) {
            return Err(JobError::Convert);
        }
        self.pending += 1;
        Ok(())
    }

    /// Block until a job finishes. `None` when nothing is pending, or when every worker is gone.
    pub fn wait(&mut self) -> Option<JobDone> {
        if self.pending == 0 {
            return None;
        }
        let d = self.pool.recv();
        self.pending = if d.is_some() { self.pending - 1 } else { 0 };
        d
    }
}

/// One job on worker `index`, with its buffer `buf`.
fn run_job(index: usize, j: ReadConvertJob, buf: &mut Vec<u8>, read_size: usize, fault: Option<Fault>) -> JobDone {
    let started = Instant::now();
    let converts = j.from != j.to;
    let result = if !converts {
        // SAFETY: the submitter guarantees (submit) that dst is writable for dst_len bytes,
        // exclusively, until the outcome is received or the pool dropped, which joins this
        // thread first; dst_len == len for a piece that keeps its dtype.
        unsafe { read_full(j.fd, j.offset, j.dst, j.len.min(j.dst_len), fault) }
    } else if j.len > read_size {
        Err(JobError::Convert)
    } else {
        if buf.len() < read_size {
            *buf = vec![0u8; read_size];
        }
        // SAFETY: buf holds read_size >= len bytes, owned by this thread.
        unsafe { read_full(j.fd, j.offset, buf.as_mut_ptr(), j.len, fault) }
    };
    let read_done = Instant::now();
    let result = match result {
        Ok(()) if converts => {
            // SAFETY: as above for dst; the conversion checks both lengths.
            let dst = unsafe { std::slice::from_raw_parts_mut(j.dst, j.dst_len) };
            let src = &buf[..j.len];
            // A panic must still answer the job, or the loader would wait for it forever.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                super::cpu::convert_serial(j.from, j.to, src, dst)
            }))
            .map_err(|_| JobError::Convert)
            .and_then(|r| r.map_err(|_| JobError::Convert))
        }
        other => other,
    };
    JobDone { tag: j.tag, worker: index, started, read_done, finished: Instant::now(), result }
}

/// Reads exactly `len` bytes at `offset` into `buf`, resuming short reads and EINTR.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes, not otherwise accessed during the call.
unsafe fn read_full(fd: RawFd, offset: u64, buf: *mut u8, len: usize, fault: Option<Fault>) -> Result<(), JobError> {
    let mut got = 0usize;
    while got < len {
        let at = offset + got as u64;
        let want = match fault {
            Some(f) => f.attempt(at, len - got).map_err(JobError::Read)?,
            None => len - got,
        };
        // SAFETY: got + want <= len, so the write stays inside `buf` (the caller's contract).
        let n = unsafe { libc::pread(fd, buf.add(got).cast(), want, at as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(JobError::Read(e));
        }
        if n == 0 {
            return Err(JobError::Eof { at });
        }
        got += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// Submits `(offset, len, from, to, dst offset, dst len)` jobs over `dst` and returns the
    /// outcomes by tag (the job's index).
    fn run(pool: &mut ReadConvertWorkers, f: &tempfile::NamedTempFile, dst: &mut [u8], jobs: &[Job]) -> Vec<JobDone> {
        let base = dst.as_mut_ptr();
        for (tag, &(offset, len, from, to, at, dst_len)) in jobs.iter().enumerate() {
            assert!(at + dst_len <= dst.len());
            let job = ReadConvertJob {
                fd: f.as_file().as_raw_fd(),
                offset,
                len,
                from,
                to,
                // SAFETY: at + dst_len <= dst.len() (asserted); the tests give disjoint ranges.
                dst: unsafe { base.add(at) },
                dst_len,
                tag: tag as u64,
            };
            // SAFETY: `dst` and the file outlive the jobs, all waited for below.
            unsafe { pool.submit(job) }.unwrap();
        }
        let mut out: Vec<JobDone> = std::iter::from_fn(|| pool.wait()).collect();
        out.sort_by_key(|d| d.tag);
        assert_eq!(out.len(), jobs.len());
        out
    }

    type Job = (u64, usize, Dtype, Dtype, usize, usize);

    #[test]
    fn reads_and_converts_every_job() {
        let src: Vec<u8> = (0..16_000u32).flat_map(|i| (i as f32 * 0.25 - 7.0).to_le_bytes()).collect();
        let f = file_with(&src);
        let mut dst = vec![0u8; 8_000 + 64_000];
        // Four converted pieces of 1000 f32 (4000 bytes in, 2000 out), then a plain copy, all
        // through reads cut short at 1000 bytes.
        let mut jobs: Vec<Job> =
            (0..4).map(|k| (k * 4000, 4000, Dtype::F32, Dtype::BF16, k as usize * 2000, 2000)).collect();
        jobs.push((0, 64_000, Dtype::F32, Dtype::F32, 8_000, 64_000));
        let mut pool = ReadConvertWorkers::new(3, 4096, Some(Fault::ShortReads(1000)));
        for d in run(&mut pool, &f, &mut dst, &jobs) {
            d.result.unwrap();
        }
        let mut want = vec![0u8; 8_000];
        crate::convert::convert_host(Dtype::F32, Dtype::BF16, &src[..16_000], &mut want).unwrap();
        assert_eq!(&dst[..8_000], &want[..]);
        assert_eq!(&dst[8_000..], &src[..64_000]);
    }

    #[test]
    fn errors_come_back_as_outcomes() {
        let f = file_with(&[7u8; 10_000]);
        let mut dst = vec![0u8; 4 * 4096];
        let jobs: Vec<Job> = vec![
            (4096, 4096, Dtype::F16, Dtype::BF16, 0, 4096), // covers the EIO at 5000
            (8192, 4096, Dtype::F16, Dtype::BF16, 4096, 4096), // runs past the end (10,000)
            (0, 4096, Dtype::F16, Dtype::BF16, 8192, 4096), // fine
            (0, 8192, Dtype::F16, Dtype::BF16, 12288, 4096), // longer than the read size
        ];
        let mut pool = ReadConvertWorkers::new(2, 4096, Some(Fault::EioAt(5000)));
        let out = run(&mut pool, &f, &mut dst, &jobs);
        assert!(matches!(&out[0].result, Err(JobError::Read(e)) if e.raw_os_error() == Some(libc::EIO)));
        assert!(matches!(out[1].result, Err(JobError::Eof { at: 10_000 })), "{:?}", out[1].result);
        assert!(out[2].result.is_ok());
        assert!(matches!(out[3].result, Err(JobError::Convert)));
    }
}
