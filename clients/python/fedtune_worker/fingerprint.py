"""The base-model fingerprint (docs/protocol.md, "Base-model fingerprint").

    sha256(  canonical JSON of the normalised config.json
           + for each weight, in sorted canonical-name order:
               "\\n" + name + "\\n" + shape joined by "," + "\\n"
               + the weight's values as float32 little-endian bytes )

Only the safetensors headers are parsed; tensor bytes stream from disk through
the hash a bounded chunk at a time (F16 / BF16 / F64 are converted to float32
with numpy), so memory does not grow with the model.

    python3 -m fedtune_worker fingerprint MODEL_DIR [--canonical-config]
"""
from __future__ import annotations

import decimal
import hashlib
import json
import math
import os
import struct
import sys
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
SHARD_INDEX = "model.safetensors.index.json"
CHUNK_BYTES = 8 << 20  # a multiple of 8: a chunk never splits an element

_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class ModelError(ValueError):
    """A model directory fedtune cannot use (the message names the file and the field)."""


# --------------------------------------------------------------------------- canonical JSON


def es_number(x: float) -> str:
    """A finite number as ECMAScript's Number::toString (JavaScript's String(x)) writes it.

    The digits are the shortest that round-trip (Python's repr gives the same ones);
    the layout follows ECMA-262 Number::toString: plain for 1e-7 < |x| < 1e21,
    exponential (1e-7, 1.5e+21) outside.
    """
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"es_number: {x!r} is not finite")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + es_number(-x)
    _, digits, exp = decimal.Decimal(repr(x)).as_tuple()
    ds = "".join(map(str, digits)).lstrip("0")  # repr("0.001") has leading zeros: drop them
    stripped = ds.rstrip("0")  # repr("10000.0"): trailing zeros move into the exponent
    exp += len(ds) - len(stripped)
    ds = stripped
    k = len(ds)
    n = k + exp  # x = 0.ds * 10^n
    if k <= n <= 21:
        return ds + "0" * (n - k)
    if 0 < n <= 21:
        return ds[:n] + "." + ds[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + ds
    e = n - 1
    es = f"e+{e}" if e >= 0 else f"e-{-e}"
    return (ds if k == 1 else ds[0] + "." + ds[1:]) + es


def canonical_json(v: Any) -> str:
    """JSON with object keys sorted, no whitespace, numbers as es_number (see docs/protocol.md)."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return es_number(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(canonical_json(x) for x in v) + "]"
    if isinstance(v, dict):
        # UTF-16 code-unit order, as JavaScript sorts (the same as code points for these ASCII keys).
        keys = sorted(v, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{canonical_json(v[k])}" for k in keys) + "}"
    raise TypeError(f"canonical_json: cannot encode {type(v).__name__}")


# --------------------------------------------------------------------------- config.json -> normalised config

_MISSING = object()


def _get(raw: Dict[str, Any], field: str, fallback: Any = _MISSING) -> Any:
    v = raw.get(field)
    return fallback if v is None else v  # JavaScript `raw[field] ?? fallback`: null counts as absent


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pos_int(raw: Dict[str, Any], field: str, source: str, fallback: Any = _MISSING) -> int:
    v = _get(raw, field, fallback)
    if v is _MISSING:
        raise ModelError(f'{source}: field "{field}" is missing (a positive integer is required)')
    if not _is_number(v) or not math.isfinite(v) or float(v) != int(v) or abs(v) > 2**53 - 1 or v < 1:
        raise ModelError(f'{source}: field "{field}" must be a positive integer, got {json.dumps(v)}')
    return int(v)


def _pos_num(raw: Dict[str, Any], field: str, source: str, fallback: float) -> float:
    v = _get(raw, field, fallback)
    if not _is_number(v) or not math.isfinite(v) or v <= 0:
        raise ModelError(f'{source}: field "{field}" must be a positive number, got {json.dumps(v)}')
    return float(v)


def _bool(raw: Dict[str, Any], field: str, source: str, fallback: bool) -> bool:
    v = _get(raw, field, fallback)
    if not isinstance(v, bool):
        raise ModelError(f'{source}: field "{field}" must be true or false, got {json.dumps(v)}')
    return v


def _token_id(raw: Dict[str, Any], field: str, source: str) -> Optional[int]:
    v = raw.get(field)
    if isinstance(v, list):
        v = v[0] if v else None
    if v is None:
        return None
    if not _is_number(v) or not math.isfinite(v) or float(v) != int(v) or v < 0 or v > 2**53 - 1:
        raise ModelError(f"{source}: field \"{field}\" must be a token id (non-negative integer), a list of them, or null; got {json.dumps(raw.get(field))}")
    return int(v)


def normalize_config(raw: Dict[str, Any], source: str = "config.json") -> Dict[str, Any]:
    """The normalised config fedtune fingerprints (the table in docs/protocol.md)."""
    mt = raw.get("model_type")
    if not isinstance(mt, str) or mt not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{source}: unsupported model_type {json.dumps(mt)}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    vocab = _pos_int(raw, "vocab_size", source)
    if mt == "gpt2":
        hidden = _pos_int(raw, "n_embd", source)
        heads = _pos_int(raw, "n_head", source)
        if hidden % heads:
            raise ModelError(f'{source}: field "n_embd" ({hidden}) must be divisible by n_head ({heads})')
        act = _get(raw, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelError(f'{source}: field "activation_function" is {json.dumps(act)}; supported: gelu_new (or its equal gelu_pytorch_tanh)')
        if raw.get("tie_word_embeddings") is False:
            raise ModelError(f'{source}: field "tie_word_embeddings" is false; gpt2 models must tie lm_head to wte')
        n_inner = raw.get("n_inner")
        return {
            "family": "gpt2",
            "modelType": mt,
            "vocabSize": vocab,
            "hiddenSize": hidden,
            "intermediateSize": 4 * hidden if n_inner is None else _pos_int(raw, "n_inner", source),
            "numLayers": _pos_int(raw, "n_layer", source),
            "numHeads": heads,
            "numKvHeads": heads,
            "headDim": hidden // heads,
            "maxPositions": _pos_int(raw, "n_positions", source, _get(raw, "n_ctx", 1024)),
            "normEps": _pos_num(raw, "layer_norm_epsilon", source, 1e-5),
            "ropeTheta": 10000,
            "tieWordEmbeddings": True,
            "qkvBias": True,
            "activation": "gelu_new",
            "bosTokenId": _token_id(raw, "bos_token_id", source),
            "eosTokenId": _token_id(raw, "eos_token_id", source),
        }
    hidden = _pos_int(raw, "hidden_size", source)
    heads = _pos_int(raw, "num_attention_heads", source)
    kv = _pos_int(raw, "num_key_value_heads", source, heads)
    if heads % kv:
        raise ModelError(f'{source}: field "num_key_value_heads" ({kv}) must divide num_attention_heads ({heads})')
    if raw.get("head_dim") is not None:
        head_dim = _pos_int(raw, "head_dim", source)
    else:
        if hidden % heads:
            raise ModelError(f'{source}: field "hidden_size" ({hidden}) must be divisible by num_attention_heads ({heads}) when head_dim is not given')
        head_dim = hidden // heads
    if head_dim % 2:
        raise ModelError(f'{source}: field "head_dim" ({head_dim}) must be even for rotary embeddings')
    act = _get(raw, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f'{source}: field "hidden_act" is {json.dumps(act)}; supported: silu')
    rs = raw.get("rope_scaling")
    if rs is not None:
        kind = (rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs)
        if kind != "default":
            raise ModelError(f'{source}: field "rope_scaling" {json.dumps(rs)} is not supported (only plain rotary embeddings: rope_scaling null)')
    if _bool(raw, "mlp_bias", source, False):
        raise ModelError(f'{source}: field "mlp_bias" is true; MLP biases are not supported')
    if mt == "qwen2":
        qkv_bias = True
    elif mt == "llama" and _bool(raw, "attention_bias", source, False):
        raise ModelError(f'{source}: field "attention_bias" is true; llama with q/k/v/o biases is not supported (qwen2 q/k/v biases are)')
    else:
        qkv_bias = False
    return {
        "family": "llama",
        "modelType": mt,
        "vocabSize": vocab,
        "hiddenSize": hidden,
        "intermediateSize": _pos_int(raw, "intermediate_size", source),
        "numLayers": _pos_int(raw, "num_hidden_layers", source),
        "numHeads": heads,
        "numKvHeads": kv,
        "headDim": head_dim,
        "maxPositions": _pos_int(raw, "max_position_embeddings", source, 2048),
        "normEps": _pos_num(raw, "rms_norm_eps", source, 1e-6),
        "ropeTheta": _pos_num(raw, "rope_theta", source, 10000),
        "tieWordEmbeddings": _bool(raw, "tie_word_embeddings", source, False),
        "qkvBias": qkv_bias,
        "activation": "silu",
        "bosTokenId": _token_id(raw, "bos_token_id", source),
        "eosTokenId": _token_id(raw, "eos_token_id", source),
    }


# --------------------------------------------------------------------------- weights a config implies


def expected_weight_shapes(c: Dict[str, Any]) -> Dict[str, List[int]]:
    H, V, I = c["hiddenSize"], c["vocabSize"], c["intermediateSize"]
    m: Dict[str, List[int]] = {}
    if c["family"] == "gpt2":
        m["transformer.wte.weight"] = [V, H]
        m["transformer.wpe.weight"] = [c["maxPositions"], H]
        for l in range(c["numLayers"]):
            p = f"transformer.h.{l}"
            m.update({
                f"{p}.ln_1.weight": [H], f"{p}.ln_1.bias": [H],
                f"{p}.attn.c_attn.weight": [H, 3 * H], f"{p}.attn.c_attn.bias": [3 * H],
                f"{p}.attn.c_proj.weight": [H, H], f"{p}.attn.c_proj.bias": [H],
                f"{p}.ln_2.weight": [H], f"{p}.ln_2.bias": [H],
                f"{p}.mlp.c_fc.weight": [H, I], f"{p}.mlp.c_fc.bias": [I],
                f"{p}.mlp.c_proj.weight": [I, H], f"{p}.mlp.c_proj.bias": [H],
            })
        m["transformer.ln_f.weight"] = [H]
        m["transformer.ln_f.bias"] = [H]
        return m
    q = c["numHeads"] * c["headDim"]
    kv = c["numKvHeads"] * c["headDim"]
    m["model.embed_tokens.weight"] = [V, H]
    for l in range(c["numLayers"]):
        p = f"model.layers.{l}"
        m[f"{p}.input_layernorm.weight"] = [H]
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            m[f"{p}.self_attn.{proj}.weight"] = [out, H]
            if c["qkvBias"]:
                m[f"{p}.self_attn.{proj}.bias"] = [out]
        m[f"{p}.self_attn.o_proj.weight"] = [H, q]
        m[f"{p}.post_attention_layernorm.weight"] = [H]
        m[f"{p}.mlp.gate_proj.weight"] = [I, H]
        m[f"{p}.mlp.up_proj.weight"] = [I, H]
        m[f"{p}.mlp.down_proj.weight"] = [H, I]
    m["model.norm.weight"] = [H]
    if not c["tieWordEmbeddings"]:
        m["lm_head.weight"] = [V, H]
    return m


def canonical_weight_name(c: Dict[str, Any], name: str) -> Optional[str]:
    """The name a checkpoint tensor is fingerprinted under, or None for buffers and tied copies."""
    if c["family"] == "gpt2":
        if name == "lm_head.weight":
            return None
        full = name if name.startswith("transformer.") else f"transformer.{name}"
        if full.endswith(".attn.bias") or full.endswith(".attn.masked_bias"):
            return None
        return full
    if name.endswith(".rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight" and c["tieWordEmbeddings"]:
        return None
    return name


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(f: BinaryIO, path: str) -> Tuple[int, Dict[str, Dict[str, Any]]]:
    """(offset of the data section, tensor name -> {dtype, shape, begin, end}) of an open safetensors file."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ModelError(f"safetensors {path}: file is shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", prefix)
    if hlen > size - 8:
        raise ModelError(f"safetensors {path}: header length {hlen} exceeds the file size {size}")
    try:
        header = json.loads(f.read(hlen).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"safetensors {path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"safetensors {path}: header must be a JSON object mapping tensor names to {{dtype, shape, data_offsets}}")
    data_start = 8 + hlen
    out: Dict[str, Dict[str, Any]] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or e.get("dtype") not in _DTYPE_SIZE:
            raise ModelError(f'safetensors {path}: tensor "{name}": unknown dtype {json.dumps(e.get("dtype") if isinstance(e, dict) else e)}')
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelError(f'safetensors {path}: tensor "{name}": shape must be a list of non-negative integers, got {json.dumps(shape)}')
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(d, int) and d >= 0 for d in offs) and offs[0] <= offs[1]):
            raise ModelError(f'safetensors {path}: tensor "{name}": data_offsets must be [begin, end] with 0 <= begin <= end, got {json.dumps(offs)}')
        if offs[1] - offs[0] != math.prod(shape) * _DTYPE_SIZE[e["dtype"]]:
            raise ModelError(f'safetensors {path}: tensor "{name}": data_offsets span {offs[1] - offs[0]} bytes, {e["dtype"]} {shape} needs {math.prod(shape) * _DTYPE_SIZE[e["dtype"]]}')
        if data_start + offs[1] > size:
            raise ModelError(f'safetensors {path}: tensor "{name}" ends past the end of the file')
        out[name] = {"dtype": e["dtype"], "shape": shape, "begin": data_start + offs[0], "end": data_start + offs[1]}
    return data_start, out


def to_float32(dtype: str, raw: bytes) -> np.ndarray:
    """Little-endian tensor bytes of a float dtype as float32 (round to nearest even from F64; F16 / BF16 exactly)."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4")
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype("<f4")
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4")
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8").astype("<f4")
    raise ModelError(f"dtype {dtype} is not a float type")


# --------------------------------------------------------------------------- the fingerprint


def _checkpoint_files(model_dir: str) -> Tuple[List[str], Optional[Dict[str, str]]]:
    if os.path.exists(os.path.join(model_dir, "model.safetensors")):
        return ["model.safetensors"], None
    index_path = os.path.join(model_dir, SHARD_INDEX)
    if not os.path.exists(index_path):
        raise ModelError(f"model directory {model_dir} has neither model.safetensors nor {SHARD_INDEX} (only safetensors checkpoints are supported)")
    with open(index_path, encoding="utf-8") as f:
        wm = json.load(f).get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise ModelError(f'{index_path}: "weight_map" must be a non-empty object mapping weight names to shard files')
    for name, file in wm.items():
        if not isinstance(file, str) or file != os.path.basename(file) or not file.endswith(".safetensors"):
            raise ModelError(f'{index_path}: weight_map["{name}"] must be a .safetensors file name in the same directory, got {json.dumps(file)}')
    return sorted(set(wm.values())), wm


def read_config(model_dir: str) -> Dict[str, Any]:
    """The normalised config of a model directory's config.json."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"model directory {model_dir}: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: must be a JSON object")
    return normalize_config(raw, path)


def _weights(model_dir: str, config: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Canonical name -> {path, dtype, shape, begin, end} of every model weight, checked against the config."""
    files, weight_map = _checkpoint_files(model_dir)
    expected = expected_weight_shapes(config)
    found: Dict[str, Dict[str, Any]] = {}
    for file in files:
        path = os.path.join(model_dir, file)
        with open(path, "rb") as f:
            _, tensors = read_safetensors_header(f, path)
        if weight_map is not None:
            for name, wf in weight_map.items():
                if wf == file and name not in tensors:
                    raise ModelError(f"{os.path.join(model_dir, SHARD_INDEX)}: weight {name} is mapped to {file} but that file does not contain it")
        for name, e in tensors.items():
            canon = canonical_weight_name(config, name)
            if canon is None:
                continue
            if canon in found:
                raise ModelError(f"{path}: weight {canon} also appears in {found[canon]['file']}")
            want = expected.get(canon)
            if want is None:
                raise ModelError(f"{model_dir}: unexpected weight {canon} for {config['modelType']}")
            if e["shape"] != want:
                raise ModelError(f"{path}: weight {name} has shape {e['shape']}, expected {want}")
            if e["dtype"] not in _FLOAT_DTYPES:
                raise ModelError(f"{path}: weight {name} has dtype {e['dtype']}; model weights must be F32, F16, BF16 or F64")
            found[canon] = {**e, "file": file, "path": path}
    for name, shape in expected.items():
        if name not in found:
            raise ModelError(f"{model_dir}: missing weight {name} (expected shape {shape})")
    return found


def _chunks(path: str, begin: int, end: int, chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            b = f.read(min(chunk_bytes, left))
            if not b:
                raise ModelError(f"safetensors {path}: unexpected end of file")
            left -= len(b)
            yield b


def fingerprint(model_dir: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 hex of a Hugging Face model directory's base model, as fedtune computes it."""
    if chunk_bytes < 8:
        raise ValueError(f"fingerprint: chunk_bytes must be at least 8, got {chunk_bytes}")
    chunk_bytes -= chunk_bytes % 8
    config = read_config(model_dir)
    weights = _weights(model_dir, config)
    h = hashlib.sha256(canonical_json(config).encode("utf-8"))
    for name in sorted(weights, key=lambda k: k.encode("utf-16-be")):
        w = weights[name]
        h.update(f"\n{name}\n{','.join(str(d) for d in w['shape'])}\n".encode("utf-8"))
        for raw in _chunks(w["path"], w["begin"], w["end"], chunk_bytes):
            h.update(to_float32(w["dtype"], raw).tobytes())
    return h.hexdigest()


def main(argv: List[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1:
        print("usage: python3 -m fedtune_worker fingerprint MODEL_DIR [--canonical-config] [--chunk-bytes=N]", file=sys.stderr)
        return 2
    try:
        if "--canonical-config" in argv:
            print(canonical_json(read_config(args[0])))
            return 0
        chunk = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--chunk-bytes=")), CHUNK_BYTES)
        print(fingerprint(args[0], chunk))
        return 0
    except ModelError as e:
        print(f"fingerprint: {e}", file=sys.stderr)
        return 1
