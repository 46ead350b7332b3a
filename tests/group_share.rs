//! A group's share of a load, the ranks simulated in one process: each rank plans and reads its
//! parts ([`Loader::plan_group`], [`GroupLoad::read`]) into its own window buffers, and the bytes
//! are handed over as `weightstream.distributed` hands them (a chunk to every rank, a whole key
//! to its other needers). Every rank must end with exactly what a load of its own gives, every
//! byte read once, reads balanced within one tensor; on Python-written files (every file the
//! generator writes, a sharded index among them), with conversion and with shards.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use weightstream::format::read_header;
use weightstream::{Checkpoint, Destination, Device, Dtype, Error, GroupLoad, Loader, PartPlace};

/// A rank's tensors in order: name, loaded bytes.
type Tensors = Vec<(String, Vec<u8>)>;

/// What `loader` loads of `path` on its own (its shard, if any): name -> loaded bytes.
fn single(loader: &Loader, path: &Path) -> Tensors {
    let model = loader.load(path).unwrap();
    model.tensors().map(|t| (t.name().to_string(), t.host_bytes().unwrap().to_vec())).collect()
}

/// Run the group's load of `path` for `shards.len()` ranks; returns, per rank, its tensors in
/// order, and the stored bytes each rank read.
fn group_load(
    loader: &Loader,
    path: &Path,
    shards: &[Option<(usize, usize)>],
    window: u64,
) -> (Vec<Tensors>, Vec<u64>) {
    let n = shards.len();
    let ckpt = Checkpoint::open(path).unwrap();
    let ranks: Vec<GroupLoad> = (0..n).map(|r| loader.plan_group(ckpt.clone(), shards, r, window).unwrap()).collect();
    let plan = ranks[0].plan().clone();
    for r in &ranks[1..] {
        assert_eq!(r.plan(), &plan, "every rank plans the same");
    }
    let mut out: Vec<Tensors> = vec![Vec::new(); n];
    let mut read = vec![0u64; n];
    for (w, window_plan) in plan.windows.iter().enumerate() {
        // Each rank's window buffer and own keys, filled by its reads.
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0xAB; window_plan.buffer_len as usize]).collect();
        let mut own: Vec<HashMap<usize, Vec<u8>>> = vec![HashMap::new(); n];
        for (r, share) in ranks.iter().enumerate() {
            for k in window_plan.keys.clone() {
                let key = &plan.keys[k];
                if key.reader.is_some() && key.needers.contains(&r) {
                    own[r].insert(k, vec![0xCD; share.key_info(k).byte_len as usize]);
                }
            }
            let reads = share.reads(w);
            // Places: disjoint slices of the buffer and of the own keys, in the reads' order.
            let mut places: Vec<(usize, Destination<'_>)> = Vec::new();
            let mut buf_rest: &mut [u8] = &mut bufs[r];
            let mut buf_at = 0u64;
            let mut own_slices: HashMap<usize, (&mut [u8], u64)> =
                own[r].iter_mut().map(|(k, v)| (*k, (v.as_mut_slice(), 0u64))).collect();
            let mut order: Vec<usize> = (0..reads.len()).collect();
            order.sort_by_key(|&i| match reads[i].place {
                PartPlace::Buffer(at) => (0, 0, at),
                PartPlace::Key(at) => (1, reads[i].key, at),
            });
            for i in order {
                let rd = reads[i];
                let d = match rd.place {
                    PartPlace::Buffer(at) => {
                        let rest = std::mem::take(&mut buf_rest);
                        let (_, tail) = rest.split_at_mut((at - buf_at) as usize);
                        let (mine, after) = tail.split_at_mut(rd.len as usize);
                        buf_rest = after;
                        buf_at = at + rd.len;
                        mine
                    }
                    PartPlace::Key(at) => {
                        let (slice, done) = own_slices.get_mut(&rd.key).unwrap();
                        let rest = std::mem::take(slice);
                        let (_, tail) = rest.split_at_mut((at - *done) as usize);
                        let (mine, after) = tail.split_at_mut(rd.len as usize);
                        *slice = after;
                        *done = at + rd.len;
                        mine
                    }
                };
                places.push((i, Destination::Host(d)));
            }
            places.sort_by_key(|(i, _)| *i);
            read[r] += share.read(w, places.into_iter().map(|(_, d)| d).collect()).unwrap();
        }
        // Each rank wrote only inside its own chunks: the rest of its buffer is as it was made.
        for (r, buf) in bufs.iter().enumerate() {
            let mut untouched = vec![true; buf.len()];
            for c in window_plan.chunks.iter().filter(|c| c.reader == r) {
                untouched[c.buffer.start as usize..c.buffer.end as usize].fill(false);
            }
            let stray = buf.iter().zip(&untouched).position(|(b, &u)| u && *b != 0xAB);
            assert_eq!(stray, None, "window {w}: rank {r} wrote outside its chunks");
        }
        // The hand-over: every chunk from its reader to all; a whole key to its other needers.
        for c in &window_plan.chunks {
            let (a, b) = (c.buffer.start as usize, c.buffer.end as usize);
            let bytes = bufs[c.reader][a..b].to_vec();
            for buf in bufs.iter_mut() {
                buf[a..b].copy_from_slice(&bytes);
            }
        }
        for k in window_plan.keys.clone() {
            let key = &plan.keys[k];
            if let Some(reader) = key.reader {
                let bytes = own[reader][&k].clone();
                for &r in &key.needers {
                    own[r].insert(k, bytes.clone());
                }
            }
        }
        for (r, share) in ranks.iter().enumerate() {
            for k in window_plan.keys.clone() {
                if !plan.keys[k].needers.contains(&r) {
                    continue;
                }
                let info = share.key_info(k);
                let bytes = match window_plan.offsets[k - window_plan.keys.start] {
                    Some(at) => bufs[r][at as usize..(at + info.byte_len) as usize].to_vec(),
                    None => own[r][&k].clone(),
                };
                out[r].push((info.name, bytes));
            }
        }
    }
    (out, read)
}

/// The group's load equals each rank's own, reads each stored byte once, and is balanced.
fn check(loader: &Loader, path: &Path, n: usize, split: &[(&str, usize)], window: u64) {
    let shards: Vec<Option<(usize, usize)>> = (0..n).map(|r| (!split.is_empty()).then_some((r, n))).collect();
    let with = |r: usize| {
        let mut l = loader.clone();
        if !split.is_empty() {
            l = l.shard(r, n);
            for (g, d) in split {
                l = l.split(*g, *d);
            }
        }
        l
    };
    let loaders: Vec<Loader> = (0..n).map(with).collect();
    let (got, read) = group_load(&with(0), path, &shards, window);
    let mut distinct_stored = 0u64;
    let mut largest = 0u64;
    let mut seen: HashMap<(String, Vec<u8>), ()> = HashMap::new();
    for (r, l) in loaders.iter().enumerate() {
        let want = single(l, path);
        assert_eq!(got[r], want, "{}: rank {r} of {n}", path.display());
        for (name, bytes) in want {
            if seen.insert((name, bytes.clone()), ()).is_none() {
                distinct_stored += bytes.len() as u64;
            }
            largest = largest.max(bytes.len() as u64);
        }
    }
    let total: u64 = read.iter().sum();
    if loader.clone().trace(false).describe(path).unwrap().iter().all(|t| t.dtype == t.stored_dtype) {
        assert_eq!(total, distinct_stored, "{}: every byte read once", path.display());
    }
    let (lo, hi) = (*read.iter().min().unwrap(), *read.iter().max().unwrap());
    assert!(hi - lo <= largest.max(1), "{}: reads {read:?} differ by more than one tensor ({largest})", path.display());
}

fn python_files() -> Vec<PathBuf> {
    let Some(dir) = common::python_data_dir() else { return Vec::new() };
    let manifest = common::manifest(&dir);
    let mut files: Vec<PathBuf> = manifest["files"]
        .as_object()
        .unwrap()
        .keys()
        .map(|rel| dir.join(rel))
        .filter(|p| p.is_file() && read_header(p).is_ok())
        .collect();
    files.sort();
    files.push(dir.join("sharded"));
    files
}

#[test]
fn groups_of_1_to_4_ranks_load_python_written_files_as_one_process() {
    let files = python_files();
    if files.is_empty() {
        return;
    }
    let loader = Loader::new().device(Device::Cpu);
    for path in &files {
        for n in 1..=4 {
            // A window of 4 KiB: many windows, tensors split between ranks; and one of 1 MiB.
            check(&loader, path, n, &[], 4096);
            check(&loader, path, n, &[], 1 << 20);
        }
    }
}

#[test]
fn a_converting_group_load_equals_a_converting_load() {
    let files = python_files();
    if files.is_empty() {
        return;
    }
    let loader = Loader::new().device(Device::Cpu).dtype(Dtype::F32);
    for path in files.iter().filter(|p| p.to_string_lossy().contains("mixed") || p.ends_with("sharded")) {
        for n in [2, 3] {
            check(&loader, path, n, &[], 2048);
        }
    }
}

#[test]
fn shards_move_only_what_their_ranks_need() {
    let Some(dir) = common::python_data_dir() else { return };
    let path = dir.join("sharded");
    let loader = Loader::new().device(Device::Cpu);
    let infos = loader.describe(&path).unwrap();
    // Split every tensor whose first dimension divides by 2 along it; the others load whole.
    let names: Vec<String> =
        infos.iter().filter(|t| t.shape.first().is_some_and(|d| d % 2 == 0)).map(|t| t.name.clone()).collect();
    assert!(!names.is_empty());
    let split: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    check(&loader, &path, 2, &split, 4096);
    // A block that one rank alone needs is read by it: no key of a split tensor has a reader
    // other than its one needer, and shared keys are only the unsplit tensors.
    let mut l0 = loader.clone().shard(0, 2);
    for (g, d) in &split {
        l0 = l0.split(*g, *d);
    }
    let share = l0.plan_group(Checkpoint::open(&path).unwrap(), &[Some((0, 2)), Some((1, 2))], 0, 4096).unwrap();
    for (k, key) in share.plan().keys.iter().enumerate() {
        let name = share.key_info(k).name;
        if names.contains(&name) {
            assert_eq!(key.needers.len(), 1, "{name}");
            assert_eq!(key.reader, Some(key.needers[0]), "{name}");
        } else {
            assert_eq!(key.reader, None, "{name}: every rank needs it");
        }
    }
}

#[test]
fn windows_hold_at_most_the_window_unless_one_key_alone_is_larger() {
    let Some(dir) = common::python_data_dir() else { return };
    let path = dir.join("sharded");
    let loader = Loader::new().device(Device::Cpu);
    let window = 2048;
    let share = loader.plan_group(Checkpoint::open(&path).unwrap(), &[None, None, None], 0, window).unwrap();
    for w in &share.plan().windows {
        if w.keys.len() > 1 {
            assert!(w.buffer_len <= window, "{w:?}");
        }
        let chunks: u64 = w.chunks.iter().map(|c| c.buffer.end - c.buffer.start).sum();
        assert_eq!(chunks, w.buffer_len, "the chunks cover the buffer");
    }
}

#[test]
fn a_peers_headers_are_validated_like_a_files() {
    let Some(dir) = common::python_data_dir() else { return };
    let path = dir.join("sharded");
    let (ckpt, shared) = Checkpoint::open_sharing(&path, &Default::default()).unwrap();
    let again = Checkpoint::from_shared(shared.clone(), &Default::default()).unwrap();
    assert_eq!(again.files.len(), ckpt.files.len());
    for (a, b) in again.files.iter().zip(&ckpt.files) {
        assert_eq!(a.header.tensors, b.header.tensors);
        assert_eq!(a.header.data_start, b.header.data_start);
    }
    // A header that does not parse, and one that claims another file length.
    let mut bad = shared.clone();
    bad[0].header = b"{\"x\": 1".to_vec();
    let e = Checkpoint::from_shared(bad, &Default::default()).unwrap_err();
    assert!(e.to_string().contains(&*shared[0].path.to_string_lossy()), "{e}");
    let mut longer = shared.clone();
    longer[0].file_len += 1;
    let e = Checkpoint::from_shared(longer, &Default::default()).unwrap_err();
    assert!(matches!(e, Error::BadSource { .. } | Error::DataLengthMismatch { .. }), "{e:?}");
}

#[test]
fn reads_through_the_ring_skip_the_other_ranks_bytes() {
    // O_DIRECT reads go through the staging ring, whose extents read through gaps between
    // tensors (up to 256 KiB) in a plain load: in a group the gaps are other ranks' shares,
    // columns of a dim-1 block among them, and must stay unread.
    let Some(dir) = common::python_data_dir() else { return };
    let path = dir.join("sharded");
    let loader = Loader::new().device(Device::Cpu).direct(true);
    let infos = loader.describe(&path).unwrap();
    let cols: Vec<String> =
        infos.iter().filter(|t| t.shape.len() == 2 && t.shape[1] % 2 == 0).map(|t| t.name.clone()).collect();
    assert!(!cols.is_empty());
    let split: Vec<(&str, usize)> = cols.iter().map(|n| (n.as_str(), 1)).collect();
    for n in [2, 3] {
        check(&loader, &path, n, &[], 4096);
    }
    check(&loader, &path, 2, &split, 1 << 20);
}
