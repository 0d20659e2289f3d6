"""Atomic checkpoints of the training state: written to a temporary file, then renamed over the
last one. The keys are the fields of `TrainingState`, listed once for saving and loading.

Only tensors and plain containers are stored, so loading uses `weights_only=True` (no pickle).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from compressor.rundir import CHECKPOINT_FILE


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    step: int  # the next step to run
    student: dict[str, Any]  # state dicts, as torch gives them
    maps: dict[str, Any]
    optimizer: dict[str, Any]
    masks: dict[str, torch.Tensor]
    importance: dict[str, Any]
    layers_chosen: bool
    noise_floor: dict[str, dict[str, float]] | None  # per signal, per kind (distill.py)
    torch_rng: torch.Tensor


def save_checkpoint(run_dir: Path, state: TrainingState) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(asdict(state), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> TrainingState | None:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return TrainingState(**{f.name: raw[f.name] for f in fields(TrainingState)})
