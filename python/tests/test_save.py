"""weightstream's writer as a drop-in for safetensors 0.8's ``save``/``save_file`` (numpy and
torch) and ``save_model``: a differential against the safetensors installed beside us.

For every input both libraries write it. Where safetensors writes a file, ours is byte for byte
the same (with two or more metadata keys, whose order safetensors takes from a hash map, the
header is the same JSON and the data the same bytes), and both readers give the input back.
Where safetensors raises, ours raises an instance of safetensors' class (and a
``WeightstreamError``). The deliberate differences, each asserted below:

- a numpy array that is not C-contiguous is written with its values (safetensors writes the
  memory under it), and a torch conjugate/negative view with its values;
- no tensors and ``metadata={}`` give a valid file (safetensors' cannot be read back);
- a tensor named ``__metadata__`` is refused (safetensors writes a file its reader rejects);
- numpy scalars are saved as 0-d arrays and ``bytes`` file names are accepted;
- ``save_model`` leaves the caller's ``metadata`` dict as it was;
- the file gets a plain create's permissions (safetensors 0.8: ``0o600``).
"""

import json
import os
import struct
import sys
import threading
import time
import warnings

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as st_np
import weightstream as ws
from weightstream import _save
from weightstream._errors import UsageError, WeightstreamError

import torch  # noqa: E402  (a missing torch fails, never a skip)
import safetensors.torch as st_pt  # noqa: E402

RNG = np.random.default_rng(22)

NP_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64,
    "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz, "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
}
SHAPES = [(), (0,), (2, 0, 3), (5,), (3, 4), (2, 3, 2)]


def random_np(dtype, shape):
    """An array of random bits (NaN payloads and all), booleans 0/1."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == np.bool_:
        return RNG.integers(0, 2, size=shape).astype(np.bool_)
    return RNG.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)


def random_torch(dtype, shape):
    if dtype == torch.bool:
        return torch.from_numpy(RNG.integers(0, 2, size=shape).astype(np.bool_))
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(RNG.integers(0, 256, size=n * size, dtype=np.uint8))
    return raw.view(dtype).reshape(shape)


def parse(blob):
    """The header (JSON) and each tensor's ``(dtype, shape, bytes)``, read by hand: independent
    of both libraries' readers."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    data = blob[8 + n :]
    tensors = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}
    return meta, tensors, n


def raw_bytes(t):
    """The little-endian bytes of a tensor or array, in C order."""
    if isinstance(t, torch.Tensor):
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes()


def check_round_trip(blob, tensors):
    """Each input tensor is in ``blob`` with its dtype name, shape and bytes."""
    _, got, n = parse(blob)
    assert n % 8 == 0
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        dtype, shape, data = got[k]
        want_shape = list(t.shape)
        if isinstance(t, torch.Tensor) and t.dtype == torch.float4_e2m1fn_x2:
            want_shape[-1] *= 2
        assert shape == want_shape, k
        assert data == raw_bytes(t), k


def assert_same_file(ours, theirs):
    """The same bytes; with two or more metadata keys (safetensors orders them by its hash map,
    differently in each process) the same bytes but for that order."""
    if ours == theirs:
        return
    (n,) = struct.unpack("<Q", ours[:8])
    assert ours[:8] == theirs[:8] and len(ours) == len(theirs), "header or data length differs"
    a, b = json.loads(ours[8 : 8 + n]), json.loads(theirs[8 : 8 + n])
    assert len(a.get("__metadata__") or {}) >= 2, "the files differ beyond the metadata order"
    assert a == b and list(a) == list(b), "the header differs beyond the metadata order"
    assert ours[8 + n :] == theirs[8 + n :], "the data differs"


def outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the differential compares whatever is raised
        return "err", e


def assert_same_failure(ours_fn, theirs_fn, *, names=()):
    """Both raise; ours is an instance of safetensors' class and a WeightstreamError, and its
    message names each of ``names``."""
    theirs = outcome(theirs_fn)
    ours = outcome(ours_fn)
    assert theirs[0] == "err", f"safetensors accepted it: {theirs[1]!r}"
    assert ours[0] == "err", f"we accepted what safetensors refuses ({theirs[1]!r})"
    assert isinstance(ours[1], type(theirs[1])), f"ours {type(ours[1]).__mro__} is not a {type(theirs[1])}: {ours[1]}"
    assert isinstance(ours[1], WeightstreamError), type(ours[1]).__mro__
    for name in names:
        assert name in str(ours[1]), f"{name!r} not in {ours[1]}"
    return ours[1], theirs[1]


def both_files(tmp_path, ours_fn, theirs_fn):
    a, b = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ours_fn(a)
    theirs_fn(b)
    return a.read_bytes(), b.read_bytes()


# ------------------------------------------------------------------------------------------
# numpy: byte identity and round trips


@pytest.mark.parametrize("code", list(NP_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_one_tensor_same_bytes(code, shape, tmp_path):
    arr = random_np(NP_DTYPES[code], shape)
    d = {"t": arr}
    ours = _save.save(d)
    assert ours == st_np.save(d)
    check_round_trip(ours, d)
    assert parse(ours)[1]["t"][0] == code
    a, b = both_files(tmp_path, lambda p: _save.save_file(d, p), lambda p: st_np.save_file(d, p))
    assert a == b == ours


@pytest.mark.parametrize("metadata", [None, {}, {"format": "np"}, {"é\"\\\n": "ü\u2028\x00"}], ids=repr)
def test_numpy_every_dtype_together_same_bytes_and_alignment(metadata, tmp_path):
    # Names out of order and of several dtypes: safetensors sorts by dtype, widest first, then by
    # name; every tensor starts at a multiple of its element size.
    d = {}
    for i, (code, dt) in enumerate(reversed(list(NP_DTYPES.items()))):
        d[f"layer.{(i * 7) % 19}.{code.lower()}"] = random_np(dt, (3, 1 + i % 3))
        d[f"b{i}"] = random_np(dt, ())
    # Names that sort differently by UTF-16 unit, by byte and by code point in some libraries.
    for name in ["", "\U0001f600", "\uffff", "é", "Z", "_"]:
        d[name] = random_np(np.int8, (2,))
    ours = _save.save(d, metadata=metadata)
    assert ours == st_np.save(d, metadata=metadata)
    check_round_trip(ours, d)
    meta, got, n = parse(ours)
    assert meta == metadata
    offsets = json.loads(ours[8 : 8 + n])
    for k, t in d.items():
        assert offsets[k]["data_offsets"][0] % t.dtype.itemsize == 0, k
    a, b = both_files(tmp_path, lambda p: _save.save_file(d, p, metadata), lambda p: st_np.save_file(d, p, metadata))
    assert a == b == ours
    # safetensors' reader gives the same values back (bf16/fp8 aside, which its numpy side
    # cannot load).
    plain = [np.dtype(x) for x in list(NP_DTYPES.values())[:13]]
    with safetensors.safe_open(str(tmp_path / "ours.safetensors"), framework="np") as f:
        assert f.metadata() == metadata
        for k in f.keys():
            if d[k].dtype in plain:
                back = f.get_tensor(k)
                assert back.dtype == d[k].dtype and back.tobytes() == d[k].tobytes(), k


def test_numpy_many_metadata_keys_same_header_json():
    d = {"w": random_np(np.float32, (4,)), "b": random_np(np.int8, (3,))}
    metadata = {f"key{i}": f"value {i}" for i in range(12)}
    ours, theirs = _save.save(d, metadata), st_np.save(d, metadata)
    (n,) = struct.unpack("<Q", ours[:8])
    assert len(ours) == len(theirs) and ours[:8] == theirs[:8]
    assert json.loads(ours[8 : 8 + n]) == json.loads(theirs[8 : 8 + n])
    assert ours[8 + n :] == theirs[8 + n :]
    # Ours in a fixed (sorted) order: the same bytes every time.
    assert list(parse(ours)[0]) == sorted(metadata)
    assert st_np.load(ours).keys() == d.keys()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_numpy_big_endian_and_subclasses_same_bytes():
    d = {
        "be": np.arange(6, dtype=">i4").reshape(2, 3),
        "be_f": np.linspace(0, 1, 5).astype(">f8"),
        "masked": np.ma.masked_array(np.arange(3.0), mask=[0, 1, 0]),
        "matrix": np.matrix([[1.0, 2.0]]),
        "readonly": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint16),
    }
    ours = _save.save(d)
    assert ours == st_np.save(d)
    assert st_np.load(ours)["be"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert d["be"].dtype.byteorder == ">", "the caller's array is not swapped in place"


def test_numpy_non_contiguous_written_by_value_deliberate():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = {"transposed": base.T, "strided": base[:, ::2], "fortran": np.asfortranarray(base)}
    ours = _save.save(d)
    back = st_np.load(ours)
    for k, v in d.items():
        assert np.array_equal(back[k], v), k
    # safetensors writes the memory under the view: wrong values (documented difference).
    theirs = st_np.load(st_np.save(d))
    assert not np.array_equal(theirs["transposed"], d["transposed"])
    assert not np.array_equal(theirs["strided"], d["strided"])
    # Contiguous input: the same bytes.
    assert _save.save({"c": base}) == st_np.save({"c": base})


def test_numpy_scalar_saved_as_0d_deliberate():
    ours = _save.save({"s": np.float32(1.5), "a": np.array(2.0)})
    back = st_np.load(ours)
    assert back["s"].shape == () and back["s"] == np.float32(1.5)
    with pytest.raises(AttributeError):  # safetensors: 'numpy.float32' object has no attribute 'ctypes'
        st_np.save({"s": np.float32(1.5)})
    assert ours == st_np.save({"s": np.array(np.float32(1.5)), "a": np.array(2.0)})


# ------------------------------------------------------------------------------------------
# torch: byte identity and round trips


@pytest.mark.parametrize("code", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_one_tensor_same_bytes(code, shape, tmp_path):
    if code == "F4" and shape == ():
        pytest.skip("a 0-d float4_e2m1fn_x2 holds half a byte's pair: an error case (below)")
    t = random_torch(TORCH_DTYPES[code], shape)
    d = {"t": t}
    ours = _save.save_torch(d)
    assert ours == st_pt.save(d)
    check_round_trip(ours, d)
    assert parse(ours)[1]["t"][0] == code
    a, b = both_files(tmp_path, lambda p: _save.save_file_torch(d, p), lambda p: st_pt.save_file(d, p))
    assert a == b == ours
    if code not in ("F4", "F8_E8M0"):  # safetensors.torch.load knows neither
        back = st_pt.load(ours)["t"]
        assert back.dtype == t.dtype and back.shape == t.shape
        assert raw_bytes(back) == raw_bytes(t)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}], ids=repr)
def test_torch_every_dtype_together_same_bytes(metadata, tmp_path):
    d = {}
    for i, (code, dt) in enumerate(TORCH_DTYPES.items()):
        d[f"model.layers.{(i * 5) % 13}.{code}"] = random_torch(dt, (2, 1 + i % 4))
        if code != "F4":
            d[f"s{i:02d}"] = random_torch(dt, ())
    ours = _save.save_torch(d, metadata)
    assert ours == st_pt.save(d, metadata)
    check_round_trip(ours, d)
    assert parse(ours)[0] == metadata
    a, b = both_files(tmp_path, lambda p: _save.save_file_torch(d, p, metadata), lambda p: st_pt.save_file(d, p, metadata))
    assert a == b == ours
    with safetensors.safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
        for k in f.keys():
            if d[k].dtype != torch.float4_e2m1fn_x2:
                assert raw_bytes(f.get_tensor(k)) == raw_bytes(d[k]), k


def test_torch_views_offsets_and_grad_same_bytes():
    base = torch.arange(20, dtype=torch.float32)
    w = torch.nn.Parameter(torch.randn(3, 4))
    d = {
        "front": base[:8],  # a view into the start of a storage
        "back": base[10:].reshape(2, 5),  # and at an offset; the two do not overlap
        "param": w,  # requires grad
        "expanded_1": torch.zeros(1, 3)[:, :],
    }
    ours = _save.save_torch(d)
    assert ours == st_pt.save(d)
    check_round_trip(ours, {k: v.detach() for k, v in d.items()})


def test_torch_conj_and_neg_views_written_by_value_deliberate():
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    n = torch.tensor([1.0, -2.0])._neg_view()
    assert c.is_conj() and n.is_neg()
    back = st_pt.load(_save.save_torch({"c": c, "n": n}))
    assert torch.equal(back["c"], c.resolve_conj()) and torch.equal(back["n"], n.resolve_neg())
    theirs = st_pt.load(st_pt.save({"c": c, "n": n}))
    assert not torch.equal(theirs["c"], c.resolve_conj()), "safetensors now writes values: update the docs"
    assert _save.save_torch({"c": c.resolve_conj()}) == st_pt.save({"c": c.resolve_conj()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA save test skipped")
def test_torch_cuda_tensors_moved_to_the_cpu():
    d = {"g": torch.randn(64, 32, device="cuda"), "h": torch.arange(5, device="cuda", dtype=torch.bfloat16)}
    ours = _save.save_torch(d)
    assert ours == st_pt.save(d)
    assert d["g"].device.type == "cuda"
    check_round_trip(ours, {k: v.cpu() for k, v in d.items()})


# ------------------------------------------------------------------------------------------
# Errors: every case where safetensors raises, ours raises an instance of its class.

_x = torch.zeros(4)
_y = torch.zeros(6)
with warnings.catch_warnings():  # torch's "beta"/"deprecated" notes on building the inputs
    warnings.simplefilter("ignore")
    TORCH_ERRORS = {
        "not_a_dict": ([("a", torch.zeros(2))], None, ()),
        "not_a_tensor": ({"a": 1}, None, ("`a`",)),
        "numpy_value": ({"a": np.zeros(2)}, None, ("`a`",)),
        "sparse": ({"sp": torch.zeros(3).to_sparse()}, None, ("sp",)),
        "sparse_csr": ({"csr": torch.eye(3).to_sparse_csr()}, None, ("csr",)),
        "shared_same": ({"a": _x, "b": _x}, None, ("'a'", "'b'")),
        "shared_overlap": ({"a": _y[:4], "b": _y[2:]}, None, ("'a'", "'b'")),
        "non_contiguous": ({"nc": torch.zeros(4)[::2]}, None, ("nc",)),
        "transposed": ({"tr": torch.zeros(2, 3).T}, None, ("tr",)),
        "expanded": ({"ex": torch.zeros(1, 3).expand(2, 3)}, None, ("ex",)),
        "meta": ({"m": torch.zeros(2, device="meta")}, None, ("m",)),
        "complex128": ({"c": torch.zeros(2, dtype=torch.complex128)}, None, ("c", "complex128")),
        "complex32": ({"c": torch.zeros(2, dtype=torch.complex32)}, None, ("complex32",)),
        "uint1": ({"u": torch.zeros(2, dtype=torch.uint1)}, None, ("uint1",)),
        "int4": ({"i": torch.zeros(2, dtype=torch.int4)}, None, ("int4",)),
        "qint8": ({"q": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)}, None, ("qint8",)),
        "f4_0d": ({"f": torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, None, ("f",)),
        "nested": ({"n": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])}, None, ("n",)),
        "metadata_value": ({"a": torch.zeros(2)}, {"k": 1}, ("'k'",)),
        "metadata_key": ({"a": torch.zeros(2)}, {1: "v"}, ()),
        "metadata_list": ({"a": torch.zeros(2)}, [("k", "v")], ("list",)),
        "name_not_str": ({1: torch.zeros(2)}, None, ()),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(TORCH_ERRORS))
def test_torch_errors_match(case, tmp_path):
    tensors, metadata, names = TORCH_ERRORS[case]
    assert_same_failure(lambda: _save.save_torch(tensors, metadata), lambda: st_pt.save(tensors, metadata), names=names)
    p = tmp_path / "x.safetensors"
    assert_same_failure(
        lambda: _save.save_file_torch(tensors, p, metadata), lambda: st_pt.save_file(tensors, p, metadata), names=names
    )
    assert not p.exists()
    assert os.listdir(tmp_path) == [], "no temporary file left behind"


NP_ERRORS = {
    "not_a_mapping": ([("a", np.zeros(2))], None, ()),
    "list_value": ({"a": [1, 2]}, None, ("`a`",)),
    "torch_value": ({"a": torch.zeros(2)}, None, ("`a`",)),
    "complex128": ({"c": np.zeros(2, dtype=np.complex128)}, None, ("`c`", "complex128")),
    "longdouble": ({"c": np.zeros(2, dtype=np.longdouble)}, None, ("`c`",)),
    "object": ({"o": np.array([object()])}, None, ("`o`",)),
    "str": ({"s": np.array(["abc"])}, None, ("`s`",)),
    "structured": ({"s": np.zeros(2, dtype=[("x", "i4")])}, None, ("`s`",)),
    "datetime": ({"t": np.zeros(2, dtype="M8[s]")}, None, ("`t`",)),
    "ml_float4": ({"f": np.zeros(2, dtype=ml_dtypes.float4_e2m1fn)}, None, ("`f`", "float4_e2m1fn_x2")),
    "ml_int4": ({"i": np.zeros(2, dtype=ml_dtypes.int4)}, None, ("`i`",)),
    "metadata_value": ({"a": np.zeros(2)}, {"k": None}, ("'k'",)),
    "metadata_not_dict": ({"a": np.zeros(2)}, "format=np", ("str",)),
    "name_not_str": ({("a",): np.zeros(2)}, None, ()),
}


@pytest.mark.parametrize("case", list(NP_ERRORS))
def test_numpy_errors_match(case, tmp_path):
    tensors, metadata, names = NP_ERRORS[case]
    assert_same_failure(lambda: _save.save(tensors, metadata), lambda: st_np.save(tensors, metadata), names=names)
    p = tmp_path / "x.safetensors"
    assert_same_failure(
        lambda: _save.save_file(tensors, p, metadata), lambda: st_np.save_file(tensors, p, metadata), names=names
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["missing_dir", "a_directory", "empty_name", "an_int"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_bad_file_names_match(where, lib, tmp_path):
    target = {
        "missing_dir": tmp_path / "no" / "such" / "x.safetensors",
        "a_directory": tmp_path,
        "empty_name": "",
        "an_int": 5,
    }[where]
    if lib == "numpy":
        d = {"a": np.zeros(2)}
        ours, theirs = lambda: _save.save_file(d, target), lambda: st_np.save_file(d, target)
    else:
        d = {"a": torch.zeros(2)}
        ours, theirs = lambda: _save.save_file_torch(d, target), lambda: st_pt.save_file(d, target)
    if where == "an_int":
        # Both: os.fspath's TypeError (ours before anything is written, not a weightstream error).
        with pytest.raises(TypeError):
            theirs()
        with pytest.raises(TypeError):
            ours()
        return
    names = (str(target),) if where != "empty_name" else ("empty",)
    err, _ = assert_same_failure(ours, theirs, names=names)
    if where != "empty_name":
        assert isinstance(err, OSError)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Where safetensors writes a broken file: ours is valid or refused (deliberate).


def test_no_tensors_and_empty_metadata_is_a_valid_file():
    theirs = st_np.save({}, metadata={})
    with pytest.raises(safetensors.SafetensorError):
        st_np.load(theirs)  # `{},"__metadata__":{}}`: its own reader refuses it
    ours = _save.save({}, metadata={})
    assert parse(ours)[0] == {} and st_np.load(ours) == {}
    assert _save.save({}) == st_np.save({})
    assert _save.save_torch({}, {"a": "b"}) == st_pt.save({}, {"a": "b"})


def test_tensor_named_metadata_is_refused():
    d = {"__metadata__": np.zeros(2, dtype=np.float32)}
    theirs = st_np.save(d)
    with pytest.raises(safetensors.SafetensorError):
        st_np.load(theirs)
    with pytest.raises(UsageError, match="__metadata__"):
        _save.save(d)
    with pytest.raises(safetensors.SafetensorError):
        _save.save_torch({"__metadata__": torch.zeros(2)})


def test_bytes_file_name_accepted_deliberate(tmp_path):
    p = tmp_path / "b.safetensors"
    _save.save_file({"a": np.ones(2)}, os.fsencode(p))
    assert p.read_bytes() == st_np.save({"a": np.ones(2)})
    with pytest.raises(TypeError):
        st_np.save_file({"a": np.ones(2)}, os.fsencode(p))


# ------------------------------------------------------------------------------------------
# The file: replaced, not truncated; permissions of a plain create; the GIL released.


def test_saving_over_a_mapped_file_keeps_its_readers_whole(tmp_path):
    p = tmp_path / "m.safetensors"
    d = {"w": torch.arange(1 << 16, dtype=torch.float32), "b": torch.ones(3)}
    st_pt.save_file(d, p)
    loaded = st_pt.load_file(p)  # views of a memory map of p
    loaded["w"] = loaded["w"] * 2  # a new tensor; "b" still maps the old file
    _save.save_file_torch(loaded, p)
    assert torch.equal(loaded["b"], torch.ones(3)), "the old mapping still reads its data"
    back = st_pt.load_file(p)
    assert torch.equal(back["w"], d["w"] * 2) and torch.equal(back["b"], d["b"])
    assert p.read_bytes() == st_pt.save({"w": d["w"] * 2, "b": d["b"]})
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_new_file_has_a_plain_create_permissions_deliberate(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    _save.save_file({"a": np.zeros(1)}, ours)
    st_np.save_file({"a": np.zeros(1)}, theirs)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(ours) == mode(plain)
    assert mode(theirs) == 0o600, "safetensors changed: update the docs"


def test_file_write_releases_the_gil(tmp_path):
    # 256 MiB from one tensor: while the writer thread is inside save_file, this thread keeps
    # running Python. Were the GIL held, it would stall for the whole write.
    t = torch.ones(64 << 20, dtype=torch.float32)
    p = tmp_path / "big.safetensors"
    stamps = []
    writer = threading.Thread(target=_save.save_file_torch, args=({"t": t}, p))
    start = time.perf_counter()
    writer.start()
    while writer.is_alive():
        stamps.append(time.perf_counter())
        time.sleep(0.001)
    total = time.perf_counter() - start
    gaps = np.diff([start, *stamps, time.perf_counter()])
    assert p.stat().st_size == 8 + len(parse_header_only(p)) + (256 << 20)
    if total < 0.05:
        pytest.skip(f"the write took {total * 1e3:.0f} ms: too fast to see")
    assert gaps.max() < total / 2, f"this thread stalled {gaps.max():.3f} s of a {total:.3f} s write"


def parse_header_only(p):
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


# ------------------------------------------------------------------------------------------
# save_model


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))


def test_save_model_same_bytes_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    for metadata in [None, {"format": "pt"}, {"head.weight": "mine"}]:
        given = None if metadata is None else dict(metadata)
        a, b = both_files(
            tmp_path,
            lambda p: _save.save_model(model, p, metadata=given),
            lambda p: st_pt.save_model(model, p, metadata=None if metadata is None else dict(metadata)),
        )
        assert_same_file(a, b)
        meta, got, _ = parse(a)
        assert "head.weight" not in got and "embed.weight" in got
        want = dict(metadata or {})
        want.setdefault("head.weight", "embed.weight")  # the user's own entry wins
        assert meta == want
        assert given == metadata, "our save_model leaves the caller's dict alone"
    # safetensors fills the caller's dict (documented difference).
    theirs_meta = {"format": "pt"}
    st_pt.save_model(model, tmp_path / "t.safetensors", metadata=theirs_meta)
    assert theirs_meta == {"format": "pt", "head.weight": "embed.weight"}


def test_save_model_force_contiguous(tmp_path):
    model = torch.nn.Linear(3, 4)
    model.register_buffer("t", torch.arange(6.0).reshape(2, 3).T)  # not contiguous
    a, b = both_files(tmp_path, lambda p: _save.save_model(model, p), lambda p: st_pt.save_model(model, p))
    assert a == b
    assert torch.equal(st_pt.load_file(tmp_path / "ours.safetensors")["t"], model.t)
    err, theirs = assert_same_failure(
        lambda: _save.save_model(model, tmp_path / "x.safetensors", force_contiguous=False),
        lambda: st_pt.save_model(model, tmp_path / "y.safetensors", force_contiguous=False),
        names=("`t`",),
    )
    assert "force_contiguous=True" in str(err) and "force_contiguous=True" in str(theirs)


def test_save_model_shared_without_a_complete_tensor(tmp_path):
    model = torch.nn.Module()
    storage = torch.zeros(10)
    model.register_buffer("a", storage[:6])
    model.register_buffer("b", storage[4:])
    assert_same_failure(
        lambda: _save.save_model(model, tmp_path / "x.safetensors"),
        lambda: st_pt.save_model(model, tmp_path / "y.safetensors"),
        names=("'a'", "'b'"),
    )


def test_shared_tensor_helpers_agree_with_safetensors():
    w = torch.zeros(8)
    sd = {"a": w, "b": w, "c": w[:4], "d": torch.ones(2), "e": w.view(2, 4), "f": torch.zeros(0)}
    ours = sorted(map(sorted, _save.find_shared_tensors(sd)))
    assert ours == sorted(map(sorted, st_pt._find_shared_tensors(sd)))
    for kw in [{}, {"preferred_names": ["e"]}, {"discard_names": ["a"]}]:
        assert dict(_save.remove_duplicate_names(sd, **kw)) == dict(st_pt._remove_duplicate_names(sd, **kw)), kw


# ------------------------------------------------------------------------------------------
# Through the drop-in modules, read back by weightstream's own readers.


def test_drop_in_modules_write_and_read_back(tmp_path):
    import weightstream.numpy as ws_np
    import weightstream.torch as ws_pt

    d = {k: random_torch(dt, (3, 2)) for k, dt in TORCH_DTYPES.items()}
    assert ws_pt.save(d, {"format": "pt"}) == st_pt.save(d, {"format": "pt"})
    ws_pt.save_file(d, tmp_path / "t.safetensors")
    back = ws_pt.load_file(tmp_path / "t.safetensors")
    for k, v in d.items():
        assert back[k].dtype == v.dtype and raw_bytes(back[k]) == raw_bytes(v), k
    n = {k: random_np(dt, (2, 2)) for k, dt in NP_DTYPES.items()}
    assert ws_np.save(n) == st_np.save(n)
    ws_np.save_file(n, tmp_path / "n.safetensors")
    back = ws_np.load_file(tmp_path / "n.safetensors")
    for k, v in n.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    assert ws.WeightstreamError is WeightstreamError


# ------------------------------------------------------------------------------------------
# The extension's own checks, which the Python layer never trips: each raises a typed error.


def test_raw_writer_refuses_bad_items(tmp_path):
    from weightstream import _weightstream as raw

    ok = raw.save_bytes([("a", "U8", [3], b"abc")])
    assert parse(ok)[1] == {"a": ("U8", [3], b"abc")}
    cases = {
        "wrong length": ([("a", "F32", [2], b"abcd")], "4 bytes given for F32 [2], which takes 8"),
        "unknown dtype": ([("a", "F128", [1], b"a" * 16)], "unknown dtype `F128`"),
        "not whole bytes": ([("a", "F4", [3], b"ab")], "does not fill whole bytes"),
        "twice": ([("a", "U8", [1], b"a"), ("a", "U8", [1], b"b")], "given twice"),
        "not contiguous": ([("a", "F64", [2], np.arange(4.0)[::2])], "not contiguous"),
    }
    for what, (items, message) in cases.items():
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
            raw.save_bytes(items)
        with pytest.raises(UsageError):
            raw.save_file(items, str(tmp_path / "x.safetensors"))
    with pytest.raises(TypeError, match="DLPack"):
        raw.save_bytes([("a", "U8", [3], [1, 2, 3])])
    assert os.listdir(tmp_path) == []
    # A DLPack object is read as it lies, whatever its dtype: 2 float64 = 16 bytes of U8.
    arr = np.array([1.0, 2.0])
    assert parse(raw.save_bytes([("a", "U8", [16], arr)]))[1]["a"][2] == arr.tobytes()
