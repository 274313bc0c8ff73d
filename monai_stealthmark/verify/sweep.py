"""Verification through a pipeline that resamples by the query's stated pixel spacing.

A bundle's inference pipeline resamples every input from the pixel spacing its header states to the pipeline's own
(``Spacingd``), segments with a sliding window and resamples the answer back. The network reads the owner's trigger
and draws the QR only at the scale it was trained at: within about half a percent of it (``docs/robustness.md``).
The owner does not know the pipeline's spacing but writes the header of each query, so the owner states a series of
spacings and one of them lands the query on the training scale. :func:`verify_over_scales` searches that series
(a coarse pass on a few images, then a fine one on all images around the best coarse scale, each ranked by exact
decodes and then bit accuracy), verifies all images at the
best scale found, and multiplies the p-value by the number of scales the search could have chosen (Bonferroni), so
the claim stays valid whichever scale the search picks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import load_key

from .report import VerificationReport
from .verifier import verify_ownership

__all__ = ["SCALE_STEP", "COARSE_EVERY", "ScaleSweepReport", "sweep_scales", "verify_over_scales"]

# relative step between neighbouring stated scales: a network reads its QR within about +-0.5 % of its training scale
SCALE_STEP = 0.004
COARSE_EVERY = 8  # the coarse pass probes every 8th scale (3.2 % apart: the QR's bits still rise near the right one)


def sweep_scales(low: float = 0.5, high: float = 2.0, step: float = SCALE_STEP) -> np.ndarray:
    """The stated-spacing factors a sweep may choose: a geometric grid ``(1 + step) ** k`` within ``[low, high]``
    (1 included)."""
    if not 0 < low <= 1 <= high:
        raise ValueError(f"the scale range must contain 1 with 0 < low <= 1 <= high, got [{low}, {high}].")
    if not 0 < step < 1:
        raise ValueError(f"step must lie in (0, 1), got {step}.")
    base = math.log1p(step)
    k = np.arange(math.ceil(math.log(low) / base - 1e-9), math.floor(math.log(high) / base + 1e-9) + 1)
    return np.exp(k * base)


@dataclasses.dataclass
class ScaleSweepReport:
    """Outcome of :func:`verify_over_scales`.

    Attributes:
        scale: the stated-spacing factor of the final check (the query's true spacing times this is what its header
            stated).
        n_scales: the scales the search could choose from (the Bonferroni factor).
        probes: scales probed (coarse and fine passes).
        report: the final check on all images at ``scale`` (its p-value is uncorrected; its verdict was taken at
            ``alpha / n_scales``, so it agrees with ``verdict``).
        p_value: ``report.p_value`` times ``n_scales`` (at most 1).
        verdict: ownership shown: ``p_value <= alpha`` and the final check's ASR at least its ``min_asr``.
        alpha: the corrected p-value a claim needs.
    """

    scale: float
    n_scales: int
    probes: int
    report: VerificationReport
    p_value: float
    verdict: bool
    alpha: float

    @property
    def asr(self) -> float:
        return self.report.asr

    @property
    def mean_bit_accuracy(self) -> float:
        return self.report.mean_bit_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "n_scales": self.n_scales, "probes": self.probes, "p_value": self.p_value,
                "verdict": self.verdict, "alpha": self.alpha, "asr": self.asr, "report": self.report.to_dict()}


def verify_over_scales(
    make_query: Callable[[float], Callable],
    images: torch.Tensor,
    key: WatermarkKey | str,
    low: float = 0.5,
    high: float = 2.0,
    probe_images: int = 4,
    alpha: float = 1e-6,
    min_asr: float = 0.5,
) -> ScaleSweepReport:
    """Verify a suspect served behind a pipeline that resamples by the stated pixel spacing, stating a series of
    spacings.

    Args:
        make_query: ``scale -> query``: the suspect as it answers queries whose header states their true pixel
            spacing times ``scale`` (e.g. ``lambda s: SpacingQuery(model, true_mm * s, ...)``).
        images: clean images ``(B, C, spatial...)`` on their true grid.
        key: the owner's key or key file.
        low, high: the range of factors searched (:func:`sweep_scales`).
        probe_images: images of the coarse pass (the first ones of ``images``).
        alpha: the corrected p-value a claim needs.
        min_asr: least share of exactly decoded images for the verdict.
    """
    key = load_key(key)
    scales = sweep_scales(low, high)
    n = len(scales)
    probe = images[: max(1, int(probe_images))]

    def coarse_rank(i: int) -> tuple[float, float]:
        r = verify_ownership(make_query(float(scales[i])), probe, key, alpha=1.0, min_asr=0.0)
        return r.asr, r.mean_bit_accuracy

    one = int(np.argmin(np.abs(np.log(scales))))  # the coarse pass keeps the grid point 1 (the true spacing)
    coarse = [i for i in range(n) if (i - one) % COARSE_EVERY == 0]
    best = max(coarse, key=coarse_rank)
    fine = range(max(0, best - COARSE_EVERY + 1), min(n, best + COARSE_EVERY))
    reports = {i: verify_ownership(make_query(float(scales[i])), images, key, alpha=alpha / n, min_asr=min_asr) for i in fine}
    best = max(fine, key=lambda i: (reports[i].asr, reports[i].mean_bit_accuracy))
    report = reports[best]
    p = min(1.0, report.p_value * n)
    return ScaleSweepReport(float(scales[best]), n, len(coarse) + len(fine), report, p,
                            bool(p <= alpha and report.asr >= min_asr), alpha)
