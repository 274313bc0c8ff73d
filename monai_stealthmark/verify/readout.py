"""Reading the QR out of per-module scores: cell means, Otsu threshold, function-pattern restore, decode, statistics."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import binom

from monai_stealthmark.key import (
    WatermarkKey,
    correct_codewords,
    decode_qr,
    function_pattern_mask,
    restore_function_patterns,
)
from monai_stealthmark.key.geometry import cell_means
from monai_stealthmark.utils import dilate
from monai_stealthmark.verify.query import is_softmax_output, uncertainty_map

__all__ = [
    "LIME_LOG_FLOOR",
    "ERASURE_MARGIN_PX",
    "organ_modules",
    "organ_mask",
    "uncertainty_scores",
    "cell_means",
    "otsu_threshold",
    "scores_to_modules",
    "read_qr",
    "read_scores",
    "vote_modules",
    "bit_accuracy",
    "binomial_p_value",
]

LIME_LOG_FLOOR = 0.03  # LIME maps are thresholded on the log scale with this floor (see scores_to_modules)
ERASURE_MARGIN_PX = 4  # the predicted organ widened by this many pixels is not read (see uncertainty_scores)
ORGAN_COVER = 0.5  # modules that the widened organ covers for at least this share are erasures (see organ_modules)


def otsu_threshold(x: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each row of ``x`` ``(B, N)``: the split maximising the between-class variance."""
    s, _ = torch.sort(x.double(), dim=1)
    n = s.shape[1]
    csum = torch.cumsum(s, 1)
    k = torch.arange(1, n, device=x.device, dtype=torch.float64)
    w0 = k / n
    m0 = csum[:, :-1] / k
    m1 = (csum[:, -1:] - csum[:, :-1]) / (n - k)
    between = w0 * (1 - w0) * (m0 - m1) ** 2
    i = between.argmax(1)
    return ((s.gather(1, i[:, None]) + s.gather(1, i[:, None] + 1)) / 2)[:, 0].to(x.dtype)


def scores_to_modules(scores: torch.Tensor, key: WatermarkKey, log_floor: float | None = None) -> np.ndarray:
    """Threshold per-cell scores (high = dark) with Otsu over the QR area, quiet zone dropped.

    LIME attributions are right-skewed: a few dark cells far from the organ carry strong attributions, others
    (near the organ, on black borders) a fraction of them, and Otsu on the raw values splits the strong cells
    from the rest. ``log_floor`` runs Otsu on ``log(max(s, log_floor * max(s)))`` per image instead, which
    compresses that tail (the demo's occlusion-0.2 model, LIME at 300 samples: bits 0.877 -> 0.940, decodes
    0 -> 17 of 22). The direct read-out's uncertainty means are well separated and stay on the raw scale: the
    log scale lifts faint light cells there (a 400-step UNet: direct decodes 22 -> 17 of 22).

    Args:
        scores: ``(B, grid_size**2)``.
        key: the watermark key (grid geometry).
        log_floor: floor of the log transform relative to each image's highest score; None (default)
            thresholds the raw scores. :func:`~monai_stealthmark.verify.verify_ownership` uses
            :data:`LIME_LOG_FLOOR` in LIME mode.

    Returns:
        ``(B, n, n)`` boolean module matrices (True = dark), function patterns not yet restored.
    """
    g, q = key.grid_size, key.quiet_zone
    inner = scores.reshape(-1, g, g)[:, q : g - q, q : g - q].reshape(scores.shape[0], -1).double()
    if log_floor is not None:
        if not 0.0 < log_floor < 1.0:
            raise ValueError(f"log_floor must lie in (0, 1) or be None, got {log_floor}.")
        top = inner.amax(1, keepdim=True).clamp_min(1e-12)  # an image without any positive score reads as all light
        inner = torch.log(torch.maximum(inner, log_floor * top))
    thr = otsu_threshold(inner)
    bits = inner > thr[:, None]
    n = g - 2 * q
    return bits.reshape(-1, n, n).cpu().numpy()


def read_qr(modules: np.ndarray) -> list[str | None]:
    """Restore function patterns and decode each ``(n, n)`` module matrix; None where nothing decodes."""
    out = []
    for m in np.asarray(modules, dtype=bool):
        texts = decode_qr(restore_function_patterns(m))
        out.append(texts[0] if texts else None)
    return out


def organ_mask(probs: torch.Tensor, margin_px: int = ERASURE_MARGIN_PX) -> torch.Tensor:
    """``(B, spatial...)`` bool: the model's own predicted organ widened by ``margin_px`` pixels (in plane and
    through slices for 3D). Foreground is any class but the first for softmax outputs, any channel above 0.5 for
    sigmoid ones: no ground truth is needed."""
    if probs.ndim not in (4, 5):
        raise ValueError(f"probs must be (B, C, H, W[, D]), got shape {tuple(probs.shape)}.")
    fg = (probs.argmax(1) > 0) if is_softmax_output(probs) else (probs > 0.5).any(1)
    return dilate(fg[:, None], margin_px)[:, 0]


def uncertainty_scores(probs: torch.Tensor, key: WatermarkKey, margin_px: int = ERASURE_MARGIN_PX) -> torch.Tensor:
    """The direct read's per-cell scores ``(B, grid_size**2)``: each cell's mean uncertainty over its pixels off
    the predicted organ (:func:`organ_mask`), where the watermark writes the QR; a cell the organ covers whole
    takes the mean of all its pixels.

    The QR lives in the background, so the organ's confident pixels would dilute a dark cell's mean in proportion
    to how much of it the organ covers. In 3D the grid repeats through the slices and the organ covers part of
    most cells' columns; averaging them whole reads many dark cells as light.
    """
    return cell_means(uncertainty_map(probs), key, weights=~organ_mask(probs, margin_px))


def organ_modules(
    probs: torch.Tensor, key: WatermarkKey, margin_px: int = ERASURE_MARGIN_PX, min_cover: float = ORGAN_COVER
) -> np.ndarray:
    """The QR modules that the model's own predicted organ, widened by ``margin_px`` pixels, covers for the most
    part.

    The watermark carries no QR over the organ and the band around it (the hard mask must not move there), so a
    reader should not trust a module whose pixels are mostly there; the direct read scores the rest of a module's
    pixels (:func:`uncertainty_scores`). The organ is what the queried model predicts (foreground = any class
    but the first for softmax outputs, any channel above 0.5 for sigmoid ones): no ground truth is needed.

    Args:
        probs: the model's probability maps ``(B, C, spatial...)`` for the triggered query.
        key: the watermark key (grid geometry).
        margin_px: dilation of the predicted organ in pixels (in-plane and through slices for 3D).
        min_cover: share of a module's pixels (its column through the slices in 3D) that the widened organ must
            cover for the module to count; a small value marks every module the organ touches.

    Returns:
        ``(B, n, n)`` boolean, the QR area's modules (quiet zone dropped) that the widened organ covers.
    """
    if not 0.0 < min_cover <= 1.0:
        raise ValueError(f"min_cover must lie in (0, 1], got {min_cover}.")
    fg = organ_mask(probs, margin_px).float()
    g, q = key.grid_size, key.quiet_zone
    covered = cell_means(fg, key).reshape(-1, g, g)[:, q : g - q, q : g - q] >= min_cover - 1e-6
    return covered.cpu().numpy()


def _erasure_read(modules: np.ndarray, unreliable: np.ndarray, key: WatermarkKey) -> str | None:
    fixed = correct_codewords(restore_function_patterns(modules), unreliable, key.error_correction)
    if fixed is None:
        return None
    texts = decode_qr(fixed)
    return texts[0] if texts else None


def read_scores(
    scores: torch.Tensor, key: WatermarkKey, mode: str = "direct", unreliable: np.ndarray | None = None
) -> tuple[np.ndarray, list[str | None], str | None, list[str | None]]:
    """Binarise and decode per-cell scores as :func:`~monai_stealthmark.verify.verify_ownership` does.

    Reads, each only for the images (and the vote) that the previous ones did not decode, as barcode readers try
    several binarisations of one picture:

    1. ``"raw"``: Otsu on the raw scores (direct mode) or on the log scale (LIME mode, :data:`LIME_LOG_FLOOR`);
    2. ``"log"`` (direct mode): Otsu on the log scale. Dark cells that the organ's band partly covers carry a
       diluted mean that raw Otsu can put on the light side; the log scale keeps them (measured on the demo's
       seed-2 model: 16 -> 22 of 22 decodes; clean model and wrong key 0 either way);
    3. ``"erasure"`` (when ``unreliable`` is given, e.g. :func:`organ_modules`): the first read's modules with the
       codewords that the organ covers marked as erasures, corrected by Reed-Solomon
       (:func:`~monai_stealthmark.key.correct_codewords`: erasures cost half of what unknown errors do) and
       decoded by pyzbar. The watermark leaves those modules empty by design, so zbar, which has to treat them as
       unknown errors, wastes half its correction on them.

    The returned modules are the first read, so bit accuracy and p-value do not depend on which read decoded.

    Args:
        scores: ``(B, grid_size**2)`` per-cell scores (high = dark).
        key: the watermark key (grid geometry, error correction level).
        mode: ``"direct"`` or ``"lime"``.
        unreliable: ``(B, n, n)`` boolean, modules the reader cannot trust; None skips the erasure read.

    Returns:
        ``(modules, decoded, vote_decoded, reads)``: the first read's ``(B, n, n)`` modules, each image's decoded
        text (None where no read decodes), the text of the per-module majority vote over all images, and which
        read decoded each image (``"raw"``, ``"log"``, ``"erasure"`` or None).
    """
    if mode not in ("direct", "lime"):
        raise ValueError(f"mode must be 'direct' or 'lime', got {mode!r}.")
    modules = scores_to_modules(scores, key, log_floor=LIME_LOG_FLOOR if mode == "lime" else None)
    if unreliable is not None:
        unreliable = np.asarray(unreliable, dtype=bool)
        if unreliable.shape != modules.shape:
            raise ValueError(f"unreliable must have the modules' shape {modules.shape}, got {unreliable.shape}.")
    decoded = read_qr(modules)
    reads: list[str | None] = ["raw" if t is not None else None for t in decoded]
    vote_decoded = read_qr(vote_modules(modules)[None])[0]
    missing = [i for i, t in enumerate(decoded) if t is None]
    if mode == "direct" and (missing or vote_decoded is None):
        second = scores_to_modules(scores, key, log_floor=LIME_LOG_FLOOR)
        for i, t in zip(missing, read_qr(second[missing])):
            decoded[i] = t
            reads[i] = "log" if t is not None else None
        if vote_decoded is None:
            vote_decoded = read_qr(vote_modules(second)[None])[0]
    if unreliable is not None:
        for i in [i for i, t in enumerate(decoded) if t is None]:
            decoded[i] = _erasure_read(modules[i], unreliable[i], key)
            reads[i] = "erasure" if decoded[i] is not None else None
        if vote_decoded is None:
            vote_decoded = _erasure_read(vote_modules(modules), vote_modules(unreliable), key)
    return modules, decoded, vote_decoded, reads


def vote_modules(modules: np.ndarray) -> np.ndarray:
    """Per-module majority vote over images: ``(B, n, n)`` bool -> ``(n, n)`` bool (ties read as light)."""
    m = np.asarray(modules, dtype=bool)
    if m.ndim != 3 or m.shape[0] == 0:
        raise ValueError(f"expected recovered modules of shape (B, n, n) with B >= 1, got {m.shape}.")
    return m.mean(0) > 0.5


def _data_mask(key: WatermarkKey) -> np.ndarray:
    return ~function_pattern_mask(key.qr_version)[0]


def bit_accuracy(modules: np.ndarray, key: WatermarkKey) -> np.ndarray:
    """Share of the payload-carrying modules (function patterns excluded) that agree with the key's QR, per image."""
    mask = _data_mask(key)
    m = np.asarray(modules, dtype=bool).reshape(-1, *mask.shape)
    return (m[:, mask] == key.qr_matrix[mask]).mean(1)


def binomial_p_value(modules: np.ndarray, key: WatermarkKey) -> tuple[float, int, int]:
    """One-sided binomial p-value of the agreement between the recovered modules and the key's QR.

    Null hypothesis: the model does not carry this key, so each payload module agrees with probability 1/2.
    The images are combined by a per-module majority vote first, so correlated images are not counted as
    independent evidence (conservative).

    Returns:
        ``(p_value, n_agree, n_modules)``.
    """
    mask = _data_mask(key)
    m = np.asarray(modules, dtype=bool).reshape(-1, *mask.shape)
    vote = vote_modules(m)
    agree = int((vote[mask] == key.qr_matrix[mask]).sum())
    n = int(mask.sum())
    return float(binom.sf(agree - 1, n, 0.5)), agree, n
