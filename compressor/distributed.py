"""One run in several processes: torchrun + DistributedDataParallel (PyTorch's own engine).

    torchrun --nproc_per_node=N -m compressor run RECIPE

torchrun starts N copies of `compress run` and tells each its RANK, LOCAL_RANK and WORLD_SIZE;
`session` joins them into one process group (NCCL on CUDA, one GPU per process; gloo on CPU). In a
plain `compress run` there is no WORLD_SIZE and every function here is the single-process no-op.

How the loop (distill.py) uses it:
- a step's `grad_accum` micro-batches are dealt out round robin (`my_micros`: rank r takes r,
  r+N, ...), so the global batch is the recipe's on any number of processes; each process collates
  and masks only its own (data.py `Corpus.step_batches`, train/step.py `prepare_share`);
- `wrap` puts the student, its hidden-state maps and the layer fades (one module) under DDP, which
  averages their gradients on the step's last micro-batch (`syncing`): the importance computed
  from them is the same on every rank. The teacher is not wrapped;
- the probe and the noise floor run the same batches on every rank with rank 0's random state
  (`from_main`), through the same DDP module;
- after each pruning event, and at the end, `check_identical` compares every rank's masks (and
  then weights) with rank 0's: a difference is a CheckFailed error, never a silent drift;
- only rank 0 (`is_main`) writes files; the others wait at `barrier`.
The run directory must be on a file system every process sees (one machine: always).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from compressor.errors import BadEnvironment, CheckFailed

T = TypeVar("T")


def env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """The integer in environment variable `name` (`default` when unset), refused (BadEnvironment
    naming it) unless low <= value (< high)."""
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value >= high):
        bound = f"an integer >= {low}" + (f" and < {high}" if high is not None else "")
        raise BadEnvironment(
            f"environment variable {name}={text[:40]!r}: expected {bound} (torchrun sets it;"
            f" unset it for a single process)"
        )
    return value


def world_size() -> int:
    """Processes in this run (torchrun's WORLD_SIZE; 1 in a plain process)."""
    return env_int("WORLD_SIZE", 1, 1)


def rank() -> int:
    size = world_size()
    return env_int("RANK", 0, 0, size) if size > 1 else 0


def check_environment() -> None:
    """Every torchrun variable this package reads, validated before any work starts."""
    size = world_size()
    if size > 1:
        rank()
        per_machine = env_int("LOCAL_WORLD_SIZE", size, 1, size + 1)
        env_int("LOCAL_RANK", 0, 0, per_machine)


def is_main() -> bool:
    """The process that writes checkpoints, metrics, plots, exports and the zoo entry."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and dist.is_initialized()


@contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Join the process group torchrun set up (from its environment variables) for the duration;
    yields the device this process trains on (cuda:LOCAL_RANK on GPUs). Torch threads default to
    the cores over the processes on this machine. A no-op in a plain process."""
    if world_size() == 1 or dist.is_initialized():
        yield device
        return
    check_environment()
    local = env_int("LOCAL_RANK", 0, 0)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    per_machine = env_int("LOCAL_WORLD_SIZE", world_size(), 1)
    torch.set_num_threads(max(1, available_cores() // per_machine))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(value: T) -> T:
    """Rank 0's `value`, on every rank (any picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def my_micros(count: int) -> list[int]:
    """This rank's share of a step's `count` micro-batches, by index: r, r+N, r+2N, ..."""
    return list(range(rank(), count, world_size()))


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` under DistributedDataParallel (itself in a plain process). Some parameters take no
    part in some steps (the maps of removed layers, a pooler), so unused ones are looked for."""
    if not active():
        return module
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        **no_buffer_sync(),
    )


def no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword that stops it syncing buffers at every forward (they are constants: position
    ids): `forward_sync_buffers` where this torch has it (2.13), else `broadcast_buffers`, the
    keyword every earlier torch (2.11 on the GPU machines) takes."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


def syncing(module: nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward: gradients are all-reduced only when
    `sync` (the step's last micro-batch); before that they accumulate locally."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def any_rank(value: int) -> int:
    """The largest `value` of any rank (a signal received by one process stops them all)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per key, the sum of every rank's value (each rank must hold the same keys)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    summed = dict(zip(keys, t.tolist(), strict=True))
    return {k: summed[k] for k in values}


def mean_over_ranks(value: float) -> float:
    return sum_over_ranks({"v": value})["v"] / world_size()


def check_identical(tensors: dict[str, torch.Tensor], what: str) -> None:
    """CheckFailed, on every rank, unless every rank holds exactly rank 0's `tensors` (bit for
    bit; the same names in the same order everywhere)."""
    if not active():
        return
    differ = []
    for name, t in tensors.items():
        mine = t.detach().to(_comm_device())
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        if not torch.equal(mine, theirs):
            differ.append(name)
    flags = gather(differ)
    bad = {r: names for r, names in enumerate(flags) if names}
    if bad:
        shown = "; ".join(f"rank {r}: {', '.join(n[:5])}" for r, n in bad.items())
        raise CheckFailed(f"{what} differ between processes ({shown}); rank 0's are the reference")


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
