"""The next steps' data prepared on a background thread while the current step trains.

`Prefetcher(make, steps)` calls `make(step)` for each of `steps` in order on one worker thread and
keeps at most `ahead` results waiting; the loop takes them with `get(step)`, in the same order.
`make` must be a pure function of the step (the loop's batches are: collation, masking with a
generator seeded by the step, pinning), so what the loop receives is exactly what calling
`make(step)` itself would have given, and a resumed run starts the worker at its resumed step.

An exception on the worker is raised by the `get` that would have received that step's data,
the same exception (its type kept: a DataError is still reported as one), with a note naming the
thread and the step. Leaving the `with` block (the end, an interrupt, an error in the loop) stops
the worker: it prepares nothing more, and the block waits for the step it is preparing at most
`join_timeout` seconds (the thread is a daemon: a stuck read cannot keep the process alive).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
THREAD_NAME = "compress-prefetch"


class Prefetcher(Generic[T]):
    def __init__(
        self,
        make: Callable[[int], T],
        steps: Iterable[int],
        ahead: int = 1,
        device: torch.device | None = None,
        join_timeout: float = 60.0,
    ):
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self.make, self.steps, self.device = make, iter(steps), device
        self.join_timeout = join_timeout
        self._ready: queue.Queue[tuple[int, T | None, BaseException | None]] = queue.Queue(ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=THREAD_NAME, daemon=True)

    def __enter__(self) -> Prefetcher[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _work(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # pinned memory on this process's GPU's context
        step = None
        try:
            for step in self.steps:
                if self._stop.is_set():
                    return
                self._put((step, self.make(step), None))
        except BaseException as err:  # handed to the loop, which raises it
            self._put((step, None, err))

    def _put(self, item) -> None:
        """Into the queue, waiting while it is full, unless the loop has stopped taking."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self, step: int) -> T:
        """The data of `step` (the next of `steps`); the worker's exception if it failed."""
        while True:
            try:
                got, value, err = self._ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(
                        f"the {THREAD_NAME} thread stopped before step {step}"
                    ) from None
        if err is not None:
            err.add_note(f"(raised on the {THREAD_NAME} thread, preparing the data of step {got})")
            raise err
        if got != step:
            raise RuntimeError(f"{THREAD_NAME}: the loop asked for step {step}, got step {got}")
        return value

    def close(self) -> None:
        """Stop the worker and wait for it (at most `join_timeout` seconds)."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(self.join_timeout)
        while not self._ready.empty():  # let what it prepared go
            self._ready.get_nowait()
