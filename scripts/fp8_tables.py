#!/usr/bin/env python3
"""Reference tables for the fp8 conversions, from ml_dtypes.

usage: fp8_tables.py OUT.json

Writes {"F8_E4M3": {"F32": [...], "F16": [...], "BF16": [...]}, "F8_E5M2": {...}}: for each of
the 256 fp8 bit patterns, the bits of the value converted by ml_dtypes/numpy. Exits with status 3
and one line on stderr when numpy or ml_dtypes is missing (tests/convert_math.rs then skips).
"""
import json
import sys

try:
    import numpy as np
    import ml_dtypes
except ImportError as e:  # pragma: no cover - depends on the environment
    print(f"ml_dtypes unavailable: {e}", file=sys.stderr)
    sys.exit(3)


def main() -> None:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    codes = np.arange(256, dtype=np.uint8)
    out = {"ml_dtypes": ml_dtypes.__version__, "numpy": np.__version__}
    for name, fp8 in (("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2)):
        x = codes.view(fp8)
        out[name] = {
            "F32": [int(v) for v in x.astype(np.float32).view(np.uint32)],
            "F16": [int(v) for v in x.astype(np.float16).view(np.uint16)],
            "BF16": [int(v) for v in x.astype(ml_dtypes.bfloat16).view(np.uint16)],
        }
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
