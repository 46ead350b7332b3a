//! Read schedules: the extents that bring a plan's tensors into memory, under the constraints of
//! the stage that runs them.
//!
//! Reads follow the file, not the tensor: for a staging ring, adjacent selected tensors are
//! coalesced into extents of at most one slot, and a tensor larger than that is split. Reads
//! that land in place (straight into the destination) cannot carry bytes between tensors, so
//! they get one tensor's piece each. A piece maps a byte range of an extent to a byte range of a
//! tensor. Every schedule of the crate is built here.

use std::ops::Range;

use super::Plan;

/// A part of an extent that belongs to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`Plan::tensors`].
    pub tensor: usize,
    /// Offset of the piece within its extent.
    pub extent_offset: u64,
    /// Offset of the piece within the bytes read of its tensor (its block's runs one after
    /// another: the tensor's stored bytes when it is read whole).
    pub tensor_offset: u64,
    /// Length in stored bytes.
    pub len: u64,
}

/// One read: a contiguous byte range of one file, and the pieces it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadExtent {
    /// Index into [`Plan::files`].
    pub file: usize,
    /// Absolute file offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Range of [`Schedule::pieces`] carried by this extent.
    pub pieces: Range<usize>,
}

impl ReadExtent {
    /// The file offset one past its last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// How to cut a plan into extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleOptions {
    /// Largest extent. Rounded down to a multiple of 4096 (at least 4096), so that a split never
    /// cuts an element and split pieces land at aligned device addresses.
    pub max_len: u64,
    /// Unselected bytes between two selected tensors up to which one extent reads through;
    /// `None`: never coalesce two tensors into one extent (reads that land in place).
    pub max_gap: Option<u64>,
}

impl ScheduleOptions {
    /// Extents of at most `max_len` that read through gaps of up to 256 KiB (a staging ring).
    pub fn coalesced(max_len: u64) -> Self {
        ScheduleOptions { max_len, max_gap: Some(256 << 10) }
    }

    /// One tensor's piece of at most `max_len` per extent (reads into the destination itself).
    pub fn per_tensor(max_len: u64) -> Self {
        ScheduleOptions { max_len, max_gap: None }
    }
}

/// The extents of one load, in file order, and the pieces they carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Reads, in file order.
    pub extents: Vec<ReadExtent>,
    /// Pieces, referenced by extents.
    pub pieces: Vec<Piece>,
}

impl Schedule {
    /// Cut `plan` into extents under `opts`.
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, plan::{Plan, Schedule, ScheduleOptions}, Checkpoint, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("a", Dtype::F32, vec![3], &[0; 12]),
    ///                  WriteTensor::new("b", Dtype::F32, vec![1], &[0; 4])], &Default::default())?;
    /// let plan = Plan::new(&Checkpoint::open(&p)?, &|_| true, &|_, d| d)?;
    /// assert_eq!(Schedule::new(&plan, ScheduleOptions::coalesced(16 << 20)).extents.len(), 1);
    /// assert_eq!(Schedule::new(&plan, ScheduleOptions::per_tensor(16 << 20)).extents.len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(plan: &Plan, opts: ScheduleOptions) -> Schedule {
        let chunk = (opts.max_len / 4096 * 4096).max(4096);
        // At least one piece per tensor with bytes: sized once rather than grown by doubling.
        let mut s = Schedule { extents: Vec::new(), pieces: Vec::with_capacity(plan.tensors.len()) };
        let mut open: Option<ReadExtent> = None;
        for (ti, t) in plan.tensors.iter().enumerate() {
            if t.stored_len == 0 {
                continue; // nothing to read
            }
            // A tensor is read as its block's runs (one, unless a shard takes a strided block).
            for row in 0..t.block.rows {
                let run_file = t.file_pos(row * t.block.row_len);
                let run_len = t.block.row_len;
                let run_start = row * t.block.row_len; // in the tensor's read bytes
                                                       // Close the open extent unless this run continues it closely and fits whole:
                                                       // so a run is split only when larger than a chunk, and then at multiples of the
                                                       // chunk size from its start (whole elements, for conversions).
                if let Some(e) = &open {
                    let keep = match opts.max_gap {
                        Some(max_gap) if e.file == t.file && run_file >= e.end() => {
                            let gap = run_file - e.end();
                            gap <= max_gap && e.len + gap + run_len <= chunk
                        }
                        _ => false,
                    };
                    if !keep {
                        s.extents.extend(open.take());
                    }
                }
                let mut done = 0u64;
                while done < run_len {
                    let next_piece = s.pieces.len();
                    let e = open.get_or_insert_with(|| ReadExtent {
                        file: t.file,
                        offset: run_file + done,
                        len: 0,
                        pieces: next_piece..next_piece,
                    });
                    let start_in_extent = run_file + done - e.offset;
                    let len = (chunk - start_in_extent).min(run_len - done);
                    s.pieces.push(Piece {
                        tensor: ti,
                        extent_offset: start_in_extent,
                        tensor_offset: run_start + done,
                        len,
                    });
                    e.len = start_in_extent + len;
                    e.pieces.end = s.pieces.len();
                    done += len;
                    if e.len == chunk {
                        s.extents.extend(open.take());
                    }
                }
            }
        }
        s.extents.extend(open.take());
        s
    }

    /// Bytes the extents read (gaps read through included).
    pub fn bytes_to_read(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The pieces of extent `e`.
    pub fn pieces_of(&self, e: &ReadExtent) -> &[Piece] {
        &self.pieces[e.pieces.clone()]
    }

    /// The tensor the byte at file offset `at` of extent `extent` belongs to (the nearest one
    /// after it in a gap, the last one past the end), for error messages.
    pub fn tensor_at<'p>(&self, plan: &'p Plan, extent: usize, at: u64) -> Option<&'p str> {
        let e = self.extents.get(extent)?;
        let off = at.saturating_sub(e.offset);
        let pieces = self.pieces_of(e);
        pieces
            .iter()
            .find(|p| p.extent_offset + p.len > off)
            .or_else(|| pieces.last())
            .map(|p| plan.tensors[p.tensor].name.as_str())
    }

    /// Consecutive extents grouped into windows of at most `max` bytes from a `page` boundary,
    /// never across files, and only across gaps of at most `max_gap` (so a filtered load does
    /// not map unselected tensors). An extent larger than `max` gets a window of its own.
    pub fn windows(&self, max: u64, page: u64, max_gap: u64) -> Vec<Window> {
        let mut out: Vec<Window> = Vec::new();
        for (i, e) in self.extents.iter().enumerate() {
            if let Some(w) = out.last_mut() {
                if w.file == e.file && e.offset >= w.end && e.offset - w.end <= max_gap && e.end() - w.start <= max {
                    w.end = e.end();
                    w.extents.end = i + 1;
                    continue;
                }
            }
            out.push(Window { file: e.file, start: e.offset / page * page, end: e.end(), extents: i..i + 1 });
        }
        out
    }
}

/// Consecutive extents of one file that one mapping covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Index into [`Plan::files`].
    pub file: usize,
    /// Page-aligned file offset of the mapping.
    pub start: u64,
    /// End of the last extent (not page-aligned).
    pub end: u64,
    /// The extents it covers.
    pub extents: Range<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Dtype;
    use crate::format::{write_file, WriteTensor};
    use crate::plan::{Plan, ARENA_ALIGN};
    use crate::source::Checkpoint;

    /// Random layouts, selections and chunk sizes: the pieces cover every selected tensor exactly
    /// once, each inside its extent at the right file offset, extents within the chunk size.
    #[test]
    fn pieces_cover_selected_tensors_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for case in 0..300 {
            let n = rnd(12) as usize;
            let specs: Vec<(String, Dtype, u64)> = (0..n)
                .map(|i| {
                    let dt = [Dtype::U8, Dtype::F32, Dtype::F16][rnd(3) as usize];
                    let elems = match rnd(4) {
                        0 => 0,
                        1 => rnd(50),
                        2 => rnd(5000),
                        _ => rnd(40_000),
                    };
                    (format!("t{i}"), dt, elems)
                })
                .collect();
            let data: Vec<Vec<u8>> =
                specs.iter().map(|(_, d, e)| vec![0u8; d.bytes_for(*e).unwrap() as usize]).collect();
            let ws: Vec<_> = specs
                .iter()
                .zip(&data)
                .map(|((name, d, e), b)| WriteTensor::new(name.clone(), *d, vec![*e], b))
                .collect();
            let p = dir.path().join(format!("{case}.safetensors"));
            write_file(&p, &ws, &Default::default()).unwrap();
            let ckpt = Checkpoint::open(&p).unwrap();
            let selected: Vec<bool> = (0..n).map(|_| rnd(4) != 0).collect();
            let opts = ScheduleOptions {
                max_len: 4096 * (1 + rnd(6)),
                max_gap: [Some(0), Some(100), Some(1 << 20), None][rnd(4) as usize],
            };
            let select = |name: &str| selected[name[1..].parse::<usize>().unwrap()];
            let plan = Plan::new(&ckpt, &select, &|_, d| d).unwrap();
            let sched = Schedule::new(&plan, opts);
            let chunk = opts.max_len;
            let mut covered = vec![0u64; plan.tensors.len()];
            let mut prev_end = 0;
            for e in &sched.extents {
                assert!(e.len > 0 && e.len <= chunk, "case {case}: extent {e:?} chunk {chunk}");
                assert!(e.offset >= prev_end, "case {case}: extents overlap");
                prev_end = e.offset + e.len;
                if opts.max_gap.is_none() {
                    assert_eq!(e.pieces.len(), 1, "case {case}: per-tensor extents carry one piece");
                }
                for pc in sched.pieces_of(e) {
                    let t = &plan.tensors[pc.tensor];
                    assert!(pc.extent_offset + pc.len <= e.len, "case {case}: piece past its extent");
                    assert_eq!(e.offset + pc.extent_offset, t.file_pos(pc.tensor_offset), "case {case}");
                    assert_eq!(covered[pc.tensor], pc.tensor_offset, "case {case}: pieces out of order");
                    assert_eq!(pc.tensor_offset % 4, 0, "case {case}: split inside an element");
                    covered[pc.tensor] += pc.len;
                }
            }
            for (t, c) in plan.tensors.iter().zip(&covered) {
                assert_eq!(*c, t.stored_len, "case {case}: {} covered {c} of {}", t.name, t.stored_len);
                assert_eq!(t.dst_offset % ARENA_ALIGN, 0);
            }
            let mut want: Vec<_> = specs.iter().zip(&selected).filter(|(_, s)| **s).map(|(s, _)| s.0.clone()).collect();
            let mut got: Vec<_> = plan.tensors.iter().map(|t| t.name.clone()).collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "case {case}");
        }
    }

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
        let plan = Plan::new(&ckpt, &select, &|_, d| d).unwrap();
        let sched = Schedule::new(&plan, ScheduleOptions::coalesced(4 << 20));
        assert!(plan.files.len() == 2 && sched.extents.len() > 10);
        for max in [1 << 20, 8 << 20, 64 << 20] {
            let ws = sched.windows(max, 4096, 256 << 10);
            let mut next = 0;
            for w in &ws {
                assert_eq!(w.extents.start, next);
                next = w.extents.end;
                assert_eq!(w.start % 4096, 0);
                for e in &sched.extents[w.extents.clone()] {
                    assert_eq!(e.file, w.file);
                    assert!(e.offset >= w.start && e.offset + e.len <= w.end);
                }
                assert!(w.end - w.start <= max || w.extents.len() == 1, "{w:?}");
            }
            assert_eq!(next, sched.extents.len());
        }
        assert!(sched.windows(64 << 20, 4096, 256 << 10).len() < sched.windows(1 << 20, 4096, 256 << 10).len());
        // Left-out tensors are never inside a window: every window's bytes are selected ones or
        // gaps the planner reads through.
        for w in sched.windows(64 << 20, 4096, 256 << 10) {
            let selected: u64 = sched.extents[w.extents.clone()].iter().map(|e| e.len).sum();
            assert!(w.end - w.start <= selected + 4096 + w.extents.len() as u64 * (256 << 10), "{w:?}");
        }
    }
}
