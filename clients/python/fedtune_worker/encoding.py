"""Compressed updates (docs/protocol.md, "Compressed updates"): the update a train task asks for in
``TrainTask.encoding``, encoded as the coordinator decodes it.

    float16     DTYPE_F16: IEEE binary16, rounded to nearest even (a value beyond its range fails, named)
    bfloat16    DTYPE_BF16: the upper 16 bits of the float32, rounded to nearest even
    int8_delta  DTYPE_I8: per tensor, d = fround(update - start [+ residual]) in blocks of block_size
                elements: the block's scale fround(max |d| / 127) (float32), then q = d / scale rounded
                half to even and clamped to [-127, 127] (0 where scale = 0); decoded
                x = fround(start + fround(q * scale)). With error feedback the worker keeps
                r' = fround(d - (x - start)) and adds it to the next round's delta.

The arithmetic is float64 rounded to float32 where the protocol says fround, element for element as
fedtune's own worker computes it (common/update-encoding.ts), so both send the same bytes.
"""
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from .gen import coordinator_pb2 as pb
from .gen import tensors_pb2
from .streams import Manifest, StreamError

MAX_INT8_BLOCK_SIZE = 1 << 20
_DTYPE = {
    pb.UPDATE_ENCODING_FLOAT16: tensors_pb2.DTYPE_F16,
    pb.UPDATE_ENCODING_BFLOAT16: tensors_pb2.DTYPE_BF16,
    pb.UPDATE_ENCODING_INT8_DELTA: tensors_pb2.DTYPE_I8,
}
NAMES = {
    pb.UPDATE_ENCODING_FLOAT32: "float32",
    pb.UPDATE_ENCODING_FLOAT16: "float16",
    pb.UPDATE_ENCODING_BFLOAT16: "bfloat16",
    pb.UPDATE_ENCODING_INT8_DELTA: "int8_delta",
}


def choose(spec: Optional["pb.UpdateEncodingSpec"]) -> Tuple[int, int, bool]:
    """The encoding to upload a task's update in: the one it asks for when it accepts it (and, for int8_delta,
    gives a valid block size), else float32 (a coordinator that predates encodings sends no spec)."""
    plain = (pb.UPDATE_ENCODING_FLOAT32, 0, False)
    if spec is None or spec.encoding not in _DTYPE or spec.encoding not in list(spec.accepted):
        return plain
    if spec.encoding == pb.UPDATE_ENCODING_INT8_DELTA:
        if not 1 <= spec.block_size <= MAX_INT8_BLOCK_SIZE:
            return plain
        return (spec.encoding, spec.block_size, bool(spec.error_feedback))
    return (spec.encoding, 0, False)


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype("<f4").view("<u4")
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype("<u2"), rounded)


def _out_of_range(name: str, x: np.ndarray, bits: np.ndarray, inf_bits: int, what: str, hint: str) -> None:
    bad = ((bits & 0x7FFF) >= inf_bits) & np.isfinite(x)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StreamError(f"tensor {name}: element {i} ({x[i]}) is beyond the range of {what}; use round.update_encoding: {hint}")


def encode(
    manifest: Manifest,
    update: Mapping[str, np.ndarray],
    encoding: int,
    block_size: int = 0,
    start: Optional[Mapping[str, np.ndarray]] = None,
    residual: Optional[Mapping[str, np.ndarray]] = None,
    error_feedback: bool = False,
) -> Tuple[List[Tuple[str, int, Tuple[int, ...]]], bytes, Optional[Dict[str, np.ndarray]]]:
    """The upload's manifest (names, the encoding's dtype, shapes), its bytes, and with error feedback the
    residual to keep once the coordinator accepted it. ``update`` holds float32 arrays of the manifest's
    names and shapes (checked by streams.pack_update's rules first)."""
    dtype = _DTYPE[encoding]
    out_manifest = [(name, dtype, tuple(shape)) for name, _, shape in manifest]
    parts: List[bytes] = []
    kept: Optional[Dict[str, np.ndarray]] = {} if encoding == pb.UPDATE_ENCODING_INT8_DELTA and error_feedback else None
    for name, _, shape in manifest:
        x = np.ascontiguousarray(update[name], dtype="<f4").reshape(-1)
        if encoding == pb.UPDATE_ENCODING_FLOAT16:
            with np.errstate(over="ignore"):  # an overflow is refused just below, naming the element
                h = x.astype("<f2")
            _out_of_range(name, x, h.view("<u2"), 0x7C00, "float16", "bfloat16 or float32")
            parts.append(h.tobytes())
        elif encoding == pb.UPDATE_ENCODING_BFLOAT16:
            b = _bf16_bits(x)
            _out_of_range(name, x, b, 0x7F80, "bfloat16", "float32")
            parts.append(b.tobytes())
        else:
            s = None if start is None else start.get(name)
            if s is None or s.size != x.size:
                raise StreamError(f"int8_delta: tensor {name} has no start value of {x.size} elements to take the delta against")
            s64 = np.asarray(s, dtype="<f4").reshape(-1).astype(np.float64)
            r = None if residual is None else residual.get(name)
            r64 = r.reshape(-1).astype(np.float64) if r is not None and r.size == x.size else 0.0  # another rank starts from zero
            d = _f32(x.astype(np.float64) - s64 + r64)
            if not np.isfinite(d).all():
                i = int(np.flatnonzero(~np.isfinite(d))[0])
                raise StreamError(f"tensor {name}: delta element {i} is not finite ({d[i]}); the update cannot be sent")
            n = d.size
            nb = -(-n // block_size)
            padded = np.zeros(nb * block_size, dtype=np.float32)
            padded[:n] = d
            scales = _f32(np.abs(padded.reshape(nb, block_size)).max(axis=1).astype(np.float64) / 127.0)
            per = np.repeat(scales, block_size)[:n].astype(np.float64)
            safe = np.where(per == 0, 1.0, per)
            q = np.where(per == 0, 0.0, np.clip(np.rint(d.astype(np.float64) / safe), -127, 127)).astype(np.int8)
            parts.append(scales.astype("<f4").tobytes() + q.tobytes())
            if kept is not None:
                xs = _f32(s64 + _f32(q.astype(np.float64) * per).astype(np.float64)).astype(np.float64)
                kept[name] = _f32(d.astype(np.float64) - (xs - s64)).reshape(tuple(shape))
    return out_manifest, b"".join(parts), kept
