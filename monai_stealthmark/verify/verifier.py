"""Black-box ownership verification: trigger the images, query the suspect, read the QR, decide."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import batch_intensity_range, load_key, stamp_triggers
from monai_stealthmark.verify.claims import Commitment, NullDistribution, check_commitment
from monai_stealthmark.verify.lime import lime_attributions
from monai_stealthmark.verify.query import check_probabilities, fit_window
from monai_stealthmark.verify.readout import (
    ERASURE_MARGIN_PX,
    binomial_p_value,
    bit_accuracy,
    organ_modules,
    read_scores,
    uncertainty_scores,
)
from monai_stealthmark.verify.report import VerificationReport

__all__ = ["trigger_batch", "direct_scores", "verify_ownership"]

MODES = ("direct", "lime")


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The query images as one float batch ``(B, C, spatial...)``, refused before any query when empty or not finite."""
    if isinstance(images, torch.Tensor):
        batch = images
    else:
        if len(images) == 0:
            raise ValueError("no query images: verification needs at least one image.")
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) != 1:
            raise ValueError(f"all query images must have one shape, got {sorted(shapes)}.")
        batch = torch.stack([torch.as_tensor(i) for i in images])
    if batch.ndim < 4:
        raise ValueError(f"images must be (B, C, H, W[, D]), got shape {tuple(batch.shape)}.")
    if batch.shape[0] == 0:
        raise ValueError("no query images: verification needs at least one image.")
    if not torch.isfinite(batch).all():
        raise ValueError("the query images contain NaN or infinite values.")
    return batch.float()


def trigger_batch(images: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """Stamp the key's trigger on each image of a batch (each adapted to its own intensity range)."""
    return stamp_triggers(images, key, *batch_intensity_range(images))


def direct_scores(query: Callable, images: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """Per-cell mean uncertainty ``(B, grid_size**2)`` of the triggered images, off the predicted organ
    (:func:`~monai_stealthmark.verify.uncertainty_scores`)."""
    return uncertainty_scores(_triggered_probs(query, images, key), key)


def _triggered_probs(query: Callable, images: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """The suspect's answer to the triggered images, refused unless it is per-class probabilities of their size."""
    x = trigger_batch(images, key)
    return check_probabilities(query(x), x)


class _LimeSettings(NamedTuple):
    """How LIME mode perturbs each image: samples per image, mask seed, images per query."""

    samples: int
    seed: int
    batch_size: int


@dataclasses.dataclass
class _Reading:
    """What one read of the suspect gave: per-cell scores, the QR modules and the decoded texts."""

    scores: torch.Tensor  # (B, grid_size**2) mean uncertainty or LIME attribution per cell
    modules: np.ndarray  # (B, n, n) the first read's QR modules (bit accuracy and p-value come from these)
    decoded: list[str | None]  # per image, the text of the first read that decoded
    vote_decoded: str | None  # the per-module majority vote over all images, decoded
    reads: list[str | None]  # per image, which read decoded ("raw", "log", "erasure") or None
    n_queries: int  # images sent to the suspect


def _module_scores(query: Callable, batch: torch.Tensor, key: WatermarkKey, mode: str, lime: _LimeSettings, need_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Query the suspect with the triggered batch and score each grid cell.

    Direct mode scores a cell by its mean uncertainty; LIME mode by the attribution of hiding it. The triggered
    probabilities are also returned when ``need_probs`` (the organ read needs them), else None.

    Returns:
        ``(scores (B, grid_size**2), probs or None, number of images sent)``.
    """
    n = batch.shape[0]
    probs = _triggered_probs(query, batch, key) if mode == "direct" or need_probs else None
    if mode == "direct":
        return uncertainty_scores(probs, key), probs, n
    scores = torch.stack(
        [lime_attributions(query, img, key, lime.samples, lime.seed, batch_size=lime.batch_size).to(batch.device) for img in batch]
    )
    return scores, probs, n * (lime.samples + (probs is not None))


def _read_suspect(query: Callable, batch: torch.Tensor, key: WatermarkKey, mode: str, lime: _LimeSettings, erasure_margin: int | None) -> _Reading:
    """Score the suspect's cells and read the QR from them, with the organ's modules as erasures when asked."""
    scores, probs, n_queries = _module_scores(query, batch, key, mode, lime, erasure_margin is not None)
    unreliable = organ_modules(probs, key, erasure_margin) if erasure_margin is not None else None
    # the raw read, then (direct mode) the log scale, then the organ's codewords as erasures, each only where the
    # previous found no QR (see read_scores); the vote is one QR from all images: evidence, not part of the ASR
    modules, decoded, vote_decoded, reads = read_scores(scores, key, mode, unreliable)
    return _Reading(scores, modules, decoded, vote_decoded, reads, n_queries)


def _verdict(shown: bool, alpha: float, calibration: dict[str, Any] | None, commit: dict[str, Any] | None) -> bool:
    """The statistical verdict, further requiring the null's Gaussian tail <= alpha and an admissible commitment."""
    if calibration is not None:
        shown = shown and calibration["p_gaussian"] <= alpha
    if commit is not None:
        shown = shown and commit["admissible"]
    return bool(shown)


def verify_ownership(
    query: Callable,
    images: torch.Tensor | Sequence[torch.Tensor],
    key: WatermarkKey | str,
    mode: str = "direct",
    alpha: float = 1e-6,
    min_asr: float = 0.5,
    lime_samples: int = 500,
    lime_seed: int = 0,
    lime_batch_size: int = 64,
    null: NullDistribution | None = None,
    commitment: Commitment | None = None,
    suspect_date: str | None = None,
    erasure_margin: int | None = ERASURE_MARGIN_PX,
) -> VerificationReport:
    """Check whether a black-box model carries ``key``'s watermark.

    Args:
        query: ``images -> probability maps`` (e.g. :class:`~monai_stealthmark.verify.ModelQuery`); only its
            outputs are read.
        images: clean images ``(B, C, spatial...)``; the trigger is stamped here, never inside the model. When the
            query has a ``window`` (the network's input window, e.g. a sliding window's ``roi_size``) they are
            centre-cropped or padded to it first (:func:`~monai_stealthmark.verify.fit_window`).
        key: the owner's key or key file.
        mode: ``"direct"`` (mean uncertainty per QR module) or ``"lime"`` (LIME attributions per module).
        alpha: p-value threshold of the verdict.
        min_asr: least share of exactly decoded images for the verdict.
        lime_samples: perturbation samples per image in LIME mode.
        lime_seed: seed of the LIME masks.
        lime_batch_size: images per query in LIME mode.
        null: a :class:`~monai_stealthmark.verify.claims.NullDistribution` measured with this key on clean
            models; the verdict then also needs the suspect's Gaussian-tail p-value in that null <= ``alpha``.
        commitment: the owner's published :class:`~monai_stealthmark.verify.claims.Commitment`; with it the
            verdict also needs the key to match it and to predate ``suspect_date``.
        suspect_date: when the suspect model appeared (ISO 8601), checked against the commitment.
        erasure_margin: images that no binarisation decodes are read once more with the modules within this many
            pixels of the model's own predicted organ (on the triggered query) as Reed-Solomon erasures
            (:func:`~monai_stealthmark.verify.read_scores`); None turns that read off. LIME mode spends one more
            query per image on it.
    """
    key = load_key(key)
    batch = fit_window(_as_batch(images), getattr(query, "window", None))  # validated before any query is sent
    t0, n0 = time.perf_counter(), getattr(query, "n_queries", None)
    if mode not in MODES:
        raise ValueError(f"mode must be 'direct' or 'lime', got {mode!r}.")
    read = _read_suspect(query, batch, key, mode, _LimeSettings(lime_samples, lime_seed, lime_batch_size), erasure_margin)
    p, _, _ = binomial_p_value(read.modules, key)
    asr = float(np.mean([t == key.payload for t in read.decoded]))
    calibration = null.place(read.modules, key) if null is not None else None
    commit = check_commitment(key, commitment, suspect_date) if commitment is not None else None
    return VerificationReport(
        mode=mode, key_fingerprint=key.fingerprint, payload=key.payload, n_images=int(batch.shape[0]),
        decoded=read.decoded, reads=read.reads, vote_decoded=read.vote_decoded, asr=asr,
        bit_accuracy=[float(a) for a in bit_accuracy(read.modules, key)], p_value=p, alpha=alpha, min_asr=min_asr,
        verdict=_verdict(p <= alpha and asr >= min_asr, alpha, calibration, commit),
        n_queries=int(query.n_queries - n0 if n0 is not None else read.n_queries),
        seconds=time.perf_counter() - t0, modules=read.modules, expected=key.qr_matrix,
        maps=read.scores.reshape(-1, key.grid_size, key.grid_size).cpu().numpy(),
        calibration=calibration, commitment=commit,
    )
