"""The run on disk: samples appended as they are drawn, the run's position, atomic training checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSONL file; a last line cut short by a crash is dropped from the file too, so that
    lines appended later start on a fresh line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, good = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
        good += len(line) + 1
    good = min(good, len(raw))
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows and make them durable before returning (a kill -9 right after loses nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def save_training_state(path: Path, model: Any, optimizer: Any, extra: dict[str, Any]) -> None:
    """Trainable weights, optimizer state and position, written to a temporary file then renamed over `path`."""
    state = {
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        **extra,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_training_state(path: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    named = dict(model.named_parameters())
    missing = [n for n in state["params"] if n not in named]
    if missing:
        raise ValueError(f"{path}: checkpoint weights {missing[:3]} are not in this model; was the recipe changed?")
    with torch.no_grad():
        for name, value in state["params"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return state
