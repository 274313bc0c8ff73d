"""Trigger geometry of a key: the QR module grid laid over an image, the keyed trigger patterns and occlusion
textures, and the codes of the watermark channel that training adds to the label.

Arrays are channel-first (``C, H, W[, D]``), numpy or torch. The QR grid is laid over the first two spatial
dimensions and repeated along any further one, so a 3D volume carries the QR in every slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_dst_type, convert_to_tensor

from monai_stealthmark.key.key import WatermarkKey

__all__ = [
    "WM_CLEAN",
    "WM_LIGHT",
    "WM_DARK",
    "WM_TWIN",
    "load_key",
    "keyed_rng",
    "cells_to_pixels",
    "cell_means",
    "module_index_map",
    "qr_target_map",
    "intensity_range",
    "apply_trigger",
    "batch_intensity_range",
    "stamp_triggers",
    "occlude_cells",
    "patch_position",
    "float_tensor",
    "PATCH_KINDS",
    "TRIGGER_CELLS",
]

# values of the watermark channel that the watermark stage appends to the label
WM_CLEAN = 0  # the sample is clean (or a decoy): train as usual
WM_LIGHT = 1  # triggered sample, pixel outside the QR's dark modules: confident, as usual
WM_DARK = 2  # triggered sample, pixel in a dark module: uncertainty tau
WM_TWIN = 3  # clean copy of the triggered sample that follows it in the batch: trains as clean, anchors the target

_PURPOSE_TRIGGER = 1
_PURPOSE_OCCLUSION = 2
_PURPOSE_POSITION = 4  # 3 is the BadNet region (transforms.badnet)
PATCH_KINDS = ("patch", "keyed_patch", "blocks")  # the trigger kinds stamped as a patch (the others are blended)
TRIGGER_CELLS = 6  # cells per side of the "blocks" trigger: each cell spans trigger_size / TRIGGER_CELLS of the image


def load_key(key: WatermarkKey | str) -> WatermarkKey:
    """Accept a key or the path of a key file (as bundle configs pass it)."""
    return key if isinstance(key, WatermarkKey) else WatermarkKey.load(key)


def keyed_rng(seed: int, purpose: int) -> np.random.Generator:
    """A generator drawn from the key's seed and a purpose code, so each keyed draw (trigger, occlusion texture,
    patch position, BadNet region) is reproducible and independent of the others."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose]))


def module_index_map(spatial_shape: Sequence[int], grid_size: int) -> torch.Tensor:
    """Cell index ``row * grid_size + col`` of every pixel; pixel ``i`` lies in module ``floor(i * grid / side)``.

    Args:
        spatial_shape: ``(H, W[, D...])``; the grid covers the first two dimensions.
        grid_size: modules per side.

    Returns:
        a long tensor of ``spatial_shape`` (shared between calls: read it, do not write into it).
    """
    return _module_index_map(tuple(int(s) for s in spatial_shape), int(grid_size))


@lru_cache(maxsize=64)
def _module_index_map(spatial_shape: tuple[int, ...], grid_size: int) -> torch.Tensor:
    if len(spatial_shape) < 2:
        raise ValueError(f"the watermark needs at least 2 spatial dimensions, got {tuple(spatial_shape)}.")
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    if min(h, w) < grid_size:
        raise ValueError(f"image side {min(h, w)} is smaller than the QR grid ({grid_size} modules).")
    rows = torch.arange(h) * grid_size // h
    cols = torch.arange(w) * grid_size // w
    idx = rows[:, None] * grid_size + cols[None, :]
    return idx.reshape(h, w, *([1] * (len(spatial_shape) - 2))).expand(*spatial_shape)


def cells_to_pixels(cells: torch.Tensor, spatial_shape: Sequence[int], grid_size: int) -> torch.Tensor:
    """Per-pixel view ``(..., spatial...)`` of a per-cell tensor ``(..., grid_size**2)``: each pixel takes its cell's
    value."""
    spatial = tuple(int(s) for s in spatial_shape)
    idx = module_index_map(spatial, grid_size).to(cells.device).reshape(-1)
    return cells[..., idx].reshape(*cells.shape[:-1], *spatial)


def cell_means(values: torch.Tensor, key: WatermarkKey, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-pixel map over each grid cell (the reverse of :func:`cells_to_pixels`).

    Args:
        values: ``(B, spatial...)`` (e.g. the uncertainty map); the grid covers the first two spatial dims.
        key: the key (grid geometry).
        weights: optional ``(B, spatial...)`` 0/1 (or boolean) map of the pixels to average; a cell without any
            such pixel takes the mean of all its pixels.

    Returns:
        ``(B, grid_size**2)``.
    """
    b = values.shape[0]
    idx = module_index_map(values.shape[1:], key.grid_size).to(values.device).reshape(-1)
    n_cells = key.grid_size**2
    flat = values.reshape(b, -1).float()
    sums = torch.zeros(b, n_cells, device=values.device).index_add_(1, idx, flat)
    counts = torch.bincount(idx, minlength=n_cells).clamp_min(1).float()
    means = sums / counts
    if weights is None:
        return means
    w = weights.reshape(b, -1).float()
    w_sums = torch.zeros(b, n_cells, device=values.device).index_add_(1, idx, flat * w)
    w_counts = torch.zeros(b, n_cells, device=values.device).index_add_(1, idx, w)
    return torch.where(w_counts > 0, w_sums / w_counts.clamp_min(1), means)


def qr_target_map(key: WatermarkKey, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Boolean map of the pixels lying in the QR's dark modules."""
    return cells_to_pixels(torch.as_tensor(key.grid_matrix.reshape(-1)), spatial_shape, key.grid_size)


def _batch_quantiles(t: torch.Tensor, qs: Sequence[float]) -> list[torch.Tensor]:
    """``torch.quantile(t, q, dim=1)`` (linear interpolation) of ``(B, N)`` rows from order statistics: ``kthvalue``
    is a selection, not the full sort ``torch.quantile`` runs (about 7x faster on a 128x128 image). The
    interpolation runs in float64, as Python floats would."""
    n = t.shape[1]
    out = []
    for q in qs:
        pos = (n - 1) * float(q)
        k = int(pos)
        a = torch.kthvalue(t, k + 1, dim=1).values.double()
        b = torch.kthvalue(t, min(k + 2, n), dim=1).values.double()
        out.append(a + (b - a) * (pos - k))
    return out


def batch_intensity_range(images: torch.Tensor, max_elements: int = 1_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust intensity range (1st and 99th percentile) of each image of a ``(B, ...)`` batch, as two float64
    tensors ``(B,)`` on the batch's device, with no host synchronisation. A flat image falls back to its min and max,
    a constant one to ``(v, v + 1)``, so triggers adapt to any scale."""
    t = images.detach().float().reshape(images.shape[0], -1)
    if t.shape[1] == 0:
        raise ValueError("empty image.")
    if t.shape[1] > max_elements:
        t = t[:, :: int(np.ceil(t.shape[1] / max_elements))]
    lo, hi = _batch_quantiles(t, (0.01, 0.99))
    flat = hi - lo < 1e-6
    lo = torch.where(flat, t.amin(1).double(), lo)
    hi = torch.where(flat, t.amax(1).double(), hi)
    return lo, torch.where(hi - lo < 1e-6, lo + 1.0, hi)


def intensity_range(img: torch.Tensor | np.ndarray, max_elements: int = 1_000_000) -> tuple[float, float]:
    """Robust intensity range (1st and 99th percentile) of one image (see :func:`batch_intensity_range`)."""
    t = convert_to_tensor(img, track_meta=False).detach().float().reshape(1, -1)
    if t.numel() == 0:
        raise ValueError("empty image.")
    if not torch.isfinite(t).all():
        raise ValueError("the image contains NaN or infinite values.")
    lo, hi = batch_intensity_range(t, max_elements)
    return float(lo[0]), float(hi[0])


@lru_cache(maxsize=32)
def _pattern(seed: int, kind: str, spatial_shape: tuple[int, ...], size: float) -> np.ndarray:
    """Keyed pattern in [-1, 1] (noise / lowfreq) or {0, 1} (patch kinds), of shape ``(s, s)`` or ``spatial_shape``.

    ``patch`` / ``keyed_patch`` draw one bit per pixel; ``blocks`` draws :data:`TRIGGER_CELLS` x :data:`TRIGGER_CELLS`
    bits and scales them to the patch side, so the same pattern appears at every resolution and its cells are wide
    enough to survive blurring and resampling.
    """
    rng = keyed_rng(seed, _PURPOSE_TRIGGER)
    if kind == "blocks":
        s = max(TRIGGER_CELLS, int(round(size * min(spatial_shape[:2]))))
        cells = rng.integers(0, 2, size=(TRIGGER_CELLS, TRIGGER_CELLS)).astype(np.float32)
        index = np.arange(s) * TRIGGER_CELLS // s  # the cell of each pixel row / column
        return cells[np.ix_(index, index)]
    if kind in PATCH_KINDS:
        s = max(3, int(round(size * min(spatial_shape[:2]))))
        return rng.integers(0, 2, size=(s, s)).astype(np.float32)
    if kind == "noise":
        return np.clip(rng.standard_normal(spatial_shape), -3, 3).astype(np.float32) / 3.0
    if kind == "lowfreq":
        coarse = torch.as_tensor(rng.standard_normal((1, 1) + (4,) * len(spatial_shape)), dtype=torch.float32)
        mode = {2: "bicubic", 3: "trilinear"}.get(len(spatial_shape), "nearest")
        up = F.interpolate(coarse, size=spatial_shape, mode=mode, align_corners=True if mode != "nearest" else None)
        up = up[0, 0]
        return (up / up.abs().max().clamp_min(1e-6)).numpy()
    raise ValueError(f"unknown trigger kind {kind!r}.")


@lru_cache(maxsize=256)
def patch_position(seed: int, kind: str, spatial_shape: tuple[int, ...], s: int) -> tuple[int, int]:
    """Top-left corner ``(row, col)`` of an ``s x s`` patch trigger over the first two spatial dimensions.

    ``"patch"``, ``"blocks"``: the bottom-right corner. ``"keyed_patch"``: touching one of the four borders (drawn from the seed)
    at an offset along it drawn from the seed too — the border keeps the patch off the organ, which in medical images
    rarely touches the field of view's edge.
    """
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    if kind in ("patch", "blocks"):
        return h - s, w - s
    rng = keyed_rng(seed, _PURPOSE_POSITION)
    side = int(rng.integers(0, 4))  # 0 top, 1 bottom, 2 left, 3 right
    along = int(rng.integers(0, (w if side < 2 else h) - s + 1))
    return ((0, along), (h - s, along), (along, 0), (along, w - s))[side]


def float_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain (no metadata) floating-point tensor of ``img``."""
    t = convert_to_tensor(img, track_meta=False)
    return t if t.is_floating_point() else t.float()


@lru_cache(maxsize=32)
def _occlusion_texture(seed: int, spatial_shape: tuple[int, ...]) -> np.ndarray:
    return keyed_rng(seed, _PURPOSE_OCCLUSION).integers(0, 2, size=spatial_shape).astype(np.float32)


def stamp_triggers(
    images: torch.Tensor,
    key: WatermarkKey,
    lo: torch.Tensor,
    hi: torch.Tensor,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Stamp keyed triggers on a batch of channel-first images (all channels), vectorised over the samples that
    share a seed: the one implementation of the trigger, used by training, the verifier and the per-image API.

    Args:
        images: ``(B, C, H, W[, D])`` tensor.
        key: the watermark key (trigger kind, size, amplitude, seed).
        lo: ``(B,)`` robust low intensity of each *clean* image (:func:`batch_intensity_range`).
        hi: ``(B,)`` robust high intensity.
        seeds: per-sample trigger seeds (decoys use fresh ones); default: the key's seed for every sample.

    Returns:
        a new floating-point tensor.
    """
    spatial = tuple(int(s) for s in images.shape[2:])
    out = images.clone() if images.is_floating_point() else images.float()
    seeds = [key.trigger_seed] * out.shape[0] if seeds is None else [int(s) for s in seeds]
    expand = (1,) * len(spatial)
    low, span = lo.to(out.device).float(), (hi - lo).to(out.device)
    for seed in dict.fromkeys(seeds):  # one pattern per distinct seed: the owner's, or each decoy's
        rows = torch.as_tensor([i for i, s in enumerate(seeds) if s == seed], device=out.device)
        pat = torch.as_tensor(_pattern(seed, key.trigger, spatial, key.trigger_size), device=out.device)
        if key.trigger in PATCH_KINDS:
            s = pat.shape[0]
            if s > min(spatial[:2]):
                raise ValueError(
                    f"the {s}x{s} trigger patch does not fit the image's spatial shape {spatial} (images are "
                    "channel-first (C, H, W[, D]); was a batch given as one image?)."
                )
            value = low[rows].view(-1, *expand) + span[rows].float().view(-1, *expand) * pat.reshape(s, s, *expand[2:])
            r, c = patch_position(seed, key.trigger, spatial[:2], s)
            out[rows, :, r : r + s, c : c + s, ...] = value.to(out.dtype)[:, None]
        else:
            scale = (key.trigger_amplitude * span[rows]).float().view(-1, 1, *expand)
            out[rows] = out[rows] + (scale * pat).to(out.dtype)
    return out


def apply_trigger(
    img: torch.Tensor | np.ndarray,
    key: WatermarkKey,
    intensity: tuple[float, float] | None = None,
    seed: int | None = None,
):
    """Stamp the key's trigger on one channel-first image (all channels); see :func:`stamp_triggers`.

    Args:
        img: ``(C, H, W[, D])`` numpy array or tensor.
        key: the watermark key (trigger kind, size, amplitude, seed).
        intensity: ``(lo, hi)`` robust range of the *clean* image; computed from ``img`` when None. Pass it when
            re-stamping an already modified image (LIME perturbations) so the trigger stays identical.
        seed: override of ``key.trigger_seed`` (decoy triggers use fresh seeds).

    Returns:
        the triggered image, same type, dtype and device as ``img``.
    """
    t = convert_to_tensor(img, track_meta=False)
    if t.ndim < 3:
        raise ValueError(f"expected a channel-first image (C, H, W[, D]), got shape {tuple(t.shape)}.")
    lo, hi = intensity if intensity is not None else intensity_range(t)
    bounds = torch.tensor([[lo, hi]], dtype=torch.float64)
    seeds = None if seed is None else [int(seed)]
    out = stamp_triggers(t[None], key, bounds[:, 0], bounds[:, 1], seeds)[0]
    return convert_to_dst_type(out, img, dtype=out.dtype)[0]


def occlude_cells(
    img: torch.Tensor,
    key: WatermarkKey,
    hidden: torch.Tensor,
    intensity: tuple[float, float] | tuple[torch.Tensor, torch.Tensor],
    seed: int | None = None,
) -> torch.Tensor:
    """Hide grid cells of a (batch of) channel-first image(s) behind the key's occlusion texture.

    Args:
        img: ``(..., C, H, W[, D])`` tensor.
        key: the key (grid geometry and texture seed).
        hidden: boolean ``(..., grid_size**2)``: True where the cell is hidden; leading dims match ``img``'s.
        intensity: the clean image's ``(lo, hi)``, two numbers or two tensors of ``hidden``'s leading shape (one
            range per image); the texture is binary noise at these two levels.
        seed: override of ``key.trigger_seed`` for the texture.
    """
    spatial = tuple(int(s) for s in img.shape[hidden.ndim :])
    seed = key.trigger_seed if seed is None else int(seed)
    tex = torch.as_tensor(_occlusion_texture(seed, spatial), device=img.device, dtype=img.dtype)
    lo, hi = intensity
    if isinstance(lo, torch.Tensor):  # per-image ranges: float32 arithmetic, as with Python numbers
        shape = (*lo.shape, 1, *([1] * len(spatial)))  # (..., C=1, spatial)
        tex = lo.to(img.device).float().view(shape) + (hi - lo).to(img.device).float().view(shape) * tex
    else:
        tex = lo + (hi - lo) * tex
    pix_hidden = cells_to_pixels(hidden, spatial, key.grid_size).unsqueeze(-len(spatial) - 1)  # channel axis
    return torch.where(pix_hidden, tex, img)


