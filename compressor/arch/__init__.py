"""Architecture adapters, one per family (base.py says what each answers). A new family is one
new module here plus its entry in ARCHITECTURES and its tests."""

from __future__ import annotations

import re
from typing import Any

from compressor.arch.base import Architecture, config_get, student_parameters
from compressor.arch.bert import BERT
from compressor.arch.distilbert import DISTILBERT
from compressor.arch.mpnet import MPNET
from compressor.arch.roberta import ROBERTA

ARCHITECTURES: tuple[Architecture, ...] = (BERT, ROBERTA, DISTILBERT, MPNET)
BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
KNOWN_MODEL_TYPES = tuple(BY_MODEL_TYPE)
# a parameter name inside layer N of any family's layer list (group 2: N)
LAYER_KEY = re.compile(
    r"(^|\.)(?:"
    + "|".join(sorted({re.escape(a.layer_path) for a in ARCHITECTURES}))
    + r")\.(\d+)\."
)

__all__ = ["ARCHITECTURES", "LAYER_KEY", "Architecture", "architecture_for", "student_parameters"]


class UnknownArchitecture(ValueError):
    """A model_type no adapter serves."""


def unknown_message(shown: str) -> str:
    """The refusal of a model type (`shown`: its repr, as quoted in the error)."""
    return f"model_type {shown} is not supported; supported: {', '.join(KNOWN_MODEL_TYPES)}"


def architecture_for(cfg: Any) -> Architecture:
    """The adapter for a config (object or dict of its fields), a model, or a model_type string.
    UnknownArchitecture names the supported model types."""
    if isinstance(cfg, str):
        model_type = cfg
    else:
        cfg = getattr(cfg, "config", cfg)  # a model: its config
        model_type = config_get(cfg, "model_type")
    arch = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UnknownArchitecture(unknown_message(repr(model_type)))
    return arch
