"""Reference 4-bit blockwise quantisation (QLoRA, Dettmers et al. 2023), float64.

Written from the paper and bitsandbytes' create_normal_map definition, not from
fedtune's code: the NF4 code values are the normalised quantiles
  v1 = Phi^-1(linspace(0.9677083, 0.5, 9)[:-1]), 0, v3 = -Phi^-1(linspace(0.9677083, 0.5, 8)[:-1]),
sorted and divided by their maximum (the linspace points in float32, as torch
makes them); int4 levels are (q - 8) / 7. A block of 64 values (the last one
zero-padded) is scaled by its absmax, each value goes to the nearest code value,
and two indices share a byte, the first in the high nibble.

stdin: {"data": [...], "format": "nf4" | "int4", "block_size": 64}
stdout: {"code": [16], "packed": [bytes], "scales": [blocks], "dequantized": [n]}
"""
import json
import sys

import torch


def nf4_code():
    offset = 0.9677083
    p1 = torch.linspace(offset, 0.5, 9)[:-1].to(torch.float64)
    p3 = torch.linspace(offset, 0.5, 8)[:-1].to(torch.float64)
    v1 = torch.special.ndtri(p1).tolist()
    v3 = (-torch.special.ndtri(p3)).tolist()
    v = torch.tensor(v1 + [0.0] + v3, dtype=torch.float64).sort().values
    return v / v.max()


def int4_code():
    return (torch.arange(16, dtype=torch.float64) - 8) / 7


def main():
    req = json.load(sys.stdin)
    code = nf4_code() if req["format"] == "nf4" else int4_code()
    bs = int(req.get("block_size", 64))
    x = torch.tensor(req["data"], dtype=torch.float64)
    n = x.numel()
    blocks = (n + bs - 1) // bs
    padded = torch.zeros(blocks * bs, dtype=torch.float64)
    padded[:n] = x
    xb = padded.view(blocks, bs)
    # absmax as float32, the stored scale
    scales = xb.abs().amax(dim=1).to(torch.float32).to(torch.float64)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normed = torch.where(scales[:, None] > 0, xb / safe[:, None], torch.zeros_like(xb))
    # nearest code value; the first (lowest) index on a tie
    idx = (normed[..., None] - code).abs().argmin(dim=-1).view(-1)
    packed = (idx[0::2] * 16 + idx[1::2]).tolist()
    deq = (code.to(torch.float32)[idx].view(blocks, bs) * scales.to(torch.float32)[:, None]).view(-1)[:n]
    json.dump({"code": code.tolist(), "packed": packed, "scales": scales.tolist(), "dequantized": deq.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
