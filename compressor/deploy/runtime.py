"""onnxruntime sessions: one place sets providers and threads (verification and benchmark)."""

from __future__ import annotations

from pathlib import Path


def onnx_providers(cpu_only: bool = False) -> list[str]:
    """CUDA first when this onnxruntime build has it (unless `cpu_only`), else the CPU provider."""
    import onnxruntime as ort

    cuda = not cpu_only and "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def ort_session(onnx_path: Path, threads: int | None = None, cpu_only: bool = True):
    """An InferenceSession with `threads` intra-op threads (one inter-op thread) when given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts, providers=onnx_providers(cpu_only))
