"""Small shared helpers of the attacks."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode (attacks never touch the owner's model in place)."""
    return copy.deepcopy(model).eval()


def batches(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, steps: int, seed: int):
    """``steps`` random mini-batches (with replacement across epochs), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield images[idx], (labels[idx] if labels is not None else None)
            done += 1
            if done >= steps:
                return


def train_steps(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 8,
    params: Sequence[torch.nn.Parameter] | None = None,
    loss_fn: torch.nn.Module | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """Plain supervised fine-tuning (Adam, DiceCE on class-index labels) for ``steps`` steps."""
    loss_fn = loss_fn or DiceCELoss(to_onehot_y=True, softmax=True)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    model.train()
    for x, y in batches(images, labels, batch_size, steps, seed):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
    return model.eval()


def conv_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every convolution (incl. transposed) in forward-definition order."""
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
