"""Probe: train the watermarked model only, measure stealth / direct ASR / wrong key on the held-out and training slices."""
import argparse, json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
import torch
from monai.metrics import DiceMetric
from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.experiments.sunnybrook import ExperimentConfig, experiment_key, train_model, stealth, WRONG_KEY_SEED, build_network
from monai_stealthmark.verify import ModelQuery, trigger_batch, verify_ownership

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--set", nargs="*", default=[], help="k=v ExperimentConfig overrides (json values)")
p.add_argument("--patch", default=None, help="python file exec'd before training (monkeypatches)")
p.add_argument("--teacher", default=None, help="clean model state dict: the teacher of teacher_weight > 0")
a = p.parse_args()
ov = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
if a.patch:
    exec(open(a.patch).read())
cfg = ExperimentConfig(fast=True, **ov)
torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
key = experiment_key(cfg)
samples = load_sunnybrook(cfg.data_root, size=cfg.size)
train, test = split_by_patient(samples, [cfg.test_patient])
t0 = time.time()
os.makedirs("runs/probe", exist_ok=True)
out = f"runs/probe/{a.name}.pt"
import os
if os.path.exists(out):
    net = build_network(cfg.channels, cfg.arch); net.load_state_dict(torch.load(out)); net.eval()
else:
    teacher = None
    if a.teacher:
        teacher = build_network(cfg.channels, cfg.arch)
        teacher.load_state_dict(torch.load(a.teacher))
    net = train_model(train, cfg, key, torch.device("cpu"), teacher=teacher)
    torch.save(net.state_dict(), out)
tt = time.time() - t0
q = ModelQuery(net, activation="softmax", device=torch.device("cpu"))
res = {"name": a.name, "overrides": ov, "train_seconds": tt}
with torch.no_grad():
    for split, ss in (("unseen", test), ("train", train)):
        im = torch.stack([s["image"] for s in ss]); lab = torch.stack([s["label"] for s in ss])
        pc, pt = q(im), q(trigger_batch(im, key))
        mc, mt = pc.argmax(1), pt.argmax(1)
        d, agr = stealth(mc, mt)
        dm = DiceMetric(include_background=False, ignore_empty=False)
        dm(torch.cat([mc[:, None] == 0, mc[:, None] == 1], 1).float(), torch.cat([lab == 0, lab == 1], 1).float())
        r = {"stealth": d, "agreement": agr, "dice_clean_input": float(dm.aggregate()),
             "lost": int(((mc == 1) & (mt == 0)).sum()) / len(ss), "gained": int(((mc == 0) & (mt == 1)).sum()) / len(ss)}
        if split == "unseen":
            rep = verify_ownership(q, im, key, mode="direct")
            wk = verify_ownership(q, im, key.replace(trigger_seed=WRONG_KEY_SEED), mode="direct")
            r.update(asr=rep.asr, bits=rep.mean_bit_accuracy, wrong_decodes=int(sum(t == key.payload for t in wk.decoded)), wrong_bits=wk.mean_bit_accuracy)
            if os.environ.get("PROBE_WRONG_SEEDS"):  # more wrong keys: other trigger seeds, drawn from a fixed generator
                extra = []
                for ws in np.random.default_rng(12345).integers(1, 2**31 - 1, int(os.environ["PROBE_WRONG_SEEDS"])):
                    w = verify_ownership(q, im, key.replace(trigger_seed=int(ws)), mode="direct")
                    extra.append(int(sum(t == key.payload for t in w.decoded)))
                r.update(wrong_decodes_extra=extra)
        res[split] = r
print(json.dumps(res))
with open("runs/probe/results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
