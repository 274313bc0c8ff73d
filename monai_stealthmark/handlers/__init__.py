"""Ignite wiring for MONAI engines: pixel AUC and watermark ASR metrics for evaluators, and the two small
handlers that let a stock bundle train and validate with the watermark, and ComMark-style simulated attacks."""

from __future__ import annotations

from .engine import StashProbabilities, StripWatermarkChannel
from .metrics import PixelAUC, WatermarkASR
from .robust import SimulatedAttacks
