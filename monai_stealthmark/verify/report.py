"""The verification report: ASR, bit accuracy, p-value, verdict, the pictures that show the recovered QR, and the
hashes a third party needs to reproduce it (:func:`file_sha256`, :func:`array_sha256`,
:func:`reproduction_differences`)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monai_stealthmark.key import render_qr, restore_function_patterns
from monai_stealthmark.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["VerificationReport", "array_sha256", "file_sha256", "reproduction_differences"]

# the fields of two reports that must agree for one to reproduce the other: the claim (key, verdict and its inputs)
# and what it was computed from (the clean images; offline, also the query and answer files, which hash exactly)
REPRODUCED_FIELDS = ("key_fingerprint", "mode", "n_images", "decoded", "asr", "p_value", "alpha", "min_asr", "verdict")
REPRODUCED_PROVENANCE = ("images_sha256",)
REPRODUCED_OFFLINE = ("manifest_sha256", "queries_sha256", "answers_sha256")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(a: Any) -> str:
    """Hex SHA-256 of an array's values: its shape, then its float32 little-endian bytes in C order. The float32
    cast makes a tensor and its NumPy copy hash alike, whatever their dtype."""
    arr = np.ascontiguousarray(np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype="<f4"))
    h = hashlib.sha256(repr(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def reproduction_differences(original: dict[str, Any], repeat: dict[str, Any]) -> list[str]:
    """What differs between two reports' JSON (``report.json``) where one is meant to reproduce the other.

    Compared: the claim and its verdict inputs (:data:`REPRODUCED_FIELDS`), the clean images' hashes and, when
    both checks read a pipeline's files (offline), the manifest's, the queries' and the answers' file hashes. The
    online queries and answers are in-memory arrays whose last bits may differ on another machine, and a suspect
    queried twice may answer with other rounding while the verdict holds, so they are recorded but not compared.
    The commitment is not compared either: a referee adds the published one to a claim the owner filed without it,
    and checks it in its own run.

    Returns:
        one line per differing field (empty when the repeat reproduces the original).
    """
    out = [f"{k}: {original.get(k)!r} != {repeat.get(k)!r}" for k in REPRODUCED_FIELDS if original.get(k) != repeat.get(k)]
    a, b = original.get("provenance") or {}, repeat.get("provenance") or {}
    offline = a.get("source") == "offline" and b.get("source") == "offline"
    for k in REPRODUCED_PROVENANCE + (REPRODUCED_OFFLINE if offline else ()):
        if a.get(k) != b.get(k):
            out.append(f"provenance.{k} differs")
    return out


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _heat(x: np.ndarray, size: int = 232) -> np.ndarray:
    """A 2D map as an 8-bit grey image (min-max scaled, nearest upsampling)."""
    x = np.asarray(x, dtype=np.float64)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    img = Image.fromarray((x * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(img)


@dataclasses.dataclass
class VerificationReport:
    """Outcome of one black-box ownership check.

    Attributes:
        mode: ``"direct"`` (uncertainty map) or ``"lime"`` (attributions).
        key_fingerprint: the SHA-256 fingerprint of the key used.
        payload: the expected payload.
        n_images: triggered images queried.
        decoded: what each image's recovered QR decoded to (None where nothing decoded).
        asr: share of images whose QR decodes exactly to the payload.
        bit_accuracy: per-image share of payload modules that agree with the key's QR.
        p_value: one-sided binomial p-value of the (majority-vote) module agreement under "no watermark".
        alpha: decision threshold on the p-value.
        min_asr: decision threshold on the ASR.
        verdict: ownership shown (``p_value <= alpha`` and ``asr >= min_asr``).
        n_queries: images sent to the model.
        seconds: wall time of the check.
        vote_decoded: what the per-module majority vote of all images' recovered QRs decodes to (None if
            nothing). Extra evidence from the same queries; the ASR and the verdict do not use it.
        reads: which read decoded each image (``"raw"``, ``"log"``, ``"erasure"``; None where none did), see
            :func:`~monai_stealthmark.verify.read_scores`.
        calibration: where the suspect falls in an empirical null of clean models (``z``, ``p_empirical``,
            ``p_gaussian``, the null's size/mean/std), when one was given.
        commitment: the commitment check (``admissible``, ``flags``...), when a commitment was given.
        provenance: what a third party needs to reproduce the check: the key file's and the commitment's
            fingerprints, the SHA-256 of each clean image, query and answer, and the settings of the read-out
            (filled by the caller that read the files; None when the report was made from tensors alone).
    """

    mode: str
    key_fingerprint: str
    payload: str
    n_images: int
    decoded: list[str | None]
    asr: float
    bit_accuracy: list[float]
    p_value: float
    alpha: float
    min_asr: float
    verdict: bool
    n_queries: int = 0
    seconds: float = 0.0
    vote_decoded: str | None = None
    reads: list[str | None] | None = None
    calibration: dict[str, Any] | None = None
    commitment: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    modules: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (B, n, n) recovered
    expected: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (n, n)
    maps: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (B, g, g) scores per cell

    @property
    def mean_bit_accuracy(self) -> float:
        return float(np.mean(self.bit_accuracy)) if self.bit_accuracy else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "key_fingerprint": self.key_fingerprint,
            "payload": self.payload,
            "n_images": self.n_images,
            "asr": self.asr,
            "bit_accuracy": self.mean_bit_accuracy,
            "bit_accuracy_per_image": [float(b) for b in self.bit_accuracy],
            "decoded": self.decoded,
            "reads": self.reads,
            "decodes_by_read": self.decodes_by_read(),
            "vote_decoded": self.vote_decoded,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "min_asr": self.min_asr,
            "verdict": "ownership shown" if self.verdict else "not shown",
            "n_queries": self.n_queries,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "commitment": self.commitment,
            "provenance": self.provenance,
        }

    def decodes_by_read(self) -> dict[str, int] | None:
        """Exact decodes per read (``raw`` / ``log`` / ``erasure``), None when the reads were not recorded."""
        if self.reads is None:
            return None
        out = {"raw": 0, "log": 0, "erasure": 0}
        for t, r in zip(self.decoded, self.reads):
            if r is not None and t == self.payload:
                out[r] += 1
        return out

    def to_markdown(self) -> str:
        d = self.to_dict()
        lines = [
            f"# Ownership verification ({self.mode} read-out)",
            "",
            "| field | value |",
            "|---|---|",
            f"| verdict | **{d['verdict']}** |",
            f"| ASR (exact decodes) | {self.asr:.3f} ({sum(t == self.payload for t in self.decoded)}/{self.n_images}) |",
            *self._reads_line(),
            f"| mean bit accuracy | {self.mean_bit_accuracy:.4f} |",
            f"| majority-vote QR of all images decodes to | {self._vote_text()} |",
            f"| p-value (binomial, majority vote) | {self.p_value:.3g} (threshold {self.alpha:g}) |",
            f"| key fingerprint | `{self.key_fingerprint}` |",
            *self._calibration_lines(),
            f"| queries | {self.n_queries} in {self.seconds:.1f} s |",
            *self._provenance_lines(),
        ]
        return "\n".join(lines) + "\n"

    def _reads_line(self) -> list[str]:
        by = self.decodes_by_read()
        if by is None:
            return []
        return ["| exact decodes by read (raw / log scale / organ as erasures) | " + " / ".join(str(by[k]) for k in ("raw", "log", "erasure")) + " |"]

    def _vote_text(self) -> str:
        if self.vote_decoded is None:
            return "nothing"
        return f"`{self.vote_decoded}`" + (" (the payload)" if self.vote_decoded == self.payload else " (not the payload)")

    def _calibration_lines(self) -> list[str]:
        lines = []
        c = self.calibration
        if c is not None:
            lines.append(
                f"| empirical null ({c['n_models']} clean models) | agreement {c['observed']:.4f} vs null "
                f"{c['null_mean']:.4f} ± {c['null_std']:.4f} (z = {c['z']:.1f}); p Gaussian {c['p_gaussian']:.3g}, "
                f"p rank {c['p_empirical']:.3g} |"
            )
        m = self.commitment
        if m is not None:
            state = "admissible" if m["admissible"] else "FLAGGED: " + "; ".join(m["flags"])
            lines.append(f"| commitment | {state} (committed {m['committed_at']}, suspect {m['suspect_date']}) |")
        return lines

    def _provenance_lines(self) -> list[str]:
        p = self.provenance
        if not p:
            return []
        counts = ", ".join(f"{len(p[k])} {k[: -len('_sha256')]}" for k in ("images_sha256", "queries_sha256", "answers_sha256") if p.get(k))
        lines = [f"| key file SHA-256 | `{p.get('key_file_sha256')}` |"]
        if p.get("commitment_fingerprint"):
            lines.append(f"| committed fingerprint | `{p['commitment_fingerprint']}` |")
        if p.get("referee"):
            lines.append("| referee check | the revealed key matches the commitment; queries regenerated from the key and the clean images |")
        lines.append(f"| hashed for reproduction (report.json, provenance) | {counts} |")
        return lines

    def save(self, out_dir: str | os.PathLike, max_images: int = 8, stem: str | None = None) -> Path:
        """Write ``<stem>.json``, ``<stem>.md`` and PNGs (recovered vs expected QR, per-image maps), atomically.

        Args:
            out_dir: destination folder (created).
            max_images: per-image pictures for at most this many images.
            stem: report file name without suffix; default ``report_<mode>`` (so both modes fit in one folder).
        """
        stem = stem or f"report_{self.mode}"
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures = []
        if self.modules is not None and self.expected is not None:
            tiles = []
            for i, m in enumerate(self.modules[:max_images]):
                rec = render_qr(restore_function_patterns(m), border=2, scale=8)
                atomic_write_bytes(out / f"{self.mode}_qr_{i:03d}.png", _png(rec))
                figures.append(f"{self.mode}_qr_{i:03d}.png")
                row = [rec]
                if self.maps is not None:
                    heat = _heat(self.maps[i], size=rec.shape[0])
                    atomic_write_bytes(out / f"{self.mode}_map_{i:03d}.png", _png(heat))
                    figures.append(f"{self.mode}_map_{i:03d}.png")
                    row.insert(0, heat)
                tiles.append(np.concatenate([np.pad(t, 4, constant_values=128) for t in row], axis=1))
            exp = render_qr(self.expected, border=2, scale=8)
            atomic_write_bytes(out / "expected_qr.png", _png(exp))
            figures.append("expected_qr.png")
            if tiles:
                head = np.pad(exp, 4, constant_values=128)
                width = max(t.shape[1] for t in tiles)
                rows = [np.pad(head, ((0, 0), (0, width - head.shape[1])), constant_values=255)]
                rows += [np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=255) for t in tiles]
                atomic_write_bytes(out / f"{self.mode}_summary.png", _png(np.concatenate(rows, axis=0)))
                figures.append(f"{self.mode}_summary.png")
        d = self.to_dict()
        d["figures"] = figures
        atomic_write_json(out / f"{stem}.json", d)
        atomic_write_text(out / f"{stem}.md", self.to_markdown())
        return out
