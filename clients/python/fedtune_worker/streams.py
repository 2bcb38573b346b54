"""Chunked tensor streams (docs/protocol.md, "Tensor streams").

A tensor stream's bytes are the tensors' raw little-endian element bytes,
concatenated in manifest order with no padding; the trailer's SHA-256 covers
exactly those bytes (not a safetensors file).
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .gen import tensors_pb2

# DType enum value -> (name, numpy little-endian dtype)
DTYPES = {
    tensors_pb2.DTYPE_F32: ("F32", "<f4"),
    tensors_pb2.DTYPE_F16: ("F16", "<f2"),
    tensors_pb2.DTYPE_F64: ("F64", "<f8"),
}


class StreamError(ValueError):
    """A stream that breaks the chunk rules (the message says which and where)."""


Manifest = List[Tuple[str, int, Tuple[int, ...]]]  # (name, DType, shape)


def manifest_of(header_tensors: "tensors_pb2.TensorManifest") -> Manifest:
    out: Manifest = []
    seen = set()
    for i, t in enumerate(header_tensors.tensors):
        if t.dtype not in DTYPES and t.dtype != tensors_pb2.DTYPE_BF16:
            raise StreamError(f"tensor {t.name or f'#{i}'}: unknown dtype {t.dtype}")
        if t.name in seen:
            raise StreamError(f"tensor {t.name}: appears twice in the manifest")
        seen.add(t.name)
        out.append((t.name, t.dtype, tuple(int(d) for d in t.shape)))
    return out


def _itemsize(dtype: int) -> int:
    return {tensors_pb2.DTYPE_F32: 4, tensors_pb2.DTYPE_F16: 2, tensors_pb2.DTYPE_BF16: 2, tensors_pb2.DTYPE_F64: 8}[dtype]


def manifest_bytes(manifest: Manifest) -> int:
    return sum(math.prod(shape) * _itemsize(dtype) for _, dtype, shape in manifest)


class Assembler:
    """Reassembles one chunked stream, checking as it goes (the rules the coordinator applies too)."""

    def __init__(self, total_bytes: int, max_chunk_bytes: int, what: str):
        if total_bytes < 0:
            raise StreamError(f"{what}: total_bytes must be non-negative (got {total_bytes})")
        self.total = total_bytes
        self.max_chunk = max_chunk_bytes
        self.what = what
        self.buf = bytearray(total_bytes)
        self.received = 0
        self.hash = hashlib.sha256()

    def push(self, offset: int, data: bytes) -> None:
        if self.max_chunk and len(data) > self.max_chunk:
            raise StreamError(f"{self.what}: chunk of {len(data)} bytes exceeds the limit of {self.max_chunk} bytes per chunk")
        if offset != self.received:
            raise StreamError(f"{self.what}: chunk at offset {offset}, expected offset {self.received} (chunks must be consecutive)")
        if self.received + len(data) > self.total:
            raise StreamError(f"{self.what}: chunks exceed the announced {self.total} bytes")
        self.buf[self.received : self.received + len(data)] = data
        self.hash.update(data)
        self.received += len(data)

    def finish(self, total_bytes: int, sha256: bytes) -> bytes:
        if total_bytes != self.total or self.received != self.total:
            raise StreamError(f"{self.what}: incomplete: header announced {self.total} bytes, trailer says {total_bytes}, {self.received} arrived")
        digest = self.hash.digest()
        if digest != sha256:
            raise StreamError(f"{self.what}: SHA-256 mismatch (sent {sha256.hex() or '<empty>'}, computed {digest.hex()})")
        return bytes(self.buf)


def unpack(manifest: Manifest, data: Union[bytes, bytearray, memoryview]) -> Dict[str, np.ndarray]:
    """Stream bytes -> name -> float32 array: F32 tensors are views of `data` (no copy; read-only when `data` is
    bytes), F16 / F64 are converted and BF16 widened into arrays of their own."""
    need = manifest_bytes(manifest)
    if need != len(data):
        raise StreamError(f"tensor stream: manifest describes {need} bytes but {len(data)} arrived")
    view = memoryview(data)
    out: Dict[str, np.ndarray] = {}
    off = 0
    for name, dtype, shape in manifest:
        n = math.prod(shape) * _itemsize(dtype)
        raw = view[off : off + n]  # a view: no copy until astype
        if dtype == tensors_pb2.DTYPE_BF16:
            a = (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4")
        elif dtype == tensors_pb2.DTYPE_F32:
            a = np.frombuffer(raw, dtype="<f4")
        else:
            a = np.frombuffer(raw, dtype=DTYPES[dtype][1]).astype(np.float32)
        out[name] = a.reshape(shape)
        off += n
    return out


def pack_update(manifest: Manifest, update: Dict[str, np.ndarray]) -> bytes:
    """An update as F32 stream bytes in the manifest's order; refuses missing, extra, misshapen or non-finite tensors."""
    names = [n for n, _, _ in manifest]
    extra = sorted(set(update) - set(names))
    if extra:
        raise StreamError(f"update has tensor {extra[0]} which the global adapter does not have (return exactly the global's names)")
    parts = []
    for name, _, shape in manifest:
        if name not in update:
            raise StreamError(f"update lacks tensor {name} (return every tensor of the global adapter)")
        a = np.asarray(update[name])
        if tuple(a.shape) != shape:
            raise StreamError(f"update tensor {name} has shape {list(a.shape)}, the global adapter's is {list(shape)}")
        a = a.astype("<f4", copy=False)
        if not np.isfinite(a).all():
            i = int(np.flatnonzero(~np.isfinite(a.reshape(-1)))[0])
            raise StreamError(f"update tensor {name} has a non-finite value ({a.reshape(-1)[i]}) at element {i}")
        parts.append(np.ascontiguousarray(a).tobytes())
    return b"".join(parts)


def chunks(data: bytes, chunk_bytes: int) -> Iterator[Tuple[int, bytes]]:
    """(offset, bytes) of consecutive chunks of exactly chunk_bytes, the last one shorter."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive (got {chunk_bytes})")
    view = memoryview(data)
    for off in range(0, len(data), chunk_bytes):
        yield off, bytes(view[off : off + chunk_bytes])


def wire_manifest(manifest: Sequence[Tuple[str, int, Tuple[int, ...]]], dtype: Optional[int] = tensors_pb2.DTYPE_F32) -> "tensors_pb2.TensorManifest":
    """The manifest of an update with the global's names and shapes: every tensor F32, or with dtype None each entry's own (a compressed update's)."""
    return tensors_pb2.TensorManifest(
        tensors=[tensors_pb2.TensorSpec(name=n, dtype=d if dtype is None else dtype, shape=list(s)) for n, d, s in manifest]
    )
