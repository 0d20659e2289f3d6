"""How much of a sentence classifier's accuracy is lexical: the linear probe of `compress eval
--probe` on the mean-pooled output of the embedding layer alone (no transformer layer), beside
the teacher's embedding layer and first layers (`--each-layer`: each run after every layer).

    .venv/bin/python tools/studies/lexical_probe.py RUN_DIR... [--task rotten_tomatoes] [--each-layer]

If the embedding layer alone scores as well as the whole teacher, the task's probe measures how
much word-level information survives to the last layer more than sentence meaning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from compressor.evaluate.downstream import evaluate_encoder
from compressor.evaluate.settings import EvalSettings
from compressor.evaluate.tasks import load_task
from compressor.recipe import load_run_recipe
from compressor.rundir import MODEL_DIR
from compressor.teacher import load_teacher


def truncated(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """The encoder with only the transformer layers `keep` (none: the embedding layer alone)."""
    model.encoder.layer = torch.nn.ModuleList(model.encoder.layer[i] for i in keep)
    return model.eval()


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--each-layer", action="store_true", help="probe each run after every layer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = EvalSettings(mode="probe")
    task = load_task(args.task, split_seed=0, max_train=settings.max_train,
                     max_eval=settings.max_eval)  # fmt: skip
    teacher = load_teacher(load_run_recipe(args.runs[0]).teacher)
    full = len(teacher.model.encoder.layer)
    rows = [(f"teacher, layers 0..{n - 1}" if n else "teacher, embedding layer", None, n)
            for n in (0, 1, 3, full)]  # fmt: skip
    for run in args.runs:
        depths = range(load_run_recipe(run).target.layers + 1) if args.each_layer else [0]
        rows += [(f"{run}, layers 0..{n - 1}" if n else f"{run}, embedding layer", run, n)
                 for n in depths]  # fmt: skip
    print(f"{args.task}: linear probe accuracy (validation, test)")
    for name, run, n in rows:
        if run is None:
            model = AutoModel.from_pretrained(teacher.source_dir)
            tokenizer = teacher.tokenizer
        else:
            model = AutoModel.from_pretrained(run / MODEL_DIR)
            tokenizer = AutoTokenizer.from_pretrained(run / MODEL_DIR)
        r = evaluate_encoder(
            truncated(model, list(range(n))), tokenizer, task, settings, [0], "cpu"
        )
        print(f"  {name}: {r['validation'][0]:.4f}, {r['per_seed'][0]:.4f}", flush=True)


if __name__ == "__main__":
    main()
