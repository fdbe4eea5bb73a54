"""An exponential moving average of a model's weights (``train.ema_decay``).

After every outer update the average moves toward the model: ``avg <- d * avg + (1 - d) * w`` for
every floating-point entry of the state dict (parameters and batch-norm running statistics alike, as
timm's ``ModelEmaV2`` does), and integer entries (``num_batches_tracked``) are copied. The decay
warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` after t updates, so the random initial weights
fade within the first few dozen steps instead of lingering for ~1 / (1 - decay) of them.

Validation, the final test, ``fewshot eval`` and the kept ``best.pt`` use the average; training and
resume use the model's own weights. A checkpoint carries both: ``model`` (the trained weights, what
resume loads) and ``ema`` (this object's state); :func:`eval_weights` picks the one to evaluate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        t = self.updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        avg, new = [], []
        for k, v in module.state_dict().items():
            e = self.weights[k]
            if e.is_floating_point():
                avg.append(e)
                new.append(v.detach())
            else:
                e.copy_(v)
        if avg:
            torch._foreach_lerp_(avg, new, 1.0 - d)

    @contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """Run the block with the average loaded into ``module``; its own weights come back after."""
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.weights)
        try:
            yield
        finally:
            module.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.weights):
            raise KeyError(f"the average's entries differ from the model's "
                           f"({sorted(set(weights) ^ set(self.weights))[:3]})")
        for k, v in weights.items():
            if tuple(v.shape) != tuple(self.weights[k].shape):
                raise RuntimeError(f"size mismatch for {k}: {tuple(v.shape)} against {tuple(self.weights[k].shape)}")
            self.weights[k].copy_(v)
        self.updates = int(state["updates"])


def eval_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint is evaluated with: its weight average where it has one."""
    ema = state.get("ema")
    return ema["weights"] if ema else state["model"]
