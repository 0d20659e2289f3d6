"""The recipe's quality and speedup gates: pure checks of recorded numbers, and a real (tiny) run
whose impossible quality gate exits 3 and registers nothing."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from compressor.cli.main import main
from compressor.errors import CheckFailed
from compressor.gates import gate_failures
from compressor.recipe import GatesSpec, QualityGate
from compressor.zoo import store as zoo

ROTTEN = QualityGate(task="rotten_tomatoes", max_drop=0.05, max_train=40, max_eval=20,
                     max_length=16)  # fmt: skip


def evaluation(student: list[float], teacher: list[float] | None) -> dict:
    """A recorded evaluation as `compress eval` writes it (validation scores per run)."""
    record = {"task": "rotten_tomatoes", "metric": "accuracy", "mode": "probe",
              "splits": {"validation": 20}, "student": {"mean": 0.5, "validation": student}}  # fmt: skip
    if teacher is not None:
        record["teacher"] = {"mean": 0.6, "validation": teacher}
    return record


def quality(record: dict | None, gate: QualityGate = ROTTEN) -> list[str]:
    return gate_failures(GatesSpec(max_quality_drop=gate), {}, None, record)


def test_quality_gate_reads_the_validation_drop_against_the_limit():
    assert quality(evaluation([0.80], [0.84])) == []  # drop 0.04 <= 0.05
    assert quality(evaluation([0.90], [0.84])) == []  # the student ahead
    (miss,) = quality(evaluation([0.70], [0.84]))
    assert miss == (
        "gates.max_quality_drop: rotten_tomatoes validation accuracy (probe, 20 examples):"
        " student 0.7000, teacher 0.8400, drop 0.1400, limit 0.05"
    )
    beat = ROTTEN.model_copy(update={"max_drop": -0.1})  # the student must beat the teacher
    assert quality(evaluation([0.90], [0.84]), beat) != []


@pytest.mark.parametrize(
    "record",
    [
        evaluation([float("nan")], [0.84]),
        evaluation([0.8], [float("nan")]),
        evaluation([0.8], None),  # no teacher score
        evaluation([], [0.84]),
        None,  # nothing recorded
    ],
    ids=["nan student", "nan teacher", "no teacher", "no score", "no record"],
)
def test_quality_gate_misses_without_two_real_scores(record):
    (miss,) = quality(record)
    assert miss.startswith("gates.max_quality_drop:")


def test_speedup_gate_at_a_named_shape():
    bench = {
        "max_spread": 0.1,
        "results": [
            {"runtime": "onnxruntime", "batch": 1, "seq": 128, "speedup_p50": 2.5},
            {"runtime": "onnxruntime", "batch": 8, "seq": 128, "speedup_p50": 3.4},
            {"runtime": "torch", "batch": 8, "seq": 64, "speedup_p50": 9.0},
        ],
    }

    def misses(gate):
        return gate_failures(GatesSpec(min_speedup=gate), {}, bench)

    assert misses(2.0) == [] and misses({"speedup": 3.0, "batch": 8, "seq": 128}) == []
    assert misses(3.0) == [
        "gates.min_speedup: onnxruntime fp32 speedup 2.50x at the first benchmarked shape,"
        " limit 3.0x"
    ]
    assert misses({"speedup": 3.5, "batch": 8, "seq": 128}) == [
        "gates.min_speedup: onnxruntime fp32 speedup 3.40x at batch 8 seq 128, limit 3.5x"
    ]
    (missing,) = misses({"speedup": 1.0, "batch": 8, "seq": 64})  # torch only there
    assert "no onnxruntime benchmark at batch 8 seq 64" in missing
    bench["results"][1]["speedup_p50"] = float("nan")
    assert misses({"speedup": 1.0, "batch": 8, "seq": 128}) != []


def test_an_impossible_quality_gate_exits_3_and_registers_nothing(tmp_path, packaged_tokenizer):
    """A real tiny run (random tiny teacher, the packaged tokenizer, real rotten_tomatoes text):
    the gate evaluates student and teacher on validation, records it in evaluations.json, and a
    miss raises CheckFailed (exit 3) before the zoo. `compress zoo add` reuses the record: exit 3
    again; with a reachable limit it registers."""
    from compressor import pipeline
    from tests.helpers import gated_tiny_run

    impossible = ROTTEN.model_copy(update={"max_drop": -1.0})  # student - teacher >= 1
    recipe, teacher = gated_tiny_run(GatesSpec(max_quality_drop=impossible), packaged_tokenizer)
    gate_zoo = tmp_path / "zoo"
    with pytest.raises(CheckFailed, match=r"gates\.max_quality_drop: rotten_tomatoes") as err:
        pipeline.run(recipe, output=tmp_path / "runs", teacher=teacher, zoo=gate_zoo)
    assert err.value.exit_code == 3
    assert "not registered" in str(err.value) and "limit -1.0" in str(err.value)
    assert zoo.list_entries(gate_zoo) == []
    (run,) = (tmp_path / "runs" / "tiny-test").iterdir()
    (record,) = json.loads((run / "evaluations.json").read_text())["evaluations"]
    assert record["task"] == "rotten_tomatoes" and record["mode"] == "probe"
    assert record["splits"]["validation"] == 20 and len(record["teacher"]["validation"]) == 1

    res = CliRunner().invoke(main, ["zoo", "add", str(run), "--zoo", str(gate_zoo)])
    assert res.exit_code == 3, res.output
    assert "gates.max_quality_drop" in res.output and "Traceback" not in res.output
    assert zoo.list_entries(gate_zoo) == []

    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["gates"]["max_quality_drop"]["max_drop"] = 1.0
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(main, ["zoo", "add", str(run), "--zoo", str(gate_zoo)])
    assert res.exit_code == 0, res.output
    assert len(zoo.list_entries(gate_zoo)) == 1
    evaluations = json.loads((run / "evaluations.json").read_text())["evaluations"]
    assert len(evaluations) == 1  # the recorded evaluation was reused, not run again
