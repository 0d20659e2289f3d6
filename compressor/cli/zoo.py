"""`compress zoo ...`: thin click commands over compressor.zoo.store. `--zoo PATH` on every command
(default: $COMPRESS_ZOO, else ./zoo); `--json` on the read commands. Light imports only: listing
an index must not load a deep-learning stack."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compressor.errors import CheckFailed
from compressor.rundir import MODEL_DIR
from compressor.trust import code_in, printable
from compressor.zoo import html_report, report
from compressor.zoo import store as zoo

zoo_option = click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The zoo directory (default: $COMPRESS_ZOO, else ./zoo).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
trust_option = click.option(
    "--trust-remote-code",
    "trust_remote_code",
    is_flag=True,
    help="Allow code that came with the model (custom sentence-transformers modules, .py files"
    " beside it) to be loaded, registered or shipped. Off by default: see docs/security.md.",
)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group("zoo")
def zoo_group() -> None:
    """The local model zoo: every verified run's student, with its recipe, hashes and metrics."""


@zoo_group.command("list")
@zoo_option
@json_option
def list_cmd(zoo_dir: Path | None, as_json: bool) -> None:
    """Table of every entry: id, teacher, shape, params, size, speedup, quality, created."""
    root = zoo.zoo_root(zoo_dir)
    rows = zoo.list_entries(root)
    if as_json:
        _echo_json([{k: v for k, v in r.items() if k not in ("files", "summary")} for r in rows])
    else:
        click.echo(report.list_table(rows) if rows else report.empty_zoo_text(root))


@zoo_group.command("show")
@click.argument("entry_id")
@zoo_option
@json_option
def show_cmd(entry_id: str, zoo_dir: Path | None, as_json: bool) -> None:
    """Everything about one entry (an id, a unique id prefix or short hash)."""
    info = zoo.show(zoo.zoo_root(zoo_dir), entry_id)
    _echo_json(info) if as_json else click.echo(report.show_text(info))


@zoo_group.command("verify")
@click.argument("entry_id", required=False)
@click.option("--all", "all_entries", is_flag=True, help="Verify every entry.")
@zoo_option
@json_option
def verify_cmd(
    entry_id: str | None, all_entries: bool, zoo_dir: Path | None, as_json: bool
) -> None:
    """Re-hash every file and re-run the stored ONNX check on the stored samples (exit 3 on any
    missing, modified or extra file or a failed check)."""
    if (entry_id is None) == (not all_entries):
        raise click.UsageError("give an ENTRY_ID, or --all (not both)")
    root = zoo.zoo_root(zoo_dir)
    result = zoo.verify_zoo(root, entry_id)
    _echo_json(result) if as_json else click.echo(report.verify_zoo_text(result, root))
    if not result["passed"]:
        raise CheckFailed(report.verify_failure(result))


@zoo_group.command("rm")
@click.argument("entry_id")
@zoo_option
def rm_cmd(entry_id: str, zoo_dir: Path | None) -> None:
    """Delete an entry and its index row."""
    click.echo(f"removed {zoo.remove(zoo.zoo_root(zoo_dir), entry_id)}")


@zoo_group.command("export")
@click.argument("entry_id")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "layout",
    type=click.Choice(zoo.BUNDLE_FORMATS),
    default="onnx",
    show_default=True,
    help="onnx: loads with ORTModelForFeatureExtraction; sentence-transformers (sentence"
    ' encoders): loads with SentenceTransformer(DEST) and SentenceTransformer(DEST, backend="onnx").',
)
@zoo_option
@trust_option
def export_cmd(
    entry_id: str, dest: Path, layout: str, zoo_dir: Path | None, trust_remote_code: bool
) -> None:
    """Copy the deployable bundle (ONNX model, tokenizer, config, model card, verification report,
    benchmark) to a new or empty DEST. Code in the entry is left out unless --trust-remote-code."""
    out, left_out = zoo.export_bundle(
        zoo.zoo_root(zoo_dir), entry_id, dest, layout, trust_remote_code
    )
    for rel in left_out:
        click.echo(f"left out {printable(rel)}: code (ship it with --trust-remote-code)")
    click.echo(f"exported {printable(entry_id)} ({layout}) to {out}")


@zoo_group.command("compare")
@click.argument("entry_ids", nargs=-1, required=True)
@zoo_option
@json_option
def compare_cmd(entry_ids: tuple[str, ...], zoo_dir: Path | None, as_json: bool) -> None:
    """Entries side by side."""
    rows = zoo.compare(zoo.zoo_root(zoo_dir), list(entry_ids))
    _echo_json(rows) if as_json else click.echo(report.compare_table(rows))


@zoo_group.command("report")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory of the page (default: <zoo>/report); index.html is written there.",
)
@zoo_option
def report_cmd(out: Path | None, zoo_dir: Path | None) -> None:
    """One self-contained HTML page: the leaderboard, quality vs latency with the Pareto front,
    each entry's discrepancy curve and model card. Needs no network to view."""
    path, n, warnings = html_report.write_report(zoo.zoo_root(zoo_dir), out)
    for warning in warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
    click.echo(f"wrote {path} ({n} entries)")


@zoo_group.command("add")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@zoo_option
@trust_option
def add_cmd(run_dir: Path, zoo_dir: Path | None, trust_remote_code: bool) -> None:
    """Register a finished, verified RUN_DIR (its recipe's gates are checked first). A run that
    holds code (custom sentence-transformers modules, .py files) is refused unless
    --trust-remote-code."""
    from compressor.pipeline import register_run  # loads torch: only this command needs it

    entry_id = register_run(run_dir, zoo_dir, trust_remote_code=trust_remote_code)
    click.echo(f"registered in the zoo: {entry_id}")
    for line in code_in(run_dir, (MODEL_DIR,)) if trust_remote_code else []:
        click.echo(f"warning: registered with code (--trust-remote-code): {printable(line)}")


@zoo_group.command("reindex")
@zoo_option
def reindex_cmd(zoo_dir: Path | None) -> None:
    """Rebuild the index from the entry directories (their manifests); repairs a damaged or
    missing index. Never changes which entries verify."""
    result = zoo.reindex(zoo.zoo_root(zoo_dir))
    if result["damaged_index"]:
        click.echo(f"moved the damaged index aside to {result['damaged_index']}")
    click.echo(f"indexed {result['entries']} entries")
    for s in result["skipped"]:
        click.echo(f"skipped {s}")
    for s in result["untrusted"]:
        click.echo(f"not trusted: {s}")
