//! Tensor-parallel shards: which block of a tensor a rank loads.
//!
//! A rank of `world` gets the contiguous block `[rank * n / world, (rank + 1) * n / world)` of
//! dimension `dim` of each tensor that a split rule names (the first matching rule wins); a
//! tensor that matches no rule loads whole on every rank. In the file the block is `rows` runs
//! of bytes (one for a dim-0 split, which reads only its own bytes), which the schedule reads and
//! the sinks place one after another.

use std::path::Path;

use crate::error::{Error, Result, UsageError};
use crate::format::Dtype;

/// The bytes of a tensor that a load reads: `rows` runs of `row_len` bytes, `row_stride` bytes
/// apart, the first `row_offset` bytes after the tensor's start. A whole tensor is one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlock {
    /// Runs of bytes.
    pub rows: u64,
    /// Bytes from one run's start to the next one's.
    pub row_stride: u64,
    /// Where the first run starts, from the tensor's first byte.
    pub row_offset: u64,
    /// Bytes of each run.
    pub row_len: u64,
}

impl StoredBlock {
    /// All `len` bytes of a tensor.
    pub fn whole(len: u64) -> Self {
        StoredBlock { rows: 1, row_stride: len, row_offset: 0, row_len: len }
    }

    /// Bytes read in all.
    pub fn len(&self) -> u64 {
        self.rows * self.row_len
    }

    /// Whether nothing is read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offset from the tensor's start of byte `at` of the block (its runs one after another).
    ///
    /// ```
    /// use weightstream::plan::StoredBlock;
    /// // Columns 2..4 of a 3 x 6 u8 matrix: runs of 2 bytes, 6 apart, from byte 2.
    /// let b = StoredBlock { rows: 3, row_stride: 6, row_offset: 2, row_len: 2 };
    /// assert_eq!((0..6).map(|i| b.tensor_offset(i)).collect::<Vec<_>>(), [2, 3, 8, 9, 14, 15]);
    /// ```
    pub fn tensor_offset(&self, at: u64) -> u64 {
        if self.row_len == 0 {
            return self.row_offset;
        }
        at / self.row_len * self.row_stride + self.row_offset + at % self.row_len
    }
}

/// A rank's share of a checkpoint: `rank` of `world`, with split rules `(glob, dim)`.
///
/// ```
/// use weightstream::plan::Shard;
/// let s = Shard::new(1, 4)?.split("*.q_proj.weight", 0)?.split("*.o_proj.weight", 1)?;
/// assert_eq!(s.dim_for("layers.0.q_proj.weight"), Some(0));
/// assert_eq!(s.dim_for("layers.0.norm.weight"), None);
/// # Ok::<(), weightstream::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Shard {
    rank: usize,
    world: usize,
    splits: Vec<(globset::GlobMatcher, usize)>,
    /// Explicit blocks `(name, dim, start..end)`, tried before the split rules.
    slices: Vec<(String, usize, std::ops::Range<u64>)>,
}

impl Shard {
    /// Rank `rank` of `world` ranks, with no split rule yet (every tensor whole).
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(UsageError::BadShardSpec { rank, world }.into());
        }
        Ok(Shard { rank, world, splits: Vec::new(), slices: Vec::new() })
    }

    /// Load only entries `range` of dimension `dim` of the tensor named exactly `name` (the
    /// primitive under a Python `get_slice`); it takes precedence over the split rules. A range
    /// outside the dimension is [`Error::BadShard`] at planning.
    ///
    /// ```
    /// use weightstream::plan::Shard;
    /// let s = Shard::new(0, 1)?.slice("embed.weight", 0, 128..256);
    /// assert_eq!(s.dim_for("embed.weight"), Some(0));
    /// # Ok::<(), weightstream::Error>(())
    /// ```
    pub fn slice(mut self, name: &str, dim: usize, range: std::ops::Range<u64>) -> Self {
        self.slices.push((name.to_string(), dim, range));
        self
    }

    /// Split tensors whose name matches `glob` along `dim` (rules are tried in order).
    pub fn split(mut self, glob: &str, dim: usize) -> Result<Self> {
        let bad =
            |e: globset::Error| UsageError::BadGlob { option: "split", glob: glob.to_string(), message: e.to_string() };
        let g = globset::Glob::new(glob).map_err(bad)?;
        self.splits.push((g.compile_matcher(), dim));
        Ok(self)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The names of the [`Shard::slice`] rules.
    pub(crate) fn slice_names(&self) -> impl Iterator<Item = &str> {
        self.slices.iter().map(|(n, _, _)| n.as_str())
    }

    /// The dimension the first matching rule splits `name` along (or its slice is taken along),
    /// if any.
    pub fn dim_for(&self, name: &str) -> Option<usize> {
        match self.slices.iter().find(|(n, _, _)| n == name) {
            Some((_, d, _)) => Some(*d),
            None => self.splits.iter().find(|(g, _)| g.is_match(name)).map(|(_, d)| *d),
        }
    }

    /// This rank's shape and stored bytes of tensor `name` (`shape`, `dtype`, `stored_len` bytes
    /// in all); `None` when no rule splits it. `file` names errors.
    pub(crate) fn block(
        &self,
        file: &Path,
        name: &str,
        shape: &[u64],
        dtype: Dtype,
    ) -> Result<Option<(Vec<u64>, StoredBlock)>> {
        let slice = self.slices.iter().find(|(n, _, _)| n == name).map(|(_, d, r)| (*d, r.clone()));
        let Some(dim) = slice.as_ref().map(|(d, _)| *d).or_else(|| self.dim_for(name)) else { return Ok(None) };
        let bad = |message: String| Error::BadShard { file: file.into(), tensor: name.into(), message };
        let Some(&n) = shape.get(dim) else {
            return Err(bad(format!("split along dim {dim}, but the tensor has rank {}", shape.len())));
        };
        let (start, end) = match slice {
            Some((_, r)) if r.start <= r.end && r.end <= n => (r.start, r.end),
            Some((_, r)) => {
                return Err(bad(format!("slice {}..{} of dim {dim}, which has {n} entries", r.start, r.end)))
            }
            None => {
                let world = self.world as u64;
                if n % world != 0 {
                    return Err(bad(format!("dim {dim} has {n} entries, which do not divide by {world} ranks")));
                }
                let k = n / world;
                (self.rank as u64 * k, (self.rank as u64 + 1) * k)
            }
        };
        let k = end - start;
        let mut block_shape = shape.to_vec();
        block_shape[dim] = k;
        // A tensor with a dimension of 0 holds nothing, whatever its other dimensions (whose
        // products need not fit); the whole tensor is its stored bytes.
        if shape.contains(&0) {
            return Ok(Some((block_shape, StoredBlock::whole(0))));
        }
        // Every other product fits: no dimension is 0, so each is a part of the validated size.
        let outer: u64 = shape[..dim].iter().product();
        let inner_bits = shape[dim + 1..].iter().product::<u64>() * dtype.bits();
        if k == n {
            return Ok(Some((block_shape, StoredBlock::whole(outer * n * inner_bits / 8))));
        }
        if inner_bits % 8 != 0 {
            return Err(bad(format!("a block along dim {dim} does not hold whole bytes of {dtype}")));
        }
        let inner = inner_bits / 8;
        // Rows: 1 for dim 0 (one run, only this block's bytes), else one per outer index.
        let block = StoredBlock { rows: outer, row_stride: n * inner, row_offset: start * inner, row_len: k * inner };
        Ok(Some((block_shape, block)))
    }
}
