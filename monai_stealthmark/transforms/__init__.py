"""MONAI transforms: keyed triggers (array + dict), the random training transform that embeds the QR, a per-sample
CutMix that helps the watermark stay invisible on unseen images, and the BadNet baseline's poisoning transform."""

from __future__ import annotations

from .badnet import RandBadNetd, badnet_region
from .batch import WatermarkBatch, WatermarkDraws, WatermarkPrepareBatch
from .mix import RandPoolCutMixd
from .trigger import RandWatermarkd, StampTrigger, StampTriggerd
