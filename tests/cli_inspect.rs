//! `weightstream inspect` as a user runs it: exit status 0 with the JSON of DESIGN.md "CLI
//! contract" for good files; 1 with exactly one line `error: <file>: <what>` on stderr for bad
//! ones; 2 for usage errors; never 101 (a panic) or death by a signal.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use weightstream::format::{write_file, WriteTensor};
use weightstream::Dtype;

fn weightstream(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weightstream")).args(args).output().expect("run weightstream")
}

fn inspect(path: &Path, json: bool) -> Output {
    let mut args = vec!["inspect".as_ref(), path.as_os_str()];
    if json {
        args.push("--json".as_ref());
    }
    weightstream(&args)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit status 0, nothing on stderr; the JSON on stdout.
fn ok_json(path: &Path) -> Value {
    let out = inspect(path, true);
    assert_eq!(out.status.code(), Some(0), "{}: {}", path.display(), stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

/// Exit status 1 and exactly one stderr line `error: <file>: ...` naming each of `names`.
fn fails(path: &Path, file_in_message: &Path, names: &[&str]) -> String {
    for json in [true, false] {
        let out = inspect(path, json);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", path.display());
        assert!(out.stdout.is_empty(), "stdout on failure: {}", String::from_utf8_lossy(&out.stdout));
        assert!(err.ends_with('\n') && err.matches('\n').count() == 1, "not one line: {err:?}");
        let prefix = format!("error: {}: ", file_in_message.display());
        assert!(err.starts_with(&prefix), "{err:?} does not start with {prefix:?}");
        for n in names {
            assert!(err.contains(n), "`{n}` missing from {err:?}");
        }
    }
    stderr(&inspect(path, true))
}

/// A raw file: length prefix, header, data.
fn raw(dir: &Path, name: &str, header: &[u8], data_len: usize) -> PathBuf {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.resize(f.len() + data_len, 7);
    let path = dir.join(name);
    std::fs::write(&path, f).unwrap();
    path
}

#[test]
fn json_for_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_file(
        &path,
        &[
            WriteTensor::new("layer.0.weight", Dtype::BF16, vec![2, 3], &[1; 12]),
            WriteTensor::new("layer.0.bias", Dtype::F32, vec![3], &[2; 12]),
            WriteTensor::new("scalar", Dtype::I64, vec![], &[3; 8]),
            WriteTensor::new("empty", Dtype::F16, vec![0, 4], &[]),
        ],
        &meta,
    )
    .unwrap();
    let header_len = u64::from_le_bytes(std::fs::read(&path).unwrap()[..8].try_into().unwrap());
    let file = path.to_str().unwrap();
    let got = ok_json(&path);
    let want = json!({
        "files": [{"path": file, "header_bytes": header_len, "tensors": 4, "bytes": 32}],
        "metadata": {"format": "pt"},
        "total_bytes": 32,
        "tensors": [
            {"name": "layer.0.weight", "dtype": "BF16", "shape": [2, 3], "file": file, "data_offsets": [0, 12]},
            {"name": "layer.0.bias", "dtype": "F32", "shape": [3], "file": file, "data_offsets": [12, 24]},
            {"name": "scalar", "dtype": "I64", "shape": [], "file": file, "data_offsets": [24, 32]},
            {"name": "empty", "dtype": "F16", "shape": [0, 4], "file": file, "data_offsets": [32, 32]},
        ],
    });
    assert_eq!(got, want);
}

#[test]
fn json_for_a_sharded_directory_merges_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = BTreeMap::from([("format".to_string(), "pt".to_string()), ("a".to_string(), "1".to_string())]);
    let b = BTreeMap::from([("format".to_string(), "pt".to_string()), ("b".to_string(), "2".to_string())]);
    write_file(d.join("model-00001-of-00002.safetensors"), &[WriteTensor::new("x", Dtype::U8, vec![2], &[1, 2])], &a)
        .unwrap();
    write_file(
        d.join("model-00002-of-00002.safetensors"),
        &[WriteTensor::new("y", Dtype::U8, vec![3], &[1, 2, 3])],
        &b,
    )
    .unwrap();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"metadata":{"total_size":5},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let got = ok_json(d);
    assert_eq!(got["files"].as_array().unwrap().len(), 2);
    assert_eq!(got["metadata"], json!({"format": "pt", "a": "1", "b": "2"}));
    assert_eq!(got["total_bytes"], 5);
    let names: Vec<&str> = got["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["x", "y"]);
    assert!(got["tensors"][1]["file"].as_str().unwrap().ends_with("model-00002-of-00002.safetensors"));
    assert_eq!(got["files"][1]["bytes"], 3);
    assert_eq!(got["files"][1]["tensors"], 1);
}

#[test]
fn table_without_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let meta = BTreeMap::from([("note".to_string(), "line1\nline2".to_string())]);
    write_file(
        &path,
        &[
            WriteTensor::new("model.embed_tokens.weight", Dtype::BF16, vec![4, 2], &[0; 16]),
            WriteTensor::new("bad\nname", Dtype::U8, vec![1], &[0]),
        ],
        &meta,
    )
    .unwrap();
    let out = inspect(&path, false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("1 file, 2 tensors, 17 B\n"), "{text}");
    let row = text.lines().find(|l| l.starts_with("model.embed_tokens.weight")).expect("a row per tensor");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols, ["model.embed_tokens.weight", "BF16", "[4,", "2]", "16"]);
    // Control characters in names and metadata are escaped: one line per row.
    assert!(text.contains("bad\\nname"), "{text}");
    assert!(text.contains("note: line1\\nline2"), "{text}");
    assert_eq!(text.lines().count(), 1 + 1 + 2 + 1 + 1 + 2, "{text}");
}

#[test]
fn bad_files_exit_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tensor = |name: &str, dtype: &str, shape: &str, b: u64, e: u64| {
        format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{b},{e}]}}"#)
    };

    let p = d.join("tiny.safetensors");
    std::fs::write(&p, [1, 2, 3]).unwrap();
    fails(&p, &p, &["too small"]);

    let p = d.join("huge.safetensors");
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, bytes).unwrap();
    fails(&p, &p, &["header length"]);

    let p = raw(d, "past.safetensors", b"{}", 0);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0] = 90;
    std::fs::write(&p, bytes).unwrap();
    fails(&p, &p, &["past the end"]);

    let p = raw(d, "utf8.safetensors", b"{\"\xff\":1}", 0);
    fails(&p, &p, &["UTF-8"]);

    let p = raw(d, "json.safetensors", b"{\"a\":", 0);
    fails(&p, &p, &["JSON"]);

    let p = raw(d, "dtype.safetensors", format!("{{{}}}", tensor("w.q", "F128", "[1]", 0, 1)).as_bytes(), 1);
    fails(&p, &p, &["w.q", "F128"]);

    let p = raw(d, "size.safetensors", format!("{{{}}}", tensor("w.k", "F32", "[3]", 0, 8)).as_bytes(), 8);
    fails(&p, &p, &["w.k"]);

    let two = format!("{{{},{}}}", tensor("w", "U8", "[1]", 0, 1), tensor("w", "U8", "[1]", 1, 2));
    let p = raw(d, "dup.safetensors", two.as_bytes(), 2);
    fails(&p, &p, &["`w`"]);

    let p = raw(d, "trailing.safetensors", format!("{{{}}}", tensor("t", "U8", "[1]", 0, 1)).as_bytes(), 2);
    fails(&p, &p, &["file has"]);

    let hole = format!("{{{},{}}}", tensor("a", "U8", "[1]", 0, 1), tensor("b", "U8", "[1]", 2, 3));
    let p = raw(d, "hole.safetensors", hole.as_bytes(), 3);
    fails(&p, &p, &["`b`"]);

    let p = d.join("absent.safetensors");
    fails(&p, &p, &[]);

    let empty = d.join("empty_dir");
    std::fs::create_dir(&empty).unwrap();
    fails(&empty, &empty, &[]);

    // An index whose shard escapes, and one whose tensor is missing from its shard.
    let m = d.join("model");
    std::fs::create_dir(&m).unwrap();
    raw(&m, "s.safetensors", format!("{{{}}}", tensor("x", "U8", "[1]", 0, 1)).as_bytes(), 1);
    let index = m.join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map":{"x":"../tiny.safetensors"}}"#).unwrap();
    fails(&index, &index, &["../tiny.safetensors"]);
    std::fs::write(&index, r#"{"weight_map":{"x":"s.safetensors","gone":"s.safetensors"}}"#).unwrap();
    fails(&m, &index, &["gone"]);
    // A bad shard is named, not its index.
    raw(&m, "s.safetensors", format!("{{{}}}", tensor("x", "U8", "[2]", 0, 1)).as_bytes(), 1);
    std::fs::write(&index, r#"{"weight_map":{"x":"s.safetensors"}}"#).unwrap();
    fails(&index, &m.join("s.safetensors"), &["`x`"]);
}

#[test]
fn usage_errors_exit_2() {
    for args in [&["inspect"][..], &["inspect", "a", "b"], &["inspect", "--nope", "x"], &["frobnicate"], &[]] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let out = weightstream(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!out.stderr.is_empty());
    }
}

/// A deterministic pseudo-random generator (xorshift), to vary files without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn hostile_files_never_panic_or_signal() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_file(
        &good,
        &[WriteTensor::new("a", Dtype::F32, vec![2, 2], &[1; 16]), WriteTensor::new("b", Dtype::F4, vec![6], &[2; 3])],
        &BTreeMap::from([("k".to_string(), "v".to_string())]),
    )
    .unwrap();
    let valid = std::fs::read(&good).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let path = dir.path().join("fuzz.safetensors");
    let mut exits = [0usize; 2];
    for i in 0..150 {
        let mut bytes = valid.clone();
        match i % 5 {
            0 => bytes.truncate(rng.next() as usize % (valid.len() + 1)),
            1 => {
                let at = rng.next() as usize % bytes.len();
                bytes[at] = rng.next() as u8;
            }
            2 => bytes[..8].copy_from_slice(&rng.next().to_le_bytes()),
            3 => bytes = (0..rng.next() % 64).map(|_| rng.next() as u8).collect(),
            _ => {
                for _ in 0..4 {
                    let at = 8 + rng.next() as usize % (bytes.len() - 8);
                    bytes[at] = b"{}[]\":,0123456789-"[rng.next() as usize % 18];
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let out = inspect(&path, i % 2 == 0);
        match out.status.code() {
            Some(0) => exits[0] += 1,
            Some(1) => {
                exits[1] += 1;
                let err = stderr(&out);
                assert!(err.starts_with(&format!("error: {}: ", path.display())), "{err:?}");
                assert_eq!(err.matches('\n').count(), 1, "{err:?}");
            }
            other => panic!("exit {other:?} for {bytes:?}: {}", stderr(&out)),
        }
    }
    assert!(exits[1] > 100, "{exits:?}");
}

#[test]
fn closed_stdout_is_not_a_panic() {
    // `weightstream inspect big --json | head -c 1`: the reader goes away mid-output.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    let data = vec![0u8; 4];
    let tensors: Vec<WriteTensor> =
        (0..20_000).map(|i| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![4], &data)).collect();
    write_file(&path, &tensors, &Default::default()).unwrap();
    for json in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weightstream"));
        cmd.arg("inspect").arg(&path).stdout(Stdio::piped()).stderr(Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        stdout.read_exact(&mut first).unwrap();
        drop(stdout);
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{status:?}: {err}");
        assert!(err.is_empty(), "{err}");
    }
}

#[test]
fn every_python_written_file() {
    let Some(dir) = common::python_data_dir() else {
        return;
    };
    let manifest = common::manifest(&dir);
    for (rel, expected) in manifest["files"].as_object().unwrap() {
        let got = ok_json(&dir.join(rel));
        let tensors = expected["tensors"].as_object().unwrap();
        assert_eq!(got["tensors"].as_array().unwrap().len(), tensors.len(), "{rel}");
        for t in got["tensors"].as_array().unwrap() {
            let e = &tensors[t["name"].as_str().unwrap()];
            assert_eq!(t["dtype"], e["dtype"], "{rel}");
            assert_eq!(t["shape"], e["shape"], "{rel}");
            assert_eq!(t["data_offsets"], e["data_offsets"], "{rel}");
        }
        assert_eq!(got["metadata"], expected["metadata"], "{rel}");
    }
    let sharded = ok_json(&dir.join("sharded"));
    assert_eq!(sharded["total_bytes"], manifest["sharded"]["total_size"]);
    assert_eq!(sharded["files"].as_array().unwrap().len(), 3);
}
