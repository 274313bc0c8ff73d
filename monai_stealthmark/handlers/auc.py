"""Ignite handler reporting the exact pixel/voxel ROC AUC of a validation epoch (:class:`PixelAUC`).

A thin :class:`monai.handlers.IgniteMetricHandler` over :class:`monai_stealthmark.metrics.PixelAUCMetric`, the
same split as MONAI's ``ROCAUC`` over ``ROCAUCMetric``. It goes into a ``SupervisedEvaluator``'s
``additional_metrics`` (or a bundle's ``validate#additional_metrics``). MONAI's evaluator attaches
``additional_metrics`` only when it also has a ``key_val_metric`` (e.g. MeanDice): without one they are never
computed, unless attached by hand with ``metric.attach(evaluator, name)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler, from_engine

from monai_stealthmark.metrics import AVERAGES, PixelAUCMetric, reduce_auc

__all__ = ["PixelAUC"]


class PixelAUC(IgniteMetricHandler):
    """Exact pixel/voxel ROC AUC over the whole validation epoch (gathered across DDP ranks).

    ``engine.state.metrics[name]`` gets the AUC of the scored class, or with several scored classes their mean
    (``average="mean"``) or the tensor of per-class values (``average="none"``); with several classes each one's
    AUC also goes to ``engine.state.metrics[f"{name}_class{c}"]``, so StatsHandler and MetricsSaver log them.

    Args:
        label_index: the class(es) scored: an index (1 = the first foreground class), a sequence, or None for
            every foreground class (see :class:`~monai_stealthmark.metrics.PixelAUCMetric`).
        activation: applied to ``pred`` first: ``"softmax"``, ``"sigmoid"`` or None (already probabilities,
            e.g. after :class:`~monai_stealthmark.handlers.StashProbabilities` or a post-transform ``Activationsd``).
        average: ``"mean"`` or ``"none"``, how several classes are reported.
        output_transform: maps the engine output (a batch dict or MONAI's decollated list of dicts) to
            ``(pred, label)``; default ``from_engine(["pred", "label"])``.
        device: where the epoch's pixels are accumulated.
    """

    def __init__(
        self,
        label_index: int | Sequence[int] | None = 1,
        activation: str | None = None,
        average: str = "mean",
        output_transform: Callable = from_engine(["pred", "label"]),
        device: str | torch.device = "cpu",
    ) -> None:
        metric_fn = PixelAUCMetric(label_index=label_index, activation=activation, average="none", device=device)
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
        self.average = average
        self.per_class: dict[int, float] = {}
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=False)

    def compute(self) -> float | torch.Tensor:
        """The epoch's AUC reduced by ``average``; each class's AUC is kept in :attr:`per_class`."""
        values = torch.atleast_1d(torch.as_tensor(super().compute(), dtype=torch.float64))
        self.per_class = dict(zip(self.metric_fn.classes, values.tolist()))
        return reduce_auc(values, self.average)

    def completed(self, engine: Engine, name: str) -> None:
        """Publish the AUC under ``name`` and, with several classes, each class's under ``{name}_class{c}``."""
        super().completed(engine, name)
        if len(self.per_class) > 1:
            for c, value in self.per_class.items():
                engine.state.metrics[f"{name}_class{c}"] = value
