"""Wrong-key sweep of a saved run with today's read-out (the erasure read included): the watermarked model queried
with N other trigger seeds (drawn from a fixed generator), direct mode, on the held-out slices; decodes of the
payload counted per read.

    python results/probes/scripts/wrong_keys.py runs/demo2t_s11 20
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.experiments.sunnybrook import build_network
from monai_stealthmark.key.geometry import load_key
from monai_stealthmark.verify import ModelQuery, verify_ownership

torch.set_num_threads(2)
d, n = Path(sys.argv[1]), int(sys.argv[2])
s = json.loads((d / "watermarked.settings.json").read_text())
key = load_key(d / "key.json")
out = {"run": str(d), "wrong_seeds": n}
test = split_by_patient(load_sunnybrook(size=s["size"]), [s["test_patient"]])[1]
images = torch.stack([x["image"] for x in test])
for which in ("watermarked", "clean"):
    net = build_network(tuple(s["channels"]), s.get("arch", "unet"))
    net.load_state_dict(torch.load(d / f"{which}.pt", map_location="cpu"))
    q = ModelQuery(net.eval(), activation="softmax", device="cpu")
    decodes, erasure, bits = 0, 0, []
    for seed in np.random.default_rng(2026).integers(1, 2**31 - 1, n):
        rep = verify_ownership(q, images, key.replace(trigger_seed=int(seed)), mode="direct")
        decodes += sum(t == key.payload for t in rep.decoded)
        erasure += (rep.decodes_by_read() or {}).get("erasure", 0)
        bits.append(rep.mean_bit_accuracy)
    out[which] = {"queries": n * len(images), "payload_decodes": int(decodes), "by_erasure": int(erasure), "mean_bits": float(np.mean(bits))}
print(json.dumps(out))
