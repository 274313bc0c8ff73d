"""Ignite metrics for MONAI evaluators: pixel AUC and the watermark's ASR, reported every validation epoch.

Both are ignite ``Metric`` subclasses, so they go into a ``SupervisedEvaluator``'s ``additional_metrics`` (or a
bundle's ``validate#evaluator#additional_metrics``) and StatsHandler, TensorBoardStatsHandler, CheckpointSaver
and MetricsSaver see them in the same epoch. MONAI's evaluator attaches ``additional_metrics`` only when it also
has a ``key_val_metric`` (e.g. MeanDice): without one they are silently never computed — or call
``metric.attach(evaluator, name)`` yourself. The maths lives in :mod:`monai_stealthmark.metrics` and
:mod:`monai_stealthmark.verify`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import EpochWise, reinit__is_reduced

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.metrics import pixel_auc
from monai_stealthmark.key.geometry import load_key
from monai_stealthmark.verify.verifier import verify_ownership

__all__ = ["PixelAUC", "WatermarkASR"]


def _field(output: Any, name: str) -> torch.Tensor:
    """Read ``name`` from a MONAI engine output: a dict of batched tensors, or a decollated list of dicts."""
    if isinstance(output, dict):
        return _stack(output[name])
    if isinstance(output, Sequence) and output and isinstance(output[0], dict):
        return _stack([o[name] for o in output])
    raise ValueError(f"cannot find {name!r} in the engine output of type {type(output).__name__}.")


def _stack(x: Any) -> torch.Tensor:
    """A batch tensor from a tensor or a decollated list of per-sample tensors (MONAI's ``from_engine``)."""
    if isinstance(x, (list, tuple)):
        return torch.stack([torch.as_tensor(i) for i in x])
    return torch.as_tensor(x)


class PixelAUC(Metric):
    """Exact pixel/voxel ROC AUC of one class over the whole validation epoch (gathered across DDP ranks).

    Args:
        label_index: the class whose probability is scored (1 = first foreground class).
        activation: applied to ``pred`` first: ``"softmax"``, ``"sigmoid"`` or None (already probabilities,
            e.g. after a post-transform ``Activationsd``).
        output_transform: maps the engine output to ``(pred, label)``; default reads MONAI's ``pred``/``label``.
        device: where to accumulate.
    """

    def __init__(
        self,
        label_index: int = 1,
        activation: str | None = None,
        output_transform: Callable = lambda x: (_field(x, "pred"), _field(x, "label")),
        device: str | torch.device = "cpu",
    ) -> None:
        self.label_index = label_index
        self.activation = activation
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        pred, label = (_stack(o) for o in output)
        pred = pred.float()
        if self.activation == "softmax":
            pred = torch.softmax(pred, 1)
        elif self.activation == "sigmoid":
            pred = torch.sigmoid(pred)
        i = self.label_index
        score = pred[:, i] if pred.shape[1] > 1 else pred[:, 0]
        if label.shape[1] == 1:  # class indices (or a binary mask for a one-channel model)
            target = label[:, 0] == i if pred.shape[1] > 1 else label[:, 0] > 0
        else:  # one-hot
            target = label[:, i] > 0
        self._scores.append(score.detach().reshape(-1).to(self._device))
        self._labels.append(target.reshape(-1).to(self._device))

    def compute(self) -> float:
        if not self._scores:
            raise RuntimeError("PixelAUC needs at least one update before compute.")
        scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        if idist.get_world_size() > 1:
            scores = idist.all_gather(scores)
            labels = idist.all_gather(labels)
        return pixel_auc(scores, labels)


class WatermarkASR(Metric):
    """Watermark attack-success rate during validation: the key's trigger is stamped on the validation images,
    the evaluator's own network is queried through its own inferer, and the QR is read from the probabilities.

    ``engine.state.metrics[name]`` gets the ASR (share of images whose QR decodes exactly to the payload) and
    ``engine.state.metrics[name + "_bit_acc"]`` the mean bit accuracy. Counts are summed across DDP ranks.

    Args:
        key: the watermark key or its file path.
        mode: ``"direct"`` (cheap; default) or ``"lime"``.
        max_images: triggered images per epoch (the first ones seen on each rank).
        activation: applied to the network's outputs: ``"softmax"`` or ``"sigmoid"``.
        lime_samples: LIME perturbation samples per image in LIME mode.
        image_key: the field of the engine output that holds the input images.
        output_transform: maps the engine output to the image batch.
        device: unused for accumulation (images are kept where they are); kept for ignite's signature.
    """

    def __init__(
        self,
        key: WatermarkKey | str,
        mode: str = "direct",
        max_images: int = 32,
        activation: str = "softmax",
        lime_samples: int = 300,
        image_key: str = "image",
        output_transform: Callable | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.key = load_key(key)
        if mode not in ("direct", "lime"):
            raise ValueError(f"mode must be 'direct' or 'lime', got {mode!r}.")
        self.mode = mode
        self.max_images = int(max_images)
        self.activation = activation
        self.lime_samples = int(lime_samples)
        self._engine: Engine | None = None
        self._last_bit_acc = float("nan")
        output_transform = output_transform or (lambda x: _field(x, image_key))
        super().__init__(output_transform=output_transform, device=device)

    def attach(self, engine: Engine, name: str, usage=EpochWise()) -> None:
        self._engine = engine  # the network and inferer are read from the engine at compute time
        super().attach(engine, name, usage)

    @reinit__is_reduced
    def reset(self) -> None:
        self._images: list[torch.Tensor] = []
        self._count = 0

    @reinit__is_reduced
    def update(self, output: torch.Tensor) -> None:
        room = self.max_images - self._count
        if room <= 0:
            return
        imgs = _stack(output)[:room].detach()
        self._images.append(imgs)
        self._count += imgs.shape[0]

    def _query(self) -> Callable[[torch.Tensor], torch.Tensor]:
        engine = self._engine
        if engine is None or not hasattr(engine, "network"):
            raise RuntimeError("WatermarkASR must be attached to a MONAI evaluator (it queries engine.network).")
        net, inferer = engine.network, getattr(engine, "inferer", None)
        act = self.activation

        @torch.no_grad()
        def query(x: torch.Tensor) -> torch.Tensor:
            was_training = net.training
            net.eval()
            x = x.to(engine.state.device if hasattr(engine.state, "device") else getattr(engine, "device", x.device))
            y = inferer(x, net) if inferer is not None else net(x)
            if was_training:
                net.train()
            y = torch.as_tensor(y).float()
            return torch.softmax(y, 1) if act == "softmax" else torch.sigmoid(y)

        return query

    def compute(self) -> float:
        n_ok, n_img, bit_sum = 0.0, 0.0, 0.0
        if self._images:
            images = torch.cat(self._images)
            device = getattr(self._engine, "device", images.device)
            images = images.to(device)
            rep = verify_ownership(self._query(), images, self.key, mode=self.mode, lime_samples=self.lime_samples)
            n_ok = rep.asr * rep.n_images
            n_img = rep.n_images
            bit_sum = rep.mean_bit_accuracy * rep.n_images
        stats = torch.tensor([n_ok, n_img, bit_sum], dtype=torch.float64)
        if idist.get_world_size() > 1:
            stats = idist.all_reduce(stats.to(idist.device()))  # NCCL reduces CUDA tensors only
        n_ok, n_img, bit_sum = stats.tolist()
        if n_img == 0:
            raise RuntimeError("WatermarkASR saw no validation images this epoch.")
        self._last_bit_acc = bit_sum / n_img
        return n_ok / n_img

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        engine.state.metrics[f"{name}_bit_acc"] = self._last_bit_acc
