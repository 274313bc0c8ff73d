"""Where the direct read loses bits: per data module, the first read's error rate by distance from the model's own
predicted organ (clean-input hard mask), dark vs light errors, and two alternative reads (the triggered-minus-clean
uncertainty difference, eight noisy queries averaged). ``--changes``: the pixels the trigger adds to / removes from
the hard mask per slice, inside / outside the ground truth.

    python results/probes/scripts/bit_zones.py runs/hmsp_s3 runs/def_s3
    python results/probes/scripts/bit_zones.py --changes runs/hmspw4_f401 runs/fold_SCD0000401
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.experiments.sunnybrook import build_network
from monai_stealthmark.key import function_pattern_mask
from monai_stealthmark.key.geometry import load_key
from monai_stealthmark.verify import ModelQuery, bit_accuracy, cell_means, read_scores, scores_to_modules, trigger_batch, uncertainty_map

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
changes = "--changes" in sys.argv
runs = [Path(a) for a in sys.argv[1:] if a != "--changes"]
cache: dict[str, list] = {}


def load(d: Path, which: str) -> tuple[torch.nn.Module, dict]:
    s = json.loads((d / f"{which}.settings.json").read_text())
    net = build_network(tuple(s["channels"]), s.get("arch", "unet"))
    net.load_state_dict(torch.load(d / f"{which}.pt", map_location="cpu"))
    return net.eval(), s


for d in runs:
    net, s = load(d, "watermarked")
    key = load_key(d / "key.json")
    tp = s["test_patient"]
    if tp not in cache:
        cache[tp] = split_by_patient(load_sunnybrook(size=128), [tp])[1]
    im = torch.stack([x["image"] for x in cache[tp]])
    q = ModelQuery(net, activation="softmax", device="cpu")
    out: dict = {"run": str(d)}
    with torch.no_grad():
        pc, pt = q(im), q(trigger_batch(im, key))
    if changes:
        lab = torch.stack([x["label"] for x in cache[tp]])[:, 0] > 0
        mc, mt = pc.argmax(1) == 1, pt.argmax(1) == 1
        n = len(im)
        out.update(lv_px=lab.sum().item() / n, predicted_clean=mc.sum().item() / n, predicted_triggered=mt.sum().item() / n,
                   gained_in_gt=(mt & ~mc & lab).sum().item() / n, gained_outside=(mt & ~mc & ~lab).sum().item() / n,
                   lost_in_gt=(mc & ~mt & lab).sum().item() / n, lost_outside=(mc & ~mt & ~lab).sum().item() / n)
        print(json.dumps(out), flush=True)
        continue
    g, qz = key.grid_size, key.quiet_zone
    ut, uc = cell_means(uncertainty_map(pt), key), cell_means(uncertainty_map(pc), key)
    mods = scores_to_modules(ut, key)
    fg = (pc.argmax(1, keepdim=True) > 0).float()
    near = [(F.max_pool2d(fg, 2 * r + 1, 1, r) if r else fg) for r in (0, 4, 8, 16)]
    near = [cell_means(x[:, 0], key).reshape(-1, g, g)[:, qz : g - qz, qz : g - qz].numpy() > 0 for x in near]
    data = ~function_pattern_mask(key.qr_version)[0]
    err = mods != key.qr_matrix[None]
    zones = {"organ": near[0], "0-4px": near[1] & ~near[0], "4-8px": near[2] & ~near[1], "8-16px": near[3] & ~near[2], "further": ~near[3]}
    out["error_rate_by_zone"] = {k: (round(float(err[z & data].mean()), 3), int((z & data).sum()) // len(im)) for k, z in zones.items()}
    out["error_dark"] = float(err[:, key.qr_matrix & data].mean())
    out["error_light"] = float(err[:, ~key.qr_matrix & data].mean())
    out["first_read"] = {"decodes": sum(t == key.payload for t in read_scores(ut, key, "direct")[1]), "bits": float(bit_accuracy(mods, key).mean())}
    diff = ut - uc
    out["difference_read"] = {"decodes": sum(t == key.payload for t in read_scores(diff, key, "direct")[1])}
    gen = torch.Generator().manual_seed(0)
    span = im.amax((1, 2, 3), keepdim=True) - im.amin((1, 2, 3), keepdim=True)
    with torch.no_grad():
        avg = sum(cell_means(uncertainty_map(q(trigger_batch(im + 0.03 * span * torch.randn(im.shape, generator=gen), key))), key) for _ in range(8)) / 8
    out["noisy_8_read"] = {"decodes": sum(t == key.payload for t in read_scores(avg, key, "direct")[1]),
                           "bits": float(bit_accuracy(scores_to_modules(avg, key), key).mean())}
    print(json.dumps(out), flush=True)
