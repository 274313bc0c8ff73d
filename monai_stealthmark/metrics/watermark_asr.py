"""The watermark's attack-success rate (ASR) as a cumulative metric: the share of triggered images whose QR
decodes exactly to the key's payload.

Layering: this module reads the QR through the public names of :mod:`monai_stealthmark.verify`: in direct mode the
trigger, the query, the probability checks, the cell scores and :func:`~monai_stealthmark.verify.read_scores` (the
raw, log-scale and erasure reads of a black-box verification, in that order), in LIME mode
:func:`~monai_stealthmark.verify.verify_ownership` itself, so a monitored ASR and a verification report never
disagree. ``verify`` imports neither ``metrics`` nor ``handlers``; ``metrics`` imports ``verify``; ``handlers``
import both (the handler :class:`monai_stealthmark.handlers.WatermarkASR` wraps the evaluator's network in a
:class:`~monai_stealthmark.verify.ModelQuery` and feeds this metric).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import qrcode
import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_tensor

from monai_stealthmark.key import WatermarkKey, load_key
from monai_stealthmark.key.qr import ERROR_CORRECTION, data_module_order, qr_version_for_size
from monai_stealthmark.verify import (
    bit_accuracy,
    check_probabilities,
    fit_window,
    organ_modules,
    read_scores,
    scores_to_modules,
    trigger_batch,
    uncertainty_scores,
    verify_ownership,
)
from monai_stealthmark.verify.readout import LIME_LOG_FLOOR

__all__ = ["WatermarkASRMetric", "reachable_reads"]

MODES = ("direct", "lime")


@lru_cache(maxsize=16)
def _codeword_layout(qr_size: int, error_correction: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Where the codewords of a QR of ``qr_size`` modules lie and how many the code can repair.

    Returns:
        ``(rows, cols, capacity)``: the ``(n_codewords, 8)`` module coordinates of each codeword's bits, and the
        number of check symbols over all Reed-Solomon blocks. A block of ``n`` codewords with ``k`` data ones
        recovers its codewords from at most ``n - k`` wrong ones (as erasures; half as many unknown errors), so a
        read with more than ``capacity`` wrong codewords in all is beyond every block's reach together.
    """
    version = qr_version_for_size(qr_size)
    blocks = qrcode.base.rs_blocks(version, ERROR_CORRECTION[error_correction])
    n_cw = sum(b.total_count for b in blocks)
    order = data_module_order(version)[: 8 * n_cw]
    capacity = sum(b.total_count - b.data_count for b in blocks)
    return order[:, 0].reshape(n_cw, 8), order[:, 1].reshape(n_cw, 8), capacity


def reachable_reads(scores: torch.Tensor, key: WatermarkKey) -> np.ndarray:
    """``(B,)`` bool: the images whose direct read may still decode to the key's payload.

    Both binarisations that :func:`~monai_stealthmark.verify.read_scores` tries (Otsu on the raw and on the log
    scale; its erasure read reuses the raw one) are compared with the key's QR codeword by codeword. When each of
    them differs from it in more codewords than the code has check symbols in all, no reader (zbar or the erasure
    read) can recover the key's codewords, so the image cannot decode to the payload and its decoders need not run.
    An untrained or unmarked model's reads are of that kind (about half the modules wrong); a marked model's
    pass.
    """
    rows, cols, capacity = _codeword_layout(key.qr_matrix.shape[0], key.error_correction)
    expected = np.asarray(key.qr_matrix, dtype=bool)[rows, cols]
    ok = np.zeros(scores.shape[0], dtype=bool)
    for log_floor in (None, LIME_LOG_FLOOR):
        modules = scores_to_modules(scores, key, log_floor=log_floor)
        wrong = (modules[:, rows, cols] != expected).any(-1).sum(-1)
        ok |= wrong <= capacity
    return ok


def _no_outcomes() -> list[torch.Tensor]:
    """Empty ``[decoded, bit_accuracy]``, for calls that read no image."""
    return [torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]


class WatermarkASRMetric(CumulativeIterationMetric):
    """Attack-success rate and bit accuracy of the watermark over the images seen since the last reset.

    Each call stamps the key's trigger on the given clean images, queries the model once per image (direct
    mode) and reads the QR from its probabilities; the buffers keep one outcome per image: whether the QR decoded
    exactly to the payload, and its bit accuracy. In direct mode the decoders run only on reads that can still
    reach the payload (:func:`reachable_reads`): a read farther from the key's QR than the code can repair counts
    as not decoded at once, which is what an unmarked or untrained model gives. The query and read happen where the images are seen (each
    DDP rank queries its own replica), and only the outcomes are gathered across ranks.

    Usage::

        asr = WatermarkASRMetric(key, query=ModelQuery(net, activation="softmax"))
        for batch in loader:
            asr(batch["image"])
        print(asr.aggregate(), asr.mean_bit_accuracy())

    Args:
        key: the watermark key or its file path.
        query: ``images -> probability maps`` (e.g. :class:`~monai_stealthmark.verify.ModelQuery`); may instead be
            given per call as ``metric(images, query=...)``.
        mode: ``"direct"`` (mean uncertainty per QR module; cheap) or ``"lime"`` (LIME attributions).
        max_images: images read between two resets on this rank (the first ones seen); None = all. Further
            images are ignored without a query.
        lime_samples: LIME perturbation samples per image in LIME mode.
    """

    def __init__(
        self,
        key: WatermarkKey | str,
        query: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mode: str = "direct",
        max_images: int | None = None,
        lime_samples: int = 300,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be 'direct' or 'lime', got {mode!r}.")
        if max_images is not None and int(max_images) < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}.")
        self.key = load_key(key)
        self.query = query
        self.mode = mode
        self.max_images = None if max_images is None else int(max_images)
        self.lime_samples = int(lime_samples)

    @property
    def room(self) -> int | None:
        """How many more images this rank reads before the next reset (None: no limit)."""
        return None if self.max_images is None else max(self.max_images - self._n_read, 0)

    def reset(self) -> None:
        """Empty the buffers and the count of images read."""
        super().reset()
        self._n_read = 0

    def __call__(self, y_pred, y=None, **kwargs) -> list[torch.Tensor]:  # type: ignore[override]
        """Read the watermark on clean images (a batch or a list; ``y`` is unused): see :meth:`_compute_tensor`.
        Once ``max_images`` are read, further calls neither query nor record anything."""
        if self.room == 0:
            return _no_outcomes()
        return super().__call__(y_pred, y, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, query: Callable | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        """Read the watermark on a batch of clean images ``y_pred`` ``(B, C, spatial...)`` (``y`` is unused).

        Returns:
            ``[decoded, bit_accuracy]``, each ``(B',)`` float64 (``B' <= B`` after ``max_images``); ``decoded``
            is 1 where the QR decoded exactly to the payload.
        """
        query = query or self.query
        if query is None:
            raise ValueError("WatermarkASRMetric needs a query: pass query= to the constructor or to the call.")
        room = self.room
        images = convert_to_tensor(y_pred, track_meta=False)
        images = images if room is None else images[:room]
        if images.shape[0] == 0:
            return _no_outcomes()
        if self.mode == "direct":
            decoded, bits = self._read_direct(query, images)
        else:
            report = verify_ownership(query, images, self.key, mode=self.mode, lime_samples=self.lime_samples)
            decoded = np.array([text == self.key.payload for text in report.decoded])
            bits = np.asarray(report.bit_accuracy)
        self._n_read += images.shape[0]
        return [torch.as_tensor(decoded, dtype=torch.float64), torch.as_tensor(bits, dtype=torch.float64)]

    def _read_direct(self, query: Callable, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One triggered query of the batch and the direct read of each image, as ``verify_ownership`` reads it
        (window fit, trigger, probability checks, cell means, raw / log / erasure reads), with the decoders run
        only on the images that :func:`reachable_reads` keeps; the others count as not decoded.

        Returns:
            ``(decoded, bit_accuracy)``, ``(B,)`` each: whether the QR decoded to the payload, and the first read's
            bit accuracy.
        """
        if not torch.isfinite(images).all():
            raise ValueError("the query images contain NaN or infinite values.")
        batch = fit_window(images.float(), getattr(query, "window", None))
        triggered = trigger_batch(batch, self.key)
        probs = check_probabilities(query(triggered), triggered)
        scores = uncertainty_scores(probs, self.key)
        bits = bit_accuracy(scores_to_modules(scores, self.key), self.key)
        decoded = np.zeros(batch.shape[0], dtype=bool)
        rows = np.flatnonzero(reachable_reads(scores, self.key))
        if rows.size:
            sub = torch.as_tensor(rows, device=scores.device)
            unreliable = organ_modules(probs.index_select(0, sub.to(probs.device)), self.key)
            _, texts, _, _ = read_scores(scores.index_select(0, sub), self.key, "direct", unreliable)
            decoded[rows] = [text == self.key.payload for text in texts]
        return decoded, bits

    def _compute_list(self, y_pred, y=None, **kwargs) -> list[torch.Tensor]:  # type: ignore[override]
        """Decollated images: one query for all of them when they share a shape, else one per image."""
        images = [torch.as_tensor(i).detach() for i in y_pred]
        if len({tuple(i.shape) for i in images}) == 1:
            return self._compute_tensor(torch.stack(images), None, **kwargs)
        return super()._compute_list(images, None, **kwargs)

    def _outcomes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered ``(decoded, bit_accuracy)`` of all ranks; RuntimeError when no image was read."""
        buffers = self.get_buffer()
        if buffers is None or buffers[0].numel() == 0:
            raise RuntimeError("WatermarkASRMetric read no images since the last reset.")
        return buffers[0], buffers[1]

    def aggregate(self) -> float:
        """The ASR: share of the images read (all ranks) whose QR decoded exactly to the payload."""
        decoded, _ = self._outcomes()
        return float(decoded.sum() / decoded.numel())

    def mean_bit_accuracy(self) -> float:
        """Mean share of QR data modules read correctly, over the images read (all ranks)."""
        _, bits = self._outcomes()
        return float(bits.sum() / bits.numel())
