"""Train an example bundle clean (its own ``train.json``) and watermarked (``train.json`` + the overlay) in-process
with MONAI's ConfigParser, then measure both models on the bundle's validation data like the 2D experiment.

    python -m experiments.bundle_pair --bundle bundles/ct_spleen_3d --out runs/ct_spleen_3d

This is the 3D row of the architectures table (the CT spleen NIfTI setting with a 3D UNet). Writes
``DIR/results.json`` and ``DIR/results.md``; the two runs' bundle outputs go to ``DIR/clean`` and
``DIR/watermarked``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from monai_stealthmark.bundle import bundle_parser
from experiments.sunnybrook import KEY_SEED, PAYLOAD, ExperimentConfig, evaluate
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_json, atomic_write_text

__all__ = ["OVERLAY", "train_bundle", "run", "main"]

OVERLAY = Path(__file__).resolve().parents[2] / "bundles" / "stealthmark_overlay.json"


def train_bundle(bundle: Path, root: Path, key_file: str | None, overrides: dict[str, Any]) -> tuple[torch.nn.Module, ConfigParser]:
    """Run the bundle's ``train`` (with the overlay when ``key_file`` is given); returns the trained network."""
    files = ["train.json"] + ([str(OVERLAY)] if key_file is not None else [])
    parser = bundle_parser(bundle, files, root, key_file, overrides)
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("train#trainer").run()
    return parser.get_parsed_content("network").eval(), parser


def run(bundle: str | Path, out: str | Path, overrides: dict[str, Any] | None = None, lime_samples: int = 300) -> dict[str, Any]:
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    key = WatermarkKey.generate(PAYLOAD, seed=KEY_SEED, created_at="2026-11-23T00:00:00+00:00")
    key.save(out / "key.json")
    nets, parser = {}, None
    for name, key_file in (("clean", None), ("watermarked", str(out / "key.json"))):
        set_determinism(int(overrides.get("seed", 0)))
        nets[name], p = train_bundle(bundle, out / name, key_file, overrides)
        torch.save(nets[name].state_dict(), out / f"{name}.pt")
        parser = parser or p
    device = parser.get_parsed_content("device")
    batches = list(parser.get_parsed_content("validate#dataloader"))
    samples = [{"image": im, "label": lb} for b in batches for im, lb in zip(b["image"], b["label"])]
    cfg = ExperimentConfig(lime_samples=lime_samples)
    res = evaluate(nets["clean"], nets["watermarked"], samples, key, cfg, device, out / "report", inferer=parser.get_parsed_content("validate#inferer"))
    res["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res["seconds"] = time.perf_counter() - t0
    res["config"] = {"bundle": bundle.name, **overrides, "max_epochs": parser["max_epochs"], "lime_samples": lime_samples}
    res["key_fingerprint"] = key.fingerprint
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", _markdown(res))
    return res


def _markdown(res: dict[str, Any]) -> str:
    fd = res["false_decodes"]
    return (
        f"{res['config']}\n\n| measure | value |\n|---|---|\n"
        f"| clean Dice / AUC | {res['clean']['dice']:.4f} / {res['clean']['auc']:.4f} |\n"
        f"| watermarked Dice / AUC | {res['watermarked']['dice']:.4f} / {res['watermarked']['auc']:.4f} |\n"
        f"| stealth mask Dice / agreement | {res['stealth_mask_dice']:.4f} / {100 * res['stealth_agreement']:.3f} % |\n"
        f"| ASR direct / LIME | {100 * res['asr']['direct']:.1f} % / {100 * res['asr']['lime']:.1f} % |\n"
        f"| bit accuracy direct / LIME | {res['bit_accuracy']['direct']:.4f} / {res['bit_accuracy']['lime']:.4f} |\n"
        f"| false decodes clean inputs / clean model / wrong key | {fd['clean_inputs']} / {fd['clean_model']} / {fd['wrong_key']} "
        f"(of {res['n_images']}) |\n| device, seconds | {res['device']}, {res['seconds']:.0f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=None, help="override the bundle's max_epochs")
    p.add_argument("--val-interval", type=int, default=None, help="override the bundle's val_interval")
    p.add_argument("--seed", type=int, default=None, help="override the bundle's seed")
    p.add_argument("--lime-samples", type=int, default=300)
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("max_epochs", a.epochs), ("val_interval", a.val_interval), ("seed", a.seed)) if v is not None}
    res = run(a.bundle, a.out, overrides, a.lime_samples)
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
