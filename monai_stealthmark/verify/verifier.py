"""Black-box ownership verification: trigger the images, query the suspect, read the QR, decide."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import apply_trigger, load_key
from monai_stealthmark.verify.lime import lime_attributions
from monai_stealthmark.verify.query import check_probabilities, uncertainty_map
from monai_stealthmark.verify.readout import ERASURE_MARGIN_PX, binomial_p_value, bit_accuracy, cell_means, organ_modules, read_scores
from monai_stealthmark.verify.report import VerificationReport

__all__ = ["trigger_batch", "direct_scores", "verify_ownership"]


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
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
    return torch.stack([apply_trigger(img, key) for img in images])


def direct_scores(query: Callable, images: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """Per-cell mean uncertainty ``(B, grid_size**2)`` of the triggered images."""
    return cell_means(uncertainty_map(_triggered_probs(query, images, key)), key)


def _triggered_probs(query: Callable, images: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    x = trigger_batch(images, key)
    return check_probabilities(query(x), x)


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
    null: Any | None = None,
    commitment: Any | None = None,
    suspect_date: str | None = None,
    erasure_margin: int | None = ERASURE_MARGIN_PX,
) -> VerificationReport:
    """Check whether a black-box model carries ``key``'s watermark.

    Args:
        query: ``images -> probability maps`` (e.g. :class:`~monai_stealthmark.verify.ModelQuery`); only its
            outputs are read.
        images: clean images ``(B, C, spatial...)``; the trigger is stamped here, never inside the model.
        key: the owner's key or key file.
        mode: ``"direct"`` (mean uncertainty per QR module) or ``"lime"`` (LIME attributions per module).
        alpha: p-value threshold of the verdict.
        min_asr: least share of exactly decoded images for the verdict.
        lime_samples: perturbation samples per image in LIME mode.
        lime_seed: seed of the LIME masks.
        lime_batch_size: images per query in LIME mode.
        null: a :class:`~monai_stealthmark.verify.calibrate.NullDistribution` measured with this key on clean
            models; the verdict then also needs the suspect's Gaussian-tail p-value in that null <= ``alpha``.
        commitment: the owner's published :class:`~monai_stealthmark.verify.calibrate.Commitment`; with it the
            verdict also needs the key to match it and to predate ``suspect_date``.
        suspect_date: when the suspect model appeared (ISO 8601), checked against the commitment.
        erasure_margin: images that no binarisation decodes are read once more with the modules within this many
            pixels of the model's own predicted organ (on the triggered query) as Reed-Solomon erasures
            (:func:`~monai_stealthmark.verify.read_scores`); None turns that read off. LIME mode spends one more
            query per image on it.
    """
    key = load_key(key)
    batch = _as_batch(images)  # validates shape and NaNs before any query is sent
    t0 = time.perf_counter()
    n0 = getattr(query, "n_queries", None)
    if mode not in ("direct", "lime"):
        raise ValueError(f"mode must be 'direct' or 'lime', got {mode!r}.")
    probs = _triggered_probs(query, batch, key) if mode == "direct" or erasure_margin is not None else None
    if mode == "direct":
        scores = cell_means(uncertainty_map(probs), key)
        n_queries = batch.shape[0]
    else:
        scores = torch.stack(
            [lime_attributions(query, img, key, lime_samples, lime_seed, batch_size=lime_batch_size).to(batch.device) for img in batch]
        )
        n_queries = batch.shape[0] * (lime_samples + (probs is not None))
    unreliable = organ_modules(probs, key, erasure_margin) if erasure_margin is not None else None
    # the raw read, then (direct mode) the log scale, then the organ's codewords as erasures, each only where the
    # previous found no QR (see read_scores); the vote is one QR from all images: evidence, not part of the ASR
    modules, decoded, vote_decoded, reads = read_scores(scores, key, mode, unreliable)
    acc = bit_accuracy(modules, key)
    p, _, _ = binomial_p_value(modules, key)
    asr = float(np.mean([t == key.payload for t in decoded]))
    verdict = bool(p <= alpha and asr >= min_asr)
    calibration = commit = None
    if null is not None:
        from monai_stealthmark.verify.calibrate import vote_agreement

        if null.key_fingerprint != key.fingerprint:
            raise ValueError("the null distribution was measured with another key (fingerprints differ): calibrate with this key.")
        observed = vote_agreement(modules, key)
        calibration = {"observed": observed, "n_models": len(null.agreements), "null_mean": null.mean, "null_std": null.std}
        calibration.update(null.p_values(observed))
        verdict = verdict and calibration["p_gaussian"] <= alpha
    if commitment is not None:
        from monai_stealthmark.verify.calibrate import check_commitment

        commit = check_commitment(key, commitment, suspect_date)
        verdict = verdict and commit["admissible"]
    if n0 is not None:
        n_queries = query.n_queries - n0
    return VerificationReport(
        mode=mode,
        key_fingerprint=key.fingerprint,
        payload=key.payload,
        n_images=int(batch.shape[0]),
        decoded=decoded,
        reads=reads,
        vote_decoded=vote_decoded,
        asr=asr,
        bit_accuracy=[float(a) for a in acc],
        p_value=p,
        alpha=alpha,
        min_asr=min_asr,
        verdict=verdict,
        n_queries=int(n_queries),
        seconds=time.perf_counter() - t0,
        modules=modules,
        expected=key.qr_matrix,
        maps=scores.reshape(-1, key.grid_size, key.grid_size).cpu().numpy(),
        calibration=calibration,
        commitment=commit,
    )
