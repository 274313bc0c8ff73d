"""One JSON line per probe run: overrides vs today's default, the acceptance numbers, and where the clean-input
masks of both models differ from the ground truth (false positives by distance to the LV, false negatives)."""
import json, sys, torch, torch.nn.functional as F
from monai_stealthmark.experiments.sunnybrook import ExperimentConfig, build_network
from monai_stealthmark.data import load_sunnybrook, split_by_patient
torch.set_num_threads(2)
default = ExperimentConfig(fast=True).to_dict()
def dil(m, r): return F.max_pool2d(m.float()[:, None], 2 * r + 1, 1, r)[:, 0] > 0
cache = {}
for arg in sys.argv[1:]:
    run, cmd = arg.split("=", 1)
    res = json.load(open(f"runs/{run}/results.json"))
    cfg = res["config"]
    over = {k: v for k, v in cfg.items() if k != "data_root" and default.get(k) != v}
    tp = cfg["test_patient"]
    if tp not in cache:
        _, test = split_by_patient(load_sunnybrook(cfg["data_root"], size=cfg["size"]), [tp])
        cache[tp] = (torch.stack([s["image"] for s in test]), torch.stack([s["label"] for s in test])[:, 0] > 0)
    x, y = cache[tp]
    masks = {}
    for name in ("clean", "watermarked"):
        net = build_network(); net.load_state_dict(torch.load(f"runs/{run}/{name}.pt")); net.eval()
        with torch.no_grad():
            m = net(x).argmax(1) > 0
        fp = m & ~y
        masks[name] = {"fp_within_2px": int((fp & dil(y, 2)).sum()), "fp_2_to_5px": int((fp & dil(y, 5) & ~dil(y, 2)).sum()),
                       "fp_beyond_5px": int((fp & ~dil(y, 5)).sum()), "fn": int((~m & y).sum())}
    keep = ("clean", "watermarked", "watermarked_triggered_input", "stealth_mask_dice", "stealth_agreement", "asr", "bit_accuracy",
            "false_decodes", "vote_decoded", "seconds", "device")
    line = {"name": run, "date": "2026-11-27", "command": cmd, "overrides": over, **{k: res[k] for k in keep if k in res},
            "mask_errors_clean_input": masks}
    print(json.dumps(line))
