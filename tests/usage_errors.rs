//! Usage errors are structured: through the public API (the `Loader` builder and its ways,
//! the writer, parsing), a caller matches on which option was refused, with what value, and why,
//! instead of reading a message. No GPU needed: every refusal comes before a device is touched.

use std::path::{Path, PathBuf};

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Destination, Device, Dtype, Error, ErrorKind, Loader, UsageError, MAX_STAGING_COUNT};

/// A small checkpoint: `a` F32 [2, 3], `b` U8 [40].
fn write(dir: &Path) -> PathBuf {
    let path = dir.join("m.safetensors");
    let a = [0u8; 24];
    let b = [7u8; 40];
    let tensors = [WriteTensor::new("a", Dtype::F32, vec![2, 3], &a), WriteTensor::new("b", Dtype::U8, vec![40], &b)];
    write_file(&path, &tensors, &Default::default()).unwrap();
    path
}

/// The structured usage error of `r`, which must have failed with one.
#[track_caller]
fn usage<T>(r: weightstream::Result<T>) -> UsageError {
    let err = match r {
        Ok(_) => panic!("expected a usage error, got success"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    match err {
        Error::Usage(u) => u,
        other => panic!("expected Error::Usage, got {other:?}"),
    }
}

/// Every way of loading: the arena, caller destinations, the stream.
fn each_way(loader: &Loader, path: &Path) -> Vec<(&'static str, UsageError)> {
    let mut room = vec![0u8; 40];
    vec![
        ("load", usage(loader.load(path))),
        ("load_into", usage(loader.load_into(path, [("b".to_string(), Destination::Host(&mut room))]))),
        ("stream", usage(loader.stream(path, 1 << 20))),
    ]
}

#[test]
fn option_values_out_of_bounds_name_the_option_and_value_on_every_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let cpu = Loader::new().device(Device::Cpu);
    let cases = [
        (cpu.clone().staging_count(0), "staging_count", "0".to_string()),
        (cpu.clone().staging_count(MAX_STAGING_COUNT + 1), "staging_count", (MAX_STAGING_COUNT + 1).to_string()),
        (cpu.clone().staging_size(4096), "staging_size", "4096".to_string()),
        (cpu.clone().dtype(Dtype::U8), "dtype", "U8".to_string()),
        (cpu.clone().dtype(Dtype::F64), "dtype", "F64".to_string()),
    ];
    for (loader, want_option, want_value) in cases {
        for (way, err) in each_way(&loader, &path) {
            match &err {
                UsageError::BadOption { option, value, expected } => {
                    assert_eq!((*option, value.as_str()), (want_option, want_value.as_str()), "{way}: {err}");
                    assert!(!expected.is_empty(), "{way}: {err}");
                }
                other => panic!("{way}: {want_option} {want_value}: expected BadOption, got {other:?}"),
            }
            let shown = err.to_string();
            assert!(shown.contains(want_option) && shown.contains(&want_value), "{way}: {shown}");
        }
    }
    // The dtype targets are exactly F32, F16 and BF16.
    for ok in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        cpu.clone().dtype(ok).load(&path).unwrap();
    }
}

#[test]
fn option_values_parsed_from_text_are_bad_options() {
    let err = usage("tpu".parse::<Device>());
    assert!(matches!(&err, UsageError::BadOption { option: "device", value, .. } if value == "tpu"), "{err:?}");
    let err = usage("fast".parse::<weightstream::io::IoKind>());
    assert!(matches!(&err, UsageError::BadOption { option: "io", value, .. } if value == "fast"), "{err:?}");
}

#[test]
fn zero_copy_off_cuda_is_unsupported_by_the_device_on_every_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    for device in [Device::Cpu, Device::Null] {
        let loader = Loader::new().device(device).zero_copy(true);
        for (way, err) in each_way(&loader, &path) {
            assert!(
                matches!(&err, UsageError::Unsupported { option: "zero_copy", by, .. } if by.contains(&device.to_string())),
                "{device} {way}: {err:?}"
            );
        }
    }
}

#[test]
fn options_that_exclude_each_other_are_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    // Refused from the options alone: no CUDA device is opened.
    let gpu = Loader::new().device(Device::Cuda(0)).zero_copy(true);
    let err = usage(gpu.clone().direct(true).load(&path));
    assert!(matches!(&err, UsageError::Conflict { a: "zero_copy", b: "direct", .. }), "{err:?}");
    let err = usage(gpu.io(weightstream::io::IoKind::Pread).load(&path));
    assert!(matches!(&err, UsageError::Conflict { a: "zero_copy", b: "io", .. }), "{err:?}");
    assert!(err.to_string().contains("`zero_copy` and `io`"), "{err}");
}

#[test]
fn bad_globs_name_the_option_and_the_glob() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let cpu = Loader::new().device(Device::Cpu);
    for (way, err) in each_way(&cpu.clone().only("a").only("b[").staging_count(2), &path) {
        assert!(matches!(&err, UsageError::BadGlob { option: "only", glob, .. } if glob == "b["), "{way}: {err:?}");
    }
    let err = usage(cpu.clone().shard(0, 2).split("{a", 0).load(&path));
    assert!(matches!(&err, UsageError::BadGlob { option: "split", glob, .. } if glob == "{a"), "{err:?}");
    assert!(err.to_string().contains("`{a`"), "{err}");
}

#[test]
fn bad_shard_specs_and_missing_options_are_structured() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let cpu = Loader::new().device(Device::Cpu);
    for (rank, world) in [(2, 2), (0, 0), (5, 3)] {
        for (way, err) in each_way(&cpu.clone().shard(rank, world), &path) {
            assert_eq!(err, UsageError::BadShardSpec { rank, world }, "{way}");
        }
    }
    let err = usage(cpu.clone().split("*", 0).load(&path));
    assert_eq!(err, UsageError::Requires { option: "split", needs: "shard" });
    let err = usage(cpu.clone().slice("a", 0, 0..1).slice("a", 1, 0..2).load(&path));
    assert_eq!(err, UsageError::SliceTwice { tensor: "a".into() });
    assert!(err.to_string().contains("two slices of `a`"), "{err}");
}

#[test]
fn devices_a_way_does_not_fill_are_unsupported_by_that_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let null = Loader::new().device(Device::Null);
    // (A host destination on a null load is a BadDestination naming its tensor: none here.)
    let err = usage(null.load_into(&path, Vec::<(String, Destination<'_>)>::new()));
    assert!(matches!(&err, UsageError::Unsupported { option: "device", by, .. } if by == "load_into"), "{err:?}");
    let err = usage(null.stream(&path, 1 << 20));
    assert!(matches!(&err, UsageError::Unsupported { option: "device", by, .. } if by == "stream"), "{err:?}");
}

#[test]
fn a_window_smaller_than_a_tensor_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let err = Loader::new().device(Device::Cpu).stream(&path, 39).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(matches!(&err, Error::WindowTooSmall { tensor, bytes: 40, window: 39, .. } if tensor == "b"), "{err:?}");
}

#[test]
fn loaded_tensors_used_where_they_cannot_be() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let model = Loader::new().device(Device::Null).load(&path).unwrap();
    let t = model.tensor("b").unwrap();
    assert_eq!(usage(t.to_host_vec()), UsageError::BytesDropped { tensor: "b".into() });
    assert_eq!(usage(t.for_each_chunk(8, |_| ())), UsageError::BytesDropped { tensor: "b".into() });
    let model = Loader::new().device(Device::Cpu).load(&path).unwrap();
    let err = usage(model.tensor("b").unwrap().for_each_chunk(0, |_| ()));
    assert!(matches!(&err, UsageError::BadOption { option: "max_chunk", value, .. } if value == "0"), "{err:?}");
}

#[test]
fn tensors_the_writer_cannot_write_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let four = [0u8; 4];
    let cases: [(&[WriteTensor<'_>], &str, &str); 4] = [
        (&[WriteTensor::new("short", Dtype::F32, vec![2], &four)], "short", "4 bytes given for F32 [2], which takes 8"),
        (&[WriteTensor::new("half", Dtype::F4, vec![3], &four[..2])], "half", "does not fill whole bytes"),
        (&[WriteTensor::new("__metadata__", Dtype::U8, vec![4], &four)], "__metadata__", "metadata"),
        (
            &[WriteTensor::new("x", Dtype::U8, vec![4], &four), WriteTensor::new("x", Dtype::U8, vec![4], &four)],
            "x",
            "twice",
        ),
    ];
    for (tensors, name, words) in cases {
        let err = usage(write_file(&path, tensors, &Default::default()));
        match &err {
            UsageError::BadWrite { tensor: Some(t), message } => {
                assert_eq!(t, name);
                assert!(message.contains(words), "{err}");
            }
            other => panic!("{name}: expected BadWrite, got {other:?}"),
        }
        assert!(err.to_string().starts_with(&format!("tensor `{name}`: ")), "{err}");
    }
}

/// A storage option the object store does not know is refused before any request is made.
#[cfg(feature = "remote")]
#[test]
fn unknown_storage_options_name_the_key() {
    let loader = Loader::new().device(Device::Cpu).storage_option("aws_no_such_option", "1");
    let err = usage(loader.load("s3://bucket/m.safetensors"));
    assert!(matches!(&err, UsageError::BadStorageOption { key, .. } if key == "aws_no_such_option"), "{err:?}");
    assert!(err.to_string().contains("aws_no_such_option"), "{err}");
}

/// The displayed words stay informative: the option, the value, what was expected.
#[test]
fn usage_errors_display_option_value_and_expectation() {
    let err: Error = "tpu".parse::<Device>().unwrap_err();
    assert_eq!(err.to_string(), "device `tpu`: expected auto, cpu, null, cuda or cuda:N");
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let err = Loader::new().device(Device::Cpu).staging_count(0).load(&path).unwrap_err();
    assert_eq!(err.to_string(), format!("staging_count `0`: expected between 1 and {MAX_STAGING_COUNT}"));
}
