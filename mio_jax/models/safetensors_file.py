"""Minimal safetensors reader/writer on numpy memory maps (BF16 included, no torch).

Written here rather than via `safetensors.numpy` because numpy has no native bfloat16
and because a corrupt header should raise an error that names the file.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Lazy access to the tensors of one `.safetensors` file.

    Args:
      path: file path. Raises ValueError naming the file when the header is corrupt.
    """

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path}: corrupt safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n == 0 or n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: corrupt safetensors header (length {n}, file {size} B)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self._data_size = size - self._base
        self.entries: dict[str, dict] = {}
        for name, entry in header.items():
            try:
                start, end = entry["data_offsets"]
                shape = [int(s) for s in entry["shape"]]
                dtype = entry["dtype"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: corrupt safetensors header entry for tensor "
                                 f"{name!r}: {entry!r}") from None
            if not 0 <= start <= end <= self._data_size:
                raise ValueError(f"{path}: tensor {name!r} data offsets {start}..{end} lie "
                                 f"outside the {self._data_size}-byte data section")
            self.entries[name] = {"dtype": dtype, "shape": tuple(shape), "offsets": (start, end)}
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]["shape"]

    def get(self, name: str) -> np.ndarray:
        """Returns tensor `name` as a read-only numpy view of the memory map."""
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']} "
                             f"(supported: {sorted(_DTYPES)})")
        dt = _DTYPES[e["dtype"]]
        start, end = e["offsets"]
        count = int(np.prod(e["shape"], dtype=np.int64))
        if end - start != count * dt.itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} byte size {end - start} does not "
                             f"match shape {e['shape']} x {e['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self._base + start:self._base + end]
        return buf.view(dt).reshape(e["shape"])


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes (name, array) pairs to `path` in safetensors format (F64/F32/F16/BF16)."""
    tensors = [(n, np.ascontiguousarray(a)) for n, a in tensors]
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in tensors:
        if arr.dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in tensors:
            f.write(arr.tobytes())
