"""Float64 reference forward pass of llama-family causal LMs (llama, mistral,
qwen2, qwen3, phi3) written from the published model descriptions: RMSNorm, rotary position
embeddings (RoFormer) with the rope_scaling variants documented for
transformers (linear position interpolation, dynamic NTK, Llama 3 frequency
smoothing, YaRN, Phi-3 LongRoPE), grouped-query attention, optional sliding-window attention
(Mistral), per-head RMSNorm of q and k (Qwen3), SwiGLU MLP.

Usage: llama_ref.py MODEL_DIR  (stdin: {"input_ids": [[...], ...]}, optionally "adapter": a PEFT
adapter directory merged into the weights by peft_ref.py)
Prints {"logits": [[[...V] * T] * B]} as JSON.
"""
import json
import math
import sys

import torch

from peft_ref import apply_adapter
from st import load_model_dir


def inv_frequencies(cfg, head_dim, seq_len):
    theta = float(cfg.get("rope_theta", 10000.0))
    half = head_dim // 2
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    max_pos = cfg.get("max_position_embeddings", 2048)
    if kind == "dynamic" and seq_len > max_pos:
        # NTK-aware: enlarge the base so the lowest frequency spans the new length.
        f = rs["factor"]
        theta = theta * ((f * seq_len / max_pos) - (f - 1)) ** (head_dim / (head_dim - 2))
    freqs = [theta ** (-2.0 * i / head_dim) for i in range(half)]
    mult = 1.0
    if kind == "linear":
        freqs = [x / rs["factor"] for x in freqs]
    elif kind == "llama3":
        f, lo, hi, orig = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        out = []
        for x in freqs:
            wavelength = 2 * math.pi / x
            if wavelength < orig / hi:  # high frequency: unchanged
                out.append(x)
            elif wavelength > orig / lo:  # low frequency: interpolated
                out.append(x / f)
            else:  # smooth blend between the two
                smooth = (orig / wavelength - lo) / (hi - lo)
                out.append((1 - smooth) * x / f + smooth * x)
        freqs = out
    elif kind == "longrope":
        # Phi-3: per-dimension rescaling, short factors within the pretraining context, long beyond.
        orig = cfg["original_max_position_embeddings"]
        ext = rs["long_factor"] if seq_len > orig else rs["short_factor"]
        freqs = [x / e for x, e in zip(freqs, ext)]
        scale = max_pos / orig
        mult = rs.get("attention_factor") or (1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig)))
    elif kind == "yarn":
        f = rs["factor"]
        orig = rs.get("original_max_position_embeddings") or max_pos
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1

        # Dimension index whose wavelength completes `rotations` turns over the original context.
        def dim_for(rotations):
            return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_for(beta_fast), dim_for(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, x in enumerate(freqs):
            interp_weight = min(1.0, max(0.0, (i - low) / (high - low)))
            out.append(x * (1 - interp_weight) + (x / f) * interp_weight)
        freqs = out

        def m(scale, ms=1.0):
            return 1.0 if scale <= 1 else 0.1 * ms * math.log(scale) + 1.0

        if rs.get("attention_factor") is not None:
            mult = rs["attention_factor"]
        elif rs.get("mscale") and rs.get("mscale_all_dim"):
            mult = m(f, rs["mscale"]) / m(f, rs["mscale_all_dim"])
        else:
            mult = m(f)
    return torch.tensor(freqs, dtype=torch.float64), mult


def apply_rope(x, inv_freq, mult):
    # x: [heads, T, hd]; rotate each pair (x[i], x[i + hd/2]) by angle pos * inv_freq[i].
    T, hd = x.shape[1], x.shape[2]
    half = hd // 2
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    c, s = torch.cos(ang) * mult, torch.sin(ang) * mult
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def sliding_layers(cfg, n_layers):
    mt = cfg["model_type"]
    w = cfg.get("sliding_window")
    if w is None:
        return None, set()
    if mt in ("mistral", "phi3"):
        return w, set(range(n_layers))
    if mt in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        if cfg.get("layer_types"):
            return w, {l for l, t in enumerate(cfg["layer_types"]) if t == "sliding_attention"}
        return w, {l for l in range(n_layers) if l >= cfg.get("max_window_layers", 28)}
    return None, set()


def forward(cfg, W, ids):
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    L = cfg["num_hidden_layers"]
    T = len(ids)
    inv_freq, mult = inv_frequencies(cfg, hd, T)
    window, swa = sliding_layers(cfg, L)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    I = cfg["intermediate_size"]
    for l in range(L):  # Phi-3 stores q/k/v and gate/up fused; split them into the llama layout
        p = f"model.layers.{l}"
        if f"{p}.self_attn.qkv_proj.weight" in W:
            q_w, k_w, v_w = W.pop(f"{p}.self_attn.qkv_proj.weight").split([nh * hd, nkv * hd, nkv * hd], dim=0)
            W[f"{p}.self_attn.q_proj.weight"], W[f"{p}.self_attn.k_proj.weight"], W[f"{p}.self_attn.v_proj.weight"] = q_w, k_w, v_w
        if f"{p}.mlp.gate_up_proj.weight" in W:
            W[f"{p}.mlp.gate_proj.weight"], W[f"{p}.mlp.up_proj.weight"] = W.pop(f"{p}.mlp.gate_up_proj.weight").split([I, I], dim=0)
    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    for l in range(L):
        p = f"model.layers.{l}"
        h = rms(x, W[f"{p}.input_layernorm.weight"])
        q = lin(h, f"{p}.self_attn.q_proj").reshape(T, nh, hd).transpose(0, 1)
        k = lin(h, f"{p}.self_attn.k_proj").reshape(T, nkv, hd).transpose(0, 1)
        v = lin(h, f"{p}.self_attn.v_proj").reshape(T, nkv, hd).transpose(0, 1)
        if cfg["model_type"] == "qwen3":  # RMSNorm of each head's q and k
            q, k = rms(q, W[f"{p}.self_attn.q_norm.weight"]), rms(k, W[f"{p}.self_attn.k_norm.weight"])
        q, k = apply_rope(q, inv_freq, mult), apply_rope(k, inv_freq, mult)
        allowed = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            for j in range(i + 1):
                allowed[i, j] = not (l in swa and i - j >= window)
        heads = []
        for head in range(nh):
            kv = head // (nh // nkv)
            sc = (q[head] @ k[kv].T) / math.sqrt(hd)
            sc = sc.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(sc, dim=-1) @ v[kv])
        attn = torch.stack(heads, 0).transpose(0, 1).reshape(T, nh * hd)
        x = x + lin(attn, f"{p}.self_attn.o_proj")
        h = rms(x, W[f"{p}.post_attention_layernorm.weight"])
        g = lin(h, f"{p}.mlp.gate_proj")
        x = x + lin(torch.nn.functional.silu(g) * lin(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
    x = rms(x, W["model.norm.weight"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def main():
    cfg, W = load_model_dir(sys.argv[1])
    req = json.load(sys.stdin)
    if "config_override" in req:
        cfg.update(req["config_override"])
    if "adapter" in req:
        W = apply_adapter(W, req["adapter"])
    logits = [forward(cfg, W, ids).tolist() for ids in req["input_ids"]]
    json.dump({"logits": logits}, sys.stdout)


if __name__ == "__main__":
    main()
