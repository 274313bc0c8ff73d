"""Distillation / model extraction: a student trained only on the suspect's answers to the attacker's queries."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from ._common import batches

__all__ = ["distill"]


def _query_set(images: torch.Tensor, augment: bool, query_budget: int | None) -> torch.Tensor:
    """The images sent to the teacher: the attacker's own, with flipped and rescaled copies when ``augment``,
    cut to ``query_budget``."""
    queries = images
    if augment:
        queries = torch.cat([images, images.flip(-1), images.flip(-2), images * 0.9, images * 1.1])
    if query_budget is not None:
        if query_budget < 1:
            raise ValueError(f"query_budget must be >= 1, got {query_budget}.")
        queries = queries[:query_budget]
    return queries


@torch.no_grad()
def _teacher_answers(teacher: Callable[[torch.Tensor], torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """The teacher's probabilities for every query (16 images per call), checked against the queries' shape."""
    targets = torch.cat([torch.as_tensor(teacher(queries[i : i + 16])).float().cpu() for i in range(0, queries.shape[0], 16)])
    if targets.shape[0] != queries.shape[0] or targets.shape[2:] != queries.shape[2:]:
        raise ValueError(f"the teacher answered shape {tuple(targets.shape)} for queries {tuple(queries.shape)}.")
    return targets


def _imitation_loss(logits: torch.Tensor, t: torch.Tensor, outputs: str, dice: DiceLoss, dice_weight: float) -> torch.Tensor:
    """KL divergence to the teacher's soft outputs, or cross-entropy to its hard masks, plus the Dice term."""
    if outputs == "hard":
        t = F.one_hot(t.argmax(1), t.shape[1]).movedim(-1, 1).to(t.dtype)
    loss = F.kl_div(F.log_softmax(logits, 1), t.clamp_min(1e-8), reduction="batchmean") / t[0, 0].numel()
    if dice_weight > 0:
        loss = loss + dice_weight * dice(logits, t)
    return loss


def distill(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    student: torch.nn.Module,
    images: torch.Tensor,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 8,
    outputs: str = "soft",
    query_budget: int | None = None,
    augment: bool = True,
    seed: int = 0,
    dice_weight: float = 1.0,
) -> torch.nn.Module:
    """Train ``student`` to imitate the black box ``teacher`` (images -> probabilities).

    The attacker labels their own images once by querying the teacher (``query_budget`` caps how many; with
    ``augment`` the images are also flipped/rescaled to make more queries), then trains the student on those
    answers only: the soft probabilities (``outputs="soft"``, KL divergence) or the hard masks an API returns
    (``outputs="hard"``, cross-entropy on the argmax), each plus a Dice term on the same targets (soft Dice for
    soft outputs) as a competent attacker would add: the organ covers ~1 % of a slice, and without it the
    students collapse to background (measured: Dice <= 0.10 after 300 steps).

    Args:
        teacher: the suspect as a black box returning probabilities.
        student: a fresh network (same or other architecture), trained in place and returned.
        images: the attacker's unlabelled images.
        steps: student optimisation steps.
        lr: Adam learning rate.
        batch_size: samples per step.
        outputs: ``"soft"`` or ``"hard"``.
        query_budget: most images sent to the teacher (None: all of them, times the augmentation).
        augment: add flipped and intensity-scaled copies to the query set.
        seed: data order.
        dice_weight: weight of the Dice term (0 turns it off).
    """
    if outputs not in ("soft", "hard"):
        raise ValueError(f"outputs must be 'soft' or 'hard', got {outputs!r}.")
    queries = _query_set(images, augment, query_budget)
    targets = _teacher_answers(teacher, queries)
    device = next(student.parameters()).device
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    dice = DiceLoss(softmax=True)
    student.train()
    for x, t in batches(queries, targets, batch_size, steps, seed):
        x, t = x.to(device), t.to(device)
        loss = _imitation_loss(student(x), t, outputs, dice, dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()
