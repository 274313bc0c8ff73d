"""Ignite wiring for MONAI engines: pixel AUC and watermark ASR metrics for evaluators."""

from __future__ import annotations

from .metrics import PixelAUC, WatermarkASR
