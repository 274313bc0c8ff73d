"""Run one attack, verify before/after, and decide whether it removed the watermark."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

__all__ = ["AttackResult", "is_removed", "run_attack"]


def is_removed(verdict_after: bool, clean_dice_after: float, clean_dice_before: float, max_dice_drop: float = 0.05) -> bool:
    """The watermark counts as removed only if the claim fails AND the model is still useful (clean Dice within
    ``max_dice_drop`` of the watermarked model's). Destroying the model is not a removal."""
    return (not verdict_after) and (clean_dice_after >= clean_dice_before - max_dice_drop)


@dataclasses.dataclass
class AttackResult:
    """One row of the robustness table."""

    attack: str
    params: dict[str, Any]
    clean_dice: float
    asr: float
    p_value: float
    bit_accuracy: float
    verdict: bool
    removed: bool
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_attack(
    name: str,
    params: dict[str, Any],
    attack: Callable[[], Any],
    evaluate: Callable[[Any], float],
    verify: Callable[[Any], Any],
    reference_dice: float,
    max_dice_drop: float = 0.05,
) -> AttackResult:
    """Apply ``attack`` (returns the attacked model or query), then measure clean Dice and the ownership claim.

    Args:
        name, params: the row's label.
        attack: builds the attacked model (timed).
        evaluate: attacked model -> clean Dice on the held-out data.
        verify: attacked model -> :class:`~monai_stealthmark.verify.VerificationReport`.
        reference_dice: the watermarked model's clean Dice (for the removal rule).
        max_dice_drop: the Dice drop beyond which a lost claim does not count as a removal.
    """
    t0 = time.perf_counter()
    attacked = attack()
    seconds = time.perf_counter() - t0
    dice = float(evaluate(attacked))
    rep = verify(attacked)
    return AttackResult(
        attack=name,
        params=params,
        clean_dice=dice,
        asr=float(rep.asr),
        p_value=float(rep.p_value),
        bit_accuracy=float(rep.mean_bit_accuracy),
        verdict=bool(rep.verdict),
        removed=is_removed(rep.verdict, dice, reference_dice, max_dice_drop),
        seconds=seconds,
    )
