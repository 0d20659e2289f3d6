"""The static int8 candidate that tools/results/bench_bert_base.py measures beside the shipped
dynamic int8 (`quantize_int8`). It is not shipped: it is no faster and loses the embedding cosine
(docs/results.md, "Latency and int8"; docs/investigations.md, "Other int8 settings tried"). The
benchmark and its test keep it measurable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from transformers import AutoTokenizer

from compressor.data import read_wiki_summaries

CALIBRATION_TEXTS = 32  # the last Wikipedia summaries: disjoint from the cosine's first ones


class RealTextCalibration:
    """onnxruntime's CalibrationDataReader protocol: the last CALIBRATION_TEXTS Wikipedia
    summaries, 8 rows x `seq` tokens a batch, tokenized by the model's own tokenizer."""

    def __init__(self, hf_dir: Path, graph: Path, seq: int):
        import onnxruntime as ort

        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        texts = read_wiki_summaries()[-CALIBRATION_TEXTS:]
        tok = AutoTokenizer.from_pretrained(hf_dir)
        self.batches = iter(
            {k: v.astype(np.int64) for k, v in tok(texts[i : i + 8], padding="max_length",
             truncation=True, max_length=seq, return_tensors="np").items() if k in names}
            for i in range(0, len(texts), 8)
        )  # fmt: skip

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8_static(src: Path, dst: Path, hf_dir: Path, seq: int = 128) -> None:
    """The candidate: static int8 (QDQ, per-channel int8 weights, uint8 activations whose ranges
    MinMax-calibrate on real text) of every MatMul, then the fused attention quantized
    dynamically as `quantize_int8` does (static quantization has no fused-Attention operator).
    The fused graph's contrib operators need symbolic shape inference first: without tensor
    types the quantizer leaves the activations in fp32 (weight-only int8, which onnxruntime
    turns into its slower MatMulNBits)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    shaped, matmuls = dst.with_suffix(".shaped.onnx"), dst.with_suffix(".matmuls.onnx")
    onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(src), auto_merge=True), shaped)
    floats = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_static(shaped, matmuls, RealTextCalibration(hf_dir, src, seq), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options=floats)  # fmt: skip
    quantize_dynamic(matmuls, dst, op_types_to_quantize=["Attention"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options=floats)  # fmt: skip
    shaped.unlink()
    matmuls.unlink()
