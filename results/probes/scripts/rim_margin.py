"""Mean clean-input logit margin (LV - background) of the clean and watermarked models of runs/RUN, by distance to
the ground-truth LV and by QR module colour (dark / light), on the held-out patient. Usage: rim_margin.py RUN..."""
import json, sys, torch, torch.nn.functional as F
from monai_stealthmark.experiments.sunnybrook import ExperimentConfig, build_network
from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import qr_target_map
torch.set_num_threads(2)
def dil(m, r): return F.max_pool2d(m.float()[:,None], 2*r+1, 1, r)[:,0] > 0
for run in sys.argv[1:]:
    cfgd = json.load(open(f"runs/{run}/results.json"))["config"]
    cfg = ExperimentConfig(**{k: v for k, v in cfgd.items() if k in ("test_patient","seed","size")})
    key = WatermarkKey.load(f"runs/{run}/key.json")
    train, test = split_by_patient(load_sunnybrook(cfg.data_root, size=cfg.size), [cfg.test_patient])
    x = torch.stack([s["image"] for s in test]); y = torch.stack([s["label"] for s in test])[:,0] > 0
    dark = qr_target_map(key, (128,128))[None].expand_as(y)
    for name in ("clean", "watermarked"):
        net = build_network(); net.load_state_dict(torch.load(f"runs/{run}/{name}.pt")); net.eval()
        with torch.no_grad(): lg = net(x); d = (lg[:,1]-lg[:,0])
        s=[]
        for a,b in ((0,2),(2,4),(4,8),(8,16),(16,200)):
            ring = dil(y,b) & ~dil(y,a) if a else dil(y,b)&~y
            s.append(f"[{a},{b}] dark {d[ring&dark].mean():.2f} light {d[ring&~dark].mean():.2f}")
        print(run, name, " | ".join(s))
