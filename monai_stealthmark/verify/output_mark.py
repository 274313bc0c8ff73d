"""Detect the key's output mark (:mod:`monai_stealthmark.key.output_mark`) in a black box's answers to clean
queries: the test that reaches a student distilled from the watermarked model, which never answers a trigger.

The statistic: the suspect's foreground probability in its own background (where it predicts no organ), as a logit,
averaged per mark cell over all query images; Welch's one-sided t-test of the key's raised cells against the
others. The key splits the cells by a fair random draw made before any model, so for a model that never learned that
split the two halves are two random halves of the same cells (a randomisation test, whatever the model does in
space); the t-test is its normal approximation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from scipy import stats

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import module_index_map
from monai_stealthmark.key.output_mark import OUTPUT_MARK_CELLS, output_mark_cells
from monai_stealthmark.verify.query import check_probabilities, is_softmax_output

__all__ = ["OUTPUT_MARK_ALPHA", "OutputMarkReport", "detect_output_mark", "output_mark_logits"]

OUTPUT_MARK_ALPHA = 1e-6  # an output-mark claim needs p at most this
_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before the logit


@dataclasses.dataclass
class OutputMarkReport:
    """The output-mark test on one suspect.

    Attributes:
        t: Welch's t of the raised cells' mean background logit against the other cells'.
        p_value: its one-sided p-value (raised cells higher).
        effect: raised minus other cells' mean background logit.
        n_cells: cells with background pixels (of ``OUTPUT_MARK_CELLS**2``).
        n_images: query images.
        alpha: the p-value a claim needs.
    """

    t: float
    p_value: float
    effect: float
    n_cells: int
    n_images: int
    alpha: float = OUTPUT_MARK_ALPHA

    @property
    def verdict(self) -> bool:
        """Whether the output mark is shown (``p_value <= alpha``)."""
        return self.p_value <= self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


def output_mark_logits(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground logit of each pixel and the background mask ``(B, spatial...)`` of a batch of probability maps.

    The foreground probability is ``1 - p_0`` for softmax maps (any class but the background) and the largest channel
    for one or more sigmoid channels; a pixel is background where that probability is below 0.5.
    """
    if probs.shape[1] > 1 and is_softmax_output(probs):
        fg = 1 - probs[:, 0]
    else:
        fg = probs.amax(1)
    fg = fg.clamp(_EPS, 1 - _EPS)
    return torch.log(fg) - torch.log1p(-fg), fg < 0.5


def detect_output_mark(
    query: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    key: WatermarkKey,
    batch_size: int = 8,
    alpha: float = OUTPUT_MARK_ALPHA,
) -> OutputMarkReport:
    """Test a black box for the key's output mark with clean queries (no trigger).

    Args:
        query: the suspect: images ``(B, C_in, spatial...)`` -> probabilities ``(B, C, spatial...)``.
        images: clean query images (the owner's own data, on the suspect's input grid).
        key: the owner's key (its mark cells).
        batch_size: images per query call.
        alpha: the p-value a claim needs.

    Raises:
        NotProbabilitiesError: the suspect does not return probability maps.
        ValueError: fewer than two cells of either half hold background pixels.
    """
    spatial = tuple(int(s) for s in images.shape[2:])
    idx = module_index_map(spatial, OUTPUT_MARK_CELLS).reshape(-1)
    n_cells = OUTPUT_MARK_CELLS**2
    sums = torch.zeros(n_cells, dtype=torch.float64)
    counts = torch.zeros(n_cells, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            p = check_probabilities(query(x), x)
            logit, background = output_mark_logits(p.cpu())
            w = background.reshape(background.shape[0], -1).double()
            sums.index_add_(0, idx, (logit.reshape(w.shape).double() * w).sum(0))
            counts.index_add_(0, idx, w.sum(0))
    raised = output_mark_cells(key)
    seen = counts > 0
    means = sums / counts.clamp_min(1)
    hi, lo = means[raised & seen], means[~raised & seen]
    if hi.numel() < 2 or lo.numel() < 2:
        raise ValueError(
            f"the output-mark test needs background in at least two cells of each half; got {hi.numel()} raised and "
            f"{lo.numel()} other cells with background pixels in {images.shape[0]} images."
        )
    res = stats.ttest_ind(hi.numpy(), lo.numpy(), equal_var=False, alternative="greater")
    t = float(res.statistic) if math.isfinite(res.statistic) else 0.0  # constant halves: no evidence either way
    p = float(res.pvalue) if math.isfinite(res.pvalue) else 1.0
    return OutputMarkReport(t=t, p_value=p, effect=float(hi.mean() - lo.mean()), n_cells=int(seen.sum()),
                             n_images=int(images.shape[0]), alpha=alpha)
