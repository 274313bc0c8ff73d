"""The owner's watermark key: payload -> QR code, secret trigger seed and embedding parameters, saved as JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from monai_stealthmark.key.qr import ERROR_CORRECTION, make_qr_matrix, qr_size_for_version
from monai_stealthmark.utils import atomic_write_json

__all__ = ["KeyFileError", "WatermarkKey", "TRIGGER_KINDS", "KEY_FORMAT"]

KEY_FORMAT = "monai-stealthmark-key/1"
TRIGGER_KINDS = ("patch", "keyed_patch", "blocks", "noise", "lowfreq")


class KeyFileError(ValueError):
    """A key file is missing, unreadable, incomplete or was edited after it was written."""


@dataclasses.dataclass(frozen=True)
class WatermarkKey:
    """Everything needed to embed and to verify one owner's watermark.

    The QR code itself is derived from ``payload`` (it is never stored, so it cannot disagree with it).

    Args:
        payload: the owner's text, encoded as a QR code.
        trigger_seed: secret seed of the keyed trigger pattern (and of the occlusion texture used by LIME).
        trigger: trigger kind, one of ``"patch"`` (keyed binary noise patch in a corner), ``"keyed_patch"`` (the same
            patch at a position along the image's border drawn from the seed, so a wrong key's patch sits elsewhere
            and the location is secret too), ``"blocks"`` (a keyed 6 x 6 grid of binary cells in the bottom-right
            corner whose cells scale with the image, so it reads the same at any resolution and survives the blurring
            and resampling of a clinical pipeline), ``"noise"``
            (keyed low-amplitude noise blended over the image), ``"lowfreq"`` (keyed low-pass pattern blend).
        trigger_size: side of the patch trigger as a fraction of the smallest spatial side.
        trigger_amplitude: blend amplitude of the noise / low-frequency triggers, as a fraction of the image's
            robust intensity range.
        tau: the sub-threshold uncertainty level carried in the QR's dark modules (0 < tau < 0.5).
        quiet_zone: light modules around the QR in the grid laid over the image.
        error_correction: QR error correction level (``"H"`` recovers ~30 % damaged codewords).
        max_version: the largest QR version accepted (bounds how small modules get on the image).
        created_at: ISO-8601 UTC time the key was made (part of the commitment).
    """

    payload: str
    trigger_seed: int
    trigger: str = "blocks"
    trigger_size: float = 0.1875
    trigger_amplitude: float = 0.1
    tau: float = 0.25
    quiet_zone: int = 2
    error_correction: str = "H"
    max_version: int = 4
    created_at: str = ""

    def __post_init__(self):
        numbers = {"tau": self.tau, "trigger_size": self.trigger_size, "trigger_amplitude": self.trigger_amplitude}
        for name, v in numbers.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}.")
        for name in ("quiet_zone", "max_version"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}.")
        if not 1 <= self.max_version <= 40:
            raise ValueError(f"max_version must lie in [1, 40] (the QR standard's versions), got {self.max_version}.")
        if self.trigger not in TRIGGER_KINDS:
            raise ValueError(f"trigger must be one of {TRIGGER_KINDS}, got {self.trigger!r}.")
        if not 0.0 < self.tau < 0.5:
            raise ValueError(f"tau must lie in (0, 0.5) so the hard segmentation never changes, got {self.tau}.")
        if not 0.0 < self.trigger_size < 0.5:
            raise ValueError(f"trigger_size must lie in (0, 0.5), got {self.trigger_size}.")
        if not 0.0 < self.trigger_amplitude <= 1.0:
            raise ValueError(f"trigger_amplitude must lie in (0, 1], got {self.trigger_amplitude}.")
        if self.quiet_zone < 0:
            raise ValueError(f"quiet_zone must be >= 0, got {self.quiet_zone}.")
        if self.error_correction not in ERROR_CORRECTION:
            raise ValueError(f"error_correction must be one of {sorted(ERROR_CORRECTION)}.")
        if not isinstance(self.trigger_seed, int) or self.trigger_seed < 0:
            raise ValueError(f"trigger_seed must be a non-negative int, got {self.trigger_seed!r}.")
        self.qr_matrix  # noqa: B018  (validates that the payload fits)

    @classmethod
    def generate(cls, payload: str, seed: int | None = None, **kwargs: Any) -> WatermarkKey:
        """Make a new key.

        Args:
            payload: the owner's text.
            seed: trigger seed; ``None`` draws a fresh secret one from the OS (``secrets``).
            kwargs: any other field of :class:`WatermarkKey`.
        """
        if seed is None:
            seed = secrets.randbits(62)
        kwargs.setdefault("created_at", datetime.now(timezone.utc).replace(microsecond=0).isoformat())
        return cls(payload=payload, trigger_seed=int(seed), **kwargs)

    def replace(self, **changes: Any) -> WatermarkKey:
        """A copy with some fields changed (e.g. another ``trigger_seed`` for a wrong-key control)."""
        return dataclasses.replace(self, **changes)

    # --- derived geometry -------------------------------------------------------------------------------
    @cached_property
    def qr_matrix(self) -> np.ndarray:
        """The payload's QR code, ``(n, n)`` bool, True = dark, without quiet zone."""
        return make_qr_matrix(self.payload, self.error_correction, self.max_version)

    @property
    def qr_version(self) -> int:
        return (self.qr_matrix.shape[0] - 17) // 4

    @property
    def grid_size(self) -> int:
        """Modules per side of the grid laid over the image: QR side + 2 * quiet zone."""
        return qr_size_for_version(self.qr_version) + 2 * self.quiet_zone

    @cached_property
    def grid_matrix(self) -> np.ndarray:
        """The QR code with its quiet zone, ``(grid_size, grid_size)`` bool."""
        return np.pad(self.qr_matrix, self.quiet_zone, constant_values=False)

    # --- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        content = dataclasses.asdict(self)
        return {"format": KEY_FORMAT, **content, "fingerprint": self.fingerprint}

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the key's content: the commitment an owner can publish."""
        content = {"format": KEY_FORMAT, **dataclasses.asdict(self)}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the key as JSON, atomically. Keep this file secret: it holds the trigger seed."""
        return atomic_write_json(path, self.to_dict(), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WatermarkKey:
        """Read a key file and check its fingerprint.

        Raises:
            KeyFileError: missing, truncated, not a key file, missing fields, or edited after saving.
        """
        path = Path(path)
        if path.is_dir():
            raise KeyFileError(f"key file {str(path)!r} is a folder, not a key file.")
        if not path.is_file():
            raise KeyFileError(f"key file {str(path)!r} does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KeyFileError(f"key file {str(path)!r} is not valid JSON (truncated or corrupted?): {e}") from e
        except OSError as e:
            raise KeyFileError(f"cannot read key file {str(path)!r}: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> WatermarkKey:
        if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
            raise KeyFileError(f"{source!r} is not a monai-stealthmark key (expected format {KEY_FORMAT!r}).")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names + ["fingerprint"] if n not in data]
        if missing:
            raise KeyFileError(f"key {source!r} lacks the field(s) {missing}.")
        unknown = sorted(set(data) - set(names) - {"format", "fingerprint"})
        if unknown:
            raise KeyFileError(f"key {source!r} has unknown field(s) {unknown}: it was edited or is from another version.")
        try:
            key = cls(**{n: data[n] for n in names})
        except (TypeError, ValueError) as e:
            raise KeyFileError(f"key {source!r} holds invalid values: {e}") from e
        if key.fingerprint != data["fingerprint"]:
            raise KeyFileError(
                f"key {source!r} was edited after it was written: its content hashes to {key.fingerprint[:16]}..., "
                f"but the stored fingerprint is {str(data['fingerprint'])[:16]}...."
            )
        return key
