"""Typed errors. A user error carries its exit code; the CLI prints the message, never a traceback."""

from __future__ import annotations


class CompressError(Exception):
    """Base class of every error the CLI reports as a clean message."""

    exit_code = 1


class RecipeError(CompressError):
    """A recipe failed validation. Carries every problem found, not only the first."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"recipe {source}: {len(problems)} {noun}\n{lines}")


class TeacherError(CompressError):
    """The teacher could not be found or is not a supported architecture."""

    exit_code = 2


class DataError(CompressError):
    """The training text could not be found or is empty."""

    exit_code = 2


class CheckFailed(CompressError):
    """A correctness gate failed (identity, slim round-trip, export verification...)."""

    exit_code = 3


class RunDirError(CompressError):
    """A run directory is missing, incomplete or belongs to another recipe."""

    exit_code = 2


class ZooError(CompressError):
    """A zoo id is malformed, unknown or ambiguous, or a zoo operation was refused."""

    exit_code = 2


class UntrustedInput(CompressError):
    """A folder compress did not make asks for something it does not do unasked: a path that
    leaves the folder, a link out of it, code that would run (docs/security.md)."""

    exit_code = 2


class BadEnvironment(CompressError):
    """An environment variable compress reads (WORLD_SIZE, COMPRESS_CACHE, HOME...) is unusable."""

    exit_code = 2


class StorageError(CompressError):
    """Writing to disk failed (disk full, quota, read-only); what was there before is intact."""

    exit_code = 1


def resume_command(run_dir, processes: int = 1) -> str:
    """The command that continues a run trained by `processes` processes (torchrun, on one
    machine, when more than one)."""
    if processes > 1:
        return f"torchrun --nproc_per_node={processes} -m compressor run --resume {run_dir}"
    return f"compress run --resume {run_dir}"


class Interrupted(CompressError):
    """Ctrl-C or SIGTERM stopped a run: says where it is and how to resume. Exits 128 + signal."""

    def __init__(
        self, run_dir, has_checkpoint: bool, signum: int = 2, processes: int = 1,
        trained: bool = False,
    ):  # fmt: skip
        self.run_dir = run_dir
        self.has_checkpoint = has_checkpoint
        self.exit_code = 128 + int(signum)
        if trained:  # stopped in export, verification, benchmark or registration
            where, processes = "after training (export and registration start again)", 1
        elif has_checkpoint:
            where = "from its last checkpoint"
        else:
            where = "from step 0 (it stopped before its first checkpoint)"
        super().__init__(f"interrupted; resume {where} with: {resume_command(run_dir, processes)}")
