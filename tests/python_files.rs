//! Files written by the reference Python `safetensors` (see `scripts/make_test_files.py`) read
//! back with our parser and sources: names, dtypes, shapes, offsets, metadata and the sha256 of
//! every tensor's bytes must match the manifest the script wrote.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;
use weightstream::format::{read_header, Header};
use weightstream::{Checkpoint, Dtype};

macro_rules! data_dir_or_skip {
    () => {
        match common::python_data_dir() {
            Some(d) => d,
            None => return,
        }
    };
}

fn shape_of(v: &Value) -> Vec<u64> {
    v.as_array().expect("shape array").iter().map(|d| d.as_u64().expect("dim")).collect()
}

/// Check one file's header and tensor bytes against its manifest entry.
fn check_file(dir: &Path, rel: &str, expected: &Value) -> Header {
    let path = dir.join(rel);
    let header = read_header(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(header.file_len, bytes.len() as u64, "{rel}");
    assert_eq!(header.file_len, expected["size"].as_u64().unwrap(), "{rel}");
    assert_eq!(header.data_start, 8 + header.header_len);

    let tensors = expected["tensors"].as_object().unwrap();
    let names: BTreeSet<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    let want: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
    assert_eq!(names, want, "{rel}: tensor names");
    assert_eq!(header.tensors.len(), tensors.len(), "{rel}: tensor count");

    let mut prev_end = 0;
    for t in &header.tensors {
        let e = &tensors[&t.name];
        let dtype: Dtype = e["dtype"].as_str().unwrap().parse().unwrap();
        assert_eq!(t.dtype, dtype, "{rel}: {}", t.name);
        assert_eq!(t.shape, shape_of(&e["shape"]), "{rel}: {}", t.name);
        let offsets = shape_of(&e["data_offsets"]);
        assert_eq!([t.data_offsets.0, t.data_offsets.1], [offsets[0], offsets[1]], "{rel}: {}", t.name);
        assert_eq!(t.byte_len(), e["nbytes"].as_u64().unwrap(), "{rel}: {}", t.name);
        // File order: each tensor starts where the previous ended.
        assert_eq!(t.data_offsets.0, prev_end, "{rel}: {} not in file order", t.name);
        prev_end = t.data_offsets.1;
        let begin = (header.data_start + t.data_offsets.0) as usize;
        let end = (header.data_start + t.data_offsets.1) as usize;
        assert_eq!(common::sha256_hex(&bytes[begin..end]), e["sha256"].as_str().unwrap(), "{rel}: bytes of {}", t.name);
    }
    assert_eq!(header.data_len(), prev_end);

    let meta: BTreeMap<String, String> = expected["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(header.metadata, meta, "{rel}: metadata");
    header
}

#[test]
fn every_python_written_file_reads_back_as_written() {
    let dir = data_dir_or_skip!();
    let manifest = common::manifest(&dir);
    let files = manifest["files"].as_object().unwrap();
    assert!(files.len() >= 20, "only {} files in the manifest", files.len());
    for (rel, expected) in files {
        check_file(&dir, rel, expected);
    }
}

#[test]
fn every_dtype_numpy_and_ml_dtypes_can_write_is_covered() {
    let dir = data_dir_or_skip!();
    let manifest = common::manifest(&dir);
    let dtypes = manifest["dtypes"].as_object().unwrap();
    for required in [
        "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2",
    ] {
        let rel = dtypes.get(required).unwrap_or_else(|| panic!("no file for {required}"));
        let header = read_header(dir.join(rel.as_str().unwrap())).unwrap();
        let want: Dtype = required.parse().unwrap();
        assert!(header.tensors.iter().all(|t| t.dtype == want), "{required}");
        // Scalars and multi-dimensional tensors both present.
        assert!(header.tensors.iter().any(|t| t.shape.is_empty()), "{required}: no scalar");
    }
    if let Some(skipped) = manifest["skipped_dtypes"].as_object().filter(|s| !s.is_empty()) {
        println!("the installed Python safetensors could not write: {skipped:?}");
    }
}

#[test]
fn empty_tensors_and_files_without_tensors() {
    let dir = data_dir_or_skip!();
    let manifest = common::manifest(&dir);
    let h = check_file(&dir, "empty_tensor.safetensors", &manifest["files"]["empty_tensor.safetensors"]);
    let empties: Vec<_> = h.tensors.iter().filter(|t| t.byte_len() == 0).map(|t| t.name.as_str()).collect();
    assert_eq!(empties.len(), 3, "{empties:?}");

    let h = check_file(&dir, "no_tensors.safetensors", &manifest["files"]["no_tensors.safetensors"]);
    assert!(h.tensors.is_empty());
    assert_eq!(h.data_len(), 0);
    let ckpt = Checkpoint::open(dir.join("no_tensors.safetensors")).unwrap();
    assert_eq!((ckpt.tensor_count(), ckpt.total_bytes()), (0, 0));
}

#[test]
fn single_files_through_checkpoint_open() {
    let dir = data_dir_or_skip!();
    let manifest = common::manifest(&dir);
    for (rel, expected) in manifest["files"].as_object().unwrap() {
        let ckpt = Checkpoint::open(dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(ckpt.files.len(), 1);
        assert!(ckpt.index.is_none());
        assert_eq!(ckpt.tensor_count(), expected["tensors"].as_object().unwrap().len(), "{rel}");
    }
}

fn check_sharded(ckpt: &Checkpoint, dir: &Path, manifest: &Value) {
    let sharded = &manifest["sharded"];
    let shards: Vec<&str> = sharded["shards"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(ckpt.files.len(), shards.len());
    let mut all = BTreeSet::new();
    for (file, rel) in ckpt.files.iter().zip(&shards) {
        assert_eq!(file.path.canonicalize().unwrap(), dir.join(rel).canonicalize().unwrap());
        check_file(dir, rel, &manifest["files"][*rel]);
        for t in &file.header.tensors {
            assert!(all.insert(t.name.clone()), "{} twice", t.name);
        }
    }
    assert_eq!(ckpt.total_bytes(), sharded["total_size"].as_u64().unwrap());
    let index = ckpt.index.as_ref().expect("the index was used");
    let listed: BTreeSet<String> = index.weight_map.keys().cloned().collect();
    assert_eq!(listed, all);
    assert_eq!(index.total_size, sharded["total_size"].as_u64());
    for (tensor, shard) in &index.weight_map {
        let owner = ckpt.files.iter().find(|f| f.header.tensors.iter().any(|t| &t.name == tensor)).unwrap();
        assert_eq!(&owner.path, shard, "{tensor}");
    }
}

#[test]
fn sharded_model_through_its_index() {
    let dir = data_dir_or_skip!();
    let manifest = common::manifest(&dir);
    let index = dir.join(manifest["sharded"]["index"].as_str().unwrap());
    let ckpt = Checkpoint::open(&index).unwrap();
    check_sharded(&ckpt, &dir, &manifest);
}

#[test]
fn sharded_model_through_its_directory() {
    let dir = data_dir_or_skip!();
    let manifest = common::manifest(&dir);
    let ckpt = Checkpoint::open(dir.join(manifest["sharded"]["dir"].as_str().unwrap())).unwrap();
    check_sharded(&ckpt, &dir, &manifest);
}
