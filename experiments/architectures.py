"""The watermark on several MONAI 2D networks (same data, key, schedule and seed), one results table.

    python -m experiments.architectures --fast --out runs/architectures [--archs unet,segresnet] [--steps 400]

For each network, :func:`experiments.sunnybrook.run` trains a clean and a watermarked model on the
Sunnybrook training patients and measures everything on the held-out patient; this module collects the rows into
``DIR/architectures.json`` and ``DIR/architectures.md``. A finished network (``DIR/<arch>/results.json``) is reused,
so an interrupted run picks up where it stopped.

Options: ``--archs`` (one or a comma list of :data:`~experiments.sunnybrook.ARCHITECTURES`, default all),
``--device``, ``--data`` (the Sunnybrook folder) and any setting of :class:`~experiments.sunnybrook.ExperimentConfig`
or recipe deviation (``--batch-size 12``, ``--lime-samples 1000``, ``--occlusion-prob 0.2``, ``--trigger noise``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments import as_list, cli, phase
from experiments.sunnybrook import ARCHITECTURES, make_config, run
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
    """Run the clean-vs-watermarked experiment for each network in ``archs`` and write the table.

    ``overrides`` are :func:`~experiments.sunnybrook.make_config` settings (``fast``, ``steps``, ``data`` ...),
    checked before the first network trains.
    """
    out = Path(out)
    make_config(**overrides)
    rows = []
    for arch in archs:
        d = out / arch
        if (d / "results.json").is_file():
            res = json.loads((d / "results.json").read_text())
        else:
            phase(f"network {arch}")
            res = run(make_config(arch=arch, **overrides), d, device)
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


def main(out: str, archs: str | tuple[str, ...] = ARCHITECTURES, fast: bool = False, device: str | None = None,
         **settings: Any) -> None:
    """Train and verify each network, then print the table.

    Args:
        out: output folder (one sub-folder per network; finished networks are reused).
        archs: one network or a comma list (``--archs unet,swinunetr``); all by default.
        fast: the CPU setting.
        device: ``cuda`` / ``cpu`` (default: CUDA when available).
        **settings: settings and recipe deviations for every network, e.g. ``--steps 400 --batch-size 12``.
    """
    rows = run_architectures(as_list(archs, ARCHITECTURES, "archs"), out, device, fast=fast, **settings)
    print(architectures_markdown(rows))


if __name__ == "__main__":
    raise SystemExit(cli(main))
