"""Calibrated claims: the empirical null distribution of clean models and the key's published commitment.

The binomial p-value of :func:`~monai_stealthmark.verify.readout.binomial_p_value` treats QR modules as
independent coin flips under "this model does not carry this key". Neighbouring modules of a real network's
output are correlated, so that p-value can be optimistic. A :class:`NullDistribution` holds the module agreement
of clean models (measured by :func:`~monai_stealthmark.verify.calibrate.calibrate_null`); a suspect is placed in
it (rank and Gaussian tail). A :class:`Commitment` dates the key, so that a claim can show the key predates the
suspect model. The verifier reads both types; they import nothing from it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_json
from monai_stealthmark.verify.readout import binomial_p_value

__all__ = ["NullDistribution", "vote_agreement", "Commitment", "check_commitment"]


def vote_agreement(modules: np.ndarray, key: WatermarkKey) -> float:
    """Share of payload modules where the per-module majority vote over images equals the key's QR."""
    _, agree, n = binomial_p_value(modules, key)
    return agree / n


@dataclasses.dataclass
class NullDistribution:
    """Module agreement of clean models queried with one key (the null hypothesis, measured).

    Attributes:
        key_fingerprint: the key the null was measured with (a null is only valid for that key).
        agreements: majority-vote module agreement of each clean model.
        models: a description of each clean model (architecture, seed or file).
        n_images: images queried per model.
    """

    key_fingerprint: str
    agreements: list[float]
    models: list[str]
    n_images: int

    def __post_init__(self) -> None:
        if len(self.agreements) < 2:
            raise ValueError(f"a null distribution needs at least 2 clean models, got {len(self.agreements)}.")

    @property
    def mean(self) -> float:
        return float(np.mean(self.agreements))

    @property
    def std(self) -> float:
        return float(max(np.std(self.agreements, ddof=1), 1e-3))  # a floor: 5 models cannot pin a tiny spread

    def p_values(self, observed: float) -> dict[str, float]:
        """``p_empirical`` = (1 + #null >= observed) / (1 + n) and ``p_gaussian`` = normal tail above observed."""
        a = np.asarray(self.agreements)
        z = (observed - self.mean) / self.std
        return {
            "z": float(z),
            "p_empirical": float((1 + (a >= observed).sum()) / (1 + a.size)),
            "p_gaussian": float(norm.sf(z)),
        }

    def place(self, modules: np.ndarray, key: WatermarkKey) -> dict[str, Any]:
        """Where a suspect's read modules fall in this null: the report's ``calibration`` entry.

        Args:
            modules: the suspect's read QR modules ``(B, n, n)``.
            key: the key the suspect was queried with; it must be the one this null was measured with.

        Returns:
            ``{"observed", "n_models", "null_mean", "null_std", "z", "p_empirical", "p_gaussian"}``.
        """
        if self.key_fingerprint != key.fingerprint:
            raise ValueError("the null distribution was measured with another key (fingerprints differ): calibrate with this key.")
        observed = vote_agreement(modules, key)
        placement = {"observed": observed, "n_models": len(self.agreements), "null_mean": self.mean, "null_std": self.std}
        placement.update(self.p_values(observed))
        return placement

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NullDistribution:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"null distribution file {str(path)!r} does not exist (run `calibrate` first).")
        try:
            d = json.loads(path.read_text())
            return cls(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{str(path)!r} is not a null distribution file: {e}") from e


@dataclasses.dataclass
class Commitment:
    """A published commitment: the key's fingerprint and when it was made public (ISO 8601)."""

    fingerprint: str
    committed_at: str

    @classmethod
    def for_key(cls, key: WatermarkKey, committed_at: str | None = None) -> Commitment:
        when = committed_at or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        return cls(key.fingerprint, when)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Commitment:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{str(path)!r} is not a commitment file: {e}") from e


def _date(s: str) -> _dt.datetime:
    try:
        d = _dt.datetime.fromisoformat(s)
    except ValueError as e:
        raise ValueError(f"{s!r} is not an ISO 8601 date (e.g. 2026-10-01 or 2026-10-01T12:00:00+00:00).") from e
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def check_commitment(key: WatermarkKey, commitment: Commitment | None, suspect_date: str | None) -> dict[str, Any]:
    """Is the claim admissible? The key must match a commitment made before the suspect model appeared.

    Returns:
        ``{"fingerprint_matches", "committed_at", "suspect_date", "committed_before_suspect", "admissible",
        "flags"}``. Without a commitment the claim is flagged (a key could have been crafted afterwards).
    """
    flags = []
    out: dict[str, Any] = {"committed_at": None, "suspect_date": suspect_date, "fingerprint_matches": None, "committed_before_suspect": None}
    if commitment is None:
        flags.append("no commitment given: the key could have been made after the suspect model appeared")
    else:
        out["committed_at"] = commitment.committed_at
        out["fingerprint_matches"] = commitment.fingerprint == key.fingerprint
        if not out["fingerprint_matches"]:
            flags.append("the key's fingerprint differs from the committed one (edited or other key)")
        if suspect_date is None:
            flags.append("no suspect date given: cannot tell whether the commitment came first")
        else:
            out["committed_before_suspect"] = _date(commitment.committed_at) < _date(suspect_date)
            if not out["committed_before_suspect"]:
                flags.append(f"the key was committed ({commitment.committed_at}) after the suspect model's date ({suspect_date})")
    out["flags"] = flags
    out["admissible"] = not flags
    return out
