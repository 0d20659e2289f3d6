"""ONNX export of a slim (or teacher) model directory, with the samples a later check needs.

optimum's exporter (optimum-onnx, `library_name="transformers"`) is the main path; when it fails,
`torch.onnx.export` is the fallback and the report says which one ran. The export directory is
loadable as-is by optimum's ORTModelForFeatureExtraction / ORTModelForMaskedLM. A sentence encoder
(sentence-transformers module files in the model directory) also gets its pooled graph in
`model_dir/onnx/model.onnx` (deploy/sentence.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from compressor.arch import architecture_for
from compressor.deploy.sentence import (
    SENTENCE_OUTPUT,
    is_sentence_encoder,
    sentence_references,
    sentence_spec,
    write_sentence_graph,
)
from compressor.errors import CheckFailed
from compressor.rundir import (
    EXPORT_REPORT,
    INT8_FILE,
    ONNX_FILE,
    SAMPLES_FILE,
    SENTENCE_ONNX_FILE,
)
from compressor.shapes import config_has_mlm_head


def task_of(model_dir: Path) -> str:
    cfg = AutoConfig.from_pretrained(model_dir).to_dict()
    return "fill-mask" if config_has_mlm_head(cfg) else "feature-extraction"


def load_reference(model_dir: Path, task: str) -> torch.nn.Module:
    cls = AutoModelForMaskedLM if task == "fill-mask" else AutoModel
    return cls.from_pretrained(model_dir, attn_implementation="eager").eval()


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    int8: bool = False,
    optimize: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export `model_dir` to `out_dir/model.onnx` (+ tokenizer and config). `optimize` applies
    onnxruntime's BERT fusions (fused attention, skip-LayerNorm, bias-GELU); `int8` adds a
    dynamic int8 model. The verification check covers whatever ends up in the files. Custom
    sentence-transformers modules are refused unless `trust_remote_code` (deploy/sentence.py)."""
    config = AutoConfig.from_pretrained(model_dir)
    architecture_for(config)  # a family the adapters know, or UnknownArchitecture now
    task = task_of(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from optimum.exporters.onnx import main_export

        with _known_export_warnings_silenced():
            main_export(str(model_dir), output=out_dir, task=task, library_name="transformers",
                        do_validation=False, device="cpu")  # fmt: skip
        exporter = "optimum"
    except Exception as err:
        exporter = f"torch.onnx (optimum failed: {type(err).__name__}: {err})"
        with _known_export_warnings_silenced():
            _torch_export(model_dir, out_dir, task)
    if not (out_dir / ONNX_FILE).exists():
        raise CheckFailed(f"export: no {ONNX_FILE} was written to {out_dir}")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
              "sentencepiece.bpe.model", "special_tokens_map.json"):  # fmt: skip
        if (model_dir / f).exists() and not (out_dir / f).exists():
            shutil.copy(model_dir / f, out_dir / f)
    report: dict[str, Any] = {"exporter": exporter, "task": task, "files": [ONNX_FILE]}
    if optimize:
        report["fused_ops"] = fuse_graph(out_dir / ONNX_FILE, config)
    report["sentence_graph"] = export_sentence_graph(
        model_dir, out_dir / ONNX_FILE, task, trust_remote_code
    )
    if int8:
        quantize_int8(out_dir / ONNX_FILE, out_dir / INT8_FILE)
        report["files"].append(INT8_FILE)
    (out_dir / EXPORT_REPORT).write_text(json.dumps(report, indent=2))
    return report


def export_sentence_graph(
    model_dir: Path, token_onnx: Path, task: str, trust_remote_code: bool = False
) -> dict[str, Any] | None:
    """The pooled graph of a sentence encoder, in `model_dir/onnx/model.onnx` (a stale one is
    removed first). None for other models; {"skipped": why} when its modules cannot be written as
    a graph (the token graph is exported and checked all the same)."""
    out = model_dir / SENTENCE_ONNX_FILE
    out.unlink(missing_ok=True)
    if task != "feature-extraction" or not is_sentence_encoder(model_dir):
        return None
    try:
        spec = sentence_spec(model_dir, trust_remote_code)
    except CheckFailed as err:
        return {"skipped": str(err)}
    write_sentence_graph(token_onnx, out, spec)
    return {"file": SENTENCE_ONNX_FILE, "pooling": spec.pooling, "normalize": spec.normalize}


class _DropMessage(logging.Filter):
    """Drops log records whose message contains `text` (or starts with one of `prefixes`)."""

    def __init__(self, text: str, prefixes: tuple[str, ...] = ()):
        super().__init__()
        self.text, self.prefixes = text, prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return self.text not in message and not message.startswith(self.prefixes)


@contextlib.contextmanager
def _known_export_warnings_silenced() -> Iterator[None]:
    """The warnings every export prints, all harmless here:
    - transformers 4.57 renamed `torch_dtype` to `dtype`; optimum-onnx 0.1.0 (the newest that
      allows transformers 4.x) still passes `torch_dtype=float32` to from_pretrained;
    - the tracer notes that `torch.tensor(1.0)` in transformers' attention-mask inversion becomes
      a constant of the graph: it is the constant 1.0 on every call, so the trace is right (and
      the verification checks every output on padded inputs anyway); likewise the padding-id
      range check of an embedding with a padding row (RoBERTa's and MPNet's positions);
    - torch 2.13 deprecates the TorchScript-based exporter that optimum-onnx 0.1.0 (and our
      fallback, for the same graphs) uses (DeprecationWarnings, shown under pytest);
    - with an MLM head, optimum's tied-weight deduplication announces that the decoder's
      initializer differs from the word embeddings' (it is their transpose, as always for BERT)
      and then deduplicates them: the announcement and its listing lines (tab-indented) go; its
      "Could not find unique initializers" (deduplication skipped) stays visible.
    Only these messages are dropped, only during the export."""
    log = logging.getLogger("transformers.configuration_utils")
    drop = _DropMessage("`torch_dtype` is deprecated! Use `dtype` instead!")
    tied_log = logging.getLogger("optimum")
    tied = _DropMessage("Found different candidate ONNX initializers (likely duplicate)", ("\t",))
    log.addFilter(drop)
    tied_log.addFilter(tied)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="torch.tensor results are registered as constants in the trace",
                category=torch.jit.TracerWarning,
                module="transformers.modeling_attn_mask_utils",
            )
            warnings.filterwarnings(  # F.embedding's padding_idx range check, a constant here
                "ignore",
                message="Converting a tensor to a Python boolean might cause the trace",
                category=torch.jit.TracerWarning,
                module="torch.nn.functional",
            )
            for text in ("You are using the legacy TorchScript-based ONNX export",
                         "The feature will be removed. Please remove usage of this function"):  # fmt: skip
                warnings.filterwarnings("ignore", message=text, category=DeprecationWarning)
            yield
    finally:
        log.removeFilter(drop)
        tied_log.removeFilter(tied)


def _torch_export(model_dir: Path, out_dir: Path, task: str) -> None:
    model = load_reference(model_dir, task)
    names = ["input_ids", "attention_mask"]
    if architecture_for(model).embeddings(model).token_type is not None:
        names.append("token_type_ids")
    ones = torch.ones(2, 16, dtype=torch.long)
    example = (ones, ones, torch.zeros_like(ones))[: len(names)]  # token type 0 always exists
    out_name = "logits" if task == "fill-mask" else "last_hidden_state"
    axes = {0: "batch_size", 1: "sequence_length"}
    dyn = {k: axes for k in (*names, out_name)}

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *inputs):
            return self.m(**dict(zip(names, inputs, strict=True)))[0]

    torch.onnx.export(Wrapped(model), example, str(out_dir / ONNX_FILE), dynamo=False,
                      input_names=names, output_names=[out_name], dynamic_axes=dyn,
                      opset_version=17)  # fmt: skip
    model.config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)


def fuse_graph(path: Path, config, split: bool = True) -> dict[str, int]:
    """onnxruntime's transformer graph fusions for the model's family (its adapter's optimizer
    model type; "bert" fuses every family here), in place, with every SkipLayerNormalization
    split back into Sum + LayerNormalization (`split_skip_layer_norm`; `split=False` keeps them,
    for the benchmark's before/after). Returns the fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    arch = architecture_for(config)
    sizes = arch.sizes(config)
    model = optimize_model(str(path), model_type=arch.ort_model_type, num_heads=sizes["heads"],
                           hidden_size=sizes["hidden"])  # fmt: skip
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    n_split = split_skip_layer_norm(model.model) if split else 0
    if n_split:
        fused.pop("SkipLayerNormalization", None)
        fused[SPLIT_SKIP_LAYER_NORM] = n_split
    model.save_model_to_file(str(path))
    return fused


SPLIT_SKIP_LAYER_NORM = "Sum+LayerNormalization"


def split_skip_layer_norm(model) -> int:
    """Replace each SkipLayerNormalization (input, skip, gamma[, beta[, bias]]) of an ONNX model
    in place by Sum(input, skip[, bias]) -> LayerNormalization(gamma[, beta]) over the last axis:
    the same function. Returns how many were split.

    Why: onnxruntime's CPU SkipLayerNormalization kernel is scalar (its mean and variance are
    serial float reductions); at BERT shapes it takes 5-6x the time of Sum + LayerNormalization
    (1 x 128 x 384: about 300 us against 55 us, one thread), and in an int8 graph, where the
    matrix products are 3-4x cheaper, that made it 15% of a 6L/384H model's time against 11% of
    BERT-base's. A Sum, not an Add: onnxruntime's session-level SkipLayerNormFusion re-fuses
    Add + LayerNormalization when a session loads the graph, and it does not match Sum. A node
    whose mean or inverse-std-variance output is used is left as it is."""
    from onnx import helper

    nodes = list(model.graph.node)
    out, split = [], 0
    for node in nodes:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != "SkipLayerNormalization" or outputs[1] or outputs[2]:
            out.append(node)
            continue
        inputs = list(node.input) + [""] * (5 - len(node.input))
        x, skip, gamma, beta, bias = inputs
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        total = outputs[3] or f"{node.name or node.output[0]}_sum"
        out.append(helper.make_node("Sum", [t for t in (x, skip, bias) if t], [total],
                                    name=f"{node.name}_Sum"))  # fmt: skip
        ln_inputs = [total, gamma] + ([beta] if beta else [])
        out.append(helper.make_node("LayerNormalization", ln_inputs, [outputs[0]], axis=-1,
                                    epsilon=eps, name=f"{node.name}_LayerNorm"))  # fmt: skip
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(out)
    return split


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 with per-channel weights (per-tensor costs too much accuracy here). The
    default tensor type lets it quantize graphs that went through the BERT fusions."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip


def sample_inputs(
    tokenizer: Any, texts: list[str], batch_sizes: tuple[int, ...], seq_lengths: tuple[int, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """Real text at every (batch, length): the first row is always short, so there is padding."""
    pool = ["Hi.", *texts]
    out = {}
    for b in batch_sizes:
        for t in seq_lengths:
            enc = tokenizer(pool[:b], padding="max_length", truncation=True, max_length=t,
                            return_tensors="pt")  # fmt: skip
            out[f"b{b}_t{t}"] = {k: v.to(torch.int64) for k, v in enc.items()}
    return out


@torch.no_grad()
def reference_outputs(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = model(**inputs)
    name = "logits" if hasattr(out, "logits") and out.logits is not None else "last_hidden_state"
    return {name: getattr(out, name).float()}


def save_samples(
    export_dir: Path, model_dir: Path, texts: list[str], batch_sizes, seq_lengths
) -> Path:
    """Sample inputs and PyTorch reference outputs, saved beside the ONNX model (safetensors:
    the check re-runs later without PyTorch weights, and nothing is unpickled). When the model
    directory holds a sentence-transformers graph, sentence-transformers' own sentence embedding
    of every sample is stored too (`sentence_embedding`)."""
    task = task_of(model_dir)
    model = load_reference(model_dir, task)
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = sample_inputs(tok, texts, batch_sizes, seq_lengths)
    sentence = {}
    if (model_dir / SENTENCE_ONNX_FILE).exists():
        sentence = sentence_references(model_dir, samples)
    flat: dict[str, torch.Tensor] = {}
    for key, inputs in samples.items():
        for name, t in inputs.items():
            flat[f"{key}.input.{name}"] = t.contiguous()
        for name, t in reference_outputs(model, inputs).items():
            flat[f"{key}.output.{name}"] = t.contiguous()
        if key in sentence:
            flat[f"{key}.output.{SENTENCE_OUTPUT}"] = sentence[key].contiguous()
    path = export_dir / SAMPLES_FILE
    save_file(flat, path)
    return path
