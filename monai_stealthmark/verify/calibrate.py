"""Measuring the empirical null: clean models queried with the key's trigger exactly as a suspect is.

:func:`calibrate_null` runs :func:`~monai_stealthmark.verify.verifier.verify_ownership` (direct read-out) on clean
models of different seeds and architectures and keeps each one's module agreement in a :class:`NullDistribution`,
which the verifier then places a suspect in (see :mod:`.claims`). This module sits above the verifier; the data
types live in :mod:`.claims`, below it, and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import load_key
from monai_stealthmark.verify.claims import Commitment, NullDistribution, check_commitment, vote_agreement
from monai_stealthmark.verify.verifier import verify_ownership

__all__ = ["NullDistribution", "calibrate_null", "vote_agreement", "Commitment", "check_commitment"]


def calibrate_null(
    queries: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    key: WatermarkKey | str,
    names: Sequence[str] | None = None,
) -> NullDistribution:
    """Query each clean model with the key's trigger (direct read-out) and record its module agreement.

    Args:
        queries: black-box callables of clean models (different seeds and architectures).
        images: the clean images to stamp the trigger on.
        key: the owner's key.
        names: a description per model.
    """
    key = load_key(key)
    agreements = []
    for q in queries:
        rep = verify_ownership(q, images, key, mode="direct")
        agreements.append(vote_agreement(rep.modules, key))
    names = list(names) if names is not None else [f"model_{i}" for i in range(len(agreements))]
    return NullDistribution(key.fingerprint, [float(a) for a in agreements], names, int(images.shape[0]))
