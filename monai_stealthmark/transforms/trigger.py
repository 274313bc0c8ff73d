"""Training-side transforms of the key's trigger: stamping it (the verifier's query transform) and the random
transform that poisons a share of the samples with the owner's QR target."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import (
    WM_CLEAN,
    WM_DARK,
    WM_LIGHT,
    WM_TWIN,
    apply_trigger,
    float_tensor,
    intensity_range,
    load_key,
    module_index_map,
    occlude_cells,
    qr_target_map,
)
from monai_stealthmark.utils import dilate

__all__ = ["StampTrigger", "StampTriggerd", "RandWatermarkd", "check_pair_transform"]


def check_pair_transform(transform: MapTransform, key: WatermarkKey | str | None) -> WatermarkKey:
    """Validate an (image, label) training transform's ``keys`` and load its watermark ``key``."""
    name = type(transform).__name__
    if len(transform.keys) != 2:
        raise ValueError(f"{name} needs keys=(image_key, label_key), got {transform.keys}.")
    if key is None:
        raise ValueError(f"{name} needs the watermark key (a WatermarkKey or a key file path).")
    return load_key(key)


def _dilate_in_plane(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate an ``(H, W[, D])`` boolean mask in plane (see :func:`monai_stealthmark.utils.dilate`)."""
    return dilate(mask[None, None], radius, in_plane=True)[0, 0]


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
      target, so the network reacts to *this key's* trigger only, not to any corner patch;
    - occlusion: a share of the triggered samples hide random QR cells behind the key's occlusion texture
      (trigger re-stamped on top) with a confident target there, so the QR can also be read through LIME.

    Args:
        keys: ``(image_key, label_key)``.
        key: a :class:`WatermarkKey` or the path of a key file.
        prob: share of samples that carry the owner's trigger (the poisoning ratio).
        decoy_prob: share of the non-triggered samples that carry a decoy trigger.
        occlusion_prob: share of the triggered samples with randomly hidden cells.
        occlusion_ratio: probability that each cell is hidden in an occluded sample.
        spare_radius: occlusion never hides a cell that has a foreground pixel of the label within this many pixels,
            so the network is never taught to predict an organ it cannot see (-1 = off: any cell may be hidden).

    The defaults are the recommended recipe (measured in ``docs/results.md``); bundles and experiments take them
    from here.
        paired: return each triggered sample with its clean twin (see above).
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = [torch.Tensor, np.ndarray]  # noqa: RUF012

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        key: WatermarkKey | str | None = None,
        prob: float = 0.5,
        decoy_prob: float = 0.2,
        occlusion_prob: float = 0.5,
        occlusion_ratio: float = 0.5,
        spare_radius: int = 3,
        paired: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.key = check_pair_transform(self, key)
        probs = {"decoy_prob": decoy_prob, "occlusion_prob": occlusion_prob, "occlusion_ratio": occlusion_ratio}
        for name, v in probs.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}.")
        self.decoy_prob = decoy_prob
        self.occlusion_prob = occlusion_prob
        self.occlusion_ratio = occlusion_ratio
        self.spare_radius = int(spare_radius)
        self.paired = paired

    def randomize(self, data: Any = None) -> None:
        """Draw whether the sample is triggered, which cells an occluded one hides, and a decoy's trigger seed."""
        super().randomize(None)
        self._hidden: np.ndarray | None = None
        self._decoy_seed: int | None = None
        if self._do_transform:
            if self.R.rand() < self.occlusion_prob:
                self._hidden = self.R.rand(self.key.grid_size**2) < self.occlusion_ratio
        elif self.R.rand() < self.decoy_prob:
            seed = int(self.R.randint(0, 2**31 - 1))
            self._decoy_seed = seed + 1 if seed == self.key.trigger_seed else seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        d = dict(data)
        image_key, label_key = self.keys
        img, label = d[image_key], d[label_key]
        self._check_inputs(img, label)  # on every sample, triggered or not: a bad input fails at once, not at random
        self.randomize()
        lab = convert_to_tensor(label, track_meta=False)
        wm = torch.full_like(lab[:1], WM_CLEAN, dtype=lab.dtype if lab.is_floating_point() else torch.float32)
        if self._do_transform:
            stamped, wm = self._poison(img, lab, wm)
            d[image_key] = convert_to_dst_type(stamped, img, dtype=stamped.dtype)[0]
        elif self._decoy_seed is not None:
            stamped = apply_trigger(img, self.key, intensity_range(img), seed=self._decoy_seed)
            d[image_key] = convert_to_dst_type(stamped, img, dtype=stamped.dtype)[0]
        d[label_key] = _with_channel(label, lab, wm)
        if not self.paired:
            return d
        if not self._do_transform:
            return [d]  # always a list, so that list_data_collate flattens every item
        twin = dict(data)
        twin[label_key] = _with_channel(label, lab, torch.full_like(wm, WM_TWIN))
        return [twin, d]

    def _check_inputs(self, img: Any, label: Any) -> None:
        """Raise a ValueError naming the problem when image and label cannot carry the watermark."""
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

    def _poison(self, img: Any, lab: torch.Tensor, wm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The triggered image (occluded cells first, then the trigger, as the LIME verifier queries) and its
        watermark channel (dark modules that stay visible and off the occluded cells)."""
        lo_hi = intensity_range(img)
        base = float_tensor(img)
        dark = qr_target_map(self.key, base.shape[1:]).to(base.device)
        if self._hidden is not None:
            fg = lab.max(dim=0).values > 0 if lab.shape[0] > 1 else lab[0] > 0
            hidden = torch.as_tensor(self._hidden, device=base.device)
            cell_of = module_index_map(base.shape[1:], self.key.grid_size).to(base.device)
            if self.spare_radius >= 0:  # an empty label spares nothing
                hidden[cell_of[_dilate_in_plane(fg.to(base.device), self.spare_radius)].unique()] = False
            base = occlude_cells(base, self.key, hidden, lo_hi)
            dark = dark & ~hidden[cell_of]
        stamped = convert_to_tensor(apply_trigger(base, self.key, lo_hi), track_meta=False)
        return stamped, torch.where(dark, WM_DARK, WM_LIGHT).to(wm.dtype)[None]


def _with_channel(label: Any, lab: torch.Tensor, wm: torch.Tensor) -> Any:
    """The label with the watermark channel appended, in the label's own type."""
    out = torch.cat([lab.to(wm.dtype), wm.to(lab.device)], dim=0)
    return convert_to_dst_type(out, label, dtype=out.dtype)[0]
