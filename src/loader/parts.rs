//! Loading parts of tensors: tensor-parallel shards ([`Loader::shard`], [`Loader::split`]) and
//! explicit blocks ([`Loader::slice`]), all planned as one [`Shard`].

use super::Loader;
use crate::error::{Error, Result};
use crate::plan::Shard;
use crate::sink::Device;

impl Loader {
    /// Load rank `rank`'s share of a tensor-parallel world of `world` ranks: each tensor that a
    /// [`Loader::split`] rule names loads only the block `[rank * n / world, (rank + 1) * n /
    /// world)` of that rule's dimension (a dim-0 block reads only its own bytes); the others
    /// load whole. A dimension that does not divide by `world` is an error naming the tensor.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
    /// let w: Vec<u8> = (0..12).collect(); // a 3 x 4 u8 matrix
    /// write_file(&p, &[WriteTensor::new("w", Dtype::U8, vec![3, 4], &w)], &Default::default())?;
    /// let m = Loader::new().device(Device::Cpu).shard(1, 2).split("w", 1).load(&p)?;
    /// let t = m.tensor("w").ok_or("missing")?;
    /// assert_eq!(t.shape(), &[3, 2]);
    /// assert_eq!(t.to_host_vec()?, [2, 3, 6, 7, 10, 11]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn shard(mut self, rank: usize, world: usize) -> Self {
        self.shard = Some((rank, world));
        self
    }

    /// Split tensors whose name matches `glob` along `dim` under [`Loader::shard`] (repeatable;
    /// the first matching rule wins).
    pub fn split(mut self, glob: impl Into<String>, dim: usize) -> Self {
        self.splits.push((glob.into(), dim));
        self
    }

    /// Load only entries `range` of dimension `dim` of the tensor named exactly `name`
    /// (repeatable, one rule a tensor; it takes precedence over [`Loader::split`] rules). A dim-0
    /// slice reads only its own bytes; a range outside the dimension is [`Error::BadShard`]
    /// naming the tensor. This is what a Python `get_slice(name)[a:b]` loads.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
    /// let w: Vec<u8> = (0..12).collect(); // a 3 x 4 u8 matrix
    /// write_file(&p, &[WriteTensor::new("w", Dtype::U8, vec![3, 4], &w)], &Default::default())?;
    /// let m = Loader::new().device(Device::Cpu).slice("w", 1, 1..4).load(&p)?;
    /// let t = m.tensor("w").ok_or("missing")?;
    /// assert_eq!(t.shape(), &[3, 3]);
    /// assert_eq!(t.to_host_vec()?, [1, 2, 3, 5, 6, 7, 9, 10, 11]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn slice(mut self, name: impl Into<String>, dim: usize, range: std::ops::Range<u64>) -> Self {
        self.slices.push((name.into(), dim, range));
        self
    }

    /// The device, the tensor filter and the shard of a load, once its options are checked.
    pub(super) fn prepare(&self) -> Result<(Device, Option<globset::GlobSet>, Option<Shard>)> {
        let device = self.resolved_device();
        self.check_options(device)?;
        let twice =
            self.slices.iter().enumerate().find(|(i, (n, _, _))| self.slices[..*i].iter().any(|(m, _, _)| m == n));
        if let Some((_, (name, _, _))) = twice {
            return Err(Error::usage(format!(
                "two slices of `{}`: one slice a tensor (index the loaded block for other dimensions)",
                crate::text::for_display(name)
            )));
        }
        if self.shard.is_none() && !self.splits.is_empty() {
            return Err(Error::usage("--split needs --shard RANK/WORLD"));
        }
        let shard = match (self.shard, self.slices.is_empty()) {
            (None, true) => None,
            (rank_world, _) => {
                let (rank, world) = rank_world.unwrap_or((0, 1));
                let sliced =
                    self.slices.iter().fold(Shard::new(rank, world)?, |s, (n, d, r)| s.slice(n, *d, r.clone()));
                Some(self.splits.iter().try_fold(sliced, |s, (g, d)| s.split(g, *d))?)
            }
        };
        Ok((device, build_filter(&self.only)?, shard))
    }
}

/// The `--only` globs as one set (`None`: every tensor).
fn build_filter(only: &[String]) -> Result<Option<globset::GlobSet>> {
    if only.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in only {
        b.add(globset::Glob::new(g).map_err(|e| Error::usage(format!("--only `{g}`: {e}")))?);
    }
    b.build().map(Some).map_err(|e| Error::usage(format!("--only: {e}")))
}
