"""`compress`: thin click commands over importable functions. User errors exit non-zero with a
message, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from compressor.errors import CompressError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CompressError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted; the last checkpoint is in the run directory", err=True)
            click.echo("resume with: compress run --resume RUN_DIR", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
def main() -> None:
    """HomoDistil: compress a pre-trained BERT-style encoder into a small, fast model."""


@main.command("run")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last checkpoint.")  # fmt: skip
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Root for run directories (default: the recipe's output.dir).")  # fmt: skip
def run_cmd(recipe: Path | None, resume_dir: Path | None, output: Path | None) -> None:
    """Distill + prune RECIPE's teacher into its target shape and write a slim model."""
    from compressor import pipeline

    if (recipe is None) == (resume_dir is None):
        raise click.UsageError("give a RECIPE, or --resume RUN_DIR (not both)")
    result = pipeline.resume(resume_dir) if resume_dir else pipeline.run(recipe, output)
    click.echo(json.dumps(result.summary, indent=2))
    click.echo(f"run directory: {result.run_dir}")


@main.group("recipe")
def recipe_group() -> None:
    """Inspect recipes."""


@recipe_group.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
def recipe_check_cmd(recipe: Path) -> None:
    """Validate RECIPE without loading weights and print its plan."""
    from compressor.plan_report import plan_report

    click.echo(plan_report(recipe))


if __name__ == "__main__":
    sys.exit(main())
