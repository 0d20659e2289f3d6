"""What an ONNX file takes and gives, read from the file itself, in the form of the ONNX Model
Hub's manifest (`opset_version`, `io_ports` with each port's name, `tensor(...)` type and shape):
the zoo manifest records it per ONNX file, so a deployer can see the contract without a runtime.

    {"opset_version": 18, "opset_import": {"ai.onnx": 18, "com.microsoft": 1}, "ir_version": 8,
     "io_ports": {"inputs": [{"name": "input_ids", "type": "tensor(int64)",
                              "shape": ["batch_size", "sequence_length"],
                              "dynamic_axes": {"0": "batch_size", "1": "sequence_length"}}, ...],
                  "outputs": [...]}}

A dimension is its size when fixed, its symbolic name when dynamic (None when unnamed);
`dynamic_axes` maps each dynamic axis to its name, as torch.onnx.export's argument does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.errors import CheckFailed


def onnx_signature(path: Path) -> dict[str, Any]:
    """Opset and input/output ports of the ONNX file at `path` (weights are not read). A file
    that does not parse as ONNX raises CheckFailed naming it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as err:
        raise CheckFailed(f"{path}: not a readable ONNX file ({err})") from err
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    return {
        "opset_version": opsets.get("ai.onnx"),
        "opset_import": dict(sorted(opsets.items())),
        "ir_version": model.ir_version,
        "io_ports": {
            "inputs": [_port(v) for v in _real_inputs(model.graph)],
            "outputs": [_port(v) for v in model.graph.output],
        },
    }


def _real_inputs(graph) -> list:
    """Graph inputs that are not initializers (old exporters list the weights as inputs too)."""
    weights = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in weights]


def _port(value) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    shape: list[int | str | None] = []
    dynamic: dict[str, str | None] = {}
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(dim.dim_param or None)
            dynamic[str(axis)] = dim.dim_param or None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    type_name = {"float32": "float", "float64": "double"}.get(dtype, dtype)
    return {
        "name": value.name,
        "type": f"tensor({type_name})",
        "shape": shape,
        "dynamic_axes": dynamic,
    }
