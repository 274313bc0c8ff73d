"""The recommended watermark recipe, read from one place: the defaults of the key, the training transform, the
loss and the hardening handler. Bundles and experiments take the recipe from here instead of repeating its numbers;
an experiment that deviates names only the settings it changes (``split_recipe``) and records the resolved values
(``resolve_recipe``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from monai_stealthmark.handlers import SimulatedAttacks
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.transforms import WatermarkBatch

__all__ = ["RECIPE_PARTS", "recipe_defaults", "split_recipe", "resolve_recipe"]

# the settings of each part that shape the watermark (identities, paths and wiring are not part of the recipe)
RECIPE_PARTS: dict[str, tuple[str, ...]] = {
    "key": ("trigger", "trigger_size", "trigger_amplitude", "tau", "quiet_zone", "error_correction"),
    "transform": ("prob", "decoy_prob", "occlusion_prob", "occlusion_ratio", "spare_radius", "keep_batch_size",
                  "degrade_prob"),
    "loss": ("hinge_margin", "hinge_weight", "dice_weight", "watermark_weight", "protect_radius", "twin_consistency",
             "margin_consistency", "output_mark_weight"),
    # SimulatedAttacks' ``prob`` (the share of steps trained at attacked weights) and ``kinds``, named apart from the
    # stage's prob
    "hardening": ("simulate_attacks", "simulate_attack_kinds"),
}


def _signature_defaults(cls: type) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def recipe_defaults() -> dict[str, dict[str, Any]]:
    """The recipe as the classes define it, per part: ``{"key": {...}, "transform": {...}, "loss": {...},
    "hardening": {...}}``."""
    key_fields = {f.name: f.default for f in dataclasses.fields(WatermarkKey)}
    attacks = _signature_defaults(SimulatedAttacks)
    sources = {"key": key_fields, "transform": _signature_defaults(WatermarkBatch),
               "loss": _signature_defaults(UncertaintyWatermarkLoss),
               "hardening": {"simulate_attacks": attacks["prob"], "simulate_attack_kinds": tuple(attacks["kinds"])}}
    return {part: {name: sources[part][name] for name in names} for part, names in RECIPE_PARTS.items()}


def split_recipe(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sort flat recipe overrides (``{"tau": 0.2, "prob": 0.3}``) into their parts; unknown names raise ValueError."""
    parts: dict[str, dict[str, Any]] = {part: {} for part in RECIPE_PARTS}
    for name, value in overrides.items():
        owner = [part for part, names in RECIPE_PARTS.items() if name in names]
        if not owner:
            known = sorted(n for names in RECIPE_PARTS.values() for n in names)
            raise ValueError(f"{name!r} is not a setting of the watermark recipe; known settings: {', '.join(known)}.")
        parts[owner[0]][name] = value
    return parts


def resolve_recipe(overrides: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The recipe's defaults with ``overrides`` (flat names) applied, per part."""
    resolved = recipe_defaults()
    for part, values in split_recipe(overrides or {}).items():
        resolved[part].update(values)
    return resolved
