//! `weightstream bench`: the library does the work, the CLI prints; the mmap baseline runs in a
//! child process, so a file truncated under its map is that baseline's error, not a SIGBUS of
//! the whole command.

mod common;

use common::{pattern, weightstream_bin};
use weightstream::format::{write_file, WriteTensor};
use weightstream::Dtype;

#[test]
fn bench_compares_strategies_and_survives_a_file_truncated_under_the_mmap_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let data = pattern(3, 1 << 20);
    write_file(&path, &[WriteTensor::new("w", Dtype::U8, vec![data.len() as u64], &data)], &Default::default())
        .unwrap();
    let out = std::process::Command::new(weightstream_bin())
        .args(["bench", "--device", "cpu", "--runs", "2", "--json"])
        .args(["--strategy", "pipeline", "--strategy", "mmap-copy", "--strategy", "read-all"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert_eq!(r["bytes"].as_u64(), Some(1 << 20), "{r}");
        assert_eq!(r["runs"].as_u64(), Some(2), "{r}");
    }
    // The child truncates the file under its map: SIGBUS ends the child, the command reports it.
    let out = std::process::Command::new(weightstream_bin())
        .env(weightstream::bench::TRUNCATE_ENV, "1")
        .args(["bench", "--device", "cpu", "--runs", "1", "--strategy", "mmap-copy"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("SIGBUS"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
