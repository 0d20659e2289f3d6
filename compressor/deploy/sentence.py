"""The sentence-transformers graph of a sentence encoder: pooling (and normalisation) inside the
ONNX graph, laid out so that the slim model directory loads as a sentence-transformers model.

A teacher with sentence-transformers module files (modules.json: Transformer -> Pooling
[-> Normalize]) gives a slim `model/` that `SentenceTransformer(model_dir)` loads. The export adds
`model/onnx/model.onnx`: the verified token graph with the pooling appended, so that

    SentenceTransformer(model_dir, backend="onnx")   # sentence-transformers' ONNX layout

loads it too (sentence-transformers 5.x looks for `onnx/model.onnx`, or `model_kwargs={"file_name":
...}`), and plain onnxruntime users read the sentence embedding from the graph itself. Outputs:

    last_hidden_state   [batch, seq, hidden]  what optimum's ORTModelForFeatureExtraction reads
    token_embeddings    [batch, seq, hidden]  the same tensor, by sentence-transformers' name
    sentence_embedding  [batch, hidden]       pooled (mean / cls / max), L2-normalised if Normalize

The pooling is written as sentence-transformers 5.x computes it: mean = sum(mask * x) /
max(sum(mask), 1e-9); max = max over tokens with padded positions set to -inf; cls = the first
real token (the first position where the mask is 1); Normalize = x / max(||x||_2, 1e-12). The check (deploy/verify.py) compares it with sentence-transformers' own
PyTorch modules on the stored samples (`sentence_references`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import CheckFailed, UntrustedInput
from compressor.rundir import ST_MODULES_FILE
from compressor.trust import TRUST_FLAG, custom_modules, inside

POOLINGS = ("mean", "cls", "max")
SENTENCE_OUTPUT = "sentence_embedding"
TOKEN_OUTPUT = "token_embeddings"
HIDDEN_OUTPUT = "last_hidden_state"
# graph output -> the stored reference it must reproduce (token_embeddings is last_hidden_state)
GRAPH_REFERENCES = {
    HIDDEN_OUTPUT: HIDDEN_OUTPUT,
    TOKEN_OUTPUT: HIDDEN_OUTPUT,
    SENTENCE_OUTPUT: SENTENCE_OUTPUT,
}
# the Pooling config's boolean keys (sentence-transformers before 5.x writes only these; none set
# means mean, as sentence-transformers reads it)
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceSpec:
    """What the sentence-transformers modules of a model directory compute after the encoder."""

    pooling: str  # one of POOLINGS
    normalize: bool


def is_sentence_encoder(model_dir: Path) -> bool:
    """The directory carries sentence-transformers module files (modules.json)."""
    return (Path(model_dir) / ST_MODULES_FILE).is_file()


def sentence_spec(model_dir: Path, trust_remote_code: bool = False) -> SentenceSpec:
    """Read modules.json and the Pooling config. Raises CheckFailed naming the module or the
    pooling mode this graph cannot express (anything but Transformer -> Pooling [-> Normalize]
    with one of mean, cls, max), and UntrustedInput for a module that is not
    sentence-transformers' own (its code would run when the model loads) unless
    `trust_remote_code`, or a module path that leaves the model directory."""
    model_dir = Path(model_dir)
    custom = custom_modules(model_dir)
    if custom and not trust_remote_code:
        raise UntrustedInput(
            f"{model_dir / ST_MODULES_FILE}: custom module {', '.join(map(repr, custom))}: not"
            " sentence-transformers' own, its code would run when the model loads; not loaded"
            f" (if you trust its author: {TRUST_FLAG})"
        )
    try:
        modules = json.loads((model_dir / ST_MODULES_FILE).read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in sorted(modules, key=lambda m: m["idx"])]
        paths = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckFailed(f"{model_dir / ST_MODULES_FILE}: unreadable ({err})") from err
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise CheckFailed(
            f"{model_dir / ST_MODULES_FILE}: modules {kinds}; the sentence-transformers graph"
            " supports Transformer -> Pooling [-> Normalize] only"
        )
    pooling = paths["Pooling"]
    where = model_dir / ST_MODULES_FILE
    pooling_file = (
        inside(model_dir, pooling, str(where)) if pooling else model_dir
    ) / "config.json"
    inside(model_dir, pooling_file.relative_to(model_dir).as_posix(), str(where))
    try:
        config = json.loads(pooling_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckFailed(f"{pooling_file}: unreadable ({err})") from err
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        modes = [mode]
    elif isinstance(mode, list):
        modes = mode
    else:
        modes = [v for k, v in _POOLING_FLAGS.items() if config.get(k)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise CheckFailed(
            f"{pooling_file}: pooling {modes or 'none'}; the sentence-transformers graph supports"
            f" exactly one of {', '.join(POOLINGS)}"
        )
    return SentenceSpec(pooling=modes[0], normalize=kinds[-1] == "Normalize")


# ---------------------------------------------------------------------------- the graph


def write_sentence_graph(token_onnx: Path, out: Path, spec: SentenceSpec) -> None:
    """`token_onnx` (inputs input_ids, attention_mask[, token_type_ids]; output
    last_hidden_state) with the pooling of `spec` appended, saved to `out`."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(token_onnx)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise CheckFailed(f"{token_onnx}: opset {opset}; the pooling graph needs opset 13 or later")
    hidden = next((o for o in graph.output if o.name == HIDDEN_OUTPUT), None)
    if hidden is None or "attention_mask" not in {i.name for i in graph.input}:
        raise CheckFailed(
            f"{token_onnx}: needs an attention_mask input and a {HIDDEN_OUTPUT} output"
            f" (has outputs {[o.name for o in graph.output]})"
        )
    width = hidden.type.tensor_type.shape.dim[-1]
    nodes = _PoolingNodes(opset)
    pooled = nodes.pool(spec.pooling, HIDDEN_OUTPUT, "attention_mask")
    embedding = nodes.normalize(pooled) if spec.normalize else pooled
    nodes.add("Identity", [embedding], [SENTENCE_OUTPUT])
    nodes.add("Identity", [HIDDEN_OUTPUT], [TOKEN_OUTPUT])
    graph.initializer.extend(
        onnx.numpy_helper.from_array(value, name) for name, value in nodes.constants.items()
    )
    graph.node.extend(nodes.nodes)
    token = onnx.ValueInfoProto()
    token.CopyFrom(hidden)
    token.name = TOKEN_OUTPUT
    batch = hidden.type.tensor_type.shape.dim[0]
    sentence = helper.make_tensor_value_info(
        SENTENCE_OUTPUT,
        TensorProto.FLOAT,
        [batch.dim_param or batch.dim_value, width.dim_param or width.dim_value],
    )
    graph.output.extend([token, sentence])
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)


class _PoolingNodes:
    """The ONNX nodes of sentence-transformers' pooling, built for one opset (ReduceSum takes its
    axes as an input from opset 13, ReduceMax from 18)."""

    PREFIX = "sentence_pooling/"

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[Any] = []
        self.constants: dict[str, np.ndarray] = {}

    def add(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        from onnx import helper

        name = f"{self.PREFIX}{op}_{len(self.nodes)}"
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def const(self, key: str, value: np.ndarray) -> str:
        name = f"{self.PREFIX}{key}"
        self.constants[name] = value
        return name

    def reduce(self, op: str, x: str, axis: int, keepdims: int) -> str:
        if op == "ReduceSum" or self.opset >= 18:
            axes = self.const(f"axes_{axis}", np.array([axis], dtype=np.int64))
            return self.add(op, [x, axes], keepdims=keepdims)
        return self.add(op, [x], axes=[axis], keepdims=keepdims)

    def pool(self, mode: str, hidden: str, attention_mask: str) -> str:
        from onnx import TensorProto

        last = self.const("axes_-1", np.array([-1], np.int64))
        mask = self.add("Cast", [attention_mask], to=TensorProto.FLOAT)
        if mode == "cls":  # one-hot of the first real token: mask == 1 where cumsum(mask) == 1
            seen = self.add("CumSum", [mask, self.const("axis_1", np.array(1, np.int64))])
            first = self.add("Equal", [seen, self.const("one", np.array(1.0, np.float32))])
            first = self.add("Mul", [self.add("Cast", [first], to=TensorProto.FLOAT), mask])
            first = self.add("Unsqueeze", [first, last])
            return self.reduce("ReduceSum", self.add("Mul", [hidden, first]), 1, 0)
        mask = self.add("Unsqueeze", [mask, last])
        if mode == "max":
            keep = self.add("Cast", [mask], to=TensorProto.BOOL)
            low = self.const("padding_value", np.array(-np.inf, dtype=np.float32))
            return self.reduce("ReduceMax", self.add("Where", [keep, hidden, low]), 1, 0)
        total = self.reduce("ReduceSum", self.add("Mul", [hidden, mask]), 1, 0)
        count = self.reduce("ReduceSum", mask, 1, 0)
        count = self.add("Max", [count, self.const("min_count", np.array(1e-9, np.float32))])
        return self.add("Div", [total, count])

    def normalize(self, x: str) -> str:
        squares = self.reduce("ReduceSum", self.add("Mul", [x, x]), 1, 1)
        norm = self.add("Max", [self.add("Sqrt", [squares]),
                                self.const("min_norm", np.array(1e-12, np.float32))])  # fmt: skip
        return self.add("Div", [x, norm])


# ---------------------------------------------------------------------------- references


def sentence_references(model_dir: Path, samples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{sample key: sentence_embedding} computed by sentence-transformers' own PyTorch modules
    (the reference the graph is checked against, so a pooling written wrongly in the graph cannot
    agree with itself)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True).eval()
    out = {}
    with torch.no_grad():
        for key, inputs in samples.items():
            features = {k: v.clone() for k, v in inputs.items()}
            out[key] = model(features)[SENTENCE_OUTPUT].float()
    return out
