"""`compress`: thin click commands over importable functions. User errors exit non-zero with a
message, never a traceback. Heavy modules are imported inside the command that needs them, so
`--help` and the zoo's read commands start without a deep-learning stack."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import click

from compressor.cli.eval import baselines_cmd, eval_cmd
from compressor.cli.zoo import trust_option, zoo_group
from compressor.errors import CompressError, Interrupted


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            return super().invoke(ctx)
        except Interrupted as err:
            click.secho(str(err), err=True)
            ctx.exit(err.exit_code)
        except CompressError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            ctx.exit(err.exit_code)
        except OSError as err:  # a read-only run directory, zoo or output folder
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            where = f"{err.filename}: " if err.filename else ""
            click.secho(f"error: {where}{err.strerror or err}; nothing more was written"
                        " (is it read-only for this user?)", fg="red", err=True)  # fmt: skip
            ctx.exit(1)
        except KeyboardInterrupt as err:  # outside a run: nothing to resume
            click.secho("interrupted", err=True)
            ctx.exit(128 + (int(err.args[0]) if err.args else signal.SIGINT))
        finally:
            signal.signal(signal.SIGTERM, previous)


allow_large_option = click.option(
    "--allow-large",
    is_flag=True,
    help="Run a recipe whose training memory estimate exceeds this machine's memory (for a"
    " machine that has it).",
)


def _sigterm(signum, frame):
    """SIGTERM stops a command like Ctrl-C does (a run checkpoints first), exiting 143."""
    raise KeyboardInterrupt(signum)


@click.group(cls=_Group)
def main() -> None:
    """HomoDistil: compress a pre-trained encoder (BERT, RoBERTa, XLM-R, DistilBERT, MPNet) into a
    small, fast model."""


@main.command("run")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last checkpoint.")  # fmt: skip
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Root for run directories (default: the recipe's output.dir).")  # fmt: skip
@click.option("--zoo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Zoo to register the result in (default: $COMPRESS_ZOO, zoo.dir, ./zoo).")  # fmt: skip
@click.option("--no-register", is_flag=True, help="Do not register the result in the zoo.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a key of RECIPE, e.g. train.steps=400 (repeatable).")  # fmt: skip
@allow_large_option
def run_cmd(
    recipe: Path | None,
    resume_dir: Path | None,
    output: Path | None,
    zoo: Path | None,
    no_register: bool,
    overrides: tuple[str, ...],
    allow_large: bool,
) -> None:
    """Distill + prune RECIPE's teacher into its target shape and write a slim model.

    Several processes (DDP): torchrun --nproc_per_node=N -m compressor run RECIPE"""
    from compressor import distributed, pipeline

    distributed.check_environment()

    if (recipe is None) == (resume_dir is None):
        raise click.UsageError("give a RECIPE, or --resume RUN_DIR (not both)")
    if resume_dir and overrides:
        raise click.UsageError("--set changes a new run's recipe; a resumed run keeps its own")
    register = not no_register
    if resume_dir:
        result = pipeline.resume(resume_dir, zoo=zoo, register=register)
    else:
        result = pipeline.run(recipe, output, zoo=zoo, register=register, overrides=overrides,
                              allow_large=allow_large)  # fmt: skip
    if not distributed.is_main():
        return  # rank 0 reports for every process
    click.echo(json.dumps(result.summary, indent=2))
    click.echo(f"run directory: {result.run_dir}")
    if "zoo_id" in result.summary:
        click.echo(f"registered in the zoo: {result.summary['zoo_id']}")


@main.command("export")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--onnx", is_flag=True, help="Export to ONNX and verify it with onnxruntime.")
@click.option("--no-bench", is_flag=True, help="Skip the latency benchmark.")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              help="Where to look for the latest run when RUN_DIR is not given.")  # fmt: skip
@trust_option
def export_cmd(
    run_dir: Path | None, onnx: bool, no_bench: bool, runs: Path, trust_remote_code: bool
) -> None:
    """Export a finished run (default: the latest) to ONNX, verify it, benchmark it. A model
    holding code (custom sentence-transformers modules, .py files) is refused unless
    --trust-remote-code."""
    from compressor.deploy.stages import deploy
    from compressor.rundir import latest_run, lock_run_dir, require_not_entry

    if not onnx:
        raise click.UsageError("choose a format: --onnx")
    run_dir = require_not_entry(run_dir or latest_run(runs))
    with lock_run_dir(run_dir):
        summary = deploy(run_dir, bench=False if no_bench else None,
                         trust_remote_code=trust_remote_code)  # fmt: skip
    click.echo(
        json.dumps({k: summary[k] for k in ("export", "benchmark") if k in summary}, indent=2)
    )
    click.echo(f"run directory: {run_dir}")


@main.command("bench")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print benchmark.json instead of a table.")
def bench_cmd(run_dir: Path, as_json: bool) -> None:
    """Re-run the student-vs-teacher latency benchmark of RUN_DIR."""
    from compressor.deploy.bench import format_table
    from compressor.deploy.stages import bench_run_dir
    from compressor.rundir import lock_run_dir, require_not_entry

    with lock_run_dir(require_not_entry(run_dir)):
        result = bench_run_dir(run_dir)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@main.group("recipe")
def recipe_group() -> None:
    """Inspect recipes."""


@recipe_group.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a key of RECIPE, as `compress run --set` does (repeatable).")  # fmt: skip
@click.option("--probe", is_flag=True,
              help="Also time a few training micro-batches on the recipe's device (loads the"
                   " teacher) and print the predicted wall time.")  # fmt: skip
@allow_large_option
def recipe_check_cmd(
    recipe: Path, overrides: tuple[str, ...], probe: bool, allow_large: bool
) -> None:
    """Validate RECIPE without loading weights; print its plan and budget (tokens, FLOPs). A
    recipe that needs more memory than this machine has is refused unless --allow-large."""
    from compressor.plan_report import plan_report

    click.echo(plan_report(recipe, list(overrides), allow_large))
    if probe:
        from compressor.train.probe import wall_time_report

        click.echo(wall_time_report(recipe, list(overrides)))


main.add_command(zoo_group)
main.add_command(eval_cmd)
main.add_command(baselines_cmd)
