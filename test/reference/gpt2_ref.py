"""Float64 reference forward pass of GPT-2 (Radford et al. 2019): learned
positions, pre-LayerNorm blocks, Conv1D weights stored [in, out], gelu with the
tanh approximation, tied lm_head. Attention scores are divided by sqrt(head_dim)
when scale_attn_weights (default true) and by (layer index + 1) when
scale_attn_by_inverse_layer_idx.

Usage: gpt2_ref.py MODEL_DIR  (stdin: {"input_ids": [[...], ...]}, optionally "adapter": a PEFT
adapter directory merged into the weights by peft_ref.py)
Prints {"logits": [[[...V] * T] * B]} as JSON.
"""
import json
import math
import sys

import torch

from peft_ref import apply_adapter
from st import load_model_dir


def forward(cfg, W, ids):
    H, nh, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    hd = H // nh
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    T = len(ids)

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * W[p + ".weight"] + W[p + ".bias"]

    def conv(x, p):
        return x @ W[p + ".weight"] + W[p + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    pre = "" if "wte.weight" in W else "transformer."
    x = W[pre + "wte.weight"][torch.tensor(ids)] + W[pre + "wpe.weight"][:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for l in range(L):
        p = f"{pre}h.{l}"
        qkv = conv(ln(x, p + ".ln_1"), p + ".attn.c_attn")
        q, k, v = (t.reshape(T, nh, hd).transpose(0, 1) for t in qkv.split(H, dim=-1))
        sc = q @ k.transpose(1, 2)
        if cfg.get("scale_attn_weights", True):
            sc = sc / math.sqrt(hd)
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            sc = sc / (l + 1)
        sc = sc.masked_fill(future, float("-inf"))
        attn = (torch.softmax(sc, -1) @ v).transpose(0, 1).reshape(T, H)
        x = x + conv(attn, p + ".attn.c_proj")
        x = x + conv(gelu(conv(ln(x, p + ".ln_2"), p + ".mlp.c_fc")), p + ".mlp.c_proj")
    x = ln(x, pre + "ln_f")
    return x @ W[pre + "wte.weight"].T


def main():
    cfg, W = load_model_dir(sys.argv[1])
    req = json.load(sys.stdin)
    if "config_override" in req:
        cfg.update(req["config_override"])
    if "adapter" in req:
        W = apply_adapter(W, req["adapter"])
    json.dump({"logits": [forward(cfg, W, ids).tolist() for ids in req["input_ids"]]}, sys.stdout)


if __name__ == "__main__":
    main()
