"""Evaluator handler :class:`StashProbabilities`: right after the forward pass the network's probabilities are
copied to ``engine.state.output[out_key]``, before a stock bundle's post-processing turns ``pred`` into a hard
mask, so :class:`~monai_stealthmark.handlers.PixelAUC` can score them."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from monai_stealthmark.utils import activate, check_activation

__all__ = ["StashProbabilities"]


class StashProbabilities:
    """Copy the network's probabilities into ``engine.state.output[out_key]`` right after the forward pass.

    Args:
        activation: ``"softmax"``, ``"sigmoid"`` or None (the network already returns probabilities).
        pred_key: the prediction field.
        out_key: where the probabilities go (decollated with the rest of the output by the post-processing).
    """

    def __init__(self, activation: str | None = "softmax", pred_key: str = CommonKeys.PRED, out_key: str = "prob") -> None:
        self.activation = check_activation(activation, allow_none=True)
        self.pred_key = pred_key
        self.out_key = out_key

    def attach(self, engine: Engine) -> None:
        """Run after every iteration's forward pass (MONAI's ``IterationEvents.FORWARD_COMPLETED``)."""
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Store the activated prediction; ``pred`` itself is left unchanged."""
        pred = torch.as_tensor(engine.state.output[self.pred_key]).detach().float()
        engine.state.output[self.out_key] = activate(pred, self.activation)
