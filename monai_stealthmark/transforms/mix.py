"""CutMix for segmentation, one sample at a time: a random box of another training sample is pasted into this one,
image and label alike.

MONAI's ``CutMixd`` mixes the samples of a collated batch. The watermark needs the mix *before*
:class:`~monai_stealthmark.transforms.RandWatermarkd`, so that a triggered sample and its clean twin share the mixed
image: this transform takes the donor from a pool of samples instead. For the watermark it widens the set of
boundaries on which the triggered output learns to copy the clean output (organs cut by box edges, pasted into
other anatomy), which is what keeps the hard mask of an unseen patient unchanged under the trigger (README,
"Measured results").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = ["RandPoolCutMixd"]


class RandPoolCutMixd(RandomizableTransform, MapTransform):
    """With probability ``prob``, paste a random box of a random pool sample into the sample, at the same place,
    for every key (the image and its label, so the label stays exact: no soft mixing).

    Args:
        keys: the keys to paste (e.g. ``("image", "label")``); all must have the sample's spatial shape.
        pool: the donors: a sequence of dicts holding ``keys`` with the same shapes as the samples (e.g. the
            preprocessed training set). It may contain the sample itself (a box of itself changes nothing).
        prob: probability of mixing a sample.
        box_fraction: ``(min, max)`` side of the box as a fraction of each spatial side, drawn per side.
        allow_missing_keys: don't raise for keys missing from the sample.

    Example::

        train = [{"image": img, "label": lab}, ...]  # preprocessed, channel-first
        mix = RandPoolCutMixd(("image", "label"), pool=train, prob=0.5)
        mix.set_random_state(seed=0)
    """

    def __init__(
        self,
        keys: KeysCollection,
        pool: Sequence[Mapping[Hashable, Any]],
        prob: float = 0.5,
        box_fraction: tuple[float, float] = (0.2, 0.5),
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(pool) == 0:
            raise ValueError("pool is empty: give the samples to take boxes from.")
        lo, hi = (float(v) for v in box_fraction)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"box_fraction must satisfy 0 < min <= max <= 1, got {box_fraction}.")
        self.pool = pool
        self.box_fraction = (lo, hi)
        self._donor = 0
        self._box: list[slice] = []

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        if not self._do_transform:
            return
        self._donor = int(self.R.randint(len(self.pool)))
        lo, hi = self.box_fraction
        self._box = []
        for s in spatial_shape:
            side = max(1, min(int(s), int(round(self.R.uniform(lo, hi) * int(s)))))
            start = int(self.R.randint(0, int(s) - side + 1))
            self._box.append(slice(start, start + side))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            return d
        shape = tuple(d[present[0]].shape[1:])
        for k in present:
            if tuple(d[k].shape[1:]) != shape:
                raise ValueError(f"RandPoolCutMixd: {k!r} has spatial shape {tuple(d[k].shape[1:])}, {present[0]!r} has {shape}.")
        self.randomize(shape)
        if not self._do_transform:
            return d
        donor = self.pool[self._donor]
        idx = (slice(None), *self._box)
        for k in present:
            if k not in donor:
                raise KeyError(f"RandPoolCutMixd: pool sample {self._donor} has no {k!r}.")
            src = convert_to_tensor(donor[k], track_meta=False)
            if tuple(src.shape) != tuple(d[k].shape):
                raise ValueError(
                    f"RandPoolCutMixd: pool sample {self._donor}'s {k!r} has shape {tuple(src.shape)}, the sample's "
                    f"{tuple(d[k].shape)}: the pool must hold samples preprocessed like the ones being mixed."
                )
            out = convert_to_tensor(d[k], track_meta=False).clone()
            out[idx] = src[idx].to(out.dtype)
            d[k] = convert_to_dst_type(out, d[k])[0]
        return d
