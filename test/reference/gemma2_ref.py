"""Float64 reference forward pass of Gemma 2 (Gemma Team 2024, "Gemma 2:
Improving Open Language Models at a Practical Size"): embeddings times
sqrt(d_model); RMSNorm with scale (1 + w); pre- and post-norm around both the
attention and the feed-forward block; GeGLU feed-forward (gelu, tanh
approximation); attention scores times query_pre_attn_scalar^-1/2 and
soft-capped, cap * tanh(s / cap); local sliding-window attention on every other
layer starting with the first, global attention on the rest; final logits
soft-capped; lm_head tied to the embeddings.

Usage: gemma2_ref.py MODEL_DIR  (stdin: {"input_ids": [[...], ...]})
Prints {"logits": [[[...V] * T] * B]} as JSON.
"""
import json
import math
import sys

import torch

from peft_ref import apply_adapter
from st import load_model_dir


def forward(cfg, W, ids):
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or 256
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types") or ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(L)]
    attn_cap = cfg.get("attn_logit_softcapping")
    final_cap = cfg.get("final_logit_softcapping")
    scale = cfg.get("query_pre_attn_scalar", 256) ** -0.5
    T = len(ids)

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w)

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def cap(x, c):
        return x if c is None else c * torch.tanh(x / c)

    def rope(x):  # x [heads, T, hd]; rotate pairs (i, i + hd/2)
        half = hd // 2
        freq = torch.tensor([theta ** (-2.0 * i / hd) for i in range(half)], dtype=torch.float64)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * torch.cos(ang) - b * torch.sin(ang), b * torch.cos(ang) + a * torch.sin(ang)], -1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = W["model.embed_tokens.weight"][torch.tensor(ids)] * math.sqrt(H)
    for l in range(L):
        p = f"model.layers.{l}"
        h = norm(x, W[f"{p}.input_layernorm.weight"])
        q = rope(lin(h, f"{p}.self_attn.q_proj").reshape(T, nh, hd).transpose(0, 1))
        k = rope(lin(h, f"{p}.self_attn.k_proj").reshape(T, nkv, hd).transpose(0, 1))
        v = lin(h, f"{p}.self_attn.v_proj").reshape(T, nkv, hd).transpose(0, 1)
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        visible = j <= i
        if types[l] == "sliding_attention" and window is not None:
            visible = visible & (i - j < window)
        out = torch.zeros(T, nh, hd, dtype=torch.float64)
        for head in range(nh):
            kv = head * nkv // nh
            s = cap((q[head] @ k[kv].T) * scale, attn_cap).masked_fill(~visible, float("-inf"))
            out[:, head] = torch.softmax(s, -1) @ v[kv]
        x = x + norm(lin(out.reshape(T, nh * hd), f"{p}.self_attn.o_proj"), W[f"{p}.post_attention_layernorm.weight"])
        h = norm(x, W[f"{p}.pre_feedforward_layernorm.weight"])
        m = lin(gelu_tanh(lin(h, f"{p}.mlp.gate_proj")) * lin(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
        x = x + norm(m, W[f"{p}.post_feedforward_layernorm.weight"])
    x = norm(x, W["model.norm.weight"])
    return cap(x @ W["model.embed_tokens.weight"].T, final_cap)


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
