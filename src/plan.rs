//! The load plan: where every selected tensor goes in the arena, and which reads bring it there.
//!
//! Reads follow the file, not the tensor: adjacent selected tensors are coalesced into extents of
//! at most `chunk_bytes`, and a tensor larger than that is split into chunk-sized pieces. A piece
//! maps a byte range of an extent to a byte range of a tensor. The plan is a plain value: tests
//! inspect it, the pipeline walks it.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::source::Checkpoint;

/// Alignment of every tensor in the arena.
pub const ARENA_ALIGN: u64 = 256;

/// One input file of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path.
    pub path: PathBuf,
    /// Length when its header was read.
    pub file_len: u64,
}

/// One selected tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Name.
    pub name: String,
    /// Index into [`Plan::files`].
    pub file: usize,
    /// Dtype as stored in the file.
    pub dtype: Dtype,
    /// Dtype as loaded (differs when converted).
    pub out_dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute offset of its bytes in the file.
    pub src_offset: u64,
    /// Its byte length in the file.
    pub src_len: u64,
    /// Its offset in the arena (a multiple of [`ARENA_ALIGN`]).
    pub arena_offset: u64,
    /// Its byte length in the arena (after conversion).
    pub out_len: u64,
}

impl PlannedTensor {
    /// Whether this tensor is converted while loading.
    pub fn converts(&self) -> bool {
        self.dtype != self.out_dtype
    }
}

/// A part of an extent that belongs to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`Plan::tensors`].
    pub tensor: usize,
    /// Offset of the piece within its extent.
    pub extent_offset: u64,
    /// Offset of the piece within the tensor's source bytes.
    pub tensor_offset: u64,
    /// Length in source bytes.
    pub len: u64,
}

/// One read: a contiguous byte range of one file, and the pieces it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadExtent {
    /// Index into [`Plan::files`].
    pub file: usize,
    /// Absolute file offset.
    pub offset: u64,
    /// Length in bytes (at most the plan's chunk size).
    pub len: u64,
    /// Range of [`Plan::pieces`] carried by this extent.
    pub pieces: std::ops::Range<usize>,
}

/// How to build a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Largest extent (the staging buffer's usable size). Rounded down to a multiple of 4096 so
    /// that a split never cuts an element and split pieces land at aligned device addresses.
    pub chunk_bytes: u64,
    /// Unselected bytes between two selected tensors up to which one extent reads through.
    pub max_gap: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { chunk_bytes: 16 << 20, max_gap: 256 << 10 }
    }
}

/// The plan of one load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Input files (only those with a selected tensor are read).
    pub files: Vec<PlannedFile>,
    /// Selected tensors, in file order.
    pub tensors: Vec<PlannedTensor>,
    /// Reads, in file order.
    pub extents: Vec<ReadExtent>,
    /// Pieces, referenced by extents.
    pub pieces: Vec<Piece>,
    /// Bytes of the arena (sum of `out_len` plus alignment padding).
    pub arena_len: u64,
}

impl Plan {
    /// Plan the load of the tensors of `ckpt` that `select` accepts, each converted to
    /// `out_dtype(name, stored)`.
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, plan::{Plan, PlanOptions}, Checkpoint, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("a", Dtype::F32, vec![3], &[0; 12]),
    ///                  WriteTensor::new("b", Dtype::F32, vec![1], &[0; 4])], &Default::default())?;
    /// let plan = Plan::new(&Checkpoint::open(&p)?, &|_| true, &|_, d| d, PlanOptions::default())?;
    /// assert_eq!(plan.extents.len(), 1);           // both tensors in one read
    /// assert_eq!(plan.tensors[1].arena_offset, 256); // aligned in the arena
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        ckpt: &Checkpoint,
        select: &dyn Fn(&str) -> bool,
        out_dtype: &dyn Fn(&str, Dtype) -> Dtype,
        opts: PlanOptions,
    ) -> Result<Plan> {
        let chunk = (opts.chunk_bytes / 4096 * 4096).max(4096);
        let mut plan = Plan::default();
        let mut arena = 0u64;
        for f in &ckpt.files {
            let file_idx = plan.files.len();
            let mut any = false;
            let mut open: Option<ReadExtent> = None;
            for t in &f.header.tensors {
                if !select(&t.name) {
                    continue;
                }
                any = true;
                let to = out_dtype(&t.name, t.dtype);
                let elements = t.elements();
                let out_len = to.bytes_for(elements).ok_or_else(|| Error::UnsupportedConversion {
                    file: f.path.clone(),
                    tensor: t.name.clone(),
                    from: t.dtype.name(),
                    to: to.name(),
                })?;
                let overflow =
                    || Error::ShapeOverflow { file: f.path.clone(), tensor: t.name.clone(), shape: t.shape.clone() };
                let arena_offset = align_up(arena, ARENA_ALIGN).ok_or_else(overflow)?;
                arena = arena_offset.checked_add(out_len).ok_or_else(overflow)?;
                let tensor_idx = plan.tensors.len();
                let src_offset = f.header.data_start + t.data_offsets.0;
                let src_len = t.byte_len();
                plan.tensors.push(PlannedTensor {
                    name: t.name.clone(),
                    file: file_idx,
                    dtype: t.dtype,
                    out_dtype: to,
                    shape: t.shape.clone(),
                    src_offset,
                    src_len,
                    arena_offset,
                    out_len,
                });
                if src_len == 0 {
                    continue; // nothing to read
                }
                // Close the open extent unless this tensor continues it closely and fits whole:
                // so a tensor is split only when larger than a chunk, and then at multiples of
                // the chunk size from its start (whole elements, for conversions).
                if let Some(e) = &open {
                    let end = e.offset + e.len;
                    let gap = src_offset - end;
                    let fits = e.len + gap + src_len <= chunk;
                    if gap > opts.max_gap || !fits {
                        plan.extents.push(open.take().expect("checked Some")); // ok: inside if-let Some
                    }
                }
                let mut done = 0u64;
                while done < src_len {
                    let e = open.get_or_insert_with(|| ReadExtent {
                        file: file_idx,
                        offset: src_offset + done,
                        len: 0,
                        pieces: plan.pieces.len()..plan.pieces.len(),
                    });
                    let start_in_extent = src_offset + done - e.offset;
                    let room = chunk - start_in_extent;
                    let len = room.min(src_len - done);
                    plan.pieces.push(Piece {
                        tensor: tensor_idx,
                        extent_offset: start_in_extent,
                        tensor_offset: done,
                        len,
                    });
                    e.len = start_in_extent + len;
                    e.pieces.end = plan.pieces.len();
                    done += len;
                    if e.len == chunk {
                        plan.extents.push(open.take().expect("just inserted")); // ok: get_or_insert_with above
                    }
                }
            }
            if let Some(e) = open.take() {
                plan.extents.push(e);
            }
            if any {
                plan.files.push(PlannedFile { path: f.path.clone(), file_len: f.header.file_len });
            } else {
                // Keep indices dense: only files with a selected tensor are listed.
                debug_assert!(plan.tensors.iter().all(|t| t.file != file_idx));
            }
        }
        plan.arena_len = arena;
        Ok(plan)
    }

    /// Bytes read from the files (extents, gaps included).
    pub fn bytes_to_read(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Bytes of tensor data as loaded (after conversion).
    pub fn bytes_loaded(&self) -> u64 {
        self.tensors.iter().map(|t| t.out_len).sum()
    }

    /// The tensor a byte range of an extent belongs to, for error messages.
    pub fn tensor_at(&self, extent: &ReadExtent, extent_offset: u64) -> Option<&str> {
        self.pieces[extent.pieces.clone()]
            .iter()
            .find(|p| p.extent_offset + p.len > extent_offset)
            .or_else(|| self.pieces[extent.pieces.clone()].last())
            .map(|p| self.tensors[p.tensor].name.as_str())
    }
}

/// `v` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{write_file, WriteTensor};

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
            let opts = PlanOptions { chunk_bytes: 4096 * (1 + rnd(6)), max_gap: [0, 100, 1 << 20][rnd(3) as usize] };
            let select = |name: &str| selected[name[1..].parse::<usize>().unwrap()];
            let plan = Plan::new(&ckpt, &select, &|_, d| d, opts).unwrap();
            let chunk = opts.chunk_bytes;
            let mut covered = vec![0u64; plan.tensors.len()];
            let mut prev_end = 0;
            for e in &plan.extents {
                assert!(e.len > 0 && e.len <= chunk, "case {case}: extent {e:?} chunk {chunk}");
                assert!(e.offset >= prev_end, "case {case}: extents overlap");
                prev_end = e.offset + e.len;
                for pc in &plan.pieces[e.pieces.clone()] {
                    let t = &plan.tensors[pc.tensor];
                    assert!(pc.extent_offset + pc.len <= e.len, "case {case}: piece past its extent");
                    assert_eq!(e.offset + pc.extent_offset, t.src_offset + pc.tensor_offset, "case {case}");
                    assert_eq!(covered[pc.tensor], pc.tensor_offset, "case {case}: pieces out of order");
                    assert_eq!(pc.tensor_offset % 4, 0, "case {case}: split inside an element");
                    covered[pc.tensor] += pc.len;
                }
            }
            for (t, c) in plan.tensors.iter().zip(&covered) {
                assert_eq!(*c, t.src_len, "case {case}: {} covered {c} of {}", t.name, t.src_len);
                assert_eq!(t.arena_offset % ARENA_ALIGN, 0);
            }
            let mut want: Vec<_> = specs.iter().zip(&selected).filter(|(_, s)| **s).map(|(s, _)| s.0.clone()).collect();
            let mut got: Vec<_> = plan.tensors.iter().map(|t| t.name.clone()).collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "case {case}");
        }
    }
}
