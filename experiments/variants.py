"""Robustness options measured against the default watermark, and the BadNet baseline, on the Sunnybrook 2D
setting of :mod:`experiments.robustness` (owner 101/201/301, attacker 401, test 501).

    python -m experiments.variants --fast --out runs/variants [--variants default,badnet] [--steps 800] [--data DIR]

Variants (each an owner model trained with the same seed, data and schedule):

- ``clean``: no watermark (the reference for the Dice cost);
- ``default``: the uncertainty QR watermark as shipped (simulated weight noise / pruning on 30 % of the steps);
- ``no_simattack``: the same without the simulated attacks;
- ``commark``: ComMark's ideas — a low-frequency trigger and simulated attacks on half of the steps; ``lowfreq`` the
  low-frequency trigger alone (no simulated attacks);
- ``badnet``: the BadNet-style backdoor baseline (trigger -> a keyed square of the mask turns foreground; plain
  training, no simulated attacks).

For each: clean Dice, the Dice on triggered inputs, the stealth (mask Dice clean vs triggered input), the
ASR, and the ASR after the attacks that matter most (fine-tuning, pruning, static int8, input noise / blur /
resampling, distillation). Writes ``variants.json`` and ``variants.md``; models and finished variants are reused.

Options: ``--variants`` (one or a comma list, default all), ``--epochs`` (fine-tuning epochs of the attack),
``--distill-steps``, ``--data`` (the Sunnybrook folder) and any training setting or recipe deviation applied to
every variant (:class:`~experiments.sunnybrook.ExperimentConfig`, e.g. ``--cutmix-prob 0``); a variant's own
settings win.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from experiments import as_list, cli, phase
from experiments.robustness import Distillation, Split, attack_suite, dice, make_verify, run_attacks
from experiments.sunnybrook import ExperimentConfig, experiment_key, load_or_train, make_config, stealth
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_json, atomic_write_text
from monai_stealthmark.verify import ModelQuery, trigger_batch

__all__ = ["VARIANTS", "VARIANT_ATTACKS", "run", "main"]

# variant -> (ExperimentConfig overrides, key overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "clean": ({}, {}),
    "default": ({}, {}),
    "commark": ({"simulate_attacks": 0.5}, {"trigger": "lowfreq"}),
    "lowfreq": ({"simulate_attacks": 0.0}, {"trigger": "lowfreq"}),
    "no_simattack": ({"simulate_attacks": 0.0}, {}),
    "badnet": ({"badnet": True, "simulate_attacks": 0.0}, {}),
}
# the attacks that matter most, by their label in experiments.robustness.attack_suite
VARIANT_ATTACKS = (
    "finetune_all", "global_prune_0.5", "global_prune_0.7", "int8_static", "weight_noise_0.1",
    "input_gaussian_noise_0.05", "input_blur_1px", "input_resample_0.5", "input_flip_tta", "distill_soft_unet",
)
DISTILL_BATCH = 16


def _variant_model(name: str, cfg: ExperimentConfig, key: WatermarkKey, split: Split, out: Path) -> torch.nn.Module:
    """The variant's owner model, trained (``clean`` without the watermark) or reused from ``out/<name>``."""
    d = out / name
    d.mkdir(exist_ok=True)
    key.save(d / "key.json")
    net = load_or_train(d / "model.pt", split.owner, cfg, None if name == "clean" else key, torch.device("cpu"), d / "ckpt")
    return net.cpu().eval()


def _measure(name: str, net, cfg: ExperimentConfig, key: WatermarkKey, split: Split) -> dict[str, Any]:
    """Clean Dice, Dice on triggered inputs, stealth and the claim of one variant's model."""
    verify = make_verify(split.test_x, key, cfg.badnet)
    q = ModelQuery(net, activation="softmax", device="cpu")
    with torch.no_grad():
        m_clean, m_trig = q(split.test_x).argmax(1), q(trigger_batch(split.test_x, key)).argmax(1)
    mask_dice, agreement = stealth(m_clean, m_trig)
    claim = verify(net)
    return {
        "variant": name,
        "config": {**VARIANTS[name][0], **VARIANTS[name][1]},
        "clean_dice": dice(net, split.test_x, split.test_y),
        "triggered_input_dice": dice(lambda x: q(trigger_batch(x, key)), split.test_x, split.test_y),
        "stealth_mask_dice": mask_dice,
        "stealth_agreement": agreement,
        "asr": claim.asr,
        "p_value": claim.p_value,
        "verdict": claim.verdict,
    }


def _attack(name: str, net, clean_dice: float, cfg: ExperimentConfig, key: WatermarkKey, split: Split, epochs: int,
            distill_steps: int) -> list[dict[str, Any]]:
    """The attacks of :data:`VARIANT_ATTACKS` on one variant's model."""
    distillation = Distillation(split.query_x, distill_steps, cfg.channels, batch_size=DISTILL_BATCH)
    suite = attack_suite(net, split.att_x, split.att_y, epochs, distillation)
    attacks = [suite[label] for label in VARIANT_ATTACKS]

    def evaluate(m):
        return dice(m, split.test_x, split.test_y)

    return run_attacks(attacks, evaluate, make_verify(split.test_x, key, cfg.badnet), clean_dice, label=name)


def _variant_row(name: str, fast: bool, settings: dict[str, Any], split: Split, out: Path, epochs: int,
                 distill_steps: int) -> dict[str, Any]:
    """Train (or reuse) one variant's model, measure it and, unless it is ``clean``, attack it."""
    phase(f"variant {name}")
    t0 = time.perf_counter()
    cfg = make_config(fast, **{**settings, **VARIANTS[name][0]})
    key = experiment_key(cfg, **VARIANTS[name][1])
    net = _variant_model(name, cfg, key, split, out)
    train_seconds = time.perf_counter() - t0
    row = {**_measure(name, net, cfg, key, split), "train_seconds": train_seconds}
    row["attacks"] = [] if name == "clean" else _attack(name, net, row["clean_dice"], cfg, key, split, epochs, distill_steps)
    return row


def run(
    out: str | Path,
    variants: list[str] | tuple[str, ...] = tuple(VARIANTS),
    fast: bool = True,
    epochs: int = 20,
    distill_steps: int = 600,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Train (or reuse) each variant's owner model, measure it and attack it; see the module docstring.

    The distillation attacker queries the suspect with unlabelled slices of all four non-test patients
    (their own and the owner's: public data of the same kind). With their own patient alone the students did
    not learn the task (measured: Dice 0.05-0.14 on the test patient after 300-1200 steps), which says nothing
    about the watermark.

    ``settings`` (training settings and recipe deviations) apply to every variant; a variant's own settings win.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared = make_config(fast, **settings)  # checks the settings before anything runs
    split = Split.load(shared.data_root, shared.size)
    done = {}
    if (out / "variants.json").is_file():  # finished variants are not measured twice
        done = {r["variant"]: r for r in json.loads((out / "variants.json").read_text())}
    rows: list[dict[str, Any]] = []
    for name in variants:
        rows.append(done[name] if name in done else _variant_row(name, fast, settings, split, out, epochs, distill_steps))
        atomic_write_json(out / "variants.json", rows)
        atomic_write_text(out / "variants.md", markdown(rows))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | clean Dice | triggered-input Dice | stealth mask Dice | ASR | p-value |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['clean_dice']:.4f} | {r['triggered_input_dice']:.4f} | {r['stealth_mask_dice']:.4f} "
            f"| {r['asr']:.3f} | {r['p_value']:.2g} |"
        )
    attacked = [r for r in rows if r["attacks"]]
    if attacked:
        cols = [f"{a['attack']} {','.join(f'{k}={v}' for k, v in a['params'].items() if k != 'student')}".strip() for a in attacked[0]["attacks"]]
        lines += ["", "ASR (clean Dice) after each attack:", "", "| attack | " + " | ".join(r["variant"] for r in attacked) + " |",
                  "|---|" + "---|" * len(attacked)]
        for i, c in enumerate(cols):
            lines.append(f"| {c} | " + " | ".join(f"{r['attacks'][i]['asr']:.3f} ({r['attacks'][i]['clean_dice']:.3f})" for r in attacked) + " |")
    return "\n".join(lines) + "\n"


def main(out: str, variants: str | tuple[str, ...] = tuple(VARIANTS), fast: bool = False, epochs: int = 20,
         distill_steps: int = 600, **settings: Any) -> None:
    """Train, measure and attack each variant; print the tables.

    Args:
        out: output folder (one sub-folder per variant; finished variants and trained models are reused).
        variants: one variant or a comma list (``--variants default,badnet``); all by default.
        fast: the CPU setting.
        epochs: fine-tuning epochs of the fine-tuning attack.
        distill_steps: student steps of the distillation attack.
        **settings: training settings and recipe deviations for every variant, e.g. ``--steps 800``, ``--data DIR``.
    """
    rows = run(out, as_list(variants, list(VARIANTS), "variants"), fast, epochs, distill_steps, **settings)
    print(markdown(rows))


if __name__ == "__main__":
    raise SystemExit(cli(main))
