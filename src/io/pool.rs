//! A pool of named threads taking jobs from one queue and answering on another: the pread engine
//! and the cpu target's read-and-convert workers both run on it.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Threads that each turn jobs `J` into answers `A`, in any order. Dropping the pool lets every
/// queued job finish, then joins the threads: no job still runs once it is gone.
pub(crate) struct WorkerPool<J, A> {
    jobs: Option<Sender<J>>,
    answers: Receiver<A>,
    threads: Vec<JoinHandle<()>>,
}

impl<J: Send + 'static, A: Send + 'static> WorkerPool<J, A> {
    /// Start `count` threads (at least one; fewer where the OS refuses more) named
    /// `{name}-{index}`, thread `index` running the job handler `make(index)` returns.
    pub fn new<F>(name: &str, count: usize, make: impl Fn(usize) -> F) -> Self
    where
        F: FnMut(J) -> A + Send + 'static,
    {
        let (jobs, job_rx) = channel::<J>();
        let (answer_tx, answers) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let threads = (0..count.max(1))
            .map_while(|i| {
                let (rx, tx, mut handle) = (Arc::clone(&job_rx), answer_tx.clone(), make(i));
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        if tx.send(handle(job)).is_err() {
                            return;
                        }
                    })
                    .ok()
            })
            .collect();
        WorkerPool { jobs: Some(jobs), answers, threads }
    }

    /// Threads running.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Queue a job; `false` when no thread is there to take it.
    pub fn send(&self, job: J) -> bool {
        match &self.jobs {
            Some(tx) if !self.threads.is_empty() => tx.send(job).is_ok(),
            _ => false,
        }
    }

    /// The next answer, blocking; `None` once every thread is gone.
    pub fn recv(&self) -> Option<A> {
        self.answers.recv().ok()
    }
}

impl<J, A> Drop for WorkerPool<J, A> {
    fn drop(&mut self) {
        // Closing the job queue ends each thread once the queue is empty; joining them means no
        // job still touches a buffer after the pool is gone.
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
    fn every_job_is_answered_once_with_per_thread_state() {
        let pool = WorkerPool::new("test", 3, |i| {
            let mut seen = 0;
            move |x: u64| {
                seen += 1;
                (x * 2, i, seen)
            }
        });
        assert_eq!(pool.threads(), 3);
        for x in 0..100 {
            assert!(pool.send(x));
        }
        let mut got: Vec<u64> = (0..100).map(|_| pool.recv().unwrap().0).collect();
        got.sort();
        assert_eq!(got, (0..100).map(|x| x * 2).collect::<Vec<_>>());
    }
}
