//! The zero-copy stage (experimental): DMA straight out of the page cache, with no copy
//! by the CPU.
//!
//! The staged pipeline copies every byte from the page cache into a pinned buffer first; on an
//! H100 host that memcpy tops out near 40 GB/s, below the 50 GB/s the PCIe link can take
//! (BENCHMARKS.md). Here each window of a file is mapped read-only, page-locked in place with
//! `cuMemHostRegister(CU_MEMHOSTREGISTER_READ_ONLY)`, copied to the arena by the device's copy
//! engines, then unregistered and unmapped. Registration pins the page-cache pages (and reads
//! them from disk if they are not cached), so its cost replaces the memcpy's; whether it is
//! cheaper is what `bench --strategy pipeline-zero-copy` measures. Host memory in use is the
//! windows in flight. The CPU never touches the mapping, so a file truncated under us gives a
//! driver error (or [`Error::UnexpectedEof`], checked before each window), never SIGBUS.
//! An injected EIO applies to the window that covers its offset; injected short reads have no
//! meaning here (nothing is read by a system call), so the loader refuses them.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Landed, LandedBytes, Stage, StageError, StageFault, Timing};
use crate::cuda::driver as r;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::io::Fault;
use crate::memory::Fence;
use crate::plan::schedule::Window;
use crate::plan::{Plan, Schedule};

/// What a registrar thread needs.
struct Registrar<'a> {
    dev: &'a Arc<CudaDevice>,
    plan: &'a Plan,
    sched: &'a Schedule,
    fds: &'a [RawFd],
    fault: Option<Fault>,
    page: u64,
}

/// Windows of the page cache registered ahead by threads, handed to the sink in file order.
///
/// Registrar threads are scoped: the stage is built inside `std::thread::scope` and stopped
/// (its channels closed) before the scope ends, so they borrow the plan and descriptors.
pub(crate) struct ZeroCopyStage<'a> {
    wins: Arc<Vec<Window>>,
    next_window: Arc<AtomicUsize>,
    permits: Option<SyncSender<()>>,
    done: Option<Receiver<Registered>>,
    ready: BTreeMap<usize, Registered>,
    /// A window enters before its delivery and leaves only after its fence fired, so on an error
    /// every mapping a copy may read is in here until `stop` waited on the fences.
    in_flight: VecDeque<InFlight>,
    delivered: usize,
    /// Windows registered at once, at most (the ring's buffer count): the page cache pinned in
    /// place, and mapped into this process, is at most this many windows.
    pinned: usize,
    /// Of those, windows whose copies may be queued at once (half); the others are registered
    /// ahead.
    max_in_flight: usize,
    window_bytes: u64,
    trace: bool,
    /// The registrars borrow the plan and the descriptors for `'a`.
    _borrows: std::marker::PhantomData<&'a ()>,
}

impl<'a> ZeroCopyStage<'a> {
    /// Start `registrars` threads (1 to `pinned`) in `scope` that map and register the windows of
    /// `sched` for `dev`: windows of at most `window_bytes`, at most `pinned` registered at once
    /// (the staging ring's shape: 8 × 16 MiB by default). The descriptors must stay open until
    /// `stop` returned.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new<'scope>(
        scope: &'scope std::thread::Scope<'scope, 'a>,
        dev: &'a Arc<CudaDevice>,
        plan: &'a Plan,
        sched: &'a Schedule,
        fds: &'a [RawFd],
        registrars: usize,
        (pinned, window_bytes): (usize, u64),
        fault: Option<Fault>,
        trace: bool,
    ) -> Result<Self> {
        let pinned = pinned.max(1);
        if !dev.supports_read_only_register()? {
            let why = "it needs read-only host registration, which this device or driver lacks";
            return Err(Error::unsupported("zero_copy", format!("device cuda:{}", dev.ordinal()), why));
        }
        if matches!(fault, Some(Fault::ShortReads(_))) {
            let why = "short reads cannot be injected into zero-copy loads (nothing is read by a system call)";
            return Err(Error::conflict("inject_fault", "zero_copy", why));
        }
        let page = page_size();
        let max_gap = crate::plan::ScheduleOptions::coalesced(window_bytes).max_gap.unwrap_or(0);
        let wins = Arc::new(sched.windows(window_bytes, page, max_gap));
        // Permits bound the registered windows: a registrar takes one before it registers the
        // next window; the stage gives it back when that window's fence fired.
        let (permit_tx, permit_rx) = sync_channel::<()>(pinned);
        for _ in 0..pinned {
            let _ = permit_tx.send(());
        }
        let permit_rx = Arc::new(Mutex::new(permit_rx));
        let next_window = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = sync_channel::<Registered>(pinned);
        for _ in 0..registrars.clamp(1, pinned) {
            let (done_tx, permit_rx, next, wins) =
                (done_tx.clone(), Arc::clone(&permit_rx), Arc::clone(&next_window), Arc::clone(&wins));
            let cx = Registrar { dev, plan, sched, fds, fault, page };
            // A thread the OS refuses is one registrar fewer; with none at all, `next` finds
            // the channel closed and returns an error.
            let _ = std::thread::Builder::new().name("ws-register".into()).spawn_scoped(scope, move || {
                if cx.dev.bind().is_err() {
                    return; // the stage reports the missing window
                }
                loop {
                    let permit = permit_rx.lock().map(|rx| rx.recv());
                    if !matches!(permit, Ok(Ok(()))) {
                        return; // the stage stopped
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = wins.get(k) else { return };
                    let started = Instant::now();
                    // A panic must still answer window k, or the stage would wait for it.
                    let mapping = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(&cx, w)))
                        .unwrap_or_else(|_| {
                            Err(StageError::named(
                                w.extents.start,
                                w.start,
                                Error::internal("a zero-copy registrar panicked"),
                            ))
                        });
                    let r = Registered { index: k, mapping, started, finished: Instant::now() };
                    if done_tx.send(r).is_err() {
                        return; // dropping the mapping unregisters it: no copy was queued from it
                    }
                }
            });
        }
        Ok(ZeroCopyStage {
            wins,
            next_window,
            permits: Some(permit_tx),
            done: Some(done_rx),
            ready: BTreeMap::new(),
            in_flight: VecDeque::new(),
            delivered: 0,
            pinned,
            max_in_flight: (pinned / 2).max(1),
            window_bytes,
            trace,
            _borrows: std::marker::PhantomData,
        })
    }

    /// Wait for the oldest window's fence, then unregister it and let a registrar go on.
    fn land_oldest(&mut self) -> Result<(), StageError> {
        // The window stays queued until its fence fired: on an error, `stop` keeps its mapping
        // until the pipeline has synchronized the streams.
        if let Some(front) = self.in_flight.front_mut() {
            if let Some(f) = front.fence.take() {
                let (extent, at) = (front.extent, front.at);
                if let Err(e) = f.wait() {
                    return Err(StageError::named(extent, at, e));
                }
            }
        }
        if let Some(w) = self.in_flight.pop_front() {
            drop(w.mapping);
            if let Some(p) = &self.permits {
                let _ = p.send(());
            }
        }
        Ok(())
    }
}

impl Stage for ZeroCopyStage<'_> {
    fn fill(&mut self) -> Result<(), StageError> {
        Ok(()) // the registrars run ahead on their own, bounded by the permits
    }

    fn next(&mut self) -> Result<Option<Landed>, StageError> {
        let k = self.delivered;
        let Some(w) = self.wins.get(k).cloned() else { return Ok(None) };
        if self.in_flight.len() >= self.max_in_flight {
            self.land_oldest()?;
        }
        let reg = loop {
            if let Some(r) = self.ready.remove(&k) {
                break r;
            }
            match self.done.as_ref().map(Receiver::recv) {
                Some(Ok(r)) => {
                    self.ready.insert(r.index, r);
                }
                _ => {
                    let what = "the zero-copy registrars stopped";
                    return Err(StageError::named(w.extents.start, w.start, Error::internal(what)));
                }
            }
        };
        let mapping = reg.mapping?;
        let (ptr, len) = (mapping.ptr as *const u8, mapping.len);
        self.in_flight.push_back(InFlight { mapping, fence: None, extent: w.extents.start, at: w.start });
        self.delivered += 1;
        let timing = self.trace.then(|| Timing {
            track: "register".into(),
            started: reg.started,
            read_done: reg.finished,
            converted: None,
        });
        // Slots cycle over `pinned`: window k's slot is reused by window k + pinned only, whose
        // delivery comes after window k's fence was waited (at most pinned / 2 in flight).
        Ok(Some(Landed {
            extents: w.extents.clone(),
            slot: k % self.pinned,
            bytes: LandedBytes::DeviceReadable { ptr, len, file_offset: w.start },
            timing,
        }))
    }

    fn recycle(&mut self, _slot: usize, fence: Fence) {
        if let Some(last) = self.in_flight.back_mut() {
            last.fence = Some(fence);
        }
    }

    fn stop(&mut self) {
        // No new registrations; wait for every copy that may read a mapping before it is
        // unregistered; then close the channels so that the registrars end.
        self.next_window.store(self.wins.len(), Ordering::Relaxed);
        while let Some(w) = self.in_flight.pop_front() {
            if let Some(f) = w.fence {
                let _ = f.wait();
            }
        }
        self.permits = None;
        self.done = None;
        self.ready.clear();
    }

    fn staging_bytes(&self) -> u64 {
        self.pinned as u64 * self.window_bytes
    }
}

impl Drop for ZeroCopyStage<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A read-only mapping of part of a file, page-locked for DMA. Unregisters and unmaps in `Drop`:
/// the caller must have waited for every copy out of it first.
struct PinnedMapping {
    ptr: *mut u8,
    len: usize,
    registered: bool,
    dev: Arc<CudaDevice>,
}

// SAFETY: the mapping is owned by this value alone; registering, unregistering and unmapping
// work from any thread (each call binds the device's context first).
unsafe impl Send for PinnedMapping {}

impl PinnedMapping {
    fn new(dev: &Arc<CudaDevice>, fd: RawFd, path: &std::path::Path, start: u64, len: usize) -> Result<Self> {
        // SAFETY: a fresh shared read-only mapping; nothing on the CPU reads through it (the
        // device does, through the registration), so a truncated file cannot raise SIGBUS here.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, start as libc::off_t)
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        let mut m = PinnedMapping { ptr: p.cast(), len, registered: false, dev: Arc::clone(dev) };
        dev.bind()?;
        // SAFETY: the mapping is page-aligned, `len` bytes, readable; unregistered in Drop
        // before it is unmapped.
        unsafe { r::host_register_read_only(m.ptr, len) }.map_err(|e| with_file(e, path))?;
        m.registered = true;
        Ok(m)
    }
}

impl Drop for PinnedMapping {
    fn drop(&mut self) {
        if self.registered {
            // SAFETY: registered in new; the owner waited for the copies (see the type's doc).
            let _ = self.dev.bind().and_then(|()| unsafe { r::host_unregister(self.ptr) });
        }
        // SAFETY: unmapping the mapping made in new, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Map and register window `w` (a registrar thread's work), after checking that the file still
/// holds it.
fn register(cx: &Registrar<'_>, w: &Window) -> Result<PinnedMapping, StageError> {
    let path = &cx.plan.files[w.file].path;
    let fd = cx.fds[w.file];
    let first = w.extents.start;
    let at_start = |e: Error| StageError::named(first, w.start, e);
    let len_now = fd_len(fd).map_err(|e| at_start(Error::io(path, e)))?;
    if w.end > len_now {
        // The extent the file now ends in (or before).
        let k = w.extents.clone().find(|&k| cx.sched.extents[k].end() > len_now).unwrap_or(first);
        return Err(StageError { extent: k, at: len_now, fault: StageFault::Eof });
    }
    if let Some(f) = cx.fault {
        for k in w.extents.clone() {
            let e = &cx.sched.extents[k];
            if let Err(err) = f.attempt(e.offset, e.len as usize) {
                return Err(StageError { extent: k, at: e.offset, fault: StageFault::Io(err) });
            }
        }
    }
    let map_len = (w.end - w.start).div_ceil(cx.page) * cx.page;
    PinnedMapping::new(cx.dev, fd, path, w.start, map_len as usize).map_err(at_start)
}

/// The length of the file open at `fd`.
fn fd_len(fd: RawFd) -> std::io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_size as u64)
}

/// A window a registrar mapped and registered (or failed to).
struct Registered {
    index: usize,
    mapping: Result<PinnedMapping, StageError>,
    started: Instant,
    finished: Instant,
}

/// A window whose copies are queued: its mapping, the event behind its last copy (`None` while
/// copies are still being queued), the bytes it carries and its file.
struct InFlight {
    mapping: PinnedMapping,
    fence: Option<Fence>,
    /// Its first extent and file offset, to name an error of its fence.
    extent: usize,
    at: u64,
}

/// The host's page size, which `mmap` offsets and `cuMemHostRegister` ranges must be multiples
/// of (64 KiB on some ARM servers).
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn with_file(e: Error, path: &std::path::Path) -> Error {
    match e {
        Error::Cuda { call, code, message, file: None } => {
            Error::Cuda { call, code, message, file: Some(path.to_path_buf()) }
        }
        other => other,
    }
}
