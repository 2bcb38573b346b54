"""A PEFT LoRA adapter directory merged into a float64 weight dict, written from
PEFT's documented semantics (peft/tuners/lora/config.py field docs,
peft/tuners/tuners_utils.py check_target_module_exists, peft/utils/other.py
get_pattern_key, LoraLayer.update_layer), not from fedtune's code:

- a module is adapted when its name is a target module or ends in ".<target>",
  and, with layers_to_transform, when its layer index is listed: the index is
  the number after the first "<name>." segment (`.*?\\.[^.]*\\.(\\d+)\\.`), or
  after one of layers_pattern's names (`.*?\\.{p}\\.(\\d+)\\.`);
- its rank and alpha are those of the first rank_pattern / alpha_pattern key k
  (in order) with re.match(rf"(.*\\.)?({k})$", name), else r and lora_alpha;
- W <- W + s B A with s = alpha / r, or alpha / sqrt(r) with use_rslora;
- with use_dora (DoRA, Liu et al. 2024, eq. 5): W <- m * V / ||V||_c with
  V = W + s B A, ||V||_c the L2 norm of each output feature (row of V [out, in])
  and m the adapter's magnitude vector [out] (key <module>.lora_magnitude_vector,
  also read with a ".weight" suffix). In a forward pass without dropout this is
  the whole DoRA layer (the paper's detached norm only changes gradients).

The adapter's keys must be exactly those of the adapted modules, at their
ranks; anything else is an error (the reference refuses what it cannot check).
"""
import json
import math
import os
import re

import torch

from st import read_safetensors

PREFIX = "base_model.model."


def _pattern_key(keys, name):
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def _layer_index(name, layers_pattern):
    if layers_pattern is None or layers_pattern == [] or layers_pattern == "":
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for p in pats:
        m = re.match(rf".*?\.{p}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def _targeted(cfg, name):
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if not re.fullmatch(targets, name):
            return False
    elif not any(name == t or name.endswith("." + t) for t in targets):
        return False
    lt = cfg.get("layers_to_transform")
    if lt is None:
        return True
    lt = [lt] if isinstance(lt, int) else lt
    i = _layer_index(name, cfg.get("layers_pattern"))
    return i is not None and i in lt


def apply_adapter(W, adapter_dir):
    """W: {name: float64 tensor} ([out, in]; gpt2 Conv1D [in, out] with fan_in_fan_out); returns a new dict with the adapter merged."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    dora = bool(cfg.get("use_dora"))
    # fan_in_fan_out (gpt2 Conv1D): the base weight is stored [in, out]; B A is [out, in] as for nn.Linear.
    fan = bool(cfg.get("fan_in_fan_out"))
    A = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    if dora:
        A = {(k[: -len(".weight")] if k.endswith(".lora_magnitude_vector.weight") else k): v for k, v in A.items()}
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules = sorted(n[: -len(".weight")] for n in W if n.endswith(".weight") and _targeted(cfg, n[: -len(".weight")]))
    want = set()
    for m in modules:
        want.add(f"{PREFIX}{m}.lora_A.weight")
        want.add(f"{PREFIX}{m}.lora_B.weight")
        if dora:
            want.add(f"{PREFIX}{m}.lora_magnitude_vector")
    got = set(A.keys())
    if got != want:
        raise SystemExit(f"peft_ref: adapter keys differ from the adapted modules: extra {sorted(got - want)[:4]}, missing {sorted(want - got)[:4]}")
    out = dict(W)
    for m in modules:
        rk = _pattern_key(list(rank_pattern.keys()), m)
        ak = _pattern_key(list(alpha_pattern.keys()), m)
        r = rank_pattern[rk] if rk is not None else cfg["r"]
        alpha = alpha_pattern[ak] if ak is not None else cfg["lora_alpha"]
        a = A[f"{PREFIX}{m}.lora_A.weight"]
        b = A[f"{PREFIX}{m}.lora_B.weight"]
        if a.shape[0] != r or b.shape[1] != r:
            raise SystemExit(f"peft_ref: {m} has rank {a.shape[0]}/{b.shape[1]}, the config gives it {r}")
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        W0 = W[f"{m}.weight"].T if fan else W[f"{m}.weight"]
        V = W0 + s * (b @ a)
        if dora:
            mag = A[f"{PREFIX}{m}.lora_magnitude_vector"]
            if mag.shape != (V.shape[0],):
                raise SystemExit(f"peft_ref: {m} magnitude has shape {tuple(mag.shape)}, expected ({V.shape[0]},)")
            V = (mag / torch.sqrt((V * V).sum(dim=1))).unsqueeze(1) * V
        out[f"{m}.weight"] = V.T if fan else V
    return out
