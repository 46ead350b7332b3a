"""Parity with the reference safetensors on files it wrote: every dtype, sharded models, a
Hugging Face cache folder, safe_open, get_slice, shards, dtype conversion, option checking."""

import glob
import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import weightstream as ws
from conftest import make_hf_cache, reference


def same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes()


def dtype_files(gen):
    return sorted(p for p in glob.glob(str(gen / "dtype_*.safetensors")))


def test_every_dtype_equals_the_reference(gen):
    files = dtype_files(gen)
    written = [f for f in json.loads((gen / "manifest.json").read_text())["dtypes"].values() if f.startswith("dtype_")]
    assert len(files) == len(written) >= 17, (files, written)  # 18 with ml_dtypes >= 0.5 (e8m0)
    for p in files:
        got = ws.load_file(p, framework="np")
        want = reference(p)
        assert list(got) == list(want), p
        for k in want:
            same(got[k], want[k])
        try:  # safetensors.numpy itself, where it can read the dtype (its fp8 support is broken)
            theirs = safetensors.numpy.load_file(p)
        except (AttributeError, TypeError):
            continue
        for k in theirs:
            same(got[k], theirs[k])


def test_packed_f4_says_how_to_load_it(gen):
    p = gen / "f4_packed.safetensors"
    if not p.exists():
        pytest.skip("this safetensors cannot write F4")
    with pytest.raises(ws.UsageError, match="packs elements below a byte"):
        ws.load_file(p, framework="np")
    (name, dtype, _, shape, nbytes), *_ = ws.Loader().describe(p)
    buf = np.zeros(nbytes, np.uint8)
    assert dtype == "F4" and ws.Loader().load_into(p, {name: buf}) == nbytes


def test_mixed_big_endian_empty_and_no_tensors(gen):
    for name in ("mixed", "big_endian", "empty_tensor", "no_tensors"):
        p = gen / f"{name}.safetensors"
        got = ws.load_file(p, framework="np")
        want = reference(p)
        assert sorted(got) == sorted(want)
        for k in want:
            same(got[k], want[k])


def shards_by_safetensors(folder):
    want = {}
    for f in sorted(glob.glob(str(folder / "*.safetensors"))):
        want.update(safetensors.numpy.load_file(f))
    return want


def test_sharded_index_and_directory(gen):
    want = shards_by_safetensors(gen / "sharded")
    for p in (gen / "sharded" / "model.safetensors.index.json", gen / "sharded"):
        got = ws.load_file(p, framework="np")
        assert sorted(got) == sorted(want)
        for k in want:
            same(got[k], want[k])


def test_hugging_face_cache_folder(gen, tmp_path):
    shards = sorted(glob.glob(str(gen / "sharded" / "*")))
    cache = make_hf_cache(tmp_path, shards)
    got = ws.load_file(cache, framework="np")
    want = shards_by_safetensors(gen / "sharded")
    assert sorted(got) == sorted(want)
    for k in want:
        same(got[k], want[k])


def test_safe_open_matches_safetensors(gen):
    for p in [gen / "mixed.safetensors", *dtype_files(gen)[:3]]:
        with safetensors.safe_open(p, framework="np") as theirs, ws.safe_open(p, framework="np") as ours:
            assert ours.keys() == list(theirs.keys())
            assert ours.metadata() == theirs.metadata()
            for k in theirs.keys():
                try:
                    want = theirs.get_tensor(k)
                except AttributeError:  # safetensors' numpy fp8 names are broken
                    want = reference(p)[k]
                same(ours.get_tensor(k), want)
                assert ours.get_slice(k).get_shape() == theirs.get_slice(k).get_shape()
                assert ours.get_slice(k).get_dtype() == theirs.get_slice(k).get_dtype()


def test_safe_open_errors_and_lifetime(gen):
    p = gen / "mixed.safetensors"
    with ws.safe_open(p, framework="np") as f:
        k = f.keys()[0]
        t = f.get_tensor(k)
        with pytest.raises(ws.MissingTensorError, match="no tensor named `nope`") as e:
            f.get_tensor("nope")
        assert isinstance(e.value, KeyError) and str(p) in str(e.value)
    with pytest.raises(ws.UsageError, match="closed"):
        f.get_tensor(k)
    del f
    same(t, reference(p)[k])


def test_get_slice_equals_numpy_indexing(tmp_path):
    p = tmp_path / "s.safetensors"
    w = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    b = np.arange(10, dtype=np.int64)
    safetensors.numpy.save_file({"w": w, "b": b, "x[*]": b[:3]}, p)
    keys = [
        np.s_[0:2], np.s_[1:4, :], np.s_[:, 1:3], np.s_[..., 2:], np.s_[:, :, 1:2], np.s_[2],
        np.s_[-2:], np.s_[::2], np.s_[4:1:-1], np.s_[1:5:2, 3], np.s_[:, -1], np.s_[3:3],
        np.s_[...], np.s_[:], np.s_[1, 2, 3], np.s_[5:100], np.s_[::-1],
    ]
    with ws.safe_open(p, framework="np") as f, safetensors.safe_open(p, framework="np") as ref:
        for key in keys:
            got = f.get_slice("w")[key]
            np.testing.assert_array_equal(got, w[key], err_msg=str(key))
            assert got.shape == w[key].shape, key
        np.testing.assert_array_equal(f.get_slice("b")[2:7], ref.get_slice("b")[2:7])
        np.testing.assert_array_equal(f.get_tensor("x[*]"), b[:3])  # glob characters in a name
        with pytest.raises(IndexError):
            f.get_slice("w")[0, 0, 0, 0]
        with pytest.raises(IndexError):
            f.get_slice("w")[6]
        # beyond basic indexing, the whole tensor indexed by numpy (safetensors' "np" refuses)
        np.testing.assert_array_equal(f.get_slice("w")[[0, 1]], w[[0, 1]])
        with pytest.raises(ws.SliceError):
            f.get_slice("w")[[0, 9]]


def test_shards_concatenate_to_the_whole_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    q = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    o = np.arange(4 * 8, dtype=np.int16).reshape(4, 8)
    n = np.arange(3, dtype=np.float64)
    safetensors.numpy.save_file({"l.q_proj.weight": q, "l.o_proj.weight": o, "norm": n}, p)
    split = {"*.q_proj.weight": 0, "*.o_proj.weight": 1}
    for world in (1, 2, 4):
        parts = [ws.load_file(p, framework="np", shard=(r, world), split=split) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate([x["l.q_proj.weight"] for x in parts], 0), q)
        np.testing.assert_array_equal(np.concatenate([x["l.o_proj.weight"] for x in parts], 1), o)
        for x in parts:
            np.testing.assert_array_equal(x["norm"], n)
    with pytest.raises(ws.WeightstreamError, match="q_proj"):
        ws.load_file(p, framework="np", shard=(0, 3), split=split)  # 8 rows do not split in 3


def test_dtype_converts_and_only_filters(gen):
    p = gen / "mixed.safetensors"
    want = reference(p)
    got = ws.load_file(p, framework="np", dtype="f32", only=["*embed*", "*norm*"])
    assert got and all("embed" in k or "norm" in k for k in got)
    for k, v in got.items():
        if want[k].dtype in (np.float16, ml_dtypes.bfloat16, np.float64, np.float32):
            assert v.dtype == np.float32
            np.testing.assert_array_equal(v, want[k].astype(np.float32))
    bf = ws.load_file(gen / "dtype_f32.safetensors", framework="np", dtype="bfloat16")
    assert bf["t.2d"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"framework": "tf"}, "'pt' \\(torch\\) or 'np'"),
        ({"device": "tpu"}, "'cpu', 'cuda', 'cuda:N'"),
        ({"dtype": "int8"}, "'bf16', 'f16', 'f32'"),
        ({"shard": (2, 2)}, "0 <= rank < world"),
        ({"shard": "0/2"}, "\\(rank, world\\)"),
        ({"split": {"*": 0}}, "split needs shard"),
        ({"only": 3}, "glob"),
        ({"device": "cuda:0"}, "CPU only"),
    ],
)
def test_bad_options_say_what_is_allowed(gen, kwargs, message):
    kwargs = {"framework": "np", **kwargs}
    with pytest.raises(ValueError, match=message) as e:
        ws.load_file(gen / "mixed.safetensors", **kwargs)
    assert isinstance(e.value, ws.WeightstreamError)


def test_loader_options_and_sizes():
    with pytest.raises(ws.UsageError, match="1GiB"):
        ws.Loader(staging="lots")
    with pytest.raises(ws.UsageError, match="positive int"):
        ws.Loader(threads=0)
    with pytest.raises(ws.UsageError, match="'auto', 'pread' or 'uring'"):
        ws.Loader(io="aio")
    assert ws.Loader(staging="64KiB", staging_count=2, threads=1).device == "cpu"


def test_errors_name_the_file_and_are_value_or_os_errors(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ws.ReadError) as e:
        ws.load_file(missing, framework="np")
    assert isinstance(e.value, OSError) and "missing.safetensors" in str(e.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(ws.FormatError) as e:
        ws.load_file(bad, framework="np")
    assert isinstance(e.value, ValueError) and "bad.safetensors" in str(e.value)


def test_iterate_yields_what_load_gives(gen):
    p = gen / "sharded"
    loader = ws.Loader()
    whole = loader.load(p, framework="np")
    seen = {}
    for name, t in loader.iterate(p, window="1MiB", framework="np"):
        seen[name] = t
    assert sorted(seen) == sorted(whole)
    for k in whole:
        same(seen[k], whole[k])
    it = loader.iterate(p, window=1 << 20, framework="np")
    next(it)
    it.close()  # stopping early stops the reads
    with pytest.raises(StopIteration):
        next(it)
    assert os.path.exists(p)


def test_framework_pt_without_torch_says_how_to_get_it(gen):
    # In a child where `import torch` fails (torch is installed in the test venvs).
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError
import pytest, weightstream as ws
with pytest.raises(ImportError, match="pip install torch"):
    ws.load_file({str(gen / "mixed.safetensors")!r})  # raised before anything is read
with pytest.raises(ImportError, match="pip install torch"):
    ws.safe_open({str(gen / "mixed.safetensors")!r}, framework="pt")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_iterate_holds_no_reference_to_the_tensor_it_handed_out(tmp_path):
    """Between two items the iterator keeps nothing of the last one: a consumer that copied and
    dropped it has freed it (its share of the batch) before asking for the next."""
    import gc
    import weakref

    p = str(tmp_path / "m.safetensors")
    safetensors.numpy.save_file({f"t{i}": np.full(1000, i, np.float32) for i in range(3)}, p)
    it = ws.Loader().iterate(p, framework="pt")
    seen = []
    for name, t in it:
        seen.append((name, float(t[0])))
        ref = weakref.ref(t)
        del t
        gc.collect()
        assert ref() is None, f"the iterator still holds `{name}`"
    assert seen == [("t0", 0.0), ("t1", 1.0), ("t2", 2.0)]
