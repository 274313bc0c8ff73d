"""The watermark's Dice and AUC cost as a statistic: the demo's clean and watermarked model trained from the same seed,
for several seeds, and the paired differences summarised by their mean, spread and 95 % interval.

    python -m experiments.paired_seeds --out runs/paired --fast [--seeds 5] [--lime-images 4] [--<setting> V]

One training run is one sample: a clean model alone moves by several Dice points with its seed (or its thread
count), so a single pair cannot say what the watermark costs. Each seed ``s`` runs the demo
(:func:`experiments.sunnybrook.run`, seed ``s`` for data order, initialisation, augmentation and the key's trigger)
into ``DIR/seed_<s>/``, which a rerun reuses; ``DIR/summary.json`` / ``summary.md`` hold the per-seed rows and
the statistics of the differences clean minus watermarked (Dice in points, AUC in % of the clean AUC): mean, sample
standard deviation, min, max and the two-sided 95 % Student-t interval of the mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from experiments import UsageError, cli, phase
from experiments.sunnybrook import make_config, run
from monai_stealthmark.utils import atomic_write_json, atomic_write_text

__all__ = ["paired_row", "summarise", "main"]


def paired_row(seed: int, res: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one seed's pair: the differences and what the watermark must keep."""
    clean, wm = res["clean"], res["watermarked"]
    return {
        "seed": seed,
        "clean_dice": clean["dice"],
        "watermarked_dice": wm["dice"],
        "dice_drop_points": 100 * (clean["dice"] - wm["dice"]),
        "clean_auc": clean["auc"],
        "watermarked_auc": wm["auc"],
        "auc_drop_percent": 100 * (clean["auc"] - wm["auc"]) / clean["auc"],
        "stealth_mask_dice": res["stealth_mask_dice"],
        "asr_direct": res["asr"]["direct"],
        "asr_lime": res["asr"]["lime"],
        "false_decodes": int(sum(res["false_decodes"].values())),
        "seconds": res["seconds"],
    }


def summarise(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation, range and the Student-t interval of the mean of paired differences."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        raise ValueError(f"a spread needs at least 2 paired seeds, got {x.size}.")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * sd / np.sqrt(x.size))
    return {"n": int(x.size), "mean": mean, "sd": sd, "min": float(x.min()), "max": float(x.max()),
            "ci95_low": mean - half, "ci95_high": mean + half}


def _markdown(rows: list[dict[str, Any]], summary: dict[str, Any], head: str) -> str:
    lines = [head, "", "| seed | clean Dice / AUC | watermarked Dice / AUC | Dice drop (points) | AUC drop (%) | stealth | ASR direct / LIME | false decodes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['clean_dice']:.4f} / {r['clean_auc']:.4f} | {r['watermarked_dice']:.4f} / {r['watermarked_auc']:.4f} | "
            f"{r['dice_drop_points']:.2f} | {r['auc_drop_percent']:.2f} | {r['stealth_mask_dice']:.4f} | "
            f"{100 * r['asr_direct']:.1f} / {100 * r['asr_lime']:.1f} % | {r['false_decodes']} |"
        )
    lines += ["", "| paired difference (clean minus watermarked) | mean | sd | min / max | 95 % interval of the mean |", "|---|---|---|---|---|"]
    for name, label in (("dice_drop_points", "Dice drop (points)"), ("auc_drop_percent", "AUC drop (% of clean)")):
        s = summary[name]
        lines.append(f"| {label} | {s['mean']:.2f} | {s['sd']:.2f} | {s['min']:.2f} / {s['max']:.2f} | "
                     f"[{s['ci95_low']:.2f}, {s['ci95_high']:.2f}] |")
    return "\n".join(lines) + "\n"


def main(out: str, seeds: int = 5, fast: bool = False, device: str | None = None, **settings: Any) -> None:
    """Train and verify ``seeds`` clean / watermarked pairs and summarise the paired differences.

    Args:
        out: output folder; ``seed_<s>/`` per seed (reused when rerun) and ``summary.json`` / ``summary.md``.
        seeds: number of seeds (0 .. seeds - 1), at least 2.
        fast: the CPU setting of the demo.
        device: ``cuda`` / ``cpu`` (default: CUDA when available).
        **settings: any setting of the demo (:class:`~experiments.sunnybrook.ExperimentConfig`) except ``seed``,
            e.g. ``--lime-images 4`` or a recipe deviation.
    """
    if "seed" in settings:
        raise UsageError("--seed is what this command varies; use --seeds N (seeds 0 .. N-1).")
    if int(seeds) < 2:
        raise UsageError(f"--seeds must be at least 2 (a spread needs two pairs), got {seeds}.")
    out_dir = Path(out)
    rows = []
    for seed in range(int(seeds)):
        phase(f"seed {seed} of {seeds}: clean and watermarked")
        cfg = make_config(fast, seed=seed, **settings)
        rows.append(paired_row(seed, run(cfg, out_dir / f"seed_{seed}", device)))
    summary = {name: summarise([r[name] for r in rows]) for name in ("dice_drop_points", "auc_drop_percent")}
    cfg = make_config(fast, **settings)
    res = {"rows": rows, "summary": summary, "config": {**cfg.to_dict(), "seeds": list(range(int(seeds)))}}
    atomic_write_json(out_dir / "summary.json", res)
    head = (f"Sunnybrook LV, {cfg.arch}, {cfg.steps} steps x {cfg.batch_size}, held-out patient {cfg.test_patient}, "
            f"seeds 0-{int(seeds) - 1}, clean and watermarked model from the same seed")
    text = _markdown(rows, summary, head)
    atomic_write_text(out_dir / "summary.md", text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(cli(main))
