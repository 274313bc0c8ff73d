"""Ignite handlers that let a stock MONAI trainer/evaluator carry the watermark without changing its code.

- :class:`StripWatermarkChannel` (trainer): the label from :class:`~monai_stealthmark.transforms.RandWatermarkd`
  carries one extra watermark channel for the loss; right after the loss it is removed from
  ``engine.state.output`` so the bundle's own train post-processing and metrics see the plain label.
- :class:`StashProbabilities` (evaluator): right after the forward pass the network's probabilities are copied
  to ``engine.state.output[out_key]`` before the bundle's post-processing turns ``pred`` into a hard mask,
  so :class:`~monai_stealthmark.handlers.PixelAUC` can score them.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = ["StripWatermarkChannel", "StashProbabilities"]


class StripWatermarkChannel:
    """Remove the watermark channel from the trainer's label once the loss has been computed.

    Args:
        label_key: the label field of ``engine.state.output``.
        n_label_channels: channels of the plain label (1 for class indices). The watermark channel is the last.
    """

    def __init__(self, label_key: str = CommonKeys.LABEL, n_label_channels: int = 1) -> None:
        if n_label_channels < 1:
            raise ValueError(f"n_label_channels must be >= 1, got {n_label_channels}.")
        self.label_key = label_key
        self.n_label_channels = int(n_label_channels)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        label = out.get(self.label_key) if isinstance(out, dict) else None
        if label is None:
            raise RuntimeError(f"StripWatermarkChannel: engine.state.output has no {self.label_key!r} field.")
        if label.shape[1] == self.n_label_channels + 1:
            out[self.label_key] = label[:, : self.n_label_channels]
        elif label.shape[1] != self.n_label_channels:
            raise ValueError(
                f"StripWatermarkChannel: label has {label.shape[1]} channels, expected {self.n_label_channels} "
                f"(+1 watermark channel)."
            )


class StashProbabilities:
    """Copy the network's probabilities into ``engine.state.output[out_key]`` right after the forward pass.

    Args:
        activation: ``"softmax"``, ``"sigmoid"`` or None (the network already returns probabilities).
        pred_key: the prediction field.
        out_key: where the probabilities go (decollated with the rest of the output by the post-processing).
    """

    def __init__(self, activation: str | None = "softmax", pred_key: str = CommonKeys.PRED, out_key: str = "prob") -> None:
        if activation not in ("softmax", "sigmoid", None):
            raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}.")
        self.activation = activation
        self.pred_key = pred_key
        self.out_key = out_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        pred = torch.as_tensor(engine.state.output[self.pred_key]).detach().float()
        if self.activation == "softmax":
            pred = torch.softmax(pred, 1)
        elif self.activation == "sigmoid":
            pred = torch.sigmoid(pred)
        engine.state.output[self.out_key] = pred
