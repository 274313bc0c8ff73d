"""The watermark stage on collated batches: whatever a bundle's transforms produce (multi-sample crops, any patch
size, 2D or 3D), the stage poisons a share of the batch on the training device, vectorised over the samples, and
a trainer's ``prepare_batch`` runs it, so a bundle's transform list is never edited.

It draws the same things as :class:`~monai_stealthmark.transforms.RandWatermarkd` (which samples carry the owner's
trigger, which of them hide QR cells, which clean samples carry a decoy trigger) and builds the same samples and
watermark channel: each triggered sample follows its clean twin, and the label gains the channel that
:class:`~monai_stealthmark.losses.UncertaintyWatermarkLoss` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch, PrepareBatchDefault
from monai.networks.layers import GaussianFilter
from monai.transforms import Randomizable

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import (
    WM_CLEAN,
    WM_DARK,
    WM_LIGHT,
    WM_TWIN,
    batch_intensity_range,
    cell_means,
    cells_to_pixels,
    load_key,
    occlude_cells,
    qr_target_map,
    stamp_triggers,
)
from monai_stealthmark.utils import dilate, load_random_state, random_state_dict

__all__ = ["WatermarkDraws", "WatermarkBatch", "WatermarkPrepareBatch", "PIPELINE_DEGRADATIONS", "degrade"]

# (Gaussian blur sigma in pixels, resampling factor) pairs a clinical pipeline may apply to a query; the stage draws
# one per degraded sample (see ``WatermarkBatch(degrade_prob=...)``)
PIPELINE_DEGRADATIONS: tuple[tuple[float, float], ...] = tuple(product((0.0, 0.8, 1.6, 2.4), (1.0, 0.8, 0.6, 0.45)))


def degrade(images: torch.Tensor, sigma: float, factor: float) -> torch.Tensor:
    """Blur ``(B, C, *spatial)`` images with a Gaussian of ``sigma`` pixels (MONAI's ``GaussianFilter``), then resample
    them by ``factor`` (area average down, linear interpolation back up to the input size), as a pipeline's
    smoothing and spacing change would."""
    out = images.float()
    spatial = tuple(int(v) for v in images.shape[2:])
    if sigma > 0:
        out = GaussianFilter(len(spatial), sigma).to(out.device)(out)
    if factor != 1.0:
        small = tuple(max(1, int(round(v * factor))) for v in spatial)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        out = F.interpolate(F.interpolate(out, size=small, mode="area"), size=spatial, mode=mode, align_corners=False)
    return out.to(images.dtype)


@dataclass
class WatermarkDraws:
    """The random choices for one batch of ``n`` samples (host arrays, drawn in one go).

    Attributes:
        triggered: ``(n,)`` bool, the samples that carry the owner's trigger.
        hidden: ``(n, grid_size**2)`` bool, the cells each triggered sample hides (all False when not occluded).
        decoy_seeds: ``(n,)`` int, a decoy trigger's seed, -1 where the sample carries none.
        degradations: ``(n,)`` int, the index in :data:`PIPELINE_DEGRADATIONS` of the degradation a triggered sample
            (with its twin) or a decoy goes through, -1 where none; None when the stage degrades nothing.
    """

    triggered: np.ndarray
    hidden: np.ndarray
    decoy_seeds: np.ndarray
    degradations: np.ndarray | None = None


class WatermarkBatch(Randomizable):
    """Poison a collated batch with the owner's trigger and QR target, vectorised over the batch.

    Args:
        key: a :class:`WatermarkKey` or the path of a key file.
        prob: share of samples that carry the owner's trigger (the poisoning ratio).
        decoy_prob: share of the other samples that carry a decoy trigger (a fresh seed, clean target).
        occlusion_prob: share of the triggered samples with randomly hidden cells.
        occlusion_ratio: probability that each cell is hidden in an occluded sample.
        spare_radius: occlusion never hides a cell with a foreground pixel of the label within this many pixels
            (in plane; -1 = off).
        paired: put each triggered sample after its clean twin; False replaces the sample by its triggered version.
        keep_batch_size: the batch keeps the size it was loaded with: the samples with their twins and triggered
            copies, in order, up to the loaded size; the loaded batch's last samples give way to the copies. A step
            then costs what a clean step costs, and about ``prob / (1 + prob)`` of its rows are triggered, but the
            model sees fewer clean samples per step: over paired seeds of the demo it cost Dice and stealth
            (``docs/results.md``). False (default): the triggered copies come on top (``1 + prob`` times the images
            per step).
        degrade_prob: share of the triggered samples (each with its twin) and of the decoys that go through a
            simulated clinical pipeline, a blur and a resampling drawn from :data:`PIPELINE_DEGRADATIONS`, after the
            trigger is stamped; so the network learns the trigger as a suspect's pipeline delivers it, and that a
            degraded image without it stays clean. 0 = off.

    The defaults are the recommended recipe (:mod:`monai_stealthmark.recipe`).
    """

    def __init__(
        self,
        key: WatermarkKey | str,
        prob: float = 0.5,
        decoy_prob: float = 0.2,
        occlusion_prob: float = 0.5,
        occlusion_ratio: float = 0.5,
        spare_radius: int = 3,
        paired: bool = True,
        keep_batch_size: bool = False,
        degrade_prob: float = 0.5,
    ) -> None:
        self.key = load_key(key)
        for name, v in {"prob": prob, "decoy_prob": decoy_prob, "occlusion_prob": occlusion_prob,
                        "occlusion_ratio": occlusion_ratio, "degrade_prob": degrade_prob}.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}.")
        self.prob, self.decoy_prob = float(prob), float(decoy_prob)
        self.occlusion_prob, self.occlusion_ratio = float(occlusion_prob), float(occlusion_ratio)
        self.spare_radius = int(spare_radius)
        self.paired = bool(paired)
        self.keep_batch_size = bool(keep_batch_size)
        self.degrade_prob = float(degrade_prob)
        self.draws: WatermarkDraws | None = None
        self._maps: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """The stage's draw state, so a training checkpoint resumes with the draws an uninterrupted run makes."""
        return {"rng": random_state_dict(self.R)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the draw state saved by :meth:`state_dict`."""
        load_random_state(self.R, state["rng"])

    def randomize(self, data: int) -> None:
        """Draw the choices for a batch of ``data`` samples (a fixed number of draws per batch)."""
        n, cells = int(data), self.key.grid_size**2
        triggered = self.R.rand(n) < self.prob
        occluded = (self.R.rand(n) < self.occlusion_prob) & triggered
        hidden = (self.R.rand(n, cells) < self.occlusion_ratio) & occluded[:, None]
        decoy = (self.R.rand(n) < self.decoy_prob) & ~triggered
        seeds = self.R.randint(0, 2**31 - 1, size=n)
        seeds = np.where(seeds == self.key.trigger_seed, seeds + 1, seeds)
        degradations = None
        if self.degrade_prob > 0:  # drawn only when on, so the stream of the other draws does not depend on it
            degraded = (self.R.rand(n) < self.degrade_prob) & (triggered | decoy)
            degradations = np.where(degraded, self.R.randint(0, len(PIPELINE_DEGRADATIONS), size=n), -1)
        self.draws = WatermarkDraws(triggered, hidden, np.where(decoy, seeds, -1), degradations)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the poisoned batch and its labels with the watermark channel appended (one channel, last).

        Args:
            image: ``(B, C, H, W[, D])`` floating-point batch on the training device.
            label: ``(B, L, H, W[, D])`` label batch (class indices or one channel per class).
        """
        self._check(image, label)
        self.randomize(image.shape[0])
        m, self.draws = self._fit_to_batch(self.draws)  # the draws of the loaded samples that this step trains on
        return self.apply(image[:m], label[:m], self.draws)

    def apply(self, image: torch.Tensor, label: torch.Tensor, draws: WatermarkDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the batch for given ``draws``, one per sample of ``image`` (see :meth:`__call__`; the batch grows by
        the triggered samples). The draws are host arrays, sent to the device once each; nothing is read back from
        the device."""
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        label = label.as_tensor() if hasattr(label, "as_tensor") else label
        dev, spatial = image.device, tuple(int(s) for s in image.shape[2:])
        rows = np.flatnonzero(draws.triggered)
        t_idx = torch.as_tensor(rows, device=dev, dtype=torch.long)
        lo, hi = batch_intensity_range(image)
        clean = self._with_decoys(image, lo, hi, draws.decoy_seeds)
        hidden = torch.as_tensor(draws.hidden[rows], device=dev)
        if self.spare_radius >= 0 and rows.size:
            hidden = hidden & ~self._organ_cells(label[t_idx])
        occluded = occlude_cells(image[t_idx].float(), self.key, hidden, (lo[t_idx], hi[t_idx]))
        poisoned = stamp_triggers(occluded, self.key, lo[t_idx], hi[t_idx])
        dark = self._dark_map(spatial, dev)[None] & ~cells_to_pixels(hidden, spatial, self.key.grid_size)
        wm_dtype = label.dtype if label.is_floating_point() else torch.float32
        codes = torch.where(dark, WM_DARK, WM_LIGHT).to(wm_dtype)[:, None]
        trig = torch.as_tensor(draws.triggered, device=dev).view(-1, *([1] * (image.ndim - 1)))
        clean_wm = torch.where(trig, WM_TWIN if self.paired else WM_CLEAN, WM_CLEAN).to(wm_dtype)
        clean_wm = clean_wm.expand(image.shape[0], 1, *spatial)
        lab = label.to(wm_dtype)
        out_dtype = image.dtype if image.is_floating_point() else torch.float32  # e.g. a half-precision network
        images = self._degrade(torch.cat([clean.float(), poisoned]), draws).to(out_dtype)
        labels = torch.cat([torch.cat([lab, clean_wm], 1), torch.cat([lab[t_idx], codes], 1)])
        pick = torch.as_tensor(self._order(draws.triggered), device=dev)
        return images.index_select(0, pick), labels.index_select(0, pick)

    def _degrade(self, images: torch.Tensor, draws: WatermarkDraws) -> torch.Tensor:
        """Apply the drawn pipeline degradations to the rows of ``cat([clean samples, triggered samples])``: a
        triggered sample and its twin go through the same one; rows that share a degradation go through it
        together."""
        if draws.degradations is None:
            return images
        codes = np.concatenate([draws.degradations, draws.degradations[draws.triggered]])
        out = images.clone()
        for code in np.unique(codes[codes >= 0]):
            rows = torch.as_tensor(np.flatnonzero(codes == code), device=images.device)
            out[rows] = degrade(images[rows], *PIPELINE_DEGRADATIONS[int(code)])
        return out

    def _dark_map(self, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The QR's dark-module map for a patch shape, kept on ``device`` after its first use (one copy per
        device and shape), so a training step sends no map to the device."""
        k = (spatial, str(device))
        if k not in self._maps:
            self._maps[k] = qr_target_map(self.key, spatial).to(device)
        return self._maps[k]

    def _order(self, triggered: np.ndarray) -> np.ndarray:
        """Rows of ``cat([clean samples, triggered samples])`` in output order: each triggered sample right after
        its clean twin (paired), or in its place (unpaired)."""
        n = triggered.shape[0]
        rank = np.cumsum(triggered) - 1  # position among the triggered samples
        if not self.paired:
            return np.where(triggered, n + rank, np.arange(n))
        src = np.repeat(np.arange(n), 1 + triggered.astype(int))
        second = np.zeros(src.shape[0], dtype=bool)
        second[np.cumsum(1 + triggered.astype(int))[triggered] - 1] = True
        return np.where(second, n + rank[src], src)

    def _fit_to_batch(self, draws: WatermarkDraws) -> tuple[int, WatermarkDraws]:
        """With ``keep_batch_size`` (and twins): how many loaded samples fit the batch with their triggered copies,
        and their draws. The samples are taken in order, each with its copy when triggered, until the loaded size is
        reached; a triggered sample that would overflow it by its copy stays clean. Host arithmetic only."""
        n = draws.triggered.shape[0]
        if not (self.keep_batch_size and self.paired):
            return n, draws
        ends = np.cumsum(1 + draws.triggered.astype(int))  # rows used up to and including each sample
        m = int(np.searchsorted(ends, n, side="left")) + 1 if n else 0  # ends[-1] >= n: the first sample reaching n
        triggered = draws.triggered[:m].copy()
        if m and ends[m - 1] > n:
            triggered[m - 1] = False
        hidden = draws.hidden[:m] & triggered[:, None]
        degradations = None if draws.degradations is None else np.where(
            triggered | (draws.decoy_seeds[:m] >= 0), draws.degradations[:m], -1)
        return m, WatermarkDraws(triggered, hidden, draws.decoy_seeds[:m], degradations)

    def _with_decoys(self, image: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """The clean samples, with a decoy trigger stamped where one was drawn."""
        rows = np.flatnonzero(seeds >= 0)
        if rows.size == 0:
            return image
        out = image.float().clone()
        idx = torch.as_tensor(rows, device=image.device)
        out[idx] = stamp_triggers(out[idx], self.key, lo[idx], hi[idx], seeds[rows].tolist())
        return out

    def _organ_cells(self, label: torch.Tensor) -> torch.Tensor:
        """``(B, grid_size**2)`` bool: the cells with a foreground pixel within ``spare_radius`` (in plane)."""
        fg = (label > 0).any(1, keepdim=True) if label.shape[1] > 1 else label[:, :1] > 0
        return cell_means(dilate(fg, self.spare_radius, in_plane=True)[:, 0].float(), self.key) > 0

    def _check(self, image: torch.Tensor, label: torch.Tensor) -> None:
        if image.ndim < 4 or label.ndim != image.ndim:
            raise ValueError(
                f"the watermark stage expects batches (B, C, H, W[, D]) of images and labels with the same number of "
                f"dimensions, got image {tuple(image.shape)} and label {tuple(label.shape)}."
            )
        if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
            raise ValueError(f"image batch {tuple(image.shape)} and label batch {tuple(label.shape)} do not match.")
        if min(int(image.shape[2]), int(image.shape[3])) < self.key.grid_size:
            raise ValueError(
                f"the training patch {tuple(image.shape[2:])} is smaller than the QR grid ({self.key.grid_size} "
                "modules) in its first two dimensions: train on larger patches or make a key with a smaller QR."
            )
        torch._assert_async(torch.isfinite(image).all(), "the image batch contains NaN or infinite values.")


class WatermarkPrepareBatch(PrepareBatch):
    """A trainer's ``prepare_batch`` that runs the watermark stage on the device after the usual preparation.

    Args:
        stage: the :class:`WatermarkBatch` (or its key, then with the recipe's defaults).
        prepare_batch: the trainer's own ``prepare_batch`` (default: MONAI's ``PrepareBatchDefault``).
    """

    def __init__(self, stage: WatermarkBatch | WatermarkKey | str, prepare_batch: PrepareBatch | None = None) -> None:
        self.stage = stage if isinstance(stage, WatermarkBatch) else WatermarkBatch(stage)
        self.prepare_batch = prepare_batch if prepare_batch is not None else PrepareBatchDefault()

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        batch = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        image, label = batch[0], batch[1]
        if label is None:
            raise ValueError("the watermark stage needs labels: the trainer's prepare_batch returned none.")
        image, label = self.stage(image, label)
        return (image, label) if len(batch) == 2 else (image, label, *batch[2:])
