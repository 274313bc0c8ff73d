import sys, torch, numpy as np, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.experiments.sunnybrook import ExperimentConfig, experiment_key, build_network
from monai_stealthmark.verify import trigger_batch
import torch.nn.functional as F
import os
cfg = ExperimentConfig(fast=True, seed=int(os.environ.get("SEED", "0")))
key = experiment_key(cfg)
net = build_network(cfg.channels); net.load_state_dict(torch.load(sys.argv[1])); net.eval()
s = load_sunnybrook(cfg.data_root, size=128)
train, test = split_by_patient(s, [cfg.test_patient])
with torch.no_grad():
    for name, ss in (("unseen", test), ("train", train[:22])):
        im = torch.stack([x["image"] for x in ss])
        lc, lt = net(im), net(trigger_batch(im, key))
        mc = lc[:, 1] - lc[:, 0]; mt = lt[:, 1] - lt[:, 0]
        d = mt - mc
        fg = (mc > 0).float()[:, None]
        ring = (F.max_pool2d(fg, 5, 1, 2)[:, 0] > 0) & ~(-F.max_pool2d(-fg, 5, 1, 2)[:, 0] > 0)
        edges = [-8, -4, -2, -1, -0.5, 0, 0.5, 1, 2, 4, 8]
        row = []
        for a, b in zip(edges[:-1], edges[1:]):
            m = ring & (mc >= a) & (mc < b)
            row.append(f"[{a},{b}): d {d[m].mean():+.2f} sd {d[m].std():.2f} n{int(m.sum())}")
        print(name); print("\n".join(row))
