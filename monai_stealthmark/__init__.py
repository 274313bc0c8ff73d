"""monai-stealthmark: a secret, harmless ownership watermark for MONAI segmentation models, verified black-box."""

from __future__ import annotations

__version__ = "0.1.0"
