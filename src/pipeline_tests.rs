//! The fence protocol of the one pipeline, with a recording sink and an engine that completes
//! reads in a random order (kept apart from `pipeline.rs`, which has no `unsafe`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::format::{write_file, WriteTensor};
use crate::io::{RawCompletion, RawEngine, RawRead, ReadQueue};
use crate::memory::{Fence, Staged};
use crate::pipeline::{run, Observer};
use crate::plan::ScheduleOptions;
use crate::plan::{Plan, Schedule};
use crate::sink::{Delivery, Sink};
use crate::source::Checkpoint;
use crate::stage::ring::RingStage;
use crate::stage::StagingRing;

/// A small xorshift generator: the tests are reproducible from their seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Reads at submission (pread), completes them in a random order.
struct ShuffledEngine {
    done: Vec<RawCompletion>,
    rng: Rng,
}

impl RawEngine for ShuffledEngine {
    fn name(&self) -> &'static str {
        "shuffled"
    }
    unsafe fn submit(&mut self, r: RawRead) -> io::Result<()> {
        // SAFETY: the caller guarantees r.buf is valid for r.len bytes and r.fd open.
        let n = unsafe { libc::pread(r.fd, r.buf.cast(), r.len, r.offset as libc::off_t) };
        let result = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
        self.done.push(RawCompletion { tag: r.tag, result });
        Ok(())
    }
    fn wait(&mut self) -> io::Result<RawCompletion> {
        let i = self.rng.below(self.done.len() as u64) as usize;
        if self.done.is_empty() {
            return Err(io::Error::other("nothing in flight"));
        }
        Ok(self.done.swap_remove(i))
    }
}

/// Copies what it is given into `out` (file offsets), returns fences that fire only when
/// waited, and records every breach of the protocol: a slot delivered again before the
/// fence of its last delivery fired, or delivered bytes changed before their fence fired.
struct RecordingSink {
    out: Vec<u8>,
    last_fence: HashMap<usize, Rc<Cell<bool>>>,
    breaches: Rc<RefCell<Vec<String>>>,
    fences: Rc<Cell<usize>>,
    fired: Rc<Cell<usize>>,
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl Sink for RecordingSink {
    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        let Staged::Host { bytes, file_offset } = d.bytes else {
            return Err(Error::internal("the ring stage delivers host bytes"));
        };
        if let Some(prev) = self.last_fence.get(&d.slot) {
            if !prev.get() {
                self.breaches.borrow_mut().push(format!("slot {} refilled before its fence fired", d.slot));
            }
        }
        self.out[file_offset as usize..file_offset as usize + bytes.len()].copy_from_slice(bytes);
        let fired = Rc::new(Cell::new(false));
        self.last_fence.insert(d.slot, fired.clone());
        let (ptr, len, sum) = (bytes.as_ptr() as usize, bytes.len(), checksum(bytes));
        let (breaches, count) = (self.breaches.clone(), self.fired.clone());
        self.fences.set(self.fences.get() + 1);
        Ok(Fence::new(move || {
            // SAFETY: the ring outlives every fence of the test (stop waits on them before
            // the ring is dropped), and the bytes are only read.
            let now = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            if checksum(now) != sum {
                breaches.borrow_mut().push("delivered bytes changed before their fence fired".into());
            }
            fired.set(true);
            count.set(count.get() + 1);
            Ok(())
        }))
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn no_slot_is_refilled_before_the_fence_of_its_last_delivery_fired() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..60 {
        let n = 1 + rng.below(8) as usize;
        let data: Vec<Vec<u8>> =
            (0..n).map(|i| (0..rng.below(40_000)).map(|k| (k * 31 + i as u64 * 7) as u8).collect()).collect();
        let ws: Vec<_> = data
            .iter()
            .enumerate()
            .map(|(i, b)| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![b.len() as u64], b))
            .collect();
        let path = dir.path().join(format!("{case}.safetensors"));
        write_file(&path, &ws, &Default::default()).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let plan = Plan::new(&ckpt, &|_| true, &|_, d| d).unwrap();
        let slot = 4096 * (1 + rng.below(4));
        let sched = Schedule::new(&plan, ScheduleOptions::coalesced(slot));
        let mut ring = StagingRing::host(1 + rng.below(4) as usize, slot as usize).unwrap();
        let engine = ShuffledEngine { done: Vec::new(), rng: Rng(0x1234_5678 + case) };
        let queue = ReadQueue::new(Box::new(engine), 64);
        let read_size = 1024 * (1 + rng.below(4));
        let fds = vec![ckpt.files[0].local_file("test").unwrap().as_raw_fd()];
        let breaches = Rc::new(RefCell::new(Vec::new()));
        let (fences, fired) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let mut sink = RecordingSink {
            out: vec![0; ckpt.files[0].header.file_len as usize],
            last_fence: HashMap::new(),
            breaches: breaches.clone(),
            fences: fences.clone(),
            fired: fired.clone(),
        };
        {
            let mut stage = RingStage::new(&sched, fds, &mut ring, queue, false, read_size, false);
            let mut obs = Observer::new(None, None, None);
            let read = run(&plan, &sched, &mut stage, &mut sink, &mut obs).unwrap();
            assert_eq!(read, sched.bytes_to_read(), "case {case}");
        }
        assert!(breaches.borrow().is_empty(), "case {case}: {:?}", breaches.borrow());
        assert_eq!(fired.get(), fences.get(), "case {case}: every fence fired by the end of the load");
        for t in &plan.tensors {
            let at = t.file_offset as usize;
            let name: usize = t.name[1..].parse().unwrap();
            assert_eq!(&sink.out[at..at + t.stored_len as usize], &data[name][..], "case {case}: {}", t.name);
        }
    }
}

/// Records the first extent of each delivery.
struct OrderSink {
    seen: Vec<usize>,
    in_order: bool,
}

impl Sink for OrderSink {
    fn needs_file_order(&self) -> bool {
        self.in_order
    }
    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        self.seen.push(d.extents.start);
        Ok(Fence::done())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn a_ring_in_order_hands_extents_out_in_file_order_whatever_order_reads_complete_in() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<Vec<u8>> = (0..40u64).map(|i| vec![i as u8; 3000 + 97 * i as usize]).collect();
    let ws: Vec<_> = data
        .iter()
        .enumerate()
        .map(|(i, b)| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![b.len() as u64], b))
        .collect();
    let path = dir.path().join("m.safetensors");
    write_file(&path, &ws, &Default::default()).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let plan = Plan::new(&ckpt, &|_| true, &|_, d| d).unwrap();
    let sched = Schedule::new(&plan, ScheduleOptions::coalesced(4096));
    let extents = sched.extents.len();
    let mut unordered_without = 0;
    for (case, in_order) in (0..20u64).flat_map(|c| [(c, true), (c, false)]) {
        let mut ring = StagingRing::host(4, 4096).unwrap();
        let engine = ShuffledEngine { done: Vec::new(), rng: Rng(0xabcd_ef01 + case) };
        let queue = ReadQueue::new(Box::new(engine), 64);
        let fds = vec![ckpt.files[0].local_file("test").unwrap().as_raw_fd()];
        let mut sink = OrderSink { seen: Vec::new(), in_order };
        {
            let mut stage = RingStage::new(&sched, fds, &mut ring, queue, false, 1024, false).in_order(in_order);
            run(&plan, &sched, &mut stage, &mut sink, &mut Observer::new(None, None, None)).unwrap();
        }
        let mut sorted = sink.seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..extents).collect::<Vec<_>>(), "case {case}: each extent once");
        match in_order {
            true => assert_eq!(sink.seen, sorted, "case {case}: out of file order"),
            false => unordered_without += usize::from(sink.seen != sorted),
        }
    }
    // The engine does shuffle: without the option, some loads come out of order.
    assert!(unordered_without > 0, "the shuffling engine never reordered a delivery");
}
