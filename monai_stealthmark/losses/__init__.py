"""Losses: the uncertainty-guided watermark loss wrapping any MONAI segmentation loss, and its feature coupling."""

from __future__ import annotations

from .coupling import FeatureCouplingLoss
from .watermark import UncertaintyWatermarkLoss
