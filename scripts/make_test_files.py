#!/usr/bin/env python3
"""Write .safetensors test files with the reference Python `safetensors` (+ numpy, ml_dtypes).

Usage: make_test_files.py [OUT_DIR]      (default: tests/data/generated in the repository)

OUT_DIR gets:
  dtype_<name>.safetensors   one file per dtype the installed safetensors/numpy/ml_dtypes can
                             write: tensors "t.2d" [3, 5], "t.scalar" [], "t.3d" [2, 1, 4]
  f4_packed.safetensors      F4 (float4_e2m1fn_x2) through the low-level TensorSpec API, when the
                             installed safetensors has it
  big_endian.safetensors     big-endian numpy arrays (the writer must byteswap them)
  mixed.safetensors          several dtypes in one file, with __metadata__
  empty_tensor.safetensors   tensors with a zero dimension beside a normal one
  no_tensors.safetensors     a file with zero tensors (and metadata)
  sharded/                   model-0000k-of-00003.safetensors + model.safetensors.index.json,
                             written the way `transformers` writes them
  manifest.json              written last: for every file, its tensors (dtype, shape, nbytes,
                             sha256 of the little-endian bytes) and metadata; the sharded model

Deterministic: the same versions of the packages write the same bytes.
"""

import hashlib
import json
import os
import sys

import ml_dtypes
import numpy as np
import safetensors
from safetensors.numpy import save_file

SHAPES = {"t.2d": (3, 5), "t.scalar": (), "t.3d": (2, 1, 4)}

# numpy / ml_dtypes dtype -> the safetensors name it is written as.
CANDIDATES = [
    ("bool", np.dtype(np.bool_), "BOOL"),
    ("u8", np.dtype(np.uint8), "U8"),
    ("i8", np.dtype(np.int8), "I8"),
    ("i16", np.dtype(np.int16), "I16"),
    ("u16", np.dtype(np.uint16), "U16"),
    ("i32", np.dtype(np.int32), "I32"),
    ("u32", np.dtype(np.uint32), "U32"),
    ("i64", np.dtype(np.int64), "I64"),
    ("u64", np.dtype(np.uint64), "U64"),
    ("f16", np.dtype(np.float16), "F16"),
    ("f32", np.dtype(np.float32), "F32"),
    ("f64", np.dtype(np.float64), "F64"),
    ("c64", np.dtype(np.complex64), "C64"),
    ("bf16", np.dtype(ml_dtypes.bfloat16), "BF16"),
    ("f8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn), "F8_E4M3"),
    ("f8_e5m2", np.dtype(ml_dtypes.float8_e5m2), "F8_E5M2"),
    ("f8_e4m3fnuz", np.dtype(ml_dtypes.float8_e4m3fnuz), "F8_E4M3FNUZ"),
    ("f8_e5m2fnuz", np.dtype(ml_dtypes.float8_e5m2fnuz), "F8_E5M2FNUZ"),
]
# Every safetensors release that reads bf16/fp8 writes these; the optional ones are skipped (and
# listed in the manifest's "skipped_dtypes") when the installed version cannot write them.
REQUIRED = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "F32", "F64",
            "BF16", "F8_E4M3", "F8_E5M2"}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    CANDIDATES.append(("f8_e8m0", np.dtype(ml_dtypes.float8_e8m0fnu), "F8_E8M0"))


def sample(rng, dtype, shape):
    """Deterministic values of `dtype` and `shape` (integers over their range, floats ~ N(0, 4)),
    always as an ndarray (also for shape ())."""
    if dtype == np.bool_:
        values = rng.random(shape) > 0.5
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    elif dtype.kind == "c":
        values = rng.normal(0, 4, shape) + 1j * rng.normal(0, 4, shape)
    else:
        values = rng.normal(0, 4, shape).astype(np.float32)
    return np.asarray(values).astype(dtype)


def le_bytes(arr):
    """The little-endian bytes of `arr`, as safetensors stores them."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def entry(dtype_name, shape, data):
    return {
        "dtype": dtype_name,
        "shape": list(shape),
        "nbytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def header_of(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def record(manifest, out, rel, tensors, metadata):
    """Add a written file to the manifest, checking the writer used the dtypes we expected."""
    header = header_of(os.path.join(out, rel))
    for name, t in tensors.items():
        written = header[name]
        if written["dtype"] != t["dtype"] or written["shape"] != t["shape"]:
            raise SystemExit(f"{rel}: {name} written as {written}, expected {t}")
        t["data_offsets"] = written["data_offsets"]
    manifest["files"][rel] = {
        "tensors": tensors,
        "metadata": metadata or {},
        "size": os.path.getsize(os.path.join(out, rel)),
    }


def write_np(manifest, out, rel, arrays, metadata=None, names=None):
    save_file(arrays, os.path.join(out, rel), metadata=metadata)
    tensors = {k: entry(names[k], v.shape, le_bytes(v)) for k, v in arrays.items()}
    record(manifest, out, rel, tensors, metadata)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "tests", "data", "generated")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20240601)
    manifest = {
        "versions": {
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "ml_dtypes": ml_dtypes.__version__,
        },
        "files": {},
        "dtypes": {},
        "skipped_dtypes": {},
    }

    # One file per dtype.
    for short, dtype, st_name in CANDIDATES:
        rel = f"dtype_{short}.safetensors"
        arrays = {k: sample(rng, dtype, s) for k, s in SHAPES.items()}
        try:
            write_np(manifest, out, rel, arrays, names={k: st_name for k in arrays})
        except Exception as e:  # this safetensors version cannot write the dtype
            if st_name in REQUIRED:
                raise
            manifest["skipped_dtypes"][st_name] = f"{type(e).__name__}: {e}"
            if os.path.exists(os.path.join(out, rel)):
                os.remove(os.path.join(out, rel))
            continue
        manifest["dtypes"][st_name] = rel

    # F4: two values per byte, through the low-level API (numpy has no packed fp4 dtype).
    try:
        from safetensors import TensorSpec, serialize_file

        packed = rng.integers(0, 256, size=(4, 3), dtype=np.uint8)
        odd = rng.integers(0, 256, size=(5,), dtype=np.uint8)
        specs = {
            # Storage shape: the writer doubles the last dimension to the logical element count.
            "fp4.a": TensorSpec(dtype="float4_e2m1fn_x2", shape=packed.shape,
                                data_ptr=packed.ctypes.data, data_len=packed.nbytes),
            "fp4.b": TensorSpec(dtype="float4_e2m1fn_x2", shape=odd.shape,
                                data_ptr=odd.ctypes.data, data_len=odd.nbytes),
        }
        rel = "f4_packed.safetensors"
        serialize_file(specs, os.path.join(out, rel), metadata=None)
        tensors = {
            "fp4.a": entry("F4", (4, 6), packed.tobytes()),
            "fp4.b": entry("F4", (10,), odd.tobytes()),
        }
        record(manifest, out, rel, tensors, None)
        manifest["dtypes"]["F4"] = rel
    except Exception as e:  # older safetensors: no TensorSpec or no float4_e2m1fn_x2
        manifest["skipped_dtypes"]["F4"] = f"{type(e).__name__}: {e}"

    # Big-endian input: the writer must store little-endian bytes.
    be = {
        "be.f32": sample(rng, np.dtype(np.float32), (4, 4)).astype(">f4"),
        "be.i64": sample(rng, np.dtype(np.int64), (3,)).astype(">i8"),
    }
    write_np(manifest, out, "big_endian.safetensors", be, names={"be.f32": "F32", "be.i64": "I64"})

    # Several dtypes and metadata in one file.
    mixed = {
        "model.embed_tokens.weight": sample(rng, np.dtype(ml_dtypes.bfloat16), (16, 8)),
        "model.layers.0.self_attn.q_proj.weight": sample(rng, np.dtype(np.float16), (8, 8)),
        "model.layers.0.mlp.gate_proj.weight": sample(rng, np.dtype(ml_dtypes.float8_e4m3fn), (8, 12)),
        "model.layers.0.input_layernorm.weight": sample(rng, np.dtype(np.float32), (8,)),
        "model.layers.0.mask": sample(rng, np.dtype(np.bool_), (3, 3)),
        "model.position_ids": np.arange(7, dtype=np.int64),
        "lm_head.scale": sample(rng, np.dtype(np.float64), ()),
    }
    names = {k: v for k, v in zip(mixed, ["BF16", "F16", "F8_E4M3", "F32", "BOOL", "I64", "F64"])}
    meta = {"format": "pt", "note": "written by scripts/make_test_files.py \u2014 \u00e9\u00e8 \U0001F600", "empty": ""}
    write_np(manifest, out, "mixed.safetensors", mixed, metadata=meta, names=names)

    # Zero-sized tensors beside a normal one.
    empty = {
        "empty.a": np.zeros((0,), dtype=np.float32),
        "empty.b": np.zeros((3, 0), dtype=ml_dtypes.bfloat16),
        "empty.c": np.zeros((0, 2, 5), dtype=np.int8),
        "full": sample(rng, np.dtype(np.float32), (2, 2)),
    }
    write_np(manifest, out, "empty_tensor.safetensors", empty,
             names={"empty.a": "F32", "empty.b": "BF16", "empty.c": "I8", "full": "F32"})

    # No tensors at all.
    write_np(manifest, out, "no_tensors.safetensors", {}, metadata={"format": "pt"}, names={})

    # A sharded model, as transformers' save_pretrained writes it.
    shard_dir = os.path.join(out, "sharded")
    os.makedirs(shard_dir, exist_ok=True)
    layers = []
    for i in range(4):
        p = f"model.layers.{i}."
        layers.append({
            p + "self_attn.q_proj.weight": sample(rng, np.dtype(ml_dtypes.bfloat16), (16, 16)),
            p + "self_attn.k_proj.weight": sample(rng, np.dtype(ml_dtypes.bfloat16), (8, 16)),
            p + "mlp.down_proj.weight": sample(rng, np.dtype(ml_dtypes.bfloat16), (16, 24)),
            p + "input_layernorm.weight": sample(rng, np.dtype(np.float32), (16,)),
        })
    shards = [
        {"model.embed_tokens.weight": sample(rng, np.dtype(ml_dtypes.bfloat16), (32, 16)), **layers[0]},
        {**layers[1], **layers[2]},
        {**layers[3], "model.norm.weight": sample(rng, np.dtype(np.float32), (16,)),
         "lm_head.weight": sample(rng, np.dtype(ml_dtypes.bfloat16), (32, 16))},
    ]
    weight_map = {}
    total_size = 0
    shard_rels = []
    for k, arrays in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        rel = f"sharded/{name}"
        names = {t: "BF16" if a.dtype == ml_dtypes.bfloat16 else "F32" for t, a in arrays.items()}
        write_np(manifest, out, rel, arrays, metadata={"format": "pt"}, names=names)
        for t, a in arrays.items():
            weight_map[t] = name
            total_size += a.nbytes
        shard_rels.append(rel)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    manifest["sharded"] = {
        "dir": "sharded",
        "index": "sharded/model.safetensors.index.json",
        "shards": shard_rels,
        "total_size": total_size,
    }

    # The manifest last: its presence means the directory is complete.
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
