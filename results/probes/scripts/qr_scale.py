"""Does zbar decode the same QR read-outs at fewer pixels per module? (first reads of five watermarked demo models,
SCD0000501, direct + LIME; negatives: the clean model and a wrong key). Needs the runs/ models of sessions 7-8."""
import torch, time, numpy as np
from pyzbar import pyzbar
from monai_stealthmark.data import load_sunnybrook
from monai_stealthmark.experiments.sunnybrook import KEY_SEED, PAYLOAD, build_network
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.qr import render_qr, restore_function_patterns
from monai_stealthmark.verify import ModelQuery, verify_ownership
torch.set_num_threads(1)
key = WatermarkKey.generate(PAYLOAD, seed=KEY_SEED, tau=0.25, created_at="2026-11-23T00:00:00+00:00")
s = load_sunnybrook(size=128, patients=["SCD0000501"])
x = torch.stack([v["image"] for v in s])
mods = []
for m in ("runs/t1600","runs/hmsp_s3","runs/def_s3", "runs/def_s2", "runs/hmspw4_s1"):
    net = build_network((16,32,64,128,256)).eval(); net.load_state_dict(torch.load(m + "/watermarked.pt"))
    k = WatermarkKey.load(m + "/key.json")
    for mode in ("direct","lime"):
        r = verify_ownership(ModelQuery(net), x, k, mode=mode, lime_samples=300)
        mods += [np.asarray(mm, dtype=bool) for mm in r.modules] if hasattr(r,"modules") else []
print(len(mods), [a for a in dir(r) if not a.startswith("_")][:40])
net = build_network((16,32,64,128,256)).eval(); net.load_state_dict(torch.load("runs/t1600/clean.pt"))
neg = [np.asarray(mm, dtype=bool) for mm in verify_ownership(ModelQuery(net), x, key).modules]
net.load_state_dict(torch.load("runs/t1600/watermarked.pt"))
wk = key.replace(trigger_seed=key.trigger_seed + 1)
neg += [np.asarray(mm, dtype=bool) for mm in verify_ownership(ModelQuery(net), x, wk).modules]
for scale in (8, 4, 3, 2, 1):
    for border in (4, 2):
        imgs = [render_qr(restore_function_patterns(m), border=border, scale=scale) for m in mods]
        t0 = time.perf_counter()
        ok = sum(any(r.data.decode() == key.payload for r in pyzbar.decode(i, symbols=[pyzbar.ZBarSymbol.QRCODE])) for i in imgs)
        dt = (time.perf_counter() - t0) / len(imgs) * 1000
        negs = [render_qr(restore_function_patterns(m), border=border, scale=scale) for m in neg[:44]]
        fd = sum(len(pyzbar.decode(i, symbols=[pyzbar.ZBarSymbol.QRCODE])) > 0 for i in negs)
        print(f"scale {scale} border {border}: decoded {ok}/{len(imgs)}  {dt:.2f} ms/image  negatives decoded {fd}/44")
