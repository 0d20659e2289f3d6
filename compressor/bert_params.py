"""The names this module had before the architecture adapters (compressor/arch/), kept for the
callers that still import them: each asks the model's adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.arch import architecture_for, student_parameters
from compressor.arch.base import LayerTensors, MlmHead

if TYPE_CHECKING:
    from torch import nn

__all__ = ["base_model", "layer_tensors", "mlm_head", "num_layers", "pooler", "student_parameters"]


def base_model(model: nn.Module) -> nn.Module:
    return architecture_for(model).base_model(model)


def layer_tensors(model: nn.Module, i: int) -> LayerTensors:
    return architecture_for(model).layer(model, i)


def mlm_head(model: nn.Module) -> MlmHead | None:
    return architecture_for(model).mlm_head(model)


def pooler(model: nn.Module) -> nn.Linear | None:
    return architecture_for(model).pooler(model)


def num_layers(model: nn.Module) -> int:
    return architecture_for(model).num_layers(model)
