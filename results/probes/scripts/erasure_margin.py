"""Probe of the erasure read's margin: decodes of saved runs (watermarked model, clean model, wrong key, clean inputs)
with the organ's codewords as erasures at organ margins 2 / 4 / 6 px and 1 / 2 modules per codeword.

    python results/probes/scripts/erasure_margin.py hmsp_s3 hmspw4_s3 def_s3   # folder names under runs/
"""
import json, sys, warnings; warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F
torch.set_num_threads(2)
from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.experiments.sunnybrook import build_network, WRONG_KEY_SEED
from monai_stealthmark.key.geometry import load_key
from monai_stealthmark.verify import ModelQuery, trigger_batch
from monai_stealthmark.verify.query import uncertainty_map
from monai_stealthmark.verify.readout import cell_means, read_scores
from monai_stealthmark.key.qr import correct_codewords, decode_qr
cache = {}
def load(run, which):
    s = json.load(open(f"runs/{run}/{which}.settings.json"))
    net = build_network(tuple(s["channels"]), s.get("arch", "unet")); net.load_state_dict(torch.load(f"runs/{run}/{which}.pt")); net.eval()
    return net, s
for run in sys.argv[1:]:
    net, s = load(run, "watermarked"); cnet, _ = load(run, "clean")
    key = load_key(f"runs/{run}/key.json")
    tp = s["test_patient"]
    if tp not in cache:
        cache[tp] = split_by_patient(load_sunnybrook("../shared/data/sunnybrook", size=128), [tp])[1]
    im = torch.stack([x["image"] for x in cache[tp]])
    g, qz = key.grid_size, key.quiet_zone
    out = {"run": run}
    with torch.no_grad():
        for name, model, k, trig in (("wm", net, key, True), ("clean_model", cnet, key, True), ("wrong_key", net, key.replace(trigger_seed=WRONG_KEY_SEED), True), ("clean_inputs", net, key, False)):
            q = ModelQuery(model, activation="softmax", device=torch.device("cpu"))
            x = trigger_batch(im, k) if trig else im
            p = q(x)
            sc = cell_means(uncertainty_map(p), k)
            mods, dec = read_scores(sc, k, "direct")[:2]
            base = [t == key.payload for t in dec]
            res = {"base": sum(base)}
            fg = (p.argmax(1, keepdim=True) > 0).float()
            for d in (2, 4, 6):
                dil = F.max_pool2d(fg, 2 * d + 1, 1, d)[:, 0]
                zone = (cell_means(dil, k).reshape(-1, g, g)[:, qz:g-qz, qz:g-qz] > 0).numpy()
                for mu in (1, 2):
                    ok = list(base)
                    for i in range(len(im)):
                        if ok[i]: continue
                        f = correct_codewords(mods[i], zone[i], key.error_correction, min_unreliable=mu)
                        if f is not None and key.payload in decode_qr(f): ok[i] = True
                    res[f"d{d}_mu{mu}"] = sum(ok)
            out[name] = res
    print(json.dumps(out), flush=True)
