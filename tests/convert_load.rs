//! `--dtype` on the cpu target against the conversions numpy and ml_dtypes compute, on a file
//! the reference Python `safetensors` wrote (random values plus every special value).

mod common;

use std::path::Path;
use std::process::Command;

use weightstream::{Device, Dtype, Loader};

const SCRIPT: &str = r#"
import sys, os, numpy as np, ml_dtypes
from safetensors.numpy import save_file
out = sys.argv[1]
rng = np.random.default_rng(7)
base = np.concatenate([
    rng.standard_normal(20000) * 10.0 ** rng.integers(-12, 12, 20000),
    np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8, 6e-8, 3e38, 3.4e38, 1e-40,
              1.0 + 2.0 ** -11, 1.0 + 2.0 ** -8, 2.0 ** -24, 2.0 ** -25, 2.0 ** -126, 5e-324]),
])
src = {
    "x.f64": base.astype(np.float64),
    "x.f32": base.astype(np.float32),
    "x.f16": base.astype(np.float16),
    "x.bf16": base.astype(ml_dtypes.bfloat16),
    "x.e4m3": np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
    "x.e5m2": np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2),
}
save_file(src, os.path.join(out, "floats.safetensors"))
targets = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
for name, arr in src.items():
    for t, np_t in targets.items():
        arr.astype(np_t).tofile(os.path.join(out, f"{name}.{t}.bin"))
"#;

fn is_nan(d: Dtype, b: &[u8]) -> bool {
    match d {
        Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()).is_nan(),
        Dtype::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).is_nan(),
        _ => half::bf16::from_le_bytes(b.try_into().unwrap()).is_nan(),
    }
}

fn compare(name: &str, to: Dtype, ours: &[u8], expect: &[u8]) {
    assert_eq!(ours.len(), expect.len(), "{name} as {to}");
    let w = (to.bits() / 8) as usize;
    let mut mismatches = 0;
    for (i, (o, e)) in ours.chunks(w).zip(expect.chunks(w)).enumerate() {
        // NaN payloads are not specified alike by numpy and `half`: a NaN must stay a NaN.
        let same = if is_nan(to, e) { is_nan(to, o) } else { o == e };
        if !same {
            mismatches += 1;
            if mismatches <= 5 {
                println!("{name} -> {to}: element {i}: ours {o:02x?}, numpy/ml_dtypes {e:02x?}");
            }
        }
    }
    assert_eq!(mismatches, 0, "{name} -> {to}: {mismatches} elements differ from numpy/ml_dtypes");
}

#[test]
fn cpu_dtype_conversion_matches_numpy_and_ml_dtypes() {
    if common::python_data_dir().is_none() {
        return; // printed why
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::python()).args(["-c", SCRIPT]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = dir.path().join("floats.safetensors");
    let expected = |name: &str, to: Dtype| std::fs::read(dir.path().join(format!("{name}.{}.bin", to.name()))).unwrap();
    for to in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        // `--dtype`: the floating-point tensors; fp8 stays as stored.
        let m = Loader::new().device(Device::Cpu).dtype(to).load(&path).unwrap();
        for name in ["x.f64", "x.f32", "x.f16", "x.bf16"] {
            let t = m.tensor(name).unwrap();
            assert_eq!(t.dtype(), to);
            compare(name, to, &t.to_host_vec().unwrap(), &expected(name, to));
        }
        assert_eq!(m.tensor("x.e4m3").unwrap().dtype(), Dtype::F8_E4M3, "fp8 loads unchanged under --dtype");
        // fp8 upcasts through the API, per tensor.
        let m = Loader::new().device(Device::Cpu).dtype_for("x.e4m3", to).dtype_for("x.e5m2", to).load(&path).unwrap();
        for name in ["x.e4m3", "x.e5m2"] {
            compare(name, to, &m.tensor(name).unwrap().to_host_vec().unwrap(), &expected(name, to));
        }
    }
    let _ = Path::new("");
}
