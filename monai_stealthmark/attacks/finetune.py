"""Fine-tuning attacks: all layers, the last layer only, or a re-initialised output head then all layers."""

from __future__ import annotations

import torch

from ._common import clone, conv_layers, train_steps

__all__ = ["finetune", "reinit_head"]


def _head(model: torch.nn.Module) -> torch.nn.Module:
    convs = conv_layers(model)
    if not convs:
        raise ValueError("the model has no convolution layer to treat as its output head.")
    return convs[-1][1]


def reinit_head(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy whose output layer (the last convolution) is re-initialised (PyTorch default init, seeded)."""
    m = clone(model)
    torch.manual_seed(seed)
    _head(m).reset_parameters()
    return m


def finetune(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 20,
    lr: float = 1e-4,
    layers: str = "all",
    batch_size: int = 8,
    reinit: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """Fine-tune a copy of ``model`` on the attacker's own labelled data (clean, no trigger).

    Args:
        model: the suspect (watermarked) model.
        images, labels: the attacker's data ``(N, C, ...)`` / class indices ``(N, 1, ...)``.
        epochs: passes over the attacker's data.
        lr: Adam learning rate.
        layers: ``"all"`` or ``"last"`` (only the output convolution is trained).
        batch_size: samples per step.
        reinit: re-initialise the output head first (then ``layers`` applies).
        seed: data order and re-initialisation.
    """
    if layers not in ("all", "last"):
        raise ValueError(f"layers must be 'all' or 'last', got {layers!r}.")
    m = reinit_head(model, seed) if reinit else clone(model)
    params = list(_head(m).parameters()) if layers == "last" else None
    steps = epochs * -(-images.shape[0] // batch_size)
    return train_steps(m, images, labels, steps, lr, batch_size, params=params, seed=seed)
