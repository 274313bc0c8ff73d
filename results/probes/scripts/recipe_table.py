"""The README's table of the demo recipe: one row per run (folder with results.json), every bar's measure.

    python results/probes/scripts/recipe_table.py "seed 0, demo=runs/demo2t_s11" "seed 1=runs/hmspw4_s1" ...
"""

from __future__ import annotations

import json
import sys

rows, drops, passes = [], [], None
for arg in sys.argv[1:]:
    label, path = arg.split("=", 1)
    r = json.load(open(f"{path}/results.json"))
    c, w, t = r["clean"], r["watermarked"], r["watermarked_triggered_input"]
    drop = 100 * (c["dice"] - w["dice"])
    auc = 100 * (c["auc"] - w["auc"]) / c["auc"]
    gap = 100 * (w["dice"] - t["dice"])
    fd = r["false_decodes"]
    by = r.get("decodes_by_read", {}).get("direct") or {}
    ok = [drop <= 1, auc <= 1, gap <= 1, r["stealth_mask_dice"] >= 0.98, r["stealth_agreement"] >= 0.999, r["asr"]["direct"] >= 0.95,
          sum(fd.values()) == 0]
    passes = ok if passes is None else [a + b for a, b in zip(passes, ok)]
    drops.append(drop)
    mark = lambda v, good: f"{v}" if good else f"**{v}**"  # noqa: E731  misses in bold
    sd, sa = r["stealth_mask_dice"], 100 * r["stealth_agreement"]
    rows.append(
        f"| {label} | {c['dice']:.4f} / {c['auc']:.4f} | {w['dice']:.4f} / {w['auc']:.4f} | {mark(f'{drop:.2f}', ok[0])} / {mark(f'{auc:.2f}', ok[1])} | "
        f"{mark(f'{gap:.2f}', ok[2])} | {mark(f'{sd:.4f}', ok[3])} / {mark(f'{sa:.3f} %', ok[4])} | "
        f"{100 * r['asr']['direct']:.1f} / {100 * r['asr']['lime']:.1f} % ({by.get('erasure', 0)}) | "
        f"{r['bit_accuracy']['direct']:.3f} / {r['bit_accuracy']['lime']:.3f} | {fd['clean_inputs']} / {fd['clean_model']} / {fd['wrong_key']} |"
    )
print("| run | clean Dice / AUC | watermarked Dice / AUC | Dice drop (points) / AUC drop (%) | triggered-input gap (points) | stealth mask Dice / agreement | ASR direct / LIME (direct by erasure) | bits direct / LIME | false decodes |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
n = len(drops)
print(f"\nDice drop mean {sum(drops) / n:.2f} over {n} runs (range {min(drops):.2f} … {max(drops):.2f}); runs within each bar "
      f"(Dice / AUC / triggered gap / stealth Dice / agreement / ASR / false decodes): {' / '.join(map(str, passes))} of {n}")
