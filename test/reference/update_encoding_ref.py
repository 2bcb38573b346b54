"""Reference encodings of a fedtune update (docs/protocol.md#compressed-updates), written
from the protocol text with numpy and torch, not from common/update-encoding.ts.

  float16:    numpy float32 -> float16 (IEEE round to nearest even), the 16 bits.
  bfloat16:   torch float32 -> bfloat16 (round to nearest even), the 16 bits.
  int8_delta: delta = float32(update - start); per block of B elements
              scale = float32(max|delta| / 127), q = rint(delta / scale) clipped to
              [-127, 127] (0 where scale = 0); decoded = float32(start + float32(q * scale)).

Usage: update_encoding_ref.py  (stdin: {"values": [...], "start": [...], "block": B})
Prints {"f16": [bits], "bf16": [bits], "scales": [...], "q": [...], "decoded": [...]} as JSON.
"""
import json
import sys

import numpy as np
import torch

req = json.load(sys.stdin)
x = np.asarray(req["values"], dtype=np.float32)
start = np.asarray(req["start"], dtype=np.float32)
B = int(req["block"])

f16 = x.astype(np.float16).view(np.uint16).astype(int).tolist()
bf16 = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().astype(np.int64) & 0xFFFF

delta = (x - start).astype(np.float32)
scales, q = [], []
for lo in range(0, len(delta), B):
    blk = delta[lo:lo + B]
    s = np.float32(np.max(np.abs(blk)) / np.float32(127))
    scales.append(float(s))
    if s == 0:
        q.extend([0] * len(blk))
    else:
        q.extend(np.clip(np.rint(blk.astype(np.float64) / np.float64(s)), -127, 127).astype(int).tolist())
qa = np.asarray(q, dtype=np.float64)
sa = np.repeat(np.asarray(scales, dtype=np.float32), B)[: len(delta)]
step = (qa * sa.astype(np.float64)).astype(np.float32)
decoded = (start + step).astype(np.float32)
print(json.dumps({"f16": f16, "bf16": bf16.tolist(), "scales": scales, "q": q, "decoded": [float(v) for v in decoded]}))
