"""Ignite handlers for MONAI engines: the pixel AUC and watermark ASR metrics for evaluators (thin
``IgniteMetricHandler`` wrappers of :mod:`monai_stealthmark.metrics`), the two handlers that let a stock bundle
train and validate with the watermark, and ComMark-style simulated attacks during training.

Layering: ``handlers`` import ``metrics``, ``verify``, ``key`` and ``utils``; nothing below imports ``handlers``.
"""

from __future__ import annotations

from .auc import PixelAUC
from .probabilities import StashProbabilities
from .simulated_attacks import SimulatedAttacks
from .watermark_asr import WatermarkASR
from .watermark_channel import StripWatermarkChannel

__all__ = ["PixelAUC", "SimulatedAttacks", "StashProbabilities", "StripWatermarkChannel", "WatermarkASR"]
