//! A pool of threads that convert read buffers into their final place in host memory.
//!
//! The cpu target reads a converted tensor in read-sized pieces into small bounce buffers and
//! hands each piece here while the next reads run. The piece is still in the CPU caches when a
//! worker converts it, so the conversion costs its arithmetic, not a second pass over memory (the
//! staged path converted out of a ring too large for the caches and took twice the time of a
//! plain load; BENCHMARKS.md).

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::{Dtype, Result};

/// One piece to convert: `src_len` bytes of `from` at `src` into `dst_len` bytes of `to` at `dst`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvertJob {
    pub from: Dtype,
    pub to: Dtype,
    pub src: *const u8,
    pub src_len: usize,
    pub dst: *mut u8,
    pub dst_len: usize,
    /// The caller's tag, returned with the outcome.
    pub tag: u64,
}

// SAFETY: a job is a description of buffers; they are only dereferenced by a worker under the
// contract of `ConvertWorkers::submit`, which the submitter upholds.
unsafe impl Send for ConvertJob {}

/// The outcome of one job.
#[derive(Debug)]
pub(crate) struct ConvertDone {
    pub tag: u64,
    pub started: Instant,
    pub finished: Instant,
    /// `Err` only when the job's lengths do not match its dtypes.
    pub result: Result<()>,
}

/// Worker threads converting [`ConvertJob`]s in any order.
pub(crate) struct ConvertWorkers {
    jobs: Option<Sender<ConvertJob>>,
    done: Receiver<ConvertDone>,
    threads: Vec<JoinHandle<()>>,
    pending: usize,
}

impl ConvertWorkers {
    /// Start `threads` workers (at least one; fewer where the OS refuses more).
    pub fn new(threads: usize) -> Self {
        let (jobs, job_rx) = channel::<ConvertJob>();
        let (done_tx, done) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let threads = (0..threads.max(1))
            .map_while(|i| {
                let rx = Arc::clone(&job_rx);
                let tx = done_tx.clone();
                std::thread::Builder::new().name(format!("ws-convert-{i}")).spawn(move || worker(rx, tx)).ok()
            })
            .collect();
        ConvertWorkers { jobs: Some(jobs), done, threads, pending: 0 }
    }

    /// Queue a job.
    ///
    /// # Safety
    /// `job.src` must be valid for reads of `job.src_len` bytes and not written, and `job.dst`
    /// valid for writes of `job.dst_len` bytes and not otherwise accessed, until this job's
    /// outcome was returned or the pool was dropped (dropping waits for every queued job).
    pub unsafe fn submit(&mut self, job: ConvertJob) -> Result<()> {
        let sent = match &self.jobs {
            Some(tx) if !self.threads.is_empty() => tx.send(job).is_ok(),
            _ => false,
        };
        if !sent {
            return Err(crate::convert::conversion_error(job.from, job.to, "conversion workers have stopped".into()));
        }
        self.pending += 1;
        Ok(())
    }

    /// Block until a job finishes. `None` when nothing is pending, or when every worker is gone.
    pub fn wait(&mut self) -> Option<ConvertDone> {
        if self.pending == 0 {
            return None;
        }
        match self.done.recv() {
            Ok(d) => {
                self.pending -= 1;
                Some(d)
            }
            Err(_) => {
                // Every worker is gone (none could start): nothing more will come back.
                self.pending = 0;
                None
            }
        }
    }

    /// A finished job, if one is ready now.
    pub fn try_wait(&mut self) -> Option<ConvertDone> {
        if self.pending == 0 {
            return None;
        }
        match self.done.try_recv() {
            Ok(d) => {
                self.pending -= 1;
                Some(d)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}

fn worker(rx: Arc<Mutex<Receiver<ConvertJob>>>, tx: Sender<ConvertDone>) {
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(j) = job else { return };
        let started = Instant::now();
        // SAFETY: the submitter guarantees (ConvertWorkers::submit) that src is readable for
        // src_len bytes and dst writable for dst_len bytes, exclusively, until the outcome is
        // received or the pool dropped, which joins this thread first.
        let (src, dst) =
            unsafe { (std::slice::from_raw_parts(j.src, j.src_len), std::slice::from_raw_parts_mut(j.dst, j.dst_len)) };
        // A panic must still answer the job, or the loader would wait for it forever.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| super::convert_host(j.from, j.to, src, dst)))
                .unwrap_or_else(|_| {
                    Err(crate::convert::conversion_error(j.from, j.to, "a conversion worker panicked".into()))
                });
        if tx.send(ConvertDone { tag: j.tag, started, finished: Instant::now(), result }).is_err() {
            return;
        }
    }
}

impl Drop for ConvertWorkers {
    fn drop(&mut self) {
        // Closing the job channel ends each worker once the queue is empty; joining them means
        // no job still touches a buffer after the pool is gone.
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_every_job_and_returns_its_tag() {
        let src: Vec<Vec<u8>> =
            (0..16u32).map(|k| (0..1000).flat_map(|i| ((k * 1000 + i) as f32).to_le_bytes()).collect()).collect();
        let mut dst: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 2000]).collect();
        let mut pool = ConvertWorkers::new(3);
        for (k, (s, d)) in src.iter().zip(dst.iter_mut()).enumerate() {
            let job = ConvertJob {
                from: Dtype::F32,
                to: Dtype::BF16,
                src: s.as_ptr(),
                src_len: s.len(),
                dst: d.as_mut_ptr(),
                dst_len: d.len(),
                tag: k as u64,
            };
            // SAFETY: both vectors outlive the pool's use of them (all jobs waited for below)
            // and are not touched until then.
            unsafe { pool.submit(job) }.unwrap();
        }
        let mut tags = Vec::new();
        while let Some(d) = pool.wait() {
            d.result.unwrap();
            tags.push(d.tag);
        }
        tags.sort();
        assert_eq!(tags, (0..16).collect::<Vec<_>>());
        assert!(pool.try_wait().is_none());
        for (s, d) in src.iter().zip(&dst) {
            let mut want = vec![0u8; 2000];
            crate::convert::convert_host(Dtype::F32, Dtype::BF16, s, &mut want).unwrap();
            assert_eq!(d, &want);
        }
    }

    #[test]
    fn a_bad_job_reports_an_error() {
        let src = [0u8; 8];
        let mut dst = [0u8; 3];
        let mut pool = ConvertWorkers::new(1);
        let job = ConvertJob {
            from: Dtype::F32,
            to: Dtype::F16,
            src: src.as_ptr(),
            src_len: 8,
            dst: dst.as_mut_ptr(),
            dst_len: 3,
            tag: 9,
        };
        // SAFETY: both arrays outlive the job, waited for below.
        unsafe { pool.submit(job) }.unwrap();
        let d = pool.wait().unwrap();
        assert_eq!(d.tag, 9);
        assert!(d.result.is_err());
    }
}
