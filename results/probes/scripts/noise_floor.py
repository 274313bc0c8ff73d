"""Control for issue 2's Dice bar: how far apart are two *clean* models whose training differs by a hair?

The clean and the watermarked model share seed, initialisation, data order and augmentation streams; the Dice
difference between them on the held-out patient is the watermark's effect plus the divergence of two training
trajectories. This script measures that divergence alone: it retrains the clean model of a saved run with the
learning rate multiplied by (1 + eps) (everything else identical) and reports both clean models' Dice / AUC on the
held-out patient, with the experiment's own ``seg_scores`` (``evaluate``).

    python results/probes/scripts/noise_floor.py --from runs/def_s2 --seed 2 --eps 1e-4 --out runs/nf_s2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import monai_stealthmark.experiments.sunnybrook as sb
from monai_stealthmark.data import load_sunnybrook, split_by_patient

p = argparse.ArgumentParser()
p.add_argument("--from", dest="src", required=True, help="a run folder with clean.pt (trained with today's default)")
p.add_argument("--seed", type=int, required=True)
p.add_argument("--eps", type=float, default=1e-4, help="relative change of the learning rate")
p.add_argument("--test-patient", default=None)
p.add_argument("--out", required=True)
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
cfg = sb.ExperimentConfig(fast=True, seed=a.seed, test_patient=a.test_patient)
sb._check_reuse(Path(a.src) / "clean.pt", cfg, "clean")  # the saved clean model must be today's default recipe
samples = load_sunnybrook(cfg.data_root, size=cfg.size)
train, test = split_by_patient(samples, [cfg.test_patient])
dev = torch.device("cpu")
orig = sb.build_network(cfg.channels, cfg.arch)
orig.load_state_dict(torch.load(Path(a.src) / "clean.pt", map_location=dev))
t0 = time.time()
path = out / "clean_perturbed.pt"
cfg_p = sb.ExperimentConfig(fast=True, seed=a.seed, test_patient=a.test_patient, lr=cfg.lr * (1 + a.eps))
if path.is_file():
    pert = sb.build_network(cfg.channels, cfg.arch)
    pert.load_state_dict(torch.load(path, map_location=dev))
else:
    pert = sb.train_model(train, cfg_p, None, dev)
    torch.save(pert.state_dict(), path)
secs = time.time() - t0
key = sb.experiment_key(cfg)
res = sb.evaluate(orig.eval(), pert.eval(), test, key, cfg, dev)  # "watermarked" slot = the perturbed clean model
row = {
    "src": a.src, "seed": a.seed, "test_patient": cfg.test_patient, "eps": a.eps, "train_seconds": secs,
    "clean_dice": res["clean"]["dice"], "clean_auc": res["clean"]["auc"],
    "perturbed_dice": res["watermarked"]["dice"], "perturbed_auc": res["watermarked"]["auc"],
    "dice_diff_points": 100 * (res["clean"]["dice"] - res["watermarked"]["dice"]),
}
print(json.dumps(row))
with open(out.parent / "noise_floor.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
