"""Robustness options measured against the default watermark, and the BadNet baseline, on the Sunnybrook 2D
setting of :mod:`experiments.robustness` (owner 101/201/301, attacker 401, test 501).

    python -m experiments.variants --fast --out runs/variants

Variants (each an owner model trained with the same seed, data and schedule):

- ``clean``: no watermark (the reference for the Dice cost);
- ``default``: the uncertainty QR watermark as shipped;
- ``commark``: ComMark's ideas — a low-frequency trigger and simulated weight noise / pruning in the loop
  (half of the steps); ``lowfreq`` and ``simattack`` (30 % of the steps) each of the two alone;
- ``badnet``: the BadNet-style backdoor baseline (trigger -> a keyed square of the mask turns foreground).

For each: clean Dice, the Dice on triggered inputs, the stealth (mask Dice clean vs triggered input), the
ASR, and the ASR after the attacks that matter most (fine-tuning, pruning, static int8, input noise / blur /
resampling, distillation). Writes ``variants.json`` and ``variants.md``; models are reused when present.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from monai_stealthmark import attacks as A
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT, load_sunnybrook
from experiments.robustness import ATTACKER, OWNER, TEST, _stack, dice
from experiments.sunnybrook import ExperimentConfig, build_network, experiment_key, stealth, train_model
from monai_stealthmark.utils import atomic_write_json, atomic_write_text
from monai_stealthmark.verify import ModelQuery, trigger_batch, verify_badnet, verify_ownership

__all__ = ["VARIANTS", "run", "main"]

# variant -> (ExperimentConfig overrides, key overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "clean": ({}, {}),
    "default": ({}, {}),
    "commark": ({"simulate_attacks": 0.5}, {"trigger": "lowfreq"}),
    "lowfreq": ({}, {"trigger": "lowfreq"}),
    "simattack": ({"simulate_attacks": 0.3}, {}),
    "badnet": ({"badnet": True}, {}),
}


def _attacks(net, att_x, att_y, epochs: int, distill_steps: int, query_x) -> list[tuple[str, dict[str, Any], Any]]:
    teacher = ModelQuery(net, activation="softmax", device="cpu")

    def student():
        torch.manual_seed(1)
        return A.distill(teacher, build_network(), query_x, steps=distill_steps, outputs="soft", batch_size=16)

    inputs = A.INPUT_ATTACKS
    return [
        ("finetune_all", {"epochs": epochs, "lr": 1e-4}, lambda: A.finetune(net, att_x, att_y, epochs=epochs, lr=1e-4)),
        ("global_prune", {"amount": 0.5}, lambda: A.global_magnitude_prune(net, 0.5)),
        ("global_prune", {"amount": 0.7}, lambda: A.global_magnitude_prune(net, 0.7)),
        ("int8_static", {}, lambda: A.int8_static(net, att_x)),
        ("weight_noise", {"scale": 0.1}, lambda: A.weight_noise(net, 0.1)),
        *[
            (f"input_{n}", {}, lambda make=inputs[n]: A.InputTransformQuery(ModelQuery(net, activation="softmax", device="cpu"), make()))
            for n in ("gaussian_noise_0.05", "blur_1px", "resample_0.5", "flip_tta")
        ],
        ("distill", {"outputs": "soft", "student": "unet", "steps": distill_steps, "queries": int(query_x.shape[0]) * 5}, student),
    ]


def run(
    out: str | Path,
    variants: list[str],
    fast: bool = True,
    steps: int | None = None,
    data_root: str = str(DEFAULT_SUNNYBROOK_ROOT),
    epochs: int = 20,
    distill_steps: int = 600,
    cutmix_prob: float | None = None,
    margin_consistency: float | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) each variant's owner model, measure it and attack it; see the module docstring.

    The distillation attacker queries the suspect with unlabelled slices of all four non-test patients
    (their own and the owner's: public data of the same kind). With their own patient alone the students did
    not learn the task (measured: Dice 0.05-0.14 on the test patient after 300-1200 steps), which says nothing
    about the watermark.

    ``cutmix_prob`` and ``margin_consistency`` override the demo's defaults for every variant (None keeps them).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_sunnybrook(data_root, size=128)
    owner = [s for s in samples if s["patient"] in OWNER]
    att_x, att_y = _stack([s for s in samples if s["patient"] in ATTACKER])
    query_x = _stack([s for s in samples if s["patient"] in ATTACKER + OWNER])[0]
    test_x, test_y = _stack([s for s in samples if s["patient"] in TEST])
    done = {}
    if (out / "variants.json").is_file():  # finished variants are not measured twice
        done = {r["variant"]: r for r in json.loads((out / "variants.json").read_text())}
    rows: list[dict[str, Any]] = []
    base = {"cutmix_prob": cutmix_prob, "margin_consistency": margin_consistency}  # a variant's own settings win
    for name in variants:
        if name in done:
            rows.append(done[name])
            continue
        t0 = time.perf_counter()
        cfg_over, key_over = VARIANTS[name]
        cfg = ExperimentConfig(fast=fast, steps=steps, data_root=data_root, **{**base, **cfg_over})
        key = experiment_key(cfg, **key_over)
        d = out / name
        d.mkdir(exist_ok=True)
        key.save(d / "key.json")
        path = d / "model.pt"
        net = build_network(cfg.channels)
        if path.is_file():
            net.load_state_dict(torch.load(path, map_location="cpu"))
        else:
            ckpt = d / "ckpt"
            ckpt.mkdir(exist_ok=True)
            net = train_model(owner, cfg, None if name == "clean" else key, torch.device("cpu"), ckpt)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(net.state_dict(), tmp)
            tmp.replace(path)
        net = net.cpu().eval()
        train_seconds = time.perf_counter() - t0

        def verify(m, key=key, badnet=cfg.badnet):
            q = ModelQuery(m, activation="softmax", device="cpu") if isinstance(m, torch.nn.Module) else m
            return verify_badnet(q, test_x, key) if badnet else verify_ownership(q, test_x, key)

        def evaluate(m):
            return dice(m, test_x, test_y)

        q = ModelQuery(net, activation="softmax", device="cpu")
        with torch.no_grad():
            m_clean, m_trig = q(test_x).argmax(1), q(trigger_batch(test_x, key)).argmax(1)
        mask_dice, agreement = stealth(m_clean, m_trig)
        base = verify(net)
        row: dict[str, Any] = {
            "variant": name,
            "config": {**cfg_over, **key_over},
            "clean_dice": evaluate(net),
            "triggered_input_dice": dice(lambda x: q(trigger_batch(x, key)), test_x, test_y),
            "stealth_mask_dice": mask_dice,
            "stealth_agreement": agreement,
            "asr": base.asr,
            "p_value": base.p_value,
            "verdict": base.verdict,
            "train_seconds": train_seconds,
            "attacks": [],
        }
        if name != "clean":
            for a_name, params, attack in _attacks(net, att_x, att_y, epochs, distill_steps, query_x):
                r = A.run_attack(a_name, params, attack, evaluate, verify, row["clean_dice"])
                row["attacks"].append(r.to_dict())
                print(f"{name:9s} {a_name:26s} {params!s:36s} Dice {r.clean_dice:.4f} ASR {r.asr:.3f} p {r.p_value:.2g}", flush=True)
        rows.append(row)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--data", default=str(DEFAULT_SUNNYBROOK_ROOT))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--distill-steps", type=int, default=600)
    p.add_argument("--cutmix-prob", type=float, default=None, help="CutMix share of every variant (default: the demo's)")
    p.add_argument("--margin-consistency", type=float, default=None, help="margin-copy weight (default: the demo's)")
    a = p.parse_args(argv)
    rows = run(a.out, a.variants, a.fast, a.steps, a.data, a.epochs, a.distill_steps, a.cutmix_prob, a.margin_consistency)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
