"""Minimal safetensors reader for the reference models: header length (u64 LE),
JSON header, then raw little-endian tensor bytes. Returns float64 torch tensors."""
import json
import struct

import numpy as np
import torch

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        b, e = entry["data_offsets"]
        raw = data[start + b : start + e]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<"))
        out[name] = torch.from_numpy(arr.astype(np.float64).reshape(entry["shape"]).copy())
    return out


def load_model_dir(model_dir):
    with open(f"{model_dir}/config.json") as f:
        config = json.load(f)
    return config, read_safetensors(f"{model_dir}/model.safetensors")
