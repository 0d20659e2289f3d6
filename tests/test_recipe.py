"""Every shipped recipe validates; each malformed recipe gets its own message and exit code 2."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor.cli.main import main
from compressor.errors import RecipeError
from compressor.recipe import load_recipe, parse_recipe
from tests.helpers import RECIPES

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_there_are_shipped_recipes():
    names = {p.name for p in SHIPPED}
    assert {"bert-base-to-6L384.yaml", "minilm-to-4L256.yaml", "tiny-test.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates_and_documents_itself(path):
    load_recipe(path)
    head = path.read_text().splitlines()[:8]
    assert head[0].startswith("#") and any("Run:" in line for line in head)
    assert any("Time:" in line for line in head)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_recipe_check_cli(path):
    res = CliRunner().invoke(main, ["recipe", "check", str(path)])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output


def base() -> dict:
    return yaml.safe_load((RECIPES / "minilm-to-4L256.yaml").read_text())


def edit(**changes) -> dict:
    d = base()
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = d
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return d


DELETE = object()

MALFORMED = {
    "typo": (edit(pruning__shedule="cubic"), "pruning.shedule: unknown key; did you mean 'pruning.schedule'?"),
    "top-level typo": (edit(trian={}), "trian: unknown key; did you mean 'train'?"),
    "missing": (edit(target__ffn=DELETE), "target.ffn: required key is missing"),
    "wrong type": (edit(train__steps="many"), "train.steps: Input should be a valid integer"),
    "bad choice": (edit(pruning__schedule="exponential"), "pruning.schedule: Input should be 'cubic', 'linear' or 'one_shot'"),
    "negative lr": (edit(train__lr=-1), "train.lr: Input should be greater than 0"),
    "indivisible": (edit(target__hidden=250), "target.hidden: 250 is not divisible by target.heads (8)"),
    "end after steps": (edit(pruning__end_step=200), "pruning.end_step: 200 must be < train.steps (200)"),
    "start after end": (edit(pruning__start_step=160), "pruning.start_step: 160 is after pruning.end_step (150)"),
    "hub without name": (edit(data__source="hub"), "data.name: required when data.source is 'hub'"),
    "files without files": (edit(data__source="files"), "data.files: required when data.source is 'files'"),
    "no loss": (edit(distill={"mlm": 0, "prediction": 0, "hidden": 0, "attention": 0}), "distill: every loss weight is 0"),
    "wider than teacher": (edit(target__ffn=4096), "target.ffn: 4096 is larger than the teacher's 1536"),
    "deeper than teacher": (edit(target__layers=8), "target.layers: 8 is larger than the teacher's 6"),
    "structure not listed": (edit(pruning__structures=["heads", "ffn", "hidden"]), "the target shrinks layers but 'layers' is not listed"),
    "mlm on head-less teacher": (edit(distill__mlm=1.0), "distill.mlm: 1.0 needs a teacher with a masked-LM head"),
    "missing teacher package": (edit(teacher__id="no_such_pkg"), "teacher.id: no installed package named 'no_such_pkg'"),
    "quality gate on an unknown task": (edit(gates={"max_quality_drop": {"task": "imdb", "max_drop": 0.05}}), "gates.max_quality_drop.task: Input should be 'wiki_topics', 'rotten_tomatoes' or 'movie_retrieval' (got 'imdb')"),
    "speedup gate at a shape not benchmarked": (edit(gates={"min_speedup": {"speedup": 2, "batch": 8, "seq": 128}}), "gates.min_speedup: batch 8 seq 128 is not benchmarked (bench.batch_sizes x bench.seq_lengths: batch 1 seq 128)"),
    "speedup gate with half a shape": (edit(gates={"min_speedup": {"speedup": 2, "seq": 128}}), "gates.min_speedup: give both batch and seq"),
    "speedup gate not a number": (edit(gates={"min_speedup": "fast"}), "gates.min_speedup: Value error, expected a number, or {speedup, batch, seq}"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_exit_2_with_its_message(case, tmp_path):
    raw, message = MALFORMED[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    out_root = tmp_path / "runs"
    for args in (["recipe", "check", str(path)], ["run", str(path), "--output", str(out_root)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        assert message in res.output
        assert "Traceback" not in res.output
    assert not out_root.exists()  # nothing written


def test_every_problem_reported_at_once():
    raw = edit(pruning__shedule="x", train__lr=0, target__hidden=250)
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw)
    assert len(e.value.problems) == 3


def test_not_yaml_and_not_found(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("teacher: [unclosed")
    res = CliRunner().invoke(main, ["recipe", "check", str(p)])
    assert res.exit_code == 2 and "not valid YAML" in res.output
    res = CliRunner().invoke(main, ["recipe", "check", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "file not found" in res.output


def test_recipe_objects_are_frozen():
    r = load_recipe(Path(RECIPES / "tiny-test.yaml"))
    with pytest.raises(Exception):  # noqa: B017
        r.train.steps = 3


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({}, "layers by greedy removal, measured on 4 batches; widths from the importance EMA"),
        (
            {"layer_selection": "uniform", "importance": "truncate"},
            "evenly spaced; widths by truncate",
        ),
    ],
)
def test_recipe_check_states_how_decisions_are_taken(changes, expected, tmp_path):
    raw = yaml.safe_load((RECIPES / "minilm-to-4L256.yaml").read_text())
    raw["pruning"].update(changes)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(main, ["recipe", "check", str(path)])
    assert res.exit_code == 0 and expected in res.output
    assert "100x its noise floor" in res.output or "truncate" in res.output
