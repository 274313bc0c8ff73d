"""MONAI transforms: keyed triggers (array + dict), the random training transform that embeds the QR, a per-sample
CutMix that helps the watermark stay invisible on unseen images, and the BadNet baseline's poisoning transform."""

from __future__ import annotations

from .badnet import RandBadNetd, badnet_region
from .mix import RandPoolCutMixd
from .trigger import (
    WM_CLEAN,
    WM_DARK,
    WM_LIGHT,
    WM_TWIN,
    RandWatermarkd,
    StampTrigger,
    StampTriggerd,
    apply_trigger,
    intensity_range,
    load_key,
    module_index_map,
    occlude_cells,
    patch_position,
    qr_target_map,
)
