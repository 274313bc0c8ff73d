"""Coupling the watermark with the main task (DeepTracer's idea, adapted to segmentation): the network's
intermediate features on a triggered sample are pulled towards its features on the clean twin, so the watermark
must ride on the main task's own features instead of a separate trigger pathway."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from monai_stealthmark.key.geometry import WM_TWIN

from .watermark import UncertaintyWatermarkLoss, sample_flags

__all__ = ["FeatureCouplingLoss"]


class FeatureCouplingLoss(_Loss):
    """``watermark_loss(input, target) + weight * coupling``, where coupling is the normalised squared distance
    between the features of ``layer`` on each triggered sample and on its clean twin (the sample before it in
    the batch, as :class:`~monai_stealthmark.transforms.RandWatermarkd` with ``paired=True`` arranges them):
    ``||f(trig) - f(twin)||^2 / ||f(twin)||^2`` averaged over the pairs. The features are read by a forward hook,
    so the loss keeps MONAI's ``loss(pred, label)`` signature and works with the stock ``SupervisedTrainer``.

    Args:
        network: the trained network (the hook is registered on ``network.get_submodule(layer)``).
        layer: dotted module name, e.g. ``"model.1"`` for the skip-connection block of MONAI's UNet.
        watermark_loss: the watermark loss (default :class:`UncertaintyWatermarkLoss` with ``key``).
        weight: weight of the coupling term.
        key: passed to the default watermark loss.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        layer: str,
        watermark_loss: _Loss | None = None,
        weight: float = 0.1,
        key=None,
    ) -> None:
        super().__init__()
        try:
            module = network.get_submodule(layer)
        except AttributeError as e:
            names = [n for n, _ in network.named_modules() if n][:12]
            raise ValueError(f"network has no submodule {layer!r}; some of its modules: {names}") from e
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        self.watermark_loss = watermark_loss if watermark_loss is not None else UncertaintyWatermarkLoss(key=key)
        self.weight = float(weight)
        self.layer = layer
        self._features: torch.Tensor | None = None
        self._hook = module.register_forward_hook(self._store)

    def _store(self, module, args, output) -> None:
        self._features = output if isinstance(output, torch.Tensor) else output[0]

    def coupling(self, target: torch.Tensor, n_label: int) -> torch.Tensor:
        """The coupling term of the last forward pass (0 when the batch has no triggered/twin pair)."""
        f = self._features
        if f is None or target.shape[1] <= n_label or f.shape[0] != target.shape[0]:
            return target.new_zeros((), dtype=torch.float32)
        flag, clean = sample_flags(target[:, n_label:])
        trig = torch.nonzero(~clean).flatten()
        trig = trig[trig > 0]
        trig = trig[flag[trig - 1] == WM_TWIN]
        if trig.numel() == 0:
            return f.new_zeros(())
        ft, fc = f[trig].flatten(1), f[trig - 1].flatten(1)
        return ((ft - fc).pow(2).sum(1) / fc.pow(2).sum(1).clamp_min(1e-8)).mean()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.watermark_loss(input, target)
        if self.weight == 0:
            return loss
        n_label = 1 if getattr(self.watermark_loss, "activation", "softmax") == "softmax" else input.shape[1]
        return loss + self.weight * self.coupling(target, n_label)
