"""Keys: payload -> QR code, trigger seed and parameters; JSON key files with a SHA-256 fingerprint."""

from __future__ import annotations

from .key import KEY_FORMAT, TRIGGER_KINDS, KeyFileError, WatermarkKey
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
