"""Fidelity to a clean teacher: the watermarked network's outputs on clean samples are pulled towards those of a
frozen clean model of the same task (knowledge distillation), so that the watermark costs the segmentation as
little as possible — the owner usually has that clean model already, or trains it first with the same recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from .watermark import sample_flags

__all__ = ["CleanTeacherLoss"]


class CleanTeacherLoss(_Loss):
    """``loss(input, target) + weight * T^2 * KL(teacher || network)`` over the clean samples' pixels.

    The teacher runs on the same input batch as the trained network: a forward pre-hook on ``network`` (training
    mode, gradients on) runs the frozen ``teacher`` under ``torch.no_grad`` and keeps its logits, so the loss keeps
    MONAI's ``loss(pred, label)`` signature and works with the stock ``SupervisedTrainer``. The clean samples are
    those whose watermark channel (the target's last, from
    :class:`~monai_stealthmark.transforms.RandWatermarkd`) says clean or clean twin — decoys included, whose
    teacher output is the clean model's answer to a wrong-key trigger; without a watermark channel every sample is
    clean. Triggered samples are left to the wrapped loss (their reference is the clean twin's output).

    Args:
        network: the network being trained (the hook is registered on it).
        teacher: a trained clean model with the same outputs; frozen (``eval()``, no gradients) here.
        loss: the wrapped loss, e.g. :class:`~monai_stealthmark.losses.UncertaintyWatermarkLoss`.
        weight: weight of the distillation term (0 = the wrapped loss alone, the teacher is then not run).
        temperature: softening temperature ``T`` of both distributions (the term is scaled by ``T**2``).
        activation: ``"softmax"`` (one label channel) or ``"sigmoid"`` (one label channel per output channel).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        teacher: torch.nn.Module,
        loss: _Loss,
        weight: float = 1.0,
        temperature: float = 1.0,
        activation: str = "softmax",
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
        if teacher is network:
            raise ValueError("the teacher must be a separate (clean, trained) model, not the network being trained.")
        self.loss = loss
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.activation = activation
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._teacher_logits: torch.Tensor | None = None
        self._hook = network.register_forward_pre_hook(self._run_teacher)

    def _run_teacher(self, module: torch.nn.Module, args: tuple) -> None:
        self._teacher_logits = None
        if self.weight == 0 or not module.training or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            self._teacher_logits = self.teacher(*args).detach()

    def remove(self) -> None:
        """Detach the teacher's hook from the network (after training)."""
        self._hook.remove()
        self._teacher_logits = None

    def distillation(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean per-pixel ``T^2 * KL(teacher || network)`` over the clean samples of the last forward pass."""
        t = self._teacher_logits
        if t is None:
            raise RuntimeError(
                "no teacher output for this batch: CleanTeacherLoss runs the teacher in a forward pre-hook of the "
                "network it was built with, in training mode with gradients on — was the loss given another network?"
            )
        if t.shape != input.shape:
            raise ValueError(f"teacher output {tuple(t.shape)} does not match the network's {tuple(input.shape)}.")
        n_label = 1 if self.activation == "softmax" else input.shape[1]
        if target.shape[1] > n_label:  # watermark channel present: clean samples and twins only
            w = sample_flags(target[:, n_label:])[1].to(input.dtype)
        else:
            w = input.new_ones(input.shape[0])
        tt = self.temperature
        if self.activation == "softmax":
            logq = F.log_softmax(input / tt, dim=1)
            logp = F.log_softmax(t / tt, dim=1)
            kl = (logp.exp() * (logp - logq)).sum(1)
        else:  # per channel Bernoulli KL
            p = torch.sigmoid(t / tt)
            kl = (F.binary_cross_entropy_with_logits(input / tt, p, reduction="none")
                  - F.binary_cross_entropy_with_logits(t / tt, p, reduction="none")).sum(1)
        per_sample = kl.flatten(1).mean(1) * tt**2
        return (per_sample * w).sum() / w.sum().clamp_min(1.0)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss(input, target)
        if self.weight == 0:
            return loss
        return loss + self.weight * self.distillation(input, target)
