//! The library against hostile inputs (issue 12): the limits a header and an index may declare,
//! error messages that quote the file, and reading a tensor back in bounded pieces.

mod common;

use weightstream::format::{
    parse_header, write_file, ShardIndex, WriteTensor, MAX_INDEX_LEN, MAX_INDEX_TENSORS, MAX_METADATA_KEYS, MAX_RANK,
    MAX_TENSORS,
};
use weightstream::{Device, Dtype, Error, Loader, UsageError};

/// Parse a header for a file with `data_len` bytes of data.
fn parse(header: &str, data_len: u64) -> weightstream::Result<weightstream::format::Header> {
    parse_header("limits.safetensors", header.as_bytes(), 8 + header.len() as u64 + data_len)
}

#[test]
fn limits_are_far_above_real_checkpoints_and_the_benchmark() {
    assert_eq!(MAX_TENSORS, 1_000_000);
    const { assert!(MAX_TENSORS > 400_000, "benches/header_parse.rs parses 400,000 tensors") };
    assert_eq!(MAX_RANK, 16);
    assert_eq!(MAX_METADATA_KEYS, 65_536);
    assert_eq!(MAX_INDEX_LEN, 64 << 20);
    assert_eq!(MAX_INDEX_TENSORS, MAX_TENSORS);
}

#[test]
fn rank_up_to_the_limit_is_accepted_and_beyond_it_refused() {
    let shape = |rank: usize| vec!["1"; rank].join(",");
    let h =
        parse(&format!(r#"{{"t":{{"dtype":"U8","shape":[{}],"data_offsets":[0,1]}}}}"#, shape(MAX_RANK)), 1).unwrap();
    assert_eq!(h.tensors[0].shape, vec![1; MAX_RANK]);
    let err = parse(&format!(r#"{{"t":{{"dtype":"U8","shape":[{}],"data_offsets":[0,1]}}}}"#, shape(MAX_RANK + 1)), 1)
        .unwrap_err();
    assert!(matches!(&err, Error::RankTooLarge { tensor, limit: MAX_RANK, .. } if tensor == "t"), "{err:?}");
    assert_eq!(err.to_string(), "limits.safetensors: tensor `t`: shape has more than 16 dimensions");
    assert_eq!(err.file(), Some(std::path::Path::new("limits.safetensors")));
}

#[test]
fn metadata_keys_up_to_the_limit_are_accepted_and_beyond_refused() {
    let meta = |n: usize| (0..n).map(|i| format!(r#""{i}":"v""#)).collect::<Vec<_>>().join(",");
    let h = parse(&format!(r#"{{"__metadata__":{{{}}}}}"#, meta(MAX_METADATA_KEYS)), 0).unwrap();
    assert_eq!(h.metadata.len(), MAX_METADATA_KEYS);
    let err = parse(&format!(r#"{{"__metadata__":{{{}}}}}"#, meta(MAX_METADATA_KEYS + 1)), 0).unwrap_err();
    assert!(matches!(err, Error::TooManyMetadataKeys { limit: MAX_METADATA_KEYS, .. }), "{err:?}");
    assert_eq!(err.to_string(), "limits.safetensors: __metadata__ has more than 65536 keys");
    // Still what it was: null is no metadata, a non-string value is refused.
    assert!(parse(r#"{"__metadata__":null}"#, 0).unwrap().metadata.is_empty());
    assert!(matches!(parse(r#"{"__metadata__":{"a":1}}"#, 0).unwrap_err(), Error::BadMetadata { .. }));
}

#[test]
fn tensor_count_up_to_the_limit_is_accepted_and_beyond_refused() {
    let header = |n: usize| {
        let mut h = String::with_capacity(n * 60);
        h.push('{');
        for i in 0..n {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&format!(r#""{i:x}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#));
        }
        h.push('}');
        h
    };
    assert_eq!(parse(&header(MAX_TENSORS), 0).unwrap().tensors.len(), MAX_TENSORS);
    let err = parse(&header(MAX_TENSORS + 1), 0).unwrap_err();
    assert!(matches!(err, Error::TooManyTensors { limit: MAX_TENSORS, .. }), "{err:?}");
    assert_eq!(err.to_string(), "limits.safetensors: header declares more than 1000000 tensors");
}

#[test]
fn an_index_longer_than_the_limit_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MAX_INDEX_LEN + 1).unwrap(); // sparse
    let err = ShardIndex::read(&path).unwrap_err();
    assert!(matches!(err, Error::BadIndex { .. }), "{err:?}");
    assert!(err.to_string().contains("index is 67108865 bytes, more than the 67108864 allowed"), "{err}");
}

#[test]
fn an_index_listing_too_many_tensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.safetensors"), b"").unwrap();
    let entries: Vec<String> = (0..=MAX_INDEX_TENSORS).map(|i| format!(r#""{i:x}":"s.safetensors""#)).collect();
    let path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&path, format!(r#"{{"weight_map":{{{}}}}}"#, entries.join(","))).unwrap();
    let err = ShardIndex::read(&path).unwrap_err();
    assert!(err.to_string().contains("weight_map lists more than 1000000 tensors"), "{err}");
}

#[test]
fn index_metadata_keeps_only_total_size() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.safetensors"), b"").unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    for (metadata, total) in [
        (r#"{"total_size":1234,"x":[1,{"y":null}]}"#, Some(1234)),
        (r#"{"total_size":"12"}"#, None),
        (r#"{}"#, None),
        (r#"null"#, None),
    ] {
        std::fs::write(&path, format!(r#"{{"metadata":{metadata},"weight_map":{{"w":"s.safetensors"}}}}"#)).unwrap();
        assert_eq!(ShardIndex::read(&path).unwrap().total_size, total, "{metadata}");
    }
}

#[test]
fn error_messages_cut_long_names_and_escape_control_characters() {
    let name = format!("\u{1b}[2J{}", "n".repeat(100_000));
    let err = Error::DuplicateTensor { file: "dir/\r.safetensors".into(), tensor: name };
    let shown = err.to_string();
    assert!(shown.starts_with(r"dir/\r.safetensors: tensor `\x1b[2J"), "{shown}");
    assert!(shown.contains("…(99807 more bytes)` appears twice"), "{shown}");
    assert!(shown.len() < 300);
    assert!(!shown.chars().any(char::is_control));
}

#[test]
fn for_each_chunk_lends_host_bytes_in_bounded_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let bytes = common::pattern(1, 10_000);
    write_file(
        &path,
        &[WriteTensor::new("w", Dtype::U8, vec![10_000], &bytes), WriteTensor::new("empty", Dtype::U8, vec![0], &[])],
        &Default::default(),
    )
    .unwrap();
    let model = Loader::new().device(Device::Cpu).load(&path).unwrap();
    let w = model.tensor("w").unwrap();
    let mut pieces = Vec::new();
    w.for_each_chunk(4096, |p| pieces.push(p.to_vec())).unwrap();
    assert_eq!(pieces.iter().map(Vec::len).collect::<Vec<_>>(), [4096, 4096, 1808]);
    assert_eq!(pieces.concat(), bytes);
    let mut calls = 0;
    model.tensor("empty").unwrap().for_each_chunk(1, |_| calls += 1).unwrap();
    assert_eq!(calls, 0);
    assert!(matches!(
        w.for_each_chunk(0, |_| ()),
        Err(Error::Usage(UsageError::BadOption { option: "max_chunk", .. }))
    ));
    let null = Loader::new().device(Device::Null).load(&path).unwrap();
    let err = null.tensor("w").unwrap().for_each_chunk(16, |_| ()).unwrap_err();
    assert!(matches!(&err, Error::Usage(UsageError::BytesDropped { tensor }) if tensor == "w"), "{err}");
}
