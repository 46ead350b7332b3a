//! The candle backend (feature `candle`): small files written by our writer for the backend's
//! contract (shapes, missing tensors, dtypes, shards, errors), and a real model
//! (all-MiniLM-L6-v2, `WEIGHTSTREAM_MINILM_DIR`) against candle's own mmap loader.
#![cfg(feature = "candle")]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use half::{bf16, f16};
use weightstream::candle::{var_builder, WeightstreamBackend};
use weightstream::format::{write_file, WriteTensor};
use weightstream::{Dtype, Error, ErrorKind, Loader};

#[allow(dead_code)] // its `main` is the example's
#[path = "../examples/candle_bert.rs"]
mod candle_bert;

fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// One file with the given tensors, in a temp dir kept alive by the caller.
fn file(tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let w: Vec<WriteTensor> = tensors.iter().map(|(n, d, s, b)| WriteTensor::new(*n, *d, s.clone(), b)).collect();
    write_file(&path, &w, &Default::default()).unwrap();
    (dir, path)
}

/// The error under candle's backtrace and context wrappers.
fn root(e: &candle_core::Error) -> &candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } | candle_core::Error::Context { inner, .. } => root(inner),
        e => e,
    }
}

fn cpu() -> Device {
    Device::Cpu
}

#[test]
fn each_dtype_maps_to_candle_with_its_values() {
    let u8s: Vec<u8> = vec![0, 1, 254, 255];
    let i64s: Vec<i64> = vec![-1, 0, i64::MAX, i64::MIN];
    let f32s: Vec<f32> = vec![1.5, -2.25, f32::MAX, 0.0];
    let f16s: Vec<f16> = f32s[..2].iter().map(|&x| f16::from_f32(x)).collect();
    let bf16s: Vec<bf16> = f32s.iter().map(|&x| bf16::from_f32(x)).collect();
    let i32s: Vec<i32> = vec![-7, 7];
    let u32s: Vec<u32> = vec![u32::MAX, 3];
    let f64s: Vec<f64> = vec![1e300, -0.5];
    let (_d, p) = file(&[
        ("u8", Dtype::U8, vec![4], u8s.clone()),
        ("i64", Dtype::I64, vec![2, 2], bytes(&i64s)),
        ("f32", Dtype::F32, vec![4], bytes(&f32s)),
        ("f16", Dtype::F16, vec![2], bytes(&f16s)),
        ("bf16", Dtype::BF16, vec![4], bytes(&bf16s)),
        ("i32", Dtype::I32, vec![2], bytes(&i32s)),
        ("u32", Dtype::U32, vec![2], bytes(&u32s)),
        ("f64", Dtype::F64, vec![2], bytes(&f64s)),
        ("f8", Dtype::F8_E4M3, vec![3], vec![0x38, 0x40, 0xb8]), // 1, 2, -1
    ]);
    let b = WeightstreamBackend::new(&Loader::new(), &p, &cpu()).unwrap();
    let t = b.tensors();
    assert_eq!(t["u8"].to_vec1::<u8>().unwrap(), u8s);
    assert_eq!(t["i64"].dims(), [2, 2]);
    assert_eq!(t["i64"].flatten_all().unwrap().to_vec1::<i64>().unwrap(), i64s);
    assert_eq!(t["f32"].to_vec1::<f32>().unwrap(), f32s);
    assert_eq!(t["f16"].to_vec1::<f16>().unwrap(), f16s);
    assert_eq!(t["bf16"].to_vec1::<bf16>().unwrap(), bf16s);
    assert_eq!(t["i32"].to_vec1::<i32>().unwrap(), i32s);
    assert_eq!(t["u32"].to_vec1::<u32>().unwrap(), u32s);
    assert_eq!(t["f64"].to_vec1::<f64>().unwrap(), f64s);
    assert_eq!(t["f8"].dtype(), DType::F8E4M3);
    assert_eq!(t["f8"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [1.0, 2.0, -1.0]);
    let dtypes: Vec<DType> = ["u8", "i64", "f32", "f16", "bf16"].iter().map(|n| t[*n].dtype()).collect();
    assert_eq!(dtypes, [DType::U8, DType::I64, DType::F32, DType::F16, DType::BF16]);
    // The load filled candle's Vecs themselves (sized by `describe`), each byte once.
    let total = 4 + 32 + 16 + 4 + 8 + 8 + 8 + 16 + 3;
    assert_eq!((b.stats().bytes_loaded, b.stats().bytes_read), (total, total));
}

#[test]
fn shape_mismatch_and_missing_tensor_are_candles_errors() {
    let (_d, p) = file(&[("a.w", Dtype::F32, vec![2, 2], bytes(&[1f32, 2., 3., 4.]))]);
    let vb = var_builder(&Loader::new(), &p, DType::F32, &cpu()).unwrap();
    let err = vb.pp("a").get((2, 3), "w").unwrap_err();
    assert!(
        matches!(root(&err), candle_core::Error::UnexpectedShape { ref msg, .. } if msg == "shape mismatch for a.w"),
        "{err}"
    );
    assert!(err.to_string().contains("[2, 3]") && err.to_string().contains("[2, 2]"), "{err}");
    let err = vb.get(4, "a.missing").unwrap_err();
    assert!(matches!(root(&err), candle_core::Error::CannotFindTensor { path } if path == "a.missing"), "{err}");
    assert!(vb.contains_tensor("a.w") && !vb.contains_tensor("a.missing"));
    let any_shape = vb.get_unchecked("a.w").unwrap();
    assert_eq!(any_shape.dims(), [2, 2]);
}

#[test]
fn loader_dtype_converts_on_the_way_and_the_asked_dtype_after() {
    let vals = [1.0f32, -2.5, 0.333, 65504.0];
    let b16: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
    let (_d, p) = file(&[("w", Dtype::BF16, vec![4], bytes(&b16)), ("ids", Dtype::I64, vec![1], bytes(&[5i64]))]);
    // The loader's dtype: converted by weightstream into an F32 Vec (integers kept).
    let b = WeightstreamBackend::new(&Loader::new().dtype(Dtype::F32), &p, &cpu()).unwrap();
    let want: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
    assert_eq!(b.tensors()["w"].to_vec1::<f32>().unwrap(), want);
    assert_eq!(b.tensors()["ids"].dtype(), DType::I64);
    assert_eq!(b.stats().bytes_loaded, 16 + 8);
    // The asked dtype: candle's `to_dtype`, as its own backends do.
    let vb = var_builder(&Loader::new(), &p, DType::F16, &cpu()).unwrap();
    let got = vb.get(4, "w").unwrap();
    assert_eq!(got.dtype(), DType::F16);
    let direct = Tensor::new(b16.as_slice(), &cpu()).unwrap().to_dtype(DType::F16).unwrap();
    assert_eq!(got.to_vec1::<f16>().unwrap(), direct.to_vec1::<f16>().unwrap());
}

#[test]
fn a_shard_loader_hands_out_its_block() {
    let vals: Vec<f32> = (0..8).map(|x| x as f32).collect();
    let (_d, p) = file(&[("w", Dtype::F32, vec![4, 2], bytes(&vals)), ("b", Dtype::F32, vec![2], bytes(&[9f32, 8.]))]);
    let loader = Loader::new().shard(1, 2).split("w", 0);
    let vb = var_builder(&loader, &p, DType::F32, &cpu()).unwrap();
    assert_eq!(vb.get((2, 2), "w").unwrap().to_vec2::<f32>().unwrap(), [[4., 5.], [6., 7.]]);
    assert_eq!(vb.get(2, "b").unwrap().to_vec1::<f32>().unwrap(), [9., 8.]); // not split: whole
    assert!(vb.get((4, 2), "w").is_err());
    let loader = Loader::new().shard(0, 2).split("w", 1);
    let vb = var_builder(&loader, &p, DType::F32, &cpu()).unwrap();
    assert_eq!(vb.get((4, 1), "w").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0., 2., 4., 6.]);
}

#[test]
fn a_dtype_candle_lacks_is_an_error_naming_the_tensor() {
    let (_d, p) = file(&[("ok", Dtype::U8, vec![1], vec![1]), ("counts", Dtype::U16, vec![2], vec![1, 0, 2, 0])]);
    let err = WeightstreamBackend::new(&Loader::new(), &p, &cpu()).unwrap_err();
    assert!(matches!(err, Error::BadDestination { ref tensor, .. } if tensor == "counts"), "{err}");
    assert!(err.to_string().contains("candle has no dtype U16"), "{err}");
    // Through `?` in candle code, the message stays.
    let as_candle: candle_core::Error = err.into();
    assert!(as_candle.to_string().contains("`counts`"), "{as_candle}");
    // Left out by `only`, it is no error.
    let b = WeightstreamBackend::new(&Loader::new().only("ok"), &p, &cpu()).unwrap();
    assert_eq!(b.tensors().len(), 1);
}

#[test]
fn a_device_loader_is_refused_not_changed() {
    let (_d, p) = file(&[("w", Dtype::U8, vec![1], vec![1])]);
    for dev in [weightstream::Device::Cuda(0), weightstream::Device::Null] {
        let err = WeightstreamBackend::new(&Loader::new().device(dev), &p, &cpu()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    }
    let err = WeightstreamBackend::new(&Loader::new(), p.with_file_name("none.safetensors"), &cpu()).unwrap_err();
    assert!(err.to_string().contains("none.safetensors"), "{err}");
}

/// all-MiniLM-L6-v2's directory (`model.safetensors`, `config.json`, `tokenizer.json`), from
/// `WEIGHTSTREAM_MINILM_DIR` (`.ci/run` sets it); without it the MiniLM tests say SKIPPED once.
fn minilm() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("WEIGHTSTREAM_MINILM_DIR").map(PathBuf::from);
        match dir {
            Some(d) if d.join("model.safetensors").is_file() => Some(d),
            _ => {
                println!(
                    "SKIPPED: WEIGHTSTREAM_MINILM_DIR is not set to all-MiniLM-L6-v2's directory (.ci/run fetches it)"
                );
                None
            }
        }
    })
    .clone()
}

fn mmap_bert(dir: &Path) -> candle_bert::Bert {
    // SAFETY: the model file is not modified while the test runs.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            candle_transformers::models::bert::DTYPE,
            &cpu(),
        )
        .unwrap()
    };
    candle_bert::load_bert(dir, vb).unwrap()
}

#[test]
fn minilm_embedding_equals_candles_own_loader() {
    let Some(dir) = minilm() else { return };
    let ours = candle_bert::load_with_weightstream(&dir, &cpu()).unwrap();
    let theirs = mmap_bert(&dir);
    for text in ["A man is eating food.", "weightstream streams safetensors"] {
        let (a, b) = (candle_bert::embed(&ours, text).unwrap(), candle_bert::embed(&theirs, text).unwrap());
        assert_eq!(a.len(), 384);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-6, "{text:?}: component {i}: {x} vs {y}");
        }
    }
}

#[test]
fn minilm_knows_eating_food_from_eating_bread() {
    let Some(dir) = minilm() else { return };
    let bert = candle_bert::load_with_weightstream(&dir, &cpu()).unwrap();
    let a = candle_bert::embed(&bert, "A man is eating food.").unwrap();
    let b = candle_bert::embed(&bert, "A man is eating a piece of bread.").unwrap();
    let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "not normalised: {norm}");
    let sim = candle_bert::cosine(&a, &b);
    assert!((sim - 0.755).abs() <= 0.01, "similarity {sim}, known 0.755");
}
