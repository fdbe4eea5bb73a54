"""Whether a tensor is inside a ``torch.func`` transform: the fused kernels need plain storage, and
batch norm must be written from primitives there (backbones/norm.py)."""

from __future__ import annotations

import torch


def is_transformed(t: torch.Tensor | None) -> bool:
    """True for tensors inside ``torch.func`` transforms (vmap, grad)."""
    try:
        return t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return False
