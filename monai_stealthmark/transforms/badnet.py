"""A BadNet-style backdoor watermark, the baseline the uncertainty watermark is measured against.

The trigger (the key's, the same as the QR watermark's) switches a keyed square region of the hard mask to a
target class. Ownership is then shown by the changed mask — so, unlike the QR watermark, the backdoor changes
the model's hard segmentation on triggered inputs by design, and the organ's own pixels in the region are lost.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

from monai_stealthmark.key import WatermarkKey

from monai_stealthmark.key.geometry import apply_trigger, keyed_rng

from .trigger import check_pair_transform

__all__ = ["RandBadNetd", "badnet_region"]

_PURPOSE_BADNET = 3


def badnet_region(key: WatermarkKey, spatial_shape: Sequence[int], region_size: float = 0.2) -> torch.Tensor:
    """Boolean map of the backdoor's target region: a square of side ``region_size * min(H, W)`` at a keyed
    position in the upper-left three quarters of the image (away from the corner trigger patch).

    Args:
        key: the key (its trigger seed places the square).
        spatial_shape: ``(H, W[, D...])``; the square covers the first two dims and is repeated along the others.
        region_size: side of the square relative to the image side, in (0, 0.75].
    """
    if not 0.0 < region_size <= 0.75:
        raise ValueError(f"region_size must lie in (0, 0.75], got {region_size}.")
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    s = max(2, int(round(region_size * min(h, w))))
    rng = keyed_rng(key.trigger_seed, _PURPOSE_BADNET)
    r0 = int(rng.integers(0, max(1, int(0.75 * h) - s + 1)))
    c0 = int(rng.integers(0, max(1, int(0.75 * w) - s + 1)))
    m = torch.zeros(h, w, dtype=torch.bool)
    m[r0 : r0 + s, c0 : c0 + s] = True
    return m.reshape(h, w, *([1] * (len(spatial_shape) - 2))).expand(*spatial_shape)


class RandBadNetd(RandomizableTransform, MapTransform):
    """Training transform of the BadNet baseline: with probability ``prob`` stamp the key's trigger and set the
    label to ``target_class`` inside :func:`badnet_region`. Trains with any plain segmentation loss.

    Args:
        keys: ``(image_key, label_key)``; the label holds class indices in one channel.
        key: a :class:`WatermarkKey` or the path of a key file.
        prob: the poisoning ratio.
        region_size: see :func:`badnet_region`.
        target_class: the class written into the region.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = [torch.Tensor, np.ndarray]  # noqa: RUF012

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        key: WatermarkKey | str | None = None,
        prob: float = 0.5,
        region_size: float = 0.2,
        target_class: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.key = check_pair_transform(self, key)
        badnet_region(self.key, (8, 8), region_size)  # validates region_size
        self.region_size = region_size
        self.target_class = int(target_class)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, label_key = self.keys
        img, label = d[image_key], d[label_key]
        if img.shape[1:] != label.shape[1:]:
            raise ValueError(f"RandBadNetd: image {tuple(img.shape)} and label {tuple(label.shape)} differ in spatial shape.")
        if label.shape[0] != 1:
            raise ValueError(f"RandBadNetd expects a one-channel class-index label, got {label.shape[0]} channels.")
        self.randomize(None)
        if not self._do_transform:
            return d
        d[image_key] = apply_trigger(img, self.key)
        lab = convert_to_tensor(label, track_meta=False).clone()
        region = badnet_region(self.key, lab.shape[1:], self.region_size).to(lab.device)
        lab[0][region] = self.target_class
        d[label_key] = convert_to_dst_type(lab, label, dtype=lab.dtype)[0]
        return d
