"""How much of the teacher's sentence embedding lives in the hidden dims a run's student kept:
the share of the pooled embeddings' energy in those dims, and how well the teacher's embedding
restricted to them agrees with the full one (the similarity measures of every run's summary),
beside the student's own agreement, on the texts its summary's quality was measured on.

    .venv/bin/python tools/studies/kept_dims.py RUN_DIR

The restriction is what a map-free embedding term (`distill.embedding`) trains the student
toward; its agreement is that term's ceiling on this measure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from compressor.data import Corpus
from compressor.forward import mean_pool
from compressor.quality import similarity_agreement
from compressor.recipe import load_run_recipe
from compressor.rundir import PLAN_FILE, SUMMARY_FILE
from compressor.teacher import load_teacher


def pooled(teacher, texts: list[str], max_length: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = teacher.tokenizer(texts[i : i + 32], padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt")  # fmt: skip
            states = teacher.model(**enc, output_hidden_states=True).hidden_states[-1]
            out.append(mean_pool(states, enc["attention_mask"]))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_run_recipe(args.run_dir)
    kept = torch.tensor(json.loads((args.run_dir / PLAN_FILE).read_text())["hidden"])
    teacher = load_teacher(recipe.teacher)
    tr = recipe.train
    texts = Corpus(
        recipe.data, teacher.tokenizer, tr.seed, tr.batch_size, tr.grad_accum
    ).quality_texts
    e = pooled(teacher, texts, recipe.data.max_length)
    energy = float((e[:, kept] ** 2).sum() / (e**2).sum())
    restricted = similarity_agreement(e[:, kept], e)
    student = json.loads((args.run_dir / SUMMARY_FILE).read_text()).get("quality", {})
    print(json.dumps({"kept_dims": len(kept), "teacher_dims": e.shape[1], "texts": len(texts),
                      "energy_in_kept_dims": energy, "restricted_teacher": restricted,
                      "student": student}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
