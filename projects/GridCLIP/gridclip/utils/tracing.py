"""Whether the code runs under a graph capture (``torch.export``, ONNX export, TorchScript)."""

from __future__ import annotations

import torch

__all__ = ["is_exporting"]


def is_exporting() -> bool:
    """True while ``torch.export`` / the dynamo ONNX exporter captures a graph, or TorchScript
    traces or scripts one: eager-only shortcuts whose shapes depend on the data (or that
    replace modules a runtime fuses itself) then keep the plain form."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    exporting = getattr(compiler, "is_exporting", None)
    return bool(exporting()) if callable(exporting) else False
