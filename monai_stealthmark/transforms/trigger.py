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
    apply_trigger,
    load_key,
)

from .batch import PIPELINE_DEGRADATIONS, WatermarkBatch, WatermarkDraws

__all__ = ["StampTrigger", "StampTriggerd", "RandWatermarkd", "check_pair_transform"]


def check_pair_transform(transform: MapTransform, key: WatermarkKey | str | None) -> WatermarkKey:
    """Validate an (image, label) training transform's ``keys`` and load its watermark ``key``."""
    name = type(transform).__name__
    if len(transform.keys) != 2:
        raise ValueError(f"{name} needs keys=(image_key, label_key), got {transform.keys}.")
    if key is None:
        raise ValueError(f"{name} needs the watermark key (a WatermarkKey or a key file path).")
    return load_key(key)


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
    """Training transform: with probability ``prob`` stamp the owner's trigger and mark the QR target, one sample at a
    time (the per-sample view of :class:`~monai_stealthmark.transforms.WatermarkBatch`, which builds the samples).

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

    A bundle does not need this transform: its trainer runs the same stage on collated batches
    (:class:`~monai_stealthmark.transforms.WatermarkPrepareBatch`), whatever its transforms produce.

    Args:
        keys: ``(image_key, label_key)``.
        key: a :class:`WatermarkKey` or the path of a key file.
        paired: return each triggered sample with its clean twin (see above).
        allow_missing_keys: don't raise if a key is missing.
        recipe: the stage's settings (``prob``, ``decoy_prob``, ``occlusion_prob``, ``occlusion_ratio``,
            ``spare_radius``, ``degrade_prob``); their defaults, the recommended recipe, are
            :class:`~monai_stealthmark.transforms.WatermarkBatch`'s.
    """

    backend = [torch.Tensor, np.ndarray]  # noqa: RUF012

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        key: WatermarkKey | str | None = None,
        paired: bool = True,
        allow_missing_keys: bool = False,
        **recipe: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.key = check_pair_transform(self, key)
        if "keep_batch_size" in recipe:
            raise ValueError("RandWatermarkd sees one sample at a time: keep_batch_size is a setting of WatermarkBatch.")
        self.stage = WatermarkBatch(self.key, paired=paired, keep_batch_size=False, **recipe)
        RandomizableTransform.__init__(self, self.stage.prob)
        self.paired = bool(paired)

    def __getattr__(self, name: str) -> Any:
        """The recipe's settings (``prob``, ``decoy_prob`` ...) are the stage's."""
        if name in ("decoy_prob", "occlusion_prob", "occlusion_ratio", "spare_radius", "degrade_prob") and "stage" in self.__dict__:
            return getattr(self.stage, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def randomize(self, data: Any = None) -> None:
        """Draw whether the sample is triggered, which cells an occluded one hides, a decoy's trigger seed, and the
        pipeline degradation of a triggered or decoy sample (when the recipe degrades)."""
        super().randomize(None)
        cells = self.key.grid_size**2
        hidden, decoy_seed = np.zeros(cells, dtype=bool), -1
        if self._do_transform:
            if self.R.rand() < self.stage.occlusion_prob:
                hidden = self.R.rand(cells) < self.stage.occlusion_ratio
        elif self.R.rand() < self.stage.decoy_prob:
            seed = int(self.R.randint(0, 2**31 - 1))
            decoy_seed = seed + 1 if seed == self.key.trigger_seed else seed
        degradations = None
        if self.stage.degrade_prob > 0:
            degraded = (self._do_transform or decoy_seed >= 0) and self.R.rand() < self.stage.degrade_prob
            degradations = np.array([int(self.R.randint(0, len(PIPELINE_DEGRADATIONS))) if degraded else -1])
        self._draws = WatermarkDraws(np.array([self._do_transform]), hidden[None], np.array([decoy_seed]), degradations)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        d = dict(data)
        image_key, label_key = self.keys
        img, label = d[image_key], d[label_key]
        self._check_inputs(img, label)  # on every sample, triggered or not: a bad input fails at once, not at random
        self.randomize()
        x = convert_to_tensor(img, track_meta=False)
        y = convert_to_tensor(label, track_meta=False)
        images, labels = self.stage.apply(x[None], y[None], self._draws)
        triggered, decoy = bool(self._draws.triggered[0]), bool(self._draws.decoy_seeds[0] >= 0)
        degraded = self._draws.degradations is not None and bool(self._draws.degradations[0] >= 0)
        out = []
        for i in range(images.shape[0]):
            sample = dict(data)
            if (triggered and i == images.shape[0] - 1) or decoy or degraded:  # an untouched twin keeps its image
                sample[image_key] = convert_to_dst_type(images[i], img, dtype=images.dtype)[0]
            sample[label_key] = convert_to_dst_type(labels[i], label, dtype=labels.dtype)[0]
            out.append(sample)
        return out if self.paired else out[-1]

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
