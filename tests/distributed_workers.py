"""Functions run in spawned processes by test_distributed.py: this module imports only what they
need, so a child starts in seconds."""

import os
from pathlib import Path

import torch
import torch.distributed as dist

from compressor import distributed
from compressor.errors import CheckFailed


def two_ranks_with_different_masks(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: rank 1 holds a different mask."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    masks = {"heads": torch.ones(2, 3, dtype=torch.bool), "ffn": torch.tensor([True, rank == 0])}
    try:
        distributed.check_identical(masks, "the masks")
        result = "passed"
    except CheckFailed as err:
        result = str(err)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(result)
