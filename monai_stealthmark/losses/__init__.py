"""Losses: the uncertainty-guided watermark loss wrapping any MONAI segmentation loss, its feature coupling, and
fidelity to a clean teacher."""

from __future__ import annotations

from .coupling import FeatureCouplingLoss
from .teacher import CleanTeacherLoss
from .watermark import UncertaintyWatermarkLoss
