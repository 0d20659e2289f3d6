"""Atomic, checksummed checkpoints of the training state.

A checkpoint is one header line (a magic word, the sha256 and the length of the payload) and the
payload, `torch.save` of the fields of `Checkpoint`. It is written to a temporary file, synced,
then the last checkpoint becomes the previous one and the new one takes its name: the last two
stay. A checkpoint that does not match its checksum (a flipped bit, a truncated or empty file) is
never loaded; the previous one is used, and a line says so.

Only tensors and plain containers are stored, so loading uses `weights_only=True` (no pickle).
Tensors that mostly equal a known base (the initial student, zeros) are stored as the block of
rows and columns where they differ (`pack_delta`), bit for bit.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from compressor.errors import RunDirError, StorageError
from compressor.rundir import (
    CHECKPOINT_FILE,
    CHECKPOINT_PREV_FILE,
    CHECKPOINT_TMP_SUFFIX,
    RECIPE_FILE,
)

MAGIC = b"compress-checkpoint v1"
CHUNK = 1 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Checkpoint:
    """Everything a resumed run needs to continue exactly where it stopped."""

    step: int  # the next step to run
    student: dict[str, Any]  # packed state dicts (train/state.py)
    maps: dict[str, Any]
    optimizer: dict[str, Any]
    masks: dict[str, torch.Tensor]
    importance: dict[str, Any] | None  # None once no pruning step remains (never read again)
    layers_chosen: bool
    noise_floor: dict[str, dict[str, float]] | None  # per signal, per kind (distill.py)
    torch_rng: torch.Tensor  # rank 0's CPU generator
    data: dict[str, Any] | None = None  # a stream's position (data.py); older checkpoints lack it
    world_size: int = 1  # the processes that trained it (torchrun); a resume needs as many
    rank_rng: list[dict[str, torch.Tensor]] | None = None  # per rank: "cpu", and "cuda" on GPUs
    units: dict[str, torch.Tensor] | None = None  # progressive slim: the kept teacher indices


class Damaged(Exception):
    """A checkpoint file that must not be loaded (internal: reported by `load_checkpoint`)."""


# ---------------------------------------------------------------------------- saving


def save_checkpoint(run_dir: Path, state: Checkpoint) -> Path:
    """Write `state`; the last checkpoint becomes the previous one. A failed write (disk full)
    removes its temporary file, leaves the earlier checkpoints as they were and raises
    StorageError."""
    return write_snapshot(run_dir, asdict(state))  # asdict copies every tensor


def write_snapshot(run_dir: Path, snapshot: dict[str, Any]) -> Path:
    """`save_checkpoint` of a Checkpoint's fields as `asdict` copied them."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_name(path.name + CHECKPOINT_TMP_SUFFIX)
    buf = io.BytesIO()
    torch.save(snapshot, buf)
    payload = buf.getbuffer()
    try:
        with open(tmp, "wb") as f:
            f.write(header(payload))
            write_payload(f, payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(err, path) from None
    if path.exists():
        os.replace(path, path.with_name(CHECKPOINT_PREV_FILE))
    os.replace(tmp, path)
    return path


class CheckpointWriter:
    """Checkpoints written on a background thread, one at a time, as atomic and checksummed as
    `save_checkpoint` writes them: the training thread copies the state (`asdict` copies every
    tensor) and goes on while the copy is serialised, hashed, written and synced. `wait` joins
    the write in flight and raises what it raised (StorageError: a full disk); `save` waits for
    the previous write first. The thread is not a daemon: a process that ends while it writes
    finishes the write first."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, run_dir: Path, state: Checkpoint) -> None:
        self.wait()
        snapshot = asdict(state)
        self.thread = threading.Thread(target=self._write, args=(run_dir, snapshot),
                                       name="checkpoint-writer")  # fmt: skip
        self.thread.start()

    def _write(self, run_dir: Path, snapshot: dict[str, Any]) -> None:
        try:
            write_snapshot(run_dir, snapshot)
        except BaseException as err:  # handed to the training thread by `wait`
            self.error = err

    def wait(self, raise_error: bool = True) -> None:
        """Until the write in flight (if any) is on disk; its error raised when `raise_error`
        (dropped otherwise: another error is on its way)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None and raise_error:
            raise error


def header(payload: memoryview) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + f" sha256={digest} bytes={len(payload)}\n".encode()


def write_payload(f, payload: memoryview) -> None:
    for i in range(0, len(payload), CHUNK):
        f.write(payload[i : i + CHUNK])


def storage_error(err: OSError, path: Path) -> StorageError:
    free = shutil.disk_usage(path.parent).free
    what = "the disk is full" if err.errno in NO_SPACE else f"the write failed ({err.strerror})"
    prev = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
    return StorageError(
        f"cannot write the checkpoint {path}: {what} ({free / 2**20:.0f} MiB free on that disk);"
        f" {prev}. Free some space, then: compress run --resume {path.parent}"
    )


# ---------------------------------------------------------------------------- loading


def load_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that matches its checksum; None if the run has none yet. A damaged
    one is reported through `warn` (default: a line on stderr) and the previous one used; if every
    checkpoint is damaged, RunDirError: the run has to start again."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    damaged = []
    for name in (CHECKPOINT_FILE, CHECKPOINT_PREV_FILE):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        try:
            raw = read_verified(path)
        except Damaged as err:
            damaged.append(f"{path} is damaged ({err})")
            continue
        if damaged:
            warn(f"warning: {damaged[0]}; resuming from {name} (step {int(raw['step'])})")
        return Checkpoint(**{f.name: raw[f.name] for f in fields(Checkpoint) if f.name in raw})
    if damaged:
        raise RunDirError(
            f"{'; '.join(damaged)}; no good checkpoint remains, so this run cannot resume: start"
            f" it again with compress run {Path(run_dir) / RECIPE_FILE}"
        )
    return None


def read_verified(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    first, _, payload = data.partition(b"\n")
    parts = first.split(b" ")
    if not data:
        raise Damaged("empty file")
    if not first.startswith(MAGIC) or len(parts) != 4:
        raise Damaged("no checksum header")
    digest, size = parts[2].removeprefix(b"sha256=").decode(), parts[3].removeprefix(b"bytes=")
    if not size.isdigit() or int(size) != len(payload):
        raise Damaged(f"{len(payload)} of {size.decode(errors='replace')} bytes: truncated")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise Damaged("checksum mismatch")
    try:
        raw = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # a payload that hashes right but is not ours
        raise Damaged(f"unreadable: {type(err).__name__}") from None
    if not isinstance(raw, dict) or any(f.name not in raw for f in required_fields()):
        raise Damaged("not a training state of this version")
    return raw


def required_fields() -> list:
    """The fields every checkpoint holds (those added later have defaults)."""
    return [f for f in fields(Checkpoint) if f.default is MISSING]


def has_checkpoint(run_dir: Path) -> bool:
    return any((Path(run_dir) / n).exists() for n in (CHECKPOINT_FILE, CHECKPOINT_PREV_FILE))


def remove_checkpoints(run_dir: Path) -> None:
    """The checkpoints, and one whose write was killed midway (its temporary file)."""
    for name in (CHECKPOINT_FILE, CHECKPOINT_PREV_FILE, CHECKPOINT_FILE + CHECKPOINT_TMP_SUFFIX):
        (Path(run_dir) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- compact tensors


def differs(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Entries whose bits differ (so -0.0 differs from 0.0, and NaN from NaN never hides)."""
    if t.is_floating_point() and t.element_size() in BITS:
        kind = BITS[t.element_size()]
        return t.contiguous().view(kind) != base.to(t.dtype).contiguous().view(kind)
    return t != base


BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_delta(t: torch.Tensor, base: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`t` as the rows and columns where it differs from `base` (zeros when None): exact, and
    small where most of it is still the base (unseen vocabulary rows, pruned structures)."""
    t = t.detach().cpu()
    base = torch.zeros_like(t) if base is None else base.detach().cpu()
    if t.ndim not in (1, 2) or t.shape != base.shape:
        return {"dense": t.clone()}
    diff = differs(t, base)
    shape = torch.tensor(t.shape)
    if t.ndim == 1:
        idx = diff.nonzero().flatten()
        return {"shape": shape, "rows": idx, "block": t[idx].clone()}
    rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
    return {"shape": shape, "rows": rows, "cols": cols, "block": t[rows][:, cols].clone()}


def unpack_delta(d: dict[str, torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `pack_delta` packed, given the same base."""
    if "dense" in d:
        return d["dense"]
    shape, dtype = tuple(d["shape"].tolist()), d["block"].dtype
    out = torch.zeros(shape, dtype=dtype) if base is None else base.detach().cpu().to(dtype)
    out = out.clone()
    if "cols" in d:
        out[d["rows"][:, None], d["cols"]] = d["block"]
    else:
        out[d["rows"]] = d["block"]
    return out
