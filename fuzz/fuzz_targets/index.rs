//! Fuzz the index parser: any bytes as `model.safetensors.index.json`, beside a valid shard
//! `a.safetensors` (tensor `w`) so that well-formed inputs go on through the checks against the
//! shards (`Checkpoint::open`).
//!
//! `cargo +nightly fuzz run index` (from the repository root).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weightstream::format::{write_file, ShardIndex, WriteTensor};
use weightstream::{Checkpoint, Dtype};

/// A directory of this process, with the shard in it.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("fuzz-index").tempdir().expect("temp dir").keep();
        let shard = [WriteTensor::new("w", Dtype::U8, vec![2], &[1, 2])];
        write_file(dir.join("a.safetensors"), &shard, &Default::default()).expect("shard");
        dir
    })
}

fuzz_target!(|bytes: &[u8]| {
    let path = dir().join("model.safetensors.index.json");
    std::fs::write(&path, bytes).expect("write the index");
    if let Ok(index) = ShardIndex::read(&path) {
        // What the parser accepted holds together: every tensor's shard is in `shards`, inside
        // the index's directory.
        for shard in index.weight_map.values() {
            assert!(index.shards.contains(shard));
            assert!(shard.starts_with(dir()));
        }
        let _ = Checkpoint::open(&path);
    }
});
