"""A zoo entry, a run directory and a model directory are untrusted input (issue 24): no file is
written outside its destination, no code runs without --trust-remote-code, no file is read from
outside its folder, no registered entry is changed, requests that would exhaust the machine are
refused before work starts, odd environments and malformed files are one clear error, and text
from an entry reaches a terminal escaped.

Every test here is one attack case; `pytest tests/reliability/test_untrusted.py -q` counts them
(docs/security.md gives the count before and after the fixes). Entries are built from small
synthetic run directories (no training) with the stored ONNX check stubbed out."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli.main import main
from compressor.errors import CompressError
from compressor.rundir import (
    BENCH_FILE,
    CARD_FILE,
    ENV_FILE,
    EVALS_FILE,
    HELDOUT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_DIR,
    ONNX_MODEL,
    PLAN_FILE,
    RECIPE_FILE,
    ST_MODULES_FILE,
    SUMMARY_FILE,
    VERIFY_FILE,
    ZOO_REPORT_FILE,
)
from compressor.zoo import store as zoo
from compressor.zoo.entry import content_hash, file_table, sha256_file
from tests.helpers import RECIPES

ROOT = Path(__file__).resolve().parents[2]
SECRET = "TOP-SECRET-CONTENTS-0xC0FFEE"
TRUST = "--trust-remote-code"


# ---------------------------------------------------------------------------- helpers


def tiny_onnx(salt: str) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", 8])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, ["batch_size", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])],
                              f"synthetic-{salt}", [x], [y])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def synthetic_run(dest: Path, salt: str, teacher: str = "all-minilm-l6-v2") -> Path:
    """A finished, verified run directory as far as the zoo can tell (no real model)."""
    (dest / MODEL_DIR).mkdir(parents=True)
    (dest / "onnx").mkdir()
    (dest / MODEL_DIR / "model.safetensors").write_bytes(os.urandom(256) + salt.encode())
    (dest / MODEL_DIR / "config.json").write_text("{}")
    (dest / ONNX_MODEL).write_bytes(tiny_onnx(salt))
    shutil.copyfile(RECIPES / "tiny-test.yaml", dest / RECIPE_FILE)
    shape = {"layers": 2, "hidden": 128, "heads": 4, "head_dim": 32, "ffn": 256}
    summary = {
        "recipe": "tiny-test",
        "teacher": teacher,
        "teacher_shape": {**shape, "layers": 6, "hidden": 384, "heads": 12, "ffn": 1536},
        "student_shape": shape,
        "teacher_params": 22_000_000,
        "student_params": 4_000_000,
        "checks": {},
        "discrepancy": {"final": 0.3},
        "steps": 8,
        "seconds": 1.0,
        "device": "cpu",
    }
    for name, data in [
        (SUMMARY_FILE, summary),
        (PLAN_FILE, {}),
        (VERIFY_FILE, {"passed": True}),
        (ENV_FILE, {}),
        (HELDOUT_FILE, [salt]),
        (BENCH_FILE, {"results": []}),
    ]:
        (dest / name).write_text(json.dumps(data))
    record = {"step": 1, "discrepancy": 0.5, "discrepancy_kind": "one_minus_similarity_spearman"}
    (dest / METRICS_FILE).write_text(json.dumps(record) + "\n")
    return dest


def sentence_run(dest: Path, salt: str, module_type: str, code: str | None) -> Path:
    """A run whose model is a sentence encoder with `module_type` as its pooling module and,
    when `code` is given, `evil.py` beside the model (writing a marker file when imported)."""
    run = synthetic_run(dest, salt)
    model = run / MODEL_DIR
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": module_type},
    ]
    (model / ST_MODULES_FILE).write_text(json.dumps(modules))
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (model / "onnx").mkdir()
    (model / "onnx" / "model.onnx").write_bytes(tiny_onnx(salt + "-st"))
    if code is not None:
        (model / "evil.py").write_text(code)
    return run


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\nclass Pooling: pass\n"


@pytest.fixture(autouse=True)
def _stored_onnx_check_passes(monkeypatch):
    monkeypatch.setattr(zoo, "onnx_check", lambda d: {"passed": True, "models": {}})


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "zoo"


@pytest.fixture
def entry(root, tmp_path) -> str:
    return zoo.register(synthetic_run(tmp_path / "run0", "0"), root)


def cli(*args: str, **kw):
    return CliRunner().invoke(main, list(args), **kw)


def refused(res, *phrases: str, code: int | None = None) -> str:
    """A clean `error: ...` exit (non-zero, no traceback) naming every phrase."""
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "error: " in res.output, res.output
    for phrase in phrases:
        assert phrase in res.output, res.output
    return res.output


def forge(root: Path, entry_id: str, files: dict[str, tuple[str, bytes]]) -> str:
    """A foreign entry made from `entry_id`: each manifest path -> (where the file really is in
    the entry, its content), a consistent id, the index rebuilt by `reindex` (which adopts it)."""
    d = zoo.entry_dir(root, entry_id)
    for path in d.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    for listed, (real, data) in files.items():
        target = d / real
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        manifest["files"][listed] = {"sha256": sha256_file(target), "bytes": len(data)}
    manifest.pop("registered_sha256", None)
    listing = {p: f for p, f in manifest["files"].items() if p != CARD_FILE}
    new_id = f"{entry_id.rsplit('/', 1)[0]}/{content_hash(listing)}"
    manifest["id"] = new_id
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    new_dir = zoo.entry_dir(root, new_id)
    new_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(d, new_dir)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    zoo.reindex(root)
    return new_id


def writable(d: Path) -> None:
    for path in d.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)


def snapshot(d: Path) -> dict[str, tuple[str | None, int]]:
    return {k: (v["sha256"], (d / k).lstat().st_mode) for k, v in file_table(d).items()}


# ---------------------------------------------------------------------------- 1. write anywhere


def test_export_refuses_a_manifest_path_with_dot_dot(root, entry, tmp_path):
    forged = forge(root, entry, {"onnx/../PLANTED": ("PLANTED", b"planted by the entry")})
    dest = tmp_path / "out" / "bundle"
    dest.parent.mkdir()
    res = cli("zoo", "export", forged, str(dest), "--zoo", str(root))
    refused(res, "onnx/../PLANTED", code=2)
    assert not (dest.parent / "PLANTED").exists() and not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_export_refuses_an_absolute_manifest_path(root, entry, tmp_path):
    target = tmp_path / "elsewhere" / "planted.txt"
    listed = f"onnx/{target}"  # onnx//abs/path
    forged = forge(root, entry, {listed: (f"onnx/{str(target).lstrip('/')}", b"planted")})
    res = cli("zoo", "export", forged, str(tmp_path / "bundle"), "--zoo", str(root))
    refused(res, str(target), code=2)
    assert not target.exists() and not (tmp_path / "bundle").exists()


def test_export_does_not_follow_a_link_out_of_the_entry(root, entry, tmp_path):
    """An entry file that is a link to a file outside (its sha256 forged to match) is refused."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    forged = forge(root, entry, {"onnx/vocab.txt": ("onnx/vocab.txt", SECRET.encode())})
    link = zoo.entry_dir(root, forged) / "onnx" / "vocab.txt"
    link.unlink()
    link.symlink_to(secret)
    res = cli("zoo", "export", forged, str(tmp_path / "bundle"), "--zoo", str(root))
    refused(res, "onnx/vocab.txt", "link", code=2)
    assert not (tmp_path / "bundle").exists()


def test_export_does_not_follow_a_linked_folder_in_the_entry(root, entry, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.json").write_text(SECRET)
    forged = forge(root, entry, {"onnx/sub/x.json": ("onnx/sub/x.json", SECRET.encode())})
    sub = zoo.entry_dir(root, forged) / "onnx" / "sub"
    shutil.rmtree(sub)
    sub.symlink_to(outside)
    res = cli("zoo", "export", forged, str(tmp_path / "bundle"), "--zoo", str(root))
    refused(res, "link", code=2)
    assert not (tmp_path / "bundle").exists()


def test_reindex_does_not_adopt_a_linked_entry_folder_or_an_entry_holding_a_link(
    root, entry, tmp_path
):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    outside = tmp_path / "outside-entry"
    shutil.copytree(zoo.entry_dir(root, entry), outside)
    linked = zoo.entry_dir(root, entry).parent / "0123456789"
    linked.symlink_to(outside)
    other = zoo.register(synthetic_run(tmp_path / "other", "o"), root)
    d = zoo.entry_dir(root, other)
    (d / "model" / "vocab.txt").symlink_to(secret)
    res = cli("zoo", "reindex", "--zoo", str(root))
    assert res.exit_code == 0, res.output
    ids = [r["id"] for r in zoo.list_entries(root)]
    assert ids == [entry] and f"skipped {other}" in res.output and "link" in res.output


def test_modules_json_pooling_path_cannot_leave_the_model(tmp_path):
    from compressor.deploy.sentence import sentence_spec

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    run = sentence_run(tmp_path / "run", "p", "sentence_transformers.models.Pooling", None)
    modules = json.loads((run / MODEL_DIR / ST_MODULES_FILE).read_text())
    modules[1]["path"] = "../../outside"
    (run / MODEL_DIR / ST_MODULES_FILE).write_text(json.dumps(modules))
    with pytest.raises(CompressError, match=r"\.\./\.\./outside"):
        sentence_spec(run / MODEL_DIR)


# ---------------------------------------------------------------------------- 2. code


def test_export_onnx_refuses_a_custom_sentence_module(tmp_path):
    marker = tmp_path / "ran"
    run = sentence_run(tmp_path / "run", "c", "evil.Pooling", marker_code(marker))
    res = cli("export", "--onnx", "--no-bench", str(run))
    refused(res, "evil.Pooling", TRUST, code=2)
    assert not marker.exists()


def real_sentence_model(tmp_path, tokenizer, code: str) -> Path:
    """A tiny real sentence encoder (seeded BERT, the packaged teacher's sentence-transformers
    files) whose Pooling module is `evil.Pooling`, defined by `code` in model/evil.py."""
    from compressor.prune.slim import save_slim_model
    from compressor.teacher import resolve_source, sentence_transformers_files
    from tests.helpers import PACKAGED, tiny_bert

    files = sentence_transformers_files(Path(resolve_source(PACKAGED)))
    files[ST_MODULES_FILE] = [
        {**m, "type": "evil.Pooling"} if m["type"].endswith(".Pooling") else m
        for m in files[ST_MODULES_FILE]
    ]
    model = tiny_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    model_dir = tmp_path / "model"
    save_slim_model(model, tokenizer, files, model_dir)
    (model_dir / "evil.py").write_text(code)
    return model_dir


def test_exporting_a_real_sentence_encoder_does_not_run_its_custom_module(
    tmp_path, packaged_tokenizer
):
    """The export's reference embeddings load the model with sentence-transformers, which
    imports a custom module from the model folder: refused before that, unless trusted."""
    from compressor.deploy.export import export_onnx, save_samples

    marker = tmp_path / "ran"
    code = (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from sentence_transformers.models import Pooling as _Pooling\n"
        "class Pooling(_Pooling):\n    pass\n"
    )
    model_dir = real_sentence_model(tmp_path, packaged_tokenizer, code)
    with pytest.raises(CompressError, match=r"evil\.Pooling.*--trust-remote-code"):
        export_onnx(model_dir, tmp_path / "onnx")
        save_samples(tmp_path / "onnx", model_dir, ["a text", "another"], (1,), (8,))
    assert not marker.exists()
    export_onnx(model_dir, tmp_path / "onnx2", trust_remote_code=True)  # asked for: it may run
    save_samples(tmp_path / "onnx2", model_dir, ["a text", "another"], (1,), (8,))
    assert marker.exists()


def test_sentence_spec_checks_the_whole_module_type(tmp_path):
    from compressor.deploy.sentence import sentence_spec

    run = sentence_run(tmp_path / "run", "s", "evil.Pooling", None)
    with pytest.raises(CompressError, match=r"evil\.Pooling.*--trust-remote-code"):
        sentence_spec(run / MODEL_DIR)
    assert sentence_spec(run / MODEL_DIR, trust_remote_code=True).pooling == "mean"


@pytest.mark.parametrize("module_type", ["evil.Pooling", "sentence_transformers.models.Pooling"])
def test_zoo_add_refuses_code_unless_trusted(module_type, root, tmp_path):
    marker = tmp_path / "ran"
    run = sentence_run(tmp_path / "run", "a", module_type, marker_code(marker))
    res = cli("zoo", "add", str(run), "--zoo", str(root))
    refused(res, "evil.py", TRUST, code=2)
    assert zoo.list_entries(root) == [] and not marker.exists()
    res = cli("zoo", "add", str(run), "--zoo", str(root), TRUST)
    assert res.exit_code == 0, res.output
    assert not marker.exists() and "warning: registered with code" in res.output


def test_zoo_verify_reports_code_in_an_entry(root, tmp_path):
    run = sentence_run(tmp_path / "run", "v", "evil.Pooling", "class Pooling: pass\n")
    entry_id = zoo.register(run, root, trust_remote_code=True)
    res = cli("zoo", "verify", entry_id, "--zoo", str(root))
    assert "evil.py" in res.output and "evil.Pooling" in res.output, res.output
    assert "code" in res.output


def test_a_sentence_bundle_does_not_ship_code_unless_trusted(root, tmp_path):
    run = sentence_run(tmp_path / "run", "b", "evil.Pooling", "class Pooling: pass\n")
    entry_id = zoo.register(run, root, trust_remote_code=True)
    dest = tmp_path / "bundle"
    res = cli("zoo", "export", entry_id, str(dest), "--format", "sentence-transformers",
              "--zoo", str(root))  # fmt: skip
    refused(res, "evil.Pooling", TRUST, code=2)
    assert not dest.exists()
    res = cli("zoo", "export", entry_id, str(dest), "--format", "sentence-transformers",
              "--zoo", str(root), TRUST)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (dest / "evil.py").is_file()


def test_a_py_file_beside_the_model_is_not_shipped(root, tmp_path):
    run = sentence_run(tmp_path / "run", "p", "sentence_transformers.models.Pooling", "x = 1\n")
    entry_id = zoo.register(run, root, trust_remote_code=True)
    dest = tmp_path / "bundle"
    res = cli("zoo", "export", entry_id, str(dest), "--format", "sentence-transformers",
              "--zoo", str(root))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert not (dest / "evil.py").exists()
    assert "evil.py" in res.output  # said what was left out


# ---------------------------------------------------------------------------- 3. read outside


def test_a_linked_model_card_is_not_read_into_the_report(root, entry, tmp_path):
    zoo.register(synthetic_run(tmp_path / "good", "g"), root)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    card = zoo.entry_dir(root, entry) / CARD_FILE
    card.unlink()
    card.symlink_to(secret)
    out = tmp_path / "report"
    res = cli("zoo", "report", "--out", str(out), "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert SECRET not in (out / ZOO_REPORT_FILE).read_text()
    assert "warning" in res.output and CARD_FILE in res.output and "link" in res.output


def test_a_linked_metrics_file_is_not_read_into_the_report(root, entry, tmp_path):
    zoo.register(synthetic_run(tmp_path / "good", "g"), root)
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"step": 1, "discrepancy": 0.5, "note": SECRET}) + "\n")
    metrics = zoo.entry_dir(root, entry) / METRICS_FILE
    metrics.unlink()
    metrics.symlink_to(secret)
    out = tmp_path / "report"
    res = cli("zoo", "report", "--out", str(out), "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and METRICS_FILE in res.output


def test_zoo_add_refuses_a_run_with_a_link_out(root, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    run = synthetic_run(tmp_path / "run", "l")
    (run / MODEL_DIR / "vocab.txt").symlink_to(secret)
    res = cli("zoo", "add", str(run), "--zoo", str(root))
    refused(res, "vocab.txt", "link", code=2)
    assert zoo.list_entries(root) == []


def test_zoo_show_does_not_read_a_linked_recipe(root, entry, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text(f"secret: {SECRET}\n")
    recipe = zoo.entry_dir(root, entry) / RECIPE_FILE
    recipe.unlink()
    recipe.symlink_to(secret)
    res = cli("zoo", "show", entry, "--zoo", str(root))
    assert SECRET not in res.output
    refused(res, RECIPE_FILE, "link")


# ---------------------------------------------------------------------------- 4. immutable


def test_eval_of_an_entry_folder_refuses_and_changes_nothing(root, entry):
    d = zoo.entry_dir(root, entry)
    before = snapshot(d)
    res = cli("eval", str(d), "--task", "wiki_topics", "--probe", "--no-teacher")
    refused(res, "zoo entry", entry, code=2)
    assert snapshot(d) == before and zoo.verify(root, entry)["passed"]


def test_report_into_an_entry_folder_refuses(root, entry):
    d = zoo.entry_dir(root, entry)
    before = snapshot(d)
    res = cli("zoo", "report", "--out", str(d), "--zoo", str(root))
    refused(res, "zoo entry", code=2)
    assert snapshot(d) == before and not (d / ZOO_REPORT_FILE).exists()
    res = cli("zoo", "report", "--out", str(d / "onnx" / "x"), "--zoo", str(root))
    refused(res, "zoo entry", code=2)


@pytest.mark.parametrize("command", [["export", "--onnx"], ["bench"], ["run", "--resume"]])
def test_run_directory_commands_refuse_an_entry_folder(command, root, entry):
    d = zoo.entry_dir(root, entry)
    before = snapshot(d)
    res = cli(*command, str(d))
    refused(res, "zoo entry", code=2)
    assert snapshot(d) == before


# ---------------------------------------------------------------------------- 5. resources


def check(*sets: str, flags: tuple[str, ...] = ()):
    args = [a for s in sets for a in ("--set", s)]
    return cli("recipe", "check", str(RECIPES / "tiny-test.yaml"), *args, *flags)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.steps=1e12", "train.steps"),
        ("train.steps=1000000000000", "train.steps"),
        ("train.batch_size=1000000000", "train.batch_size"),
        ("train.grad_accum=1000000000", "train.grad_accum"),
    ],
)
def test_requests_that_exhaust_the_machine_are_refused_at_check(override, needle):
    refused(check(override), needle, code=2)


def test_the_memory_estimate_is_checked_against_the_machine():
    res = check("train.batch_size=60000")
    refused(res, "memory", "--allow-large", code=2)
    assert check("train.batch_size=60000", flags=("--allow-large",)).exit_code == 0


def test_a_run_that_needs_more_memory_than_the_machine_starts_nothing(tmp_path):
    res = cli("run", str(RECIPES / "tiny-test.yaml"), "--output", str(tmp_path / "runs"),
              "--set", "train.batch_size=60000", "--no-register")  # fmt: skip
    refused(res, "memory", "--allow-large", code=2)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob(RECIPE_FILE))


def test_a_checkpoint_of_a_long_run_does_not_walk_every_remaining_step(monkeypatch):
    """Whether a pruning event remains (what a checkpoint asks, to store the importance EMA or
    not) looked at every remaining step: with train.steps in the millions the run spun there, deaf
    to Ctrl-C. Schedule.events_in answers without walking the steps."""
    from compressor.prune.schedule import Schedule
    from compressor.recipe import MAX_STEPS, load_recipe, with_overrides
    from compressor.shapes import Shape

    recipe = with_overrides(load_recipe(RECIPES / "tiny-test.yaml"), [f"train.steps={MAX_STEPS}"])
    full = Shape(6, 384, 12, 32, 1536)
    schedule = Schedule.of(recipe.pruning, full, recipe.target.shape())
    calls = []
    monkeypatch.setattr(Schedule, "is_event", lambda self, step: calls.append(step) or True)
    assert schedule.events_in(100, MAX_STEPS) is False
    assert schedule.events_in(0, MAX_STEPS) is True
    assert calls == []


def test_the_report_of_a_large_zoo_draws_a_bounded_number_of_curves(root, tmp_path, monkeypatch):
    """Each curve is a PNG inlined in the page (~0.3 s and ~50 kB): a zoo of 1,000 entries took
    6 minutes and 74 MB. Only the first MAX_CURVES entries get one."""
    from compressor.zoo import html_report

    monkeypatch.setattr(html_report, "MAX_CURVES", 2)
    for i in range(4):
        zoo.register(synthetic_run(tmp_path / f"run{i}", f"c{i}"), root)
    res = cli("zoo", "report", "--out", str(tmp_path / "r"), "--zoo", str(root))
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / ZOO_REPORT_FILE).read_text()
    assert page.count('<img class="curve"') == 2 and "first 2 entries only" in page


# ---------------------------------------------------------------------------- 6. environments


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "-3"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK"),
    ],
)
def test_bad_distributed_environment_variables_are_one_error(env, needle, monkeypatch):
    from compressor import distributed

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CompressError, match=needle):
        distributed.check_environment()


def test_world_size_abc_is_one_clear_error_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    res = cli("run", str(RECIPES / "tiny-test.yaml"), "--output", str(tmp_path / "r"))
    refused(res, "WORLD_SIZE", "abc", code=2)


def test_a_cache_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    from compressor.cache import cache_root

    bad = tmp_path / "cache-file"
    bad.write_text("x")
    monkeypatch.setenv("COMPRESS_CACHE", str(bad))
    with pytest.raises(CompressError, match="COMPRESS_CACHE"):
        cache_root()


def test_an_unusable_home_is_one_clear_error(tmp_path, monkeypatch):
    from compressor.cache import cache_root

    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.delenv("COMPRESS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(CompressError, match="COMPRESS_CACHE"):
        cache_root()


@contextlib.contextmanager
def read_only(top: Path):
    """Everything under `top` unwritable for this process for the duration: `chattr +i` when
    running as root (root writes through any mode bits), else chmod a-w."""
    paths = [p for p in [top, *top.rglob("*")] if not p.is_symlink()]
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root without chattr: cannot make a folder read-only")
        flags = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True)
        if flags.returncode:
            pytest.skip(f"chattr +i refused here: {flags.stderr.decode().strip()}")
        undo = ["chattr", "-i", *map(str, paths)]
    else:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(undo, check=True)
        else:
            for p, mode in modes.items():
                p.chmod(mode)


def test_a_read_only_zoo_can_be_listed_shown_verified_and_reported(root, entry, tmp_path):
    with read_only(root):
        for args in (["list"], ["show", entry], ["compare", entry], ["verify", entry]):
            res = cli("zoo", *args, "--zoo", str(root))
            assert res.exit_code == 0 and entry in res.output, res.output
        res = cli("zoo", "report", "--zoo", str(root), "--out", str(tmp_path / "r"))
        assert res.exit_code == 0, res.output
        assert (tmp_path / "r" / ZOO_REPORT_FILE).is_file()
        refused(cli("zoo", "rm", entry, "--zoo", str(root)), "read-only")
    assert zoo.verify(root, entry)["passed"]


def test_a_read_only_run_directory_is_one_error_not_a_traceback(tmp_path):
    run = synthetic_run(tmp_path / "run", "rr")
    with read_only(run):
        res = cli("export", "--onnx", "--no-bench", str(run))
    refused(res, str(run))


def test_an_unwritable_home_is_one_clear_error(tmp_path, monkeypatch):
    from compressor.cache import cache_root

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("COMPRESS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    with read_only(home), pytest.raises(CompressError, match="COMPRESS_CACHE"):
        cache_root()


# ---------------------------------------------------------------------------- 7. malformed files


@pytest.mark.parametrize(
    "name,data,field",
    [
        (SUMMARY_FILE, {"student_shape": "wide"}, "student_shape"),
        (SUMMARY_FILE, {"teacher": 42}, "teacher"),
        (SUMMARY_FILE, {"student_params": "many"}, "student_params"),
        (SUMMARY_FILE, {"discrepancy": [1, 2]}, "discrepancy"),
        (SUMMARY_FILE, {"quality": {"similarity_spearman": 0.9}}, "quality.texts"),
        (EVALS_FILE, {"evaluations": {"a": 1}}, "evaluations"),
        (EVALS_FILE, {"evaluations": [{"task": "t", "metric": "m", "student": 3}]}, "student"),
        (BENCH_FILE, {"results": "fast"}, "results"),
        (BENCH_FILE, {"results": [{"runtime": 1}]}, "results"),
    ],
)
def test_zoo_add_of_a_run_with_wrong_types_names_file_and_field(name, data, field, root, tmp_path):
    run = synthetic_run(tmp_path / "run", "t")
    path = run / name
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **data}))
    res = cli("zoo", "add", str(run), "--zoo", str(root))
    refused(res, name, field)
    assert zoo.list_entries(root) == []


def test_a_bad_metrics_line_is_named(root, tmp_path):
    run = synthetic_run(tmp_path / "run", "m")
    (run / METRICS_FILE).write_text('{"step": 1}\n["not", "a", "record"]\n')
    res = cli("zoo", "add", str(run), "--zoo", str(root))
    refused(res, METRICS_FILE, "line 2")


def test_one_bad_entry_does_not_sink_the_report(root, entry, tmp_path):
    good = zoo.register(synthetic_run(tmp_path / "good", "g"), root)
    d = zoo.entry_dir(root, entry)
    (d / BENCH_FILE).chmod(0o644)
    (d / BENCH_FILE).write_text(json.dumps({"results": [{"runtime": "onnxruntime"}]}))
    out = tmp_path / "report"
    res = cli("zoo", "report", "--out", str(out), "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and entry in res.output and BENCH_FILE in res.output
    page = (out / ZOO_REPORT_FILE).read_text()
    assert good in page


def test_mathtext_in_a_teacher_name_does_not_crash_the_report(root, tmp_path):
    run = synthetic_run(tmp_path / "run", "x", teacher="$\\frac{1}{$ bad ^_^")
    summary = json.loads((run / SUMMARY_FILE).read_text())
    summary["quality"] = {"similarity_spearman": 0.9, "neighbour_top1": 0.8, "texts": 32}
    (run / SUMMARY_FILE).write_text(json.dumps(summary))
    zoo.register(run, root)
    d = zoo._entry_dirs(root)[0]
    (d / BENCH_FILE).chmod(0o644)
    point = {"runtime": "onnxruntime", "batch": 1, "seq": 32, "student_ms": {"p50": 1.0},
             "teacher_ms": {"p50": 2.0}}  # fmt: skip
    (d / BENCH_FILE).write_text(json.dumps({"results": [point]}))
    res = cli("zoo", "report", "--out", str(tmp_path / "report"), "--zoo", str(root))
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------- 8. terminals, locks


def test_escape_sequences_in_a_teacher_name_reach_the_terminal_escaped(root, tmp_path):
    forged_name = "bert\x1b[2K\rFORGED ROW\nnext\u202e"
    zoo.register(synthetic_run(tmp_path / "run", "e", teacher=forged_name), root)
    for command in (["list"], ["show", zoo.list_entries(root)[0]["id"]]):
        res = cli("zoo", *command, "--zoo", str(root))
        assert res.exit_code == 0, res.output
        assert "\x1b" not in res.output and "\r" not in res.output and "\u202e" not in res.output
        assert "\\x1b" in res.output
        assert not any(line.startswith("FORGED") for line in res.output.splitlines())


def test_a_second_process_on_one_run_directory_is_refused(tmp_path):
    from compressor.rundir import lock_run_dir

    run = synthetic_run(tmp_path / "run", "k")
    with lock_run_dir(run), pytest.raises(CompressError, match="another process"):  # noqa: SIM117
        with lock_run_dir(run):
            pass
    with lock_run_dir(run):  # released
        pass


@pytest.mark.parametrize("command", [["run", "--resume"], ["export", "--onnx"], ["bench"]])
def test_a_run_directory_in_use_by_another_process_is_refused(command, tmp_path):
    run = synthetic_run(tmp_path / "run", "k")
    fd = os.open(run, os.O_RDONLY)  # what another compress process holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = cli(*command, str(run))
    finally:
        os.close(fd)
    refused(res, "another process", str(run))


def test_a_crashed_holder_leaves_no_stuck_lock(tmp_path):
    from compressor.rundir import lock_run_dir

    run = synthetic_run(tmp_path / "run", "k")
    code = (
        "import os, sys\nfrom compressor.rundir import lock_run_dir\n"
        f"lock_run_dir({str(run)!r}).__enter__()\nos._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False)
    with lock_run_dir(run):
        pass


# ---------------------------------------------------------------------------- 9. --set


@pytest.mark.parametrize(
    "override", ["train.steps=true", "train.log_every=true", "train.lr=false", "export.int8=1"]
)
def test_set_parses_values_with_the_recipes_types(override):
    refused(check(override), override.split("=")[0], "--set", code=2)
    assert "true or false" in check(override).output or "boolean" in check(override).output


def test_control_set_refuses_a_string_for_a_number():
    refused(check("train.lr=fast"), "train.lr", code=2)


def test_set_accepts_a_top_level_key():
    res = check("name=renamed")
    assert res.exit_code == 0, res.output
    assert "name: renamed" in res.output


def test_control_set_still_refuses_an_unknown_key():
    refused(check("nosuch=1"), "nosuch", code=2)
    refused(check("train.nosuch=1"), "nosuch", code=2)


def test_control_a_plain_entry_still_exports(root, entry, tmp_path):
    """Control (not an attack): the checks refuse only what they should."""
    res = cli("zoo", "export", entry, str(tmp_path / "bundle"), "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bundle" / "model.onnx").is_file()
