"""The model card of a zoo entry: README.md with Hugging Face model-card front matter (base model,
library_name, pipeline_tag, tags, model-index metrics) and a short human summary. A pure function
of the entry's data.

library_name / pipeline_tag say how the Hub (and a reader) should load the model: a sentence
encoder (its teacher had sentence-transformers modules) is `sentence-transformers` /
`sentence-similarity`; a masked-LM model is `transformers` / `fill-mask`; any other encoder is
`transformers` / `feature-extraction`."""

from __future__ import annotations

from typing import Any

import yaml

from compressor.deploy.bench import fp32_result
from compressor.rundir import ONNX_FILE
from compressor.zoo.mteb_scores import category_summary, is_mteb, latest

TAGS = ["homodistil", "distillation", "pruning", "onnx"]
SENTENCE_TAGS = ["sentence-transformers", "feature-extraction", "sentence-similarity"]
DISCREPANCY = {
    "feature-extraction": "1 - Spearman of pairwise cosine similarities of sentence embeddings",
    "fill-mask": "KL divergence of masked-LM predictions, teacher vs student",
}


def mteb_result(e: dict) -> dict[str, Any]:
    """A `compress eval --mteb` record as the hub's model-index reads MTEB results: the task
    type, the dataset (name, path, split, revision) and the main score, with the student's
    retention of the teacher's main score beside it."""
    metrics = [
        {"type": e["metric"], "value": e["student"]["mean"], "name": f"{e['metric']} (MTEB)"}
    ]
    if e.get("retention") is not None:
        metrics.append(
            {"type": "teacher_retention", "value": round(e["retention"], 2),
             "name": f"% of the teacher's {e['metric']}"}
        )  # fmt: skip
    settings = e.get("settings", {})
    return {
        "task": {"type": e["task_type"]},
        "dataset": {
            "name": f"MTEB {e['task']}",
            "type": settings.get("dataset", e["task"]),
            "config": "default",
            "split": settings.get("split", "test"),
            "revision": settings.get("revision", ""),
        },
        "metrics": metrics,
    }


def mteb_lines(evaluations: list[dict]) -> list[str]:
    """The card's MTEB section: each task's main score, teacher beside, retention in percent,
    then the category averages."""
    records = latest(evaluations)
    if not records:
        return []
    lines = [
        "",
        "## MTEB protocol",
        "",
        "Scored by mteb's own evaluators (`compress eval --mteb`); retention is the student's main"
        " score as a percentage of the teacher's.",
        "",
        "| task | category | main score | teacher | student | retention |",
        "|---|---|---|---|---|---|",
    ]
    for e in records:
        t, k = (e.get("teacher") or {}).get("mean"), e.get("retention")
        lines.append(
            f"| {e['task']} | {e['category']} | {e['metric']} | {_num(t)} |"
            f" {e['student']['mean']:.4f} | {_pct(k)} |"
        )
    lines += ["", "| category | tasks | teacher | student | retention |", "|---|---|---|---|---|"]
    for c in category_summary(records):
        lines.append(
            f"| {c['category']} | {c['tasks']} | {_num(c['teacher'])} | {c['student']:.4f} |"
            f" {_pct(c['retention'])} |"
        )
    return lines


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def model_index(
    entry_id: str, task: str, evaluations: list[dict], summary: dict
) -> list[dict[str, Any]]:
    """model-index results: one per evaluation (the latest per MTEB task), else the held-out
    discrepancy."""
    results = [mteb_result(e) for e in latest(evaluations)]
    results += [
        {
            "task": {
                "type": e.get("task_type", "text-classification"),
                "name": f"{e['task']} ({e.get('mode', 'eval')})",
            },
            "dataset": {"name": e["task"], "type": e["task"]},
            "metrics": [
                {
                    "type": e["metric"],
                    "value": e["student"]["mean"],
                    "name": f"{e['metric']} ({len(e.get('seeds', []))} seeds)",
                }
            ],
        }
        for e in evaluations
        if not is_mteb(e)
    ]
    final = summary.get("discrepancy", {}).get("final")
    if not results and final is not None:
        results.append(
            {
                "task": {"type": task},
                "dataset": {"name": "held-out training text", "type": "heldout"},
                "metrics": [
                    {
                        "type": "discrepancy",
                        "value": final,
                        "name": DISCREPANCY.get(task, "discrepancy"),
                    }
                ],
            }
        )
    return [{"name": entry_id, "results": results}]


def library_and_pipeline(task: str, sentence_encoder: bool) -> tuple[str, str]:
    if sentence_encoder and task != "fill-mask":
        return "sentence-transformers", "sentence-similarity"
    return "transformers", task


def model_card(
    entry_id: str,
    summary: dict[str, Any],
    evaluations: list[dict],
    bench: dict[str, Any] | None,
    task: str,
    created: str,
    sentence_encoder: bool = False,
) -> str:
    library, pipeline = library_and_pipeline(task, sentence_encoder)
    front = {
        "base_model": summary["teacher"],
        "library_name": library,
        "pipeline_tag": pipeline,
        "tags": TAGS + (SENTENCE_TAGS if library == "sentence-transformers" else []),
        "model-index": model_index(entry_id, task, evaluations, summary),
    }
    s, t = summary["student_shape"], summary["teacher_shape"]
    shape = f"{s['layers']}L/{s['hidden']}H/{s['heads']}A/{s['ffn']}I"
    teacher_shape = f"{t['layers']}L/{t['hidden']}H/{t['heads']}A/{t['ffn']}I"
    headline = fp32_result(bench)
    ort_class = "ORTModelForMaskedLM" if task == "fill-mask" else "ORTModelForFeatureExtraction"
    verify = summary.get("export", {}).get("verify", {}).get(ONNX_FILE, {})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {entry_id}",
        "",
        f"A {shape} student of `{summary['teacher']}` ({teacher_shape}), distilled and pruned",
        f"with HomoDistil by the recipe `{summary['recipe']}` ({summary['steps']} steps). Registered {created}.",
        "",
        "| | teacher | student |",
        "|---|---|---|",
        f"| shape | {teacher_shape} | {shape} |",
        f"| parameters | {summary['teacher_params']:,} | {summary['student_params']:,} |",
    ]
    if headline is not None:
        noisy = " (noisy: not a reliable figure)" if headline.get("noisy") else ""
        lines.append(
            "| onnxruntime fp32 speedup (p50, first benchmarked shape) | 1x |"
            f" {headline['speedup_p50']:.2f}x{noisy} |"
        )
    for e in evaluations:
        if is_mteb(e):
            continue
        teacher = (e.get("teacher") or {}).get("mean")
        t_text = f"{teacher:.4f}" if teacher is not None else "-"
        lines.append(
            f"| {e['task']} {e['metric']} ({e.get('mode', '')}) | {t_text} | {e['student']['mean']:.4f} |"
        )
    quality = summary.get("quality") or {}
    if "similarity_spearman" in quality:
        lines.append(
            f"| agreement with the teacher on {quality['texts']} held-out texts: similarity"
            f" Spearman / nearest neighbour top-1 | 1 / 1 | {quality['similarity_spearman']:.4f}"
            f" / {quality['neighbour_top1']:.4f} |"
        )
    final = summary.get("discrepancy", {}).get("final")
    if final is not None:
        lines.append(
            f"| held-out discrepancy ({DISCREPANCY.get(task, 'discrepancy')}) | 0 | {final:.4g} |"
        )
    if verify:
        lines.append(
            f"| ONNX vs PyTorch max abs diff (verified) | | {verify.get('max_abs_diff', 0):.2g} |"
        )
    lines += mteb_lines(evaluations)
    lines += ["", "## Use", ""]
    if library == "sentence-transformers":
        lines += [
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "# compress zoo export ID ST_DIR --format sentence-transformers",
            'model = SentenceTransformer("ST_DIR", backend="onnx")  # or backend="torch"',
            'embeddings = model.encode(["A sentence to embed."])',
            "```",
            "",
            "Or onnxruntime alone: `ST_DIR/onnx/model.onnx` outputs `sentence_embedding` (pooled",
            "and normalised as the teacher's modules do) beside `token_embeddings`.",
            "",
        ]
    lines += [
        "```python",
        f"from optimum.onnxruntime import {ort_class}",
        f'model = {ort_class}.from_pretrained("BUNDLE_DIR")  # compress zoo export ID BUNDLE_DIR',
        "```",
        "",
        "Files: `onnx/` (model.onnx, tokenizer, samples), `model/` (safetensors), `recipe.yaml`,",
        "`plan.json`, `summary.json`, `benchmark.json`, `verify.json`, `metrics.jsonl` (training",
        "curve), `evaluations.json` (after `compress eval`), `environment.json`; `manifest.json`",
        "holds the sha256 of every file (`compress zoo verify`).",
        "",
    ]
    return "\n".join(lines)
