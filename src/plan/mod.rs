//! The load plan: per selected tensor, its stored and loaded dtype and where its loaded bytes go;
//! and ([`schedule`]) the reads that bring them there under a stage's constraints.
//!
//! The plan is a plain value: tests inspect it, the pipeline walks it. Destinations are offsets
//! into one region (today the arena of a load); every stored -> loaded offset goes through
//! [`PlannedTensor::dst_range`].

pub mod schedule;
mod shard;
mod share;

use std::path::PathBuf;

pub use schedule::{Piece, ReadExtent, Schedule, ScheduleOptions};
pub use shard::{Shard, StoredBlock};
pub use share::{parts_plan, Chunk, GroupPlan, PartRead, ShareKey, ShareWindow};

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
    /// Index of the file in [`Checkpoint::files`] (its open descriptor is read).
    pub source: usize,
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
    pub stored_dtype: Dtype,
    /// Dtype as loaded (differs when converted), as [`crate::TensorRef::dtype`] reports it.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute offset of its bytes in the file (of the whole tensor, shard or not).
    pub file_offset: u64,
    /// The bytes of it that this load reads (all of them, unless a shard takes a block).
    pub block: StoredBlock,
    /// Bytes read of it in all: `block.len()`. Stored offsets of a tensor (a piece's
    /// `tensor_offset`, [`PlannedTensor::dst_range`]) count these bytes, one run after another.
    pub stored_len: u64,
    /// Offset of its loaded bytes in the destination region (a multiple of [`ARENA_ALIGN`]).
    pub dst_offset: u64,
    /// Its byte length as loaded (after conversion).
    pub len: u64,
}

impl PlannedTensor {
    /// Whether this tensor is converted while loading.
    pub fn converts(&self) -> bool {
        self.stored_dtype != self.dtype
    }

    /// Where the stored bytes `stored_offset..stored_offset + stored_len` of this tensor land,
    /// as a range of the destination region: whole elements of the stored dtype become as many
    /// of the loaded one (the same bytes when the dtype is kept, sub-byte dtypes included).
    ///
    /// ```
    /// use weightstream::{plan::PlannedTensor, Dtype};
    /// let t = PlannedTensor { name: "w".into(), file: 0, stored_dtype: Dtype::F32, dtype: Dtype::BF16,
    ///     shape: vec![1024], file_offset: 8, block: weightstream::plan::StoredBlock::whole(4096),
    ///     stored_len: 4096, dst_offset: 512, len: 2048 };
    /// assert_eq!(t.dst_range(1024, 2048), 512 + 512..512 + 1536);
    /// ```
    pub fn dst_range(&self, stored_offset: u64, stored_len: u64) -> std::ops::Range<u64> {
        let (sb, db) = (self.stored_dtype.bits(), self.dtype.bits());
        if sb == db {
            return self.dst_offset + stored_offset..self.dst_offset + stored_offset + stored_len;
        }
        let at = self.dst_offset + stored_offset * 8 / sb * db / 8;
        at..at + stored_len * 8 / sb * db / 8
    }

    /// The file offset of stored byte `stored_offset` of what this load reads of the tensor.
    pub fn file_pos(&self, stored_offset: u64) -> u64 {
        self.file_offset + self.block.tensor_offset(stored_offset)
    }
}

/// The plan of one load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Input files (only those with a selected tensor are read).
    pub files: Vec<PlannedFile>,
    /// Selected tensors, in file order.
    pub tensors: Vec<PlannedTensor>,
    /// Bytes of the destination region (sum of `len` plus alignment padding).
    pub dst_len: u64,
}

impl Plan {
    /// Plan the load of the tensors of `ckpt` that `select` accepts, each converted to
    /// `dtype(name, stored)`.
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, plan::Plan, Checkpoint, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("a", Dtype::F32, vec![3], &[0; 12]),
    ///                  WriteTensor::new("b", Dtype::F32, vec![1], &[0; 4])], &Default::default())?;
    /// let plan = Plan::new(&Checkpoint::open(&p)?, &|_| true, &|_, d| d)?;
    /// assert_eq!(plan.tensors[1].dst_offset, 256); // aligned in the arena
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(ckpt: &Checkpoint, select: &dyn Fn(&str) -> bool, dtype: &dyn Fn(&str, Dtype) -> Dtype) -> Result<Plan> {
        Self::new_sharded(ckpt, select, dtype, None)
    }

    /// Like [`Plan::new`], for rank `shard` of a tensor-parallel world (`None`: every tensor
    /// whole).
    pub fn new_sharded(
        ckpt: &Checkpoint,
        select: &dyn Fn(&str) -> bool,
        dtype: &dyn Fn(&str, Dtype) -> Dtype,
        shard: Option<&Shard>,
    ) -> Result<Plan> {
        Self::build(ckpt, select, dtype, shard, &mut |f, t| {
            let t = &ckpt.files[f].header.tensors[t];
            (t.name.clone(), t.shape.clone())
        })
    }

    /// Like [`Plan::new`], but the selected tensors' names and shapes are moved out of `ckpt`
    /// (left empty there) instead of copied: a load that owns its checkpoint keeps one copy of
    /// them, whatever the header declares.
    pub fn new_taking(
        ckpt: &mut Checkpoint,
        select: &dyn Fn(&str) -> bool,
        dtype: &dyn Fn(&str, Dtype) -> Dtype,
        shard: Option<&Shard>,
    ) -> Result<Plan> {
        let mut plan = Self::build(ckpt, select, dtype, shard, &mut |_, _| (String::new(), Vec::new()))?;
        // The same walk as `build`'s, so the k-th selected tensor is the plan's k-th.
        let mut planned = plan.tensors.iter_mut();
        for f in &mut ckpt.files {
            for t in f.header.tensors.iter_mut().filter(|t| select(&t.name)) {
                if let Some(pt) = planned.next() {
                    pt.name = std::mem::take(&mut t.name);
                    if pt.shape.is_empty() {
                        pt.shape = std::mem::take(&mut t.shape); // a shard planned its own shape
                    }
                }
            }
        }
        Ok(plan)
    }

    fn build(
        ckpt: &Checkpoint,
        select: &dyn Fn(&str) -> bool,
        dtype: &dyn Fn(&str, Dtype) -> Dtype,
        shard: Option<&Shard>,
        name_and_shape: &mut dyn FnMut(usize, usize) -> (String, Vec<u64>),
    ) -> Result<Plan> {
        // Sized once: growing by doubling would hold 1.5x the records while it copies.
        let mut plan = Plan { tensors: Vec::with_capacity(ckpt.tensor_count()), ..Plan::default() };
        let mut region = 0u64;
        // Slice rules not yet matched by a selected tensor: each must match one.
        let mut unsliced: Vec<&str> = shard.map(|s| s.slice_names().collect()).unwrap_or_default();
        for (source, f) in ckpt.files.iter().enumerate() {
            let file_idx = plan.files.len();
            let mut any = false;
            for (ti, t) in f.header.tensors.iter().enumerate() {
                if !select(&t.name) {
                    continue;
                }
                any = true;
                unsliced.retain(|n| *n != t.name);
                let to = dtype(&t.name, t.dtype);
                let sharded = match shard {
                    Some(s) => s.block(&f.path, &t.name, &t.shape, t.dtype)?,
                    None => None,
                };
                let elements = match &sharded {
                    Some((shape, _)) => shape.iter().product(),
                    None => t.elements(),
                };
                let len = to.bytes_for(elements).ok_or_else(|| Error::UnsupportedConversion {
                    file: f.path.clone(),
                    tensor: t.name.clone(),
                    from: t.dtype.name(),
                    to: to.name(),
                })?;
                let overflow =
                    || Error::ShapeOverflow { file: f.path.clone(), tensor: t.name.clone(), shape: t.shape.clone() };
                let dst_offset = align_up(region, ARENA_ALIGN).ok_or_else(overflow)?;
                region = dst_offset.checked_add(len).ok_or_else(overflow)?;
                let (name, whole_shape) = name_and_shape(source, ti);
                let (shape, block) = match sharded {
                    Some((shape, block)) => (shape, block),
                    None => (whole_shape, StoredBlock::whole(t.byte_len())),
                };
                plan.tensors.push(PlannedTensor {
                    name,
                    file: file_idx,
                    stored_dtype: t.dtype,
                    dtype: to,
                    shape,
                    file_offset: f.header.data_start + t.data_offsets.0,
                    block,
                    stored_len: block.len(),
                    dst_offset,
                    len,
                });
            }
            if any {
                plan.files.push(PlannedFile { path: f.path.clone(), source, file_len: f.header.file_len });
            }
        }
        if let Some(name) = unsliced.first() {
            return Err(Error::BadShard {
                file: ckpt.files.first().map(|f| f.path.clone()).unwrap_or_default(),
                tensor: name.to_string(),
                message: "a slice of a tensor that is not loaded (the checkpoint lacks it, or --only leaves it out)"
                    .into(),
            });
        }
        plan.dst_len = region;
        Ok(plan)
    }

    /// Bytes of tensor data as stored (what a load reads at least).
    pub fn bytes_stored(&self) -> u64 {
        self.tensors.iter().map(|t| t.stored_len).sum()
    }

    /// Bytes of tensor data as loaded (after conversion).
    pub fn bytes_loaded(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Whether any tensor is converted.
    pub fn converts(&self) -> bool {
        self.tensors.iter().any(PlannedTensor::converts)
    }

    /// The plan of tensors `range` alone: their destinations rebased to start at 0 (still
    /// aligned), and only the files they are in.
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, plan::Plan, Checkpoint, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("a", Dtype::F32, vec![3], &[0; 12]),
    ///                  WriteTensor::new("b", Dtype::F32, vec![1], &[0; 4])], &Default::default())?;
    /// let plan = Plan::new(&Checkpoint::open(&p)?, &|_| true, &|_, d| d)?;
    /// let part = plan.part(1..2);
    /// assert_eq!((part.tensors[0].name.as_str(), part.tensors[0].dst_offset, part.dst_len), ("b", 0, 4));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn part(&self, range: std::ops::Range<usize>) -> Plan {
        let tensors = &self.tensors[range];
        let base = tensors.first().map_or(0, |t| t.dst_offset);
        let mut files: Vec<PlannedFile> = Vec::new();
        let mut file_of = std::collections::HashMap::new();
        let tensors = tensors
            .iter()
            .map(|t| {
                let file = *file_of.entry(t.file).or_insert_with(|| {
                    files.push(self.files[t.file].clone());
                    files.len() - 1
                });
                PlannedTensor { file, dst_offset: t.dst_offset - base, ..t.clone() }
            })
            .collect::<Vec<_>>();
        let dst_len = tensors.last().map_or(0, |t| t.dst_offset + t.len);
        Plan { files, tensors, dst_len }
    }
}

/// `v` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}
