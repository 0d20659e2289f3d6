"""Counting the device reads of a training step (issue 23): on a GPU each read waits for the queued
work (a host sync) and the next kernels start late.

- `DeviceReads` counts, on any device (a CPU too), the reads the project's own code asks for: the
  ops that return a value to the host or whose output size depends on the data (`.item()`,
  `bool()`, `int()`, `float()` of a tensor, `nonzero`, indexing by a boolean mask,
  `masked_select`, `equal`, `unique`, `repeat_interleave`), seen by a dispatch mode, and
  `Tensor.tolist` (which no op dispatches). torch's internals are trusted (AdamW reads its step
  counter from a host tensor). Each read is charged to `step` (None: outside the steps). Only the
  thread that entered it is watched (dispatch modes are per thread; the prefetching worker
  handles host tensors only).
- `cuda_syncs` counts what torch itself reports on CUDA (`torch.cuda.set_sync_debug_mode("warn")`):
  every synchronizing call, whoever made it.

tests/test_syncs.py holds the loop to zero reads between its log steps; tools/gpu/gpu_check.py
reports both counts per training step.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = str(Path(__file__).resolve().parent)
aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
         aten.masked_select.default, aten.equal.default, aten._unique2.default,
         aten.unique_consecutive.default, aten.repeat_interleave.Tensor}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
            aten._index_put_impl_.default}  # fmt: skip
# the frames between an op and the code that asked for it: this file, torch's dispatch to a mode
# (through its compile wrappers) and its Python tensor methods
MACHINERY = (__file__, "torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py",
             "torch/_ops.py", "torch/_tensor.py", "torch/overrides.py")  # fmt: skip
SYNC_WARNING = "synchroniz"  # torch's sync debug mode: "called a synchronizing CUDA operation"


def asked_by_the_project(depth: int) -> str | None:
    """`file:line` of the innermost frame outside this file and torch's tensor and dispatch
    wrappers, when it is the project's code; None when torch's own code asked."""
    frame = sys._getframe(depth)
    while frame is not None and any(m in frame.f_code.co_filename for m in MACHINERY):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class DeviceReads(TorchDispatchMode):
    """The reads the project's code asks for, per `step` (set it as the steps go; `seen[step]`
    lists them as 'op at file:line')."""

    def __init__(self):
        super().__init__()
        self.step: int | None = None
        self.seen: dict[int | None, list[str]] = defaultdict(list)
        self._thread: threading.Thread | None = None
        self._tolist = None

    def note(self, what: str, depth: int) -> None:
        where = asked_by_the_project(depth + 1)
        if where is not None:
            self.seen[self.step].append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] or ())
        )
        if func in READS or boolean_index:
            self.note(str(func), 2)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._thread, real, counter = threading.current_thread(), torch.Tensor.tolist, self

        def tolist(tensor):
            if threading.current_thread() is counter._thread:
                counter.note("Tensor.tolist", 1)
            return real(tensor)

        self._tolist, torch.Tensor.tolist = real, tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


@contextmanager
def cuda_syncs(device: torch.device) -> Iterator[list[str] | None]:
    """On CUDA: the synchronizing calls made inside (torch's sync debug mode, as warnings, one
    message each), a list filled as they come; None on another device."""
    if device.type != "cuda":
        yield None
        return
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found += [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
