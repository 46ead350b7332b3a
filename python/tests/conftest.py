"""Fixtures: the Python-written test files (the generator the Rust tests use), a Hugging Face
cache folder, references read independently of weightstream, and memory probes."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, as safetensors.numpy needs)
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "scripts" / "make_test_files.py"

ML = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
NP = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
    "F16": np.float16, "I32": np.int32, "U32": np.uint32, "F32": np.float32, "C64": np.complex64,
    "F64": np.float64, "I64": np.int64, "U64": np.uint64, **ML,
}


@pytest.fixture(scope="session")
def gen(tmp_path_factory):
    """Files written by the reference safetensors (scripts/make_test_files.py)."""
    out = tmp_path_factory.mktemp("generated")
    subprocess.run([sys.executable, str(GENERATOR), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def reference(path):
    """The tensors of a single file, read with plain numpy from the bytes (the header parsed by
    json): independent of weightstream and of safetensors' dtype support."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out = {}
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=NP[t["dtype"]]).reshape(t["shape"])
    return out


def make_hf_cache(root, source_files, repo="models--org--name", rev="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache folder: blobs, snapshots/<rev>/ of symlinks, refs/main."""
    base = Path(root) / repo
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for i, f in enumerate(source_files):
        blob = base / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / Path(f).name)
    return base


def rss_anon():
    """The process's anonymous resident memory, bytes (RssAnon in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def write_big(path, total_bytes, tensor_bytes):
    """A file of u8 tensors `t0000`... of `tensor_bytes` each, `total_bytes` in all, written
    without holding it in memory; tensor i is filled with (i % 251)."""
    count = total_bytes // tensor_bytes
    header = {f"t{i:04}": {"dtype": "U8", "shape": [tensor_bytes], "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]} for i in range(count)}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i in range(count):
            f.write(bytes([i % 251]) * tensor_bytes)
    return path
