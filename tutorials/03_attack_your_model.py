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
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the attack suite lives in experiments/, beside the library
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/stealthmark_tutorial")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of the attack")
    a = p.parse_args(argv)
    out = Path(a.out)
    from experiments.robustness import attack_suite, attack_table, dice, make_verify, run_attacks
    from monai_stealthmark.bundle import load_bundle_model
    from monai_stealthmark.data import load_sunnybrook
    from monai_stealthmark.key import WatermarkKey

    net, _, _ = load_bundle_model(out / "bundle", device="cpu")
    key = WatermarkKey.load(out / "key.json")
    samples = load_sunnybrook(size=128, patients=["SCD0000401", "SCD0000501"])
    att = [s for s in samples if s["patient"] == "SCD0000401"]  # the attacker's own patient
    test = [s for s in samples if s["patient"] == "SCD0000501"]
    att_x, att_y = torch.stack([s["image"] for s in att]), torch.stack([s["label"] for s in att])
    x, y = torch.stack([s["image"] for s in test]), torch.stack([s["label"] for s in test])

    # the suite's attacks by label (experiments.robustness.attack_suite lists them all)
    suite = attack_suite(net, att_x, att_y, epochs=a.epochs)
    chosen = ("finetune_all", "global_prune_0.5", "fp16", "int8_static", "weight_noise_0.05", "input_gaussian_noise_0.05")
    verify = make_verify(x, key)
    ref = dice(net, x, y)
    base = verify(net)
    rows = run_attacks([suite[label] for label in chosen], lambda m: dice(m, x, y), verify, ref, base.verdict)
    print(attack_table({"clean_dice": ref, "asr": base.asr, "p_value": base.p_value}, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
