"""Tutorial 3 — attack your own watermarked model and read the robustness table.

Takes the bundle model of tutorial 1 and runs a few attacks of `monai_stealthmark.attacks` (fine-tuning on
another patient, pruning, fp16, int8, weight noise, input noise at verification time). For each, the runner
verifies before/after and records clean Dice, ASR and p-value; "removed" means the claim failed while the model
stayed useful (clean Dice within 5 points). The full suite (distillation, overwriting, persistence, restoration,
loss landscape) is `python -m experiments.robustness --fast --out DIR`.

    python tutorials/03_attack_your_model.py --out /tmp/tutorial
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/stealthmark_tutorial")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of the attack")
    a = p.parse_args(argv)
    out = Path(a.out)
    from monai_stealthmark import attacks as A
    from monai_stealthmark.bundle import load_bundle_model
    from monai_stealthmark.data import load_sunnybrook
    from experiments.robustness import attack_table, dice
    from monai_stealthmark.key import WatermarkKey
    from monai_stealthmark.verify import ModelQuery, verify_ownership

    net, _, _ = load_bundle_model(out / "bundle", device="cpu")
    key = WatermarkKey.load(out / "key.json")
    samples = load_sunnybrook(size=128, patients=["SCD0000401", "SCD0000501"])
    att = [s for s in samples if s["patient"] == "SCD0000401"]  # the attacker's own patient
    test = [s for s in samples if s["patient"] == "SCD0000501"]
    att_x, att_y = torch.stack([s["image"] for s in att]), torch.stack([s["label"] for s in att])
    x, y = torch.stack([s["image"] for s in test]), torch.stack([s["label"] for s in test])

    def verify(m):
        return verify_ownership(m if not isinstance(m, torch.nn.Module) else ModelQuery(m, device="cpu"), x, key)

    def evaluate(m):
        return dice(m, x, y)

    ref = dice(net, x, y)
    base = verify(net)
    attacks = {
        "finetune_all": ({"epochs": a.epochs, "lr": 1e-4}, lambda: A.finetune(net, att_x, att_y, epochs=a.epochs, lr=1e-4)),
        "global_prune": ({"amount": 0.5}, lambda: A.global_magnitude_prune(net, 0.5)),
        "fp16": ({}, lambda: A.CastQuery(net, torch.float16)),
        "int8_static": ({}, lambda: A.int8_static(net, att_x)),
        "weight_noise": ({"scale": 0.05}, lambda: A.weight_noise(net, 0.05)),
        "input_gaussian_noise_0.05": ({}, lambda: A.InputTransformQuery(ModelQuery(net, device="cpu"), A.INPUT_ATTACKS["gaussian_noise_0.05"]())),
    }
    rows = []
    for name, (params, attack) in attacks.items():
        r = A.run_attack(name, params, attack, evaluate, verify, ref)
        r.removed = r.removed and base.verdict
        rows.append(r.to_dict())
    print(attack_table({"clean_dice": ref, "asr": base.asr, "p_value": base.p_value}, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
