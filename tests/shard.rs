//! Tensor-parallel shards on the host: every rank of worlds 1 to 8 on Python-written files (the
//! ranks' blocks, put back together along their dimension, are the whole tensor), through every
//! host stage, with conversion; dim-0 shards read only their bytes; errors name the tensor.

mod common;

use common::{file_tensors, pattern, weightstream_bin};

use std::path::{Path, PathBuf};

use weightstream::format::{read_header, write_file, Header, WriteTensor};
use weightstream::io::IoKind;
use weightstream::{Device, Dtype, Error, ErrorKind, Loader};

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).or_else(|_| tempfile::tempdir()).unwrap()
}

/// The blocks of every rank (in rank order) put back together along `dim`: for each index of
/// the dimensions before `dim`, each rank's run in turn.
fn concat_along(blocks: &[Vec<u8>], shape: &[u64], dim: usize, bits: u64) -> Vec<u8> {
    let outer: u64 = shape[..dim].iter().product();
    let world = blocks.len() as u64;
    let run = (shape[dim] / world * shape[dim + 1..].iter().product::<u64>() * bits / 8) as usize;
    let mut out = Vec::new();
    for r in 0..outer as usize {
        for b in blocks {
            out.extend_from_slice(&b[r * run..(r + 1) * run]);
        }
    }
    out
}

/// For each tensor of `h` that `world` can split: the dimension to split (the first or the last
/// that divides, by `last`), as split rules.
fn rules(h: &Header, world: u64, last: bool) -> Vec<(String, usize)> {
    h.tensors
        .iter()
        .filter_map(|t| {
            let bits = t.dtype.bits();
            let ok = |d: &usize| {
                let inner: u64 = t.shape[d + 1..].iter().product();
                t.shape[*d] % world == 0 && (inner * bits) % 8 == 0
            };
            let mut dims = (0..t.shape.len()).filter(ok);
            let d = if last { dims.next_back() } else { dims.next() }?;
            Some((globset::escape(&t.name), d))
        })
        .collect()
}

/// Every rank of `world` loads `path` with `base`; put together, the blocks equal the file.
fn check_every_rank(base: &Loader, path: &Path, world: usize, last: bool) {
    let h = read_header(path).unwrap();
    let whole = file_tensors(path);
    let rules = rules(&h, world as u64, last);
    let models: Vec<_> = (0..world)
        .map(|rank| {
            let l = rules.iter().fold(base.clone().shard(rank, world), |l, (g, d)| l.split(g.clone(), *d));
            l.load(path).unwrap_or_else(|e| panic!("{}: rank {rank}/{world}: {e}", path.display()))
        })
        .collect();
    for (t, (name, bytes)) in h.tensors.iter().zip(&whole) {
        let dim = rules.iter().find(|(g, _)| globset::escape(name) == *g).map(|(_, d)| *d);
        let blocks: Vec<Vec<u8>> = models.iter().map(|m| m.tensor(name).unwrap().to_host_vec().unwrap()).collect();
        match dim {
            None => {
                for b in &blocks {
                    assert_eq!(b, bytes, "{name}: unsplit tensors load whole on every rank");
                }
            }
            Some(d) => {
                let mut want_shape = t.shape.clone();
                want_shape[d] /= world as u64;
                for m in &models {
                    assert_eq!(m.tensor(name).unwrap().shape(), &want_shape[..], "{name}");
                }
                let got = concat_along(&blocks, &t.shape, d, t.dtype.bits());
                assert!(got == *bytes, "{}: {name} split along {d} over {world}", path.display());
            }
        }
    }
}

#[test]
fn every_rank_of_worlds_1_to_8_puts_python_written_tensors_back_together() {
    let Some(dir) = common::python_data_dir() else { return };
    let manifest = common::manifest(&dir);
    let files: Vec<PathBuf> =
        manifest["files"].as_object().unwrap().keys().map(|rel| dir.join(rel)).filter(|p| p.is_file()).collect();
    assert!(files.len() >= 20);
    let base = Loader::new().device(Device::Cpu);
    for path in &files {
        if read_header(path).is_err() {
            continue; // files written to be refused
        }
        for world in 1..=8 {
            check_every_rank(&base, path, world, false);
            check_every_rank(&base, path, world, true);
        }
    }
}

/// A file of our own with shapes that split many ways and a tensor larger than small rings.
fn write_matrices(dir: &Path) -> PathBuf {
    let specs: Vec<(&str, Dtype, Vec<u64>)> = vec![
        ("emb", Dtype::BF16, vec![48, 40]),
        ("big", Dtype::F32, vec![24, 3, 1000]),
        ("bias", Dtype::F16, vec![120]),
        ("norm", Dtype::F32, vec![7]),
        ("bytes", Dtype::U8, vec![8, 6, 5]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| {
            let n = s.iter().product::<u64>();
            match d {
                // Finite floats, so that conversion round trips are well defined.
                Dtype::F32 => (0..n).flat_map(|k| ((k % 1000) as f32 * 0.5 - 7.0).to_le_bytes()).collect(),
                _ => pattern(i as u64 + 5, d.bytes_for(n).unwrap() as usize),
            }
        })
        .collect();
    let ws: Vec<_> = specs.iter().zip(&data).map(|((n, d, s), b)| WriteTensor::new(*n, *d, s.clone(), b)).collect();
    let path = dir.join("matrices.safetensors");
    write_file(&path, &ws, &Default::default()).unwrap();
    path
}

#[test]
fn every_host_stage_shards_the_same_way() {
    let dir = tmpdir();
    let path = write_matrices(dir.path());
    let small = Loader::new().staging_count(2).staging_size(64 << 10).read_size(8192);
    let mut stages = vec![small.clone().device(Device::Cpu), small.clone().device(Device::Cpu).direct(true)];
    if weightstream::io::open_engine(
        &weightstream::io::EngineOptions { kind: IoKind::Uring, ..Default::default() },
        false,
    )
    .is_ok()
    {
        stages.push(small.clone().device(Device::Cpu).io(IoKind::Uring));
    }
    for base in &stages {
        for world in [2, 3, 4, 8] {
            check_every_rank(base, &path, world, false);
            check_every_rank(base, &path, world, true);
        }
    }
}

#[test]
fn conversion_composes_with_shards() {
    let dir = tmpdir();
    let path = write_matrices(dir.path());
    for to in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        for io in [IoKind::Pread, IoKind::Uring] {
            let base = Loader::new().device(Device::Cpu).dtype(to).io(io).staging_count(2).staging_size(64 << 10);
            let Ok(whole) = base.load(&path) else {
                println!("SKIPPED {io:?}: the engine cannot start here");
                continue;
            };
            for world in [2, 4] {
                for (name, dim) in [("emb", 1), ("big", 2), ("big", 0), ("bias", 0)] {
                    let blocks: Vec<Vec<u8>> = (0..world)
                        .map(|rank| {
                            let m = base.clone().shard(rank, world).split(name, dim).load(&path).unwrap();
                            m.tensor(name).unwrap().to_host_vec().unwrap()
                        })
                        .collect();
                    let t = whole.tensor(name).unwrap();
                    let got = concat_along(&blocks, t.shape(), dim, t.dtype().bits());
                    assert!(got == t.to_host_vec().unwrap(), "{name} along {dim} over {world} as {to} ({io:?})");
                }
            }
        }
    }
}

#[test]
fn a_dim_0_shard_reads_only_its_own_bytes() {
    let dir = tmpdir();
    let path = dir.path().join("one.safetensors");
    let data = pattern(9, 8 << 20);
    write_file(&path, &[WriteTensor::new("w", Dtype::U8, vec![1024, 8192], &data)], &Default::default()).unwrap();
    for device in [Device::Cpu, Device::Null] {
        for world in [1, 2, 4, 8] {
            let m = Loader::new().device(device).shard(world - 1, world).split("w", 0).load(&path).unwrap();
            assert_eq!(m.stats().bytes_read, data.len() as u64 / world as u64, "{device} {world}");
        }
    }
}

#[test]
fn shards_that_cannot_be_cut_are_errors_naming_the_tensor() {
    let dir = tmpdir();
    let path = write_matrices(dir.path());
    let err = Loader::new().device(Device::Cpu).shard(0, 2).split("norm", 0).load(&path).unwrap_err();
    assert!(matches!(&err, Error::BadShard { tensor, file, .. } if tensor == "norm" && file == &path), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("`norm`") && err.to_string().contains("divide"), "{err}");
    let err = Loader::new().device(Device::Cpu).shard(0, 2).split("bias", 3).load(&path).unwrap_err();
    assert!(matches!(&err, Error::BadShard { tensor, .. } if tensor == "bias"), "{err:?}");
    for l in [Loader::new().shard(2, 2), Loader::new().shard(0, 0), Loader::new().split("*", 0)] {
        assert_eq!(l.device(Device::Cpu).load(&path).unwrap_err().kind(), ErrorKind::Usage);
    }
}

#[test]
fn cli_reports_the_shards_shape_checksum_and_bytes_read() {
    let dir = tmpdir();
    let path = write_matrices(dir.path());
    let out = std::process::Command::new(weightstream_bin())
        .args(["load", "--device", "cpu", "--json", "--checksum", "--quiet", "--shard", "1/2"])
        .args(["--split", "emb=1", "--split", "b*=0"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = |n: &str| j["tensors"].as_array().unwrap().iter().find(|t| t["name"] == n).unwrap().clone();
    assert_eq!(by_name("emb")["shape"], serde_json::json!([48, 20]));
    assert_eq!(by_name("big")["shape"], serde_json::json!([12, 3, 1000]));
    assert_eq!(by_name("norm")["shape"], serde_json::json!([7]));
    let m = Loader::new().device(Device::Cpu).shard(1, 2).split("emb", 1).split("b*", 0).load(&path).unwrap();
    for t in m.tensors() {
        assert_eq!(by_name(t.name())["sha256"], common::sha256_hex(&t.to_host_vec().unwrap()), "{}", t.name());
    }
    // Read: half of emb's bytes (a strided block) at least, half of big, bias and bytes, all of norm.
    let read = j["bytes_read"].as_u64().unwrap();
    let h = read_header(&path).unwrap();
    let size = |n: &str| h.tensors.iter().find(|t| t.name == n).unwrap().byte_len();
    let want = (size("emb") + size("big") + size("bias") + size("bytes")) / 2 + size("norm");
    assert_eq!(read, want);
    // Bad arguments are usage errors (exit 2).
    for bad in [["--shard", "2/2"], ["--split", "emb"]] {
        let out = std::process::Command::new(weightstream_bin())
            .args(["load", "--device", "cpu"])
            .args(bad)
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

/// Entries `start..end` of dimension `dim` of a tensor of `shape` (`bits` per element), cut from
/// its whole bytes.
fn cut_along(whole: &[u8], shape: &[u64], dim: usize, bits: u64, (start, end): (u64, u64)) -> Vec<u8> {
    let outer: u64 = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product::<u64>() * bits / 8;
    let n = shape[dim];
    (0..outer)
        .flat_map(|o| {
            let row = ((o * n + start) * inner) as usize..((o * n + end) * inner) as usize;
            whole[row].to_vec()
        })
        .collect()
}

#[test]
fn a_slice_loads_exactly_the_block_asked_for() {
    let dir = tmpdir();
    let path = write_matrices(dir.path());
    for base in [Loader::new(), Loader::new().direct(true).staging_size(64 << 10)] {
        let whole = Loader::new().device(Device::Cpu).load(&path).unwrap();
        for (name, dim, start, end) in [
            ("emb", 0, 0, 48),
            ("emb", 0, 5, 6),
            ("emb", 1, 3, 40),
            ("big", 2, 999, 1000),
            ("big", 1, 1, 2),
            ("bias", 0, 7, 7),
            ("bytes", 2, 1, 4),
        ] {
            // Slices and shard rules together: the slice wins for its tensor, the rules apply to the others.
            let l = base.clone().shard(1, 2).split("*", 0).slice(name, dim, start..end).only(name).only("bias");
            let m = l.device(Device::Cpu).load(&path).unwrap_or_else(|e| panic!("{name} {dim} {start}..{end}: {e}"));
            let t = whole.tensor(name).unwrap();
            let mut shape = t.shape().to_vec();
            shape[dim] = end - start;
            let got = m.tensor(name).unwrap();
            assert_eq!(got.shape(), shape.as_slice());
            let want = cut_along(&t.to_host_vec().unwrap(), t.shape(), dim, t.dtype().bits(), (start, end));
            assert!(got.to_host_vec().unwrap() == want, "{name} dim {dim} {start}..{end}");
        }
    }
    // A dim-0 slice reads only its own bytes; a range outside the dimension names the tensor.
    let m = Loader::new().device(Device::Cpu).slice("emb", 0, 10..20).only("emb").load(&path).unwrap();
    assert_eq!(m.stats().bytes_read, 10 * 40 * 2);
    for (dim, range) in [(0, 40..49), (1, std::ops::Range { start: 5, end: 3 }), (2, 0..1)] {
        let err = Loader::new().device(Device::Cpu).slice("emb", dim, range).load(&path).unwrap_err();
        assert!(matches!(&err, Error::BadShard { tensor, .. } if tensor == "emb"), "{err:?}");
    }
}
