"""Keys: payload -> QR code, trigger seed and parameters; JSON key files with a SHA-256 fingerprint; the trigger
geometry a key lays over an image; the key's output mark (a faint keyed pattern every answer can carry)."""

from __future__ import annotations

from .geometry import (
    WM_CLEAN,
    WM_DARK,
    WM_LIGHT,
    WM_TWIN,
    apply_trigger,
    intensity_range,
    load_key,
    module_index_map,
    occlude_cells,
    patch_position,
    qr_target_map,
)
from .key import KEY_FORMAT, TRIGGER_KINDS, KeyFileError, WatermarkKey
from .output_mark import (
    OUTPUT_MARK_CELLS,
    OUTPUT_MARK_LEVEL,
    output_mark_cells,
    output_mark_target,
)
from .qr import (
    PayloadTooLongError,
    correct_codewords,
    data_module_order,
    decode_qr,
    function_pattern_mask,
    make_qr_matrix,
    qr_size_for_version,
    qr_version_for_size,
    read_format,
    render_qr,
    restore_function_patterns,
)
