"""Verification of an ONNX export against the saved PyTorch references: a check that raises, not a warning.

Order of checks, as optimum does it: output names, then shapes, then values (per-output atol +
rtol * |reference|), then task-level agreement (mean-pooled embedding cosine for encoders, top-1
agreement for MLM heads, sentence-embedding cosine for the sentence-transformers graph).
`verify.json` is written whether it passes or fails.

Each graph is checked against the references it must reproduce (`outputs`: graph output ->
stored reference): the token graph against every stored reference but the sentence embedding,
the sentence-transformers graph against deploy/sentence.py's GRAPH_REFERENCES.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from compressor.deploy.runtime import ort_session
from compressor.deploy.sentence import SENTENCE_OUTPUT
from compressor.errors import CheckFailed
from compressor.rundir import SAMPLES_FILE


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_agreement: float  # mean cosine (encoders) or top-1 agreement (MLM) over all samples


@dataclass
class VerifyReport:
    model: str
    passed: bool = True
    checks: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)  # onnxruntime's, in order of preference

    def fail(self, message: str) -> None:
        self.passed = False
        self.failures.append(message)


def load_samples(export_dir: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{sample key: {"input": {...}, "output": {...}}} from samples.safetensors."""
    flat = load_file(export_dir / SAMPLES_FILE)
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for name, arr in flat.items():
        key, kind, tensor = name.split(".", 2)
        out.setdefault(key, {"input": {}, "output": {}})[kind][tensor] = arr
    return out


def verify_export(
    export_dir: Path,
    onnx_file: str,
    tol: Tolerance,
    outputs: dict[str, str] | None = None,
    samples_dir: Path | None = None,
    cpu_only: bool = True,
) -> VerifyReport:
    """Run every stored sample (from `samples_dir`, default `export_dir`) through onnxruntime and
    compare each graph output named in `outputs` with its stored PyTorch reference (default: every
    reference but the sentence embedding, each under its own name). On the CPU provider unless
    `cpu_only` is false and this onnxruntime has the CUDA provider."""
    report = VerifyReport(model=onnx_file)
    sess = ort_session(export_dir / onnx_file, cpu_only=cpu_only)
    report.providers = sess.get_providers()
    feed_names = {i.name for i in sess.get_inputs()}
    out_names = [o.name for o in sess.get_outputs()]
    agreements: list[float] = []
    primary = "logits" if "logits" in out_names else primary_output(outputs or {})
    for key, sample in sorted(load_samples(samples_dir or export_dir).items()):
        feed = {k: v.astype(np.int64) for k, v in sample["input"].items() if k in feed_names}
        got = dict(zip(out_names, sess.run(None, feed), strict=True))
        wanted = outputs or {n: n for n in sample["output"] if n != SENTENCE_OUTPUT}
        for name, ref_name in wanted.items():
            ref = sample["output"].get(ref_name)
            if ref is None:
                report.fail(f"{onnx_file} [{key}]: no stored reference '{ref_name}' for '{name}'")
                continue
            if name not in got:
                report.fail(f"{onnx_file} [{key}]: output '{name}' missing (has {out_names})")
                continue
            out = got[name]
            if out.shape != ref.shape:
                report.fail(
                    f"{onnx_file} [{key}]: output '{name}' shape {out.shape} != {ref.shape}"
                )
                continue
            a, b = real_positions(out, ref, sample["input"]["attention_mask"])
            diff = np.abs(a - b)
            excess = float((diff - (tol.atol + tol.rtol * np.abs(b))).max(initial=0.0))
            check = {"sample": key, "output": name, "shape": list(ref.shape),
                     "max_abs_diff": float(diff.max(initial=0.0)), "atol": tol.atol,
                     "rtol": tol.rtol}  # fmt: skip
            if not excess <= 0:  # written so that NaN fails
                check["failed"] = True
                report.fail(
                    f"{onnx_file} [{key}]: output '{name}' shape {list(ref.shape)} differs by up to"
                    f" {diff.max():.3g} (atol {tol.atol}, rtol {tol.rtol})"
                )
            report.checks.append(check)
            if name == primary:
                agreements.append(agreement(name, out, ref, sample["input"]["attention_mask"]))
    mean_agreement = float(np.mean(agreements)) if agreements else 0.0
    kind = AGREEMENT_KINDS[primary]
    report.checks.append({kind: mean_agreement, "min": tol.min_agreement})
    if not mean_agreement >= tol.min_agreement:
        report.fail(f"{onnx_file}: {kind} {mean_agreement:.5f} is below {tol.min_agreement}")
    return report


AGREEMENT_KINDS = {
    "logits": "top1_agreement",
    SENTENCE_OUTPUT: "sentence_embedding_cosine",
    "last_hidden_state": "embedding_cosine",
}


def primary_output(outputs: dict[str, str]) -> str:
    """The output the task-level agreement is measured on: the sentence embedding where the
    graph has one, else the logits, else the token states."""
    for name in (SENTENCE_OUTPUT, "logits"):
        if name in outputs:
            return name
    return "last_hidden_state"


def real_positions(
    out: np.ndarray, ref: np.ndarray, attention_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The values at real tokens only, for outputs with a token axis (batch, sequence, ...):
    what padded positions hold is never used (pooling and the heads' users mask it) and differs
    between runtimes, most of all in int8, so comparing it would fail good exports."""
    if out.shape[: attention_mask.ndim] != attention_mask.shape:
        return out, ref  # no token axis (a sentence embedding)
    real = attention_mask.astype(bool)
    return out[real], ref[real]


def agreement(name: str, out: np.ndarray, ref: np.ndarray, attention_mask: np.ndarray) -> float:
    real = attention_mask.astype(bool)
    if name == "logits":
        return float((out.argmax(-1) == ref.argmax(-1))[real].mean())
    if name == SENTENCE_OUTPUT:
        a, b = out, ref
    else:
        m = attention_mask[..., None].astype(np.float32)
        a, b = (out * m).sum(1) / m.sum(1), (ref * m).sum(1) / m.sum(1)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.mean())


def write_and_gate(reports: list[VerifyReport], path: Path | None) -> None:
    """Write every report (unless `path` is None), then raise if any failed (nothing downstream
    may treat it as good)."""
    passed = all(r.passed for r in reports)
    if path is not None:
        path.write_text(
            json.dumps({"passed": passed, "reports": [asdict(r) for r in reports]}, indent=2)
        )
    if not passed:
        lines = [f for r in reports for f in r.failures]
        shown = "\n  ".join(lines[:10]) + (
            f"\n  ... {len(lines) - 10} more" if len(lines) > 10 else ""
        )
        where = f" (see {path})" if path is not None else ""
        raise CheckFailed(f"ONNX verification failed{where}:\n  {shown}")
