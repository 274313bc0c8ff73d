"""Pixels whose hard mask changes under the trigger (watermarked model of runs/RUN, SCD0000501): LV gained near /
far from the clean-input mask, LV lost, split by QR module colour. Usage: stealth_changes.py RUN..."""
import sys, torch, torch.nn.functional as F
from monai_stealthmark.experiments.sunnybrook import ExperimentConfig, build_network
from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import qr_target_map
from monai_stealthmark.verify import trigger_batch
torch.set_num_threads(2)
def dil(m, r): return F.max_pool2d(m.float()[:,None], 2*r+1, 1, r)[:,0] > 0
_, test = split_by_patient(load_sunnybrook(ExperimentConfig().data_root, size=128), ["SCD0000501"])
x = torch.stack([s["image"] for s in test]); y = torch.stack([s["label"] for s in test])[:,0] > 0
for run in sys.argv[1:]:
    key = WatermarkKey.load(f"runs/{run}/key.json")
    dark = qr_target_map(key, (128,128))[None].expand_as(y)
    net = build_network(); net.load_state_dict(torch.load(f"runs/{run}/watermarked.pt")); net.eval()
    with torch.no_grad(): mc = net(x).argmax(1) > 0; mt = net(trigger_batch(x, key)).argmax(1) > 0
    grow = mt & ~mc; shrink = mc & ~mt
    s = []
    for a, b in ((0, 3), (3, 200)):
        ring = (dil(mc, b) & ~dil(mc, a)) if a else dil(mc, b)
        s.append(f"grow[{a},{b}] dark {(grow&ring&dark).sum().item()} light {(grow&ring&~dark).sum().item()}")
    print(run, "fg", mc.sum().item(), " | ".join(s), "| shrink dark", (shrink&dark).sum().item(), "light", (shrink&~dark).sum().item())
