"""The zoo under faults (issue 12): a damaged, empty or missing index, a re-signed manifest, an
evaluation record that fails midway, a full disk, and `rm` racing `verify`. Each fault ends in one
clear message (no traceback), temporary files are removed, earlier entries stay intact, and
nothing is trusted that was not trusted before.

Entries are built from small synthetic run directories (no training), and the stored ONNX check
is stubbed out: what is under test is the zoo's bookkeeping, not onnxruntime."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli.main import main
from compressor.errors import CheckFailed, RunDirError, ZooError
from compressor.rundir import (
    BENCH_FILE,
    CARD_FILE,
    ENV_FILE,
    HELDOUT_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    ONNX_MODEL,
    PLAN_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    VERIFY_FILE,
    ZOO_INDEX_FILE,
    evals_path,
)
from compressor.zoo import index as zoo_index
from compressor.zoo import store as zoo
from compressor.zoo.entry import file_table
from tests.helpers import RECIPES

WEIGHTS = f"{MODEL_DIR}/model.safetensors"
EVALUATION = {
    "task": "wiki_topics",
    "mode": "probe",
    "metric": "accuracy",
    "student": {"mean": 0.8, "std": 0.0, "per_seed": [0.8]},
}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def tiny_onnx(salt: str) -> bytes:
    """A real (Identity) ONNX graph: the manifest reads every ONNX file's opset and io ports."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", 8])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, ["batch_size", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])],
                              f"synthetic-{salt}", [x], [y])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def synthetic_run(dest: Path, salt: str) -> Path:
    """A finished, verified run directory as far as the zoo can tell (no real model)."""
    (dest / MODEL_DIR).mkdir(parents=True)
    (dest / "onnx").mkdir()
    (dest / WEIGHTS).write_bytes(os.urandom(4096) + salt.encode())
    (dest / MODEL_DIR / "config.json").write_text("{}")
    (dest / ONNX_MODEL).write_bytes(tiny_onnx(salt))
    shutil.copyfile(RECIPES / "tiny-test.yaml", dest / RECIPE_FILE)
    shape = {"layers": 2, "hidden": 128, "heads": 4, "head_dim": 32, "ffn": 256}
    summary = {
        "recipe": "tiny-test",
        "teacher": "all-minilm-l6-v2",
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
        (BENCH_FILE, {"results": [{"runtime": "onnxruntime", "speedup_p50": 3.0}]}),
    ]:
        (dest / name).write_text(json.dumps(data))
    return dest


@pytest.fixture(autouse=True)
def _stored_onnx_check_passes(monkeypatch):
    monkeypatch.setattr(zoo, "onnx_check", lambda d: {"passed": True, "models": {}})


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "zoo"


@pytest.fixture
def two(root, tmp_path) -> list[str]:
    """Two registered entries."""
    return [zoo.register(synthetic_run(tmp_path / f"run{i}", str(i)), root) for i in range(2)]


def cli(*args: str):
    return CliRunner().invoke(main, ["zoo", *args])


def clean_error(res, code: int, *phrases: str) -> str:
    """An `error: ...` exit with `code`, each phrase in the message and no traceback."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "error: " in res.output
    for phrase in phrases:
        assert phrase in res.output, res.output
    return res.output


def index_files(root: Path) -> list[Path]:
    return [Path(f"{root / ZOO_INDEX_FILE}{s}") for s in ("", "-wal", "-shm")]


def delete_index(root: Path) -> None:
    for path in index_files(root):
        path.unlink(missing_ok=True)


def damage_index(root: Path, how: str) -> None:
    delete_index(root)
    if how == "garbage":
        (root / ZOO_INDEX_FILE).write_bytes(os.urandom(8192))
    elif how == "empty":
        (root / ZOO_INDEX_FILE).write_bytes(b"")


def ids(root: Path) -> list[str]:
    return sorted(r["id"] for r in zoo.list_entries(root))


def all_verify(root: Path) -> bool:
    return zoo.verify_zoo(root, None)["passed"]


def no_temporaries(root: Path) -> bool:
    leftovers = [p for p in root.glob(f".{ZOO_INDEX_FILE}.tmp-*")]
    return not leftovers and not list((root / zoo.STAGING).glob("*"))


def re_sign(d: Path) -> None:
    """What a careless tool (or a hand) does: change a file, then rewrite the manifest to match."""
    (d / WEIGHTS).chmod(0o644)
    (d / WEIGHTS).write_bytes(b"other weights")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    manifest["files"] = file_table(d)
    (d / MANIFEST_FILE).chmod(0o644)
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------- 1. damaged index


@pytest.mark.parametrize("how", ["garbage", "empty", "missing"])
@pytest.mark.parametrize("command", [["list"], ["show", "SHORT"], ["verify", "--all"]])
def test_a_damaged_or_missing_index_is_one_clear_error(how, command, two, root):
    damage_index(root, how)
    args = [two[0].rsplit("/", 1)[1] if a == "SHORT" else a for a in command]
    clean_error(cli(*args, "--zoo", str(root)), 2, str(root / ZOO_INDEX_FILE), "zoo reindex")


@pytest.mark.parametrize("how", ["garbage", "empty", "missing"])
def test_reindex_repairs_a_damaged_or_missing_index(how, two, root):
    damage_index(root, how)
    res = cli("reindex", "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert "indexed 2 entries" in res.output and "not trusted" not in res.output
    assert ("moved the damaged index aside" in res.output) == (how != "missing")
    assert ids(root) == sorted(two) and all_verify(root) and no_temporaries(root)
    assert cli("list", "--zoo", str(root)).exit_code == 0


# ---------------------------------------------------------------------------- 2. missing index


def test_registering_into_a_zoo_whose_index_was_deleted_refuses(two, root, tmp_path):
    delete_index(root)
    new = synthetic_run(tmp_path / "new", "new")
    with pytest.raises(ZooError, match=r"index is missing.*compress zoo reindex"):
        zoo.register(new, root)
    assert not (root / ZOO_INDEX_FILE).exists()  # never an index of the new entry alone
    assert len(zoo._entry_dirs(root)) == 2 and no_temporaries(root)
    zoo.reindex(root)
    third = zoo.register(new, root)
    assert ids(root) == sorted([*two, third]) and all_verify(root)


def test_a_run_whose_onnx_file_does_not_parse_is_not_registered(two, root, tmp_path):
    """The manifest reads each ONNX file's opset and io ports: a file that is not ONNX is named
    (exit 3 from the CLI), and nothing is registered or left in staging."""
    bad = synthetic_run(tmp_path / "bad", "bad")
    (bad / ONNX_MODEL).write_bytes(b"not onnx at all")
    res = CliRunner().invoke(main, ["zoo", "add", str(bad), "--zoo", str(root)])
    assert res.exit_code == 3 and "onnx/model.onnx: not a readable ONNX file" in res.output
    assert "Traceback" not in res.output
    assert ids(root) == sorted(two) and no_temporaries(root)


# ---------------------------------------------------------------------------- 3. trust


@pytest.mark.parametrize("index", ["sound", "deleted", "garbage"])
def test_reindex_does_not_adopt_a_re_signed_manifest(index, two, root):
    bad, good = two
    re_sign(zoo.entry_dir(root, bad))
    if index != "sound":
        damage_index(root, index if index == "garbage" else "missing")
    res = cli("reindex", "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert f"not trusted: {bad}" in res.output and good not in res.output.split("indexed")[1]
    failed = cli("verify", "--all", "--zoo", str(root))
    out = clean_error(failed, 3, bad)
    expected = "do not hash to the id" if index != "sound" else f"{WEIGHTS}: modified"
    assert expected in out and f"{good}: ok" in out
    assert zoo.verify(root, good)["passed"] and not zoo.verify(root, bad)["passed"]


# ---------------------------------------------------------------------------- 4. evaluations


@pytest.mark.parametrize("fail_after", [1, 2, "index row"])
def test_recording_an_evaluation_is_all_or_nothing(fail_after, two, root, monkeypatch):
    """Disk full after 1 or 2 of the 3 files were replaced, or when the index row is written
    (all three replaced): the entry is left exactly as it was."""
    entry = two[0]
    d = zoo.entry_dir(root, entry)
    before = {p: p.read_bytes() for p in (evals_path(d), d / CARD_FILE, d / MANIFEST_FILE)}
    row = zoo.get_entry(root, entry)
    real, into_entry, failed = os.replace, [], []

    def replace(src, dst):  # fails once, after `fail_after` files were replaced in the entry
        if Path(dst).parent == d and len(into_entry) == fail_after and not failed:
            failed.append(dst)
            raise ENOSPC
        real(src, dst)
        if Path(dst).parent == d:
            into_entry.append(dst)

    def row_fails(conn, row):
        failed.append(row)
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m, pytest.raises(ZooError, match=r"disk is full"):
        m.setattr(zoo.os, "replace", replace)
        if fail_after == "index row":
            m.setattr(zoo_index, "replace", row_fails)
        zoo.record_evaluation(root, entry, EVALUATION)
    swapped = 3 if fail_after == "index row" else fail_after
    assert failed and len(into_entry) == 2 * swapped  # failed midway: replaced, then put back
    assert {p: p.read_bytes() for p in before} == before
    assert zoo.get_entry(root, entry) == row and zoo.verify(root, entry)["passed"]
    assert no_temporaries(root)
    assert zoo.record_evaluation(root, entry, EVALUATION)["quality"].startswith("wiki_topics")
    assert zoo.verify(root, entry)["passed"]


def test_an_entry_whose_files_do_not_verify_records_no_evaluation(two, root, monkeypatch):
    from compressor.evaluate import evaluation

    d = zoo.entry_dir(root, two[0])
    (d / WEIGHTS).chmod(0o644)
    (d / WEIGHTS).write_bytes(b"tampered")
    manifest = (d / MANIFEST_FILE).read_bytes()
    with pytest.raises(CheckFailed, match=rf"does not verify.*\n  {WEIGHTS}: modified"):
        zoo.record_evaluation(root, two[0], EVALUATION)
    assert (d / MANIFEST_FILE).read_bytes() == manifest
    monkeypatch.setattr(evaluation, "evaluate_dir", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(CheckFailed, match=rf"{WEIGHTS}: modified"):  # refused before evaluating
        evaluation.evaluate_target(two[0], ["wiki_topics"], None, [0], zoo_dir=root)


# ---------------------------------------------------------------------------- 5. disk full


def test_a_full_disk_during_registration(two, root, tmp_path, monkeypatch):
    run, real = synthetic_run(tmp_path / "new", "new"), shutil.copyfile

    def copyfile(src, dst, *a, **k):
        if str(src).endswith(WEIGHTS):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", copyfile)
        res = cli("add", str(run), "--zoo", str(root))
        clean_error(res, 2, "disk is full", f"compress zoo add {run}", "finished and unchanged")
        with pytest.raises(ZooError, match=rf"compress zoo add {run}"):  # as `compress run` says
            zoo.register(run, root)
    assert ids(root) == sorted(two) and len(zoo._entry_dirs(root)) == 2
    assert all_verify(root) and no_temporaries(root)


def test_resuming_a_finished_run_points_to_zoo_add(tmp_path):
    from compressor import pipeline

    run = synthetic_run(tmp_path / "run", "r")
    summary = json.loads((run / SUMMARY_FILE).read_text())
    (run / SUMMARY_FILE).write_text(json.dumps({**summary, "export": {"verify": {}}}))  # exported
    with pytest.raises(RunDirError, match=rf"already finished.*compress zoo add {run}"):
        pipeline.resume(run)


def test_a_full_disk_during_export(two, root, tmp_path, monkeypatch):
    real, calls = shutil.copyfile, []

    def copyfile(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    dest = tmp_path / "bundle"
    clean_error(cli("export", two[0], str(dest), "--zoo", str(root)), 2, "disk is full", str(dest))
    assert len(calls) == 2 and not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []
    assert all_verify(root)


@pytest.mark.parametrize("index", ["sound", "garbage"])
def test_a_full_disk_during_reindex(index, two, root, monkeypatch):
    if index != "sound":
        damage_index(root, index)
    before = (root / ZOO_INDEX_FILE).read_bytes()

    def insert(conn, row):
        raise sqlite3.OperationalError("database or disk is full")

    def fsync(fd):
        raise ENOSPC

    with monkeypatch.context() as m:
        if index == "sound":  # rewritten in one transaction
            m.setattr(zoo_index, "insert", insert)
        else:  # a new index built under a temporary name
            m.setattr(zoo_index.os, "fsync", fsync)
        clean_error(cli("reindex", "--zoo", str(root)), 2, "disk is full", str(root))
    assert no_temporaries(root)
    if index == "sound":
        assert ids(root) == sorted(two) and all_verify(root)
    else:  # the damaged index is still where it was, for the next reindex to repair
        assert (root / ZOO_INDEX_FILE).read_bytes() == before
        assert zoo.reindex(root)["entries"] == 2 and all_verify(root)


# ---------------------------------------------------------------------------- 6. rm racing verify


@pytest.mark.parametrize("race", ["rm committed", "directory gone"])
def test_an_entry_removed_while_verify_runs(race, two, root, monkeypatch):
    listed = zoo.list_entries

    def list_then_remove(r):
        rows = listed(r)
        if race == "rm committed":
            zoo.remove(r, two[0])
        else:  # as seen inside rm's transaction: the row still there, the directory moved out
            shutil.rmtree(zoo.entry_dir(r, two[0]))
        return rows

    monkeypatch.setattr(zoo, "list_entries", list_then_remove)
    res = cli("verify", "--all", "--zoo", str(root))
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit | None)
    assert f"{two[1]}: ok" in res.output
    if race == "rm committed":
        assert res.exit_code == 0, res.output
        assert f"{two[0]}: removed while being verified" in res.output
    else:
        clean_error(res, 3, f"{two[0]}: FAILED", "entry directory is missing")


def test_an_entry_removed_while_its_files_are_hashed(two, root, monkeypatch):
    """The directory goes between verify's first look and the hashing of its files (`rm` renames
    it out midway): the entry fails with that said, the others verify, no traceback."""
    from compressor.zoo import entry as zoo_entry

    d, real = zoo.entry_dir(root, two[0]), zoo_entry.sha256_file

    def hash_after_rm(path):
        if Path(path).is_relative_to(d) and d.exists():
            shutil.rmtree(d)
        return real(path)

    monkeypatch.setattr(zoo_entry, "sha256_file", hash_after_rm)
    res = cli("verify", "--all", "--zoo", str(root))
    clean_error(res, 3, f"{two[0]}: FAILED", "vanished while being checked")
    assert f"{two[1]}: ok" in res.output
