"""Wall time of one round of the greedy layer removal (pruning.layer_selection: removal) on a
real teacher at full width: every candidate scored through `encode` with its fade at 0 (what the
round cost before), against `encode_without_each` (the layers before a candidate run once, the
faded-out layers not at all). Both run in this process, alternating round by round; the costs
must agree bit for bit, and the report gives each one's median and min..max seconds a round and
their ratio per round.

    nice .venv/bin/python tools/studies/bench_layer_removal.py \\
        --recipe recipes/mpnet-base-to-6L384.yaml --set teacher.source=local --set teacher.id=DIR

Defaults: the recipe's first `pruning.probe_batches` training batches, 3 rounds, one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch

from compressor.data import Corpus
from compressor.forward import encode, encode_without_each
from compressor.prune.masks import Masks
from compressor.recipe import load_recipe, with_overrides
from compressor.teacher import load_teacher
from compressor.train.step import prepare

ROOT = Path(__file__).resolve().parents[2]


def per_candidate(model, batch, masks: Masks, mlm: bool) -> dict[int, torch.Tensor]:
    """The round as it was: one full masked forward per candidate, its fade at 0."""
    out = {}
    for i in masks.layers.nonzero().flatten().tolist():
        kept = masks.layers.clone()
        kept[i] = False
        trial = replace(masks, layers=kept, fade=kept.to(masks.fade))
        o = encode(model, batch.input_ids, batch.attention_mask, trial, with_logits=mlm)
        out[i] = o.logits if mlm else o.hidden_states[-1]
    return out


def shared_prefix(model, batch, masks: Masks, mlm: bool) -> dict[int, torch.Tensor]:
    outs = encode_without_each(model, batch.input_ids, batch.attention_mask, masks, mlm)
    return {i: o.logits if mlm else o.hidden_states[-1] for i, o in outs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "mpnet-base-to-6L384.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = with_overrides(load_recipe(args.recipe), args.set)
    teacher = load_teacher(recipe.teacher)
    tr = recipe.train
    corpus = Corpus(recipe.data, teacher.tokenizer, tr.seed, tr.batch_size, tr.grad_accum)
    batches = [prepare(b[0], teacher, recipe, 0, 0)
               for b in islice(corpus.batches(0), max(1, recipe.pruning.probe_batches))]  # fmt: skip
    model, mlm = teacher.model, teacher.has_mlm_head
    masks = Masks.full(teacher.shape)
    times = {"per_candidate": [], "shared_prefix": []}
    for _ in range(args.rounds):
        got = {}
        for name, fn in (("per_candidate", per_candidate), ("shared_prefix", shared_prefix)):
            start = time.perf_counter()
            with torch.no_grad():
                got[name] = [fn(model, b, masks, mlm) for b in batches]
            times[name].append(time.perf_counter() - start)
        a, b = got["per_candidate"], got["shared_prefix"]
        if not all(x.keys() == y.keys() and all(torch.equal(x[i], y[i]) for i in x)
                   for x, y in zip(a, b, strict=True)):  # fmt: skip
            raise SystemExit("the two rounds' outputs differ: the shortcut is not exact")
    ratios = [p / s for p, s in zip(times["per_candidate"], times["shared_prefix"], strict=True)]
    report = {
        "teacher": recipe.teacher.id,
        "layers": teacher.shape.layers,
        "batches": len(batches),
        "batch": list(batches[0].input_ids.shape),
        "threads": args.threads,
        "seconds_per_round": {
            k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in times.items()
        },
        "speedup_per_round": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
        "outputs_identical": True,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
