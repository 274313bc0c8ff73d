"""Ignite handler reporting the watermark's attack-success rate every validation epoch (:class:`WatermarkASR`).

Layering: a thin :class:`monai.handlers.IgniteMetricHandler` over
:class:`monai_stealthmark.metrics.WatermarkASRMetric`, which reads the QR through the public
``monai_stealthmark.verify.verify_ownership``. This module adds only the engine side: it wraps the evaluator's own
network and inferer in the :class:`~monai_stealthmark.verify.ModelQuery` that black-box verification uses and
hands it to the metric with the batch's images. ``handlers`` import ``metrics`` and ``verify``; neither imports
``handlers``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.metrics import WatermarkASRMetric
from monai_stealthmark.utils import check_activation
from monai_stealthmark.verify import ModelQuery

__all__ = ["WatermarkASR"]


def _field(output: Any, name: str) -> Any:
    """``name`` from a MONAI engine output: a dict of batched tensors, or a decollated list of dicts."""
    if isinstance(output, dict):
        return output[name]
    if isinstance(output, Sequence) and output and isinstance(output[0], dict):
        return [o[name] for o in output]
    raise ValueError(f"cannot find {name!r} in the engine output of type {type(output).__name__}.")


def _engine_device(engine: Engine, network: Any) -> torch.device:
    """Where the evaluator runs its network: ``engine.state.device`` (MONAI engines), ``engine.device``, else the
    network's parameters (CPU when it has none)."""
    device = getattr(engine.state, "device", None) or getattr(engine, "device", None)
    if device is None:
        params = network.parameters() if isinstance(network, torch.nn.Module) else iter(())
        device = next(params, torch.empty(0)).device
    return torch.device(device)


def _epoch_images(engine: Engine) -> int | None:
    """Images one validation epoch shows this rank: the length of the engine's sampler (per rank under DDP) or
    dataset; None when the engine has no sized data loader."""
    loader = getattr(engine, "data_loader", None)
    for source in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        try:
            return len(source)
        except TypeError:
            continue
    return None


def _as_images(output: Any) -> list[torch.Tensor]:
    """The images of one iteration as a list of ``(C, spatial...)`` tensors (from a batch or a decollated list)."""
    if isinstance(output, torch.Tensor):
        return list(output.detach())
    return [torch.as_tensor(i).detach() for i in output]


class WatermarkASR(IgniteMetricHandler):
    """Watermark attack-success rate during validation: the key's trigger is stamped on a fixed subset of the
    validation images, the evaluator's own network is queried through its own inferer, and the QR is read from the
    probabilities.

    ``engine.state.metrics[name]`` gets the ASR (share of images whose QR decodes exactly to the payload) and
    ``engine.state.metrics[name + "_bit_acc"]`` the mean bit accuracy, both over all DDP ranks' images.

    Which images: every ``k``-th image of the epoch, ``k = ceil(epoch images / max_images)``, so the subset is the
    same every epoch and spread over the validation set rather than its first cases (the first ``max_images``
    when the epoch's length is unknown). The chosen images are kept during the epoch and queried together at its
    end, one triggered batch through the inferer, then read (:class:`~monai_stealthmark.metrics.WatermarkASRMetric`).

    Args:
        key: the watermark key or its file path.
        mode: ``"direct"`` (cheap; default) or ``"lime"``.
        max_images: triggered images per epoch. The validation ASR tells a model that carries the watermark
            from one that does not (the checkpoint rule's ``min_asr``); the verification of a suspect is where the
            ASR is measured on many images. An unmarked model decodes none of them, so even one decode is
            evidence; a model that decodes 90 % of its images falls under 0.5 (1 of 4) with probability 0.004,
            one at 80 % with 0.03. Each image costs one more forward pass, so four keep the validation's cost
            close to its own (one more forward per ``epoch images / 4``).
        activation: applied to the network's outputs: ``"softmax"``, ``"sigmoid"`` or None (probabilities).
        lime_samples: LIME perturbation samples per image in LIME mode.
        image_key: the field of the engine output that holds the input images.
        output_transform: maps the engine output to the images (batch tensor or list); default reads ``image_key``.
    """

    def __init__(
        self,
        key: WatermarkKey | str,
        mode: str = "direct",
        max_images: int = 4,
        activation: str | None = "softmax",
        lime_samples: int = 300,
        image_key: str = "image",
        output_transform: Callable | None = None,
    ) -> None:
        metric_fn = WatermarkASRMetric(key, mode=mode, max_images=max_images, lime_samples=lime_samples)
        self.activation = check_activation(activation, allow_none=True)
        self.max_images = int(max_images)
        self._pending: list[torch.Tensor] = []
        self._seen, self._stride = 0, None
        output_transform = output_transform or partial(_field, name=image_key)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=False)

    @reinit__is_reduced
    def reset(self) -> None:
        """Empty the metric and the images kept for this epoch."""
        super().reset()
        self._pending, self._seen, self._stride = [], 0, None

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        """Keep this iteration's images that belong to the epoch's subset (no query yet)."""
        if self._stride is None:
            n = _epoch_images(self._engine) if getattr(self, "_engine", None) is not None else None
            self._stride = max(1, -(-n // self.max_images)) if n else 1
        room = self.metric_fn.room
        for img in _as_images(output):
            if (room is None or len(self._pending) < room) and self._seen % self._stride == 0:
                self._pending.append(img)
            self._seen += 1

    def compute(self) -> Any:
        """Query the network once on the kept images (triggered), read them, and return the epoch's ASR."""
        if self._pending:
            self._query(self._pending)
            self._pending = []
        return super().compute()

    def _query(self, images: list[torch.Tensor]) -> None:
        """Read the watermark on ``images`` through the evaluator's network and inferer; the network's
        train/eval mode is left as it was."""
        network = getattr(self._engine, "network", None)
        if network is None:
            raise RuntimeError("WatermarkASR must be attached to a MONAI evaluator (it queries engine.network).")
        was_training = getattr(network, "training", None)
        try:
            query = ModelQuery(
                network, self.activation, device=_engine_device(self._engine, network), inferer=getattr(self._engine, "inferer", None)
            )
            self.metric_fn(images, query=query)
        finally:
            if was_training is not None:
                network.train(was_training)

    def completed(self, engine: Engine, name: str) -> None:
        """Publish the ASR under ``name`` and the mean bit accuracy under ``{name}_bit_acc``."""
        super().completed(engine, name)
        engine.state.metrics[f"{name}_bit_acc"] = self.metric_fn.mean_bit_accuracy()
