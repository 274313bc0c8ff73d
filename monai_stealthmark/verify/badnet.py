"""Black-box check of the BadNet baseline: does the trigger switch the key's region to the target class?"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from scipy.stats import binom

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import load_key
from monai_stealthmark.transforms.badnet import badnet_region

from .verifier import _as_batch, trigger_batch

__all__ = ["BadNetReport", "verify_badnet"]


@dataclass
class BadNetReport:
    """Result of :func:`verify_badnet`.

    Attributes:
        asr: share of triggered images whose region is mostly (``hit_ratio``) the target class.
        clean_hit_rate: the same share on the clean images (the null rate).
        p_value: one-sided binomial p-value of the triggered hits against the clean rate (Laplace-smoothed).
        verdict: ``p_value <= alpha`` and ``asr >= min_asr``.
        mean_bit_accuracy: mean share of the region's pixels predicted as the target class on triggered images
            (named so the attack runner can read it like the QR report's bit accuracy).
        n_images, seconds: as in the QR report.
    """

    asr: float
    clean_hit_rate: float
    p_value: float
    verdict: bool
    mean_bit_accuracy: float
    n_images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outputs(p: Any, images: torch.Tensor) -> torch.Tensor:
    """Class maps ``(B, C, spatial...)``; unlike the QR check, one-hot hard masks are fine (only argmax is read)."""
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"cannot verify: the model returned {type(p).__name__}, not a tensor.")
    if p.ndim != images.ndim or p.shape[0] != images.shape[0] or p.shape[2:] != images.shape[2:] or p.shape[1] < 2:
        raise ValueError(
            f"cannot verify: outputs of shape {tuple(p.shape)} do not match the query {tuple(images.shape)} "
            "(expected (B, C >= 2, same spatial shape))."
        )
    if not torch.isfinite(p).all():
        raise ValueError("cannot verify: the model returned NaN or infinite values.")
    return p


@torch.no_grad()
def verify_badnet(
    query: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    key: WatermarkKey | str,
    region_size: float = 0.2,
    target_class: int = 1,
    hit_ratio: float = 0.5,
    alpha: float = 1e-6,
    min_asr: float = 0.5,
) -> BadNetReport:
    """Query ``query`` with clean and triggered ``images`` and test the backdoor's region.

    Args:
        query: ``images -> class maps`` (probabilities, logits or one-hot masks: only the argmax is read, so the
            backdoor is visible through a mask-only API, unlike the QR watermark).
        images: clean images ``(B, C, spatial...)``.
        key: the key the backdoor was trained with.
        region_size, target_class: as in :class:`~monai_stealthmark.transforms.RandBadNetd`.
        hit_ratio: least share of the region predicted as ``target_class`` for a hit.
        alpha, min_asr: thresholds of the verdict.
    """
    t0 = time.perf_counter()
    key = load_key(key)
    x = _as_batch(images)
    xt = trigger_batch(x, key)
    p_clean, p_trig = _outputs(query(x), x), _outputs(query(xt), xt)
    region = badnet_region(key, tuple(x.shape[2:]), region_size).to(p_clean.device)

    def share(p: torch.Tensor) -> torch.Tensor:
        hard = (p.argmax(1) == target_class).float()
        return (hard * region).flatten(1).sum(1) / region.sum()

    s_trig, s_clean = share(p_trig), share(p_clean)
    n = x.shape[0]
    k_trig = int((s_trig >= hit_ratio).sum())
    k_clean = int((s_clean >= hit_ratio).sum())
    p0 = (k_clean + 1) / (n + 2)
    p_value = float(binom.sf(k_trig - 1, n, p0))
    asr = k_trig / n
    return BadNetReport(
        asr=asr,
        clean_hit_rate=k_clean / n,
        p_value=p_value,
        verdict=bool(p_value <= alpha and asr >= min_asr),
        mean_bit_accuracy=float(s_trig.mean()),
        n_images=n,
        seconds=time.perf_counter() - t0,
    )
