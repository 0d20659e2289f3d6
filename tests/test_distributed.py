"""torchrun + DDP on CPU (gloo): two processes train what one process trains with the same global
batch; only rank 0 writes; a resume with another number of processes is refused. Also the bf16
step-0 losses and the state's device after a resume (the CUDA path's pieces that run on a CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from compressor import distributed, pipeline
from compressor.errors import CheckFailed, RecipeError
from compressor.forward import encode
from compressor.losses import HiddenMaps, StudentLoss
from compressor.metrics import read_metrics
from compressor.prune.masks import Masks
from compressor.recipe import DistillSpec, load_recipe
from compressor.shapes import Shape
from compressor.train.state import (
    TrainingState,
    check_on_device,
    pack_importance,
    rng_state,
    set_rng_state,
    unpack_importance,
)
from tests.distributed_workers import two_ranks_with_different_masks
from tests.helpers import ROOT, tiny_batch, tiny_bert

# a local teacher small enough for two processes on a 2-core CPU; the packaged tokenizer
TEACHER = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64)  # fmt: skip


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, packaged_tokenizer):
    d = tmp_path_factory.mktemp("ddp")
    teacher = tiny_bert(seed=3, vocab_size=len(packaged_tokenizer), **TEACHER)
    teacher.save_pretrained(d / "teacher")
    packaged_tokenizer.save_pretrained(d / "teacher")
    raw = {
        "name": "tiny-ddp",
        "teacher": {"source": "local", "id": str(d / "teacher")},
        "data": {"source": "wiki_summaries", "max_length": 16, "heldout": 4, "quality_texts": 8},
        "target": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64},
        "pruning": {"start_step": 0, "end_step": 4, "interval": 1, "probe_batches": 2},
        "train": {"steps": 6, "batch_size": 2, "grad_accum": 4, "warmup_steps": 1, "seed": 0,
                  "device": "cpu", "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
        "export": {"onnx": False},
        "bench": {"enabled": False},
        "zoo": {"register": False},
    }  # fmt: skip
    path = d / "tiny-ddp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=n -m compressor ARGS` (one thread per process, no hub)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "compressor", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)


@pytest.fixture(scope="module")
def single_and_ddp(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    single = pipeline.run(recipe_file, output=out / "single")
    done = torchrun(2, "run", str(recipe_file), "--output", str(out / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    return single.run_dir, list((out / "ddp").glob("*/*")), done


@pytest.fixture(scope="module")
def single_and_ddp_progressive(recipe_file, tmp_path_factory):
    """The same with progressive slimming: each pruning event cuts the student, and DDP is built
    again around the narrower one."""
    out, on = tmp_path_factory.mktemp("runs-progressive"), "pruning.progressive_slim=true"
    single = pipeline.run(recipe_file, output=out / "single", overrides=[on])
    done = torchrun(2, "run", str(recipe_file), "--output", str(out / "ddp"), "--set", on)
    assert done.returncode == 0, done.stderr[-3000:]
    return single.run_dir, list((out / "ddp").glob("*/*")), done


@pytest.mark.slow
@pytest.mark.parametrize("runs", ["single_and_ddp", "single_and_ddp_progressive"])
def test_two_processes_train_what_one_trains(runs, request):
    """Same global batch (4 micro-batches of 2): the same plan (masks) exactly, the same weights
    within float tolerance (the order of the gradient sums differs), the same metrics; with
    progressive slimming, the same cuts."""
    single, ddp_dirs, _ = request.getfixturevalue(runs)
    (ddp,) = ddp_dirs  # one run directory: rank 1 made none of its own
    assert json.loads((ddp / "plan.json").read_text()) == json.loads(
        (single / "plan.json").read_text()
    )
    a = load_file(single / "model" / "model.safetensors")
    b = load_file(ddp / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert [(r["step"], r.get("event")) for r in one] == [(r["step"], r.get("event")) for r in two]
    for r1, r2 in zip(one, two, strict=True):
        assert r1.keys() == r2.keys()
        assert list(r1) == list(r2)
        if "loss_total" in r1:  # each process logs its share: the sum is the global mean
            assert r2["loss_total"] == pytest.approx(r1["loss_total"], rel=1e-5, abs=1e-9)
        if r1.get("event") == "prune":  # the importance (from averaged gradients) to scale
            assert r2["signal"] == r1["signal"]
            assert r2["margins"] == pytest.approx(r1["margins"], rel=1e-3)
    assert json.loads((ddp / "environment.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_only_rank_0_writes(single_and_ddp):
    single, (ddp,), done = single_and_ddp
    assert {p.name for p in ddp.iterdir()} == {p.name for p in single.iterdir()}
    steps = [r["step"] for r in read_metrics(ddp / "metrics.jsonl") if "loss_total" in r]
    assert steps == list(range(1, 7))  # every step logged once
    assert done.stdout.count("run directory:") == 1  # rank 0 reports for both


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused(recipe_file, tmp_path):
    stopped = pipeline.run(recipe_file, output=tmp_path, stop_after=2)  # one process
    assert (stopped.run_dir / "checkpoint.pt").exists()
    done = torchrun(2, "run", "--resume", str(stopped.run_dir))
    assert done.returncode != 0  # torchrun exits 1 when a worker fails; the workers exit 2
    assert "exitcode: 2" in done.stderr, done.stderr[-3000:]
    assert "written by 1 process(es), and this resume has 2" in done.stderr
    assert f"compress run --resume {stopped.run_dir}" in done.stderr


def test_different_masks_fail_on_every_rank(tmp_path):
    mp.spawn(
        two_ranks_with_different_masks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2
    )
    for r in (0, 1):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert text.startswith("the masks differ between processes (rank 1: ffn)"), text


def test_grad_accum_must_be_shared_evenly(monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "tiny-test.yaml")  # grad_accum 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="grad_accum: 1 micro-batches a step cannot be shared"):
        pipeline.check_processes(recipe)
    monkeypatch.setenv("WORLD_SIZE", "1")
    pipeline.check_processes(recipe)


# ---------------------------------------------------------------------------- the GPU path on CPU


def identity_student_losses(bf16: bool, mlm: bool) -> dict[str, torch.Tensor]:
    """The loop's loss terms for a student that is still its teacher, teacher forward under the
    same autocast as in `distill`."""
    teacher = tiny_bert(mlm=mlm)
    student = tiny_bert(mlm=mlm)
    shape = Shape.of_config(teacher.config)
    masks = Masks.full(shape)
    fade = torch.nn.Parameter(masks.fade.clone())
    masks = Masks(**{**masks.__dict__, "fade": fade})
    model = StudentLoss(student, HiddenMaps(shape.layers + 1, shape.hidden), fade, mlm)
    ids, att = tiny_batch()
    from compressor.data import Batch

    batch = Batch(ids, att, torch.where(att.bool(), ids, -100) if mlm else None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t_out = encode(teacher, ids, att, with_logits=mlm)
    return model(DistillSpec(), t_out, masks, batch, 0.0, bf16)


@pytest.mark.parametrize("mlm", [False, True])
def test_bf16_step0_losses_are_exactly_zero(mlm):
    """Under bf16 autocast the student's states are bf16 where the teacher's are fp32 unless the
    terms are computed in fp32 outside autocast (the hidden MSE was 1e-5 at step 0)."""
    losses = {k: float(v.detach()) for k, v in identity_student_losses(True, mlm).items()}
    assert losses["hidden"] == 0.0 and losses["attention"] == 0.0
    if mlm:
        assert losses["prediction"] == 0.0
    else:  # 1 - cosine of two equal vectors: rounding (as in fp32), not a bf16 difference
        assert abs(losses["prediction"]) <= 1e-6


def test_resumed_state_is_checked_to_be_on_the_device():
    student = tiny_bert()
    recipe = load_recipe(ROOT / "recipes" / "tiny-test.yaml")
    cpu = torch.device("cpu")
    state = TrainingState.start(recipe, Shape.of_config(student.config), student, cpu)
    sum(p.sum() for p in state.params.values()).backward()
    state.optimizer.step()
    check_on_device(cpu, state)
    ema = state.importance
    state.importance = unpack_importance(pack_importance(ema, True), ema, torch.device("meta"))
    moved = state.importance
    assert {t.device.type for t in [*moved.i_bar.values(), *moved.u_bar.values()]} == {"meta"}
    with pytest.raises(CheckFailed, match=r"importance\.i_bar"):
        check_on_device(cpu, state)


def test_optimizer_state_follows_its_parameters_device():
    """What the resume relies on: load_state_dict moves a CPU-loaded state to the params."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w])
    w.grad = torch.ones(3)
    opt.step()
    meta = torch.nn.Parameter(torch.ones(3, device="meta"))
    other = torch.optim.AdamW([meta])
    other.load_state_dict(opt.state_dict())
    state = other.state[meta]
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"


def test_cuda_random_state_is_saved_and_restored(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, 8]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.update(cuda=s))
    gpu = torch.device("cuda", 0)
    state = rng_state(gpu)
    assert state["cuda"].tolist() == [7, 8] and "cpu" in state
    set_rng_state(state, gpu)
    assert calls["cuda"].tolist() == [7, 8]
    assert "cuda" not in rng_state(torch.device("cpu"))


def test_ddp_is_told_not_to_sync_buffers_in_the_keyword_this_torch_knows(monkeypatch):
    """torch 2.13 has `forward_sync_buffers`; 2.11 (the GPU machines') only `broadcast_buffers`,
    and refused the newer keyword at start-up."""
    assert distributed.no_buffer_sync() == {"forward_sync_buffers": False}  # the pinned torch

    class OlderDDP:  # the signature of torch 2.11's DistributedDataParallel, where it matters
        def __init__(self, module, device_ids=None, broadcast_buffers=True, **kw): ...

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", OlderDDP)
    assert distributed.no_buffer_sync() == {"broadcast_buffers": False}
