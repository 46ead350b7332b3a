//! A group's share of a load: the ranks of a group that all load one checkpoint read each byte
//! of it once, balanced by bytes, window by window, and hand what they read to the ranks that
//! need it (through `torch.distributed` in the Python layer: this module only plans).
//!
//! Each rank plans its own load as usual (its shard, if any); the ranks that load a tensor with
//! the same block share one *key*. A key every rank needs is *shared*: a window lays its shared
//! keys out in one buffer, at the arena's alignment, and cuts their stored bytes into one
//! contiguous chunk per rank, which that rank reads into its buffer and broadcasts. A key that
//! only some ranks need (a shard's block) is read whole by the least-loaded of them and sent to
//! the others: to nobody when one rank alone needs it. Every rank computes the same plan from
//! the same inputs, so no plan travels.

use std::ops::Range;

use super::{align_up, Plan, PlannedFile, PlannedTensor, StoredBlock, ARENA_ALIGN};
use crate::error::{Result, UsageError};

/// The ranks that load the same block of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKey {
    /// Index of the tensor in every rank's plan (the plans select the same tensors).
    pub tensor: usize,
    /// The group ranks that load this block, ascending.
    pub needers: Vec<usize>,
    /// The rank that reads it whole, for a key that not every rank needs; `None` for a shared
    /// key (read in chunks by every rank).
    pub reader: Option<usize>,
}

/// Stored bytes `stored` of key `key` (counted along its block's runs, one after another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRead {
    /// Index into [`GroupPlan::keys`].
    pub key: usize,
    /// The stored bytes of the key's block.
    pub stored: Range<u64>,
}

/// One rank's chunk of a window's shared buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The rank that reads it and broadcasts it.
    pub reader: usize,
    /// Its bytes of the window's buffer (alignment gaps included).
    pub buffer: Range<u64>,
    /// What it reads, in file order.
    pub reads: Vec<PartRead>,
}

/// Consecutive keys whose loaded bytes, on every rank, fit the window (or one key alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareWindow {
    /// The keys, consecutive in [`GroupPlan::keys`].
    pub keys: Range<usize>,
    /// Bytes of the buffer that holds the window's shared keys.
    pub buffer_len: u64,
    /// Per key of the window (`keys.start` first): its offset in the buffer, if shared.
    pub offsets: Vec<Option<u64>>,
    /// The shared buffer's chunks in buffer order, one per rank (some may be empty).
    pub chunks: Vec<Chunk>,
}

/// Who reads what, window by window, for a group of ranks that load the same checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// Every block any rank loads, in plan order.
    pub keys: Vec<ShareKey>,
    /// The windows, in order.
    pub windows: Vec<ShareWindow>,
    /// Stored bytes each rank reads in all.
    pub reads_per_rank: Vec<u64>,
}

impl GroupPlan {
    /// Plan the group's reads from every rank's plan (`plans[r]` is rank `r`'s), with windows
    /// of at most `window` loaded bytes on any rank (a key larger than that is a window alone).
    ///
    /// ```
    /// use weightstream::{format::{write_file, WriteTensor}, plan::{GroupPlan, Plan}, Checkpoint, Dtype};
    /// let dir = tempfile::tempdir()?;
    /// let p = dir.path().join("m.safetensors");
    /// write_file(&p, &[WriteTensor::new("a", Dtype::F32, vec![1000], &[0; 4000]),
    ///                  WriteTensor::new("b", Dtype::F32, vec![24], &[0; 96])], &Default::default())?;
    /// let plan = Plan::new(&Checkpoint::open(&p)?, &|_| true, &|_, d| d)?;
    /// let group = GroupPlan::new(&[plan.clone(), plan.clone()], 1 << 20)?;
    /// assert_eq!(group.windows.len(), 1);
    /// assert_eq!(group.reads_per_rank, [2048, 2048]); // 4096 bytes, half each
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(plans: &[Plan], window: u64) -> Result<GroupPlan> {
        let world = plans.len();
        let first = plans.first().ok_or_else(|| bad("a group of no rank".into()))?;
        for (r, p) in plans.iter().enumerate() {
            if p.tensors.len() != first.tensors.len()
                || p.tensors.iter().zip(&first.tensors).any(|(a, b)| a.name != b.name || a.dtype != b.dtype)
            {
                return Err(bad(format!("rank {r} selects other tensors or dtypes than rank 0")));
            }
        }
        let keys = keys_of(plans);
        let mut planner = Planner { plans, keys, world, loads: vec![0; world], windows: Vec::new() };
        let mut start = 0;
        let mut held = vec![0u64; world];
        for k in 0..planner.keys.len() {
            let len = planner.tensor(&planner.keys[k]).len;
            let needers = planner.keys[k].needers.clone();
            if k > start && needers.iter().any(|&r| held[r].saturating_add(len) > window) {
                planner.close(start..k);
                start = k;
                held.fill(0);
            }
            for &r in &needers {
                // Shared keys sit aligned in the buffer: count the padding too.
                held[r] = align_up(held[r], ARENA_ALIGN).unwrap_or(u64::MAX).saturating_add(len);
            }
        }
        if start < planner.keys.len() {
            planner.close(start..planner.keys.len());
        }
        let Planner { keys, loads, windows, .. } = planner;
        Ok(GroupPlan { keys, windows, reads_per_rank: loads })
    }

    /// What rank `rank` reads in window `w`: its chunk's parts, then the whole keys it reads
    /// for others (or itself alone), in file order within each.
    ///
    /// # Panics
    /// If `w` is not an index of [`GroupPlan::windows`].
    pub fn reads_of(&self, w: usize, rank: usize) -> Vec<PartRead> {
        let window = &self.windows[w];
        let mut out: Vec<PartRead> =
            window.chunks.iter().filter(|c| c.reader == rank).flat_map(|c| c.reads.iter().cloned()).collect();
        out.extend(self.keys[window.keys.clone()].iter().enumerate().filter_map(|(i, k)| {
            let key = window.keys.start + i;
            (k.reader == Some(rank)).then_some(PartRead { key, stored: 0..u64::MAX })
        }));
        out
    }
}

fn bad(why: String) -> crate::error::Error {
    UsageError::Conflict { a: "group", b: "plan", why }.into()
}

/// The keys of the plans: per tensor, one per distinct block, in order of their first rank.
fn keys_of(plans: &[Plan]) -> Vec<ShareKey> {
    let world = plans.len();
    let mut keys = Vec::new();
    for t in 0..plans[0].tensors.len() {
        let mut mine: Vec<ShareKey> = Vec::new();
        for (r, p) in plans.iter().enumerate() {
            let (b, s) = (&p.tensors[t].block, &p.tensors[t].shape);
            match mine
                .iter_mut()
                .find(|k| plans[k.needers[0]].tensors[t].block == *b && &plans[k.needers[0]].tensors[t].shape == s)
            {
                Some(k) => k.needers.push(r),
                None => mine.push(ShareKey { tensor: t, needers: vec![r], reader: Some(r) }),
            }
        }
        for k in &mut mine {
            if k.needers.len() == world {
                k.reader = None;
            }
        }
        keys.extend(mine);
    }
    keys
}

struct Planner<'a> {
    plans: &'a [Plan],
    /// Whole keys get their reader when their window closes.
    keys: Vec<ShareKey>,
    world: usize,
    /// Stored bytes each rank reads so far.
    loads: Vec<u64>,
    windows: Vec<ShareWindow>,
}

impl Planner<'_> {
    /// The planned tensor of a key, as its first needer loads it (all its needers load the same).
    fn tensor(&self, key: &ShareKey) -> &PlannedTensor {
        &self.plans[key.needers[0]].tensors[key.tensor]
    }

    fn close(&mut self, keys: Range<usize>) {
        // The shared keys, laid out in the buffer.
        let mut offsets = Vec::with_capacity(keys.len());
        let mut end = 0u64;
        let mut shared: Vec<(usize, u64, u64)> = Vec::new(); // (key, stored start in the window, offset)
        let mut stored_total = 0u64;
        for k in keys.clone() {
            let key = &self.keys[k];
            if key.reader.is_some() {
                offsets.push(None);
                continue;
            }
            let t = self.tensor(key);
            let at = align_up(end, ARENA_ALIGN).unwrap_or(end);
            offsets.push(Some(at));
            end = at + t.len;
            shared.push((k, stored_total, at));
            stored_total += t.stored_len;
        }
        // Chunk boundaries: the stored bytes cut in `world` near-equal runs, each cut moved
        // back to a whole element (a whole row of a strided block).
        let mut cuts = Vec::with_capacity(self.world + 1);
        cuts.push(0u64);
        for i in 1..self.world {
            let target = (u128::from(stored_total) * i as u128 / self.world as u128) as u64;
            let cut = match shared.iter().rev().find(|(_, s, _)| *s <= target) {
                Some(&(k, s, _)) => {
                    let g = granule(self.tensor(&self.keys[k]));
                    s + (target - s) / g * g
                }
                None => 0,
            };
            cuts.push(cut.max(*cuts.last().unwrap_or(&0)));
        }
        cuts.push(stored_total);
        let buffer_at = |p: u64| -> u64 {
            if p >= stored_total {
                return end;
            }
            // The key holding stored byte p (a zero-length key holds none).
            let Some(&(k, s, off)) =
                shared.iter().rev().find(|(k, s, _)| *s <= p && self.tensor(&self.keys[*k]).stored_len > 0)
            else {
                return 0;
            };
            let t = self.tensor(&self.keys[k]);
            off + (t.dst_range(p - s, 0).start - t.dst_offset)
        };
        // Chunks go to the ranks in turn, the least-loaded first.
        let mut order: Vec<usize> = (0..self.world).collect();
        order.sort_by_key(|&r| (self.loads[r], r));
        let mut chunks = Vec::with_capacity(self.world);
        for i in 0..self.world {
            let (a, b) = (cuts[i], cuts[i + 1]);
            let mut reads = Vec::new();
            for &(k, s, _) in &shared {
                let len = self.tensor(&self.keys[k]).stored_len;
                let (lo, hi) = (a.max(s), b.min(s + len));
                if lo < hi {
                    reads.push(PartRead { key: k, stored: lo - s..hi - s });
                }
            }
            // Chunks are near-equal: the largest goes to the least-loaded rank.
            chunks.push((b - a, Chunk { reader: 0, buffer: buffer_at(a)..buffer_at(b), reads }));
        }
        let mut by_size: Vec<usize> = (0..self.world).collect();
        by_size.sort_by_key(|&i| (std::cmp::Reverse(chunks[i].0), i));
        for (rank, &i) in order.iter().zip(&by_size) {
            chunks[i].1.reader = *rank;
            self.loads[*rank] += chunks[i].0;
        }
        // Keys not every rank needs: read whole by the least-loaded of their ranks.
        for k in keys.clone() {
            if self.keys[k].reader.is_some() {
                let len = self.tensor(&self.keys[k]).stored_len;
                let needers = &self.keys[k].needers;
                let r = needers.iter().copied().min_by_key(|&r| (self.loads[r], r)).unwrap_or(needers[0]);
                self.loads[r] += len;
                self.keys[k].reader = Some(r);
            }
        }
        let chunks = chunks.into_iter().map(|(_, c)| c).collect();
        self.windows.push(ShareWindow { keys, buffer_len: end, offsets, chunks });
    }
}

/// The smallest run of stored bytes a part of `t` may start or end at: a whole element (a
/// whole byte of sub-byte dtypes: `lcm(bits, 8) / 8` bytes), a whole row of a strided block.
fn granule(t: &PlannedTensor) -> u64 {
    if t.block.rows > 1 {
        return t.block.row_len.max(1);
    }
    let bits = t.stored_dtype.bits();
    let g = bits * 8 / gcd(bits, 8) / 8;
    g.max(1)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The plan of the parts `reads` of `plan`'s tensors (`tensor` index, stored range): each a
/// tensor of its own, its block narrowed to the range, its loaded bytes at aligned offsets.
/// A range past a tensor's end stops at it (`0..u64::MAX`: the whole block).
pub fn parts_plan(plan: &Plan, reads: &[(usize, Range<u64>)]) -> Plan {
    let mut files: Vec<PlannedFile> = Vec::new();
    let mut file_of = std::collections::HashMap::new();
    let mut tensors = Vec::with_capacity(reads.len());
    let mut end = 0u64;
    for (t, stored) in reads {
        let t = &plan.tensors[*t];
        let (a, b) = (stored.start.min(t.stored_len), stored.end.min(t.stored_len));
        let file = *file_of.entry(t.file).or_insert_with(|| {
            files.push(plan.files[t.file].clone());
            files.len() - 1
        });
        let loaded = t.dst_range(a, b - a);
        let dst_offset = align_up(end, ARENA_ALIGN).unwrap_or(end);
        end = dst_offset + (loaded.end - loaded.start);
        tensors.push(PlannedTensor {
            file,
            block: narrowed(&t.block, a..b),
            stored_len: b - a,
            dst_offset,
            len: loaded.end - loaded.start,
            ..t.clone()
        });
    }
    Plan { files, tensors, dst_len: end }
}

/// Stored bytes `r` of `block` (whole rows of a strided one) as a block of their own.
fn narrowed(block: &StoredBlock, r: Range<u64>) -> StoredBlock {
    let len = r.end - r.start;
    if block.rows <= 1 {
        return StoredBlock { rows: 1, row_stride: len, row_offset: block.row_offset + r.start, row_len: len };
    }
    let row = block.row_len.max(1);
    StoredBlock {
        rows: len / row,
        row_stride: block.row_stride,
        row_offset: block.row_offset + r.start / row * block.row_stride,
        row_len: block.row_len,
    }
}
