"""load_into: numpy arrays filled in place; sizes, shapes and dtypes checked."""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import weightstream as ws


@pytest.fixture()
def ckpt(tmp_path):
    p = tmp_path / "m.safetensors"
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(6, dtype=np.int64),
        "h": (np.arange(8, dtype=np.float32) / 4).astype(ml_dtypes.bfloat16).reshape(2, 4),
        "skipped": np.ones(5, dtype=np.uint8),
    }
    safetensors.numpy.save_file(tensors, p)
    return p, tensors


def test_fills_arrays_in_place(ckpt):
    p, t = ckpt
    out = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(6, np.int64), "h": np.zeros((2, 4), ml_dtypes.bfloat16)}
    before = {k: v.ctypes.data for k, v in out.items()}
    n = ws.Loader().load_into(p, out)
    assert n == 48 + 48 + 16
    for k, v in out.items():
        assert v.ctypes.data == before[k]
        np.testing.assert_array_equal(v, t[k])


def test_converts_with_dtype_and_fills_shards(ckpt):
    p, t = ckpt
    out = {"h": np.zeros((2, 4), np.float32)}
    ws.Loader().load_into(p, out, dtype="f32")
    np.testing.assert_array_equal(out["h"], t["h"].astype(np.float32))
    half = {"a": np.zeros((3, 2), np.float32)}
    ws.Loader().load_into(p, half, shard=(1, 2), split={"a": 1})
    np.testing.assert_array_equal(half["a"], t["a"][:, 2:])


@pytest.mark.parametrize(
    "dest, message",
    [
        ({"a": np.zeros((3, 4), np.int32)}, "dtype mismatch.*F32.*int32"),
        ({"a": np.zeros((4, 3), np.float32)}, "shape mismatch"),
        ({"a": np.zeros((3, 5), np.float32)}, "shape mismatch"),
        ({"a": np.zeros((4, 4), np.float32)[:, :3].T}, "not contiguous"),
        ({"missing": np.zeros(3, np.float32)}, "missing"),
        ({"h": np.zeros((2, 4), np.float16)}, "dtype mismatch.*BF16"),
    ],
)
def test_mismatches_raise_naming_the_tensor(ckpt, dest, message):
    p, _ = ckpt
    with pytest.raises(ws.WeightstreamError, match=message) as e:
        ws.Loader().load_into(p, dest)
    assert isinstance(e.value, ValueError)
    assert str(p) in str(e.value)


def test_read_only_and_overlapping_destinations_raise(ckpt):
    p, _ = ckpt
    ro = np.zeros(6, np.int64)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        ws.Loader().load_into(p, {"b": ro})
    buf = np.zeros(12, np.float32)
    with pytest.raises(ws.UsageError, match="overlaps"):
        ws.Loader().load_into(p, {"a": buf.reshape(3, 4), "b": buf[:12].view(np.int64)})
    with pytest.raises(ws.UsageError, match="__dlpack__"):
        ws.Loader().load_into(p, {"b": [0] * 6})
