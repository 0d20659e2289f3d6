"""Settings of a downstream evaluation (light: the CLI reads its defaults without loading torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

LR_GRID = (3e-5, 1e-4, 3e-4)  # fine-tuning learning rates tried when none is given


@dataclass(frozen=True)
class EvalSettings:
    mode: Literal["finetune", "probe"] = "finetune"
    max_length: int = 64
    epochs: int = 3
    lr: float | None = None  # None: the best of LR_GRID on validation
    batch_size: int = 32
    max_train: int | None = 2000
    max_eval: int | None = 1000
    split_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def used(self, retrieval: bool) -> dict:
        """The settings a result depends on: zero-shot retrieval and the linear probe do not
        train the encoder, so a fine-tuning setting (epochs, lr) never makes them stale."""
        d = self.to_dict()
        if retrieval:
            return {k: d[k] for k in ("max_length", "batch_size", "max_eval", "split_seed")}
        if self.mode == "probe":
            return {k: v for k, v in d.items() if k not in ("epochs", "lr")}
        return d

    def learning_rates(self) -> tuple[float, ...]:
        return LR_GRID if self.lr is None else (self.lr,)
