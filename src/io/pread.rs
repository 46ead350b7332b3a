//! The pread engine: a pool of threads, each doing one `pread` per request.
//!
//! On a warm page cache a read is a memcpy from the cache, so parallel threads are what reaches
//! memory bandwidth; this engine is also the fallback where io_uring is unavailable.

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{RawCompletion, RawEngine, RawRead};

/// A pool of reader threads.
pub struct PreadEngine {
    jobs: Option<Sender<RawRead>>,
    done: Receiver<RawCompletion>,
    threads: Vec<JoinHandle<()>>,
}

impl PreadEngine {
    /// A pool of `threads` readers (at least one).
    ///
    /// ```
    /// let engine = weightstream::io::PreadEngine::new(2);
    /// # drop(engine);
    /// ```
    pub fn new(threads: usize) -> Self {
        let (jobs, job_rx) = channel::<RawRead>();
        let (done_tx, done) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        // Where the OS runs out of threads, the pool is what could be started; with none at all,
        // submit reports that the workers have stopped.
        let threads = (0..threads.max(1))
            .map_while(|i| {
                let rx = Arc::clone(&job_rx);
                let tx = done_tx.clone();
                std::thread::Builder::new().name(format!("ws-pread-{i}")).spawn(move || reader(rx, tx)).ok()
            })
            .collect();
        PreadEngine { jobs: Some(jobs), done, threads }
    }
}

fn reader(rx: Arc<Mutex<Receiver<RawRead>>>, tx: Sender<RawCompletion>) {
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(r) = job else { return };
        // SAFETY: the submitter guarantees (RawEngine::submit contract) that r.buf is valid for
        // r.len bytes of writes and r.fd open until this completion is received.
        let n = unsafe { libc::pread(r.fd, r.buf.cast(), r.len, r.offset as libc::off_t) };
        let result = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
        if tx.send(RawCompletion { tag: r.tag, result }).is_err() {
            return;
        }
    }
}

impl RawEngine for PreadEngine {
    fn name(&self) -> &'static str {
        "pread"
    }

    unsafe fn submit(&mut self, read: RawRead) -> io::Result<()> {
        match &self.jobs {
            Some(tx) => tx.send(read).map_err(|_| io::Error::other("pread workers have stopped")),
            None => Err(io::Error::other("pread engine shut down")),
        }
    }

    fn wait(&mut self) -> io::Result<RawCompletion> {
        self.done.recv().map_err(|_| io::Error::other("pread workers have stopped"))
    }
}

impl Drop for PreadEngine {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once the queue is empty; joining them
        // guarantees no read still writes into a buffer after the engine is gone.
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
