"""Control for the rim hinge: train the *clean* model with DiceCE + the rim hinge (no watermark), against the
watermarked model of a --rim-margin run, to see how much of the Dice gain is the hinge and not the watermark.

    python results/probes/scripts/clean_rim_control.py --from runs/rim0.005_s2 --seed 2 --rim-margin 0.005 --out runs/ctl_rim0.005_s2
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from monai.losses import DiceCELoss

import monai_stealthmark.experiments.sunnybrook as sb
from monai_stealthmark.losses import UncertaintyWatermarkLoss

p = argparse.ArgumentParser()
p.add_argument("--from", dest="src", required=True)
p.add_argument("--seed", type=int, required=True)
p.add_argument("--rim-margin", type=float, required=True)
p.add_argument("--test-patient", default=None)
p.add_argument("--out", required=True)
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
for f in ("watermarked.pt", "watermarked.settings.json", "key.json"):
    shutil.copy(Path(a.src) / f, out / f)


def clean_loss(*args, **kwargs):  # only the clean branch builds a bare DiceCELoss; the watermarked model is reused
    return UncertaintyWatermarkLoss(DiceCELoss(*args, **kwargs), tau=0.25, rim_margin=a.rim_margin)


sb.DiceCELoss = clean_loss
cfg = sb.ExperimentConfig(fast=True, seed=a.seed, rim_margin=a.rim_margin, test_patient=a.test_patient)
res = sb.run(cfg, out)
print(sb.results_markdown(res, cfg))
