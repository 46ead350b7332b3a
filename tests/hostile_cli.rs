//! The CLI against hostile files and faults (issue 12): names wider than `format!` widths allow,
//! huge names in errors, terminal control characters, stdout that cannot be written, checksums
//! under a memory limit, and `demo` stopped by a signal. Each checks the exit status and the
//! `error:` line on stderr.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{sha256_hex, weightstream_bin};
use weightstream::format::{write_file, WriteTensor};
use weightstream::Dtype;

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(weightstream_bin()).args(args).output().expect("run weightstream")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw file: length prefix, header, `data_len` bytes of data.
fn raw(dir: &Path, name: &str, header: &[u8], data_len: usize) -> PathBuf {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.resize(f.len() + data_len, 7);
    let path = dir.join(name);
    std::fs::write(&path, f).unwrap();
    path
}

/// Exit status 1 and exactly one line on stderr starting with `error: `.
fn one_error_line(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.ends_with('\n') && err.matches('\n').count() == 1, "{err:?}");
    err
}

// Item 3: `format!` widths over 65,535 panic.
#[test]
fn inspect_lists_a_name_wider_than_65535_characters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.safetensors");
    let name = "n".repeat(70_000);
    write_file(&path, &[WriteTensor::new(name.clone(), Dtype::U8, vec![2], &[1, 2])], &Default::default()).unwrap();
    let out = run(&["inspect".as_ref(), path.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.lines().any(|l| l.starts_with(&format!("{name}  U8"))), "no row for the wide name");
}

// Item 3: a huge name in an error message is cut to a readable length, with a marker.
#[test]
fn error_line_cuts_a_huge_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    let name = "x".repeat(2_000_000);
    // 4 bytes of data where F32 [2] needs 8: a size mismatch naming the tensor.
    let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}}}"#);
    let path = raw(dir.path(), "huge_name.safetensors", header.as_bytes(), 4);
    for cmd in ["inspect", "load"] {
        let out = run(&[cmd.as_ref(), path.as_os_str()]);
        let err = one_error_line(&out);
        assert!(err.len() < 1000, "{cmd}: error line of {} bytes", err.len());
        assert!(err.contains(&format!("tensor `{}…(1999800 more bytes)`", "x".repeat(200))), "{cmd}: {err}");
    }
}

// Item 8: ESC, BEL, CR in a tensor name and a file name never reach the terminal raw.
#[test]
fn control_characters_in_names_are_escaped_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let evil = "w\u{1b}]0;pwned\u{7}\r\u{1b}[32mOK\u{9b}2J";
    let header = serde_json::json!({ evil: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]} }).to_string();
    let path = raw(dir.path(), "bad\u{1b}[31m\r.safetensors", header.as_bytes(), 4);
    for cmd in ["inspect", "load"] {
        let out = run(&[cmd.as_ref(), path.as_os_str()]);
        let err = one_error_line(&out);
        let body = err.trim_end_matches('\n');
        assert!(!body.chars().any(char::is_control), "{cmd}: raw control character in {body:?}");
        assert!(body.contains(r"w\x1b]0;pwned\x07\r\x1b[32mOK\u{9b}2J"), "{cmd}: {body}");
        assert!(body.contains(r"bad\x1b[31m\r.safetensors"), "{cmd}: {body}");
    }
}

/// A small valid checkpoint.
fn small_file(dir: &Path) -> PathBuf {
    let path = dir.join("small.safetensors");
    write_file(&path, &[WriteTensor::new("w", Dtype::U8, vec![4], &[1, 2, 3, 4])], &Default::default()).unwrap();
    path
}

// Item 4: stdout on /dev/full is a write error, exit 1, not a panic.
#[test]
fn stdout_that_cannot_be_written_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_file(dir.path());
    let tmp = tempfile::tempdir().unwrap();
    let p = path.as_os_str();
    let cases: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec!["inspect".as_ref(), p],
        vec!["inspect".as_ref(), p, "--json".as_ref()],
        vec!["load".as_ref(), p, "--device".as_ref(), "cpu".as_ref()],
        vec!["load".as_ref(), p, "--device".as_ref(), "cpu".as_ref(), "--json".as_ref()],
        vec!["load".as_ref(), p, "--device".as_ref(), "cpu".as_ref(), "--checksum".as_ref()],
        vec!["bench".as_ref(), p, "--device".as_ref(), "cpu".as_ref(), "--runs".as_ref(), "1".as_ref()],
        vec!["demo".as_ref(), "--layers".as_ref(), "0".as_ref(), "--device".as_ref(), "cpu".as_ref()],
    ];
    for args in cases {
        let out = Command::new(weightstream_bin())
            .args(&args)
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::from(File::create("/dev/full").unwrap()))
            .output()
            .unwrap();
        let err = one_error_line(&out);
        assert!(err.starts_with("error: <stdout>: "), "{args:?}: {err}");
        assert!(err.contains("No space left on device"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "demo left files behind");
}

// Item 4: a closed pipe ends the command quietly with exit status 0 (the reader has gone).
#[test]
fn closed_stdout_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_file(dir.path());
    for cmd in ["load", "inspect"] {
        let mut child = Command::new(weightstream_bin())
            .args([cmd.as_ref(), path.as_os_str()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away before anything is written
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{cmd}: {}", stderr(&out));
    }
}

/// Runs `weightstream ARGS` under an address-space limit of `limit_kib`.
fn under_address_limit(limit_kib: u64, args: &[&str]) -> Output {
    let mut script = format!("ulimit -v {limit_kib} && exec \"$0\"");
    for i in 1..=args.len() {
        script.push_str(&format!(" \"${i}\""));
    }
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(weightstream_bin())
        .args(args)
        // One malloc arena, so that the limit measures what the program allocates, not how many
        // 64 MiB arenas glibc reserved for its threads.
        .env("MALLOC_ARENA_MAX", "1")
        .output()
        .unwrap()
}

// Item 5: `load --checksum` hashes host tensors in place: it needs no memory beyond the load's.
#[test]
fn checksum_needs_no_copy_of_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let data = common::pattern(5, 256 << 20);
    let small = common::pattern(6, 1000);
    write_file(
        &path,
        &[
            WriteTensor::new("big", Dtype::U8, vec![data.len() as u64], &data),
            WriteTensor::new("small", Dtype::U8, vec![1000], &small),
        ],
        &Default::default(),
    )
    .unwrap();
    let want = [sha256_hex(&data), sha256_hex(&small)];
    drop(data);
    let p = path.to_str().unwrap();
    // The smallest address-space limit (in 16 MiB steps) under which a plain load succeeds...
    let load = ["load", p, "--device", "cpu", "--quiet"];
    let (mut lo, mut hi) = (64u64 << 10, 4u64 << 20); // KiB
    assert!(under_address_limit(hi, &load).status.success(), "a plain load fails under {hi} KiB");
    while hi - lo > 16 << 10 {
        let mid = (lo + hi) / 2;
        if under_address_limit(mid, &load).status.success() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // ...is enough for a checksummed one with 64 MiB to spare (a copy of the tensor needs 256).
    let limit = hi + (64 << 10);
    let out = under_address_limit(limit, &["load", p, "--device", "cpu", "--quiet", "--checksum", "--json"]);
    assert_eq!(out.status.code(), Some(0), "--checksum under {limit} KiB: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<&str> = report["tensors"].as_array().unwrap().iter().map(|t| t["sha256"].as_str().unwrap()).collect();
    assert_eq!(got, want);
}

/// Files and folders left in `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

// Item 10: SIGTERM or SIGINT during `demo` removes its temp checkpoint; exit status 128 + signal.
#[test]
fn demo_removes_its_checkpoint_when_interrupted() {
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new(weightstream_bin())
            .args(["demo", "--layers", "4", "--device", "cpu"])
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the checkpoint file exists, then signal.
        let t0 = Instant::now();
        loop {
            let made = entries(tmp.path()).iter().any(|d| d.is_dir() && d.join("demo.safetensors").exists());
            if made {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "demo never wrote its checkpoint");
            assert!(child.try_wait().unwrap().is_none(), "demo ended before it wrote its checkpoint");
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(killed.success());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: status {:?}: {err}", out.status);
        assert!(err.starts_with(&format!("error: interrupted by SIG{signal}; removed ")), "{err}");
        assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new(), "SIG{signal}: temp dir not empty");
    }
}
