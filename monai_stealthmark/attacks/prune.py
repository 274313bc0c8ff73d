"""Pruning attacks: global magnitude pruning of all convolution weights, and channel fine-pruning."""

from __future__ import annotations

import torch
from torch.nn.utils import prune

from ._common import clone, conv_layers

__all__ = ["global_magnitude_prune", "channel_prune", "sparsity"]


def global_magnitude_prune(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """A copy with the smallest ``amount`` share of all convolution weights (globally) set to zero."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must lie in [0, 1), got {amount}.")
    m = clone(model)
    params = [(mod, "weight") for _, mod in conv_layers(m)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for mod, name in params:
        prune.remove(mod, name)
    return m


def sparsity(model: torch.nn.Module) -> float:
    """Share of zero weights over all convolutions."""
    ws = [mod.weight for _, mod in conv_layers(model)]
    return float(sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws))


@torch.no_grad()
def channel_prune(model: torch.nn.Module, images: torch.Tensor, amount: float, n_layers: int = 2) -> torch.nn.Module:
    """Fine-pruning (Liu et al. 2018): zero the output channels of the last ``n_layers`` hidden convolutions
    that are least active on clean data (backdoor neurons tend to be dormant on clean inputs).

    Args:
        model: the suspect model.
        images: the attacker's clean images.
        amount: share of channels pruned in each of those layers.
        n_layers: how many convolutions before the output layer are pruned.
    """
    m = clone(model)
    convs = [mod for _, mod in conv_layers(m)][:-1][-n_layers:]
    acts: dict[int, torch.Tensor] = {}
    hooks = [c.register_forward_hook(lambda mod, i, o, k=k: acts.__setitem__(k, o.abs().mean(dim=[0, *range(2, o.ndim)]))) for k, c in enumerate(convs)]
    device = next(m.parameters()).device
    m(images.to(device))
    for h in hooks:
        h.remove()
    for k, c in enumerate(convs):
        n_out = c.weight.shape[1] if isinstance(c, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)) else c.weight.shape[0]
        n_cut = int(round(amount * n_out))
        if n_cut == 0:
            continue
        idx = torch.argsort(acts[k])[:n_cut]
        if isinstance(c, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            c.weight[:, idx] = 0
        else:
            c.weight[idx] = 0
        if c.bias is not None:
            c.bias[idx] = 0
    return m
