"""MONAI transforms: keyed triggers (array + dict) and the random training transform that embeds the QR."""

from __future__ import annotations

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
    qr_target_map,
)
