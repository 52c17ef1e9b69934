"""Writing a snapshot's tensors as one ``.safetensors`` file.

The safetensors layout: an 8-byte little-endian header length, a JSON
header ``{key: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded
with spaces to a multiple of 8, then the tensors' bytes back to back. We
write it ourselves so that bf16 and float8 export without torch; the tests
load the result with the safetensors package's own loader.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from snapd.errors import UnsupportedValueError
from snapd.format.reader import SnapshotReader

SAFETENSORS_DTYPE = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "uint32": "U32",
    "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16", "bfloat16": "BF16",
    "float32": "F32", "float64": "F64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}


def export(reader: SnapshotReader, out: str | os.PathLike, keys: list[str] | None = None) -> int:
    """Write the selected tensors of ``reader`` to ``out``; return the tensor count."""
    wanted = reader.select(keys)
    tensors = [reader.manifest.tensors[i] for i in wanted]
    header: dict = {"__metadata__": {"format": "pt", "snapd_step": str(reader.manifest.step),
                                     "snapd_job": reader.manifest.job}}
    pos = 0
    for rec in tensors:
        code = SAFETENSORS_DTYPE.get(rec.dtype)
        if code is None:
            raise UnsupportedValueError(f"{rec.key}: dtype {rec.dtype} has no safetensors equivalent "
                                        "(leave it out with --keys)")
        header[rec.key] = {"dtype": code, "shape": rec.shape, "data_offsets": [pos, pos + rec.nbytes]}
        pos += rec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i, rec in zip(wanted, tensors):  # one tensor in memory at a time
                buf = np.empty(rec.nbytes, dtype=np.uint8)
                reader.read_tensors([i], lambda _i, buf=buf: memoryview(buf))
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(tensors)
