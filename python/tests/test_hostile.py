"""Malformed files (the cases of tests/format_rules.rs and tests/hostile_*.rs, built here in
Python): load_file, safe_open, iterate and describe each raise a weightstream exception naming
the file, and never crash the interpreter. Each case runs in a child process, so a crash is a
failed test, not a dead pytest."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import sys, weightstream as ws
    path = sys.argv[1]
    def attempt(what, f):
        try:
            f()
        except ws.WeightstreamError as e:
            ok = isinstance(e, (ValueError, OSError))
            # The file (or, for a checkpoint folder or index, the folder it lies in) is named.
            import os
            here = os.path.abspath(path)
            named = os.path.basename(here) in str(e) or os.path.basename(os.path.dirname(here)) in str(e)
            verdict = "ok" if ok and named else "unnamed"
            if len(str(e)) > 2000 or "\x1b" in str(e):
                verdict = "unescaped-or-uncut"
            print(what, type(e).__name__, verdict, repr(str(e))[:300])
        except BaseException as e:
            print(what, "FOREIGN", type(e).__name__, repr(str(e))[:300])
        else:
            print(what, "NOERROR")
    attempt("load_file", lambda: ws.load_file(path, framework="np"))
    attempt("safe_open", lambda: ws.safe_open(path, framework="np").get_tensors())
    attempt("iterate", lambda: list(ws.Loader().iterate(path, window="1MiB", framework="np")))
    attempt("describe", lambda: ws.Loader().describe(path))
    """
)


def raw(header, data_len=0):
    h = header if isinstance(header, bytes) else header.encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


def t(name, dtype, shape, begin, end):
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}


def j(*entries):
    out = {}
    for e in entries:
        out.update(e)
    return json.dumps(out)


FILES = {
    "shorter_than_length_prefix": b"\x01\x02",
    "header_length_over_100_mb": struct.pack("<Q", 100_000_001) + b"{}",
    "header_length_u64_max": struct.pack("<Q", 2**64 - 1) + b"{}",
    "header_length_past_eof": struct.pack("<Q", 100) + b"{}",
    "header_not_utf8": raw(b'{"\xff\xfe": 1}'),
    "header_not_a_brace": raw(b"[]      "),
    "header_bad_json": raw(b'{"a":'),
    "entry_missing_fields": raw('{"a":{"dtype":"F32","shape":[1]}}', 4),
    "entry_wrong_types": raw('{"a":{"dtype":"F32","shape":"x","data_offsets":[0,4]}}', 4),
    "metadata_not_strings": raw('{"__metadata__":{"k":1}}'),
    "unknown_dtype": raw(j(t("a", "F33", [1], 0, 4)), 4),
    "negative_dimension": raw(j(t("a", "F32", [-1], 0, 4)), 4),
    "fractional_dimension": raw(j(t("a", "F32", [1.5], 0, 4)), 4),
    "shape_product_overflows": raw(j(t("a", "U8", [2**32, 2**32, 2**32], 0, 4)), 4),
    "offsets_begin_after_end": raw(j(t("a", "U8", [4], 4, 0)), 4),
    "size_differs_from_shape": raw(j(t("a", "F32", [2], 0, 4)), 4),
    "sub_byte_partial": raw(j(t("a", "F4", [3], 0, 2)), 2),
    "hole_between_tensors": raw(j(t("a", "U8", [4], 0, 4), t("b", "U8", [4], 8, 12)), 12),
    "hole_before_first": raw(j(t("a", "U8", [4], 4, 8)), 8),
    "overlapping_tensors": raw(j(t("a", "U8", [8], 0, 8), t("b", "U8", [8], 4, 12)), 12),
    "trailing_bytes": raw(j(t("a", "U8", [4], 0, 4)), 8),
    "data_past_eof": raw(j(t("a", "U8", [4], 0, 4)), 2),
    "duplicate_names": raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', 2),
    "rank_over_limit": raw(j(t("a", "U8", [1] * 17, 0, 1)), 1),
    # Messages name the tensor cut to 200 bytes, with terminal control characters escaped.
    "huge_name": raw(j(t("n" * 1_000_000, "F32", [2], 0, 4)), 4),
    "control_characters": raw(j(t("evil\x1b[31m\r", "F32", [2], 0, 4)), 4),
    "empty_file": b"",
}


def run_child(path):
    p = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"child died (rc {p.returncode}): {p.stderr[-2000:]}"
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4, p.stdout + p.stderr
    for line in lines:
        what, cls, verdict = (line.split(" ", 3) + ["", ""])[:3]
        assert cls not in ("FOREIGN", "NOERROR"), line
        assert verdict == "ok", line
    return lines


@pytest.mark.parametrize("case", sorted(FILES))
def test_malformed_file_raises(tmp_path, case):
    p = tmp_path / f"bad_{case}.safetensors"
    p.write_bytes(FILES[case])
    run_child(p)


def index(tmp_path, weight_map, shards=()):
    d = tmp_path / "model"
    d.mkdir()
    for name, header in shards:
        (d / name).write_bytes(header)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / "model.safetensors.index.json"


def good(name="a"):
    return raw(j(t(name, "U8", [4], 0, 4)), 4)


@pytest.mark.parametrize(
    "case",
    ["parent_dir", "absolute", "missing_shard", "not_json", "two_shards", "listed_not_in_shard", "fifo", "empty_dir"],
)
def test_bad_checkpoints_raise(tmp_path, case):
    if case == "parent_dir":
        (tmp_path / "outside.safetensors").write_bytes(good())
        p = index(tmp_path, {"a": "../outside.safetensors"})
    elif case == "absolute":
        (tmp_path / "abs.safetensors").write_bytes(good())
        p = index(tmp_path, {"a": str(tmp_path / "abs.safetensors")})
    elif case == "missing_shard":
        p = index(tmp_path, {"a": "nope.safetensors"})
    elif case == "not_json":
        p = tmp_path / "model.safetensors.index.json"
        p.write_text("{not json")
    elif case == "two_shards":
        p = index(tmp_path, {"a": "s1.safetensors"}, [("s1.safetensors", good()), ("s2.safetensors", good())])
        p = p.parent
        os.remove(p / "model.safetensors.index.json")  # a directory: `a` is in both files
    elif case == "listed_not_in_shard":
        p = index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"}, [("s1.safetensors", good())])
    elif case == "fifo":
        p = tmp_path / "fifo.safetensors"
        os.mkfifo(p)
    else:
        p = tmp_path / "empty_dir"
        p.mkdir()
    run_child(p)
