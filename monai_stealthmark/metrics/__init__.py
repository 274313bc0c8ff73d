"""Metrics in MONAI's form (``CumulativeIterationMetric``: call per batch, ``aggregate()`` per epoch, DDP-gathered),
usable in a plain PyTorch loop; the ignite handlers that report them live in :mod:`monai_stealthmark.handlers`.

Layering: ``metrics`` imports ``key``, ``utils`` and the public names of ``verify`` (the ASR reads the QR as a
verification does); ``verify`` never imports ``metrics`` or ``handlers``.
"""

from __future__ import annotations

from .auc import AVERAGES, PixelAUCMetric, pixel_auc, reduce_auc
from .watermark_asr import WatermarkASRMetric

__all__ = ["AVERAGES", "PixelAUCMetric", "WatermarkASRMetric", "pixel_auc", "reduce_auc"]
