//! A rank's share of a group's load ([`Loader::plan_group`]): the group's plan
//! ([`GroupPlan`]) and this rank's reads, window by window, into places its caller gives (the
//! Python layer's window buffers and tensors; it moves the bytes between the ranks).

use std::time::Instant;

use super::describe::TensorInfo;
use super::into::Destination;
use super::Loader;
use crate::error::{Error, Result, UsageError};
use crate::plan::{parts_plan, GroupPlan, Plan, PlannedTensor};
use crate::sink::Device;
use crate::source::Checkpoint;

/// Where a part that this rank reads lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartPlace {
    /// In the window's shared buffer, at this offset.
    Buffer(u64),
    /// In the key's own tensor, at this offset of its loaded bytes.
    Key(u64),
}

/// One part that this rank reads in a window: of key `key`, `len` loaded bytes, landing at
/// `place`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankRead {
    /// Index into [`GroupPlan::keys`].
    pub key: usize,
    /// Where it lands.
    pub place: PartPlace,
    /// Its loaded bytes.
    pub len: u64,
}

/// Rank `rank`'s share of a group's load of one checkpoint: made by [`Loader::plan_group`],
/// read window by window with [`GroupLoad::read`].
#[derive(Debug)]
pub struct GroupLoad {
    loader: Loader,
    ckpt: Checkpoint,
    plans: Vec<Plan>,
    group: GroupPlan,
    rank: usize,
    device: Device,
}

impl Loader {
    /// Plan group rank `rank`'s share of the load of `ckpt` by `shards.len()` ranks, group rank
    /// `r` loading shard `shards[r]` (`(rank, world)` under this loader's split rules, or every
    /// tensor whole); this loader's `only` and `dtype` apply to every rank. Windows hold at
    /// most `window` loaded bytes on any rank. Every rank of the group calls it with the same
    /// arguments but `rank`, and gets the same plan.
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, Checkpoint, Destination, Device, Dtype, Loader};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("w", Dtype::U8, vec![8], &[1, 2, 3, 4, 5, 6, 7, 8])], &Default::default())?;
    /// let loader = Loader::new().device(Device::Cpu);
    /// // Rank 1 of 2: it reads the second half of `w` into its window buffer.
    /// let share = loader.plan_group(Checkpoint::open(&p)?, &[None, None], 1, 1 << 20)?;
    /// let reads = share.reads(0);
    /// let mut buffer = vec![0u8; share.plan().windows[0].buffer_len as usize];
    /// let (a, b) = (4, 8);
    /// assert_eq!(reads.len(), 1);
    /// assert_eq!(share.read(0, vec![Destination::Host(&mut buffer[a..b])])?, 4);
    /// assert_eq!(buffer, [0, 0, 0, 0, 5, 6, 7, 8]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn plan_group(
        &self,
        ckpt: Checkpoint,
        shards: &[Option<(usize, usize)>],
        rank: usize,
        window: u64,
    ) -> Result<GroupLoad> {
        if rank >= shards.len() {
            return Err(UsageError::BadShardSpec { rank, world: shards.len() }.into());
        }
        let mut device = self.resolved_device();
        let mut plans = Vec::with_capacity(shards.len());
        for shard in shards {
            let mut l = self.clone();
            l.shard = *shard;
            let (d, only, shard) = l.prepare()?;
            device = d;
            let select = |n: &str| only.as_ref().is_none_or(|g| g.is_match(n));
            let plan = Plan::new_sharded(&ckpt, &select, &|n, d| self.out_dtype(n, d), shard.as_ref())?;
            super::check_conversions(&plan)?;
            plans.push(plan);
        }
        if self.zero_copy {
            return Err(UsageError::Unsupported {
                option: "zero_copy",
                by: "a group load".into(),
                why: "its windows read through the gaps between the parts, which are other ranks' shares".into(),
            }
            .into());
        }
        let group = GroupPlan::new(&plans, window)?;
        let mut loader = self.clone();
        loader.exact_reads = true;
        Ok(GroupLoad { loader, ckpt, plans, group, rank, device })
    }
}

impl GroupLoad {
    /// The device this rank's reads fill.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The group's plan.
    pub fn plan(&self) -> &GroupPlan {
        &self.group
    }

    /// The tensor of key `key` as its ranks load it (`byte_len`: its loaded bytes).
    ///
    /// # Panics
    /// If `key` is not an index of [`GroupPlan::keys`].
    pub fn key_info(&self, key: usize) -> TensorInfo {
        let t = self.key_tensor(key);
        TensorInfo {
            name: t.name.clone(),
            dtype: t.dtype,
            stored_dtype: t.stored_dtype,
            shape: t.shape.clone(),
            byte_len: t.len,
        }
    }

    fn key_tensor(&self, key: usize) -> &PlannedTensor {
        let k = &self.group.keys[key];
        // Every key has a rank that needs it (it was made for one), and all its ranks plan it alike.
        &self.plans[k.needers[0]].tensors[k.tensor]
    }

    /// What this rank reads in window `w`, in the order [`GroupLoad::read`] takes its places.
    ///
    /// # Panics
    /// If `w` is not an index of [`GroupPlan::windows`] (as [`GroupLoad::read`]).
    pub fn reads(&self, w: usize) -> Vec<RankRead> {
        let window = &self.group.windows[w];
        self.group
            .reads_of(w, self.rank)
            .into_iter()
            .map(|p| {
                let t = self.key_tensor(p.key);
                let stored = p.stored.start.min(t.stored_len)..p.stored.end.min(t.stored_len);
                let loaded = t.dst_range(stored.start, stored.end - stored.start);
                let within = loaded.start - t.dst_offset;
                let place = match window.offsets[p.key - window.keys.start] {
                    Some(at) => PartPlace::Buffer(at + within),
                    None => PartPlace::Key(within),
                };
                RankRead { key: p.key, place, len: loaded.end - loaded.start }
            })
            .collect()
    }

    /// Read this rank's parts of window `w` into `places`, one per [`GroupLoad::reads`] entry
    /// in its order, each exactly its loaded length on the loader's device. Returns the stored
    /// bytes read.
    pub fn read(&self, w: usize, places: Vec<Destination<'_>>) -> Result<u64> {
        let started = Instant::now();
        let parts: Vec<_> =
            self.group.reads_of(w, self.rank).into_iter().map(|p| (self.group.keys[p.key].tensor, p.stored)).collect();
        if parts.is_empty() {
            return Ok(0);
        }
        let plan = parts_plan(&self.plans[self.rank], &parts);
        let first = self.ckpt.files.first().map(|f| f.path.clone()).unwrap_or_default();
        let bad = |tensor: &str, message: String| Error::BadDestination {
            file: first.clone(),
            tensor: tensor.into(),
            message,
        };
        let stats = self.loader.fill(&self.ckpt, &plan, places, self.device, started, &bad)?;
        Ok(stats.bytes_read)
    }
}
