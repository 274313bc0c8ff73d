"""The watermark's attack-success rate (ASR) as a cumulative metric: the share of triggered images whose QR
decodes exactly to the key's payload.

Layering: this module runs the per-image read itself, through the public
:func:`monai_stealthmark.verify.verify_ownership` (trigger, query, read-out and decoding exactly as a black-box
verification does), so a monitored ASR and a verification report never disagree. ``verify`` imports neither
``metrics`` nor ``handlers``; ``metrics`` imports ``verify``; ``handlers`` import both (the handler
:class:`monai_stealthmark.handlers.WatermarkASR` wraps the evaluator's network in a
:class:`~monai_stealthmark.verify.ModelQuery` and feeds this metric).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_tensor

from monai_stealthmark.key import WatermarkKey, load_key
from monai_stealthmark.verify import verify_ownership

__all__ = ["WatermarkASRMetric"]

MODES = ("direct", "lime")


def _no_outcomes() -> list[torch.Tensor]:
    """Empty ``[decoded, bit_accuracy]``, for calls that read no image."""
    return [torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]


class WatermarkASRMetric(CumulativeIterationMetric):
    """Attack-success rate and bit accuracy of the watermark over the images seen since the last reset.

    Each call stamps the key's trigger on the given clean images, queries the model once per image (direct
    mode) and reads the QR from its probabilities; the buffers keep one outcome per image: whether the QR decoded
    exactly to the payload, and its bit accuracy. The query and read happen where the images are seen (each
    DDP rank queries its own replica), and only the outcomes are gathered across ranks.

    Usage::

        asr = WatermarkASRMetric(key, query=ModelQuery(net, activation="softmax"))
        for batch in loader:
            asr(batch["image"])
        print(asr.aggregate(), asr.mean_bit_accuracy())

    Args:
        key: the watermark key or its file path.
        query: ``images -> probability maps`` (e.g. :class:`~monai_stealthmark.verify.ModelQuery`); may instead be
            given per call as ``metric(images, query=...)``.
        mode: ``"direct"`` (mean uncertainty per QR module; cheap) or ``"lime"`` (LIME attributions).
        max_images: images read between two resets on this rank (the first ones seen); None = all. Further
            images are ignored without a query.
        lime_samples: LIME perturbation samples per image in LIME mode.
    """

    def __init__(
        self,
        key: WatermarkKey | str,
        query: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mode: str = "direct",
        max_images: int | None = None,
        lime_samples: int = 300,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be 'direct' or 'lime', got {mode!r}.")
        if max_images is not None and int(max_images) < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}.")
        self.key = load_key(key)
        self.query = query
        self.mode = mode
        self.max_images = None if max_images is None else int(max_images)
        self.lime_samples = int(lime_samples)

    @property
    def room(self) -> int | None:
        """How many more images this rank reads before the next reset (None: no limit)."""
        return None if self.max_images is None else max(self.max_images - self._n_read, 0)

    def reset(self) -> None:
        """Empty the buffers and the count of images read."""
        super().reset()
        self._n_read = 0

    def __call__(self, y_pred, y=None, **kwargs) -> list[torch.Tensor]:  # type: ignore[override]
        """Read the watermark on clean images (a batch or a list; ``y`` is unused): see :meth:`_compute_tensor`.
        Once ``max_images`` are read, further calls neither query nor record anything."""
        if self.room == 0:
            return _no_outcomes()
        return super().__call__(y_pred, y, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, query: Callable | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        """Read the watermark on a batch of clean images ``y_pred`` ``(B, C, spatial...)`` (``y`` is unused).

        Returns:
            ``[decoded, bit_accuracy]``, each ``(B',)`` float64 (``B' <= B`` after ``max_images``); ``decoded``
            is 1 where the QR decoded exactly to the payload.
        """
        query = query or self.query
        if query is None:
            raise ValueError("WatermarkASRMetric needs a query: pass query= to the constructor or to the call.")
        room = self.room
        images = convert_to_tensor(y_pred, track_meta=False)
        images = images if room is None else images[:room]
        if images.shape[0] == 0:
            return _no_outcomes()
        report = verify_ownership(query, images, self.key, mode=self.mode, lime_samples=self.lime_samples)
        self._n_read += images.shape[0]
        decoded = torch.tensor([text == self.key.payload for text in report.decoded], dtype=torch.float64)
        return [decoded, torch.tensor(report.bit_accuracy, dtype=torch.float64)]

    def _compute_list(self, y_pred, y=None, **kwargs) -> list[torch.Tensor]:  # type: ignore[override]
        """Decollated images: one query for all of them when they share a shape, else one per image."""
        images = [torch.as_tensor(i).detach() for i in y_pred]
        if len({tuple(i.shape) for i in images}) == 1:
            return self._compute_tensor(torch.stack(images), None, **kwargs)
        return super()._compute_list(images, None, **kwargs)

    def _outcomes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered ``(decoded, bit_accuracy)`` of all ranks; RuntimeError when no image was read."""
        buffers = self.get_buffer()
        if buffers is None or buffers[0].numel() == 0:
            raise RuntimeError("WatermarkASRMetric read no images since the last reset.")
        return buffers[0], buffers[1]

    def aggregate(self) -> float:
        """The ASR: share of the images read (all ranks) whose QR decoded exactly to the payload."""
        decoded, _ = self._outcomes()
        return float(decoded.sum() / decoded.numel())

    def mean_bit_accuracy(self) -> float:
        """Mean share of QR data modules read correctly, over the images read (all ranks)."""
        _, bits = self._outcomes()
        return float(bits.sum() / bits.numel())
