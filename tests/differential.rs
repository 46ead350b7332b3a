//! Differential tests against the reference Rust `safetensors` crate (0.6, and 0.8 which knows
//! all 22 dtypes): generated headers and files, valid and broken. Whatever the reference rejects
//! we reject; whatever it accepts we accept, with identical names, dtypes, shapes, offsets and
//! metadata.
//!
//! Deliberate divergences (each has its own test below, and is kept out of the generated cases
//! or recognised when a mutation produces it):
//! - **Duplicate tensor names**: the reference deserializes into a map, so a repeated name
//!   silently replaces the earlier entry; we reject the file (`Error::DuplicateTensor`).
//! - **A header not starting with `{`** (leading whitespace): the reference has the check
//!   commented out ("add when we move to 0.4.0"); we reject (`Error::HeaderStart`).
//! - **C64, F8_E4M3FNUZ, F8_E5M2FNUZ**: unknown to safetensors 0.6, known to 0.8 and to us.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use weightstream::format::{read_header, write_to_vec, Header, WriteTensor};
use weightstream::{Dtype, Error};

/// Dtype names safetensors 0.6 does not know.
const NEWER_DTYPES: [&str; 3] = ["C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ"];
const UNKNOWN_DTYPES: [&str; 7] = ["F128", "bf16", "", "I4", "Q8_0", "F8_E4M3FN", "f32"];
/// Largest data section the generator writes: cases needing more get less (and both reject).
const MAX_DATA: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// What a parser made of a file, in a form both sides can be compared in.

/// One tensor: (name, dtype, shape, data offsets).
type TensorRow = (String, String, Vec<u64>, (u64, u64));

#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    header_len: u64,
    /// Sorted by name.
    tensors: Vec<TensorRow>,
    /// Offsets in file order.
    order: Vec<(u64, u64)>,
    metadata: BTreeMap<String, String>,
}

fn ours(path: &Path) -> Result<Parsed, Error> {
    let h: Header = read_header(path)?;
    let mut tensors: Vec<_> = h
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype.name().to_string(), t.shape.clone(), t.data_offsets))
        .collect();
    tensors.sort();
    let order = h.tensors.iter().map(|t| t.data_offsets).collect();
    Ok(Parsed { header_len: h.header_len, tensors, order, metadata: h.metadata })
}

macro_rules! reference_parser {
    ($name:ident, $krate:ident) => {
        fn $name(bytes: &[u8]) -> Result<Parsed, String> {
            let (n, meta) = $krate::SafeTensors::read_metadata(bytes).map_err(|e| format!("{e:?}"))?;
            let mut tensors: Vec<_> = meta
                .tensors()
                .into_iter()
                .map(|(name, info)| {
                    let shape = info.shape.iter().map(|&d| d as u64).collect();
                    let offsets = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
                    (name, info.dtype.to_string(), shape, offsets)
                })
                .collect();
            tensors.sort();
            let order = meta
                .offset_keys()
                .iter()
                .map(|k| {
                    let o = meta.info(k).expect("listed").data_offsets;
                    (o.0 as u64, o.1 as u64)
                })
                .collect();
            let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
            Ok(Parsed { header_len: n as u64, tensors, order, metadata })
        }
    };
}
reference_parser!(reference_06, safetensors);
reference_parser!(reference_08, safetensors_08);

// ---------------------------------------------------------------------------------------------
// Generated headers.

#[derive(Debug, Clone)]
struct GenTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    /// How its entry is written.
    form: Form,
}

#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// `{"dtype":..,"shape":..,"data_offsets":..}` with the fields in this order (indices).
    Object([usize; 3]),
    /// The same with an unknown extra field (ignored by both).
    ObjectWithExtra,
    /// `[dtype, shape, data_offsets]` (serde's derived visitors accept a sequence).
    Array,
    /// A required field left out.
    MissingField(usize),
}

#[derive(Debug, Clone)]
enum Meta {
    Absent,
    Null,
    Map(Vec<(String, String)>),
    /// Raw JSON that is not a map of string to string (or is one in an unusual spelling).
    Raw(&'static str),
}

#[derive(Debug, Clone)]
enum Mutation {
    ShiftBegin(usize, i64),
    ShiftEnd(usize, i64),
    SwapOffsets(usize),
    SetOffsets(usize, u64, u64),
    /// Shift both offsets (same size: an overlap or a hole).
    Move(usize, i64),
    /// Shift both offsets of the last tensor in file order (with `fit_data`: a clean overlap).
    MoveLast(i64),
    /// Change the data section's length by this much.
    DataDelta(i64),
}

#[derive(Debug, Clone)]
enum ByteMutation {
    Truncate(usize),
    Replace(usize, u8),
    Insert(usize, u8),
    /// Change the length prefix by this much (the bytes stay).
    LengthDelta(i64),
}

#[derive(Debug, Clone)]
struct Case {
    tensors: Vec<GenTensor>,
    /// File order: a permutation of the tensor indices.
    layout: Vec<usize>,
    meta: Meta,
    meta_position: usize,
    mutations: Vec<Mutation>,
    /// After the mutations, size the data section to where the furthest tensor ends (so that a
    /// mutation breaks only the layout, not also the file length).
    fit_data: bool,
    bytes: Vec<ByteMutation>,
    pretty: bool,
    padding: usize,
}

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 0u64..5,
        2 => 5u64..70,
        1 => Just(1u64 << 32),
        1 => Just(1u64 << 62),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn dtype_name() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => proptest::sample::select(Dtype::ALL.to_vec()).prop_map(|d| d.name().to_string()),
        1 => proptest::sample::select(UNKNOWN_DTYPES.to_vec()).prop_map(str::to_string),
    ]
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        30 => proptest::sample::select(vec![[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1]]).prop_map(Form::Object),
        2 => Just(Form::ObjectWithExtra),
        1 => Just(Form::Array),
        1 => (0usize..3).prop_map(Form::MissingField),
    ]
}

fn name_stem() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z_.]{0,12}",
        1 => "\\PC{0,6}",
        1 => Just("__metadata".to_string()),
    ]
}

fn tensors() -> impl Strategy<Value = Vec<GenTensor>> {
    proptest::collection::vec((name_stem(), dtype_name(), proptest::collection::vec(dim(), 0..4), form()), 0..7)
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                // A unique suffix keeps names unique (duplicates are tested on their own).
                .map(|(i, (stem, dtype, shape, form))| GenTensor { name: format!("{stem}#{i}"), dtype, shape, form })
                .collect()
        })
}

fn meta() -> impl Strategy<Value = Meta> {
    prop_oneof![
        6 => Just(Meta::Absent),
        1 => Just(Meta::Null),
        4 => proptest::collection::vec(("\\PC{0,8}", "\\PC{0,12}"), 0..4).prop_map(Meta::Map),
        2 => proptest::sample::select(vec![
            r#"{"a":1}"#,
            r#"{"a":null}"#,
            r#"{"a":["x"]}"#,
            r#"{"a":{"b":"c"}}"#,
            r#"[]"#,
            r#""text""#,
            r#"7"#,
            r#"{"a":"x","a":"y"}"#,
            r#"{"\u0041":"\ud83d\ude00"}"#,
            r#"{"a":"\ud800"}"#,
        ])
        .prop_map(Meta::Raw),
    ]
}

fn mutation(n: usize) -> impl Strategy<Value = Mutation> {
    let i = 0..n.max(1);
    prop_oneof![
        1 => (i.clone(), -3i64..4).prop_map(|(i, d)| Mutation::ShiftBegin(i, d)),
        1 => (i.clone(), -3i64..4).prop_map(|(i, d)| Mutation::ShiftEnd(i, d)),
        1 => i.clone().prop_map(Mutation::SwapOffsets),
        1 => (i.clone(), 0u64..40, 0u64..40).prop_map(|(i, b, e)| Mutation::SetOffsets(i, b, e)),
        2 => (i, -3i64..4).prop_map(|(i, d)| Mutation::Move(i, d)),
        1 => (-3i64..4).prop_map(Mutation::DataDelta),
        2 => (-3i64..4).prop_map(Mutation::MoveLast),
    ]
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        (0usize..400).prop_map(ByteMutation::Truncate),
        (0usize..400, any::<u8>()).prop_map(|(p, b)| ByteMutation::Replace(p, b)),
        (0usize..400, proptest::sample::select(b"{}[],:\"\\ 0123456789-.e".to_vec()))
            .prop_map(|(p, b)| ByteMutation::Insert(p, b)),
        (-4i64..5).prop_map(ByteMutation::LengthDelta),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    tensors().prop_flat_map(|tensors| {
        let n = tensors.len();
        (
            (Just(tensors), Just((0..n).collect::<Vec<_>>()).prop_shuffle(), meta(), 0..n + 1),
            prop_oneof![3 => Just(vec![]), 2 => proptest::collection::vec(mutation(n), 1..3)],
            any::<bool>(),
            prop_oneof![6 => Just(vec![]), 1 => proptest::collection::vec(byte_mutation(), 1..3)],
            any::<bool>(),
            0usize..9,
        )
            .prop_map(
                |((tensors, layout, meta, meta_position), mutations, fit_data, bytes, pretty, padding)| Case {
                    tensors,
                    layout,
                    meta,
                    meta_position,
                    mutations,
                    fit_data,
                    bytes,
                    pretty,
                    padding,
                },
            )
    })
}

/// Bytes a tensor needs, or a stand-in when its shape overflows or does not fill whole bytes.
fn size_of(t: &GenTensor) -> u64 {
    let dtype: Option<Dtype> = t.dtype.parse().ok();
    let elements = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    match (dtype, elements) {
        (Some(d), Some(n)) => d.bytes_for(n).unwrap_or(1),
        _ => 1,
    }
}

fn build(case: &Case) -> Vec<u8> {
    // Offsets in layout order, then the mutations.
    let mut offsets = vec![(0u64, 0u64); case.tensors.len()];
    let mut at = 0u64;
    for &i in &case.layout {
        let end = at.saturating_add(size_of(&case.tensors[i]));
        offsets[i] = (at, end);
        at = end;
    }
    let mut data_len = at;
    let mut data_delta = 0i64;
    for m in &case.mutations {
        let shift = |v: u64, d: i64| v.saturating_add_signed(d);
        match *m {
            Mutation::ShiftBegin(i, d) if i < offsets.len() => offsets[i].0 = shift(offsets[i].0, d),
            Mutation::ShiftEnd(i, d) if i < offsets.len() => offsets[i].1 = shift(offsets[i].1, d),
            Mutation::SwapOffsets(i) if i < offsets.len() => offsets[i] = (offsets[i].1, offsets[i].0),
            Mutation::SetOffsets(i, b, e) if i < offsets.len() => offsets[i] = (b, e),
            Mutation::Move(i, d) if i < offsets.len() => offsets[i] = (shift(offsets[i].0, d), shift(offsets[i].1, d)),
            Mutation::MoveLast(d) if !case.layout.is_empty() => {
                let i = case.layout[case.layout.len() - 1];
                offsets[i] = (shift(offsets[i].0, d), shift(offsets[i].1, d))
            }
            Mutation::DataDelta(d) => data_delta += d,
            _ => {}
        }
    }
    if case.fit_data && !case.mutations.is_empty() {
        data_len = offsets.iter().map(|o| o.1).max().unwrap_or(0);
    }
    let data_len = data_len.saturating_add_signed(data_delta);

    let sep = if case.pretty { "\n  " } else { "" };
    let colon = if case.pretty { ": " } else { ":" };
    let mut entries: Vec<String> = case
        .tensors
        .iter()
        .zip(&offsets)
        .map(|(t, &(b, e))| {
            let key = serde_json::to_string(&t.name).unwrap();
            let dtype = serde_json::to_string(&t.dtype).unwrap();
            let shape = serde_json::to_string(&t.shape).unwrap();
            let offs = format!("[{b},{sep}{e}]");
            let fields = [
                format!("\"dtype\"{colon}{dtype}"),
                format!("\"shape\"{colon}{shape}"),
                format!("\"data_offsets\"{colon}{offs}"),
            ];
            let value = match &t.form {
                Form::Object(order) => {
                    format!("{{{}}}", order.map(|k| fields[k].clone()).join(","))
                }
                Form::ObjectWithExtra => {
                    format!("{{{},\"extra\":[1,{{\"x\":null}}]}}", fields.join(","))
                }
                Form::Array => format!("[{dtype},{shape},{offs}]"),
                Form::MissingField(k) => {
                    let kept: Vec<_> = (0..3).filter(|&j| j != *k).map(|j| fields[j].clone()).collect();
                    format!("{{{}}}", kept.join(","))
                }
            };
            format!("{key}{colon}{value}")
        })
        .collect();
    let meta = match &case.meta {
        Meta::Absent => None,
        Meta::Null => Some("null".to_string()),
        Meta::Map(kv) => {
            let fields: Vec<String> = kv
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap()))
                .collect();
            Some(format!("{{{}}}", fields.join(",")))
        }
        Meta::Raw(raw) => Some(raw.to_string()),
    };
    if let Some(m) = meta {
        entries.insert(case.meta_position.min(entries.len()), format!("\"__metadata__\"{colon}{m}"));
    }
    let mut header = format!("{{{sep}{}}}", entries.join(&format!(",{sep}"))).into_bytes();
    header.resize(header.len() + case.padding, b' ');

    let mut header_len = header.len() as u64;
    for m in &case.bytes {
        match *m {
            ByteMutation::Truncate(p) => header.truncate(p),
            ByteMutation::Replace(p, b) if p < header.len() => header[p] = b,
            ByteMutation::Insert(p, b) => header.insert(p.min(header.len()), b),
            ByteMutation::LengthDelta(_) | ByteMutation::Replace(..) => {}
        }
        header_len = header.len() as u64;
    }
    for m in &case.bytes {
        if let ByteMutation::LengthDelta(d) = *m {
            header_len = header_len.saturating_add_signed(d);
        }
    }

    let mut file = header_len.to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    // Deterministic data so that the byte round trip means something.
    let data_len = data_len.min(MAX_DATA) as usize;
    file.extend((0..data_len).map(|i| (i * 31 % 251) as u8));
    file
}

// ---------------------------------------------------------------------------------------------
// The comparison.

#[derive(Default)]
struct Stats {
    cases: Cell<usize>,
    both_accept: Cell<usize>,
    both_reject: Cell<usize>,
    dup_or_start_divergence: Cell<usize>,
}

fn bump(c: &Cell<usize>) {
    c.set(c.get() + 1);
}

/// Compare ours with both references on one file; `Err` describes a disagreement.
fn compare(bytes: &[u8], path: &Path, stats: &Stats) -> Result<(), TestCaseError> {
    std::fs::write(path, bytes).unwrap();
    bump(&stats.cases);
    let ours = ours(path);
    let r08 = reference_08(bytes);
    let r06 = reference_06(bytes);
    let text = String::from_utf8_lossy(bytes);

    // The documented divergences: we are stricter.
    if let Err(e @ (Error::DuplicateTensor { .. } | Error::HeaderStart { .. })) = &ours {
        let header_start = bytes.get(8).copied();
        let leading_ws = matches!(header_start, Some(b' ' | b'\t' | b'\n' | b'\r'));
        prop_assert!(
            matches!(e, Error::DuplicateTensor { .. }) || leading_ws || r08.is_err(),
            "we reject with {e} but the reference accepts, and this is no documented divergence"
        );
        if r08.is_ok() {
            bump(&stats.dup_or_start_divergence);
        } else {
            bump(&stats.both_reject);
        }
        return Ok(());
    }

    match (&ours, &r08) {
        (Ok(a), Ok(b)) => {
            prop_assert_eq!(a, b);
            bump(&stats.both_accept);
        }
        (Err(_), Err(_)) => bump(&stats.both_reject),
        (Ok(a), Err(e)) => prop_assert!(false, "reference 0.8 rejects ({e}) but we accept: {a:?}"),
        (Err(e), Ok(b)) => prop_assert!(false, "we reject ({e}) but reference 0.8 accepts: {b:?}"),
    }

    // 0.6 agrees too, except that it does not know the newer dtypes.
    let uses_newer = NEWER_DTYPES.iter().any(|d| text.contains(d));
    match (&ours, &r06) {
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(_)) if uses_newer => {}
        (Ok(a), Err(e)) => prop_assert!(false, "reference 0.6 rejects ({e}) but we accept: {a:?}"),
        (Err(e), Ok(b)) => prop_assert!(false, "we reject ({e}) but reference 0.6 accepts: {b:?}"),
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(3000)
}

#[test]
fn generated_headers_agree_with_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.safetensors");
    let stats = Stats::default();
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let result = runner.run(&case(), |case| compare(&build(&case), &path, &stats));
    if let Err(e) = result {
        panic!("{e}");
    }
    let (n, ok, bad, div) =
        (stats.cases.get(), stats.both_accept.get(), stats.both_reject.get(), stats.dup_or_start_divergence.get());
    println!("{n} files: both accept {ok}, both reject {bad}, documented divergence {div}");
    // The generator must exercise both sides, or the agreement means little.
    assert!(ok * 5 >= n, "only {ok} of {n} generated files were valid");
    assert!(bad * 5 >= n, "only {bad} of {n} generated files were invalid");
}

#[test]
fn every_mutation_kind_is_exercised() {
    // Each mutation of a valid file, applied on its own, is seen by both references the way we
    // see it (a fixed file, so that no kind depends on the generator's luck).
    let base = Case {
        tensors: vec![
            GenTensor { name: "a".into(), dtype: "F32".into(), shape: vec![2, 2], form: Form::Object([0, 1, 2]) },
            GenTensor { name: "b".into(), dtype: "F4".into(), shape: vec![4], form: Form::Object([2, 1, 0]) },
            GenTensor { name: "c".into(), dtype: "U8".into(), shape: vec![0], form: Form::Object([0, 1, 2]) },
        ],
        layout: vec![1, 0, 2],
        meta: Meta::Map(vec![("format".into(), "pt".into())]),
        meta_position: 1,
        mutations: vec![],
        fit_data: true,
        bytes: vec![],
        pretty: false,
        padding: 3,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let stats = Stats::default();
    compare(&build(&base), &path, &stats).unwrap();
    assert_eq!(stats.both_accept.get(), 1, "the base file is valid");
    let mutations = [
        Mutation::ShiftBegin(0, 1),
        Mutation::ShiftBegin(1, 1),
        Mutation::ShiftEnd(0, -1),
        Mutation::ShiftEnd(2, 1),
        Mutation::SwapOffsets(0),
        Mutation::SetOffsets(2, 0, 0),
        Mutation::Move(0, -1),
        Mutation::Move(2, 1),
        Mutation::DataDelta(1),
        Mutation::DataDelta(-1),
    ];
    for m in mutations {
        let case = Case { mutations: vec![m.clone()], ..base.clone() };
        compare(&build(&case), &path, &stats).unwrap_or_else(|e| panic!("{m:?}: {e}"));
    }
    // The last tensor in file order moved back over its neighbour, the file cut to fit: only
    // the overlap is wrong.
    let tail = Case { layout: vec![2, 1, 0], ..base.clone() };
    for m in [Mutation::MoveLast(-1), Mutation::MoveLast(-2), Mutation::MoveLast(1), Mutation::Move(2, 1)] {
        let case = Case { mutations: vec![m.clone()], ..tail.clone() };
        compare(&build(&case), &path, &stats).unwrap_or_else(|e| panic!("{m:?}: {e}"));
    }
    for form in [Form::ObjectWithExtra, Form::Array, Form::MissingField(0), Form::MissingField(2)] {
        let mut case = base.clone();
        case.tensors[0].form = form.clone();
        compare(&build(&case), &path, &stats).unwrap_or_else(|e| panic!("{form:?}: {e}"));
    }
    for b in [ByteMutation::Truncate(20), ByteMutation::LengthDelta(-1), ByteMutation::LengthDelta(1)] {
        let case = Case { bytes: vec![b.clone()], ..base.clone() };
        compare(&build(&case), &path, &stats).unwrap_or_else(|e| panic!("{b:?}: {e}"));
    }
    // SetOffsets(2, 0, 0) moves the empty tensor to offset 0, where the file's first tensor also
    // starts: a tie both sides accept.
    assert!(stats.both_accept.get() >= 3, "{}", stats.both_accept.get());
    assert!(stats.both_reject.get() >= 14, "{}", stats.both_reject.get());
}

// ---------------------------------------------------------------------------------------------
// Whole files written by each side, read by the other.

fn data_for(dtype: Dtype, shape: &[u64], seed: u8) -> Option<Vec<u8>> {
    let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    let len = dtype.bytes_for(n)?;
    (len <= 4096).then(|| (0..len).map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed)).collect())
}

fn valid_tensors() -> impl Strategy<Value = Vec<(String, Dtype, Vec<u64>, Vec<u8>)>> {
    let one = (proptest::sample::select(Dtype::ALL.to_vec()), proptest::collection::vec(0u64..6, 0..4), any::<u8>())
        .prop_filter_map("whole bytes", |(d, shape, seed)| data_for(d, &shape, seed).map(|data| (d, shape, data)));
    proptest::collection::btree_map("[a-z][a-z0-9_.]{0,10}", one, 0..8)
        .prop_map(|m| m.into_iter().map(|(name, (d, s, data))| (name, d, s, data)).collect())
}

fn reference_dtype(d: Dtype) -> safetensors_08::Dtype {
    serde_json::from_value(serde_json::Value::String(d.name().into())).expect("0.8 knows every dtype")
}

proptest! {
    #![proptest_config(Config { cases: 400, failure_persistence: None, ..Config::default() })]

    /// Files from our writer are read by the reference with the same tensors and bytes.
    #[test]
    fn our_files_read_by_the_reference(tensors in valid_tensors(), meta in proptest::collection::btree_map("\\PC{0,6}", "\\PC{0,6}", 0..3)) {
        let writes: Vec<WriteTensor> = tensors.iter().map(|(n, d, s, data)| WriteTensor::new(n.clone(), *d, s.clone(), data)).collect();
        let bytes = write_to_vec(&writes, &meta).unwrap();
        let st = safetensors_08::SafeTensors::deserialize(&bytes).unwrap();
        prop_assert_eq!(st.len(), tensors.len());
        for (name, dtype, shape, data) in &tensors {
            let view = st.tensor(name).unwrap();
            prop_assert_eq!(view.dtype().to_string(), dtype.name());
            prop_assert_eq!(view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(), shape.clone());
            prop_assert_eq!(view.data(), &data[..]);
        }
        let (_, m) = safetensors_08::SafeTensors::read_metadata(&bytes).unwrap();
        let their_meta: BTreeMap<String, String> = m.metadata().clone().unwrap_or_default().into_iter().collect();
        prop_assert_eq!(their_meta, meta);
    }

    /// Files from the reference writer are read by us with the same tensors and bytes.
    #[test]
    fn reference_files_read_by_us(tensors in valid_tensors(), meta in proptest::option::of(proptest::collection::hash_map("\\PC{0,6}", "\\PC{0,6}", 0..3))) {
        let views: Vec<(String, safetensors_08::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, data)| {
                let shape: Vec<usize> = s.iter().map(|&x| x as usize).collect();
                (n.clone(), safetensors_08::tensor::TensorView::new(reference_dtype(*d), shape, data).unwrap())
            })
            .collect();
        let bytes = safetensors_08::serialize(views, meta.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = reference_08(&bytes) {
            // The reference writer is not always right (see
            // `reference_writer_with_no_tensors_and_metadata_writes_invalid_json`): where its own
            // reader rejects what it wrote, so do we.
            prop_assert!(read_header(&path).is_err(), "the reference rejects its own file ({e}), we accept it");
            return Ok(());
        }
        let h = read_header(&path).unwrap();
        prop_assert_eq!(h.tensors.len(), tensors.len());
        let by_name: HashMap<&str, _> = h.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for (name, dtype, shape, data) in &tensors {
            let t = by_name[name.as_str()];
            prop_assert_eq!(t.dtype, *dtype);
            prop_assert_eq!(&t.shape, shape);
            let at = (h.data_start + t.data_offsets.0) as usize;
            prop_assert_eq!(&bytes[at..at + t.byte_len() as usize], &data[..]);
        }
        let want: BTreeMap<String, String> = meta.unwrap_or_default().into_iter().collect();
        prop_assert_eq!(h.metadata, want);
    }
}

// ---------------------------------------------------------------------------------------------
// The documented divergences, each shown on its own.

fn file(header: &str, data_len: usize) -> Vec<u8> {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header.as_bytes());
    f.resize(f.len() + data_len, 0);
    f
}

fn ours_on(bytes: &[u8]) -> Result<Parsed, Error> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.safetensors");
    std::fs::write(&path, bytes).unwrap();
    ours(&path)
}

#[test]
fn divergence_duplicate_names_we_reject_the_reference_keeps_the_last() {
    // Both entries describe the same bytes; the reference keeps one, we reject the file.
    let bytes = file(
        r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#,
        4,
    );
    let r = reference_08(&bytes).expect("the reference accepts a repeated name");
    assert_eq!(r.tensors.len(), 1);
    assert_eq!(r.tensors[0].1, "I8", "the reference keeps the last entry");
    assert!(reference_06(&bytes).is_ok());
    let err = ours_on(&bytes).unwrap_err();
    assert!(matches!(&err, Error::DuplicateTensor { tensor, .. } if tensor == "w"), "{err:?}");
}

#[test]
fn divergence_leading_whitespace_we_reject_the_reference_accepts() {
    let bytes = file(r#"  {"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1);
    assert!(reference_06(&bytes).is_ok());
    assert!(reference_08(&bytes).is_ok());
    assert!(matches!(ours_on(&bytes), Err(Error::HeaderStart { .. })));
}

#[test]
fn divergence_newer_dtypes_unknown_to_0_6() {
    for d in NEWER_DTYPES {
        let bytes = file(
            &format!(r#"{{"w":{{"dtype":"{d}","shape":[2],"data_offsets":[0,{}]}}}}"#, if d == "C64" { 16 } else { 2 }),
            if d == "C64" { 16 } else { 2 },
        );
        assert!(reference_06(&bytes).is_err(), "{d}");
        let theirs = reference_08(&bytes).unwrap();
        assert_eq!(ours_on(&bytes).unwrap(), theirs, "{d}");
    }
}

#[test]
fn reference_writer_with_no_tensors_and_metadata_writes_invalid_json() {
    // safetensors 0.6 and 0.8 write `{},"__metadata__":{}}` for zero tensors and some metadata;
    // both its reader and ours reject that file. Our writer produces a valid one.
    let none: Vec<(String, safetensors_08::tensor::TensorView)> = vec![];
    let bytes = safetensors_08::serialize(none, Some(HashMap::new())).unwrap();
    assert!(reference_08(&bytes).is_err());
    assert!(matches!(ours_on(&bytes), Err(Error::HeaderJson { .. })));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = write_to_vec(&[], &meta).unwrap();
    assert_eq!(reference_08(&bytes).unwrap(), ours_on(&bytes).unwrap());
}
