"""Losses: the uncertainty-guided watermark loss, wrapping any MONAI segmentation loss."""

from __future__ import annotations

from .watermark import UncertaintyWatermarkLoss, sample_flags
