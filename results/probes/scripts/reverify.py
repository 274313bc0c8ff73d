"""Re-verify saved runs with today's read-out: both models reused (their recorded training settings checked),
every number of the acceptance table measured again (direct, LIME, controls), results.json rewritten; the previous
results.json is kept once as results_before_erasure.json.

    OMP_NUM_THREADS=1 python results/probes/scripts/reverify.py runs/hmspw4_s3 runs/def_s3 ...
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import monai_stealthmark.experiments.sunnybrook as sb

torch.set_num_threads(1)
for d in map(Path, sys.argv[1:]):
    settings = json.loads((d / "watermarked.settings.json").read_text())
    fields = {**sb._ADDED_LATER, **{k: v for k, v in settings.items() if k not in ("fast",)}}  # older records lack later settings
    fields["channels"] = tuple(fields["channels"])
    cfg = sb.ExperimentConfig(fast=settings.get("fast", True), **fields)
    if not (d / "results_before_erasure.json").is_file():
        shutil.copy(d / "results.json", d / "results_before_erasure.json")
    res = sb.run(cfg, d, "cpu")
    row = {"run": str(d), "clean_dice": res["clean"]["dice"], "wm_dice": res["watermarked"]["dice"],
           "stealth": res["stealth_mask_dice"], "agreement": res["stealth_agreement"], "asr": res["asr"],
           "bits": res["bit_accuracy"], "false_decodes": res["false_decodes"], "reads": res.get("decodes_by_read")}
    print(json.dumps(row), flush=True)
