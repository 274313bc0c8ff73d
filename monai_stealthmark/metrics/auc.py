"""Exact pixel/voxel ROC AUC for segmentation outputs (MONAI's ROCAUC takes (B, C) / (B,) only)."""

from __future__ import annotations

import torch

__all__ = ["pixel_auc"]


def pixel_auc(y_score: torch.Tensor, y_true: torch.Tensor) -> float:
    """Area under the ROC curve over all pixels, exact, with ties counted as 1/2 (Mann-Whitney U).

    Runs on the tensors' device (sort-based, O(n log n)), so it is cheap on GPU for whole volumes.

    Args:
        y_score: scores of the positive class, any shape.
        y_true: binary ground truth of the same shape.

    Returns:
        the AUC, or NaN when only one class is present.
    """
    if y_score.shape != y_true.shape:
        raise ValueError(f"y_score {tuple(y_score.shape)} and y_true {tuple(y_true.shape)} must have the same shape.")
    s = y_score.reshape(-1).double()
    t = y_true.reshape(-1) > 0
    if not torch.isfinite(s).all():
        raise ValueError("y_score contains NaN or infinite values.")
    n_pos = int(t.sum())
    n_neg = t.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    s_sorted = s[order]
    _, inverse, counts = torch.unique_consecutive(s_sorted, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = avg_rank[inverse]
    pos_rank_sum = ranks[t[order]].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
