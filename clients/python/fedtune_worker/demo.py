"""The demo trainer: no model math, a deterministic update anyone can recompute.

    update[name].flat[i] = float32( float64(global[name].flat[i]) + DEMO_STEP * round * ((i % 7) - 3) )

num_examples is every local training record; metrics are train_loss = 1 / (round + 1)
and examples. It exercises the protocol end to end (tests recompute the round's
FedAvg from it); replace it with a real `train` for actual fine-tuning.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

DEMO_STEP = 1e-3

Tensors = Dict[str, np.ndarray]


def count_records(path: str) -> int:
    """Records in a JSON array file or a JSONL file (one JSON object per non-blank line)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: dataset file not found") from None
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: dataset file is empty (expected a JSON array of records or JSONL, one record per line)")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: file is not valid JSON ({e.msg}); expected a JSON array of records or JSONL") from None
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{path}: record [{bad}] is not a JSON object")
        return len(records)
    n = 0
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: line is not valid JSON ({e.msg}); JSONL needs one complete JSON record per line") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{i}: record is not a JSON object")
        n += 1
    return n


def demo_update(global_: Tensors, round_: int) -> Tensors:
    out: Tensors = {}
    for name, g in global_.items():
        i = np.arange(g.size, dtype=np.float64).reshape(g.shape)
        out[name] = (g.astype(np.float64) + DEMO_STEP * round_ * (i % 7 - 3)).astype(np.float32)
    return out


def demo_train(num_examples: int) -> Callable[[Tensors, Dict[str, Any]], Tuple[Tensors, int, Dict[str, float]]]:
    """A train function for a site with num_examples training records."""

    def train(global_: Tensors, spec: Dict[str, Any]) -> Tuple[Tensors, int, Dict[str, float]]:
        from .client import progress

        steps = spec.get("steps") or 1
        for s in range(1, steps + 1):
            progress(s, steps, loss=1.0 / (spec["round"] + s / steps), examples=min(num_examples, s * max(1, spec["batch_size"])))
        return demo_update(global_, spec["round"]), num_examples, {"train_loss": 1.0 / (spec["round"] + 1), "examples": float(num_examples)}

    return train


def demo_evaluate(num_examples: int) -> Callable[[Tensors, Dict[str, Any]], Optional[Dict[str, float]]]:
    """An evaluate function: eval_loss is the mean square of the adapter's elements."""

    def evaluate(global_: Tensors, spec: Dict[str, Any]) -> Optional[Dict[str, float]]:
        if num_examples == 0:
            return None
        total = sum(float(np.square(t.astype(np.float64)).sum()) for t in global_.values())
        n = sum(t.size for t in global_.values())
        return {"eval_loss": total / n if n else 0.0, "eval_tokens": 0, "eval_examples": num_examples}

    return evaluate
