//! Fuzz whole-file loads: any bytes as a `.safetensors` file, opened (`Checkpoint::open`) and
//! loaded to host memory (`Loader::load` with `Device::Cpu`); a load that succeeds must hand back
//! each tensor's bytes as they are in the file.
//!
//! `cargo +nightly fuzz run load` (from the repository root).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weightstream::{Checkpoint, Device, Loader};

/// A directory of this process for the input file.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("fuzz-load").tempdir().expect("temp dir").keep())
}

fuzz_target!(|file: &[u8]| {
    let path = dir().join("model.safetensors");
    std::fs::write(&path, file).expect("write the input");
    let Ok(ckpt) = Checkpoint::open(&path) else {
        // Refused by the header checks: the load must refuse it too.
        assert!(Loader::new().device(Device::Cpu).threads(2).load(&path).is_err());
        return;
    };
    let model = Loader::new().device(Device::Cpu).threads(2).load(&path).expect("a valid header loads");
    let header = &ckpt.files[0].header;
    assert_eq!(model.len(), header.tensors.len());
    for t in &header.tensors {
        let start = (header.data_start + t.data_offsets.0) as usize;
        let want = &file[start..start + t.byte_len() as usize];
        assert_eq!(model.tensor(&t.name).expect("loaded").host_bytes(), Some(want), "{}", t.name);
    }
});
