"""Exact pixel/voxel ROC AUC of segmentation outputs: the function :func:`pixel_auc` and the cumulative
:class:`PixelAUCMetric` that scores a whole validation epoch, per foreground class.

MONAI's ``ROCAUCMetric`` takes one score per image (``(B, C)`` / ``(B,)``); here every pixel is a sample, so the
uncertainty the watermark lowers shows up as a drop in AUC. The ignite wiring is
:class:`monai_stealthmark.handlers.PixelAUC`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_tensor, evenly_divisible_all_gather

from monai_stealthmark.utils import activate, check_activation

__all__ = ["AVERAGES", "PixelAUCMetric", "pixel_auc", "reduce_auc"]

AVERAGES = ("mean", "none")


def pixel_auc(y_score: torch.Tensor, y_true: torch.Tensor) -> float:
    """Area under the ROC curve over all pixels, exact, with ties counted as 1/2 (Mann-Whitney U).

    Runs on the tensors' device in about linear time (:func:`_mann_whitney_u`: counts per bucket of scores, a sort
    only inside the buckets that hold both classes), so it is cheap for whole volumes, on CPU and GPU.

    Args:
        y_score: scores of the positive class, any shape.
        y_true: binary ground truth of the same shape.

    Returns:
        the AUC, or NaN when only one class is present.
    """
    if y_score.shape != y_true.shape:
        raise ValueError(f"y_score {tuple(y_score.shape)} and y_true {tuple(y_true.shape)} must have the same shape.")
    s = y_score.reshape(-1)
    t = y_true.reshape(-1) > 0
    if not torch.isfinite(s).all():
        raise ValueError("y_score contains NaN or infinite values.")
    n_pos = int(t.sum())
    n_neg = t.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(_mann_whitney_u(_order_keys(s), t) / (n_pos * n_neg))


_BUCKET_BITS = 16  # at most 2**16 buckets: counting them is cheap next to the pixels


def _mann_whitney_u(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The number of (positive, negative) pairs whose positive has the larger key, ties counted 1/2 (float64).

    The keys are put in buckets of equal high bits, in their order. Pairs from different buckets are counted from
    the buckets' class counts (``bincount``, linear); pairs inside one bucket need the keys' order, so only the
    buckets that hold both classes are sorted (:func:`_sorted_u`). On segmentation outputs those hold a small share
    of the pixels; in the worst case (every bucket mixed) this is one sort of all keys, as a plain rank sum is.
    """
    lo, hi = int(keys.min()), int(keys.max())
    shift = max(0, (hi - lo).bit_length() - _BUCKET_BITS)
    bucket = ((keys >> shift) - (lo >> shift)).long()  # order-preserving; no overflow, unlike keys - lo
    n_buckets = (hi >> shift) - (lo >> shift) + 1
    pos_n = torch.bincount(bucket[pos], minlength=n_buckets)
    neg_n = torch.bincount(bucket, minlength=n_buckets) - pos_n
    u = (pos_n.double() * (torch.cumsum(neg_n, 0) - neg_n).double()).sum()  # each positive beats lower buckets
    mixed = (pos_n > 0) & (neg_n > 0)
    inside = mixed[bucket].nonzero().squeeze(1)
    if inside.numel():
        u = u + _sorted_u(keys[inside], pos[inside], bucket[inside])
    return u


def _sorted_u(keys: torch.Tensor, pos: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
    """The U count of the pairs whose two members share a bucket, by a sort of the keys and their tie groups."""
    keys, order = torch.sort(keys)
    pos, bucket = pos[order], bucket[order]
    last = torch.ones_like(pos)
    torch.ne(keys[1:], keys[:-1], out=last[:-1])  # each tie group ends where the key changes
    ends = last.nonzero().squeeze(1)
    pos_cum = torch.cumsum(pos, 0)[ends]
    pos_group = torch.diff(pos_cum, prepend=pos_cum.new_zeros(1)).double()
    neg_group = torch.diff(ends, prepend=ends.new_full((1,), -1)).double() - pos_group
    neg_below = torch.cumsum(neg_group, 0) - neg_group  # negatives of the sorted keys below each group
    # the same count up to each group's bucket: pairs across buckets are counted by _mann_whitney_u already
    group_bucket = bucket[ends]
    starts = torch.ones_like(group_bucket, dtype=torch.bool)
    torch.ne(group_bucket[1:], group_bucket[:-1], out=starts[1:])
    below_bucket = (neg_below * starts).cummax(0).values  # constant over a bucket: its first group's neg_below
    return (pos_group * (neg_below - below_bucket + neg_group / 2)).sum()


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers that sort as the (finite) ``scores`` do and are equal exactly where they are: the IEEE bit patterns,
    with the magnitude bits of negative numbers flipped so that they order downwards. float64 scores keep their
    precision (int64 keys); any other floating type is exact in float32 (int32 keys); integer scores are their
    own keys."""
    if not scores.is_floating_point():
        return scores.long()
    wide = scores.dtype == torch.float64
    f = scores + 0.0 if wide else scores.float() + 0.0  # -0.0 + 0.0 = +0.0: one key for both zeros
    bits = f.view(torch.int64 if wide else torch.int32)
    magnitude = (1 << 63) - 1 if wide else (1 << 31) - 1
    return torch.where(bits < 0, bits ^ magnitude, bits)


def reduce_auc(values: torch.Tensor, average: str) -> float | torch.Tensor:
    """Reduce per-class AUCs: ``"mean"`` over the classes whose AUC is defined (a class absent from the data
    has none, and should not hide the others), NaN when none is; ``"none"`` returns them as they are."""
    return values if average == "none" else float(torch.nanmean(values))


class PixelAUCMetric(CumulativeIterationMetric):
    """Exact pixel/voxel ROC AUC accumulated over iterations, one value per scored class, gathered across DDP ranks.

    Each call adds the batch's pixels (scores and binary targets of the scored classes) to the buffers;
    :meth:`aggregate` scores all of them at once with :func:`pixel_auc`, so the result is the AUC of the epoch's
    pooled pixels, not a mean of per-image AUCs.

    Which pixel is positive for class ``c``: the label is read as class indices when it has one channel
    (``label == c``) and as one-hot otherwise (``label[:, c] > 0``). A one-channel prediction (a sigmoid model)
    scores its only channel against ``label > 0`` (index labels) or ``label[:, c] > 0`` (one-hot labels).

    Args:
        label_index: the class(es) to score: an index (1 = the first foreground class), a sequence of indices, or
            None for every foreground class ``1 .. C-1`` of a ``C``-channel prediction (class 1 for one channel).
        activation: applied to ``y_pred`` first: ``"softmax"``, ``"sigmoid"`` or None (already probabilities).
        average: ``"mean"``: the mean AUC of the scored classes (a float; the class's AUC when only one is
            scored); ``"none"``: a tensor with one AUC per scored class, in the order of :attr:`classes`.
        device: where the accumulated pixels are kept; CPU by default, since a validation epoch of 3D volumes
            may not fit in GPU memory next to the network.
    """

    def __init__(
        self,
        label_index: int | Sequence[int] | None = 1,
        activation: str | None = None,
        average: str = "mean",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
        if label_index is not None:
            label_index = (label_index,) if isinstance(label_index, int) else tuple(int(i) for i in label_index)
            if not label_index or min(label_index) < 0:
                raise ValueError(f"label_index must be None or non-negative class indices, got {label_index}.")
        self.label_index = label_index
        self.activation = check_activation(activation, allow_none=True)
        self.average = average
        self.device = torch.device(device)
        self.classes: tuple[int, ...] | None = None

    def _scored_classes(self, n_channels: int) -> tuple[int, ...]:
        """The classes scored for a ``n_channels`` prediction; fixed at the first batch for the whole epoch."""
        classes = self.label_index if self.label_index is not None else tuple(range(1, max(n_channels, 2)))
        if n_channels > 1 and max(classes) >= n_channels:
            raise ValueError(f"label_index {classes} out of range for a prediction with {n_channels} channels.")
        if self.classes is not None and classes != self.classes:
            raise ValueError(f"the scored classes changed from {self.classes} to {classes} within one epoch.")
        self.classes = classes
        return classes

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        """Pool the batch's pixels as one buffer item: scores ``(1, N, K)`` float and targets ``(1, N, K)`` uint8
        for the ``K`` scored classes (``N`` = all pixels of the batch)."""
        if y is None:
            raise ValueError("PixelAUCMetric needs the label y.")
        pred = activate(convert_to_tensor(y_pred, track_meta=False).float(), self.activation)
        label = convert_to_tensor(y, track_meta=False)
        n_ch = pred.shape[1]
        scores, targets = [], []
        for c in self._scored_classes(n_ch):
            scores.append(pred[:, c] if n_ch > 1 else pred[:, 0])
            if label.shape[1] > 1:  # one-hot
                targets.append(label[:, c] > 0)
            else:  # class indices (or a binary mask for a one-channel model)
                targets.append(label[:, 0] == c if n_ch > 1 else label[:, 0] > 0)
        k = len(scores)
        score = torch.stack(scores, -1).reshape(1, -1, k).to(self.device)
        target = torch.stack(targets, -1).reshape(1, -1, k).to(self.device, torch.uint8)
        return [score, target]

    def _compute_list(self, y_pred, y=None, **kwargs) -> list[torch.Tensor]:  # type: ignore[override]
        """Decollated samples (which may differ in size, e.g. whole volumes) pooled into one buffer item."""
        if y is None:
            raise ValueError("PixelAUCMetric needs the label y.")
        items = [self._compute_tensor(torch.as_tensor(p)[None], torch.as_tensor(t)[None]) for p, t in zip(y_pred, y)]
        return [torch.cat(buf, 1) for buf in zip(*items)]

    def _sync(self) -> None:
        """Gather the pooled pixels of all ranks. Buffer items differ in pixel count, so they are concatenated
        along the pixel axis rather than stacked as the base class does (same ``evenly_divisible_all_gather``)."""
        if self._synced or self._buffers is None:
            return
        self._synced_tensors = [evenly_divisible_all_gather(torch.cat(b, 0), concat=True) for b in self._buffers]
        self._synced = True

    def aggregate(self, average: str | None = None) -> float | torch.Tensor:
        """The AUC of every scored class over all pixels seen since the last reset, reduced by ``average``
        (default: the constructor's); see :class:`PixelAUCMetric`."""
        average = average or self.average
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
        buffers = self.get_buffer()
        if buffers is None:
            raise RuntimeError("PixelAUCMetric needs at least one update before aggregate.")
        scores, targets = buffers
        values = torch.tensor([pixel_auc(scores[:, k], targets[:, k]) for k in range(scores.shape[1])], dtype=torch.float64)
        return reduce_auc(values, average)

    def reset(self) -> None:
        """Empty the buffers and forget the scored classes (a new epoch may score another set)."""
        super().reset()
        self.classes = None
