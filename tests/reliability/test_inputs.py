"""No bad input ends in a traceback (issue 12, input part): recipes, teacher and data sources and
downstream task files each fail with one clear message naming the culprit, exit 2, and nothing
written (no empty run directory)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from compressor import pipeline
from compressor.cli.main import main
from compressor.errors import DataError, RecipeError, TeacherError
from compressor.evaluate.tasks import load_task
from compressor.recipe import (
    MAX_YAML_DEPTH,
    SHOWN_CHARS,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    with_overrides,
)
from compressor.teacher import read_teacher_config
from tests.helpers import RECIPES, ROOT, small_recipe, small_teacher

TINY = RECIPES / "tiny-test.yaml"


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def write_recipe(tmp_path, raw: dict, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def check(path) -> tuple[int, str]:
    """`compress recipe check PATH`: exit code and everything it printed."""
    res = CliRunner().invoke(main, ["recipe", "check", str(path)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, res.output


def refused(path, *needles: str) -> str:
    code, out = check(path)
    assert code == 2 and out.startswith("error:"), out
    for needle in needles:
        assert needle in out, out
    return out


# ---------------------------------------------------------------------------- 1. recipe files


def test_the_packaged_recipes_still_pass():
    for path in sorted(RECIPES.glob("*.yaml")):
        code, out = check(path)
        assert code == 0, out


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "latin-1", "cp1252"])
def test_a_recipe_that_is_not_utf8_is_refused_naming_the_encoding_or_line(tmp_path, encoding):
    text = TINY.read_text().replace("Tiny recipe", "Tiny récipe")
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode(encoding))
    out = refused(path, "UTF")
    assert "line 1" in out or "UTF-16" in out


def test_a_utf8_recipe_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + TINY.read_bytes())
    assert load_recipe(path).name == "tiny-test"


@pytest.mark.parametrize("levels", [MAX_YAML_DEPTH + 1, 450, 5000])
def test_deep_nesting_is_refused_before_python_recurses(tmp_path, levels):
    path = tmp_path / "r.yaml"
    path.write_text("name: " + "[" * levels + "]" * levels + "\n")
    refused(path, "nest")  # ours, or libyaml's own limit (1000) for the deepest
    block = min(levels, 450)  # block style: one line a level
    path.write_text("name:\n" + "".join(" " * i + "- \n" for i in range(1, block)))
    refused(path, "nested deeper than")


def alias_bomb(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 9, 12])
def test_an_alias_bomb_is_refused_with_a_short_message(tmp_path, levels):
    path = tmp_path / "r.yaml"
    path.write_text(alias_bomb(levels))
    assert len(path.read_bytes()) < 2000
    out = refused(path, "values (aliases expanded)")
    assert len(out) < 500


def test_deep_nesting_through_aliases_and_self_reference_are_refused(tmp_path):
    chain = ["a0: &a0 " + "[" * 20 + "]" * 20]
    chain += [f"a{i}: &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20 for i in range(1, 40)]
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(chain) + "\n")
    refused(path, "nested deeper than")
    path.write_text("name: &a [1, *a]\n")
    refused(path, "inside its own anchor")


def test_small_anchors_still_work(tmp_path):
    raw = TINY.read_text().replace("batch_sizes: [1, 2]", "batch_sizes: &b [1, 2]")
    path = tmp_path / "r.yaml"
    path.write_text(
        raw.replace("  seq_lengths: [32]\n", "  seq_lengths: [32]\n  batch_sizes: *b\n")
    )
    assert load_recipe(path).bench.batch_sizes == (1, 2)


def test_a_quoted_value_is_cut_to_a_few_dozen_characters(tmp_path):
    raw = tiny_raw()
    raw["train"]["lr"] = "x" * 100_000
    raw["data"]["y" * 10_000] = 1
    raw["target"]["layers"] = list(range(5_000))
    out = refused(write_recipe(tmp_path, raw), "train.lr", "target.layers", "unknown key")
    for line in out.splitlines():
        line = re.sub(r" \(known keys: [a-z_, ]*\)$", "", line)  # the schema's, not the input's
        assert len(line) < 2 * SHOWN_CHARS + 80, line


@pytest.mark.parametrize(
    "text,needle",
    [
        ("name: " + "9" * 5000 + "\n", "digits"),  # int() of 5000 digits: ValueError
        ("name: 2020-13-45\n", "month"),  # an impossible !!timestamp
        ("name: !!timestamp ''\n", "AttributeError"),  # found by the stress fuzz
        ("name: !!binary abc\n", "base64"),
        ("? [a, b]\n: 1\n", "unhashable"),
        ("a: b: c\n", "not valid YAML"),
        ("\x00\x01\x02", "NUL byte"),
        ("name: \x01\n", "not valid YAML"),
        ("[1, 2]\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_constructor_and_parser_errors_are_recipe_errors(tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    refused(path, needle)


@pytest.mark.parametrize(
    "path,needle",
    [("a" * 5000 + ".yaml", "cannot read"), ("x\x00y.yaml", "not found"), ("/", "not found")],
)
def test_unreadable_recipe_paths_are_refused(path, needle):
    with pytest.raises(RecipeError, match=needle) as err:
        load_recipe(path)
    assert len(str(err.value)) < 300


def test_a_huge_recipe_file_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY.read_text() + "#" * (2 << 20))
    refused(path, "larger than")


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        ("train", "seed", 2**64, "train.seed"),
        ("train", "seed", -1, "train.seed"),
        ("train", "adam_betas", [1.0, 0.5], "train.adam_betas.0"),
        ("train", "adam_betas", [0.9, -0.1], "train.adam_betas.1"),
        ("train", "adam_betas", [0.9, float("nan")], "train.adam_betas.1"),
        ("train", "steps", 2**70, "train.steps"),
        ("distill", "temperature", float("inf"), "distill.temperature"),
        ("distill", "hidden", float("nan"), "distill.hidden"),
        ("export", "atol", float("inf"), "export.atol"),
        ("export", "batch_sizes", [0], "export.batch_sizes.0"),
        ("export", "seq_lengths", [-4], "export.seq_lengths.0"),
        ("bench", "batch_sizes", [1, 10**9], "bench.batch_sizes.1"),
        ("bench", "seq_lengths", [0], "bench.seq_lengths.0"),
        ("output", "dir", "runs/\x00x", "NUL"),
        ("output", "dir", "runs/" + "d" * 300, "longer than 255"),
        ("zoo", "dir", "", "zoo.dir"),
        ("data", "files", ["a\x00.txt"], "NUL"),
        ("teacher", "id", "gt_all\x00minilm", "teacher"),
        ("teacher", "revision", "\ud800", "Unicode"),
    ],
)
def test_values_that_would_fail_later_are_refused_at_check(tmp_path, section, key, value, needle):
    raw = recipe_to_dict(load_recipe(TINY))
    raw[section][key] = value
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(raw)


def test_a_name_over_255_bytes_is_refused(tmp_path):
    raw = tiny_raw()
    raw["name"] = "n" * 256
    refused(write_recipe(tmp_path, raw), "name: String should have at most 255")


def test_sizes_beyond_the_teachers_positions_are_refused_at_check(tmp_path):
    raw = tiny_raw()
    raw["export"]["seq_lengths"] = [8, 513]
    raw["bench"]["seq_lengths"] = [600]
    raw["data"]["max_length"] = 1024
    out = refused(write_recipe(tmp_path, raw), "export.seq_lengths: 513", "bench.seq_lengths: 600")
    assert "data.max_length: 1024" in out and "512 positions" in out


def test_set_overrides_are_bounded_too():
    base = load_recipe(TINY)
    with pytest.raises(RecipeError, match="nested deeper"):
        with_overrides(base, ["train.seed=" + "[" * 100 + "]" * 100])
    with pytest.raises(RecipeError, match=r"train\.seed"):
        with_overrides(base, ["train.seed=-5"])
    with pytest.raises(RecipeError) as err:
        with_overrides(base, ["x" * 10_000])
    assert len(str(err.value)) < 300


def test_a_dotted_package_id_does_not_import_its_parent(tmp_path):
    """`this` prints the Zen of Python when imported; `recipe check` must only locate it."""
    raw = tiny_raw()
    raw["teacher"]["id"] = "this.model"
    path = write_recipe(tmp_path, raw)
    code = (
        "import sys; from click.testing import CliRunner; from compressor.cli.main import main;"
        f"r = CliRunner().invoke(main, ['recipe', 'check', {str(path)!r}]);"
        "print(r.exit_code, r.output); print('this' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "Beautiful is better" not in out.stdout + out.stderr
    assert out.stdout.startswith("2 error: teacher.id: no installed package named 'this.model'")
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("bad", ["a..b", "1abc", "gt-all", "a b"])
def test_a_package_id_must_be_a_dotted_identifier(tmp_path, bad):
    raw = tiny_raw()
    raw["teacher"]["id"] = bad
    refused(write_recipe(tmp_path, raw), "teacher.id", "not a package name")


# ---------------------------------------------------------------------------- 2. teacher and data


def local_teacher(tmp_path, config) -> str:
    d = tmp_path / "teacher"
    d.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (d / "config.json").write_text(text)
    return str(d)


@pytest.mark.parametrize(
    "config,needle",
    [
        ({}, "model_type None"),
        ([], "not a JSON object"),
        ("{not json", "cannot read"),
        ({"model_type": "bert", "num_attention_heads": 0}, "num_attention_heads is 0"),
        ({"model_type": "bert", "hidden_size": "big"}, "hidden_size is 'big'"),
        ({"model_type": "bert", "hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ],
)
def test_a_broken_local_teacher_config_is_one_error_and_no_run_dir(tmp_path, config, needle):
    raw = tiny_raw()
    raw["teacher"] = {"source": "local", "id": local_teacher(tmp_path, config)}
    raw["output"]["dir"] = str(tmp_path / "runs")
    path = write_recipe(tmp_path, raw)
    refused(path, needle)  # recipe check
    res = CliRunner().invoke(main, ["run", str(path), "--no-register"])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_a_teacher_config_with_a_non_utf8_byte_is_one_error(tmp_path):
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "config.json").write_bytes(b'{"model_type": "bert", "x": "\xff"}')
    from compressor.recipe import TeacherSpec

    with pytest.raises(TeacherError, match="cannot read"):
        read_teacher_config(TeacherSpec(source="local", id=str(d)))


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("c.txt", b"good text\n" * 50 + b"caf\xe9\n", r"c\.txt: line 51, column 4: byte 0xe9"),
        ("c.jsonl", b'{"text": "ok"}\n{"text": 5}\n', r"c\.jsonl: line 2: 'text' is 5"),
        ("c.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"line 2: a JSON list, not an object"),
        ("c.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"line 2: no 'text'"),
        ("c.jsonl", b'{"text": "ok"}\n{"text": \n', r"line 2: not JSON"),
        ("c.json", b"[1, 2", r"cannot read as json"),
    ],
)
def test_a_bad_corpus_is_one_data_error_and_no_run_dir(
    tmp_path, packaged_tokenizer, name, content, needle
):
    (tmp_path / name).write_bytes(content)
    raw = recipe_to_dict(small_recipe())
    raw["data"] = {"source": "files", "files": [str(tmp_path / name)], "max_length": 16,
                   "heldout": 3, "quality_texts": 0}  # fmt: skip
    recipe = parse_recipe(raw)
    out = tmp_path / "runs"
    with pytest.raises(DataError, match=needle):
        pipeline.run(recipe, out, teacher=small_teacher(packaged_tokenizer), register=False)
    assert not out.exists() or not any(out.rglob("*"))


def test_a_run_that_fails_after_training_started_keeps_its_directory(tmp_path):
    run_dir = tmp_path / "r" / "1"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("x")
    (run_dir / "metrics.jsonl").write_text("{}")
    assert not pipeline.discard_if_unstarted(run_dir) and run_dir.exists()
    (run_dir / "metrics.jsonl").unlink()
    assert pipeline.discard_if_unstarted(run_dir) and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- 3. task files


def rows_csv(n: int = 40) -> str:
    return "text,label\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(n))


def rows_jsonl(n: int = 40, label=lambda i: i % 2) -> list[str]:
    return [json.dumps({"text": f"review {i}", "label": label(i)}) for i in range(n)]


def load(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return load_task(str(path))


def test_well_formed_task_files_load(tmp_path):
    assert load(tmp_path, "a.csv", rows_csv()).label_names == ["neg", "pos"]
    assert load(tmp_path, "b.jsonl", "\n".join(rows_jsonl())).label_names == ["0", "1"]
    array = json.dumps([json.loads(r) for r in rows_jsonl()])
    assert load(tmp_path, "c.json", array).label_names == ["0", "1"]


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("a.csv", rows_csv().encode("utf-16"), r"a\.csv: line 1, column 1: byte 0xff"),
        ("a.csv", rows_csv().encode() + "é,pos\n".encode("latin-1"), r"line 42, column 1"),
        ("a.jsonl", "\n".join([*rows_jsonl(), "[1, 2]"]), r"line 41: a JSON list, not an object"),
        ("a.jsonl", "\n".join([*rows_jsonl(), '"x"']), r"line 41: a JSON str, not an object"),
        ("a.jsonl", "\n".join([*rows_jsonl(), '{"text": "t"}']), r"line 41: label .* missing"),
        ("a.jsonl", "\n".join([*rows_jsonl(), "{"]), r"line 41: not JSON \(line 1, column 2"),
        ("a.csv", rows_csv() + "only text\n", r"line 42: 1 fields where the header has 2"),
        ("a.csv", rows_csv(6), r"validation split of \d examples"),
        ("a.json", json.dumps([1, 2]), r"item 1: a JSON int, not an object"),
        ("a.json", "[{", r"not a JSON array \(line 1, column 3"),
        (
            "a.jsonl",
            "\n".join(rows_jsonl(label=lambda i: None if i == 7 else i % 2)),
            r"line 8: label column 'label' is missing or null",
        ),
        (
            "a.jsonl",
            "\n".join(rows_jsonl(label=lambda i: "one" if i == 3 else i % 2)),
            r"line 1: label 0 is a number where other rows have text",
        ),
        ("a.jsonl", "\n".join(rows_jsonl(label=lambda i: [i])), r"line 1: .*is \[0\]"),
        ("a.jsonl", "\n".join(rows_jsonl(label=lambda i: float("nan"))), r"NaN is not a JSON"),
        ("a.csv", "text,label\n" + " ,a\n" * 40, r"line 2: column 'text' is empty"),
        ("a.jsonl", '{"text": "", "label": 1}\n' * 40, r"line 1: column 'text' is empty"),
        ("a.jsonl", '{"text": 5, "label": 1}\n' * 40, r"line 1: column 'text' is 5, not text"),
        ("a.csv", rows_csv() + '"unterminated,pos\n', r"line \d+: not valid CSV"),
        ("a.csv", 'text,label\n"a"b,pos\n' + rows_csv()[11:], r"line 2: not valid CSV"),
        ("a.csv", "", r"no rows"),
    ],
)
def test_a_bad_task_file_is_one_data_error_naming_file_and_line(tmp_path, name, content, needle):
    with pytest.raises(DataError, match=needle) as err:
        load(tmp_path, name, content)
    assert str(tmp_path / name) in str(err.value) and err.value.exit_code == 2


def test_numeric_labels_are_one_class_per_value(tmp_path):
    task = load(tmp_path, "a.jsonl", "\n".join(rows_jsonl(label=lambda i: [1, 1.0, 2][i % 3])))
    assert task.label_names == ["1", "2"]
    csv_text = "text,label\n" + "".join(f"r {i},{['1', '1.0', '10'][i % 3]}\n" for i in range(60))
    assert load(tmp_path, "b.csv", csv_text).label_names == ["1", "10"]


def test_a_field_past_the_csv_modules_limit_loads(tmp_path):
    big = "w " * 100_000
    task = load(tmp_path, "a.csv", f"text,label\n{big},pos\n" + rows_csv()[11:])
    assert any(
        len(t) > 131_072 for t, _ in task.train.texts + task.test.texts + task.validation.texts
    )
