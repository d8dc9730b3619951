"""Which device a graph runs on, read from its tensors."""
from __future__ import annotations

import torch


def device_of_tensor_type(device_type: str) -> str:
    """cuda with torch.version.hip -> rocm; cuda -> cuda; npu; musa; anything else -> inductor."""
    if device_type == "cuda":
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    if device_type in ("npu", "musa"):
        return device_type
    return "inductor"


def detect_device(graph: torch.fx.Graph) -> str:
    """The lowering name for the first accelerator tensor among the graph's inputs."""
    return detect_from_tensors(n.meta.get("val") for n in graph.nodes if n.op == "placeholder")


def detect_from_tensors(values) -> str:
    """The lowering name for a set of (example) tensors: an accelerator wins over cpu."""
    kinds = {v.device.type for v in values if isinstance(v, torch.Tensor)}
    for kind in ("cuda", "npu", "musa"):
        if kind in kinds:
            return device_of_tensor_type(kind)
    return "inductor"
