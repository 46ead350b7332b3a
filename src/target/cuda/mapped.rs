//! Experimental: DMA straight out of the page cache, with no copy by the CPU.
//!
//! The staged pipeline copies every byte from the page cache into a pinned buffer first; on an
//! H100 host that memcpy tops out near 40 GB/s, below the 50 GB/s the PCIe link can take
//! (BENCHMARKS.md). Here each window of a file is mapped read-only, page-locked in place with
//! `cuMemHostRegister(CU_MEMHOSTREGISTER_READ_ONLY)`, copied to the arena by the device's copy
//! engines, then unregistered and unmapped. Registration pins the page-cache pages (and reads
//! them from disk if they are not cached), so its cost replaces the memcpy's; whether it is
//! cheaper is what `bench --strategy pipeline-mapped` measures. Host memory in use is the
//! windows in flight. The CPU never touches the mapping, so a file truncated under us gives a
//! driver error (or [`Error::UnexpectedEof`], checked before each window), never SIGBUS.
//! Injected read faults (tests) do not apply here: nothing is read by a system call.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::result as r;
use super::{CudaDevice, DeviceArena, Event, Stream};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::trace::TraceRecorder;

/// Bytes of file mapped and registered at once, per window.
pub const WINDOW_BYTES: u64 = 16 << 20;
/// Windows registered at once, at most: the page cache pinned in place, and mapped into this
/// process (so counted in its RSS), is at most `WINDOW_BYTES * WINDOWS_PINNED` (128 MiB, the
/// default staging ring's size).
pub const WINDOWS_PINNED: usize = 8;
/// Of those, windows whose copies may be queued at once; the others are registered ahead.
pub const WINDOWS_IN_FLIGHT: usize = 4;

/// Consecutive extents of one file that one mapping covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    pub file: usize,
    /// Page-aligned file offset of the mapping.
    pub start: u64,
    /// End of the last extent (not page-aligned).
    pub end: u64,
    pub extents: std::ops::Range<usize>,
}

/// Group the plan's extents into windows of at most `max` bytes from a `page` boundary, never
/// across files, and only across gaps the planner would read through anyway (so a filtered load
/// does not pin unselected tensors). An extent larger than `max` gets a window of its own (the
/// loader plans zero-copy loads with extents of at most [`WINDOW_BYTES`]).
pub(crate) fn windows(plan: &Plan, max: u64, page: u64) -> Vec<Window> {
    let max_gap = crate::plan::PlanOptions::default().max_gap;
    let mut out: Vec<Window> = Vec::new();
    for (i, e) in plan.extents.iter().enumerate() {
        let end = e.offset + e.len;
        if let Some(w) = out.last_mut() {
            if w.file == e.file && e.offset >= w.end && e.offset - w.end <= max_gap && end - w.start <= max {
                w.end = end;
                w.extents.end = i + 1;
                continue;
            }
        }
        out.push(Window { file: e.file, start: e.offset / page * page, end, extents: i..i + 1 });
    }
    out
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
    fn new(dev: &Arc<CudaDevice>, file: &File, path: &std::path::Path, start: u64, len: usize) -> Result<Self> {
        // SAFETY: a fresh shared read-only mapping; nothing on the CPU reads through it (the
        // device does, through the registration), so a truncated file cannot raise SIGBUS here.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                start as libc::off_t,
            )
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

/// Copy every planned extent from the files' page cache into `arena`. `registrars` threads map
/// and register windows ahead, in parallel (registration pins page by page and is the cost of
/// this path); this thread queues each window's copies, in file order, on `streams`
/// round-robin. At most [`WINDOWS_PINNED`] windows are registered at a time, of which at most
/// [`WINDOWS_IN_FLIGHT`] have copies queued. `on_done(bytes, file)` is called as each window lands
/// (progress, cancellation). Nothing is converted: the caller sends converting plans down the
/// staged path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_mapped(
    dev: &Arc<CudaDevice>,
    arena: &DeviceArena,
    plan: &Plan,
    files: &[File],
    streams: usize,
    registrars: usize,
    mut trace: Option<&mut TraceRecorder>,
    on_done: &mut dyn FnMut(u64, usize) -> Result<()>,
) -> Result<()> {
    if !dev.supports_read_only_register()? {
        return Err(Error::option("--zero-copy needs read-only host registration, which this device or driver lacks"));
    }
    let streams = (0..streams.max(1)).map(|_| Stream::new(dev)).collect::<Result<Vec<_>>>()?;
    let page = page_size();
    let wins = windows(plan, WINDOW_BYTES, page);
    // Permits bound the registered windows: a registrar takes one before it registers the next
    // window, this thread gives it back when that window has landed.
    let (permit_tx, permit_rx) = sync_channel::<()>(WINDOWS_PINNED);
    for _ in 0..WINDOWS_PINNED {
        let _ = permit_tx.send(());
    }
    let permit_rx = Mutex::new(permit_rx);
    let next = AtomicUsize::new(0);
    let (done_tx, done_rx) = sync_channel::<Registered>(WINDOWS_PINNED);
    std::thread::scope(|scope| {
        for _ in 0..registrars.clamp(1, WINDOWS_PINNED) {
            let (done_tx, permit_rx, next, wins) = (done_tx.clone(), &permit_rx, &next, &wins);
            // A thread the OS refuses is one registrar fewer; with none at all, the main thread
            // finds the channel closed and returns an error.
            let _ = std::thread::Builder::new().name("ws-register".into()).spawn_scoped(scope, move || {
                if dev.bind().is_err() {
                    return; // the main thread reports the missing window
                }
                loop {
                    let permit = permit_rx.lock().map(|rx| rx.recv());
                    if !matches!(permit, Ok(Ok(()))) {
                        return; // the main thread stopped
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = wins.get(k) else { return };
                    let started = Instant::now();
                    // A panic must still answer window k, or the main thread would wait for it.
                    let mapping =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(dev, plan, files, w, page)))
                            .unwrap_or_else(|_| Err(Error::option("internal: a zero-copy registrar panicked")));
                    let r = Registered { index: k, mapping, started, finished: Instant::now() };
                    if done_tx.send(r).is_err() {
                        return; // dropping the mapping unregisters it: no copy was queued from it
                    }
                }
            });
        }
        drop(done_tx);
        // A window enters `in_flight` before its first copy is queued and leaves it only after
        // its event fired, so on an error every mapping a copy may read is in there until the
        // streams are synchronized below.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut ready: BTreeMap<usize, Registered> = BTreeMap::new();
        // Dropped before `ready` and `in_flight` even when unwinding from a panic (a progress
        // callback's, say): no mapping is unregistered while a queued copy may read it.
        let streams_idle = SyncOnDrop(&streams);
        let result = (|| -> Result<()> {
            let mut land_oldest = |in_flight: &mut VecDeque<InFlight>| -> Result<()> {
                if let Some(w) = in_flight.front() {
                    if let Some(e) = &w.event {
                        e.synchronize()?;
                    }
                    let w = in_flight.pop_front().expect("front exists"); // ok: checked above
                    drop(w.mapping);
                    let _ = permit_tx.send(());
                    on_done(w.bytes, w.file)?;
                }
                Ok(())
            };
            for (k, w) in wins.iter().enumerate() {
                if in_flight.len() >= WINDOWS_IN_FLIGHT {
                    land_oldest(&mut in_flight)?;
                }
                let reg = loop {
                    if let Some(r) = ready.remove(&k) {
                        break r;
                    }
                    match done_rx.recv() {
                        Ok(r) => {
                            ready.insert(r.index, r);
                        }
                        Err(_) => return Err(Error::option("internal: the zero-copy registrars stopped")),
                    }
                };
                if let Some(t) = trace.as_deref_mut() {
                    t.span("register", "register", reg.started, reg.finished, w.end - w.start);
                }
                let mapping = reg.mapping?;
                let path = &plan.files[w.file].path;
                let base = mapping.ptr;
                in_flight.push_back(InFlight { mapping, event: None, bytes: 0, file: w.file });
                let stream = &streams[k % streams.len()];
                let mut bytes = 0;
                for e in &plan.extents[w.extents.clone()] {
                    for p in &plan.pieces[e.pieces.clone()] {
                        let t = &plan.tensors[p.tensor];
                        let src_off = (e.offset - w.start + p.extent_offset) as usize;
                        // SAFETY: the source lies inside the registered mapping (the window
                        // covers the extent), which stays in `in_flight`, registered, until this
                        // window's event has fired or the streams were synchronized; the
                        // destination is inside t's planned arena range.
                        unsafe {
                            r::memcpy_htod_async(
                                arena.ptr() + t.arena_offset + p.tensor_offset,
                                base.add(src_off),
                                p.len as usize,
                                stream.raw,
                            )
                            .map_err(|e| with_file(e, path))?
                        };
                    }
                    bytes += e.len;
                }
                let mut ev = Event::new(dev, false)?;
                ev.record(stream)?;
                let last = in_flight.back_mut().expect("pushed above"); // ok: pushed above
                last.event = Some(ev);
                last.bytes = bytes;
            }
            while !in_flight.is_empty() {
                land_oldest(&mut in_flight)?;
            }
            Ok(())
        })();
        // No new registrations; then, on an error, copies may still read the mappings: wait for
        // them before unregistering.
        next.store(wins.len(), Ordering::Relaxed);
        drop(streams_idle);
        drop(in_flight);
        // Stop the registrars: no more permits, nobody receiving; registered windows no copy
        // was queued from are unregistered as they drop.
        drop(permit_tx);
        drop(done_rx);
        drop(ready);
        result
    })
}

/// Synchronizes every stream when dropped.
struct SyncOnDrop<'a>(&'a [Stream]);

impl Drop for SyncOnDrop<'_> {
    fn drop(&mut self) {
        for s in self.0 {
            let _ = s.synchronize();
        }
    }
}

/// Map and register window `w` (a registrar thread's work), after checking that the file still
/// holds it.
fn register(dev: &Arc<CudaDevice>, plan: &Plan, files: &[File], w: &Window, page: u64) -> Result<PinnedMapping> {
    let path = &plan.files[w.file].path;
    let len_now = files[w.file].metadata().map_err(|e| Error::io(path, e))?.len();
    if w.end > len_now {
        // The extent the file now ends in (or before).
        let e = plan.extents[w.extents.clone()]
            .iter()
            .find(|e| e.offset + e.len > len_now)
            .unwrap_or(&plan.extents[w.extents.start]);
        return Err(Error::UnexpectedEof {
            file: path.clone(),
            tensor: plan.tensor_at(e, len_now.saturating_sub(e.offset)).map(str::to_string),
            what: "tensor data",
            at: len_now,
        });
    }
    let map_len = (w.end - w.start).div_ceil(page) * page;
    PinnedMapping::new(dev, &files[w.file], path, w.start, map_len as usize)
}

/// A window a registrar mapped and registered (or failed to).
struct Registered {
    index: usize,
    mapping: Result<PinnedMapping>,
    started: Instant,
    finished: Instant,
}

/// A window whose copies are queued: its mapping, the event behind its last copy (`None` while
/// copies are still being queued), the bytes it carries and its file.
struct InFlight {
    mapping: PinnedMapping,
    event: Option<Event>,
    bytes: u64,
    file: usize,
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
        Error::Cuda { call, message, file: None } => Error::Cuda { call, message, file: Some(path.to_path_buf()) },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{write_file, WriteTensor};
    use crate::plan::PlanOptions;
    use crate::{Checkpoint, Dtype};

    #[test]
    fn windows_cover_every_extent_once_within_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![1u8; 5 << 20];
        let small = vec![2u8; 1000];
        let mut map = serde_json::Map::new();
        for f in ["a", "b"] {
            let mut ts = Vec::new();
            for i in 0..6 {
                ts.push(WriteTensor::new(format!("{f}.s{i}"), Dtype::U8, vec![1000], &small));
                ts.push(WriteTensor::new(format!("{f}.b{i}"), Dtype::U8, vec![5 << 20], &data));
            }
            let name = format!("{f}.safetensors");
            write_file(dir.path().join(&name), &ts, &Default::default()).unwrap();
            for t in &ts {
                map.insert(t.name.clone(), name.clone().into());
            }
        }
        let idx = dir.path().join("model.safetensors.index.json");
        std::fs::write(&idx, serde_json::json!({ "weight_map": map }).to_string()).unwrap();
        let ckpt = Checkpoint::open(&idx).unwrap();
        // Two files, gaps where tensors are left out, big tensors split into 4 MiB extents.
        let select = |n: &str| !n.ends_with("s1") && !n.ends_with("b3");
        let plan =
            Plan::new(&ckpt, &select, &|_, d| d, PlanOptions { chunk_bytes: 4 << 20, ..Default::default() }).unwrap();
        assert!(plan.files.len() == 2 && plan.extents.len() > 10);
        for max in [1 << 20, 8 << 20, 64 << 20] {
            let ws = windows(&plan, max, 4096);
            let mut next = 0;
            for w in &ws {
                assert_eq!(w.extents.start, next);
                next = w.extents.end;
                assert_eq!(w.start % 4096, 0);
                for e in &plan.extents[w.extents.clone()] {
                    assert_eq!(e.file, w.file);
                    assert!(e.offset >= w.start && e.offset + e.len <= w.end);
                }
                assert!(w.end - w.start <= max || w.extents.len() == 1, "{w:?}");
            }
            assert_eq!(next, plan.extents.len());
        }
        assert!(windows(&plan, 64 << 20, 4096).len() < windows(&plan, 1 << 20, 4096).len());
        // Left-out tensors are never inside a window: every window's bytes are selected ones or
        // gaps the planner reads through.
        for w in windows(&plan, 64 << 20, 4096) {
            let selected: u64 = plan.extents[w.extents.clone()].iter().map(|e| e.len).sum();
            assert!(w.end - w.start <= selected + 4096 + w.extents.len() as u64 * (256 << 10), "{w:?}");
        }
    }
}
