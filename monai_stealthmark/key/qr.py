"""QR helpers: payload -> module matrix (``qrcode``), fixed function patterns, rendering and decoding (``pyzbar``)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import qrcode
import qrcode.base
import qrcode.exceptions
import qrcode.util

from monai_stealthmark.utils import require_pyzbar

__all__ = [
    "ERROR_CORRECTION",
    "PayloadTooLongError",
    "make_qr_matrix",
    "qr_size_for_version",
    "qr_version_for_size",
    "function_pattern_mask",
    "restore_function_patterns",
    "render_qr",
    "decode_qr",
    "data_module_order",
    "read_format",
    "correct_codewords",
]

ERROR_CORRECTION = {
    "L": qrcode.constants.ERROR_CORRECT_L,
    "M": qrcode.constants.ERROR_CORRECT_M,
    "Q": qrcode.constants.ERROR_CORRECT_Q,
    "H": qrcode.constants.ERROR_CORRECT_H,
}


class PayloadTooLongError(ValueError):
    """The payload does not fit in a QR code of the largest version the watermark grid allows."""


def qr_size_for_version(version: int) -> int:
    """Modules per side of a QR code of ``version`` (1..40)."""
    return 17 + 4 * version


def qr_version_for_size(size: int) -> int:
    """Inverse of :func:`qr_size_for_version`."""
    if (size - 17) % 4 or not 1 <= (size - 17) // 4 <= 40:
        raise ValueError(f"{size} is not the side of a QR code (17 + 4 * version).")
    return (size - 17) // 4


def make_qr_matrix(payload: str, error_correction: str = "H", max_version: int = 4) -> np.ndarray:
    """Encode ``payload`` into the smallest QR code that fits, without quiet zone.

    Args:
        payload: the owner's text.
        error_correction: one of ``"L"``, ``"M"``, ``"Q"``, ``"H"``.
        max_version: the largest QR version the watermark grid can carry; longer payloads are refused.

    Returns:
        a boolean ``(n, n)`` array, True for dark modules.

    Raises:
        PayloadTooLongError: if the payload needs a version above ``max_version``.
    """
    if not isinstance(payload, str) or not payload:
        raise ValueError("payload must be a non-empty string.")
    if error_correction not in ERROR_CORRECTION:
        raise ValueError(f"error_correction must be one of {sorted(ERROR_CORRECTION)}, got {error_correction!r}.")
    qr = qrcode.QRCode(version=None, error_correction=ERROR_CORRECTION[error_correction], box_size=1, border=0)
    qr.add_data(payload)
    try:
        qr.make(fit=True)
    except (qrcode.exceptions.DataOverflowError, ValueError) as e:  # ValueError: would need a version > 40
        raise PayloadTooLongError(
            f"payload of {len(payload.encode())} bytes does not fit in any QR code at error correction "
            f"{error_correction}."
        ) from e
    if qr.version > max_version:
        raise PayloadTooLongError(
            f"payload of {len(payload.encode())} bytes needs QR version {qr.version} "
            f"({qr_size_for_version(qr.version)}x{qr_size_for_version(qr.version)} modules) at error correction "
            f"{error_correction}, but the watermark grid allows at most version {max_version} "
            f"({qr_size_for_version(max_version)} modules): use a shorter payload, a lower error correction, "
            "or a larger max_version (smaller modules, harder to embed)."
        )
    return np.asarray(qr.get_matrix(), dtype=bool)


@lru_cache(maxsize=None)
def _function_pattern(version: int) -> tuple[np.ndarray, np.ndarray]:
    n = qr_size_for_version(version)
    mask = np.zeros((n, n), dtype=bool)
    # finder patterns + separators (8x8 at three corners)
    mask[:8, :8] = True
    mask[:8, n - 8 :] = True
    mask[n - 8 :, :8] = True
    finders = mask.copy()
    # timing patterns
    mask[6, :] = True
    mask[:, 6] = True
    # alignment patterns (5x5), skipping those that overlap the finders
    centres = qrcode.util.pattern_position(version)
    for r in centres:
        for c in centres:
            if finders[r, c]:
                continue
            mask[r - 2 : r + 3, c - 2 : c + 3] = True
    # the dark module
    mask[4 * version + 9, 8] = True
    # version information blocks (v >= 7): fixed for a given version
    if version >= 7:
        mask[: 6, n - 11 : n - 8] = True
        mask[n - 11 : n - 8, :6] = True
    # values: the same in every QR of this version, so take them from any one of them
    qr = qrcode.QRCode(version=version, error_correction=qrcode.constants.ERROR_CORRECT_L, box_size=1, border=0)
    qr.add_data("0")
    qr.make(fit=False)
    values = np.asarray(qr.get_matrix(), dtype=bool)
    return mask, values & mask


def function_pattern_mask(version: int) -> tuple[np.ndarray, np.ndarray]:
    """The modules that are identical in every QR code of ``version`` and their values.

    Finder patterns with separators, timing patterns, alignment patterns, the dark module and (version >= 7)
    the version information. Format information is not included: it depends on the error correction level and
    the mask pattern. Restoring these modules needs no knowledge of the payload.

    Returns:
        ``(mask, values)``: two boolean ``(n, n)`` arrays.
    """
    mask, values = _function_pattern(version)
    return mask.copy(), values.copy()


def restore_function_patterns(modules: np.ndarray) -> np.ndarray:
    """Overwrite the fixed function patterns of a recovered ``(n, n)`` module matrix (see :func:`function_pattern_mask`)."""
    modules = np.asarray(modules, dtype=bool)
    mask, values = _function_pattern(qr_version_for_size(modules.shape[-1]))
    out = modules.copy()
    out[..., mask] = values[mask]
    return out


def render_qr(modules: np.ndarray, border: int = 4, scale: int = 8) -> np.ndarray:
    """Render a boolean module matrix as a black-on-white uint8 image with a quiet zone.

    Args:
        modules: ``(n, n)`` boolean array, True = dark.
        border: quiet zone in modules (the QR standard asks for 4).
        scale: pixels per module.
    """
    modules = np.asarray(modules, dtype=bool)
    if modules.ndim != 2 or modules.shape[0] != modules.shape[1]:
        raise ValueError(f"modules must be a square 2D matrix, got shape {modules.shape}.")
    img = np.where(np.pad(modules, border, constant_values=False), 0, 255).astype(np.uint8)
    return np.kron(img, np.ones((scale, scale), dtype=np.uint8))


def decode_qr(modules_or_image: np.ndarray) -> list[str]:
    """Decode QR codes with pyzbar.

    Args:
        modules_or_image: a boolean module matrix (rendered first) or a uint8 grey image.

    Returns:
        the decoded texts (empty when nothing decodes).
    """
    pyzbar = require_pyzbar()
    arr = np.asarray(modules_or_image)
    # 4 pixels per module: zbar decodes exactly the same read-outs as at 8 (181 of 220 first reads of five
    # watermarked models, 0 of 44 clean-model / wrong-key reads, at every scale 2-8; scale 1 loses two) in about
    # half the time (results/probes/scripts/qr_scale.py)
    img = render_qr(arr, scale=4) if arr.dtype == bool else arr.astype(np.uint8)
    results = pyzbar.decode(img, symbols=[pyzbar.ZBarSymbol.QRCODE])
    out = []
    for r in results:
        try:
            out.append(r.data.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(r.data.decode("latin-1"))
    return out


# --- Reed-Solomon correction with erasures -------------------------------------------------------------------
# zbar corrects up to (n - k) / 2 wrong codewords per block. A reader that knows which codewords are unreliable
# (erasures) can correct up to n - k of them: e erasures + 2 t errors <= n - k. The watermark's QR has such
# codewords: the modules over the organ and its band carry no QR by design (the hard mask must not move there),
# and the model's own output shows where the organ is. The functions below read the codewords out of a recovered
# module matrix along the standard placement, correct them with ``reedsolo`` (erasures + errors) and write the
# corrected codewords back, so that pyzbar decodes the result. Nothing comes from the key's QR: only the QR
# version and error correction level (the key's geometry) and the model's own bits and organ.


def _format_bits(error_correction: str, mask: int) -> np.ndarray:
    """The 15 format bits (least significant first) of an error correction level and mask pattern."""
    word = qrcode.util.BCH_type_info((ERROR_CORRECTION[error_correction] << 3) | mask)
    return np.array([(word >> i) & 1 for i in range(15)], dtype=bool)


def _format_positions(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(row, col)`` of format bit ``i`` (0 = least significant) in its two copies, as ``qrcode`` places them."""
    vert = [(i, 8) if i < 6 else (i + 1, 8) if i < 8 else (n - 15 + i, 8) for i in range(15)]
    horiz = [(8, n - i - 1) if i < 8 else (8, 15 - i) if i < 9 else (8, 14 - i) for i in range(15)]
    return vert, horiz


@lru_cache(maxsize=None)
def data_module_order(version: int) -> np.ndarray:
    """The data modules of a QR code of ``version`` in placement order (the zigzag of ISO/IEC 18004 8.7.3).

    Returns:
        ``(N, 2)`` int array of ``(row, col)``; bit ``j`` of the interleaved codeword stream (most significant bit
        of each codeword first) sits at row ``j``; positions past the last codeword hold remainder bits.
    """
    n = qr_size_for_version(version)
    taken, _ = _function_pattern(version)
    taken = taken.copy()
    vert, horiz = _format_positions(n)
    for r, c in vert + horiz:
        taken[r, c] = True
    order = []
    row, inc = n - 1, -1
    for col in range(n - 1, 0, -2):
        if col <= 6:
            col -= 1
        while True:
            for c in (col, col - 1):
                if not taken[row, c]:
                    order.append((row, c))
            row += inc
            if row < 0 or row >= n:
                row -= inc
                inc = -inc
                break
    return np.asarray(order, dtype=np.int64)


def read_format(modules: np.ndarray, error_correction: str | None = None) -> tuple[str, int, int]:
    """The format information of a recovered module matrix: the valid format word nearest to both copies.

    Args:
        modules: ``(n, n)`` boolean module matrix (True = dark).
        error_correction: restrict the search to this level (e.g. the key's); None searches all four.

    Returns:
        ``(error_correction, mask_pattern, hamming_distance)`` over the 30 format bits.
    """
    if error_correction is not None and error_correction not in ERROR_CORRECTION:
        raise ValueError(f"error_correction must be one of {sorted(ERROR_CORRECTION)} or None, got {error_correction!r}.")
    m = np.asarray(modules, dtype=bool)
    vert, horiz = _format_positions(m.shape[0])
    seen = np.array([m[p] for p in vert] + [m[p] for p in horiz])
    best = None
    for name in ERROR_CORRECTION:
        if error_correction is not None and name != error_correction:
            continue
        for mask in range(8):
            d = int((np.tile(_format_bits(name, mask), 2) != seen).sum())
            if best is None or d < best[2]:
                best = (name, mask, d)
    return best


def _block_layout(version: int, error_correction: str) -> list[tuple[list[int], int]]:
    """For each RS block, the indices of its codewords in the interleaved stream (data then EC) and its data count."""
    blocks = qrcode.base.rs_blocks(version, ERROR_CORRECTION[error_correction])
    pos: list[list[int]] = [[] for _ in blocks]
    j = 0
    for counts in ([b.data_count for b in blocks], [b.total_count - b.data_count for b in blocks]):  # data, then EC
        for i in range(max(counts)):
            for bi, c in enumerate(counts):
                if i < c:
                    pos[bi].append(j)
                    j += 1
    return [(p, b.data_count) for p, b in zip(pos, blocks)]


def correct_codewords(
    modules: np.ndarray, unreliable: np.ndarray, error_correction: str, min_unreliable: int = 2, spare: int = 4
) -> np.ndarray | None:
    """Reed-Solomon-correct a recovered QR with its unreliable codewords as erasures and write the result back.

    Args:
        modules: ``(n, n)`` boolean module matrix (True = dark), function patterns restored or not.
        unreliable: ``(n, n)`` boolean, the modules whose value the reader cannot trust (e.g. over the organ).
        error_correction: the QR's error correction level (the key's).
        min_unreliable: a codeword is erased when at least this many of its 8 modules are unreliable.
        spare: check symbols kept free of erasures in each block (the most unreliable codewords are erased first,
            at most ``n - k - spare`` per block), so every corrected block is still checked by ``spare`` symbols
            and can fix ``spare // 2`` further errors.

    Returns:
        the corrected ``(n, n)`` module matrix (format information and function patterns rewritten), or None when a
        block cannot be corrected.
    """
    from reedsolo import ReedSolomonError, RSCodec

    m = np.asarray(modules, dtype=bool)
    bad = np.asarray(unreliable, dtype=bool)
    if m.shape != bad.shape or m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"modules and unreliable must be the same square (n, n) matrix, got {m.shape} and {bad.shape}.")
    if error_correction not in ERROR_CORRECTION:
        raise ValueError(f"error_correction must be one of {sorted(ERROR_CORRECTION)}, got {error_correction!r}.")
    version = qr_version_for_size(m.shape[0])
    _, mask, _ = read_format(m, error_correction)
    order = data_module_order(version)
    layout = _block_layout(version, error_correction)
    n_cw = sum(len(p) for p, _ in layout)
    masked = np.array([qrcode.util.mask_func(mask)(int(r), int(c)) for r, c in order], dtype=bool)
    rows, cols, flip = order[: 8 * n_cw, 0], order[: 8 * n_cw, 1], masked[: 8 * n_cw]
    bits = (m[rows, cols] ^ flip).reshape(n_cw, 8)
    stream = np.packbits(bits, axis=1)[:, 0].astype(np.int64)
    n_bad = bad[rows, cols].reshape(n_cw, 8).sum(1)
    out = stream.copy()
    for pos, k in layout:
        nsym = len(pos) - k
        cand = [i for i in np.argsort(-n_bad[pos], kind="stable") if n_bad[pos][i] >= min_unreliable]
        erase = sorted(int(i) for i in cand[: max(0, nsym - spare)])
        try:
            _, full, _ = RSCodec(nsym, fcr=0, prim=0x11D, generator=2).decode(bytearray(int(v) for v in stream[pos]), erase_pos=erase)
        except ReedSolomonError:
            return None
        out[pos] = list(full)
    new_bits = np.unpackbits(out.astype(np.uint8)[:, None], axis=1).reshape(-1).astype(bool) ^ flip
    fixed = m.copy()
    fixed[rows, cols] = new_bits
    rest = order[8 * n_cw :]  # remainder bits: light before masking, as the encoder writes them
    fixed[rest[:, 0], rest[:, 1]] = masked[8 * n_cw :]
    for positions in _format_positions(m.shape[0]):
        fixed[tuple(np.array(positions).T)] = _format_bits(error_correction, mask)
    return restore_function_patterns(fixed)
