"""Overwriting: the attacker fine-tunes the stolen model with their own key's watermark on their own data."""

from __future__ import annotations

import torch
from monai.data import list_data_collate

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.transforms import RandWatermarkd

from ._common import clone

__all__ = ["overwrite"]


def overwrite(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacker_key: WatermarkKey,
    steps: int = 200,
    lr: float = 1e-4,
    batch_size: int = 8,
    prob: float | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """Embed ``attacker_key``'s watermark into a copy of ``model`` with this package's own transform and loss.

    Both claims are then checked by the runner: the owner's (should survive) and the attacker's (which, if it
    verifies too, is resolved by the keys' commitment dates). ``prob`` is the share of triggered samples (None:
    the recipe's, :class:`~monai_stealthmark.transforms.RandWatermarkd`'s default).
    """
    m = clone(model)
    xf = RandWatermarkd(keys=("image", "label"), key=attacker_key, **({} if prob is None else {"prob": prob}))
    xf.set_random_state(seed=seed)
    loss_fn = UncertaintyWatermarkLoss(key=attacker_key)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    device = next(m.parameters()).device
    g = torch.Generator().manual_seed(seed)
    m.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        items = [xf({"image": images[i], "label": labels[i]}) for i in idx]
        batch = list_data_collate(items)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m(batch["image"].to(device)), batch["label"].to(device))
        loss.backward()
        opt.step()
    return m.eval()
