"""The watermark on several MONAI 2D networks (same data, key, schedule and seed), one results table.

    python -m experiments.architectures --fast --out runs/architectures

For each network, :func:`experiments.sunnybrook.run` trains a clean and a watermarked model on the
Sunnybrook training patients and measures everything on the held-out patient; this module collects the rows into
``DIR/architectures.json`` and ``DIR/architectures.md``. A finished network (``DIR/<arch>/results.json``) is reused,
so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT
from experiments.sunnybrook import ARCHITECTURES, ExperimentConfig, run
from monai_stealthmark.key import TRIGGER_KINDS
from monai_stealthmark.utils import atomic_write_json, atomic_write_text

__all__ = ["run_architectures", "architectures_markdown", "main"]


def _row(arch: str, res: dict[str, Any]) -> dict[str, Any]:
    fd = res["false_decodes"]
    return {
        "arch": arch,
        "clean_dice": res["clean"]["dice"],
        "wm_dice": res["watermarked"]["dice"],
        "clean_auc": res["clean"]["auc"],
        "wm_auc": res["watermarked"]["auc"],
        "stealth_mask_dice": res["stealth_mask_dice"],
        "stealth_agreement": res["stealth_agreement"],
        "asr_direct": res["asr"]["direct"],
        "asr_lime": res["asr"]["lime"],
        "bits_direct": res["bit_accuracy"]["direct"],
        "bits_lime": res["bit_accuracy"]["lime"],
        "false_decodes": int(fd["clean_inputs"] + fd["clean_model"] + fd["wrong_key"]),
        "n_images": res["n_images"],
        "steps": res["config"]["steps"],
        "batch_size": res["config"]["batch_size"],
        "seed": res["config"]["seed"],
        "device": res["device"],
        "seconds": res["seconds"],
    }


def run_architectures(archs: list[str], out: str | Path, device: str | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """Run the clean-vs-watermarked experiment for each network in ``archs`` and write the table."""
    out = Path(out)
    rows = []
    for arch in archs:
        d = out / arch
        if (d / "results.json").is_file():
            res = json.loads((d / "results.json").read_text())
        else:
            res = run(ExperimentConfig(arch=arch, **overrides), d, device)
        rows.append(_row(arch, res))
        atomic_write_json(out / "architectures.json", rows)
        atomic_write_text(out / "architectures.md", architectures_markdown(rows))
    return rows


def architectures_markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| network | clean Dice | wm Dice | clean AUC | wm AUC | stealth mask Dice | stealth agreement | ASR direct | ASR LIME "
        "| bits direct / LIME | false decodes | steps x batch |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['arch']} | {r['clean_dice']:.4f} | {r['wm_dice']:.4f} | {r['clean_auc']:.4f} | {r['wm_auc']:.4f} "
        f"| {r['stealth_mask_dice']:.4f} | {100 * r['stealth_agreement']:.3f} % | {100 * r['asr_direct']:.1f} % "
        f"| {100 * r['asr_lime']:.1f} % | {r['bits_direct']:.3f} / {r['bits_lime']:.3f} | {r['false_decodes']} / {3 * r['n_images']} "
        f"| {r['steps']} x {r['batch_size']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="CPU setting")
    p.add_argument("--out", required=True)
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lime-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--occlusion-prob", type=float, default=None, help="share of triggered samples with hidden cells")
    p.add_argument("--trigger", choices=TRIGGER_KINDS, default=None, help="the key's trigger kind (default: patch)")
    p.add_argument("--trigger-amplitude", type=float, default=None, help="blend amplitude of the noise / lowfreq trigger")
    p.add_argument("--cutmix-prob", type=float, default=None, help="share of training slices with a pasted box of another (0 = off)")
    p.add_argument("--margin-consistency", type=float, default=None, help="weight of the logit-margin copy in the band (0 = off)")
    p.add_argument("--data", default=str(DEFAULT_SUNNYBROOK_ROOT))
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    rows = run_architectures(
        a.archs, a.out, a.device, fast=a.fast, steps=a.steps, batch_size=a.batch_size, lime_samples=a.lime_samples,
        seed=a.seed, data_root=a.data, occlusion_prob=a.occlusion_prob, trigger=a.trigger, trigger_amplitude=a.trigger_amplitude,
        cutmix_prob=a.cutmix_prob, margin_consistency=a.margin_consistency,
    )
    print(architectures_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
