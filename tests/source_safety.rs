//! Sources a stranger (or an unlucky deployment) controls: files replaced during a load, FIFOs
//! where files should be. Each must give the old file's bytes or a typed error, never a hang or
//! new bytes at old offsets.

use std::path::Path;
use std::sync::mpsc::channel;
use std::time::Duration;

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Checkpoint, Device, Dtype, Error, Loader};

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).or_else(|_| tempfile::tempdir()).unwrap()
}

fn write(path: &Path, fill: u8) -> Vec<u8> {
    let data = vec![fill; 300_000];
    write_file(path, &[WriteTensor::new("w", Dtype::U8, vec![data.len() as u64], &data)], &Default::default()).unwrap();
    data
}

fn direct_supported(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("probe");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).is_ok()
}

#[test]
fn a_file_renamed_over_after_its_header_was_read_still_loads_the_old_bytes() {
    let dir = tmpdir();
    let path = dir.path().join("model.safetensors");
    let old = write(&path, 1);
    let ckpt = Checkpoint::open(&path).unwrap();
    // A re-save next to a running server: same layout, new bytes, renamed over the old path.
    let tmp = dir.path().join("model.safetensors.tmp");
    write(&tmp, 2);
    std::fs::rename(&tmp, &path).unwrap();
    let mut loaders = vec![
        Loader::new().device(Device::Cpu),
        Loader::new().device(Device::Null),
        Loader::new().device(Device::Cpu).dtype(Dtype::F16), // U8 stays, through the workers
    ];
    if direct_supported(dir.path()) {
        loaders.push(Loader::new().device(Device::Cpu).direct(true));
    }
    for loader in loaders {
        let m = loader.load_checkpoint(&ckpt).unwrap_or_else(|e| panic!("{loader:?}: {e}"));
        if m.device() == Device::Cpu {
            assert!(m.tensor("w").unwrap().to_host_vec().unwrap() == old, "{loader:?} read the new file");
        }
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within 20 s.
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("hung (a FIFO opened for reading?)")
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn fifos_where_files_should_be_are_refused_without_hanging() {
    let dir = tmpdir();
    let d = dir.path().to_path_buf();
    write(&d.join("a.safetensors"), 1);
    mkfifo(&d.join("b.safetensors"));
    let index = serde_json::json!({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    // An index whose shard is a FIFO.
    let p = d.join("model.safetensors.index.json");
    let err = within_20s(move || Checkpoint::open(&p).unwrap_err());
    assert!(matches!(&err, Error::BadSource { file, .. } if file.ends_with("b.safetensors")), "{err:?}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    // The FIFO named directly.
    let p = d.join("b.safetensors");
    let err = within_20s(move || Checkpoint::open(&p).unwrap_err());
    assert!(matches!(err, Error::BadSource { .. }), "{err:?}");
    // A FIFO index in a directory.
    let other = tmpdir();
    let o = other.path().to_path_buf();
    write(&o.join("a.safetensors"), 1);
    mkfifo(&o.join("model.safetensors.index.json"));
    let p = o.join("model.safetensors.index.json");
    let err = within_20s(move || Checkpoint::open(&o).unwrap_err());
    assert!(matches!(err, Error::BadSource { .. }), "{err:?}");
    // The format layer's path conveniences open through the same guard.
    let (h, i) = (d.join("b.safetensors"), p.clone());
    let err = within_20s(move || weightstream::format::read_header(&h).unwrap_err());
    assert!(matches!(err, Error::BadSource { .. }), "{err:?}");
    let err = within_20s(move || weightstream::format::ShardIndex::read(&i).unwrap_err());
    assert!(matches!(err, Error::BadSource { .. }), "{err:?}");
}
