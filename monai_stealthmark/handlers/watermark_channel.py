"""Trainer handler :class:`StripWatermarkChannel`: the label that the watermark stage builds carries one extra
watermark channel for the loss; right after the loss it is removed from ``engine.state.output`` (and, for the batch
stage, so are the triggered copies it added), so a stock bundle's own train post-processing and metrics see the
batch it loaded, with the plain label, and its code stays unchanged."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from monai_stealthmark.key import WM_DARK, WM_LIGHT

__all__ = ["StripWatermarkChannel"]


class StripWatermarkChannel:
    """Remove the watermark channel from the trainer's label once the loss has been computed.

    Args:
        label_key: the label field of ``engine.state.output``.
        n_label_channels: channels of the plain label (1 for class indices). The watermark channel is the last.
            None: the batch-level watermark stage's output (:class:`~monai_stealthmark.transforms.WatermarkBatch`,
            paired): the last channel is dropped whatever the label's channel count, and so are the triggered
            copies the stage added after their clean twins, so image, label and prediction hold the loaded samples
            the step trained on, in their order (MONAI's post-processing pairs them with it; with the stage's
            ``keep_batch_size`` the loaded batch's last samples gave way to the copies).
    """

    def __init__(self, label_key: str = CommonKeys.LABEL, n_label_channels: int | None = 1) -> None:
        if n_label_channels is not None and n_label_channels < 1:
            raise ValueError(f"n_label_channels must be >= 1, got {n_label_channels}.")
        self.label_key = label_key
        self.n_label_channels = None if n_label_channels is None else int(n_label_channels)

    def attach(self, engine: Engine) -> None:
        """Run after every iteration's loss (MONAI's ``IterationEvents.LOSS_COMPLETED``)."""
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Drop the last label channel when present; refuse labels with neither channel count."""
        out = engine.state.output
        label = out.get(self.label_key) if isinstance(out, dict) else None
        if label is None:
            raise RuntimeError(f"StripWatermarkChannel: engine.state.output has no {self.label_key!r} field.")
        if self.n_label_channels is None:
            flags = label[:, -1].flatten(1).amax(1)
            keep = (flags != WM_LIGHT) & (flags != WM_DARK)  # the clean samples and twins: the loaded batch
            for k in (CommonKeys.IMAGE, CommonKeys.PRED):
                if isinstance(out.get(k), torch.Tensor) and out[k].shape[0] == label.shape[0]:
                    out[k] = out[k][keep]
            out[self.label_key] = label[keep, :-1]
        elif label.shape[1] == self.n_label_channels + 1:
            out[self.label_key] = label[:, : self.n_label_channels]
        elif label.shape[1] != self.n_label_channels:
            raise ValueError(
                f"StripWatermarkChannel: label has {label.shape[1]} channels, expected {self.n_label_channels} "
                f"(+1 watermark channel)."
            )
