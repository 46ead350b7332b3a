//! One test per validation rule of DESIGN.md "Validation" and per error variant of the format
//! layer and the sources: each builds, by hand, a file that breaks only that rule, and checks the
//! exact variant and that the file (and the tensor, when there is one) is named in the message.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use weightstream::format::{header_json, parse_header, read_header, read_header_from, ShardIndex, MAX_HEADER_LEN};
use weightstream::{Checkpoint, Dtype, Error};

// ---------------------------------------------------------------------------------------------
// The largest single allocation made by the current thread, to check that the header length is
// validated before any buffer is allocated for it.

struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns its result and the largest allocation it made on this thread.
fn largest_allocation_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()))
}

// ---------------------------------------------------------------------------------------------
// Building files by hand.

/// `u64 LE header length`, `header`, then `data_len` bytes of data.
fn raw(header: &[u8], data_len: usize) -> Vec<u8> {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.resize(f.len() + data_len, 0xAB);
    f
}

fn tensor(name: &str, dtype: &str, shape: &str, begin: u64, end: u64) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}"#)
}

fn obj(entries: &[String]) -> Vec<u8> {
    format!("{{{}}}", entries.join(",")).into_bytes()
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Write `bytes` to a file and return the error `read_header` gives for it (and the path).
fn reject(bytes: &[u8]) -> (Error, PathBuf, Dir) {
    let dir = Dir::new();
    let path = dir.write("bad.safetensors", bytes);
    let err = read_header(&path).expect_err("the file breaks a rule and must be rejected");
    // The in-memory parser agrees whenever the prefix itself is sound.
    if bytes.len() >= 8 {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if n <= MAX_HEADER_LEN && n <= bytes.len() as u64 - 8 {
            let e2 = parse_header(&path, &bytes[8..8 + n as usize], bytes.len() as u64).unwrap_err();
            assert_eq!(std::mem::discriminant(&err), std::mem::discriminant(&e2), "{err} vs {e2}");
        }
    }
    // And through the whole loader, to both host targets: the same error, before any read.
    for device in [weightstream::Device::Cpu, weightstream::Device::Null] {
        let e3 = weightstream::Loader::new().device(device).load(&path).expect_err("load must reject it too");
        assert_eq!(std::mem::discriminant(&err), std::mem::discriminant(&e3), "{err} vs load: {e3}");
    }
    (err, path, dir)
}

/// The message names the file, and each of `names`.
fn assert_names(err: &Error, path: &Path, names: &[&str]) {
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{}: ", path.display())), "file not first in: {msg}");
    assert_eq!(err.file(), Some(path), "{msg}");
    for n in names {
        assert!(msg.contains(n), "`{n}` missing from: {msg}");
    }
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
}

fn accept(bytes: &[u8]) -> weightstream::format::Header {
    let dir = Dir::new();
    let path = dir.write("good.safetensors", bytes);
    read_header(&path).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// The control: a well-formed file that each test below breaks in one way.

#[test]
fn control_file_is_accepted() {
    let h = accept(&raw(&obj(&[tensor("a", "F32", "[2]", 0, 8), tensor("b", "U8", "[3]", 8, 11)]), 11));
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[1].name, "b");
    assert_eq!(h.tensors[1].data_offsets, (8, 11));
}

// ---------------------------------------------------------------------------------------------
// Header length.

#[test]
fn file_shorter_than_the_length_prefix() {
    let (err, path, _d) = reject(&[1, 0, 0]);
    assert!(matches!(err, Error::FileTooSmall { len: 3, .. }), "{err:?}");
    assert_names(&err, &path, &[]);
}

#[test]
fn header_length_over_100_mb() {
    let mut bytes = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (err, path, _d) = reject(&bytes);
    assert!(matches!(err, Error::HeaderTooLarge { len, .. } if len == MAX_HEADER_LEN + 1), "{err:?}");
    assert_names(&err, &path, &["100000001"]);
}

#[test]
fn header_length_u64_max() {
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (err, path, _d) = reject(&bytes);
    assert!(matches!(err, Error::HeaderTooLarge { len: u64::MAX, .. }), "{err:?}");
    assert_names(&err, &path, &[]);
}

#[test]
fn header_length_past_end_of_file() {
    let mut bytes = raw(b"{}", 0);
    bytes[..8].copy_from_slice(&3u64.to_le_bytes());
    let (err, path, _d) = reject(&bytes);
    assert!(matches!(err, Error::HeaderPastEnd { len: 3, file_len: 10, .. }), "{err:?}");
    assert_names(&err, &path, &[]);
    // The in-memory parser checks the same thing when handed a file length too short.
    let err = parse_header("mem", b"{}", 9).unwrap_err();
    assert!(matches!(err, Error::HeaderPastEnd { .. }), "{err:?}");
}

#[test]
fn huge_claimed_header_in_a_small_file_allocates_nothing() {
    // Claims 90 MB of header (under the 100 MB limit) but the file is 1 KB long: rejected against
    // the file size before a buffer for the header is allocated.
    let mut bytes = 90_000_000u64.to_le_bytes().to_vec();
    bytes.resize(1024, b' ');
    let dir = Dir::new();
    let path = dir.write("liar.safetensors", &bytes);
    let (result, largest) = largest_allocation_of(|| read_header(&path));
    let err = result.unwrap_err();
    assert!(matches!(err, Error::HeaderPastEnd { len: 90_000_000, file_len: 1024, .. }), "{err:?}");
    assert!(largest < 64 * 1024, "allocated {largest} bytes for a rejected header");
}

#[test]
fn read_header_allocates_the_header_and_no_more() {
    let header = obj(&[tensor("a", "F32", "[2]", 0, 8)]);
    let mut padded = header.clone();
    padded.resize(4 << 20, b' '); // a 4 MiB header, mostly padding
    let dir = Dir::new();
    let path = dir.write("big.safetensors", &raw(&padded, 8));
    let (result, largest) = largest_allocation_of(|| read_header(&path));
    assert_eq!(result.unwrap().tensors.len(), 1);
    assert!(largest >= 4 << 20, "the header is read into one buffer ({largest})");
    assert!(largest <= (4 << 20) + 4096, "allocated {largest} bytes for a {} byte header", 4 << 20);
}

#[test]
fn truncated_while_reading_the_header() {
    // A caller that sized the file before it shrank: the read ends early.
    let dir = Dir::new();
    let path = dir.write("short.safetensors", &raw(b"{}", 0));
    let mut file = File::open(&path).unwrap();
    let mut bytes = 100u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, &bytes).unwrap();
    let err = read_header_from(&path, &mut file, 200).unwrap_err();
    assert!(matches!(err, Error::UnexpectedEof { at: 8, .. }), "{err:?}");
    assert_names(&err, &path, &["header"]);
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = Dir::new();
    let path = dir.path().join("absent.safetensors");
    let err = read_header(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_names(&err, &path, &[]);
}

#[test]
fn header_of_exactly_the_limit_is_accepted() {
    // 100,000,000 bytes: the largest the format allows (a metadata value of ~100 MB).
    let prefix = br#"{"__metadata__":{"blob":""#;
    let suffix = br#""},"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    let mut header = Vec::with_capacity(MAX_HEADER_LEN as usize);
    header.extend_from_slice(prefix);
    header.resize(MAX_HEADER_LEN as usize - suffix.len(), b'x');
    header.extend_from_slice(suffix);
    assert_eq!(header.len() as u64, MAX_HEADER_LEN);
    let h = parse_header("mem", &header, 8 + MAX_HEADER_LEN + 4).unwrap();
    assert_eq!(h.metadata["blob"].len(), MAX_HEADER_LEN as usize - prefix.len() - suffix.len());
    assert_eq!(h.tensors[0].name, "t");

    // Through a file, too; one byte more is over the limit.
    let dir = Dir::new();
    let mut file = raw(&header, 4);
    let path = dir.write("max.safetensors", &file);
    assert_eq!(read_header(&path).unwrap().header_len, MAX_HEADER_LEN);
    file.insert(8, b' ');
    file[..8].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
    let path = dir.write("over.safetensors", &file);
    assert!(matches!(read_header(&path).unwrap_err(), Error::HeaderTooLarge { .. }));
}

#[test]
fn four_hundred_thousand_tensors() {
    // 400,000 tensors of 2 KiB: a 35 MB header in front of 800 MB of (sparse) data.
    let n = 400_000u64;
    let entries: Vec<(String, Dtype, Vec<u64>, u64)> =
        (0..n).map(|i| (format!("model.layers.{}.w{}", i / 8, i % 8), Dtype::BF16, vec![1024, 1], 2048)).collect();
    let header = header_json(&entries, &BTreeMap::from([("format".into(), "pt".into())]));
    let dir = Dir::new();
    let path = dir.write("many.safetensors", &raw(&header, 0));
    File::options().write(true).open(&path).unwrap().set_len(8 + header.len() as u64 + 2048 * n).unwrap();
    let (h, largest) = largest_allocation_of(|| read_header(&path).unwrap());
    assert_eq!(h.tensors.len(), n as usize);
    assert_eq!(h.data_len(), 2048 * n);
    assert_eq!(h.tensors[123_456].name, "model.layers.15432.w0");
    assert_eq!(h.tensors[123_456].shape, [1024, 1]);
    assert_eq!(h.tensors[123_456].data_offsets, (2048 * 123_456, 2048 * 123_457));
    // Memory follows the header, never the data: no single buffer beyond twice the header (the
    // header itself, and the tensor table as it grows).
    assert!(largest <= 2 * h.header_len as usize, "{largest} > 2 * {}", h.header_len);
}

// ---------------------------------------------------------------------------------------------
// The header text.

#[test]
fn header_not_utf8() {
    let mut header = obj(&[tensor("a", "U8", "[1]", 0, 1)]);
    header[2] = 0xFF; // inside the name
    let (err, path, _d) = reject(&raw(&header, 1));
    assert!(matches!(err, Error::HeaderNotUtf8 { valid_up_to: 2, .. }), "{err:?}");
    assert_names(&err, &path, &["UTF-8"]);
}

#[test]
fn header_not_starting_with_brace() {
    for header in [&b"[]"[..], b" {}", b"\"x\"", b""] {
        let (err, path, _d) = reject(&raw(header, 0));
        assert!(matches!(err, Error::HeaderStart { .. }), "{header:?}: {err:?}");
        assert_names(&err, &path, &[]);
    }
}

#[test]
fn header_bad_json() {
    for header in [
        &br#"{"a":"#[..],
        br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#,
        br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x"#,
        br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},}"#,
        br#"{'a':1}"#,
    ] {
        let (err, path, _d) = reject(&raw(header, 1));
        assert!(matches!(err, Error::HeaderJson { .. }), "{}: {err:?}", String::from_utf8_lossy(header));
        assert_names(&err, &path, &["JSON"]);
    }
    // Trailing spaces (the reference writer's padding) are fine.
    accept(&raw(br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}    "#, 1));
}

#[test]
fn tensor_entry_with_missing_or_wrong_fields() {
    for (entry, what) in [
        (r#""a":{"dtype":"U8","shape":[1]}"#, "data_offsets"),
        (r#""a":{"shape":[1],"data_offsets":[0,1]}"#, "dtype"),
        (r#""a":{"dtype":"U8","data_offsets":[0,1]}"#, "shape"),
        (r#""a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}"#, "a"),
        (r#""a":{"dtype":"U8","shape":1,"data_offsets":[0,1]}"#, "a"),
        (r#""a":{"dtype":8,"shape":[1],"data_offsets":[0,1]}"#, "a"),
        (r#""a":7"#, "a"),
    ] {
        let (err, path, _d) = reject(&raw(format!("{{{entry}}}").as_bytes(), 1));
        assert!(matches!(err, Error::HeaderJson { .. }), "{entry}: {err:?}");
        assert_names(&err, &path, &["`a`", what]);
    }
}

#[test]
fn metadata_must_map_strings_to_strings() {
    for meta in [r#"{"n":1}"#, r#"{"n":null}"#, r#"{"n":["x"]}"#, r#""text""#, r#"[]"#, r#"{"n":{"x":"y"}}"#] {
        let header = format!(r#"{{"__metadata__":{meta},{}}}"#, tensor("a", "U8", "[1]", 0, 1));
        let (err, path, _d) = reject(&raw(header.as_bytes(), 1));
        assert!(matches!(err, Error::BadMetadata { .. }), "{meta}: {err:?}");
        assert_names(&err, &path, &["__metadata__"]);
    }
    // Twice is also wrong.
    let header = format!(r#"{{"__metadata__":{{}},{},"__metadata__":{{}}}}"#, tensor("a", "U8", "[1]", 0, 1));
    let (err, _path, _d) = reject(&raw(header.as_bytes(), 1));
    assert!(matches!(err, Error::BadMetadata { .. }), "{err:?}");
    // A string map, an empty map and null are fine.
    for meta in [r#"{"format":"pt","":""}"#, "{}", "null"] {
        let header = format!(r#"{{"__metadata__":{meta},{}}}"#, tensor("a", "U8", "[1]", 0, 1));
        accept(&raw(header.as_bytes(), 1));
    }
}

#[test]
fn unknown_dtype() {
    for dtype in ["F128", "bf16", "", "F8_E4M3FN", "Q4_0"] {
        let (err, path, _d) = reject(&raw(&obj(&[tensor("w.0", dtype, "[1]", 0, 1)]), 1));
        assert!(matches!(err, Error::HeaderJson { .. }), "{dtype}: {err:?}");
        assert_names(&err, &path, &["w.0", &format!("unknown dtype `{dtype}`")]);
    }
}

#[test]
fn every_dtype_name_is_known() {
    for d in Dtype::ALL {
        let shape = if d.bits() < 8 { "[8]" } else { "[1]" };
        let len = d.bytes_for(if d.bits() < 8 { 8 } else { 1 }).unwrap();
        let h = accept(&raw(&obj(&[tensor("t", d.name(), shape, 0, len)]), len as usize));
        assert_eq!(h.tensors[0].dtype, d);
    }
}

#[test]
fn negative_or_fractional_dimension() {
    for shape in ["[-1]", "[1.5]", "[1e2]", "[18446744073709551616]", "[\"2\"]", "[null]"] {
        let (err, path, _d) = reject(&raw(&obj(&[tensor("neg", "U8", shape, 0, 1)]), 1));
        assert!(matches!(err, Error::HeaderJson { .. }), "{shape}: {err:?}");
        assert_names(&err, &path, &["neg"]);
    }
    for offsets in ["[-1,0]", "[0,1.0]"] {
        let header = format!(r#"{{"o":{{"dtype":"U8","shape":[1],"data_offsets":{offsets}}}}}"#);
        let (err, path, _d) = reject(&raw(header.as_bytes(), 1));
        assert!(matches!(err, Error::HeaderJson { .. }), "{offsets}: {err:?}");
        assert_names(&err, &path, &["`o`"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors.

#[test]
fn shape_product_overflows() {
    let big = 1u64 << 32;
    let (err, path, _d) = reject(&raw(&obj(&[tensor("huge", "U8", &format!("[{big},{big}]"), 0, 0)]), 0));
    assert!(
        matches!(&err, Error::ShapeOverflow { tensor, shape, .. } if tensor == "huge" && shape == &[big, big]),
        "{err:?}"
    );
    assert_names(&err, &path, &["huge"]);
    // The element count fits in u64 but the bit count does not.
    let (err, path, _d) = reject(&raw(&obj(&[tensor("bits", "F64", &format!("[{}]", 1u64 << 60), 0, 0)]), 0));
    assert!(matches!(err, Error::ShapeOverflow { .. }), "{err:?}");
    assert_names(&err, &path, &["bits"]);
    // A zero dimension makes any product zero: no overflow.
    accept(&raw(&obj(&[tensor("z", "F64", &format!("[{},0,{}]", u64::MAX, u64::MAX), 0, 0)]), 0));
}

#[test]
fn offsets_begin_after_end() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("rev", "U8", "[0]", 4, 0)]), 4));
    assert!(matches!(&err, Error::OffsetsReversed { tensor, begin: 4, end: 0, .. } if tensor == "rev"), "{err:?}");
    assert_names(&err, &path, &["rev"]);
}

#[test]
fn size_differs_from_dtype_and_shape() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("w", "F32", "[3]", 0, 8)]), 8));
    assert!(matches!(err, Error::SizeMismatch { expected: 12, actual: 8, .. }), "{err:?}");
    assert_names(&err, &path, &["`w`", "F32"]);
}

#[test]
fn sub_byte_dtype_not_filling_whole_bytes() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("fp4", "F4", "[3]", 0, 2)]), 2));
    assert!(matches!(err, Error::MisalignedSlice { elements: 3, dtype: "F4", .. }), "{err:?}");
    assert_names(&err, &path, &["fp4"]);
    let (err, _p, _d) = reject(&raw(&obj(&[tensor("fp6", "F6_E2M3", "[3]", 0, 3)]), 3));
    assert!(matches!(err, Error::MisalignedSlice { .. }), "{err:?}");
    // Whole bytes are fine: 4 F4 = 2 bytes, 4 F6 = 3 bytes.
    accept(&raw(&obj(&[tensor("a", "F4", "[4]", 0, 2), tensor("b", "F6_E3M2", "[2,2]", 2, 5)]), 5));
}

#[test]
fn hole_between_tensors() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("a", "U8", "[4]", 0, 4), tensor("b", "U8", "[4]", 8, 12)]), 12));
    assert!(matches!(&err, Error::NotContiguous { tensor, begin: 8, expected: 4, .. } if tensor == "b"), "{err:?}");
    assert_names(&err, &path, &["`b`"]);
}

#[test]
fn hole_before_the_first_tensor() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("first", "U8", "[4]", 2, 6)]), 6));
    assert!(matches!(err, Error::NotContiguous { begin: 2, expected: 0, .. }), "{err:?}");
    assert_names(&err, &path, &["first"]);
}

#[test]
fn overlapping_tensors() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("a", "U8", "[8]", 0, 8), tensor("b", "U8", "[8]", 4, 12)]), 12));
    assert!(matches!(&err, Error::NotContiguous { tensor, begin: 4, expected: 8, .. } if tensor == "b"), "{err:?}");
    assert_names(&err, &path, &["`b`"]);
    // Two tensors over the same bytes.
    let (err, _p, _d) = reject(&raw(&obj(&[tensor("a", "U8", "[4]", 0, 4), tensor("b", "U8", "[4]", 0, 4)]), 4));
    assert!(matches!(err, Error::NotContiguous { .. }), "{err:?}");
}

#[test]
fn trailing_bytes_after_the_last_tensor() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("a", "U8", "[4]", 0, 4)]), 5));
    let header_len = obj(&[tensor("a", "U8", "[4]", 0, 4)]).len() as u64;
    assert!(
        matches!(err, Error::DataLengthMismatch { data_end, file_len, .. } if data_end == 8 + header_len + 4 && file_len == data_end + 1),
        "{err:?}"
    );
    assert_names(&err, &path, &[]);
    // Also with no tensors at all.
    let (err, _p, _d) = reject(&raw(b"{}", 1));
    assert!(matches!(err, Error::DataLengthMismatch { .. }), "{err:?}");
}

#[test]
fn data_past_the_end_of_the_file() {
    let (err, path, _d) = reject(&raw(&obj(&[tensor("a", "U8", "[4]", 0, 4), tensor("b", "F32", "[4]", 4, 20)]), 12));
    assert!(matches!(err, Error::DataLengthMismatch { .. }), "{err:?}");
    assert_names(&err, &path, &[]);
}

#[test]
fn duplicate_tensor_names() {
    let (err, path, _d) =
        reject(&raw(&obj(&[tensor("twice", "U8", "[4]", 0, 4), tensor("twice", "U8", "[4]", 4, 8)]), 8));
    assert!(matches!(&err, Error::DuplicateTensor { tensor, .. } if tensor == "twice"), "{err:?}");
    assert_names(&err, &path, &["twice"]);
}

#[test]
fn empty_and_scalar_tensors_are_valid() {
    let h = accept(&raw(
        &obj(&[
            tensor("e1", "F32", "[0]", 0, 0),
            tensor("s", "F32", "[]", 0, 4),
            tensor("e2", "BF16", "[3,0,2]", 4, 4),
            tensor("v", "U8", "[2]", 4, 6),
        ]),
        6,
    ));
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["e1", "s", "e2", "v"]);
    assert!(accept(&raw(b"{}", 0)).tensors.is_empty());
}

#[test]
fn tensors_come_back_in_file_order() {
    let h = accept(&raw(
        &obj(&[tensor("z", "U8", "[2]", 0, 2), tensor("a", "U8", "[1]", 3, 4), tensor("m", "U8", "[1]", 2, 3)]),
        4,
    ));
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["z", "m", "a"]);
}

// ---------------------------------------------------------------------------------------------
// Sources: index files, directories, Hugging Face cache folders.

fn shard(dir: &Dir, name: &str, tensors: &[(&str, u64)]) -> PathBuf {
    let mut entries = Vec::new();
    let mut offset = 0;
    for (t, len) in tensors {
        entries.push(tensor(t, "U8", &format!("[{len}]"), offset, offset + len));
        offset += len;
    }
    dir.write(name, &raw(&obj(&entries), offset as usize))
}

fn index_json(map: &[(&str, &str)]) -> Vec<u8> {
    let weight_map: BTreeMap<&str, &str> = map.iter().copied().collect();
    serde_json::to_vec(&serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map})).unwrap()
}

fn assert_bad_index(err: &Error, index: &Path, names: &[&str]) {
    assert!(matches!(err, Error::BadIndex { .. }), "{err:?}");
    assert_names(err, index, names);
}

#[test]
fn index_shard_with_parent_dir() {
    let dir = Dir::new();
    shard(&dir, "outside.safetensors", &[("a", 1)]);
    let index = dir.write("m/model.safetensors.index.json", &index_json(&[("a", "../outside.safetensors")]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert_bad_index(&err, &index, &["../outside.safetensors", "`a`"]);
    // Also hidden in the middle of a path.
    shard(&dir, "m/sub/x.safetensors", &[("a", 1)]);
    let index = dir.write("m/model.safetensors.index.json", &index_json(&[("a", "sub/../../outside.safetensors")]));
    assert_bad_index(&Checkpoint::open(&index).unwrap_err(), &index, &["outside"]);
}

#[test]
fn index_shard_with_absolute_path() {
    let dir = Dir::new();
    let target = shard(&dir, "m/s.safetensors", &[("a", 1)]);
    let abs = target.to_str().unwrap();
    let index = dir.write("m/model.safetensors.index.json", &index_json(&[("a", abs)]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert_bad_index(&err, &index, &[abs]);
}

#[test]
fn index_shard_symlink_escaping_the_directory() {
    let dir = Dir::new();
    let outside = shard(&dir, "secret.safetensors", &[("a", 1)]);
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join("m/s.safetensors")).unwrap();
    let index = dir.write("m/model.safetensors.index.json", &index_json(&[("a", "s.safetensors")]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert_bad_index(&err, &index, &["s.safetensors", "outside"]);
    // A symlink that stays inside is fine.
    shard(&dir, "m/real.safetensors", &[("a", 1)]);
    std::fs::remove_file(dir.path().join("m/s.safetensors")).unwrap();
    std::os::unix::fs::symlink("real.safetensors", dir.path().join("m/s.safetensors")).unwrap();
    assert_eq!(Checkpoint::open(&index).unwrap().tensor_count(), 1);
}

#[test]
fn index_shard_missing() {
    let dir = Dir::new();
    let index = dir.write("model.safetensors.index.json", &index_json(&[("a", "nope.safetensors")]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert_bad_index(&err, &index, &["nope.safetensors"]);
}

#[test]
fn index_not_json() {
    let dir = Dir::new();
    let index = dir.write("model.safetensors.index.json", b"{\"weight_map\": [");
    assert_bad_index(&ShardIndex::read(&index).unwrap_err(), &index, &["JSON"]);
    let index = dir.write("model.safetensors.index.json", b"{\"weight_map\": {\"a\": 3}}");
    assert_bad_index(&ShardIndex::read(&index).unwrap_err(), &index, &[]);
}

#[test]
fn index_tensor_listed_but_missing_from_its_shard() {
    let dir = Dir::new();
    shard(&dir, "s1.safetensors", &[("a", 1)]);
    shard(&dir, "s2.safetensors", &[("b", 1)]);
    let index =
        dir.write("model.safetensors.index.json", &index_json(&[("a", "s1.safetensors"), ("b", "s1.safetensors")]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert_bad_index(&err, &index, &["`b`", "s1.safetensors"]);
    assert!(matches!(&err, Error::BadIndex { tensor: Some(t), .. } if t == "b"));
}

#[test]
fn tensor_in_two_shards() {
    let dir = Dir::new();
    shard(&dir, "s1.safetensors", &[("a", 1), ("both", 2)]);
    let s2 = shard(&dir, "s2.safetensors", &[("both", 2)]);
    let index =
        dir.write("model.safetensors.index.json", &index_json(&[("a", "s1.safetensors"), ("both", "s2.safetensors")]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert!(matches!(&err, Error::TensorInTwoFiles { tensor, .. } if tensor == "both"), "{err:?}");
    assert!(err.to_string().contains("s1.safetensors") && err.to_string().contains("s2.safetensors"), "{err}");
    assert!(err.file() == Some(s2.as_path()) || err.to_string().contains("s2.safetensors"));
    // Same in a directory without an index.
    std::fs::remove_file(&index).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::TensorInTwoFiles { tensor, .. } if tensor == "both"), "{err:?}");
}

#[test]
fn index_shard_with_a_bad_header_names_the_shard() {
    let dir = Dir::new();
    let s = dir.write("s.safetensors", &raw(&obj(&[tensor("a", "F32", "[3]", 0, 8)]), 8));
    let index = dir.write("model.safetensors.index.json", &index_json(&[("a", "s.safetensors")]));
    let err = Checkpoint::open(&index).unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err:?}");
    assert_names(&err, &s, &["`a`"]);
}

#[test]
fn directory_without_index_takes_every_safetensors_file_in_order() {
    let dir = Dir::new();
    shard(&dir, "b.safetensors", &[("y", 2)]);
    shard(&dir, "a.safetensors", &[("x", 1)]);
    dir.write("notes.txt", b"not a checkpoint");
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let names: Vec<_> = ckpt.files.iter().map(|f| f.path.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["a.safetensors", "b.safetensors"]);
    assert!(ckpt.index.is_none());
    assert_eq!(ckpt.total_bytes(), 3);
}

#[test]
fn directory_with_index_uses_the_index() {
    let dir = Dir::new();
    shard(&dir, "model-00001-of-00002.safetensors", &[("x", 1)]);
    shard(&dir, "model-00002-of-00002.safetensors", &[("y", 2)]);
    shard(&dir, "stray.safetensors", &[("x", 5)]); // not in the index: ignored
    dir.write(
        "model.safetensors.index.json",
        &index_json(&[("x", "model-00001-of-00002.safetensors"), ("y", "model-00002-of-00002.safetensors")]),
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.files.len(), 2);
    assert!(ckpt.index.is_some());
    assert_eq!(ckpt.total_bytes(), 3);
}

#[test]
fn empty_directory_is_a_bad_source() {
    let dir = Dir::new();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::BadSource { .. }), "{err:?}");
    assert_names(&err, dir.path(), &[]);
}

/// A Hugging Face cache folder as `huggingface_hub` lays it out: files in `blobs/` named by
/// hash, `snapshots/<rev>/` holding relative symlinks to them, `refs/main` naming the revision.
fn hf_cache(dir: &Dir, sharded: bool) -> PathBuf {
    let repo = dir.path().join("hub/models--org--name");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    dir.write("hub/models--org--name/refs/main", rev.as_bytes());
    let link = |name: &str, blob: &str, bytes: Vec<u8>| {
        std::fs::write(repo.join("blobs").join(blob), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(name)).unwrap();
    };
    if sharded {
        link("model-00001-of-00002.safetensors", "aaaa1", raw(&obj(&[tensor("x", "U8", "[1]", 0, 1)]), 1));
        link("model-00002-of-00002.safetensors", "aaaa2", raw(&obj(&[tensor("y", "U8", "[2]", 0, 2)]), 2));
        link(
            "model.safetensors.index.json",
            "aaaa3",
            index_json(&[("x", "model-00001-of-00002.safetensors"), ("y", "model-00002-of-00002.safetensors")]),
        );
    } else {
        link("model.safetensors", "bbbb1", raw(&obj(&[tensor("x", "U8", "[3]", 0, 3)]), 3));
    }
    repo
}

#[test]
fn hugging_face_cache_folder_single_file() {
    let dir = Dir::new();
    let repo = hf_cache(&dir, false);
    let ckpt = Checkpoint::open(&repo).unwrap();
    assert_eq!(ckpt.files.len(), 1);
    assert!(ckpt.files[0].path.starts_with(repo.join("snapshots")), "{:?}", ckpt.files[0].path);
    assert_eq!(ckpt.total_bytes(), 3);
}

#[test]
fn hugging_face_cache_folder_sharded() {
    let dir = Dir::new();
    let repo = hf_cache(&dir, true);
    let snap = repo.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    // The repo folder, the snapshot (what `snapshot_download` returns) and the index in it.
    for path in [repo.clone(), snap.clone(), snap.join("model.safetensors.index.json")] {
        let ckpt = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(ckpt.files.len(), 2);
        assert!(ckpt.index.is_some());
        assert_eq!(ckpt.total_bytes(), 3);
    }
    // Without `blobs/` beside `snapshots/` it is not a cache folder: the symlinks escape.
    std::fs::rename(repo.join("blobs"), repo.join("elsewhere")).unwrap();
    std::fs::create_dir(repo.join("blobs")).unwrap();
    let err = Checkpoint::open(&snap).unwrap_err();
    assert!(matches!(err, Error::BadIndex { .. } | Error::Io { .. }), "{err:?}");
}

#[test]
fn hugging_face_cache_shard_leading_outside_the_repo_folder() {
    let dir = Dir::new();
    let repo = hf_cache(&dir, true);
    let secret = shard(&dir, "secret.safetensors", &[("x", 1)]);
    let snap = repo.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::remove_file(snap.join("model-00001-of-00002.safetensors")).unwrap();
    std::os::unix::fs::symlink(&secret, snap.join("model-00001-of-00002.safetensors")).unwrap();
    let err = Checkpoint::open(&repo).unwrap_err();
    assert!(matches!(err, Error::BadIndex { .. }), "{err:?}");
    assert!(err.to_string().contains("outside"), "{err}");
}

#[test]
fn hugging_face_cache_with_bad_refs() {
    let dir = Dir::new();
    let repo = hf_cache(&dir, false);
    let refs = repo.join("refs/main");
    for rev in ["../../../etc", "", "not-a-snapshot"] {
        std::fs::write(&refs, rev).unwrap();
        let err = Checkpoint::open(&repo).unwrap_err();
        assert!(matches!(err, Error::BadSource { .. }), "{rev}: {err:?}");
        assert_names(&err, &refs, &[]);
    }
}

#[test]
fn hugging_face_cache_snapshot_that_loops_back() {
    // A snapshot that is itself laid out like a cache folder pointing at itself must not recurse
    // forever (a stack overflow is a signal, which the CLI contract forbids).
    let dir = Dir::new();
    let repo = dir.path().join("models--org--loop");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("refs/main"), "r").unwrap();
    std::os::unix::fs::symlink("..", repo.join("snapshots/r")).unwrap();
    let err = Checkpoint::open(&repo).unwrap_err();
    assert!(matches!(err, Error::BadSource { .. }), "{err:?}");
    // Followed once, not until the path is too long to open.
    assert!(!err.to_string().contains("snapshots/r/snapshots"), "{err}");
}
