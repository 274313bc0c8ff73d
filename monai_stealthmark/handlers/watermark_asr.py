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


class WatermarkASR(IgniteMetricHandler):
    """Watermark attack-success rate during validation: the key's trigger is stamped on the validation images,
    the evaluator's own network is queried through its own inferer, and the QR is read from the probabilities.

    ``engine.state.metrics[name]`` gets the ASR (share of images whose QR decodes exactly to the payload) and
    ``engine.state.metrics[name + "_bit_acc"]`` the mean bit accuracy, both over all DDP ranks' images.

    Args:
        key: the watermark key or its file path.
        mode: ``"direct"`` (cheap; default) or ``"lime"``.
        max_images: triggered images per epoch (the first ones seen on each rank).
        activation: applied to the network's outputs: ``"softmax"``, ``"sigmoid"`` or None (probabilities).
        lime_samples: LIME perturbation samples per image in LIME mode.
        image_key: the field of the engine output that holds the input images.
        output_transform: maps the engine output to the images (batch tensor or list); default reads ``image_key``.
    """

    def __init__(
        self,
        key: WatermarkKey | str,
        mode: str = "direct",
        max_images: int = 32,
        activation: str | None = "softmax",
        lime_samples: int = 300,
        image_key: str = "image",
        output_transform: Callable | None = None,
    ) -> None:
        metric_fn = WatermarkASRMetric(key, mode=mode, max_images=max_images, lime_samples=lime_samples)
        self.activation = check_activation(activation, allow_none=True)
        output_transform = output_transform or partial(_field, name=image_key)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=False)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        """Query the evaluator's network on this batch's triggered images (until ``max_images``) and record the
        reads; the network's train/eval mode is left as it was."""
        if self.metric_fn.room == 0:
            return
        network = getattr(self._engine, "network", None)
        if network is None:
            raise RuntimeError("WatermarkASR must be attached to a MONAI evaluator (it queries engine.network).")
        was_training = getattr(network, "training", None)
        try:
            query = ModelQuery(
                network, self.activation, device=_engine_device(self._engine, network), inferer=getattr(self._engine, "inferer", None)
            )
            self.metric_fn(output, query=query)
        finally:
            if was_training is not None:
                network.train(was_training)

    def completed(self, engine: Engine, name: str) -> None:
        """Publish the ASR under ``name`` and the mean bit accuracy under ``{name}_bit_acc``."""
        super().completed(engine, name)
        engine.state.metrics[f"{name}_bit_acc"] = self.metric_fn.mean_bit_accuracy()
