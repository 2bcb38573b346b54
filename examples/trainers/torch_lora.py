#!/usr/bin/env python3
"""LoRA fine-tuning of a llama-family model with PyTorch alone, for fedtune's exec trainer.

    fedtune worker --trainer exec --exec "python3 examples/trainers/torch_lora.py" ...

The worker runs this once per task with `--task-dir DIR` (see README.md next to
this file). The script reads DIR/spec.json, the global adapter in DIR/global/,
the site's data and the base model, then either trains (mode "train": writes
DIR/output/ as a PEFT adapter and DIR/metrics.json) or evaluates (mode "eval":
writes DIR/eval.json). Progress goes to stdout as one JSON object per step.

Needs only torch (and numpy, which torch uses to hand out bytes): the
safetensors files, the byte-level BPE tokenizer.json, the prompt templates and
the llama forward pass (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU) are all in this file. Models: config.json model_type llama, mistral or
qwen2 (q/k/v biases), float32/float16/bfloat16 weights, one model.safetensors
or a sharded checkpoint with model.safetensors.index.json.

The local objective is fedtune's: the summed token cross-entropy of the
response tokens (prompt tokens masked) divided by the trained tokens of the
optimizer step, plus prox_mu/2 * ||w - w_global||^2 (FedProx); AdamW with
decoupled weight decay, global-norm clipping, constant/linear/cosine schedule
with warmup; freeze_lora_a keeps every lora_A fixed (FFA-LoRA). With
training.optimizer_scope "run" the worker passes paths.optimizer_state, a
directory that outlives the task: AdamW's state (moments, step counts) is
loaded from adamw.pt there when the last round left one, and saved there after
training, so the site's optimizer continues from round to round.

Environment: TORCH_LORA_DEVICE (default cuda when available, else cpu),
TORCH_LORA_THREADS (CPU threads; default torch's choice).
"""
import argparse
import json
import math
import os
import random
import re
import struct
import sys
import time

import torch
import torch.nn.functional as F

IGNORE = -100


def fail(msg):
    print(f"torch_lora: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# ---------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, raw tensor bytes

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        fail(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        fail(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_DTYPES.get(e["dtype"])
        if dtype is None:
            fail(f"{path}: tensor {name} has dtype {e['dtype']}, which this script cannot read")
        begin, end = e["data_offsets"]
        shape = list(e["shape"])
        count = math.prod(shape)
        if count == 0:
            out[name] = torch.zeros(shape, dtype=dtype)
            continue
        # A copy of the tensor's bytes: aligned for torch, independent of `data`.
        buf = bytearray(data[base + begin:base + end])
        out[name] = torch.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
    return out


def write_safetensors(path, tensors):
    """float32 tensors, keys sorted, header padded to 8 bytes; written to a temp file, then renamed."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        b = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        fail(f"{what} not found: {path}")
    except json.JSONDecodeError as e:
        fail(f"{what} {path} is not valid JSON: {e}")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Byte-level BPE tokenizer (tokenizer.json with model BPE, pre_tokenizer ByteLevel)

# GPT-2's pre-tokenizer pattern; \p{L} and \p{N} spelled with what Python's re has.
GPT2_PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def token_content(v):
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


class Tokenizer:
    def __init__(self, model_dir, model_cfg):
        path = os.path.join(model_dir, "tokenizer.json")
        j = read_json(path, "tokenizer")
        m = j.get("model") or {}
        pre = j.get("pre_tokenizer") or {}
        if m.get("type") != "BPE" or pre.get("type") != "ByteLevel":
            fail(f"{path}: only byte-level BPE tokenizers are supported (model BPE, pre_tokenizer ByteLevel); "
                 f"this one has model {m.get('type')!r}, pre_tokenizer {pre.get('type')!r}")
        if j.get("normalizer") is not None:
            fail(f"{path}: tokenizers with a normalizer are not supported")
        self.vocab = dict(m["vocab"])
        self.ranks = {}
        for i, mg in enumerate(m.get("merges") or []):
            a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
            self.ranks[(a, b)] = i
        self.use_regex = pre.get("use_regex", True)
        self.prefix_space = pre.get("add_prefix_space", False)
        self.added = {}
        for t in j.get("added_tokens") or []:
            self.added[t["content"]] = t["id"]
            self.vocab.setdefault(t["content"], t["id"])
        self.added_re = (re.compile("(" + "|".join(re.escape(c) for c in sorted(self.added, key=len, reverse=True)) + ")")
                         if self.added else None)
        self.byte_enc = bytes_to_unicode()
        self.cache = {}
        tcfg = {}
        tcfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(tcfg_path):
            tcfg = read_json(tcfg_path, "tokenizer config")

        def special(field, id_field):
            c = token_content(tcfg.get(field))
            if c is not None:
                if c not in self.vocab:
                    fail(f"{tcfg_path}: {field} {c!r} is not in the vocabulary of {path}")
                return self.vocab[c]
            v = model_cfg.get(id_field)
            v = v[0] if isinstance(v, list) and v else v
            return v if isinstance(v, int) and v >= 0 else None

        self.bos = special("bos_token", "bos_token_id")
        self.eos = special("eos_token", "eos_token_id")
        pad = special("pad_token", "pad_token_id")
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def bpe(self, word):
        hit = self.cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = (parts[i], parts[i + 1]), r
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            ids = [self.vocab[p] for p in parts]
        except KeyError as e:
            fail(f"tokenizer: piece {e.args[0]!r} is not in the vocabulary")
        self.cache[word] = ids
        return ids

    def encode(self, text):
        ids = []
        pieces = self.added_re.split(text) if self.added_re else [text]
        first = True
        for k, piece in enumerate(pieces):
            if piece == "":
                continue
            if self.added_re and k % 2 == 1:
                ids.append(self.added[piece])
                first = False
                continue
            if self.prefix_space and first and not piece.startswith(" "):
                piece = " " + piece
            first = False
            words = GPT2_PATTERN.findall(piece) if self.use_regex else [piece]
            for w in words:
                ids.extend(self.bpe("".join(self.byte_enc[b] for b in w.encode("utf-8"))))
        return ids


# ---------------------------------------------------------------------------
# Records and prompt templates, rendered as fedtune renders them (common/data/template.ts)

ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                         "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def load_records(path):
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    s = text.lstrip()
    if s.startswith("["):
        recs = json.loads(s)
    else:
        recs = [json.loads(line) for line in text.split("\n") if line.strip()]
    return recs


def to_messages(rec):
    if "messages" in rec:
        return rec["messages"]
    inp = rec.get("input") or ""
    user = rec["instruction"] if inp.strip() == "" else f"{rec['instruction']}\n\n{inp}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def tidy(segs):
    out = []
    for text, train in segs:
        if text == "":
            continue
        if out and not out[-1][1] and not train:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, train))
    while out and not out[-1][1]:
        out.pop()
    return out


def render_turns(messages, system, default_system, instruction, response, after_assistant):
    out, start = [], 0
    if messages and messages[0]["role"] == "system":
        out.append((system(messages[0]["content"]), False))
        start = 1
    else:
        out.append((default_system, False))
    for i in range(start, len(messages)):
        m = messages[i]
        if i > 0 and messages[i - 1]["role"] == "assistant":
            out.append((after_assistant, False))
        if m["role"] == "assistant":
            out.append((response, False))
            out.append((m["content"], True))
        else:
            out.append((instruction(m["content"]), False))
    return tidy(out)


def render(rec, template):
    """[(text, trained)] segments of a record."""
    if "text" in rec and "messages" not in rec and "instruction" not in rec and "output" not in rec:
        return [(rec["text"], True)]
    if template == "alpaca":
        if "messages" not in rec:
            inp = rec.get("input") or ""
            prompt = (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{rec['instruction']}\n\n### Response:\n" if inp.strip() == ""
                      else f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{rec['instruction']}\n\n### Input:\n{inp}\n\n### Response:\n")
            return [(prompt, False), (rec["output"], True)]
        return render_turns(to_messages(rec), lambda s: f"{s}\n\n", f"{ALPACA_PREAMBLE}\n\n",
                            lambda u: f"### Instruction:\n{u}\n\n", "### Response:\n", "\n\n")
    if template == "plain":
        return render_turns(to_messages(rec), lambda s: f"{s}\n", "", lambda u: f"### Instruction:\n{u}\n", "### Response:\n", "\n")
    if template == "chatml":
        out = []
        for m in to_messages(rec):
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (f"{m['content']}<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        return tidy(out)
    fail(f"prompt template {template!r} is not known; use alpaca, chatml or plain")


def tokenize(tok, rec, template, max_len):
    """(input_ids, labels) with prompt tokens masked and EOS after each response, or None when nothing is trained."""
    if tok.eos is None:
        fail("the tokenizer has no EOS token, so responses cannot be terminated")
    ids, labels = [], []
    if tok.bos is not None:
        ids.append(tok.bos)
        labels.append(IGNORE)
    for text, train in render(rec, template):
        if len(ids) >= max_len:
            break
        piece = tok.encode(text) + ([tok.eos] if train else [])
        ids += piece
        labels += piece if train else [IGNORE] * len(piece)
    ids, labels = ids[:max_len], labels[:max_len]
    return (ids, labels) if any(l != IGNORE for l in labels[1:]) else None


def make_batch(examples, pad_id, device):
    T = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    return ids.to(device), labels.to(device)


# ---------------------------------------------------------------------------
# The llama forward pass with LoRA on the target modules

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index, "shard index")["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        fail(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    w = {}
    for f in files:
        w.update(read_safetensors(os.path.join(model_dir, f)))
    return w


class Llama:
    def __init__(self, model_dir, device):
        cfg = read_json(os.path.join(model_dir, "config.json"), "model config")
        self.cfg = cfg
        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral", "qwen2"):
            fail(f"model_type {mt!r} is not supported; this script trains llama, mistral and qwen2 models")
        if cfg.get("hidden_act", "silu") != "silu":
            fail(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        rs = cfg.get("rope_scaling")
        if rs not in (None, {}) and not (isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default"):
            fail(f"rope_scaling {rs!r} is not supported (plain rotary embeddings only)")
        self.H = cfg["hidden_size"]
        self.L = cfg["num_hidden_layers"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg.get("num_key_value_heads") or self.nh
        self.hd = cfg.get("head_dim") or self.H // self.nh
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.theta = cfg.get("rope_theta", 10000.0)
        self.device = device
        raw = load_weights(model_dir)
        self.w = {k: v.to(device=device, dtype=torch.float32) for k, v in raw.items()}
        if "lm_head.weight" not in self.w or cfg.get("tie_word_embeddings"):
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        for need in ["model.embed_tokens.weight", "model.norm.weight"] + [
                f"model.layers.{l}.{b}.{m}.weight" for l in range(self.L)
                for b, ms in (("self_attn", LLAMA_TARGETS[:4]), ("mlp", LLAMA_TARGETS[4:])) for m in ms]:
            if need not in self.w:
                fail(f"{model_dir}: weight {need} is missing")

    def module_shape(self, module):
        """(out_features, in_features) of a target module."""
        return tuple(self.w[f"{module}.weight"].shape)

    def target_modules(self, kinds):
        mods = []
        for l in range(self.L):
            for kind in LLAMA_TARGETS:
                if kind in kinds:
                    mods.append(f"model.layers.{l}.{'self_attn' if kind in LLAMA_TARGETS[:4] else 'mlp'}.{kind}")
        return mods

    def rms(self, x, name):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def forward(self, ids, lora, scale, dropout, training):
        B, T = ids.shape
        w = self.w

        def linear(x, module):
            y = x @ w[f"{module}.weight"].t()
            b = w.get(f"{module}.bias")
            if b is not None:
                y = y + b
            ab = lora.get(module)
            if ab is not None:
                xd = F.dropout(x, dropout, training) if dropout > 0 else x
                y = y + (xd @ ab[0].t() @ ab[1].t()) * scale[module]
            return y

        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, device=self.device, dtype=torch.float32) / self.hd))
        freqs = torch.outer(torch.arange(T, device=self.device, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()

        def rope(t):
            half = t.shape[-1] // 2
            rot = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
            return t * cos + rot * sin

        mask = torch.full((T, T), float("-inf"), device=self.device).triu(1)
        x = w["model.embed_tokens.weight"][ids]
        for l in range(self.L):
            p = f"model.layers.{l}"
            h = self.rms(x, f"{p}.input_layernorm.weight")
            q = rope(linear(h, f"{p}.self_attn.q_proj").view(B, T, self.nh, self.hd).transpose(1, 2))
            k = rope(linear(h, f"{p}.self_attn.k_proj").view(B, T, self.nkv, self.hd).transpose(1, 2))
            v = linear(h, f"{p}.self_attn.v_proj").view(B, T, self.nkv, self.hd).transpose(1, 2)
            rep = self.nh // self.nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask, dim=-1)
            o = (att @ v).transpose(1, 2).reshape(B, T, self.nh * self.hd)
            x = x + linear(o, f"{p}.self_attn.o_proj")
            h = self.rms(x, f"{p}.post_attention_layernorm.weight")
            x = x + linear(F.silu(linear(h, f"{p}.mlp.gate_proj")) * linear(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
        x = self.rms(x, "model.norm.weight")
        return x @ w["lm_head.weight"].t()


def loss_sum(logits, labels):
    """Summed cross-entropy of labels[t + 1] predicted at t, and the number of trained tokens."""
    y = labels[:, 1:]
    lp = logits[:, :-1]
    tokens = int((y != IGNORE).sum())
    return F.cross_entropy(lp.reshape(-1, lp.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum"), tokens


# ---------------------------------------------------------------------------
# Adapter IO

def peft_key(module, which):
    return f"base_model.model.{module}.lora_{which}.weight"


def pattern_key(pattern, module):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k (in order) with re.match(rf"(.*\\.)?({k})$", module)."""
    return next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)


def layer_selected(spec, module):
    """PEFT layers_to_transform / layers_pattern: the layer index after the first list name (or one of layers_pattern)."""
    lt = spec["lora"].get("layers_to_transform")
    if not lt:
        return True
    pats = spec["lora"].get("layers_pattern") or []
    m = re.match(r".*?\.[^.]*\.(\d+)\.", module) if not pats else next(
        (m for m in (re.match(rf".*?\.{p}\.(\d+)\.", module) for p in pats) if m), None)
    return m is not None and int(m.group(1)) in lt


def module_rank_scale(spec, module):
    """This module's rank and factor on B A: its rank_pattern / alpha_pattern entries or r / alpha; alpha/r, or alpha/sqrt(r) with use_rslora."""
    lo = spec["lora"]
    rp, ap = lo.get("rank_pattern") or {}, lo.get("alpha_pattern") or {}
    rk, ak = pattern_key(rp, module), pattern_key(ap, module)
    r = rp[rk] if rk is not None else lo["r"]
    alpha = ap[ak] if ak is not None else lo["alpha"]
    return r, (alpha / math.sqrt(r) if lo.get("use_rslora") else alpha / r)


def refuse_unimplemented(spec):
    if spec["lora"].get("use_dora"):
        fail("lora.use_dora is true, but this trainer implements plain LoRA and rsLoRA only; set lora.use_dora to false or use the onnx trainer")


def load_adapter(adapter_dir, model, spec):
    """({module: (A, B)} float32 on the model's device, {module: scale}), checked against the spec's ranks and targets."""
    refuse_unimplemented(spec)
    cfg = read_json(os.path.join(adapter_dir, "adapter_config.json"), "adapter config")
    raw = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    plain = {}
    for k, t in raw.items():
        m = re.match(r"^(base_model\.model\..+\.lora_[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$", k)
        if not m:
            fail(f"{adapter_dir}: key {k} is not a PEFT LoRA key")
        plain[m.group(1) + ".weight"] = t
    r = spec["lora"]["r"]
    if cfg.get("r") != r:
        fail(f"{adapter_dir}: adapter r is {cfg.get('r')}, the task's lora.r is {r}")
    lora, scale = {}, {}
    for module in model.target_modules(spec["lora"]["target_modules"]):
        if not layer_selected(spec, module):
            continue
        r, scale[module] = module_rank_scale(spec, module)
        out_f, in_f = model.module_shape(module)
        a, b = plain.pop(peft_key(module, "A"), None), plain.pop(peft_key(module, "B"), None)
        if a is None or b is None:
            fail(f"{adapter_dir}: module {module} has no lora_A/lora_B pair")
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            fail(f"{adapter_dir}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected [{r}, {in_f}] / [{out_f}, {r}]")
        lora[module] = (a.to(model.device, torch.float32).clone(), b.to(model.device, torch.float32).clone())
    if plain:
        fail(f"{adapter_dir}: keys for modules outside target_modules / layers_to_transform: {', '.join(sorted(plain)[:5])}")
    return cfg, lora, scale


def save_adapter(out_dir, cfg, lora):
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for module, (a, b) in lora.items():
        tensors[peft_key(module, "A")] = a
        tensors[peft_key(module, "B")] = b
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
    write_json(os.path.join(out_dir, "adapter_config.json"), cfg)


# ---------------------------------------------------------------------------
# Train / eval

def schedule_of(spec, steps):
    """(offset, total): where this task's first step sits in its schedule, and the schedule's length.
    schedule_rounds > 0 (training.schedule_scope 'run'): the schedule spans that many rounds of
    `steps` and this task is round schedule_round (1-based); else it spans this task alone."""
    rounds, rnd = spec.get("schedule_rounds", 0), spec.get("schedule_round", 0)
    if not rounds:
        return 0, steps
    if not 1 <= rnd <= rounds:
        raise ValueError(f"schedule_round {rnd} is outside 1..schedule_rounds ({rounds})")
    return (rnd - 1) * steps, rounds * steps


def lr_at(step, spec, total):
    base, warm, kind = spec["lr"], spec["warmup_steps"], spec["schedule"]
    if step < warm:
        return base * step / max(1, warm)
    if kind == "constant":
        return base
    decay = max(1, total - warm)
    if kind == "linear":
        return base * max(0.0, (total - step) / decay)
    return base * max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / decay))))


def progress(**kw):
    print(json.dumps(kw), flush=True)


def examples_of(path, tok, spec, what):
    if not path:
        fail(f"no {what} data: the worker gave no path (FEDTUNE_{'EVAL_' if what == 'eval' else ''}DATA is empty)")
    recs = load_records(path)
    out = [e for e in (tokenize(tok, r, spec["template"], spec["max_seq_len"]) for r in recs) if e is not None]
    if not out:
        fail(f"{path}: none of the {len(recs)} records has a response token within max_seq_len {spec['max_seq_len']}")
    if len(out) < len(recs):
        print(f"torch_lora: {len(recs) - len(out)} of {len(recs)} {what} records dropped: their response does not fit in max_seq_len", flush=True)
    return out


def train(spec, paths, model, tok):
    cfg, lora, scale = load_adapter(paths["global_adapter"], model, spec)
    dropout = spec["lora"]["dropout"]
    data = examples_of(paths["data"], tok, spec, "training")
    n, bs, ga = len(data), spec["batch_size"], spec["grad_accumulation"]
    steps = spec["steps"] if spec["steps"] is not None else max(1, math.ceil(spec["epochs"] * math.ceil(n / bs) / ga))
    offset, total = schedule_of(spec, steps)
    seed = spec["seed"] * 1_000_003 + spec["round"] * 7919
    torch.manual_seed(seed)

    trainable, group_a, group_b = [], [], []
    for a, b in lora.values():
        if not spec["freeze_lora_a"]:
            a.requires_grad_(True)
            trainable.append(a)
            group_a.append(a)
        b.requires_grad_(True)
        trainable.append(b)
        group_b.append(b)
    anchor = [p.detach().clone() for p in trainable] if spec["prox_mu"] > 0 else None
    # LoRA+ (Hayou et al. 2024): lora_B learns at lora_plus_ratio times the rate (each group's lr_scale).
    ratio = spec.get("lora_plus_ratio", 1.0)
    groups = ([{"params": group_a, "lr_scale": 1.0}] if group_a else []) + [{"params": group_b, "lr_scale": ratio}]
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=spec["weight_decay"])
    # optimizer_scope "run": continue from the optimizer state this site's last train task of the run saved.
    state_dir = paths.get("optimizer_state")
    state_file = os.path.join(state_dir, "adamw.pt") if state_dir else None
    resumed = bool(state_file and os.path.exists(state_file))
    if resumed:
        opt.load_state_dict(torch.load(state_file, map_location=model.device))

    epoch, order, cursor = 0, [], 0

    def next_examples():
        nonlocal epoch, order, cursor
        if cursor >= len(order):
            order = list(range(n))
            random.Random(seed + epoch).shuffle(order)
            epoch += 1
            cursor = 0
        picked = [data[i] for i in order[cursor:cursor + bs]]
        cursor += bs
        return picked

    print(f"torch_lora: {model.cfg['model_type']}, {model.L} layer(s), {len(lora)} LoRA modules r={spec['lora']['r']}, "
          f"{n} examples, {steps} step(s) on {model.device}", flush=True)
    t0 = time.time()
    total_loss = total_prox = 0.0
    total_tokens = seen = 0
    first_loss = last_loss = float("nan")
    for step in range(1, steps + 1):
        ts = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(offset + step - 1, spec, total) * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        batches = [make_batch(next_examples(), tok.pad, model.device) for _ in range(ga)]
        tokens = sum(int((y[:, 1:] != IGNORE).sum()) for _, y in batches)
        step_loss = 0.0
        for ids, labels in batches:
            ls, _ = loss_sum(model.forward(ids, lora, scale, dropout, True), labels)
            (ls / max(1, tokens)).backward()
            step_loss += float(ls)
            seen += ids.shape[0]
        prox = 0.0
        if anchor is not None:
            pl = spec["prox_mu"] / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))
            pl.backward()
            prox = float(pl)
        if spec["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(trainable, spec["max_grad_norm"])
        if tokens > 0:
            opt.step()
        loss = step_loss / tokens + prox if tokens > 0 else float("nan")
        first_loss = loss if step == 1 else first_loss
        last_loss = loss
        total_loss += step_loss
        total_prox += tokens * prox
        total_tokens += tokens
        dt = time.time() - ts
        progress(step=step, total_steps=steps, loss=loss, tokens_per_sec=tokens / dt if dt > 0 else 0.0, examples=seen)
    secs = time.time() - t0
    save_adapter(paths["output_adapter"], cfg, {m: (a.detach(), b.detach()) for m, (a, b) in lora.items()})
    if state_file:
        tmp = state_file + ".tmp"
        torch.save(opt.state_dict(), tmp)
        os.replace(tmp, state_file)  # a task killed while saving leaves the last complete state (the worker drops it anyway)
    metrics = {
        "num_examples": n,
        "train_loss": (total_loss + total_prox) / total_tokens if total_tokens else float("nan"),
        "first_loss": first_loss,
        "last_loss": last_loss,
        "tokens": total_tokens,
        "steps": steps,
        "train_seconds": secs,
        "tokens_per_sec": total_tokens / secs if secs > 0 else 0.0,
    }
    if anchor is not None:
        metrics["prox_loss"] = total_prox / total_tokens if total_tokens else 0.0
    if state_file:
        metrics["optimizer_state_resumed"] = 1.0 if resumed else 0.0
    write_json(paths["metrics"], metrics)


@torch.no_grad()
def evaluate(spec, paths, model, tok):
    _, lora, scale = load_adapter(paths["global_adapter"], model, spec)
    data = examples_of(paths["eval_data"], tok, spec, "eval")
    total = tokens = examples = exact = 0
    total = 0.0
    for i in range(0, len(data), spec["batch_size"]):
        ids, labels = make_batch(data[i:i + spec["batch_size"]], tok.pad, model.device)
        logits = model.forward(ids, lora, scale, 0.0, False)
        ls, nt = loss_sum(logits, labels)
        total += float(ls)
        tokens += nt
        y = labels[:, 1:]
        right = (logits[:, :-1].argmax(-1) == y) | (y == IGNORE)
        has = (y != IGNORE).any(-1)
        examples += int(has.sum())
        exact += int((right.all(-1) & has).sum())
    write_json(paths["eval_output"], {
        "eval_loss": total / tokens if tokens else 0.0,
        "eval_tokens": tokens,
        "eval_examples": examples,
        "eval_accuracy": exact / examples if examples else None,
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task-dir", default=os.environ.get("FEDTUNE_TASK_DIR"), help="task directory the worker prepared (default: $FEDTUNE_TASK_DIR)")
    args = ap.parse_args()
    if not args.task_dir:
        fail("no task directory: run me from `fedtune worker --trainer exec` (it passes --task-dir DIR)")
    spec = read_json(os.path.join(args.task_dir, "spec.json"), "task spec")
    paths = spec["paths"]
    if os.environ.get("TORCH_LORA_THREADS"):
        torch.set_num_threads(int(os.environ["TORCH_LORA_THREADS"]))
    device = os.environ.get("TORCH_LORA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Llama(paths["model"], device)
    tok = Tokenizer(paths["model"], model.cfg)
    if spec["mode"] == "train":
        train(spec, paths, model, tok)
    elif spec["mode"] == "eval":
        evaluate(spec, paths, model, tok)
    else:
        fail(f"spec.json mode {spec['mode']!r} is not known (train or eval)")


if __name__ == "__main__":
    main()
