"""Faults during a run end in one clear message and lose nothing (issue 12): damaged checkpoints
fall back to the previous one, a full disk leaves the earlier checkpoint loadable and no temporary
file, checkpoints store only what the state needs and resume bit for bit, an interrupted run says
where it is, and a hub teacher without a network fails in about a second."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from compressor import checkpoint as ckpt_mod
from compressor import pipeline
from compressor.checkpoint import (
    Checkpoint,
    load_checkpoint,
    pack_delta,
    save_checkpoint,
    unpack_delta,
)
from compressor.cli.main import main
from compressor.errors import Interrupted, RunDirError, StorageError, TeacherError
from compressor.metrics import read_metrics
from compressor.recipe import TeacherSpec, recipe_to_dict
from compressor.rundir import (
    CHECKPOINT_FILE,
    CHECKPOINT_PREV_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RECIPE_FILE,
)
from compressor.teacher import load_teacher, read_teacher_config
from tests.helpers import RECIPES, shrink, small_recipe, small_teacher


def state(step: int) -> Checkpoint:
    g = torch.Generator().manual_seed(step)
    return Checkpoint(
        step=step, student={"w": {"dense": torch.randn(64, 64, generator=g)}}, maps={},
        optimizer={}, masks={"hidden": torch.ones(4, dtype=torch.bool)}, importance=None,
        layers_chosen=False, noise_floor=None, torch_rng=torch.get_rng_state(),
    )  # fmt: skip


def two_checkpoints(run_dir):
    save_checkpoint(run_dir, state(1))
    save_checkpoint(run_dir, state(2))
    assert (run_dir / CHECKPOINT_FILE).exists() and (run_dir / CHECKPOINT_PREV_FILE).exists()


def flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped_bit": flip_bit,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero_bytes": lambda p: p.write_bytes(b""),
}


# ---------------------------------------------------------------------------- 1. checksums


def test_a_checkpoint_loads_back_exactly(tmp_path):
    two_checkpoints(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 2
    assert torch.equal(loaded.student["w"]["dense"], state(2).student["w"]["dense"])
    assert (tmp_path / CHECKPOINT_FILE).read_bytes().startswith(ckpt_mod.MAGIC + b" sha256=")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(damage, tmp_path):
    two_checkpoints(tmp_path)
    DAMAGE[damage](tmp_path / CHECKPOINT_FILE)
    said = []
    loaded = load_checkpoint(tmp_path, warn=said.append)
    assert loaded.step == 1  # the previous, good one
    assert len(said) == 1 and str(tmp_path / CHECKPOINT_FILE) in said[0]
    assert "damaged" in said[0] and CHECKPOINT_PREV_FILE in said[0]


def recipe_dir(tmp_path, recipe=None):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    raw = recipe_to_dict(recipe or small_recipe(steps=4))
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    return run_dir


def test_no_good_checkpoint_left_is_one_clear_error(tmp_path):
    run_dir = recipe_dir(tmp_path)
    two_checkpoints(run_dir)
    flip_bit(run_dir / CHECKPOINT_FILE)
    DAMAGE["truncated"](run_dir / CHECKPOINT_PREV_FILE)
    with pytest.raises(RunDirError, match="no good checkpoint remains"):
        load_checkpoint(run_dir)
    res = CliRunner().invoke(main, ["run", "--resume", str(run_dir)])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "start it again" in res.output
    assert "cannot resume" in res.output and "Traceback" not in res.output
    assert "Aborted" not in res.output and res.output.count("\n") == 1


# ---------------------------------------------------------------------------- 2. disk full


def fill_disk_after_half(monkeypatch):
    def write_half(f, payload):
        f.write(payload[: len(payload) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "write_payload", write_half)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    two_checkpoints(tmp_path)
    fill_disk_after_half(monkeypatch)
    with pytest.raises(StorageError, match="the disk is full") as err:
        save_checkpoint(tmp_path, state(3))
    assert str(tmp_path / CHECKPOINT_FILE) in str(err.value)
    assert not list(tmp_path.glob("*.tmp"))  # the partial file is gone
    assert load_checkpoint(tmp_path, warn=pytest.fail).step == 2  # intact, loads silently
    assert StorageError.exit_code != 0


@pytest.mark.slow
def test_disk_full_during_a_run_is_one_error_and_the_run_resumes(
    tmp_path, monkeypatch, packaged_tokenizer
):
    recipe = shrink(small_recipe(steps=4), train=dict(checkpoint_every=1))
    calls = {"n": 0}
    real = ckpt_mod.write_payload

    def full_at_third(f, payload):
        calls["n"] += 1
        if calls["n"] < 3:
            return real(f, payload)
        f.write(payload[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "write_payload", full_at_third)
    with pytest.raises(StorageError, match="disk is full"):
        pipeline.run(recipe, tmp_path, teacher=small_teacher(packaged_tokenizer), register=False)
    run_dir = next(tmp_path.glob("*/*/"))
    assert not list(run_dir.glob("*.tmp"))
    assert load_checkpoint(run_dir, warn=pytest.fail).step == 2
    monkeypatch.setattr(ckpt_mod, "write_payload", real)
    done = pipeline.resume(run_dir, teacher=small_teacher(packaged_tokenizer), register=False)
    assert done.summary["steps"] == 4


# ---------------------------------------------------------------------------- 3. small, exact


def test_packing_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 20, generator=g)
    t = base.clone()
    t[3, 4], t[7] = -0.0 if base[3, 4] == 0 else 1.5, torch.randn(20, generator=g)
    t[:, 11] = 0.0
    t[9, 2] = float("nan")
    for b in (base, None):
        back = unpack_delta(pack_delta(t, b), b)
        assert torch.equal(back.view(torch.int32), t.view(torch.int32))
    few = base.clone()
    few[[2, 30], 5] += 1.0
    few[2, 7] = 0.0
    assert pack_delta(few, base)["block"].shape == (2, 2)  # only the rows and columns that changed
    z = torch.zeros(8)
    z[2] = -0.0
    assert torch.equal(unpack_delta(pack_delta(z)).view(torch.int32), z.view(torch.int32))


def steps_recipe(steps=6, end_step=3):
    return shrink(small_recipe(steps=steps, lr=1e-3), pruning=dict(end_step=end_step, interval=1),
                  train=dict(checkpoint_every=1))  # fmt: skip


def naive_size(run_dir, tmp_path) -> int:
    """What the checkpoint would weigh stored as before: every tensor whole."""
    from compressor.train.state import unpack_optimizer

    s = load_checkpoint(run_dir)
    raw = {"student": {k: unpack_delta(v) for k, v in s.student.items() if "same_as" not in v}}
    raw["optimizer"] = unpack_optimizer(s.optimizer)
    if s.importance is not None:
        raw["importance"] = {k: {n: unpack_delta(v) for n, v in s.importance[k].items()}
                             for k in ("i_bar", "u_bar")}  # fmt: skip
    torch.save(raw, tmp_path / "naive.pt")
    return (tmp_path / "naive.pt").stat().st_size


@pytest.mark.slow
def test_checkpoints_are_small_and_resume_bit_identical(tmp_path, packaged_tokenizer):
    recipe = steps_recipe()
    teacher = lambda: small_teacher(packaged_tokenizer)  # noqa: E731
    straight = pipeline.run(recipe, tmp_path / "a", teacher=teacher(), register=False)
    part = pipeline.run(recipe, tmp_path / "b", teacher=teacher(), stop_after=2, register=False)
    ck = load_checkpoint(part.run_dir)
    assert ck.importance is not None  # pruning steps remain: the EMA is still read
    size = (part.run_dir / CHECKPOINT_FILE).stat().st_size
    assert size < naive_size(part.run_dir, tmp_path) / 3
    part = pipeline.resume(part.run_dir, teacher=teacher(), stop_after=5, register=False)
    assert load_checkpoint(part.run_dir).importance is None  # after the last pruning step
    done = pipeline.resume(part.run_dir, teacher=teacher(), register=False)
    a = load_file(straight.run_dir / MODEL_DIR / "model.safetensors")
    b = load_file(done.run_dir / MODEL_DIR / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


# ---------------------------------------------------------------------------- 4. interrupts


def test_resume_before_the_first_checkpoint_restarts_the_metrics(tmp_path, packaged_tokenizer):
    run_dir = recipe_dir(tmp_path, small_recipe(steps=2))
    (run_dir / METRICS_FILE).write_text('{"step": 0, "stale": true}\n{"step": 1, "stale": 1}\n')
    pipeline.resume(run_dir, teacher=small_teacher(packaged_tokenizer), register=False)
    records = read_metrics(run_dir / METRICS_FILE)
    assert not any("stale" in r for r in records)
    assert records[0]["step"] == 0


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_names_the_run_directory(signum, code, tmp_path, monkeypatch):
    def interrupted(recipe, run_dir, *a, **k):
        os.kill(os.getpid(), signum)  # SIGINT: KeyboardInterrupt; SIGTERM: the CLI's handler
        time.sleep(5)

    monkeypatch.setattr(pipeline, "_stages", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever
    try:  # an earlier test left
        res = CliRunner().invoke(
            main, ["run", str(RECIPES / "tiny-test.yaml"), "--output", str(tmp_path)]
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    run_dir = next(tmp_path.glob("*/*/"))
    assert res.exit_code == code
    assert f"compress run --resume {run_dir}" in res.output
    assert "RUN_DIR" not in res.output and "last checkpoint" not in res.output
    assert "step 0" in res.output and "Traceback" not in res.output


def test_sigterm_in_training_checkpoints_and_exits_143(tmp_path, monkeypatch, packaged_tokenizer):
    from compressor.train import state

    real = state.check_finite_losses

    def term_at_step_1(step, values):
        if step == 1 and "gradient norm" in values:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, values)

    monkeypatch.setattr(state, "check_finite_losses", term_at_step_1)
    with pytest.raises(Interrupted) as err:
        pipeline.run(small_recipe(steps=4), tmp_path, teacher=small_teacher(packaged_tokenizer))
    assert err.value.exit_code == 143 and err.value.has_checkpoint
    assert load_checkpoint(err.value.run_dir).step == 2
    assert "from its last checkpoint" in str(err.value)


# ---------------------------------------------------------------------------- 5. hub offline


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No hub: the probe is pointed at a closed local port (refused at once), whatever the
    machine's network, and the cache is empty."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return TeacherSpec(source="hub", id="no-such-org/no-such-model")


def test_a_hub_teacher_without_network_fails_in_a_second(no_network):
    started = time.time()
    with pytest.raises(TeacherError, match="HF_HUB_OFFLINE=1") as err:
        read_teacher_config(no_network)
    assert time.time() - started < 3
    assert "\n" not in str(err.value) and "source 'local'" in str(err.value)
    started = time.time()
    with pytest.raises(TeacherError, match="cannot be reached"):
        load_teacher(no_network)
    assert time.time() - started < 5


def test_recipe_check_of_a_hub_teacher_offline_is_one_line(no_network, tmp_path):
    raw = yaml.safe_load((RECIPES / "bert-base-to-6L384.yaml").read_text())
    raw["teacher"]["id"] = no_network.id
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    started = time.time()
    res = CliRunner().invoke(main, ["recipe", "check", str(recipe)])
    assert time.time() - started < 3
    assert res.exit_code == 2 and res.output.startswith("error: teacher.id:")
    assert res.output.count("\n") == 1 and "Traceback" not in res.output
