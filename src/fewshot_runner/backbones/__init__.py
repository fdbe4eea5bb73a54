"""Feature extractors: plain ``nn.Module``s built as ``Backbone(x_shape=(C, H, W), **backbone config)``,
so gradient-based meta-learners can run them with ``torch.func.functional_call``.

The contract (what learners and the engine may use; nothing else is probed):

* ``forward(x)``: (N, *x_shape) -> flat features (N, feature_dim).  Every backbone.  The engine measures
  ``feature_dim`` with one forward of two zero images and passes it to the learner.
* ``forward_map(x)``: (N, *x_shape) -> feature maps (N, C, h, w), before flattening.  Convolutional
  backbones (Conv4).  Learners that compare maps declare ``feature_kind = "map"``
  (algorithms/base.py); building one on a backbone without ``forward_map`` is refused in one line.
* ``forward_tasks(x, params)``: T tasks at once, each with its own weights ((T, N, ...) -> (T, N, D)),
  as the groups of grouped convolutions.  Optional (Conv4): the gradient-based learners' fast path.
* ``has_max_pool``: True where max-pool blocks make ``torch.func.vmap`` slower than the per-task loop
  on CPU (read by ``algorithms.gradient.task_mode``).  Default: absent, False.
"""

from __future__ import annotations

import torch
from torch import nn


def use_channels_last(module: nn.Module) -> nn.Module:
    """Run ``module``'s convolutional blocks in channels-last (NHWC) memory: 4-d parameters are
    converted and every submodule with a ``channels_last`` attribute (``ConvBlock``) turns it on,
    so its inputs and weights are handed to the convolution NHWC (the fused batch-norm op then
    runs its NHWC kernels).  Results are the same up to fp32 rounding; see docs/speed.md for speed."""
    for m in module.modules():
        if hasattr(m, "channels_last"):
            m.channels_last = True
    return module.to(memory_format=torch.channels_last)
