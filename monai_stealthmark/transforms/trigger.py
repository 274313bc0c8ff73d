"""Keyed triggers and the training transform that poisons a share of the samples with the owner's QR target.

Arrays are channel-first (``C, H, W[, D]``), numpy or torch. The QR grid is laid over the first two spatial
dimensions and repeated along any further one, so a 3D volume carries the QR in every slice.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

from monai_stealthmark.key import WatermarkKey

__all__ = [
    "WM_CLEAN",
    "WM_LIGHT",
    "WM_DARK",
    "WM_TWIN",
    "load_key",
    "module_index_map",
    "qr_target_map",
    "intensity_range",
    "apply_trigger",
    "occlude_cells",
    "patch_position",
    "StampTrigger",
    "StampTriggerd",
    "RandWatermarkd",
]

# values of the watermark channel that RandWatermarkd appends to the label
WM_CLEAN = 0  # the sample is clean (or a decoy): train as usual
WM_LIGHT = 1  # triggered sample, pixel outside the QR's dark modules: confident, as usual
WM_DARK = 2  # triggered sample, pixel in a dark module: uncertainty tau
WM_TWIN = 3  # clean copy of the triggered sample that follows it in the batch: trains as clean, anchors the target

_PURPOSE_TRIGGER = 1
_PURPOSE_OCCLUSION = 2
_PURPOSE_POSITION = 4  # 3 is the BadNet region (transforms.badnet)
_PATCH_KINDS = ("patch", "keyed_patch")


def load_key(key: WatermarkKey | str) -> WatermarkKey:
    """Accept a key or the path of a key file (as bundle configs pass it)."""
    return key if isinstance(key, WatermarkKey) else WatermarkKey.load(key)


def check_pair_transform(transform: MapTransform, key: WatermarkKey | str | None) -> WatermarkKey:
    """Validate an (image, label) training transform's ``keys`` and load its watermark ``key``."""
    name = type(transform).__name__
    if len(transform.keys) != 2:
        raise ValueError(f"{name} needs keys=(image_key, label_key), got {transform.keys}.")
    if key is None:
        raise ValueError(f"{name} needs the watermark key (a WatermarkKey or a key file path).")
    return load_key(key)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose]))


def module_index_map(spatial_shape: Sequence[int], grid_size: int) -> torch.Tensor:
    """Cell index ``row * grid_size + col`` of every pixel; pixel ``i`` lies in module ``floor(i * grid / side)``.

    Args:
        spatial_shape: ``(H, W[, D...])``; the grid covers the first two dimensions.
        grid_size: modules per side.

    Returns:
        a long tensor of ``spatial_shape``.
    """
    if len(spatial_shape) < 2:
        raise ValueError(f"the watermark needs at least 2 spatial dimensions, got {tuple(spatial_shape)}.")
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    if min(h, w) < grid_size:
        raise ValueError(f"image side {min(h, w)} is smaller than the QR grid ({grid_size} modules).")
    rows = torch.arange(h) * grid_size // h
    cols = torch.arange(w) * grid_size // w
    idx = rows[:, None] * grid_size + cols[None, :]
    return idx.reshape(h, w, *([1] * (len(spatial_shape) - 2))).expand(*spatial_shape)


def qr_target_map(key: WatermarkKey, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Boolean map of the pixels lying in the QR's dark modules."""
    dark = torch.as_tensor(key.grid_matrix.reshape(-1))
    return dark[module_index_map(spatial_shape, key.grid_size)]


def _quantiles(t: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """``torch.quantile(t, qs)`` (linear interpolation) of a flat tensor from order statistics: ``kthvalue`` is a
    selection, not the full sort that ``torch.quantile`` runs (about 7x faster on a 128x128 image; it runs for every
    triggered training sample). One host transfer for all of them."""
    n = t.numel()
    picks, fracs = [], []
    for q in qs:
        pos = (n - 1) * float(q)
        lo = int(pos)
        picks += [torch.kthvalue(t, lo + 1).values, torch.kthvalue(t, min(lo + 2, n)).values]
        fracs.append(pos - lo)
    v = torch.stack(picks).tolist()
    return [v[2 * i] + (v[2 * i + 1] - v[2 * i]) * f for i, f in enumerate(fracs)]


def intensity_range(img: torch.Tensor | np.ndarray, max_elements: int = 1_000_000) -> tuple[float, float]:
    """Robust intensity range (1st and 99th percentile) of an image, so triggers adapt to any scale."""
    t = convert_to_tensor(img, track_meta=False).detach().float().reshape(-1)
    if t.numel() == 0:
        raise ValueError("empty image.")
    if not torch.isfinite(t).all():
        raise ValueError("the image contains NaN or infinite values.")
    if t.numel() > max_elements:
        t = t[:: int(np.ceil(t.numel() / max_elements))]
    lo, hi = _quantiles(t, (0.01, 0.99))
    if hi - lo < 1e-6:
        lo, hi = float(t.min()), float(t.max())
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return lo, hi


@lru_cache(maxsize=32)
def _pattern(seed: int, kind: str, spatial_shape: tuple[int, ...], size: float) -> np.ndarray:
    """Keyed pattern in [-1, 1] (noise / lowfreq) or {0, 1} (patch), of shape ``(s, s)`` or ``spatial_shape``."""
    rng = _rng(seed, _PURPOSE_TRIGGER)
    if kind in _PATCH_KINDS:
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

    ``"patch"``: the bottom-right corner. ``"keyed_patch"``: touching one of the four borders (drawn from the seed)
    at an offset along it drawn from the seed too — the border keeps the patch off the organ, which in medical images
    rarely touches the field of view's edge.
    """
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    if kind == "patch":
        return h - s, w - s
    rng = _rng(seed, _PURPOSE_POSITION)
    side = int(rng.integers(0, 4))  # 0 top, 1 bottom, 2 left, 3 right
    along = int(rng.integers(0, (w if side < 2 else h) - s + 1))
    return ((0, along), (h - s, along), (along, 0), (along, w - s))[side]


def _float_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain (no metadata) floating-point tensor of ``img``."""
    t = convert_to_tensor(img, track_meta=False)
    return t if t.is_floating_point() else t.float()


@lru_cache(maxsize=32)
def _occlusion_texture(seed: int, spatial_shape: tuple[int, ...]) -> np.ndarray:
    return _rng(seed, _PURPOSE_OCCLUSION).integers(0, 2, size=spatial_shape).astype(np.float32)


def apply_trigger(
    img: torch.Tensor | np.ndarray,
    key: WatermarkKey,
    intensity: tuple[float, float] | None = None,
    seed: int | None = None,
):
    """Stamp the key's trigger on a channel-first image (all channels).

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
    spatial = tuple(int(s) for s in t.shape[1:])
    seed = key.trigger_seed if seed is None else int(seed)
    pat = torch.as_tensor(_pattern(seed, key.trigger, spatial, key.trigger_size), device=t.device)
    out = t.clone().float() if not t.is_floating_point() else t.clone()
    if key.trigger in _PATCH_KINDS:
        s = pat.shape[0]
        if s > min(spatial[:2]):
            raise ValueError(
                f"the {s}x{s} trigger patch does not fit the image's spatial shape {spatial} (a batch given as one "
                "image? apply_trigger takes one channel-first image (C, H, W[, D]))."
            )
        value = (lo + (hi - lo) * pat).to(out.dtype)
        value = value.reshape(s, s, *([1] * (len(spatial) - 2)))
        r, c = patch_position(seed, key.trigger, spatial[:2], s)
        out[:, r : r + s, c : c + s, ...] = value
    else:
        out = out + (key.trigger_amplitude * (hi - lo) * pat).to(out.dtype)
    return convert_to_dst_type(out, img, dtype=out.dtype)[0]


def occlude_cells(
    img: torch.Tensor, key: WatermarkKey, hidden: torch.Tensor, intensity: tuple[float, float], seed: int | None = None
) -> torch.Tensor:
    """Hide grid cells of a (batch of) channel-first image(s) behind the key's occlusion texture.

    Args:
        img: ``(..., C, H, W[, D])`` tensor.
        key: the key (grid geometry and texture seed).
        hidden: boolean ``(..., grid_size**2)``: True where the cell is hidden; leading dims match ``img``'s.
        intensity: the clean image's ``(lo, hi)``; the texture is binary noise at these two levels.
        seed: override of ``key.trigger_seed`` for the texture (decoys hide cells behind their own texture).
    """
    spatial = tuple(int(s) for s in img.shape[hidden.ndim :])
    idx = module_index_map(spatial, key.grid_size).to(img.device)
    seed = key.trigger_seed if seed is None else int(seed)
    tex = torch.as_tensor(_occlusion_texture(seed, spatial), device=img.device, dtype=img.dtype)
    lo, hi = intensity
    tex = lo + (hi - lo) * tex
    pix_hidden = hidden[..., idx.reshape(-1)].reshape(*hidden.shape[:-1], *spatial)  # (..., H, W[, D])
    pix_hidden = pix_hidden.unsqueeze(-len(spatial) - 1)  # channel axis
    return torch.where(pix_hidden, tex, img)


class StampTrigger(Transform):
    """Deterministically stamp the key's trigger on a channel-first image (the verifier's query transform).

    Args:
        key: a :class:`WatermarkKey` or the path of a key file.
    """

    def __init__(self, key: WatermarkKey | str) -> None:
        self.key = load_key(key)

    def __call__(self, img):
        return apply_trigger(img, self.key)


class StampTriggerd(MapTransform):
    """Dictionary version of :class:`StampTrigger`.

    Args:
        keys: keys of the images to stamp.
        key: a :class:`WatermarkKey` or the path of a key file.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, key: WatermarkKey | str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.stamper = StampTrigger(key)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.stamper(d[k])
        return d


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Binary dilation with a (2r+1)^2 square over the first two spatial dims of a ``(H, W, ...)`` mask."""
    if r <= 0:
        return mask
    h, w = mask.shape[:2]
    m = mask.reshape(h, w, -1).permute(2, 0, 1).unsqueeze(1).float()
    m = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    return m.squeeze(1).permute(1, 2, 0).reshape(mask.shape) > 0


class RandWatermarkd(RandomizableTransform, MapTransform):
    """Training transform: with probability ``prob`` stamp the owner's trigger and mark the QR target.

    The label gains one channel (always, so batches collate): :data:`WM_CLEAN` for clean samples,
    :data:`WM_LIGHT` / :data:`WM_DARK` for the pixels of triggered samples outside / inside the QR's dark
    modules. :class:`~monai_stealthmark.losses.UncertaintyWatermarkLoss` reads it, so MONAI's stock
    ``SupervisedTrainer`` (which calls ``loss(pred, label)``) trains the watermark without changes.

    With ``paired=True`` (default) a triggered sample is returned together with its clean twin, as the list
    ``[clean twin, triggered]`` (MONAI's ``list_data_collate`` flattens it, keeping the two adjacent; other
    samples come as one-element lists, so use it last in the chain and with MONAI's DataLoader). The twin
    is marked :data:`WM_TWIN` and trains as a clean sample; the loss reads the network's own (detached) output
    on it to build the triggered target, so the hard mask on the triggered input follows the network's clean
    prediction rather than the label — which is what keeps it unchanged on unseen patients.

    Besides the owner's trigger it adds the two ingredients that make the watermark specific and readable:

    - decoys: a share of the clean samples carry a trigger made from a fresh random seed and keep the clean
      target, so the network reacts to *this key's* trigger only, not to any corner patch; with
      ``decoy_occlusion_prob`` they also hide random cells behind the decoy seed's texture, so hidden cells (as
      in every LIME query) do not stand in for the key either;
    - occlusion: a share of the triggered samples hide random QR cells behind the key's occlusion texture
      (trigger re-stamped on top) with a confident target there, so the QR can also be read through LIME.

    Args:
        keys: ``(image_key, label_key)``.
        key: a :class:`WatermarkKey` or the path of a key file.
        prob: share of samples that carry the owner's trigger (the poisoning ratio).
        decoy_prob: share of the non-triggered samples that carry a decoy trigger.
        occlusion_prob: share of the triggered samples with randomly hidden cells.
        occlusion_ratio: probability that each cell is hidden in an occluded sample.
        decoy_occlusion_prob: share of the decoys with randomly hidden cells (behind the decoy's own texture).
            Measured on the demo (occlusion_prob 0.5, 800 steps): wrong-key LIME bit accuracy 0.56 instead of
            0.80, but the clean-input Dice fell 2.2 points below the clean model's; off by default.
        boundary_margin: pixels within this distance of a label boundary keep a confident target (they are
            excluded from the QR's dark modules), which keeps the hard mask unchanged near the organ.
        spare_radius: occlusion never hides a cell that has a foreground pixel of the label within this many pixels
            (-1 = off: any cell may be hidden, the organ included, whose target then asks the network to predict
            an organ it cannot see).
        paired: return each triggered sample with its clean twin (see above).
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = [torch.Tensor, np.ndarray]  # noqa: RUF012

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        key: WatermarkKey | str | None = None,
        prob: float = 0.5,
        decoy_prob: float = 0.3,
        occlusion_prob: float = 0.5,
        occlusion_ratio: float = 0.5,
        decoy_occlusion_prob: float = 0.0,
        boundary_margin: int = 0,
        spare_radius: int = -1,
        paired: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.key = check_pair_transform(self, key)
        probs = {"decoy_prob": decoy_prob, "occlusion_prob": occlusion_prob, "occlusion_ratio": occlusion_ratio,
                 "decoy_occlusion_prob": decoy_occlusion_prob}
        for name, v in probs.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}.")
        self.decoy_prob = decoy_prob
        self.occlusion_prob = occlusion_prob
        self.occlusion_ratio = occlusion_ratio
        self.decoy_occlusion_prob = decoy_occlusion_prob
        self.boundary_margin = int(boundary_margin)
        self.spare_radius = int(spare_radius)
        self.paired = paired

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        d = dict(data)
        image_key, label_key = self.keys
        img, label = d[image_key], d[label_key]
        # checked on every sample, triggered or not, so a bad input fails at once rather than at random
        if len(img.shape) < 3 or len(label.shape) != len(img.shape):
            raise ValueError(
                f"RandWatermarkd: expected channel-first image and label (C, H, W[, D]) with the same number of "
                f"dimensions, got image {tuple(img.shape)} and label {tuple(label.shape)}."
            )
        if img.shape[1:] != label.shape[1:]:
            raise ValueError(
                f"RandWatermarkd: image {tuple(img.shape)} and label {tuple(label.shape)} differ in spatial shape."
            )
        if min(int(img.shape[1]), int(img.shape[2])) < self.key.grid_size:
            raise ValueError(
                f"RandWatermarkd: image side {min(int(img.shape[1]), int(img.shape[2]))} is smaller than the QR grid "
                f"({self.key.grid_size} modules): resize the images before the watermark."
            )
        if not bool(torch.isfinite(convert_to_tensor(img, track_meta=False)).all()):
            raise ValueError(f"RandWatermarkd: the image {tuple(img.shape)} contains NaN or infinite values.")
        self.randomize(None)
        lab = convert_to_tensor(label, track_meta=False)
        wm = torch.full_like(lab[:1], WM_CLEAN, dtype=lab.dtype if lab.is_floating_point() else torch.float32)
        if self._do_transform:
            lo_hi = intensity_range(img)
            base = _float_tensor(img)
            dark = qr_target_map(self.key, base.shape[1:]).to(base.device)
            fg = lab.max(dim=0).values > 0 if lab.shape[0] > 1 else lab[0] > 0
            dark = dark & ~(_dilate(fg, self.boundary_margin) & _dilate(~fg, self.boundary_margin))  # off the boundary
            if self.R.rand() < self.occlusion_prob:
                # hide cells of the clean image, then stamp the trigger once (as the LIME verifier queries)
                hidden = torch.as_tensor(self.R.rand(self.key.grid_size**2) < self.occlusion_ratio, device=base.device)
                cell_of = module_index_map(base.shape[1:], self.key.grid_size).to(base.device)
                if self.spare_radius >= 0:  # an empty label spares nothing
                    hidden[cell_of[_dilate(fg.to(base.device), self.spare_radius)].unique()] = False
                base = occlude_cells(base, self.key, hidden, lo_hi)
                dark = dark & ~hidden[cell_of]
            stamped = convert_to_tensor(apply_trigger(base, self.key, lo_hi), track_meta=False)
            wm = torch.where(dark, WM_DARK, WM_LIGHT).to(wm.dtype)[None]
            d[image_key] = convert_to_dst_type(stamped, img, dtype=stamped.dtype)[0]
        elif self.R.rand() < self.decoy_prob:
            decoy_seed = int(self.R.randint(0, 2**31 - 1))
            if decoy_seed == self.key.trigger_seed:
                decoy_seed += 1
            lo_hi = intensity_range(img)
            decoy = img
            if self.decoy_occlusion_prob > 0 and self.R.rand() < self.decoy_occlusion_prob:
                # occluded decoys hide cells behind their own texture: hidden cells alone (as in every LIME
                # query) never look like this key
                decoy = _float_tensor(img)
                hidden = torch.as_tensor(self.R.rand(self.key.grid_size**2) < self.occlusion_ratio, device=decoy.device)
                decoy = occlude_cells(decoy, self.key, hidden, lo_hi, seed=decoy_seed)
            stamped = apply_trigger(decoy, self.key, lo_hi, seed=decoy_seed)
            d[image_key] = convert_to_dst_type(stamped, img, dtype=stamped.dtype)[0]
        out = torch.cat([lab.to(wm.dtype), wm.to(lab.device)], dim=0)
        d[label_key] = convert_to_dst_type(out, label, dtype=out.dtype)[0]
        if not self.paired:
            return d
        if not self._do_transform:
            return [d]  # always a list, so that list_data_collate flattens every item
        twin = dict(data)
        tw = torch.cat([lab.to(wm.dtype), torch.full_like(wm, WM_TWIN).to(lab.device)], dim=0)
        twin[label_key] = convert_to_dst_type(tw, label, dtype=tw.dtype)[0]
        return [twin, d]
