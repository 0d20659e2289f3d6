"""The local model zoo: registration of a real tiny run, ids, the index, verification, export and
the CLI; concurrent registrations, a registration killed midway, tampering, reindexing, gates."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compressor.errors import CheckFailed, ZooError
from compressor.gates import gate_failures
from compressor.recipe import GatesSpec
from compressor.rundir import MANIFEST_FILE as MANIFEST
from compressor.zoo import index as zoo_index
from compressor.zoo import store as zoo
from compressor.zoo.entry import entry_row, file_table
from tests.helpers import EVALUATION, ROOT, distinct_copy, zoo_cli

TINY_ID = re.compile(r"all-minilm-l6-v2/homodistil/2L-128H-4A-256I/[0-9a-f]{10}")


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run.run_dir


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "zoo"


@pytest.fixture
def entry(run_dir, root) -> str:
    return zoo.register(run_dir, root)


def rows(root: Path) -> list[dict]:
    with zoo_index.reader(root) as conn:
        return zoo_index.all_rows(conn)


def integrity(root: Path) -> str:
    with zoo_index.reader(root) as conn:
        return zoo_index.integrity(conn)


def flip_byte(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ---------------------------------------------------------------------------- registration


def test_the_run_registered_itself(tiny_run):
    """`compress run` ends by registering the verified result in the zoo ($COMPRESS_ZOO here)."""
    entry_id = tiny_run.summary["zoo_id"]
    assert TINY_ID.fullmatch(entry_id)
    session_zoo = Path(os.environ["COMPRESS_ZOO"])
    assert entry_id in [r["id"] for r in zoo.list_entries(session_zoo)]
    res = zoo_cli("list", "--zoo", str(session_zoo))
    assert res.exit_code == 0 and entry_id in res.output
    recipe = yaml.safe_load((tiny_run.run_dir / "recipe.yaml").read_text())
    assert recipe["zoo"] == {"register": True, "dir": None}
    assert set(recipe["gates"]) == {
        "max_params",
        "min_speedup",
        "max_discrepancy",
        "max_quality_drop",
    }


def test_entry_layout_manifest_and_card(entry, root, run_dir):
    d = zoo.entry_dir(root, entry)
    assert d == (root / "entries" / entry).resolve()
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert files == file_table(d)
    assert {
        "README.md",
        "recipe.yaml",
        "plan.json",
        "metrics.jsonl",
        "evaluations.json",
        "summary.json",
        "benchmark.json",
        "verify.json",
        "environment.json",
        "heldout.json",
        "discrepancy.png",
        "onnx/model.onnx",
        "onnx/samples.safetensors",
        "onnx/tokenizer.json",
        "model/model.safetensors",
        "model/config.json",
        "model/modules.json",
        "model/onnx/model.onnx",
    } <= set(files)
    assert files["onnx/model.onnx"]["bytes"] == (run_dir / "onnx" / "model.onnx").stat().st_size
    assert all((d / p).stat().st_mode & 0o222 == 0 for p in files)  # sealed: read-only
    assert json.loads((d / "evaluations.json").read_text()) == {"evaluations": []}
    card = (d / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "all-minilm-l6-v2"
    assert meta["library_name"] == "sentence-transformers"  # the teacher is a sentence encoder
    assert meta["pipeline_tag"] == "sentence-similarity"
    assert meta["tags"] == [
        "homodistil", "distillation", "pruning", "onnx",
        "sentence-transformers", "feature-extraction", "sentence-similarity",
    ]  # fmt: skip
    assert 'SentenceTransformer("ST_DIR", backend="onnx")' in card
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metric["type"] == "discrepancy" and metric["value"] == summary["discrepancy"]["final"]
    row = rows(root)[0]
    assert row == entry_row(d)
    assert row["params"] == summary["student_params"] and row["shape"] == "2L-128H-4A-256I"
    assert row["speedup"] == summary["benchmark"]["onnxruntime_b1_t32"]["speedup_p50"]


def test_registering_the_same_run_again_gives_the_same_id(entry, run_dir, root):
    assert zoo.register(run_dir, root) == entry
    assert [r["id"] for r in rows(root)] == [entry]
    assert not list((root / ".staging").iterdir())


def test_an_unverified_run_is_not_registered(run_dir, root, tmp_path):
    bad = distinct_copy(run_dir, tmp_path / "bad", "x")
    (bad / "verify.json").unlink()
    (bad / "verify.json").write_text(json.dumps({"passed": False, "reports": []}))
    with pytest.raises(CheckFailed, match="verification did not pass"):
        zoo.register(bad, root)
    assert zoo.list_entries(root) == []


# ---------------------------------------------------------------------------- CLI


def test_cli_list_show_verify_compare(entry, root):
    z = ["--zoo", str(root)]
    res = zoo_cli("list", *z)
    assert res.exit_code == 0, res.output
    header, _, line = res.output.splitlines()[:3]
    assert header.split() == [
        "id",
        "teacher",
        "shape",
        "params",
        "size",
        "speedup",
        "quality",
        "created",
    ]
    assert (
        line.startswith(entry) and "4.25M" in line and "similarity to teacher" in line
    )  # measured on what ships
    listed = json.loads(zoo_cli("list", *z, "--json").stdout)
    assert [r["id"] for r in listed] == [entry] and listed[0]["params"] == 4254336

    shown = zoo_cli("show", entry, *z)
    assert shown.exit_code == 0 and "recipe (resolved)" in shown.output
    assert "benchmark" in shown.output and "onnx/model.onnx" in shown.output
    info = json.loads(zoo_cli("show", entry, *z, "--json").stdout)
    assert info["recipe_resolved"]["name"] == "tiny-test" and info["benchmark"]["results"]
    assert info["files"]["onnx/model.onnx"]["sha256"]

    short = entry.rsplit("/", 1)[1][:6]  # a unique short-hash prefix resolves
    res = zoo_cli("verify", short, *z)
    assert res.exit_code == 0, res.output
    assert f"{entry}: ok" in res.output
    report = json.loads(zoo_cli("verify", "--all", *z, "--json").stdout)
    assert report["passed"] and report["entries"][0]["onnx"]["models"]["model.onnx"]["passed"]

    both = json.loads(zoo_cli("compare", entry, short, *z, "--json").stdout)
    assert [r["id"] for r in both] == [entry, entry]
    table = zoo_cli("compare", entry, short, *z).output
    assert "#1" in table and "#2" in table and "speedup" in table


def test_list_of_an_empty_or_missing_zoo_is_friendly(tmp_path):
    missing = tmp_path / "nowhere"
    res = zoo_cli("list", "--zoo", str(missing))
    assert res.exit_code == 0 and "empty" in res.output
    assert json.loads(zoo_cli("list", "--zoo", str(missing), "--json").stdout) == []
    assert not missing.exists()  # reading creates nothing


def test_unknown_id_exits_2(entry, root):
    res = zoo_cli("show", "no-such/homodistil/1L-1H-1A-1I/0000000000", "--zoo", str(root))
    assert res.exit_code == 2 and "no entry" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "bad",
    [
        "../outside",
        "a/../../b",
        "/etc/passwd",
        "a//b",
        "",
        "a/",
        ".hidden",
        "a/./b",
        "a/b/c/d/e",
        "a b",
        "a\\..\\b",
    ],
)
@pytest.mark.parametrize("command", ["show", "verify", "rm", "export", "compare"])
def test_ids_that_could_escape_are_rejected(bad, command, root, tmp_path):
    args = [command, bad] + ([str(tmp_path / "out")] if command == "export" else [])
    res = zoo_cli(*args, "--zoo", str(root))
    assert res.exit_code == 2, res.output
    assert "invalid zoo id" in res.output and repr(bad) in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_entry_dir_refuses_paths_outside_the_zoo(root):
    for bad in ("../x", "/abs/path", "a/../../../etc"):
        with pytest.raises(ZooError, match="invalid zoo id"):
            zoo.entry_dir(root, bad)


def test_manifest_records_each_onnx_files_opset_and_io_ports(entry, root):
    """As the ONNX Model Hub's manifest does: per ONNX file, the opset and every input and output
    (name, dtype, shape with dynamic axes), read back here with onnx.load and onnxruntime."""
    import onnx
    from onnx import helper

    from compressor.deploy.runtime import ort_session

    d = zoo.entry_dir(root, entry)
    manifest = json.loads((d / MANIFEST).read_text())
    onnx_files = sorted(p for p in manifest["files"] if p.endswith(".onnx"))
    assert onnx_files == ["model/onnx/model.onnx", "onnx/model.onnx"]
    assert sorted(manifest["onnx"]) == onnx_files
    for rel in onnx_files:
        sig, model = manifest["onnx"][rel], onnx.load(d / rel)
        opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        assert sig["opset_version"] == opsets["ai.onnx"] and sig["opset_import"] == opsets
        assert sig["ir_version"] == model.ir_version
        sess = ort_session(d / rel)
        for ports, values, ort_ports in (
            (sig["io_ports"]["inputs"], model.graph.input, sess.get_inputs()),
            (sig["io_ports"]["outputs"], model.graph.output, sess.get_outputs()),
        ):
            assert [p["name"] for p in ports] == [v.name for v in values]
            assert [p["name"] for p in ports] == [p.name for p in ort_ports]
            assert [p["type"] for p in ports] == [p.type for p in ort_ports]  # 'tensor(int64)'
            for port, value in zip(ports, values, strict=True):
                t = value.type.tensor_type
                dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
                assert port["type"] == f"tensor({'float' if dtype == 'float32' else dtype})"
                dims = [x.dim_param if x.dim_param else x.dim_value for x in t.shape.dim]
                assert port["shape"] == dims
                assert port["dynamic_axes"] == {
                    str(i): x.dim_param for i, x in enumerate(t.shape.dim) if x.dim_param
                }
    inputs = manifest["onnx"]["onnx/model.onnx"]["io_ports"]["inputs"]
    assert inputs[0] == {
        "name": "input_ids",
        "type": "tensor(int64)",
        "shape": ["batch_size", "sequence_length"],
        "dynamic_axes": {"0": "batch_size", "1": "sequence_length"},
    }
    outputs = manifest["onnx"]["model/onnx/model.onnx"]["io_ports"]["outputs"]
    assert [(o["name"], o["shape"]) for o in outputs] == [
        ("last_hidden_state", ["batch_size", "sequence_length", 128]),
        ("token_embeddings", ["batch_size", "sequence_length", 128]),
        ("sentence_embedding", ["batch_size", 128]),
    ]


def test_card_library_and_pipeline_by_model_kind(run_dir):
    from compressor.zoo.card import model_card

    summary = json.loads((run_dir / "summary.json").read_text())
    for task, sentence, want in [
        ("feature-extraction", True, ("sentence-transformers", "sentence-similarity")),
        ("fill-mask", False, ("transformers", "fill-mask")),
        ("feature-extraction", False, ("transformers", "feature-extraction")),
    ]:
        card = model_card("t/homodistil/s/0123456789", summary, [], None, task, "now", sentence)
        meta = front_matter(card)
        assert (meta["library_name"], meta["pipeline_tag"]) == want


# ---------------------------------------------------------------------------- export


def test_sentence_transformers_bundle_loads_offline_with_both_backends(entry, root, tmp_path):
    """`zoo export --format sentence-transformers`: a sentence-transformers model directory whose
    onnx/model.onnx is the pooled graph; both backends load it offline and encode alike."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    dest = tmp_path / "st"
    res = zoo_cli(
        "export", entry, str(dest), "--format", "sentence-transformers", "--zoo", str(root)
    )
    assert res.exit_code == 0, res.output
    files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert {"modules.json", "1_Pooling/config.json", "model.safetensors", "tokenizer.json",
            "onnx/model.onnx", "README.md", "verify.json", "manifest.json"} <= files  # fmt: skip
    assert [f for f in files if f.endswith(".onnx")] == ["onnx/model.onnx"]
    manifest = json.loads((dest / "manifest.json").read_text())
    outputs = manifest["onnx"]["onnx/model.onnx"]["io_ports"]["outputs"]
    assert [o["name"] for o in outputs][-1] == "sentence_embedding"
    texts = ["The cat sat on the mat.", "Rain.", "A much longer sentence about the weather."]
    on_onnx = SentenceTransformer(str(dest), backend="onnx", local_files_only=True)
    on_torch = SentenceTransformer(str(dest), local_files_only=True)
    got, want = on_onnx.encode(texts), on_torch.encode(texts)
    assert np.all(np.abs(got - want) <= 1e-4 + 1e-4 * np.abs(want)), np.abs(got - want).max()


def test_sentence_transformers_bundle_of_an_entry_without_the_graph_exits_2(
    run_dir, root, tmp_path
):
    copy = distinct_copy(run_dir, tmp_path / "no-graph", "no-graph")
    (copy / "model" / "onnx" / "model.onnx").unlink()
    entry_id = zoo.register(copy, root)
    res = zoo_cli("export", entry_id, str(tmp_path / "st"), "--format", "sentence-transformers",
              "--zoo", str(root))  # fmt: skip
    assert res.exit_code == 2 and "has no sentence-transformers graph" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "st").exists()


def test_exported_bundle_loads_with_ort_and_matches_the_hf_model(entry, root, tmp_path):
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoModel, AutoTokenizer

    dest = tmp_path / "bundle"
    res = zoo_cli("export", entry, str(dest), "--zoo", str(root))
    assert res.exit_code == 0, res.output
    names = {p.name for p in dest.iterdir()}
    assert {
        "model.onnx",
        "config.json",
        "tokenizer.json",
        "README.md",
        "verify.json",
        "benchmark.json",
        "manifest.json",
    } <= names
    ort_model = ORTModelForFeatureExtraction.from_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    enc = tok(["The cat sat on the mat.", "Rain."], padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(zoo.entry_dir(root, entry) / "model").eval()
    with torch.no_grad():
        want = ref(**enc).last_hidden_state
    got = torch.as_tensor(ort_model(**enc).last_hidden_state)
    real = enc["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max() < 1e-4

    again = zoo_cli("export", entry, str(dest), "--zoo", str(root))
    assert again.exit_code == 2 and "not empty" in again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert zoo_cli("export", entry, str(empty), "--zoo", str(root)).exit_code == 0


def test_export_refuses_a_tampered_entry(entry, root, tmp_path):
    flip_byte(zoo.entry_dir(root, entry) / "onnx" / "model.onnx")
    res = zoo_cli("export", entry, str(tmp_path / "bundle"), "--zoo", str(root))
    assert res.exit_code == 3 and "onnx/model.onnx: modified" in res.output
    assert not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------------------- verify


def _tamper(d: Path, how: str) -> str:
    if how == "onnx":
        flip_byte(d / "onnx" / "model.onnx")
        return "onnx/model.onnx: modified"
    if how == "card":
        flip_byte(d / "README.md")
        return "README.md: modified"
    if how == "missing":
        (d / "plan.json").unlink()
        return "plan.json: missing"
    (d / "onnx" / "notes.txt").write_text("extra")
    return "onnx/notes.txt: not in the manifest"


@pytest.mark.parametrize("how", ["onnx", "card", "missing", "extra"])
def test_verify_names_a_tampered_missing_or_extra_file(entry, root, how):
    before = rows(root)
    expected = _tamper(zoo.entry_dir(root, entry), how)
    res = zoo_cli("verify", entry, "--zoo", str(root))
    assert res.exit_code == 3, res.output
    assert expected in res.output and "Traceback" not in res.output
    assert rows(root) == before  # the index is never rewritten by verify
    report = json.loads(zoo_cli("verify", "--all", "--zoo", str(root), "--json").stdout)
    assert not report["passed"] and any(expected in p for p in report["entries"][0]["problems"])


# ---------------------------------------------------------------------------- evaluations, rm


def test_record_evaluation_updates_metrics_card_manifest_and_index(entry, root):
    row = zoo.record_evaluation(root, entry, EVALUATION)
    d = zoo.entry_dir(root, entry)
    evals = json.loads((d / "evaluations.json").read_text())["evaluations"]
    assert len(evals) == 1 and evals[0]["student"]["mean"] == 0.812 and evals[0]["created"]
    assert row["quality"] == "wiki_topics accuracy 0.812 (teacher 0.853)"
    assert rows(root) == [row] == [entry_row(d)]
    metric = front_matter((d / "README.md").read_text())["model-index"][0]["results"][0]
    assert metric["metrics"][0] == {
        "type": "accuracy",
        "value": 0.812,
        "name": "accuracy (3 seeds)",
    }
    assert zoo.verify(root, entry)["passed"]
    assert "wiki_topics accuracy 0.812" in zoo_cli("list", "--zoo", str(root)).output

    flip_byte(d / "evaluations.json")  # a tampered metrics file is not silently blessed
    with pytest.raises(CheckFailed, match=r"evaluations\.json: modified"):
        zoo.record_evaluation(root, entry, EVALUATION)


def test_rm_removes_entry_row_and_empty_parents(entry, root):
    short = entry.rsplit("/", 1)[1]
    assert zoo_cli("rm", short, "--zoo", str(root)).exit_code == 2  # rm wants the full id
    res = zoo_cli("rm", entry, "--zoo", str(root))
    assert res.exit_code == 0, res.output
    assert zoo.list_entries(root) == [] and not (root / "entries" / entry.split("/")[0]).exists()
    assert zoo_cli("rm", entry, "--zoo", str(root)).exit_code == 2


# ---------------------------------------------------------------------------- reindex


def test_reindex_rebuilds_an_identical_index(entry, run_dir, root, tmp_path):
    other = zoo.register(distinct_copy(run_dir, tmp_path / "v1", "v1"), root)
    zoo.record_evaluation(root, other, EVALUATION)
    before = rows(root)
    assert len(before) == 2
    (root / ".staging" / "999999999-dead").mkdir()  # junk of a dead process
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / zoo_index.ZOO_INDEX_FILE}{suffix}").unlink(missing_ok=True)
    res = zoo_cli("list", "--zoo", str(root))
    assert res.exit_code == 2 and "reindex" in res.output
    res = zoo_cli("reindex", "--zoo", str(root))
    assert res.exit_code == 0 and "indexed 2 entries" in res.output
    assert rows(root) == before and integrity(root) == "ok"
    assert not (root / ".staging" / "999999999-dead").exists()


def test_an_unindexed_entry_is_reported_and_adopted_by_the_next_registration(entry, run_dir, root):
    """As left by a registration killed between its rename and its commit."""
    with zoo_index.write_transaction(root) as conn:
        zoo_index.delete(conn, entry)
    res = zoo_cli("verify", "--all", "--zoo", str(root))
    assert (
        res.exit_code == 3 and f"{entry}: an entry directory the index does not list" in res.output
    )
    assert zoo.register(run_dir, root) == entry
    assert [r["id"] for r in rows(root)] == [entry] and zoo.unindexed_dirs(root) == []


# ---------------------------------------------------------------------------- concurrency


REGISTER = (
    "import sys, time\n"
    "from compressor.zoo.store import register\n"
    "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
    "print(register(sys.argv[1], sys.argv[2]))\n"
)


def test_eight_concurrent_registrations_all_land(run_dir, root, tmp_path):
    runs = [distinct_copy(run_dir, tmp_path / f"run{i}", f"run{i}") for i in range(8)]
    start = str(time.time() + 3.0)  # all eight hit the index at about the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER, str(r), str(root), start],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in runs
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 8 and all(TINY_ID.fullmatch(i) for i in ids)
    assert {r["id"] for r in rows(root)} == ids and integrity(root) == "ok"
    for r in rows(root):
        assert zoo.file_problems(zoo.entry_dir(root, r["id"]), r["id"], r["files"]) == []
    assert zoo.unindexed_dirs(root) == [] and not list((root / ".staging").iterdir())


KILLABLE = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "import compressor.zoo.store as z\n"
    "run, root, marker, stage = sys.argv[1:5]\n"
    "def pause():\n"
    "    Path(marker).touch()\n"
    "    time.sleep(600)\n"
    "if stage == 'after_copy':\n"
    "    fsync = z.fsync_tree\n"
    "    z.fsync_tree = lambda p: (fsync(p), pause())\n"
    "else:  # inside the transaction: row inserted, not yet renamed or committed\n"
    "    insert = z.zoo_index.insert\n"
    "    z.zoo_index.insert = lambda conn, row: (insert(conn, row), pause())\n"
    "z.register(run, root)\n"
)


@pytest.mark.parametrize("stage", ["after_copy", "inside_transaction"])
def test_a_registration_killed_midway_leaves_no_entry(stage, entry, run_dir, root, tmp_path):
    other = distinct_copy(run_dir, tmp_path / "other", "other")
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(other), str(root), str(marker), stage],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the registration never reached the pause"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert integrity(root) == "ok"
    assert [r["id"] for r in rows(root)] == [entry]
    assert zoo.unindexed_dirs(root) == []  # no half entry on disk
    assert list((root / ".staging").iterdir())  # only staging junk, which nothing lists
    res = zoo_cli("verify", "--all", "--zoo", str(root))
    assert res.exit_code == 0, res.output

    new = zoo.register(other, root)  # the next registration cleans the junk and lands
    assert {r["id"] for r in rows(root)} == {entry, new}
    assert not list((root / ".staging").iterdir())


# ---------------------------------------------------------------------------- gates


def test_gate_failures_name_gate_value_and_limit():
    summary = {"student_params": 4254336, "discrepancy": {"final": 0.74}}
    bench = {"results": [{"runtime": "onnxruntime", "speedup_p50": 2.5}]}
    assert gate_failures(GatesSpec(), summary, bench) == []
    assert (
        gate_failures(
            GatesSpec(max_params=5_000_000, min_speedup=2.0, max_discrepancy=0.8), summary, bench
        )
        == []
    )
    failures = gate_failures(
        GatesSpec(max_params=10, min_speedup=3.0, max_discrepancy=0.5), summary, bench
    )
    assert failures == [
        "gates.max_params: the student has 4,254,336 parameters, limit 10",
        "gates.min_speedup: onnxruntime fp32 speedup 2.50x at the first benchmarked shape,"
        " limit 3.0x",
        "gates.max_discrepancy: final discrepancy 0.74, limit 0.5",
    ]
    assert "no onnxruntime benchmark" in gate_failures(GatesSpec(min_speedup=1.0), summary, None)[0]


def test_a_failed_gate_exits_3_and_registers_nothing(run_dir, root, tmp_path):
    gated = distinct_copy(run_dir, tmp_path / "gated", "gated")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["gates"] = {"max_params": 10}
    (gated / "recipe.yaml").unlink()
    (gated / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = zoo_cli("add", str(gated), "--zoo", str(root))
    assert res.exit_code == 3, res.output
    assert (
        "gates.max_params" in res.output and "4,254,336" in res.output and "limit 10" in res.output
    )
    assert zoo.list_entries(root) == []


def test_the_pipeline_checks_gates_before_registering(tmp_path, packaged_tokenizer):
    """A real (tiny, random-teacher) run through the pipeline: a failed gate raises CheckFailed
    after the export was verified, and nothing reaches the zoo."""
    from compressor import pipeline
    from tests.helpers import gated_tiny_run

    recipe, teacher = gated_tiny_run(GatesSpec(max_params=10), packaged_tokenizer)
    gate_zoo = tmp_path / "zoo"
    with pytest.raises(CheckFailed, match=r"gates\.max_params"):
        pipeline.run(recipe, output=tmp_path / "runs", teacher=teacher, zoo=gate_zoo)
    (run,) = (tmp_path / "runs" / "tiny-test").iterdir()
    assert json.loads((run / "verify.json").read_text())["passed"] is True
    assert zoo.list_entries(gate_zoo) == []


def test_index_is_wal_sqlite(entry, root):
    conn = sqlite3.connect(root / zoo_index.ZOO_INDEX_FILE)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    conn.close()


def test_zoo_root_precedence(monkeypatch):
    """--zoo flag > $COMPRESS_ZOO > the recipe's zoo.dir > ./zoo."""
    monkeypatch.setenv("COMPRESS_ZOO", "/from/env")
    assert zoo.zoo_root("/from/flag", "from-recipe") == Path("/from/flag")
    assert zoo.zoo_root(None, "from-recipe") == Path("/from/env")
    monkeypatch.delenv("COMPRESS_ZOO")
    assert zoo.zoo_root(None, "from-recipe") == Path("from-recipe")
    assert zoo.zoo_root() == Path("zoo")
